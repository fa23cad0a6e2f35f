"""The KServe v2 gRPC endpoint (``inference.GRPCInferenceService``), what ``tritonclient.grpc``
and Triton's tools speak, on ``DEQGUARD_GRPC_PORT`` (default 8001; 0 turns it off).

A ``grpc.aio`` server on the event loop that runs the HTTP app, started and stopped by the app's
lifespan (:func:`grpc_endpoint`), so it shares everything with HTTP: the
:class:`~service.context.ServiceContext` (admission, draining, deadlines, the batcher), the
protocol in :mod:`service.api.kserve` (input checks, defense parameters, output tensors,
statistics, repository index) and the error table of :mod:`service.errors`, whose HTTP status
becomes a gRPC status code (:data:`service.errors.GRPC_CODES`) with the same message. The
request size limit is ``DEQGUARD_MAX_BODY_BYTES`` here too (gRPC's receive limit).

The messages and the service come from the stubs ``tritonclient`` generates from the
protocol's ``grpc_service.proto`` and ships (``tritonclient.grpc.service_pb2``): the
definition every Triton client is built from, kept by its maintainers, so the wire format
cannot drift from what clients send. RPCs other than those below answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.api import kserve
from service.context import ClientGone, ServiceContext
from service.errors import GRPC_CODES, InvalidParameter, as_service_error

__all__ = ["IMPLEMENTED", "InferenceServicer", "grpc_endpoint", "start_grpc"]

log = logging.getLogger("deqguard.service")

IMPLEMENTED = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStatistics",
    "RepositoryIndex",
)
STOP_GRACE_S = 2.0  # at shutdown the drain is over: only answers being written remain


def _param(p: Any) -> Any:
    """An ``InferParameter`` as the plain value it holds (what JSON would have carried)."""
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def _tensors(request: Any) -> list[kserve.Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidParameter(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs",
            field="raw_input_contents",
        )
    out = []
    for i, inp in enumerate(request.inputs):
        data: Any = None
        if inp.datatype == "FP32" and len(inp.contents.fp32_contents):
            data = np.asarray(inp.contents.fp32_contents, dtype=np.float32)
        elif inp.datatype == "BYTES" and len(inp.contents.bytes_contents):
            data = list(inp.contents.bytes_contents)
        out.append(
            kserve.Tensor(
                name=inp.name,
                datatype=inp.datatype,
                shape=list(inp.shape),
                data=data,
                raw=raw[i] if raw else None,
                b64=False,
                where=f"inputs[{i}]",
            )
        )
    return out


def _infer_parameter(value: Any) -> Any:
    p = pb.InferParameter()
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)
    return p


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, each a thin adapter over :mod:`service.api.kserve`; errors through
    :meth:`_answer`, the one place a service error becomes a gRPC status."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            if method.name not in IMPLEMENTED:
                setattr(self, method.name, self._unimplemented(method.name))

    @staticmethod
    def _unimplemented(name: str) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{name} is not implemented by deqguard; implemented: {', '.join(IMPLEMENTED)}",
            )

        return handler

    async def _answer(self, context: grpc.aio.ServicerContext, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except ClientGone:
            await context.abort(grpc.StatusCode.CANCELLED, "the client went away")
        except Exception as exc:  # noqa: BLE001 - every error is answered, as HTTP does
            if isinstance(exc, grpc.aio.AbortError):
                raise
            err = as_service_error(exc)
            self.ctx.reject(err.reason)
            if err.status_code >= 500 and err.status_code not in (503, 504):
                log.warning("gRPC %d: %s", err.status_code, err.message)
            metadata = [("deqguard-reason", err.reason), ("deqguard-status", str(err.status_code))]
            if err.field is not None:
                metadata.append(("deqguard-field", err.field))
            if "Retry-After" in err.headers:
                metadata.append(("retry-after", err.headers["Retry-After"]))
            code = getattr(grpc.StatusCode, GRPC_CODES.get(err.status_code, "INTERNAL"))
            await context.abort(code, err.message, trailing_metadata=tuple(metadata))

    # ------------------------------------------------------------------ health, metadata
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.ctx.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            version = request.version or None
            await self.ctx.offload(kserve.check_model, self.ctx, request.name, version)
            return pb.ModelReadyResponse(ready=self.ctx.ready)

        return await self._answer(context, work())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return json_format.ParseDict(kserve.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            meta = await self.ctx.offload(
                kserve.model_metadata, self.ctx, request.name, request.version or None
            )
            return json_format.ParseDict(meta, pb.ModelMetadataResponse())

        return await self._answer(context, work())

    # ------------------------------------------------------------------ statistics, index
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            stats = await self.ctx.offload(
                kserve.statistics, self.ctx, request.name, request.version
            )
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

        return await self._answer(context, work())

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            models = await self.ctx.offload(kserve.repository_index, self.ctx, request.ready)
            return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

        return await self._answer(context, work())

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer(context, self._infer(request, context))

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ctx = self.ctx
        ctx.check_admission()
        params = {k: _param(v) for k, v in request.parameters.items()}
        fields, _ = kserve.defense_fields(params)
        names = kserve.requested_outputs([o.name for o in request.outputs])
        remaining = context.time_remaining()  # the client's gRPC deadline, if it set one
        result, job = await kserve.infer(
            ctx,
            request.model_name,
            request.model_version or None,
            _tensors(request),
            fields,
            max_deadline_ms=None if remaining is None else remaining * 1000.0,
        )
        arrays = kserve.output_arrays(result.outputs)
        served = result.model
        response = pb.ModelInferResponse(
            model_name=served.name, model_version=served.version, id=request.id
        )
        for key, value in kserve.answer_parameters(result, job).items():
            response.parameters[key].CopyFrom(_infer_parameter(value))
        for key in names:
            arr = arrays[key]
            datatype = kserve.OUTPUTS[key][0]
            response.outputs.add(name=key, datatype=datatype, shape=list(arr.shape))
            response.raw_output_contents.append(kserve.to_binary(arr, datatype))
        return response


async def start_grpc(ctx: ServiceContext) -> grpc.aio.Server:
    """Bind ``DEQGUARD_HOST:DEQGUARD_GRPC_PORT`` and start serving (on the running loop). A port
    that cannot be bound stops the start with a message (as uvicorn does for HTTP); the port is
    never shared with another process (no SO_REUSEPORT)."""
    settings = ctx.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(ctx), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot serve gRPC on {address} ({exc}); choose another DEQGUARD_GRPC_PORT "
            "(0 turns gRPC off)"
        ) from None
    await server.start()
    log.info("KServe v2 gRPC endpoint on %s", address)
    return server


@asynccontextmanager
async def grpc_endpoint(ctx: ServiceContext) -> AsyncIterator[grpc.aio.Server | None]:
    """The gRPC endpoint for the app's lifespan (none when ``DEQGUARD_GRPC_PORT`` is 0)."""
    if not ctx.settings.grpc_port:
        yield None
        return
    server = await start_grpc(ctx)
    try:
        yield server
    finally:
        await server.stop(STOP_GRACE_S)
