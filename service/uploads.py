"""The one place an uploaded file is read: at most the limit plus one byte, then size-checked."""

from __future__ import annotations

from fastapi import UploadFile

from service.imaging import ImageRejected


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The file's bytes; 413 over `max_bytes` (never reading more than one byte past it), 422 when empty."""
    name = upload.filename or "upload"
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRejected(f"{name} is larger than the limit of {max_bytes} bytes", 413)
    if not data:
        raise ImageRejected(f"{name} is empty (zero bytes)")
    return data
