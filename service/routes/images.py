"""The catalogue: upload, read, list and delete images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Header, HTTPException, Path, Query
from fastapi.responses import Response

from service.catalogue import (
    RECORD_PROJECTION,
    ImageMetadata,
    delete_image,
    list_images,
    prepare_image,
    public_record,
    read_file,
)
from service.db import Database
from service.deps import AUTH_ERRORS, DatabaseDep, EngineDep, ReadAccess, StateDep, WriteAccess
from service.indexing import model_inputs, store_and_index
from service.routing import ContractRoute
from service.schemas import (
    Deleted,
    ImagePage,
    ImageRecord,
    UploadedItem,
    UploadForm,
    UploadResponse,
    binary_response,
    error_responses,
)
from service.uploads import read_upload
from service.validation import Label, Tag

router = APIRouter(prefix="/images", tags=["images"], route_class=ContractRoute)
ImageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="the 64-bit catalogue id")]
READ_ERRORS = {**AUTH_ERRORS, **error_responses(422, 503)}
# The bytes of an id never change while it exists (ids are never reused): cache for a day, never revalidate.
IMMUTABLE = "public, max-age=86400, immutable"


@router.post(
    "",
    status_code=201,
    dependencies=[WriteAccess],
    summary="Upload one or more images",
    responses={**READ_ERRORS, **error_responses(400, 413, 415)},
)
async def upload_images(state: StateDep, form: Annotated[UploadForm, File()]) -> UploadResponse:
    """Every file is validated before anything is stored: one bad file rejects the request.
    The same bytes uploaded again return the existing id (`created: false`); the label, tags or
    source sent with them replace the stored ones, and `updated` names the fields that changed."""
    settings, engine, db = state.settings, state.engine, state.db
    if len(form.files) > settings.MAX_FILES_PER_REQUEST:
        raise HTTPException(
            413, f"{len(form.files)} files, more than the limit of {settings.MAX_FILES_PER_REQUEST}"
        )
    metadata = ImageMetadata(form.label, tuple(form.tags), form.source)
    prepared = []
    for upload in form.files:
        data = await read_upload(upload, settings.MAX_UPLOAD_BYTES)
        prepared.append(
            await engine.run_in_thread(prepare_image, data, upload.filename or "upload", state.limits)
        )
    loaded = engine.loaded
    vectors = None
    if loaded is not None:  # embedded before the writes, so each record is written once, with its vector
        encoder = loaded.encoder
        images = [item.decoded.image for item in prepared]
        batch = await engine.run_in_thread(model_inputs, images, encoder.in_channels, encoder.input_size)
        vectors = await engine.embed(loaded, batch)  # NxD
    # Taken before the writes: a delete (by anyone) whose invalidation reaches the cache before the
    # new thumbnails go in keeps them out.
    generation = engine.thumbnails.generation
    stored, _ = await store_and_index(engine, db, loaded, prepared, [metadata] * len(prepared), vectors)
    for item, image in zip(stored, prepared, strict=True):
        if item.created:  # the first search that shows a new image reads no thumbnail
            engine.thumbnails.offer(item.id, image.thumbnail, generation)
    given = _given_metadata(form)
    updated = {item.id: await _update_metadata(db, item.record, given) for item in stored if not item.created}

    indexed: set[int] = set()
    if loaded is not None:
        # Searchable now, whoever added it: the change-stream watcher may have indexed a record it
        # saw inserted before this request got to it.
        ids = [s.id for s in stored]
        present = await engine.run_in_thread(loaded.index.contains, ids)
        indexed = {image_id for image_id, there in zip(ids, present.tolist(), strict=True) if there}
    items = [
        UploadedItem(
            id=item.id,
            created=item.created,
            status="indexed" if item.id in indexed else item.record.get("status", "pending"),
            filename=item.record["filename"],
            updated=updated.get(item.id, []),
        )
        for item in stored
    ]
    return UploadResponse(ids=[item.id for item in items], items=items)


def _given_metadata(form: UploadForm) -> dict[str, Any]:
    """The metadata fields this upload sets (a field not sent leaves the stored value alone)."""
    given: dict[str, Any] = {"label": form.label, "tags": list(form.tags), "source": form.source}
    return {name: value for name, value in given.items() if value not in (None, [])}


async def _update_metadata(db: Database, record: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Known bytes uploaded again: set the metadata that differs; the names of the fields changed."""
    changes = {name: value for name, value in given.items() if record.get(name) != value}
    if changes:
        await db.images.update_one({"_id": record["_id"]}, {"$set": changes})
        record.update(changes)
    return sorted(changes)


