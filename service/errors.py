"""Service errors and their HTTP status codes, in one table.

Every rejection is a :class:`ServiceError` carrying its status, a machine-readable ``reason``
(the label of ``deqguard_rejections_total``) and, where it applies, the offending ``field`` or
``part``, so clients can tell what to fix. One exception handler in :mod:`service.app` turns them
into ``{"error": {...}}`` bodies.
"""

from __future__ import annotations

__all__ = [
    "BadImage",
    "BatchFailed",
    "DeadlineExceeded",
    "InvalidParameter",
    "ModelLoadFailed",
    "ModelNotFound",
    "NotReady",
    "PayloadTooLarge",
    "QueueFull",
    "ServiceError",
    "UnsupportedMediaType",
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


class ModelLoadFailed(ServiceError):
    """The store holds the entry but it cannot be served (tampered or malformed weights)."""

    status_code = 500
    reason = "model_load_failed"


class BatchFailed(ServiceError):
    """The device failed on this request alone, after splitting its batch."""

    status_code = 500
    reason = "compute_failed"
