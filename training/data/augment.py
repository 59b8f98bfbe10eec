"""Per-paper augmentation pipelines, batched on uint8 tensors on any device, with PER-SAMPLE random
parameters (torchvision's v2 functional ops on a batch share one draw, which would give every
image in a batch the same crop and jitter: wrong for contrastive learning).

All random parameters are drawn on the CPU (from `generator` when given, else the global RNG) and
moved to the images' device, so a seeded generator gives the same views on CPU and GPU.

Pipelines (crop size S is a parameter: 28 for Fashion-MNIST, 224 for ImageNet):
  instdisc  (= MoCo v1, lemniscate): crop scale (0.2, 1), grayscale p=0.2, then jitter
            (0.4, 0.4, 0.4, 0.4) always, flip.
  mocov2    ("aug+"): crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2,
            blur sigma (0.1, 2) p=0.5, flip.
  simclr    crop (0.08, 1), jitter (0.8s, 0.8s, 0.8s, 0.2s) p=0.8 with s=1, grayscale 0.2,
            blur p=0.5, flip.
  mocov3    asymmetric (BYOL's): crop (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2,
            flip; view 0 blur p=1.0 no solarize, view 1 blur p=0.1 solarize p=0.2.
Blur kernel: 10% of the crop size (odd, >= 3). One-channel images: saturation, hue and
grayscale are identities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

NORMALISATION: dict[str, tuple[list[float], list[float]]] = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, with torchvision's rounding


@dataclass(frozen=True)
class ViewConfig:
    """The random transforms of one view (probabilities in [0, 1])."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    jitter_random_order: bool = True  # torchvision's ColorJitter applies the four in random order
    grayscale_p: float = 0.0
    grayscale_before_jitter: bool = False  # lemniscate / MoCo v1 order
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


_MOCOV3 = ViewConfig(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)

PIPELINES: dict[str, tuple[ViewConfig, ...]] = {
    "instdisc": (
        ViewConfig(
            crop_scale=(0.2, 1.0),
            jitter=(0.4, 0.4, 0.4, 0.4),
            jitter_p=1.0,
            grayscale_p=0.2,
            grayscale_before_jitter=True,
        ),
    ),
    "mocov2": (
        ViewConfig(
            crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5
        ),
    ),
    "simclr": (
        ViewConfig(
            crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5
        ),
    ),
    "mocov3": (replace(_MOCOV3, blur_p=1.0), replace(_MOCOV3, blur_p=0.1, solarize_p=0.2)),
}
PIPELINES["mocov1"] = PIPELINES["instdisc"]

# Small images (native side <= 64 px: Fashion-MNIST, CIFAR-like folders). SimCLR's own CIFAR-10
# recipe (appendix B.9: no blur at 32 px) with a gentler crop: at 28 px an 8% crop is a 8x8 patch,
# blown up 3.5x, which keeps too little of the object to be the same instance. Colour terms stay
# (they act on RGB folders; on one channel saturation, hue and grayscale are identities).
# Variants for the ablation in bench/RESULTS.md ("small-image recipe").
_SMALL = ViewConfig(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2)
PIPELINES["small"] = (_SMALL,)
PIPELINES["small-crop08"] = (replace(_SMALL, crop_scale=(0.08, 1.0)),)
PIPELINES["small-crop35"] = (replace(_SMALL, crop_scale=(0.35, 1.0)),)
PIPELINES["small-noflip"] = (replace(_SMALL, flip_p=0.0),)
PIPELINES["simclr-noflip"] = (replace(PIPELINES["simclr"][0], flip_p=0.0),)  # SimCLR's small-image default


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


# ---------------------------------------------------------------- geometry


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    attempts: int = 10,
) -> torch.Tensor:
    """Nx4 float boxes (x0, y0, w, h) in pixels: torchvision's RandomResizedCrop, per sample.

    Up to `attempts` draws of area fraction ~ U(scale) and log-aspect ~ U(log ratio); the first
    that fits wins; otherwise the whole image (torchvision's fallback for in-range aspect ratios).
    """
    area = height * width
    target = area * _uniform(n * attempts, *scale, generator).view(n, attempts)
    log_ratio = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)  # NxA
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((n,), -1))
    rows = torch.arange(n)
    w = torch.where(
        first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(width), dtype=torch.float64)
    )
    h = torch.where(
        first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(height), dtype=torch.float64)
    )
    x0 = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1))
    return torch.stack([x0, y0, w, h], dim=1)


