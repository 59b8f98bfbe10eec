"""Decoding one image into the uint8 CxHxW tensor the models take. Shared by the training data
sets, `training.embed` and the service, so that an image is prepared identically everywhere."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (message says why)."""


def open_image(source: bytes | str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image; raise ImageDecodeError for anything unreadable.

    max_pixels guards against decompression bombs before the pixels are decoded.
    """
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageDecodeError(
                f"image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                f"more than the limit of {max_pixels}"
            )
        image.load()  # decode now: truncated files fail here, not later
        return ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a readable image: {exc}") from exc


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any mode (palette, alpha, CMYK, 16-bit, ...) to L (1 channel) or RGB (3)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # alpha over white
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def pil_to_uint8(image: Image.Image, channels: int) -> torch.Tensor:
    """CxHxW uint8 tensor in L (C=1) or RGB (C=3)."""
    array = np.asarray(to_mode(image, channels), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bilinear, antialiased), then centre-crop to size x size
    (uint8 ...xCxHxW in, out). The same arithmetic as torchvision's `resize` + `center_crop` (torch's
    native uint8 kernel; a test compares them), without importing torchvision in the service. That
    kernel runs on the CPU only: images on another device are resized there and moved back."""
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    if image.device.type != "cpu":
        return resize_center_crop(image.cpu(), size).to(image.device)
    if width <= height:
        new_height, new_width = int(size * height / width), size
    else:
        new_height, new_width = size, int(size * width / height)
    if (new_height, new_width) != (height, width):
        batch = image.reshape(-1, *image.shape[-3:])  # any leading dims (one image or NxCxHxW)
        batch = F.interpolate(
            batch, size=[new_height, new_width], mode="bilinear", align_corners=False, antialias=True
        )
        image = batch.reshape(*image.shape[:-2], new_height, new_width)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return image[..., top : top + size, left : left + size]


def load_uint8(source: bytes | str | os.PathLike, channels: int, size: int, max_pixels: int | None = None):
    """Decode, convert and resize one image: uint8 CxSxS."""
    return resize_center_crop(pil_to_uint8(open_image(source, max_pixels), channels), size)
