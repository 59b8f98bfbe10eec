"""Batched per-sample augmentation: each op against torchvision applied to one image at a time,
plus shapes, per-sample randomness, seeding and the identity case."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from training.data.augment import (
    NORMALISATION,
    PIPELINES,
    Augmentation,
    ViewConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    build_augmentation,
    crop_resize_flip,
    eval_transform,
    gaussian_blur,
    random_resized_crop_boxes,
    random_solarize,
)


def rgb(n: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize(("channels", "size", "crop"), [(1, 28, 28), (3, 40, 32)])
def test_pipeline_shapes_dtypes_and_normalisation(name, channels, size, crop):
    mean, std = NORMALISATION["fashion-mnist" if channels == 1 else "imagenet"]
    augment = build_augmentation(name, crop, channels, mean, std)
    images = torch.randint(0, 256, (6, channels, size, size), dtype=torch.uint8)
    for view in range(2):
        out = augment(images, view, torch.Generator().manual_seed(view))
        assert out.shape == (6, channels, crop, crop) and out.dtype == torch.float32
        pixels = out * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_per_sample_parameters_differ_across_the_batch():
    """The same image repeated 8 times must come out as 8 different views."""
    augment = build_augmentation("simclr", 16, 3, *NORMALISATION["imagenet"])
    images = rgb(1, 24).expand(8, -1, -1, -1).contiguous()
    out = augment(images, 0, torch.Generator().manual_seed(0))
    distinct = {tuple(v.flatten()[:50].round(decimals=4).tolist()) for v in out}
    assert len(distinct) == 8
    boxes = random_resized_crop_boxes(
        64, 24, 24, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1)
    )
    assert len({tuple(b.tolist()) for b in boxes}) > 50


def test_seeded_generator_is_deterministic_and_views_differ():
    augment = build_augmentation("mocov3", 16, 3, *NORMALISATION["imagenet"])
    images = rgb(5, 20)
    first = augment(images, 0, torch.Generator().manual_seed(42))
    again = augment(images, 0, torch.Generator().manual_seed(42))
    other_seed = augment(images, 0, torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed)


def test_identity_when_probabilities_are_zero_and_the_crop_is_full():
    config = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter=(0.4, 0.4, 0.4, 0.1))
    augment = Augmentation((config,), 12, 3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    images = rgb(3, 12)
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(augment(images, 0), expected, atol=1e-5, rtol=1e-5)


def test_crop_box_without_resampling_is_an_exact_slice_and_flip_mirrors():
    images = rgb(2, 12).float()
    boxes = torch.tensor([[3.0, 2.0, 8.0, 8.0], [0.0, 4.0, 8.0, 8.0]])
    out = crop_resize_flip(images, boxes, torch.tensor([False, True]), 8)
    torch.testing.assert_close(out[0], images[0, :, 2:10, 3:11], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], images[1, :, 4:12, 0:8].flip(-1), atol=1e-4, rtol=0)


def test_crop_boxes_follow_scale_and_ratio_bounds():
    boxes = random_resized_crop_boxes(
        500, 100, 100, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)
    )
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 100).all() and (y0 + h <= 100).all()
    area = w * h / 10000
    assert area.min() >= 0.19 and area.max() <= 1.0
    assert ((w / h) >= 0.74).all() and ((w / h) <= 1.36).all()


def test_colour_ops_match_torchvision_per_sample():
    images = rgb(3, 8).float() / 255
    factors = torch.tensor([0.6, 1.0, 1.4])
    shifts = torch.tensor([-0.3, 0.05, 0.45])
    bright, contrast = adjust_brightness(images, factors), adjust_contrast(images, factors)
    saturation, hue = adjust_saturation(images, factors), adjust_hue(images, shifts)
    for i in range(3):
        f = float(factors[i])
        torch.testing.assert_close(bright[i], TF.adjust_brightness(images[i], f), atol=1e-5, rtol=0)
        torch.testing.assert_close(contrast[i], TF.adjust_contrast(images[i], f), atol=1e-5, rtol=0)
        torch.testing.assert_close(saturation[i], TF.adjust_saturation(images[i], f), atol=1e-5, rtol=0)
        torch.testing.assert_close(hue[i], TF.adjust_hue(images[i], float(shifts[i])), atol=1e-4, rtol=0)


def test_single_channel_colour_ops():
    images = torch.rand(2, 1, 6, 6)
    torch.testing.assert_close(adjust_saturation(images, torch.tensor([0.0, 2.0])), images)
    torch.testing.assert_close(adjust_hue(images, torch.tensor([0.3, -0.2])), images)
    contrast = adjust_contrast(images, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(contrast[0], TF.adjust_contrast(images[0], 0.5), atol=1e-5, rtol=0)


def test_per_sample_gaussian_blur_matches_torchvision():
    images = rgb(3, 16).float() / 255
    sigma = torch.tensor([0.1, 0.8, 2.0])
    blurred = gaussian_blur(images, sigma, 5)
    for i in range(3):
        expected = TF.gaussian_blur(images[i], [5, 5], [float(sigma[i])] * 2)
        torch.testing.assert_close(blurred[i], expected, atol=1e-5, rtol=0)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(28) == 3


def test_solarize_inverts_bright_pixels_of_selected_samples():
    images = torch.tensor([0.2, 0.6, 128 / 255, 0.9]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    out = random_solarize(images, torch.tensor([True, False]))
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.2, 0.4, 1 - 128 / 255, 0.1]))
    torch.testing.assert_close(out[1], images[1])


def test_mocov3_views_are_asymmetric():
    augment = build_augmentation("mocov3", 224, 3, *NORMALISATION["imagenet"])
    assert augment.config(0).blur_p == 1.0 and augment.config(0).solarize_p == 0.0
    assert augment.config(1).blur_p == 0.1 and augment.config(1).solarize_p == 0.2
    simclr = build_augmentation("simclr", 224, 3, *NORMALISATION["imagenet"]).config(0)
    assert simclr.jitter == (0.8, 0.8, 0.8, 0.2) and simclr.crop_scale == (0.08, 1.0)


def test_eval_transform_resizes_centre_crops_and_normalises():
    images = torch.full((2, 1, 40, 30), 200, dtype=torch.uint8)
    out = eval_transform(images, 28, [0.5], [0.25])
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out, torch.full_like(out, (200 / 255 - 0.5) / 0.25), atol=1e-3, rtol=0)


def test_bad_input_is_a_clear_error():
    augment = build_augmentation("mocov2", 8, 3, *NORMALISATION["imagenet"])
    with pytest.raises(ValueError, match="expected uint8 Nx3xHxW"):
        augment(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown augmentation 'autoaugment'"):
        build_augmentation("autoaugment", 8, 3, *NORMALISATION["imagenet"])
    with pytest.raises(ValueError, match="mean/std have 3/3 values for 1-channel"):
        build_augmentation("mocov2", 8, 1, *NORMALISATION["imagenet"])