def crop_resize_flip(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Bilinear resample of each sample's box to size x size, mirrored where `flip`.

    images: NxCxHxW float; boxes: Nx4 (x0, y0, w, h) pixels; flip: N bool. Returns NxCxSxS.
    """
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.to(images.device, torch.float64).unbind(dim=1)
    sign = 1.0 - 2.0 * flip.to(images.device, torch.float64)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=images.device)  # Nx2x3, output -> input coords
    theta[:, 0, 0] = w / width * sign
    theta[:, 0, 2] = (2 * x0 + w) / width - 1  # box centre in [-1, 1] (align_corners=False)
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta.to(images.dtype), [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- colour (float images in [0, 1])


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Nx1xHxW luma of Nx3xHxW RGB (a 1-channel image is returned as is)."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped; factor N."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # Nx1x1x1
    return _blend(images, mean.expand_as(images), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    return _blend(images, grayscale(images).expand_as(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` (N, in [-0.5, 0.5] turns) through HSV, as torchvision does."""
    if images.shape[1] == 1:
        return images
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = images.unbind(dim=1)  # each NxHxW
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    saturation = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta == 0, torch.zeros_like(hue), hue)
    return torch.remainder(hue / 6.0, 1.0), saturation, maxc


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    # rows: sector 0..5; columns: which of (v, q, p, t) is r, g, b
    candidates = torch.stack([value, q, p, t], dim=1)  # Nx4xHxW
    table = torch.tensor(
        [[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=hue.device
    )
    pick = table[sector].permute(0, 3, 1, 2)  # Nx3xHxW indices into the 4 candidates
    return torch.gather(candidates, 1, pick).clamp(0, 1)


def color_jitter(
    images: torch.Tensor,
    strengths: tuple[float, float, float, float],
    apply: torch.Tensor,
    random_order: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """torchvision ColorJitter per sample: factors ~ U(max(0, 1-s), 1+s), hue ~ U(-h, h), in a
    per-sample random order; samples with apply=False are unchanged."""
    n = images.shape[0]
    brightness, contrast, saturation, hue = strengths
    factors = [
        _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator),
        _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator),
        _uniform(n, max(0.0, 1 - saturation), 1 + saturation, generator),
        _uniform(n, -hue, hue, generator),
    ]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    enabled = [
        brightness > 0,
        contrast > 0,
        saturation > 0 and images.shape[1] == 3,
        hue > 0 and images.shape[1] == 3,
    ]
    if random_order:
        order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # Nx4 permutation per sample
    else:
        order = torch.arange(4).expand(n, 4)
    device = images.device
    apply = apply.to(device)
    for position in range(4):
        for op_index, op in enumerate(ops):
            if not enabled[op_index]:
                continue
            mask = apply & (order[:, position] == op_index).to(device)
            if not bool(mask.any()):
                continue
            selected = mask.nonzero().squeeze(1)
            factor = factors[op_index].to(device, images.dtype)[selected]
            images = images.index_copy(0, selected, op(images[selected], factor))
    return images


def random_grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    gray = grayscale(images).expand_as(images)
    return torch.where(apply.to(images.device).view(-1, 1, 1, 1), gray, images)


def blur_kernel_size(crop_size: int) -> int:
    """10% of the crop size, made odd, at least 3 (SimCLR: 23 at 224)."""
    size = int(0.1 * crop_size)
    return max(3, size // 2 * 2 + 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (N), as one grouped conv; reflect padding."""
    n, c, h, w = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)  # K
    sigma = sigma.to(images.device, images.dtype).view(n, 1)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C)xK
    x = images.reshape(1, n * c, h, w)  # one group per (sample, channel)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect" if w > radius else "replicate")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect" if h > radius else "replicate")
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, h, w)


