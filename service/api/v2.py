"""The KServe v2 Open Inference Protocol (what Triton, KServe and MLServer speak).

Input: one tensor, either FP32 ``[N, 3, 32, 32]`` in [0, 1] or BYTES ``[N]`` of encoded images
(base64 strings in JSON; raw in the binary extension). Defense settings go in the request's
``parameters`` (``preset``, ``beta``, ``R``, ``Tf``, ``eps``, ``state``, ``deadline_ms``; Triton's
``timeout`` in microseconds is honoured too). Triton's binary tensor extension
(``Inference-Header-Content-Length``) is supported both ways, so ``tritonclient.http`` works with
its defaults. Also Triton's statistics (``/v2/models/{m}/stats``) and the read-only model
repository index (``POST /v2/repository/index``). The protocol itself (checks, tensors,
statistics) is :mod:`service.api.kserve`, shared with the gRPC endpoint; this module is HTTP.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response

from service.api import kserve
from service.api.common import loads_json, server_timing, validate_model
from service.api.examples import v2_binary_examples, v2_json_examples
from service.api.kserve import OUTPUTS
from service.context import ServiceContext, get_ctx
from service.errors import BadImage, InvalidParameter
from service.schemas import (
    NAME_PATTERN,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelStatsResponse,
    RepositoryIndexEntry,
    ServerMetadata,
    V2ErrorResponse,
)

__all__ = ["router"]

ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]
ModelVersion = Annotated[str, Path(pattern=NAME_PATTERN)]

router = APIRouter(tags=["v2 (KServe Open Inference Protocol)"])

HEADER_LEN = "inference-header-content-length"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2ErrorResponse} for code in (400, 404, 413, 415, 422, 429, 500, 503, 504)
}

INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "A v2 inference request. FP32 input `[N, 3, 32, 32]` in [0, 1] (flat data, row-major) "
            "or BYTES `[N]` with base64-encoded PNG/JPEG/WebP images. With Triton's binary "
            "extension, send `Inference-Header-Content-Length` and append the raw tensors."
        ),
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/InferRequest"},
                "examples": v2_json_examples(),
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "examples": v2_binary_examples(),
            },
        },
    }
}


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return kserve.server_metadata()


@router.get("/v2/health/live", summary="Liveness (v2)")
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Readiness (v2): 200 when ready, 503 otherwise",
    responses={503: {"description": "not ready"}},
)
async def v2_ready(ctx: ServiceContext = Depends(get_ctx)) -> JSONResponse:
    return JSONResponse({"ready": ctx.ready}, status_code=200 if ctx.ready else 503)


# ------------------------------------------------------- statistics and repository index
# (before /v2/models/{model_name}: "stats" is a path segment here, not a model name)
@router.get(
    "/v2/models/stats",
    response_model=ModelStatsResponse,
    summary="Statistics of every model that ran (Triton statistics extension)",
)
async def all_stats(ctx: ServiceContext = Depends(get_ctx)) -> dict[str, Any]:
    return kserve.statistics(ctx)


@router.get(
    "/v2/models/{model_name}/stats",
    response_model=ModelStatsResponse,
    responses={404: ERRORS[404]},
    summary="Statistics of a model's versions: counts and cumulative ns (Triton statistics)",
)
async def model_stats(
    model_name: ModelName, ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    return await ctx.offload(kserve.statistics, ctx, model_name)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats",
    response_model=ModelStatsResponse,
    responses={404: ERRORS[404]},
    summary="Statistics of one model version (Triton statistics extension)",
)
async def model_version_stats(
    model_name: ModelName, model_version: ModelVersion, ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    return await ctx.offload(kserve.statistics, ctx, model_name, model_version)


@router.post(
    "/v2/repository/index",
    response_model=list[RepositoryIndexEntry],
    responses={422: ERRORS[422]},
    summary="Every version of every store model (model repository extension, read only)",
)
async def repository_index(
    request: Request, ctx: ServiceContext = Depends(get_ctx)
) -> list[dict[str, str]]:
    raw = await request.body()
    body = loads_json(raw) if raw.strip() else {}
    if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
        raise InvalidParameter('body: expected {"ready": true|false}', field="ready")
    unknown = sorted(set(body) - {"ready", "repository_name"})
    if unknown:
        raise InvalidParameter(f"{unknown[0]}: unknown field; accepted: ready", field=unknown[0])
    return await ctx.offload(kserve.repository_index, ctx, bool(body.get("ready", False)))


# ------------------------------------------------------------------ model metadata, ready
@router.get(
    "/v2/models/{model_name}",
    response_model=ModelMetadata,
    responses={404: ERRORS[404]},
    summary="Model metadata (v2)",
)
async def model_metadata(
    model_name: ModelName, ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    return await ctx.offload(kserve.model_metadata, ctx, model_name)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses={404: ERRORS[404]},
    summary="Model metadata of one version (v2)",
)
async def model_version_metadata(
    model_name: ModelName, model_version: ModelVersion, ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    return await ctx.offload(kserve.model_metadata, ctx, model_name, model_version)


async def _model_ready(ctx: ServiceContext, name: str, version: str | None) -> JSONResponse:
    await ctx.offload(kserve.check_model, ctx, name, version)
    return JSONResponse({"name": name, "ready": ctx.ready}, status_code=200 if ctx.ready else 503)


@router.get(
    "/v2/models/{model_name}/ready",
    responses={404: ERRORS[404], 503: {"description": "not ready"}},
    summary="Model readiness (v2); other store models load on first use",
)
async def model_ready(
    model_name: ModelName, ctx: ServiceContext = Depends(get_ctx)
) -> JSONResponse:
    return await _model_ready(ctx, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    responses={404: ERRORS[404], 503: {"description": "not ready"}},
    summary="Model version readiness (v2)",
)
async def model_version_ready(
    model_name: ModelName, model_version: ModelVersion, ctx: ServiceContext = Depends(get_ctx)
) -> JSONResponse:
    return await _model_ready(ctx, model_name, model_version)


# ---------------------------------------------------------------------------------- infer
def _split_body(raw: bytes, header_len: str | None) -> tuple[dict[str, Any], bytes]:
    if header_len is None:
        head, rest = raw, b""
    else:
        try:
            n = int(header_len)
        except ValueError:
            raise InvalidParameter(
                "Inference-Header-Content-Length: not an integer",
                field="Inference-Header-Content-Length",
            ) from None
        if not 0 < n <= len(raw):
            raise InvalidParameter(
                f"Inference-Header-Content-Length: {n} is outside 1..{len(raw)} (the body size)",
                field="Inference-Header-Content-Length",
            )
        head, rest = raw[:n], raw[n:]
    try:
        data = loads_json(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadImage(
            f"body: the inference request is not valid JSON ({exc})", part="body"
        ) from None
    if not isinstance(data, dict):
        raise InvalidParameter("body: expected a JSON object", field="body")
    return data, rest


def _tensor(req: InferRequest, binary: bytes) -> list[kserve.Tensor]:
    """The request's input tensors, with Triton's binary extension checked (HTTP only)."""
    tensors = []
    for i, inp in enumerate(req.inputs):
        where = f"inputs[{i}]"
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or size != len(binary)
            ):
                raise InvalidParameter(
                    f"{where}.parameters.binary_data_size: {size!r} does not match the "
                    f"{len(binary)} bytes after the JSON header",
                    field=f"{where}.parameters.binary_data_size",
                )
            if inp.data is not None:
                raise InvalidParameter(
                    f"{where}.data: give either data or binary_data_size", field=f"{where}.data"
                )
        elif binary:
            raise InvalidParameter(
                f"{where}.parameters.binary_data_size: missing, but binary data follows the header",
                field=f"{where}.parameters.binary_data_size",
            )
        raw = binary if size is not None else None
        tensors.append(kserve.Tensor(inp.name, inp.datatype, inp.shape, inp.data, raw, True, where))
    return tensors


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferResponse,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    openapi_extra=INFER_BODY,
    summary="Inference (v2); tritonclient.http and plain JSON",
)
async def infer(
    model_name: ModelName, request: Request, ctx: ServiceContext = Depends(get_ctx)
) -> Response:
    return await _infer(model_name, None, request, ctx)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponse,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    openapi_extra=INFER_BODY,
    summary="Inference on one model version (v2)",
)
async def infer_version(
    model_name: ModelName,
    model_version: ModelVersion,
    request: Request,
    ctx: ServiceContext = Depends(get_ctx),
) -> Response:
    return await _infer(model_name, model_version, request, ctx)


async def _infer(name: str, version: str | None, request: Request, ctx: ServiceContext) -> Response:
    ctx.check_admission()
    raw = await request.body()
    data, binary = _split_body(raw, request.headers.get(HEADER_LEN))
    req = validate_model(InferRequest, data)
    fields, binary_out = kserve.defense_fields(dict(req.parameters or {}))
    if len(req.inputs) != 1:
        raise InvalidParameter(
            f"inputs: expected exactly one input tensor, got {len(req.inputs)}", field="inputs"
        )
    tensors = _tensor(req, binary)
    result, job = await kserve.infer(ctx, name, version, tensors, fields, request=request)
    state = request.scope.setdefault("state", {})
    server_timing(state, result.queue_s, result.compute_s)

    arrays = kserve.output_arrays(result.outputs)
    requested = req.outputs or []
    names = kserve.requested_outputs([out.name for out in requested])
    wanted = [
        (key, bool((out.parameters or {}).get("binary_data", binary_out)))
        for key, out in zip(names, requested)
    ] or [(key, binary_out) for key in names]
    served = result.model
    outputs_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for key, as_binary in wanted:
        arr = arrays[key]
        datatype = OUTPUTS[key][0]
        entry: dict[str, Any] = {"name": key, "shape": list(arr.shape), "datatype": datatype}
        if as_binary:
            blob = kserve.to_binary(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [b.decode() for b in arr.reshape(-1)]
        else:
            entry["data"] = arr.reshape(-1).tolist()
        outputs_json.append(entry)
    body: dict[str, Any] = {
        "model_name": served.name,
        "model_version": served.version,
        "outputs": outputs_json,
        "parameters": kserve.answer_parameters(result, job),
    }
    if req.id is not None:
        body["id"] = req.id
    head = json.dumps(body).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
