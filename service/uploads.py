"""The one place an uploaded file or image body is read: never more than the limit plus one chunk,
then size-checked."""

from __future__ import annotations

from fastapi import Request, UploadFile

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


async def read_body(request: Request, max_bytes: int, name: str = "request body") -> bytes:
    """A raw request body (an image sent as `Content-Type: image/...`), with `read_upload`'s limits:
    streamed, and refused (413) as soon as it passes `max_bytes`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ImageRejected(f"{name} is larger than the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    if not size:
        raise ImageRejected(f"{name} is empty (zero bytes)")
    return b"".join(chunks)
