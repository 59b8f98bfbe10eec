"""Heads on top of the backbone's pooled features. Each head keeps its JSON-able `spec` so that
`build_head(head.spec)` rebuilds it (the encoder file stores the spec, not the code).

- LinearHead: InstDisc's and MoCo v1's 128-d linear embedding.
- MLPHead: Linear(-BN)-ReLU ... Linear(-BN). ProjectionHead / PredictionHead name the roles:
  SimCLR v1 projection (2 layers, BN in the hidden layer), MoCo v2 (2 layers, no BN),
  MoCo v3 projector (3 layers, last BN without affine) and predictor (2 layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.spec = {"type": "linear", "in_dim": in_dim, "out_dim": out_dim}
        self.out_dim = out_dim
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # NxD_in -> NxD_out


class MLPHead(nn.Module):
    """`num_layers` Linear layers; hidden ones are followed by (BN if hidden_bn) and ReLU.

    A Linear directly followed by BN has no bias (the BN's shift makes it redundant, as in MoCo v3).
    last_bn adds BatchNorm1d(out_dim, affine=False) after the last Linear (MoCo v3 projector,
    following SimCLR's design with gamma removed).
    """

    role = "mlp"

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        hidden_bn: bool = True,
        last_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.spec: dict[str, Any] = {
            "type": self.role,
            "in_dim": in_dim,
            "hidden_dim": hidden_dim,
            "out_dim": out_dim,
            "num_layers": num_layers,
            "hidden_bn": hidden_bn,
            "last_bn": last_bn,
        }
        self.out_dim = out_dim
        layers: list[nn.Module] = []
        for layer in range(num_layers):
            dim_in = in_dim if layer == 0 else hidden_dim
            last = layer == num_layers - 1
            dim_out = out_dim if last else hidden_dim
            with_bn = last_bn if last else hidden_bn
            layers.append(nn.Linear(dim_in, dim_out, bias=not with_bn))
            if not last:
                if hidden_bn:
                    layers.append(nn.BatchNorm1d(dim_out))
                layers.append(nn.ReLU(inplace=True))
            elif last_bn:
                layers.append(nn.BatchNorm1d(dim_out, affine=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # NxD_in -> NxD_out


class ProjectionHead(MLPHead):
    """Maps backbone features to the space where the contrastive loss is applied."""

    role = "projection"


class PredictionHead(MLPHead):
    """MoCo v3's extra head on the query branch only (2 layers, no last BN by default)."""

    role = "prediction"

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, **kwargs) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, **kwargs)


HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "mlp": MLPHead,
    "projection": ProjectionHead,
    "prediction": PredictionHead,
}


def build_head(spec: dict[str, Any]) -> nn.Module:
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}: expected one of {sorted(HEADS)}")
    return HEADS[kind](**kwargs)
