"""The encoder file as `index/` needs it: read and version-check, nothing else.

`training/` writes the file (training/encoder.py: format, fields, inference wrapper); `index/`
copies it into each index version and records its version, and `service/` loads it from there.
Reading lives here, at the bottom layer, so that `index` depends on no other package of ours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

ENCODER_FORMAT = "ssl-retrieval/encoder/v1"


class EncoderError(ValueError):
    """The encoder file is missing or unusable (message says why)."""


def read_encoder_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read an encoder file, or the "encoder" entry of a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"encoder checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise EncoderError(f"{path} is not a readable checkpoint: {exc}") from exc
    record = data.get("encoder", data) if isinstance(data, dict) else None
    if not isinstance(record, dict) or record.get("format") != ENCODER_FORMAT:
        raise EncoderError(f"{path} holds no encoder in format {ENCODER_FORMAT}")
    return record


def encoder_version(path: str | os.PathLike) -> str | None:
    """The `version` an encoder file declares (its weights' hash)."""
    version = read_encoder_record(path).get("version")
    return None if version is None else str(version)
