"""Global (cross-rank) batch norm that also works on CPU/gloo, where torch's SyncBatchNorm refuses
("expected input tensor to be on GPU"). SimCLR's global BN and MoCo v3 need BN statistics over the
whole global batch; on CUDA torch.nn.SyncBatchNorm does the same job faster.

Statistics: mean = sum(x) / count and biased var = sum((x - mean)^2) / count, each summed over ranks
with a differentiable all-reduce, so gradients flow to every rank's inputs exactly as SyncBN's.
Outside a process group (or in eval mode) it is plain BatchNorm; the state_dict keys are BatchNorm's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.distributed import get_world_size, is_distributed
from training.models.resnet import SplitBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (NxC...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and get_world_size() > 1):
            return F.batch_norm(
                input,
                self.running_mean if self.track_running_stats else None,
                self.running_var if self.track_running_stats else None,
                self.weight,
                self.bias,
                self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.1,
                self.eps,
            )
        out_dtype = input.dtype
        input = input.float()  # statistics in fp32, as autocast runs batch_norm
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        totals = all_reduce(torch.cat([input.sum(dim=dims), count]))
        total_count = totals[-1]
        mean = totals[:-1] / total_count  # C
        centred = input - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dim=dims)) / total_count  # C, biased
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                unbiased = var * total_count / (total_count - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
                self.num_batches_tracked.add_(1)
        return out.to(out_dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (not SplitBatchNorm) by GlobalBatchNorm with the same parameters
    and statistics, like `nn.SyncBatchNorm.convert_sync_batchnorm`."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (SplitBatchNorm, GlobalBatchNorm)
    ):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_global_batchnorm(child))
    return converted


def collectives_without_sync_bn() -> bool:
    """True under a process group whose backend torch's SyncBatchNorm cannot use (gloo: CPU)."""
    return is_distributed() and dist.get_backend() != "nccl"


def to_global_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """torch's SyncBatchNorm on CUDA (fused kernels, AMP-safe), GlobalBatchNorm elsewhere."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_global_batchnorm(module)
