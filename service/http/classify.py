"""``POST /classify/{model}``: images in, top-k classes out. ``model`` may also name an experiment."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator

from ..errors import BadRequestError
from ..images.preprocess import ALLOWED_MEDIA_TYPES
from ..models.served import top_k
from ..serving import Call, serve
from .body import ImagePart, read_images
from .schemas import INFERENCE_ERRORS, ClassifyResponse, errors

router = APIRouter(tags=["classify"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or multipart/form-data with one or more image files.",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(set(ALLOWED_MEDIA_TYPES))},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {
                    "type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
        },
    }
}


def _whole_number(value):
    # Without this pydantic's lax mode would take "5.0" (and " 5") for 5.
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number, e.g. top_k=5")
    return value


TopK = Annotated[int, Query(alias="top_k", ge=1, le=1000), BeforeValidator(_whole_number)]


_ANSWERS = dict(response_model=ClassifyResponse, responses=errors(*INFERENCE_ERRORS), openapi_extra=_BODY_DOC)


@router.post("/classify/{model}", **_ANSWERS, summary="Classify images with the latest served version",
             operation_id="classify")
async def classify(request: Request, model: str, top_k_: TopK = 5):
    return await _classify(request, model, None, top_k_)


@router.post("/classify/{model}/versions/{version}", **_ANSWERS, summary="Classify images with one version",
             operation_id="classify_version")
async def classify_version(request: Request, model: str, version: str, top_k_: TopK = 5):
    # The version stays text: serve() takes only its canonical form ("1", not "1.0" or "01"), as v2 does.
    return await _classify(request, model, version, top_k_)


async def _classify(request: Request, name: str, version: str | None, k: int) -> JSONResponse:
    async def read(call: Call) -> list[ImagePart]:
        settings = call.state.settings
        return await read_images(request, settings.max_body_bytes, settings.max_images_per_request)

    async def run(call: Call, parts: list[ImagePart]) -> JSONResponse:
        served = call.served
        if k > served.manifest.output.num_classes:
            raise BadRequestError(f"top_k={k} but {served.name} has {served.manifest.output.num_classes} classes")
        logits = await call.decode_and_infer([part.data for part in parts])
        results = []
        for part, row in zip(parts, logits):
            result = {"predictions": top_k(row, served.labels, k)}
            if part.filename is not None:
                result["filename"] = part.filename
            results.append(result)
        body = {"model": served.name, "version": served.version, "weights": served.manifest.weights.source,
                "results": results, "request_id": call.request_id}
        headers = {"X-Request-ID": call.echo_id}
        if call.route is not None:
            body = {"experiment": call.route.experiment.name, "variant": call.route.variant.name, **body}
            headers["X-Variant"] = call.route.variant.name
        if call.client_id is not None:
            body["client_request_id"] = call.client_id
        return JSONResponse(body, headers=headers)

    return await serve(request, name, version, read, run, experiments=True)
