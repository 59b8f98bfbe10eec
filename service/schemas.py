"""The HTTP contract: every request form/body and every response body as a pydantic model, so that
`/openapi.json` describes them all and FastAPI validates both directions.

Request models forbid unknown fields (a misspelt or misplaced parameter is a 422, never silently
dropped). Error bodies are always `{"detail": "<one line>"}` (`ErrorBody`), documented per status
with `error_responses`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from index.expansion import MAX_EXPANSION
from service.validation import Label, Tag, parse_tags

MAX_VECTOR_DIM = 65536
MAX_INLINE_THUMBNAILS = 64


# ----------------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    detail: str = Field(description="one line saying what went wrong")


class NotReadyBody(ErrorBody):
    reasons: list[str] = Field(description="every reason the service is not ready")


ERROR_DESCRIPTIONS = {
    400: "the body cannot be parsed (malformed multipart, JSON that is not UTF-8)",
    401: "the X-API-Key header is missing (API_KEY is set)",
    403: "the X-API-Key header is wrong",
    404: "no image with this id",
    409: "the catalogue holds no labelled image to vote",
    413: "the body, a file or an image is over the limits (MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES, MAX_PIXELS)",
    415: "the body's Content-Type is not one this operation takes",
    422: "invalid or unknown parameters, an empty or unreadable image",
    503: "the database is unreachable or no model/index is loaded yet (see Retry-After)",
}


RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: each code answers an `ErrorBody` (a 503 also says when to retry)."""
    return {
        code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]}
        | ({"headers": RETRY_AFTER} if code == 503 else {})
        for code in codes
    }


# ----------------------------------------------------------------------------- request forms
class FormTags(BaseModel):
    """Form `tags`: repeated fields, comma-separated values or a JSON list, as `parse_tags` reads them."""

    @field_validator("tags", mode="before", check_fields=False)
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        if value is None:
            return []
        return parse_tags([value] if isinstance(value, str) else value)


class UploadForm(FormTags):
    """`POST /images`: one or more files; label, tags and source apply to every file."""

    model_config = ConfigDict(extra="forbid")

    files: list[UploadFile] = Field(min_length=1, description="image file(s), repeat the field")
    label: Label | None = Field(None, description="class label for all files")
    tags: list[Tag] = Field(
        default_factory=list,
        max_length=32,
        description='tags for all files: repeat the field, comma-separate, or send a JSON list ["a", "b"]',
    )
    source: str | None = Field(None, max_length=500, description="where the images come from")


class SearchOptions(BaseModel):
    """What every search takes besides the query."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=1000, description="number of results (1..SEARCH_MAX_K)")
    label: Label | None = Field(None, description="only images with this label")
    tags: list[Tag] = Field(
        default_factory=list, max_length=32, description="only images with all these tags"
    )
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="only results at least this similar")
    expand: int | None = Field(
        None,
        ge=0,
        le=MAX_EXPANSION,
        description="rank by alpha query expansion over the query's top N results (Radenovic et al. "
        "2018): the query plus those results weighted by similarity^3, searched again; scores stay "
        "the similarity to the query. 0: plain nearest neighbours; default: the service's SEARCH_EXPAND",
    )
    thumbnails: int = Field(
        0,
        ge=0,
        le=MAX_INLINE_THUMBNAILS,
        description="inline the thumbnails of the first N results (`thumbnail_data_url`), read in one "
        "batch: a page shows them without a request per result; 0: none",
    )


class SearchForm(FormTags, SearchOptions):
    """Multipart search: the query image in `file`; tags as in `POST /images`."""

    file: UploadFile = Field(description="the query image")
    tags: list[Tag] = Field(
        default_factory=list,
        max_length=32,
        description="only images with all these tags (repeat the field, comma-separate or a JSON list)",
    )


class SearchParams(FormTags, SearchOptions):
    """Search with the query image as the request body (`Content-Type: image/...`): the options
    in the query string; tags as in a form (repeat the parameter or comma-separate)."""

    tags: list[Tag] = Field(
        default_factory=list,
        max_length=32,
        description="only images with all these tags (repeat the parameter or comma-separate)",
    )


class SearchQuery(SearchOptions):
    """JSON search: exactly one of `id` (a catalogue image) or `vector` (D floats, re-normalised)."""

    id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)] | None = Field(None, description="a catalogue id")
    vector: list[float] | None = Field(
        None,
        min_length=1,
        max_length=MAX_VECTOR_DIM,
        description="a query embedding of the index's dimension",
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchQuery:
        if (self.id is None) == (self.vector is None):
            raise ValueError('give exactly one of "id" or "vector" (or upload an image as multipart)')
        return self


class ClassifyOptions(BaseModel):
    """`POST /classify` with the image as the body: the vote's k and tau and how many voters to
    list, in the query string."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, le=10000, description="neighbours that vote (default CLASSIFY_K=200)")
    tau: float | None = Field(None, gt=0, le=10, description="temperature (default CLASSIFY_TAU=0.07)")
    neighbours: int = Field(
        10, ge=0, le=1000, description="how many of the voting neighbours to list, best first"
    )


