"""Service errors and their HTTP status codes, in one table.

Every rejection is a :class:`ServiceError` carrying its status, a machine-readable ``reason``
(the label of ``deqguard_rejections_total``) and, where it applies, the offending ``field`` or
``part``, so clients can tell what to fix. The core's own errors (a bad defense setting, a store
entry that is missing or fails verification) become service errors in :func:`as_service_error`,
and the one exception handler in :mod:`service.app` turns both into ``{"error": {...}}`` bodies:
routes and the admin API raise, they never translate. Where the same core error means another
thing (the device cannot serve an entry; an operator's checkpoint fails verification), the
place that knows uses its row of this module's tables (:data:`SERVE_ERRORS`,
:data:`PATH_ERRORS`, :data:`LOAD_ERRORS`).
"""

from __future__ import annotations

import re

from deqguard.defense import DefenseParamError
from deqguard.store import StoreError, StoreIntegrityError, StoreNotFoundError

__all__ = [
    "DOMAIN_ERRORS",
    "LOAD_ERRORS",
    "PATH_ERRORS",
    "SERVE_ERRORS",
    "BadBody",
    "BadImage",
    "BatchFailed",
    "CheckpointRefused",
    "Conflict",
    "DeadlineExceeded",
    "Forbidden",
    "InvalidParameter",
    "ModelLoadFailed",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "QueueFull",
    "ErrorTable",
    "GRPC_CODES",
    "ServiceError",
    "ShuttingDown",
    "Unauthorized",
    "UnsupportedMediaType",
    "as_service_error",
]


class ServiceError(Exception):
    """Base: a message for people, a status code and a reason label for machines."""

    status_code: int = 500
    reason: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        part: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.part = part
        self.headers = headers or {}

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.status_code, "reason": self.reason}
        body["message"] = self.message
        if self.field is not None:
            body["field"] = self.field
        if self.part is not None:
            body["part"] = self.part
        return body


class InvalidParameter(ServiceError):
    status_code = 422
    reason = "invalid_parameter"


class BadImage(ServiceError):
    status_code = 400
    reason = "bad_image"


class BadBody(ServiceError):
    """The body parses to nothing usable (JSON nested too deeply to parse, say)."""

    status_code = 400
    reason = "bad_body"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    reason = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status_code = 413
    reason = "payload_too_large"


class ModelNotFound(ServiceError):
    status_code = 404
    reason = "model_not_found"


class QueueFull(ServiceError):
    status_code = 429
    reason = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class DeadlineExceeded(ServiceError):
    status_code = 504
    reason = "deadline_exceeded"


class NotReady(ServiceError):
    status_code = 503
    reason = "not_ready"

    def __init__(self, message: str, *, draining: bool = False) -> None:
        super().__init__(message, headers={"Retry-After": "1"})
        if draining:
            self.reason = "draining"


class ShuttingDown(ServiceError):
    """The drain grace ran out with this request in flight: its work was stopped unfinished."""

    status_code = 503
    reason = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ModelLoadFailed(ServiceError):
    """The store holds the entry but it cannot be served (tampered or malformed weights)."""

    status_code = 500
    reason = "model_load_failed"


class BatchFailed(ServiceError):
    """The device failed on this request alone, after splitting its batch."""

    status_code = 500
    reason = "compute_failed"


class Conflict(ServiceError):
    """The request contradicts the resource's state (an audit already finished, say)."""

    status_code = 409
    reason = "conflict"


class NotFound(ServiceError):
    """An admin resource (audit job, plot) that does not exist."""

    status_code = 404
    reason = "not_found"


class CheckpointRefused(ServiceError):
    """The store entry exists but fails verification or warm-up: it is not served."""

    status_code = 422
    reason = "checkpoint_refused"


class Unauthorized(ServiceError):
    status_code = 401
    reason = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="deqguard-admin"'})


class Forbidden(ServiceError):
    status_code = 403
    reason = "forbidden"


ErrorTable = tuple[tuple[type[Exception], type[ServiceError], str], ...]
"""Rows of (core error, service error, message template with ``{exc}``); the first row that
matches wins, so the most specific comes first."""

DOMAIN_ERRORS: ErrorTable = (
    # a request (or an admin call) names a model or defense settings
    (DefenseParamError, InvalidParameter, "{exc}"),
    (StoreNotFoundError, ModelNotFound, "{exc}"),
    (StoreIntegrityError, ModelLoadFailed, "{exc}"),
    (StoreError, InvalidParameter, "{exc}"),  # e.g. a malformed model reference
)
"""The core's errors on the request side and the service error each one is answered with."""

SERVE_ERRORS: ErrorTable = (
    # the device loads a model the request side found: what cannot be served is the server's
    (StoreNotFoundError, ModelNotFound, "{exc}"),
    (StoreError, ModelLoadFailed, "{exc}"),
)
"""Store errors while the device worker loads a model for a batch."""

PATH_ERRORS: ErrorTable = (
    # a KServe v2 model path: a name that cannot be an entry names no model
    (StoreNotFoundError, ModelNotFound, "{exc}"),
    (StoreIntegrityError, ModelLoadFailed, "{exc}"),
    (StoreError, ModelNotFound, "{exc}"),
)
"""Store errors of a model named in a v2 path (``/v2/models/{name}``: 404, never 422)."""

LOAD_ERRORS: ErrorTable = (
    # an operator asks for a hot swap: a checkpoint that fails verification is refused
    (StoreNotFoundError, ModelNotFound, "{exc}"),
    (StoreError, CheckpointRefused, "refused: {exc}; the current model keeps serving"),
)
"""Store errors of an admin model load (``POST /admin/models/{name}/load``)."""


GRPC_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",  # what gRPC itself answers for a message over its size limit
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "UNAVAILABLE",  # retry later (the answer's metadata carries retry-after)
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
"""A service error's HTTP status -> the gRPC status code the KServe v2 gRPC endpoint answers
with (names of ``grpc.StatusCode``; anything else is ``INTERNAL``)."""


_ABS_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"():,;]+)*/([^\s/'\"():,;]+/[^\s/'\"():,;]+)")


def redact_paths(message: str) -> str:
    """``message`` with absolute server paths cut to their last two parts (``name/file``: a
    store entry's own file), so answers never show where the server keeps its files."""
    return _ABS_PATH.sub(r"\1", message)


def as_service_error(
    exc: Exception, table: ErrorTable = DOMAIN_ERRORS, *, field: str | None = None
) -> ServiceError:
    """``exc`` as the service error ``table`` gives it (a ServiceError as it is; anything else:
    a 500 that hides the details). The field is ``field``, else the defense parameter's, else
    ``model``."""
    if isinstance(exc, ServiceError):
        return exc
    for domain, service, template in table:
        if isinstance(exc, domain):
            name = field or (exc.field if isinstance(exc, DefenseParamError) else "model")
            return service(redact_paths(template.format(exc=exc)), field=name)
    return ServiceError(f"internal error ({type(exc).__name__})")
