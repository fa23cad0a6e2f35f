"""deqguard's own API: ``POST /v1/predict`` (three input forms) and the model store listing."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.api.common import (
    b64decode,
    decode_all,
    elapsed_ms,
    image_prediction,
    loads_json,
    server_timing,
    validate_model,
)
from service.api.examples import multipart_examples, predict_json_examples, raw_image_examples
from service.context import ServiceContext, get_ctx
from service.errors import BadImage, InvalidParameter, UnsupportedMediaType
from service.imaging import IMAGE_MEDIA_TYPES, MEDIA_ALIASES
from service.schemas import (
    MODEL_REF_PATTERN,
    DefenseFields,
    ErrorResponse,
    ModelInfo,
    ModelList,
    PredictJSON,
    PredictResponse,
    PresetName,
)

__all__ = ["router"]

router = APIRouter(tags=["v1"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "an image does not decode, or the body is malformed (names the part)",
        404: "unknown model",
        413: "body, image pixels or image count over the limit",
        415: "unsupported content type or image format (names the part)",
        422: "a bad parameter (names the field)",
        429: "queue full (see Retry-After)",
        500: "inference failed for this request",
        503: "not ready or draining",
        504: "deadline passed while queued",
    }.items()
}


_FIELD_SCHEMAS = {
    k: v for k, v in DefenseFields.model_json_schema()["properties"].items()
}  # preset, beta, R, Tf, eps, state, model, deadline_ms

PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "Images in one of three forms: multipart parts named `images` (one or more), a raw "
            "PNG/JPEG/WebP body, or JSON with base64 strings. Any size and mode: converted to RGB "
            "(alpha over white) and resized to 32x32 (bicubic, anti-aliased; 32x32 passes "
            "untouched). Defense settings go in the query string or, for multipart and JSON, "
            "in the body."
        ),
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "additionalProperties": False,
                    "properties": {
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "string",
                                "minLength": 1,
                                "contentEncoding": "base64",
                            },
                            "description": "base64-encoded PNG, JPEG or WebP images",
                        },
                        **_FIELD_SCHEMAS,
                    },
                },
                "examples": predict_json_examples(),
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                        **_FIELD_SCHEMAS,
                    },
                },
                "encoding": {"images": {"contentType": "image/png, image/jpeg, image/webp"}},
                "examples": multipart_examples(),
            },
            **{
                media: {
                    "schema": {"type": "string", "format": "binary"},
                    "examples": raw_image_examples(media),
                }
                for media in IMAGE_MEDIA_TYPES
            },
        },
    }
}


_FIELD_DOC = {k: f.description for k, f in DefenseFields.model_fields.items()}


async def _query_fields(
    preset: Annotated[PresetName | None, Query()] = None,
    beta: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
    R: Annotated[int | None, Query(ge=0, description=_FIELD_DOC["R"])] = None,
    Tf: Annotated[int | None, Query(ge=1, description=_FIELD_DOC["Tf"])] = None,
    eps: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
    state: Annotated[int | None, Query(ge=1)] = None,
    model: Annotated[str | None, Query(pattern=MODEL_REF_PATTERN)] = None,
    deadline_ms: Annotated[float | None, Query(gt=0, le=3_600_000, allow_inf_nan=False)] = None,
) -> dict[str, Any]:
    """Defense settings from the query string (documented in OpenAPI, validated by FastAPI).
    ``async`` only so that FastAPI calls it on the event loop instead of a thread hop."""
    values = {
        "preset": preset,
        "beta": beta,
        "R": R,
        "Tf": Tf,
        "eps": eps,
        "state": state,
        "model": model,
        "deadline_ms": deadline_ms,
    }
    return {k: v for k, v in values.items() if v is not None}


def _merge(query: dict[str, Any], body: dict[str, Any]) -> DefenseFields:
    for key in set(query) & set(body):
        raise InvalidParameter(f"{key}: given both in the query string and in the body", field=key)
    return validate_model(DefenseFields, {**query, **body})


async def _parse_json(request: Request) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    raw = await request.body()
    try:
        data = loads_json(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadImage(f"body: not valid JSON ({exc})", part="body") from None
    if not isinstance(data, dict):
        raise InvalidParameter("body: expected a JSON object with an `images` list", field="body")
    parsed = validate_model(PredictJSON, data)
    blobs = [(f"images[{i}]", b64decode(s, f"images[{i}]")) for i, s in enumerate(parsed.images)]
    fields = {k: v for k, v in data.items() if k != "images"}
    return blobs, fields


async def _parse_multipart(
    request: Request, ctx: ServiceContext
) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    limit = ctx.settings.max_images_per_request
    try:
        form = await request.form(
            max_files=limit + 1, max_fields=32, max_part_size=ctx.settings.max_body_bytes
        )
    except MultiPartException as exc:
        raise BadImage(f"body: malformed multipart form ({exc.message})", part="body") from None
    blobs: list[tuple[str, bytes]] = []
    fields: dict[str, Any] = {}
    allowed = set(DefenseFields.model_fields)
    try:
        for i, (key, value) in enumerate(form.multi_items()):
            if key == "images":
                name = f"images[{len(blobs)}]"
                if isinstance(value, UploadFile):
                    if value.filename:
                        name = f"images[{len(blobs)}] ({value.filename})"
                    blobs.append((name, await value.read()))
                else:
                    blobs.append((name, value.encode("latin-1", "replace")))
            elif key in allowed:
                if isinstance(value, UploadFile):
                    raise InvalidParameter(f"{key}: expected a text field, got a file", field=key)
                if key in fields:
                    raise InvalidParameter(f"{key}: given more than once", field=key)
                fields[key] = value
            else:
                raise InvalidParameter(
                    f"{key or f'part {i}'}: unknown form field; expected `images` or one of "
                    f"{sorted(allowed)}",
                    field=key or f"part {i}",
                )
    finally:
        await form.close()
    if not blobs:
        raise InvalidParameter("images: no part named `images` in the form", field="images")
    return blobs, fields


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify images with the test-time defense",
    description=(
        "Examples:\n\n"
        "```\ncurl -F images=@cat.png -F images=@dog.jpg 'http://HOST/v1/predict?preset=paper'\n"
        "curl --data-binary @cat.png -H 'Content-Type: image/png' http://HOST/v1/predict\n"
        'curl -H \'Content-Type: application/json\' -d \'{"images": ["<base64>"], "R": 5}\' '
        "http://HOST/v1/predict\n```\n\n"
        "Headers: `X-Request-ID` (echoed), `X-Deadline-Ms` (like `deadline_ms`)."
    ),
)
async def predict(
    request: Request,
    query: dict[str, Any] = Depends(_query_fields),
    ctx: ServiceContext = Depends(get_ctx),
) -> PredictResponse | Any:
    ctx.check_admission()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    ctype = MEDIA_ALIASES.get(ctype, ctype)
    if ctype == "application/json":
        blobs, body_fields = await _parse_json(request)
    elif ctype == "multipart/form-data":
        blobs, body_fields = await _parse_multipart(request, ctx)
    elif ctype in IMAGE_MEDIA_TYPES:
        blobs, body_fields = [("body", await request.body())], {}
    else:
        raise UnsupportedMediaType(
            f"content-type: {ctype or '(none)'} is not accepted; send multipart/form-data, "
            "application/json, image/png, image/jpeg or image/webp",
            part="content-type",
        )
    header_deadline = request.headers.get("x-deadline-ms")
    if (
        header_deadline is not None
        and "deadline_ms" not in query
        and "deadline_ms" not in body_fields
    ):
        body_fields["deadline_ms"] = header_deadline
    fields = _merge(query, body_fields)
    job = ctx.resolver.resolve(fields, len(blobs))
    images = await ctx.offload(decode_all, blobs, ctx.settings.max_image_pixels)
    result = await ctx.infer(
        job.model, images, [job.params] * len(blobs), fields.deadline_ms, request
    )
    served = result.model
    state = request.scope.setdefault("state", {})
    server_timing(state, result.queue_s, result.compute_s)
    return {
        "request_id": state.get("request_id", ""),
        "model": {"name": served.name, "version": served.version, "sha256": served.sha256},
        "defense": job.applied,
        "predictions": [image_prediction(i, o) for i, o in enumerate(result.outputs)],
        "timing": {
            "queue_ms": result.queue_s * 1000.0,
            "compute_ms": result.compute_s * 1000.0,
            "total_ms": elapsed_ms(state),
            "batch_size": result.batch_size,
        },
    }


def _model_info(ctx: ServiceContext, manifest: Any) -> dict[str, Any]:
    return {
        **manifest.to_dict(),
        "loaded": ctx.is_loaded(manifest.name, manifest.version),
        "default": manifest.name == ctx.resolver.default_name,
    }


@router.get("/v1/models", response_model=ModelList, summary="The model store, with metrics")
async def list_models(ctx: ServiceContext = Depends(get_ctx)) -> dict[str, Any]:
    from deqguard.store import list_entries

    manifests = await ctx.offload(list_entries, ctx.settings.model_store)
    return {"models": [_model_info(ctx, m) for m in manifests]}


@router.get(
    "/v1/models/{name}",
    response_model=ModelInfo,
    responses={404: ERRORS[404], 422: ERRORS[422]},
    summary="One model's manifest (accepts name or name@version)",
)
async def get_model(
    name: Annotated[str, Path(pattern=MODEL_REF_PATTERN)], ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    manifest = await ctx.offload(ctx.resolver.manifest, name)
    return _model_info(ctx, manifest)
