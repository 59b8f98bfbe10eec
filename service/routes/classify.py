"""POST /classify: weighted kNN vote (Wu et al. 2018) over the labelled catalogue."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from service.deps import ReadAccess, StateDep
from service.errors import BadRequest
from service.imaging import check_size
from service.queries import query_vector
from service.search import Timer, classify

router = APIRouter(tags=["classify"])


@router.post("/classify", dependencies=[ReadAccess], summary="Predict a label by weighted kNN")
async def classify_image(
    state: StateDep,
    file: Annotated[UploadFile, File(description="the image to classify")],
    k: Annotated[
        int | None, Form(ge=1, le=10000, description="neighbours that vote (default CLASSIFY_K=200)")
    ] = None,
    tau: Annotated[
        float | None, Form(gt=0, le=10, description="temperature (default CLASSIFY_TAU=0.07)")
    ] = None,
) -> dict:
    """Class c scores sum over the k nearest labelled images of exp(s_i / tau) * 1(c_i = c),
    normalised to probabilities (k = 200, tau = 0.07 as in the paper)."""
    settings, engine, db = state.settings, state.engine, state.db
    loaded = engine.require()
    data = await file.read(settings.MAX_UPLOAD_BYTES + 1)
    check_size(data, settings.MAX_UPLOAD_BYTES, file.filename or "upload")
    timer = Timer()
    vector = await query_vector(engine, db, loaded, data, timer)
    k, tau = k or settings.CLASSIFY_K, tau or settings.CLASSIFY_TAU
    result = await classify(engine, db, loaded, vector, k, tau, timer)
    if result.label is None:
        raise BadRequest("no labelled images in the catalogue to vote: upload images with a label first", 409)
    return {
        "label": result.label,
        "probabilities": [{"label": name, "probability": round(p, 6)} for name, p in result.probabilities],
        "neighbours": [
            {"id": h.id, "score": h.score, "label": h.record.get("label")} for h in result.neighbours
        ],
        "k": k,
        "tau": tau,
        "model_version": loaded.model_version,
        "index_version": loaded.version,
        "timing_ms": timer.as_dict(),
    }
