"""LARS as in SimCLR's LARSOptimizer (You et al. 2017; google-research/simclr lars_optimizer.py).

Per parameter w with gradient g, in a group with lr, momentum mu, weight decay wd, eta:
    g <- g + wd * w                                        (unless the group is excluded)
    trust = eta * ||w|| / ||g||  if ||w|| > 0 and ||g|| > 0, else 1   (unless excluded: 1)
    v <- mu * v + lr * trust * g
    w <- w - v
Groups with `exclude_from_wd_and_lars=True` (biases and BN parameters, as in SimCLR) get neither
weight decay nor the trust ratio: plain momentum SGD. (training.engine.parameter_groups builds them.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS setting: lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "nesterov": nesterov,
            "exclude_from_wd_and_lars": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            excluded = group["exclude_from_wd_and_lars"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                scaled_lr = group["lr"]
                if not excluded:
                    if group["weight_decay"]:
                        grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        param_norm > 0,
                        torch.where(grad_norm > 0, group["eta"] * param_norm / grad_norm, one),
                        one,
                    )
                    scaled_lr = trust * group["lr"]
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(grad * scaled_lr)
                update = group["momentum"] * buffer + scaled_lr * grad if group["nesterov"] else buffer
                param.sub_(update)
        return loss
