"""POST /classify: weighted kNN vote (Wu et al. 2018) over the labelled catalogue."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File

from service.deps import AUTH_ERRORS, LoadedDep, ReadAccess, StateDep
from service.errors import BadRequest
from service.queries import query_vector
from service.routing import ContractRoute
from service.schemas import ClassifyForm, ClassifyResponse, ClassProbability, Neighbour, error_responses
from service.search import Timer, classify
from service.uploads import read_upload

router = APIRouter(tags=["classify"], route_class=ContractRoute)


@router.post(
    "/classify",
    dependencies=[ReadAccess],
    summary="Predict a label by weighted kNN",
    responses={**AUTH_ERRORS, **error_responses(400, 409, 413, 415, 422, 503)},
)
async def classify_image(
    state: StateDep, loaded: LoadedDep, form: Annotated[ClassifyForm, File()]
) -> ClassifyResponse:
    """Class c scores sum over the k nearest labelled images of exp(s_i / tau) * 1(c_i = c),
    normalised to probabilities (k = 200, tau = 0.07 as in the paper). The response lists the
    `neighbours` nearest of those voters (10 unless asked for more)."""
    settings = state.settings
    data = await read_upload(form.file, settings.MAX_UPLOAD_BYTES)
    timer = Timer()
    k, tau = form.k or settings.CLASSIFY_K, form.tau or settings.CLASSIFY_TAU
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
            for h in result.neighbours[: form.neighbours]
        ],
        k=k,
        tau=tau,
        model_version=loaded.model_version,
        index_version=loaded.version,
        timing_ms=timer.as_dict(),
    )