def random_gaussian_blur(
    images: torch.Tensor,
    apply: torch.Tensor,
    sigma_range: tuple[float, float],
    kernel_size: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    sigma = _uniform(images.shape[0], *sigma_range, generator)
    selected = apply.nonzero().squeeze(1)
    if selected.numel() == 0:
        return images
    selected_device = selected.to(images.device)
    blurred = gaussian_blur(images[selected_device], sigma[selected], kernel_size)
    return images.index_copy(0, selected_device, blurred)


def random_solarize(images: torch.Tensor, apply: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert pixels >= threshold (PIL's ImageOps.solarize at 128) where `apply`."""
    mask = apply.to(images.device).view(-1, 1, 1, 1) & (images >= threshold)
    return torch.where(mask, 1.0 - images, images)


# ---------------------------------------------------------------- pipelines


def _normaliser(mean: list[float], std: list[float], channels: int, device: torch.device):
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
    shape = (1, channels, 1, 1)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)


class Augmentation:
    """callable(uint8 NxCxHxW, view_index, generator=None) -> float NxCxSxS, normalised."""

    def __init__(
        self,
        views: tuple[ViewConfig, ...],
        crop_size: int,
        in_channels: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.views = views
        self.crop_size = crop_size
        self.in_channels = in_channels
        self.mean, self.std = list(mean), list(std)
        _normaliser(self.mean, self.std, in_channels, torch.device("cpu"))  # validate now
        self.kernel_size = blur_kernel_size(crop_size)

    def config(self, view_index: int) -> ViewConfig:
        return self.views[view_index % len(self.views)]

    def __call__(
        self, images: torch.Tensor, view_index: int = 0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected uint8 Nx{self.in_channels}xHxW images, got {images.dtype} {tuple(images.shape)}"
            )
        config = self.config(view_index)
        n, _, height, width = images.shape
        x = images.float() / 255.0  # NxCxHxW in [0, 1]
        boxes = random_resized_crop_boxes(n, height, width, config.crop_scale, config.crop_ratio, generator)
        x = crop_resize_flip(x, boxes, _bernoulli(n, config.flip_p, generator), self.crop_size)
        jitter_apply = _bernoulli(n, config.jitter_p, generator)
        gray_apply = _bernoulli(n, config.grayscale_p, generator)
        if config.grayscale_before_jitter:
            x = random_grayscale(x, gray_apply)
        x = color_jitter(x, config.jitter, jitter_apply, config.jitter_random_order, generator)
        if not config.grayscale_before_jitter:
            x = random_grayscale(x, gray_apply)
        blur_apply = _bernoulli(n, config.blur_p, generator)
        x = random_gaussian_blur(x, blur_apply, config.blur_sigma, self.kernel_size, generator)
        x = random_solarize(x, _bernoulli(n, config.solarize_p, generator))
        mean, std = _normaliser(self.mean, self.std, self.in_channels, x.device)
        return (x - mean) / std


def build_augmentation(
    name: str,
    crop_size: int,
    in_channels: int,
    mean: list[float],
    std: list[float],
    crop_scale: tuple[float, float] | None = None,
) -> Callable[..., torch.Tensor]:
    """The recipe `name` at `crop_size`; `crop_scale` replaces its crops' area range (multi-crop's
    local views: the same colour and blur distortions on a small region, as SwAV's)."""
    if name not in PIPELINES:
        raise ValueError(f"unknown augmentation {name!r}: expected one of {sorted(PIPELINES)}")
    views = PIPELINES[name]
    if crop_scale is not None:
        views = tuple(replace(view, crop_scale=tuple(crop_scale)) for view in views)
    return Augmentation(views, crop_size, in_channels, mean, std)


def eval_transform(images: torch.Tensor, crop_size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Resize the shorter side to crop_size, centre-crop, normalise: uint8 NxCxHxW -> float NxCxSxS."""
    from torchvision.transforms.v2 import functional as TF

    if images.shape[-2:] != (crop_size, crop_size):
        images = TF.center_crop(TF.resize(images, [crop_size], antialias=True), [crop_size, crop_size])
    mean_t, std_t = _normaliser(list(mean), list(std), images.shape[1], images.device)
    return (images.float() / 255.0 - mean_t) / std_t
