"""The catalogue: upload, read, list and delete images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from service.catalogue import (
    ImageMetadata,
    delete_image,
    list_images,
    prepare_image,
    public_record,
    read_file,
    store_prepared_many,
)
from service.deps import DatabaseDep, EngineDep, ReadAccess, StateDep, WriteAccess
from service.imaging import ImageRejected
from service.indexing import index_images
from service.validation import parse_label, parse_tags

router = APIRouter(prefix="/images", tags=["images"])
ImageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="the 64-bit catalogue id")]


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The file's bytes; 413 without reading more than max_bytes + 1."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRejected(
            f"{upload.filename or 'upload'} is larger than the limit of {max_bytes} bytes", 413
        )
    return data


@router.post("", status_code=201, dependencies=[WriteAccess], summary="Upload one or more images")
async def upload_images(
    state: StateDep,
    files: Annotated[list[UploadFile], File(description="image file(s)")],
    label: Annotated[str | None, Form(description="class label for all files")] = None,
    tags: Annotated[list[str] | None, Form(description="tags (repeat the field or comma-separate)")] = None,
    source: Annotated[str | None, Form(max_length=500, description="where the images come from")] = None,
) -> JSONResponse:
    """Every file is validated before anything is stored: one bad file rejects the request.
    The same bytes uploaded again return the existing id (`created: false`)."""
    settings, engine, db = state.settings, state.engine, state.db
    if len(files) > settings.MAX_FILES_PER_REQUEST:
        raise HTTPException(
            413, f"{len(files)} files, more than the limit of {settings.MAX_FILES_PER_REQUEST}"
        )
    metadata = ImageMetadata(parse_label(label), tuple(parse_tags(tags)), source)
    prepared = []
    for upload in files:
        data = await read_upload(upload, settings.MAX_UPLOAD_BYTES)
        prepared.append(
            await engine.run_in_thread(prepare_image, data, upload.filename or "upload", state.limits)
        )
    stored = await store_prepared_many(db, prepared, [metadata] * len(prepared))

    loaded = engine.loaded
    indexed: set[int] = set()
    if loaded is not None:
        ids, images = [s.id for s in stored], [s.decoded.image for s in stored]
        indexed = set(await index_images(engine, db, loaded, ids, images))
    items = []
    for item in stored:
        status = "indexed" if item.id in indexed else item.record.get("status", "pending")
        items.append(
            {"id": item.id, "created": item.created, "status": status, "filename": item.record["filename"]}
        )
    return JSONResponse({"ids": [i["id"] for i in items], "items": items}, status_code=201)


@router.get("", dependencies=[ReadAccess], summary="List images (cursor pagination on id)")
async def list_catalogue(
    db: DatabaseDep,
    label: Annotated[str | None, Query(max_length=100)] = None,
    tag: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[int | None, Query(ge=0, description="next_cursor of the previous page")] = None,
) -> dict:
    docs, next_cursor = await list_images(db, parse_label(label), parse_label(tag, "tag"), limit, cursor)
    return {"items": [public_record(d) for d in docs], "next_cursor": next_cursor}


@router.get("/{image_id}", dependencies=[ReadAccess], summary="One image's record")
async def get_image(db: DatabaseDep, image_id: ImageId) -> dict:
    doc = await db.images.find_one({"_id": image_id})
    if doc is None:
        raise HTTPException(404, f"no image with id {image_id}")
    return public_record(doc)


async def _file_response(db: DatabaseDep, image_id: int, thumbnail: bool) -> Response:
    found = await read_file(db, image_id, thumbnail)
    if found is None:
        raise HTTPException(404, f"no image with id {image_id}")
    data, media_type = found
    return Response(
        data, media_type=media_type, headers={"Cache-Control": "public, max-age=86400, immutable"}
    )


@router.get("/{image_id}/content", dependencies=[ReadAccess], summary="The original bytes")
async def get_content(db: DatabaseDep, image_id: ImageId) -> Response:
    return await _file_response(db, image_id, thumbnail=False)


@router.get("/{image_id}/thumbnail", dependencies=[ReadAccess], summary="A small PNG thumbnail")
async def get_thumbnail(db: DatabaseDep, image_id: ImageId) -> Response:
    return await _file_response(db, image_id, thumbnail=True)


@router.delete("/{image_id}", dependencies=[WriteAccess], summary="Delete record, bytes and index entry")
async def remove_image(db: DatabaseDep, engine: EngineDep, image_id: ImageId) -> dict:
    record = await delete_image(db, image_id)
    if record is None:
        raise HTTPException(404, f"no image with id {image_id}")
    removed = await engine.remove([image_id])
    return {"id": image_id, "deleted": True, "removed_from_index": bool(removed)}
