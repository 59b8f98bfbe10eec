"""POST /classify: weighted kNN vote (Wu et al. 2018) over the labelled catalogue. The image comes
as multipart (`file`) or as the whole body (`Content-Type: image/*`, options in the query string):
two routes on one path, split by media type (`ContractRoute`), one core."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Request

from service.deps import AUTH_ERRORS, LoadedDep, ReadAccess, StateDep
from service.engine import Loaded
from service.errors import BadRequest
from service.queries import query_vector
from service.routing import ContractRoute, image_body
from service.schemas import (
    ClassifyForm,
    ClassifyOptions,
    ClassifyResponse,
    ClassProbability,
    Neighbour,
    error_responses,
)
from service.search import Timer, classify
from service.state import ServiceState
from service.uploads import read_body, read_upload

router = APIRouter(tags=["classify"], route_class=ContractRoute)
CLASSIFY = {
    "dependencies": [ReadAccess],
    "summary": "Predict a label by weighted kNN",
    "description": "Class c scores sum over the k nearest labelled images of exp(s_i / tau) * 1(c_i = c), "
    "normalised to probabilities (k = 200, tau = 0.07 as in the paper). The response lists the "
    "`neighbours` nearest of those voters (10 unless asked for more). The image comes as multipart "
    "(`file`, options as form fields) or as the whole body (`Content-Type: image/png`, ..., options in "
    "the query string).",
    "responses": {**AUTH_ERRORS, **error_responses(400, 409, 413, 415, 422, 503)},
}


async def run_classify(
    state: ServiceState, loaded: Loaded, options: ClassifyOptions, data: bytes
) -> ClassifyResponse:
    settings = state.settings
    timer = Timer()
    k, tau = options.k or settings.CLASSIFY_K, options.tau or settings.CLASSIFY_TAU
    with state.engine.serving():
        vector = await query_vector(state.engine, state.db, loaded, data, timer)
        result = await classify(state.engine, state.db, loaded, vector, k, tau, timer)
    if result.label is None:
        raise BadRequest("no labelled images in the catalogue to vote: upload images with a label first", 409)
    return ClassifyResponse(
        label=result.label,
        probabilities=[
            ClassProbability(label=name, probability=round(p, 6)) for name, p in result.probabilities
        ],
        neighbours=[
            Neighbour(id=h.id, score=h.score, label=h.record.get("label"))
            for h in result.neighbours[: options.neighbours]
        ],
        k=k,
        tau=tau,
        model_version=loaded.model_version,
        index_version=loaded.version,
        timing_ms=timer.as_dict(),
    )


@router.post("/classify", **CLASSIFY)
async def classify_image(
    state: StateDep, loaded: LoadedDep, form: Annotated[ClassifyForm, File()]
) -> ClassifyResponse:
    data = await read_upload(form.file, state.settings.MAX_UPLOAD_BYTES)
    return await run_classify(state, loaded, form, data)


@router.post("/classify", **CLASSIFY, openapi_extra=image_body("k, tau, neighbours"))
async def classify_image_body(
    state: StateDep, loaded: LoadedDep, request: Request, options: Annotated[ClassifyOptions, Query()]
) -> ClassifyResponse:
    data = await read_body(request, state.settings.MAX_UPLOAD_BYTES, "query image")
    return await run_classify(state, loaded, options, data)