@router.get(
    "", dependencies=[ReadAccess], summary="List images (cursor pagination on id)", responses=READ_ERRORS
)
async def list_catalogue(
    db: DatabaseDep,
    label: Annotated[Label | None, Query(description="only images with this label")] = None,
    tag: Annotated[Tag | None, Query(description="only images with this tag")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[int | None, Query(ge=0, description="next_cursor of the previous page")] = None,
) -> ImagePage:
    docs, next_cursor = await list_images(db, label, tag, limit, cursor)
    return ImagePage(
        items=[ImageRecord.model_validate(public_record(d)) for d in docs], next_cursor=next_cursor
    )


@router.get(
    "/{image_id}",
    dependencies=[ReadAccess],
    summary="One image's record",
    responses={**READ_ERRORS, **error_responses(404)},
)
async def get_image(db: DatabaseDep, image_id: ImageId) -> ImageRecord:
    doc = await db.images.find_one({"_id": image_id}, RECORD_PROJECTION)
    if doc is None:
        raise HTTPException(404, f"no image with id {image_id}")
    return ImageRecord.model_validate(public_record(doc))


@router.get(
    "/{image_id}/content",
    dependencies=[ReadAccess],
    summary="The original bytes",
    response_class=Response,
    responses={
        **binary_response(
            "the bytes as uploaded, in their media type", "image/*", "application/octet-stream"
        ),
        **READ_ERRORS,
        **error_responses(404),
    },
)
async def get_content(db: DatabaseDep, image_id: ImageId) -> Response:
    found = await read_file(db, image_id)
    if found is None:
        raise HTTPException(404, f"no image with id {image_id}")
    data, media_type = found
    return Response(data, media_type=media_type, headers={"Cache-Control": IMMUTABLE})


THUMBNAIL_HEADERS = {
    "ETag": {"description": "a strong validator: a hash of the bytes", "schema": {"type": "string"}},
    "Cache-Control": {"description": IMMUTABLE, "schema": {"type": "string"}},
}


@router.get(
    "/{image_id}/thumbnail",
    dependencies=[ReadAccess],
    summary="A small PNG thumbnail",
    description="Served from memory when recently read (a search result); `If-None-Match` with the "
    "ETag answers 304 without the bytes.",
    response_class=Response,
    responses={
        200: binary_response("a PNG thumbnail", "image/png")[200] | {"headers": THUMBNAIL_HEADERS},
        304: {"description": "If-None-Match names this thumbnail's ETag: the cached copy is current"},
        **READ_ERRORS,
        **error_responses(404),
    },
)
async def get_thumbnail(
    db: DatabaseDep,
    engine: EngineDep,
    image_id: ImageId,
    if_none_match: Annotated[str | None, Header(description="ETag(s) of a cached copy")] = None,
) -> Response:
    thumbnail = (await engine.thumbnails.thumbnails(db, [image_id])).get(image_id)
    if thumbnail is None:
        raise HTTPException(404, f"no image with id {image_id}")
    headers = {"Cache-Control": IMMUTABLE, "ETag": thumbnail.etag}
    if if_none_match is not None and _etag_matches(if_none_match, thumbnail.etag):
        return Response(status_code=304, headers=headers)
    return Response(thumbnail.data, media_type="image/png", headers=headers)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 13.1.2): `*`, or any listed tag, W/ ignored."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.delete(
    "/{image_id}",
    dependencies=[WriteAccess],
    summary="Delete record, bytes and index entry",
    responses={**READ_ERRORS, **error_responses(404)},
)
async def remove_image(db: DatabaseDep, engine: EngineDep, image_id: ImageId) -> Deleted:
    # Every step runs even when an earlier one finds nothing, so a retried or repeated delete
    # finishes what a timed-out or crashed one started (and says it deleted, which it did).
    record = await delete_image(db, image_id)
    engine.thumbnails.invalidate([image_id])  # gone here at once; elsewhere when the stream says so
    removed = await engine.remove([image_id])  # this replica's watcher may have removed it first
    if record is None and not removed:
        raise HTTPException(404, f"no image with id {image_id}")
    loaded = engine.loaded
    gone = loaded is not None and not (await engine.run_in_thread(loaded.index.contains, [image_id]))[0]
    return Deleted(id=image_id, deleted=True, removed_from_index=bool(removed or gone))
