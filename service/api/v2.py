"""The KServe v2 Open Inference Protocol (what Triton, KServe and MLServer speak).

Input: one tensor, either FP32 ``[N, 3, 32, 32]`` in [0, 1] or BYTES ``[N]`` of encoded images
(base64 strings in JSON; raw in the binary extension). Defense settings go in the request's
``parameters`` (``preset``, ``beta``, ``R``, ``Tf``, ``eps``, ``state``, ``deadline_ms``; Triton's
``timeout`` in microseconds is honoured too). Triton's binary tensor extension
(``Inference-Header-Content-Length``) is supported both ways, so ``tritonclient.http`` works with
its defaults.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response

from deqguard.data import CLASSES
from deqguard.defense import DEFENSE_FIELDS
from deqguard.store import StoreError
from service.api.common import (
    b64decode,
    decode_all,
    loads_json,
    server_timing,
    validate_model,
)
from service.api.examples import v2_binary_examples, v2_json_examples
from service.context import ServiceContext, get_ctx
from service.errors import (
    PATH_ERRORS,
    BadImage,
    InvalidParameter,
    PayloadTooLarge,
    as_service_error,
)
from service.schemas import (
    NAME_PATTERN,
    DefenseFields,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    V2ErrorResponse,
)

__all__ = ["router"]

ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]
ModelVersion = Annotated[str, Path(pattern=NAME_PATTERN)]

router = APIRouter(tags=["v2 (KServe Open Inference Protocol)"])

HEADER_LEN = "inference-header-content-length"
INPUT_NAME = "images"  # the one input of every model's metadata
# Triton/KServe parameters a standard client may send and that we may safely ignore.
IGNORED_PARAMS = {
    "binary_data_output",
    "priority",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "content_type",
    "headers",
}
DEFENSE_PARAMS = {"preset", *DEFENSE_FIELDS, "deadline_ms"}

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

OUTPUTS: dict[str, tuple[str, str]] = {
    # name -> (datatype, shape description)
    "probabilities": ("FP32", "[N, 10]"),
    "class_index": ("INT64", "[N]"),
    "label": ("BYTES", "[N]"),
    "entropy": ("FP32", "[N]"),
    "entropy_trace": ("FP32", "[N, steps]"),
    "defense_acted": ("BOOL", "[N, steps]"),
    "state": ("INT64", "[N]"),
    "final_residual": ("FP32", "[N]"),
    "grad_steps": ("INT64", "[N]"),
}


def _check_model(ctx: ServiceContext, name: str, version: str | None = None) -> Any:
    try:
        return ctx.resolver.manifest(name if version is None else f"{name}@{version}")
    except StoreError as exc:
        raise as_service_error(exc, PATH_ERRORS) from None


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    import deqguard

    return {
        "name": "deqguard",
        "version": getattr(deqguard, "__version__", "0.1.0"),
        "extensions": ["binary_tensor_data"],
    }


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


def _metadata(ctx: ServiceContext, manifest: Any) -> dict[str, Any]:
    steps = ctx.resolver.steps_of(manifest)
    shapes = {
        "probabilities": [-1, len(CLASSES)],
        "entropy_trace": [-1, steps],
        "defense_acted": [-1, steps],
    }
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": "pytorch_deqguard",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
        "outputs": [
            {"name": k, "datatype": dt, "shape": shapes.get(k, [-1])}
            for k, (dt, _) in OUTPUTS.items()
        ],
    }


@router.get(
    "/v2/models/{model_name}",
    response_model=ModelMetadata,
    responses={404: ERRORS[404]},
    summary="Model metadata (v2)",
)
async def model_metadata(
    model_name: ModelName, ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    return _metadata(ctx, await ctx.offload(_check_model, ctx, model_name))


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses={404: ERRORS[404]},
    summary="Model metadata of one version (v2)",
)
async def model_version_metadata(
    model_name: ModelName, model_version: ModelVersion, ctx: ServiceContext = Depends(get_ctx)
) -> dict[str, Any]:
    return _metadata(ctx, await ctx.offload(_check_model, ctx, model_name, model_version))


async def _model_ready(ctx: ServiceContext, name: str, version: str | None) -> JSONResponse:
    await ctx.offload(_check_model, ctx, name, version)
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


def _flatten(data: Any) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _unpack_bytes(blob: bytes, count: int, where: str) -> list[bytes]:
    items, pos = [], 0
    for i in range(count):
        if pos + 4 > len(blob):
            raise BadImage(f"{where}: binary BYTES tensor ends before element {i}", part=where)
        (size,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + size > len(blob):
            raise BadImage(f"{where}: binary BYTES element {i} is truncated", part=where)
        items.append(blob[pos : pos + size])
        pos += size
    if pos != len(blob):
        raise BadImage(f"{where}: {len(blob) - pos} bytes left after {count} elements", part=where)
    return items


def _read_input(
    req: InferRequest, binary: bytes, ctx: ServiceContext
) -> tuple[int, torch.Tensor | list[tuple[str, bytes]]]:
    """The one input tensor -> (N, float tensor) or (N, encoded images to decode)."""
    if len(req.inputs) != 1:
        raise InvalidParameter(
            f"inputs: expected exactly one input tensor, got {len(req.inputs)}", field="inputs"
        )
    inp = req.inputs[0]
    where = "inputs[0]"
    if inp.name != INPUT_NAME:
        raise InvalidParameter(
            f"{where}.name: unknown input {inp.name!r}; this model's input is {INPUT_NAME!r}",
            field=f"{where}.name",
        )
    params = inp.parameters or {}
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(binary):
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
    elif inp.data is None:
        raise InvalidParameter(f"{where}.data: missing", field=f"{where}.data")
    if any(not isinstance(d, int) or d < 0 for d in inp.shape):
        raise InvalidParameter(
            f"{where}.shape: dimensions must be integers >= 0", field=f"{where}.shape"
        )
    limit = ctx.settings.max_images_per_request
    if inp.datatype == "FP32":
        if len(inp.shape) != 4 or inp.shape[1:] != [3, 32, 32]:
            raise InvalidParameter(
                f"{where}.shape: FP32 input must be [N, 3, 32, 32], got {inp.shape}",
                field=f"{where}.shape",
            )
        n = inp.shape[0]
        if n > limit:
            raise PayloadTooLarge(f"{where}: {n} images, limit {limit}", field=f"{where}.shape")
        count = n * 3 * 32 * 32
        if size is not None:
            if len(binary) != count * 4:
                raise InvalidParameter(
                    f"{where}: {len(binary)} bytes of binary data, expected {count * 4} for shape {inp.shape}",
                    field=f"{where}.parameters.binary_data_size",
                )
            arr = np.frombuffer(binary, dtype="<f4").astype(np.float32)
        else:
            flat = _flatten(inp.data)
            if len(flat) != count:
                raise InvalidParameter(
                    f"{where}.data: {len(flat)} values, expected {count} for shape {inp.shape}",
                    field=f"{where}.data",
                )
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
                raise InvalidParameter(
                    f"{where}.data: FP32 values must be numbers", field=f"{where}.data"
                )
            arr = np.asarray(flat, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise InvalidParameter(
                f"{where}.data: FP32 pixels must be finite and lie in [0, 1]", field=f"{where}.data"
            )
        return n, torch.from_numpy(arr.copy()).view(n, 3, 32, 32)
    if inp.datatype == "BYTES":
        if len(inp.shape) not in (1, 2) or (len(inp.shape) == 2 and inp.shape[1] != 1):
            raise InvalidParameter(
                f"{where}.shape: BYTES input must be [N] (or [N, 1]), got {inp.shape}",
                field=f"{where}.shape",
            )
        n = inp.shape[0]
        if n > limit:
            raise PayloadTooLarge(f"{where}: {n} images, limit {limit}", field=f"{where}.shape")
        if size is not None:
            blobs = _unpack_bytes(binary, n, where)
        else:
            flat = _flatten(inp.data)
            if len(flat) != n:
                raise InvalidParameter(
                    f"{where}.data: {len(flat)} elements, expected {n}", field=f"{where}.data"
                )
            blobs = [b64decode(s, f"{where}.data[{i}]") for i, s in enumerate(flat)]
        return n, [(f"{where}.data[{i}]", b) for i, b in enumerate(blobs)]
    raise InvalidParameter(
        f"{where}.datatype: {inp.datatype} is not accepted; send FP32 [N, 3, 32, 32] or BYTES [N]",
        field=f"{where}.datatype",
    )


def _fields(req: InferRequest) -> tuple[DefenseFields, bool]:
    params = dict(req.parameters or {})
    binary_out = bool(params.get("binary_data_output", False))
    fields: dict[str, Any] = {}
    for key, value in params.items():
        if key in DEFENSE_PARAMS:
            fields[key] = value
        elif key == "timeout":  # Triton: microseconds
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise InvalidParameter(
                    "parameters.timeout: expected microseconds > 0", field="parameters.timeout"
                )
            fields.setdefault("deadline_ms", min(value / 1000.0, 3_600_000))
        elif key not in IGNORED_PARAMS:
            raise InvalidParameter(
                f"parameters.{key}: unknown parameter; accepted: {sorted(DEFENSE_PARAMS)}",
                field=f"parameters.{key}",
            )
    return validate_model(DefenseFields, fields, prefix="parameters."), binary_out


def _output_arrays(outputs: list[Any]) -> dict[str, np.ndarray]:
    return {
        "probabilities": np.stack([o.probabilities for o in outputs]).astype(np.float32),
        "class_index": np.array([o.class_index for o in outputs], dtype=np.int64),
        "label": np.array([CLASSES[o.class_index].encode() for o in outputs], dtype=object),
        "entropy": np.array([o.entropy for o in outputs], dtype=np.float32),
        "entropy_trace": np.stack([o.step_entropy for o in outputs]).astype(np.float32),
        "defense_acted": np.stack([o.acted for o in outputs]).astype(bool),
        "state": np.array([o.state_index for o in outputs], dtype=np.int64),
        "final_residual": np.array([o.final_residual for o in outputs], dtype=np.float32),
        "grad_steps": np.array([o.grad_steps for o in outputs], dtype=np.int64),
    }


def _to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in arr.reshape(-1))
    if datatype == "BOOL":
        return arr.astype(np.bool_).tobytes()
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


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
    fields, binary_out = _fields(req)
    ref = name if version is None else f"{name}@{version}"
    fields = fields.model_copy(update={"model": ref})
    n, payload = _read_input(req, binary, ctx)
    job = ctx.resolver.resolve(fields, n)
    if isinstance(payload, list):
        images = await ctx.offload(decode_all, payload, ctx.settings.max_image_pixels)
    else:
        images = payload
    result = await ctx.infer(job.model, images, [job.params] * n, fields.deadline_ms, request)
    state = request.scope.setdefault("state", {})
    server_timing(state, result.queue_s, result.compute_s)

    arrays = _output_arrays(result.outputs)
    wanted: list[tuple[str, bool]]
    if req.outputs:
        wanted = []
        for i, out in enumerate(req.outputs):
            if out.name not in OUTPUTS:
                raise InvalidParameter(
                    f"outputs[{i}].name: unknown output {out.name!r}; available: {list(OUTPUTS)}",
                    field=f"outputs[{i}].name",
                )
            wanted.append((out.name, bool((out.parameters or {}).get("binary_data", binary_out))))
    else:
        wanted = [(k, binary_out) for k in OUTPUTS]
    served = result.model
    outputs_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for key, as_binary in wanted:
        arr = arrays[key]
        datatype = OUTPUTS[key][0]
        entry: dict[str, Any] = {"name": key, "shape": list(arr.shape), "datatype": datatype}
        if as_binary:
            blob = _to_binary(arr, datatype)
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
        "parameters": {
            "sha256": served.sha256,
            "queue_ms": result.queue_s * 1000.0,
            "compute_ms": result.compute_s * 1000.0,
            "batch_size": result.batch_size,
            "defense": json.dumps(job.applied),
        },
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
