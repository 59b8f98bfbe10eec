"""ResNet-18/50 backbones (torchvision's layout and parameter names, training/models/blocks.py)
with a width multiplier, 1- or 3-channel input, the CIFAR-style small stem, and MoCo's
SplitBatchNorm (single-process shuffling-BN emulation).

The output is the globally average-pooled feature vector (no fc): NxD with D = `feature_dim`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from training.models.blocks import BasicBlock, Bottleneck

ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed separately over `num_splits` sub-batches.

    From the MoCo CIFAR-10 demo: on one GPU it stands in for shuffling BN across GPUs, so that
    a query and its key are not normalised with the same batch statistics (which would let the
    model cheat through the BN). Sample n belongs to sub-batch n % num_splits. The running
    statistics are the mean over the sub-batches; in eval mode it is a plain BatchNorm2d, and
    its state_dict has exactly BatchNorm2d's keys.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        n, c, h, w = input.shape
        if n % self.num_splits != 0:
            raise ValueError(
                f"SplitBatchNorm: batch size {n} is not divisible by num_splits={self.num_splits}"
            )
        splits = self.num_splits
        running_mean = self.running_mean.repeat(splits)
        running_var = self.running_var.repeat(splits)
        # (N/s)x(s*C)xHxW: channel block k holds the samples n with n % s == k
        out = F.batch_norm(
            input.reshape(-1, c * splits, h, w),
            running_mean,
            running_var,
            self.weight.repeat(splits) if self.weight is not None else None,
            self.bias.repeat(splits) if self.bias is not None else None,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        ).view(n, c, h, w)
        self.running_mean.copy_(running_mean.view(splits, c).mean(dim=0))
        self.running_var.copy_(running_var.view(splits, c).mean(dim=0))
        self.num_batches_tracked.add_(1)
        return out


def norm_layer_factory(norm: str, num_splits: int = 8) -> Callable[[int], nn.Module]:
    """ "bn" -> BatchNorm2d, "split_bn" -> SplitBatchNorm(num_splits)."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "split_bn":
        return lambda channels: SplitBatchNorm(channels, num_splits=num_splits)
    raise ValueError(f"unknown norm {norm!r}: expected 'bn' or 'split_bn'")


class ResNet(nn.Module):
    """torchvision's ResNet layout with stage widths 64*width*(1, 2, 4, 8) and no classifier."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        width: float = 1.0,
        in_channels: int = 3,
        small_stem: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        widths = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self._norm_layer = norm_layer
        self.inplanes = widths[0]
        if small_stem:  # CIFAR / 28x28 variant: keep the resolution in the stem
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3] * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                self._norm_layer(planes * block.expansion),
            )
        # base_width=64 keeps Bottleneck's inner width equal to `planes` at every width multiplier
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage before pooling: NxDxhxw."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # NxC0xH'xW'
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)  # NxD


def build_resnet(
    arch: str,
    in_channels: int = 3,
    small_stem: bool = False,
    width: float = 1.0,
    norm: str = "bn",
    num_splits: int = 8,
) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet {arch!r}: expected one of {sorted(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, width, in_channels, small_stem, norm_layer_factory(norm, num_splits))