class ClassifyForm(ClassifyOptions):
    """`POST /classify` as multipart: the image in `file`, the same options as form fields."""

    file: UploadFile = Field(description="the image to classify")


# ----------------------------------------------------------------------------- responses
class UploadedItem(BaseModel):
    id: int
    created: bool = Field(description="false: the same bytes were already stored under this id")
    status: Literal["pending", "indexed"]
    filename: str = Field(description="the stored record's filename (the first upload's)")
    updated: list[Literal["label", "tags", "source"]] = Field(
        default_factory=list,
        description="for known bytes: the metadata fields this upload changed on the existing record",
    )


class UploadResponse(BaseModel):
    ids: list[int] = Field(description="the catalogue id of every file, in upload order")
    items: list[UploadedItem]


class ImageRecord(BaseModel):
    id: int
    filename: str | None
    sha256: str | None
    media_type: str | None
    width: int | None
    height: int | None
    size: int | None = Field(description="bytes")
    label: str | None
    tags: list[str]
    source: str | None
    created_at: str | None = Field(description="ISO 8601")
    status: str | None = Field(description="pending | indexed")
    model_version: str | None
    index_version: str | None
    content_url: str
    thumbnail_url: str


class ImagePage(BaseModel):
    items: list[ImageRecord]
    next_cursor: int | None = Field(description="pass as `cursor` for the next page; null at the end")


class Deleted(BaseModel):
    id: int
    deleted: bool
    removed_from_index: bool


class Timing(BaseModel):
    decode: float
    embed: float
    search: float
    metadata: float


class SearchHit(BaseModel):
    id: int
    score: float = Field(description="cosine similarity to the query")
    label: str | None
    tags: list[str]
    content_url: str
    thumbnail_url: str
    thumbnail_data_url: str | None = Field(
        None,
        description="the thumbnail as a `data:image/png;base64,` URL, for the first `thumbnails` "
        "results (null for the others, and when not asked)",
    )


class SearchTiming(Timing):
    thumbnails: float = Field(
        description="waiting for the inlined thumbnails once the results were known (they are read "
        "concurrently with the results' metadata; 0 when none were asked)"
    )


class SearchResponse(BaseModel):
    results: list[SearchHit] = Field(description="best first")
    expand: int = Field(description="the query expansion that ranked them (0: none)")
    model_version: str
    index_version: str
    timing_ms: SearchTiming


class ClassProbability(BaseModel):
    label: str
    probability: float


class Neighbour(BaseModel):
    id: int
    score: float
    label: str | None


class ClassifyResponse(BaseModel):
    label: str
    probabilities: list[ClassProbability] = Field(description="top 5, best first")
    neighbours: list[Neighbour] = Field(description="the nearest voters, best first (`neighbours` of the k)")
    k: int
    tau: float
    model_version: str
    index_version: str
    timing_ms: Timing


class Live(BaseModel):
    status: Literal["alive"]


class Ready(BaseModel):
    status: Literal["ready"]
    model_version: str
    index_version: str
    index_size: int
    reconciled: bool = Field(description="the index agrees with the records (reconcile since start/swap)")
    reconcile_seconds: float | None = Field(None, description="how long the last reconcile took")
    orphan_sweep_seconds: float | None = Field(None, description="how long the last orphan sweep took")
    caches_warm: bool = Field(
        False,
        description="the search results' record and thumbnail caches were filled in the background "
        "since start-up (searches are served either way; before, new results cost database reads)",
    )


class VersionInfo(BaseModel):
    service: str
    model_version: str | None
    index_version: str | None
    index_type: str | None
    index_size: int | None
    embed_dim: int | None


class Reloaded(BaseModel):
    reloaded: bool = Field(description="true when a newer version was loaded")
    index_version: str
    model_version: str
    index_size: int


def binary_response(description: str, *media_types: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entry for a 200 whose body is bytes in one of `media_types`."""
    schema = {"type": "string", "format": "binary"}
    return {200: {"description": description, "content": {t: {"schema": schema} for t in media_types}}}
