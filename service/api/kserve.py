"""The KServe v2 protocol without its transport: what HTTP (:mod:`service.api.v2`) and gRPC
(:mod:`service.grpc_server`) share.

Both transports turn their request into a :class:`Tensor` and a plain parameter dict, and call
the same functions here: the input checks, the defense settings, one trip through
:meth:`~service.context.ServiceContext.infer` (the batcher, admission, deadlines, limits), the
output tensors and the answer's parameters, the metadata, the statistics and the repository
index. So a limit or a message changes in one place for both, and they raise the same service
errors, which each transport answers from the one table in :mod:`service.errors`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from starlette.requests import Request

from deqguard.data import CLASSES
from deqguard.defense import DEFENSE_FIELDS
from deqguard.store import StoreError, list_entries, list_versions
from service.api.common import b64decode, decode_all, validate_model
from service.batcher import JobResult
from service.context import ServiceContext
from service.errors import (
    PATH_ERRORS,
    BadImage,
    InvalidParameter,
    PayloadTooLarge,
    as_service_error,
)
from service.resolver import Resolved
from service.schemas import DefenseFields

__all__ = [
    "DEFENSE_PARAMS",
    "IGNORED_PARAMS",
    "INPUT_NAME",
    "OUTPUTS",
    "Tensor",
    "answer_parameters",
    "check_model",
    "defense_fields",
    "infer",
    "model_metadata",
    "output_arrays",
    "read_input",
    "repository_index",
    "requested_outputs",
    "server_metadata",
    "statistics",
    "to_binary",
]

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
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository"]

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


# ------------------------------------------------------------------------------ models
def check_model(ctx: ServiceContext, name: str, version: str | None = None) -> Any:
    """The manifest of a model named in a v2 path or message (404 when it names none)."""
    try:
        return ctx.resolver.manifest(name if version is None else f"{name}@{version}")
    except StoreError as exc:
        raise as_service_error(exc, PATH_ERRORS) from None


def server_metadata() -> dict[str, Any]:
    import deqguard

    return {
        "name": "deqguard",
        "version": getattr(deqguard, "__version__", "0.1.0"),
        "extensions": list(EXTENSIONS),
    }


def model_metadata(ctx: ServiceContext, name: str, version: str | None = None) -> dict[str, Any]:
    """Off the event loop: a model's (or one version's) metadata, every version it has."""
    manifest = check_model(ctx, name, version)
    versions = [m.version for m in list_versions(ctx.settings.model_store, manifest.name)]
    steps = ctx.resolver.steps_of(manifest)
    shapes = {
        "probabilities": [-1, len(CLASSES)],
        "entropy_trace": [-1, steps],
        "defense_acted": [-1, steps],
    }
    return {
        "name": manifest.name,
        "versions": versions or [manifest.version],
        "platform": "pytorch_deqguard",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
        "outputs": [
            {"name": k, "datatype": dt, "shape": shapes.get(k, [-1])}
            for k, (dt, _) in OUTPUTS.items()
        ],
    }


def repository_index(ctx: ServiceContext, ready_only: bool = False) -> list[dict[str, str]]:
    """Off the event loop: every version of every store entry (the model repository extension,
    read only). Any entry is ``READY`` while the server is (it loads on first use, as
    ModelReady says); ``reason`` tells whether it is in the device's memory now."""
    out: list[dict[str, str]] = []
    root = ctx.settings.model_store
    for entry in list_entries(root):
        for m in list_versions(root, entry.name):
            loaded = ctx.is_loaded(m.name, m.version)
            if ctx.ready:
                state, reason = "READY", "loaded" if loaded else "loads on first request"
            else:
                state, reason = "UNAVAILABLE", "the server is starting or draining"
            if ready_only and state != "READY":
                continue
            out.append({"name": m.name, "version": m.version, "state": state, "reason": reason})
    return out


def statistics(ctx: ServiceContext, name: str = "", version: str = "") -> dict[str, Any]:
    """Off the event loop: Triton's statistics of one model's versions (one version's, with
    ``version``), or of every model that ran when ``name`` is empty."""
    if not name:
        return {"model_stats": [s.to_dict() for s in ctx.stats.recorded()]}
    manifest = check_model(ctx, name, version or None)
    if version:
        versions = [manifest.version]
    else:
        versions = [m.version for m in list_versions(ctx.settings.model_store, manifest.name)]
    return {"model_stats": [ctx.stats.peek(manifest.name, v).to_dict() for v in versions]}


# ------------------------------------------------------------------------------ input
@dataclass
class Tensor:
    """One input tensor as any transport delivers it: ``data`` (JSON's nested list, gRPC's
    typed contents) or ``raw`` (Triton's binary extension, gRPC's ``raw_input_contents``).
    BYTES elements in ``data`` are base64 strings when ``b64`` (JSON), raw bytes otherwise."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | None = None
    b64: bool = True
    where: str = "inputs[0]"


def _image_count(shape: list[int], limit: int, where: str) -> int:
    """The number of images an input's shape holds, within the per-request limit."""
    if shape[0] > limit:
        raise PayloadTooLarge(f"{where}: {shape[0]} images, limit {limit}", field=f"{where}.shape")
    return shape[0]


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


