"""Checking uploaded bytes and deriving what is stored with them (media type, size, thumbnail).

Decoding itself is training.data.images' (`open_image`, `to_mode`), so that the service prepares
an image exactly as training did; this module adds the service's limits and HTTP-facing errors.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from training.data.images import ImageDecodeError, open_image, pil_to_uint8, resize_center_crop, to_mode


class ImageRejected(ValueError):
    """Bytes that cannot be stored; `status_code` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass
class DecodedImage:
    image: Image.Image  # fully decoded, EXIF orientation applied
    media_type: str  # e.g. image/png
    width: int
    height: int
    sha256: str


def check_size(data: bytes, max_bytes: int, name: str = "upload") -> None:
    if len(data) == 0:
        raise ImageRejected(f"{name} is empty (zero bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(f"{name} is {len(data)} bytes, more than the limit of {max_bytes}", 413)


def decode_image(data: bytes, max_bytes: int, max_pixels: int, name: str = "upload") -> DecodedImage:
    """Validate and decode; raise ImageRejected (413 for limits, 422 for unreadable bytes)."""
    check_size(data, max_bytes, name)
    try:
        with Image.open(io.BytesIO(data)) as header:  # header only: no pixels decoded yet
            width, height, fmt = header.width, header.height, header.format
    except UnidentifiedImageError as exc:  # its message shows the BytesIO object's repr
        raise ImageRejected(f"{name} is not a readable image: unknown or unsupported format") from exc
    except Exception as exc:  # PIL raises many types for a non-image
        raise ImageRejected(f"{name} is not a readable image: {exc}") from exc
    if width * height > max_pixels:
        raise ImageRejected(
            f"{name} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}", 413
        )
    try:
        image = open_image(data, max_pixels)
    except ImageDecodeError as exc:
        raise ImageRejected(f"{name}: {exc}") from exc
    media_type = Image.MIME.get(fmt or "", "application/octet-stream")
    return DecodedImage(image, media_type, image.width, image.height, hashlib.sha256(data).hexdigest())


def model_input(image: Image.Image, channels: int, size: int) -> torch.Tensor:
    """uint8 CxSxS, prepared as `Encoder.prepare` would from the same bytes."""
    return resize_center_crop(pil_to_uint8(image, channels), size)


def make_thumbnail(image: Image.Image, longest_side: int) -> bytes:
    """A small PNG (longer side `longest_side`), for listings."""
    greyscale = image.mode != "P" and len([b for b in image.getbands() if b != "A"]) == 1
    thumb = to_mode(image, 1 if greyscale else 3)  # 16-bit, CMYK, palette, alpha -> L or RGB
    thumb.thumbnail((longest_side, longest_side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()
