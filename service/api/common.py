"""Request parsing shared by the v1 and v2 routers: settings, images, answers.

HTTP-only concerns (content types, field names in error messages); no device work here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from deqguard.data import CLASSES
from service.errors import BadBody, BadImage, InvalidParameter
from service.imaging import decode_image
from service.outputs import ImageOutput

__all__ = [
    "JSONBodyRoute",
    "strict_query",
    "b64decode",
    "decode_all",
    "field_from_loc",
    "image_prediction",
    "invalid_from_validation",
    "loads_json",
    "server_timing",
]


def field_from_loc(loc: Sequence[Any]) -> str:
    """pydantic/FastAPI error location -> a dotted field name (``images.0``, ``beta``)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


def invalid_from_validation(exc: ValidationError, prefix: str = "") -> InvalidParameter:
    """The first error of a pydantic ValidationError as a 422 naming its field."""
    err = exc.errors()[0]
    name = field_from_loc(err["loc"])
    name = f"{prefix}{name}" if prefix else name
    return InvalidParameter(f"{name}: {err['msg']}", field=name)


def validate_model(cls: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc, prefix) from None


def loads_json(raw: bytes | str, what: str = "body") -> Any:
    """``json.loads``, with JSON nested too deeply for the parser as a 400 naming the problem
    (a RecursionError would otherwise be a 500); decode errors propagate as they are."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadBody(
            f"{what}: JSON nested too deeply to parse (arrays/objects inside one another)",
            part="body",
        ) from None


class JSONBodyRoute(APIRoute):
    """A route whose JSON body FastAPI parses: parsed here first with :func:`loads_json`, so
    nesting too deep is a 400 naming it instead of FastAPI's bare "error parsing the body"."""

    def get_route_handler(self) -> Any:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json" or ctype.endswith("+json"):
                raw = await request.body()
                if raw:
                    try:
                        request._json = loads_json(raw)  # what Request.json() returns
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        pass  # FastAPI's own 422 for malformed JSON
            return await inner(request)

        return handler


def _query_names(dependant: Any) -> frozenset[str]:
    names: set[str] = set()
    stack = [dependant]
    while stack:
        d = stack.pop()
        names.update(p.alias for p in d.query_params)
        stack.extend(d.dependencies)
    return frozenset(names)


_QUERY_NAMES: dict[int, frozenset[str]] = {}


async def strict_query(request: Request) -> None:
    """App-wide dependency: a query parameter the route does not declare is a 422 naming it
    (``?r=5`` must not run with the default R), as unknown JSON and form fields are."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = _QUERY_NAMES.get(id(route))
    if allowed is None:
        allowed = _QUERY_NAMES[id(route)] = _query_names(dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        accepted = f"accepted: {sorted(allowed)}" if allowed else "this route takes none"
        raise InvalidParameter(
            f"{unknown[0]}: unknown query parameter(s) {unknown}; {accepted}", field=unknown[0]
        )


def b64decode(text: Any, part: str) -> bytes:
    """Strict base64 (standard or URL-safe, optional data: URL prefix) naming the part."""
    if not isinstance(text, str):
        raise BadImage(f"{part}: expected a base64 string", part=part)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{part}: not valid base64", part=part) from None


def decode_all(blobs: Sequence[tuple[str, bytes]], max_pixels: int) -> torch.Tensor:
    """Encoded images (named parts) -> float32 [n, 3, 32, 32] in [0, 1] (runs off the loop)."""
    arrays = [decode_image(data, part, max_pixels=max_pixels) for part, data in blobs]
    # numpy, not torch: a torch op big enough to run in parallel would give this decode thread
    # its own OpenMP team, and a second team throttles the device thread (service/arbiter.py)
    scaled = np.divide(np.stack(arrays), np.float32(255.0), dtype=np.float32)
    return torch.from_numpy(scaled)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def image_prediction(index: int, out: ImageOutput) -> dict[str, Any]:
    trace = []
    for t in range(len(out.step_entropy)):
        acted = bool(out.acted[t])
        trace.append(
            {
                "step": t + 1,
                "entropy": _finite(float(out.step_entropy[t])) or 0.0,
                "defense_acted": acted,
                "post_entropy": _finite(float(out.post_entropy[t])) if acted else None,
            }
        )
    return {
        "index": index,
        "label": CLASSES[out.class_index],
        "class_index": out.class_index,
        "probabilities": {c: float(p) for c, p in zip(CLASSES, out.probabilities.tolist())},
        "entropy": out.entropy,
        "entropy_trace": trace,
        "state": out.state_index,
        "final_residual": _finite(out.final_residual) or 0.0,
        "nfe": out.nfe,
        "grad_steps": out.grad_steps,
    }


def server_timing(scope_state: dict[str, Any], queue_s: float, compute_s: float) -> None:
    """Record queue/compute durations for the middleware's Server-Timing header."""
    scope_state["server_timing"] = {"queue": queue_s * 1000.0, "compute": compute_s * 1000.0}


def elapsed_ms(scope_state: dict[str, Any]) -> float:
    return (time.perf_counter() - scope_state.get("t0", time.perf_counter())) * 1000.0