def read_input(
    inputs: Sequence[Tensor], ctx: ServiceContext
) -> tuple[int, torch.Tensor | list[tuple[str, bytes]]]:
    """The one input tensor -> (N, float tensor) or (N, encoded images to decode)."""
    if len(inputs) != 1:
        raise InvalidParameter(
            f"inputs: expected exactly one input tensor, got {len(inputs)}", field="inputs"
        )
    inp = inputs[0]
    where = inp.where
    if inp.name != INPUT_NAME:
        raise InvalidParameter(
            f"{where}.name: unknown input {inp.name!r}; this model's input is {INPUT_NAME!r}",
            field=f"{where}.name",
        )
    if inp.raw is None and inp.data is None:
        raise InvalidParameter(f"{where}.data: missing", field=f"{where}.data")
    if any(not isinstance(d, int) or d < 0 for d in inp.shape):
        raise InvalidParameter(
            f"{where}.shape: dimensions must be integers >= 0", field=f"{where}.shape"
        )
    limit = ctx.settings.max_images_per_request
    if inp.datatype == "FP32":
        if len(inp.shape) != 4 or list(inp.shape[1:]) != [3, 32, 32]:
            raise InvalidParameter(
                f"{where}.shape: FP32 input must be [N, 3, 32, 32], got {list(inp.shape)}",
                field=f"{where}.shape",
            )
        n = _image_count(inp.shape, limit, where)
        count = n * 3 * 32 * 32
        if inp.raw is not None:
            if len(inp.raw) != count * 4:
                raise InvalidParameter(
                    f"{where}: {len(inp.raw)} bytes of binary data, expected {count * 4} for "
                    f"shape {list(inp.shape)}",
                    field=f"{where}.parameters.binary_data_size",
                )
            arr = np.frombuffer(inp.raw, dtype="<f4").astype(np.float32)
        else:
            typed = isinstance(inp.data, np.ndarray)  # already numbers (gRPC contents)
            flat = inp.data.reshape(-1) if typed else _flatten(inp.data)
            if len(flat) != count:
                raise InvalidParameter(
                    f"{where}.data: {len(flat)} values, expected {count} for shape "
                    f"{list(inp.shape)}",
                    field=f"{where}.data",
                )
            if not typed and not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in flat
            ):
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
                f"{where}.shape: BYTES input must be [N] (or [N, 1]), got {list(inp.shape)}",
                field=f"{where}.shape",
            )
        n = _image_count(inp.shape, limit, where)
        if inp.raw is not None:
            blobs = _unpack_bytes(inp.raw, n, where)
        else:
            flat = _flatten(inp.data)
            if len(flat) != n:
                raise InvalidParameter(
                    f"{where}.data: {len(flat)} elements, expected {n}", field=f"{where}.data"
                )
            if inp.b64:
                blobs = [b64decode(s, f"{where}.data[{i}]") for i, s in enumerate(flat)]
            else:
                blobs = [bytes(b) for b in flat]
        return n, [(f"{where}.data[{i}]", b) for i, b in enumerate(blobs)]
    raise InvalidParameter(
        f"{where}.datatype: {inp.datatype} is not accepted; send FP32 [N, 3, 32, 32] or BYTES [N]",
        field=f"{where}.datatype",
    )


def defense_fields(params: dict[str, Any]) -> tuple[DefenseFields, bool]:
    """A request's parameters -> its validated defense settings, and ``binary_data_output``."""
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


# ------------------------------------------------------------------------------ infer
async def infer(
    ctx: ServiceContext,
    name: str,
    version: str | None,
    inputs: Sequence[Tensor],
    fields: DefenseFields,
    *,
    request: Request | None = None,
    max_deadline_ms: float | None = None,
) -> tuple[JobResult, Resolved]:
    """One v2 inference through the service's only way to the device. ``max_deadline_ms``
    caps the request's deadline (the transport's own, a gRPC deadline say)."""
    ctx.check_admission()
    ref = name if version is None else f"{name}@{version}"
    fields = fields.model_copy(update={"model": ref})
    n, payload = read_input(inputs, ctx)
    job = ctx.resolver.resolve(fields, n)
    if isinstance(payload, list):
        images = await ctx.offload(decode_all, payload, ctx.settings.max_image_pixels)
    else:
        images = payload
    deadline = fields.deadline_ms
    if max_deadline_ms is not None:
        deadline = min(deadline or ctx.settings.default_deadline_ms, max(max_deadline_ms, 1.0))
    result = await ctx.infer(job.model, images, [job.params] * n, deadline, request)
    return result, job


def requested_outputs(names: Sequence[str]) -> list[str]:
    """The outputs a request asks for, in its order (all of them when it names none)."""
    if not names:
        return list(OUTPUTS)
    for i, name in enumerate(names):
        if name not in OUTPUTS:
            raise InvalidParameter(
                f"outputs[{i}].name: unknown output {name!r}; available: {list(OUTPUTS)}",
                field=f"outputs[{i}].name",
            )
    return list(names)


def output_arrays(outputs: list[Any]) -> dict[str, np.ndarray]:
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


def to_binary(arr: np.ndarray, datatype: str) -> bytes:
    """A tensor in the protocol's raw layout (little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in arr.reshape(-1))
    if datatype == "BOOL":
        return arr.astype(np.bool_).tobytes()
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def answer_parameters(result: JobResult, job: Resolved) -> dict[str, Any]:
    """The answer's ``parameters``: which weights served it and where its time went."""
    return {
        "sha256": result.model.sha256,
        "queue_ms": result.queue_s * 1000.0,
        "compute_ms": result.compute_s * 1000.0,
        "batch_size": result.batch_size,
        "defense": json.dumps(job.applied),
    }
