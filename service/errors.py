"""One error base carrying its HTTP status; one handler maps them all.

Raise where the condition is known, with a message that says what to do.
The body is ``{"error": message, "code": code}`` (the Open Inference Protocol's
error body is ``{"error": ...}``; ``code`` adds a stable machine-readable name).
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequestError(ServiceError):
    status_code = 400
    code = "bad_request"


class InvalidImageError(BadRequestError):
    code = "invalid_image"


class NotFoundError(ServiceError):
    status_code = 404
    code = "not_found"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    code = "payload_too_large"


class ImageTooLargeError(PayloadTooLargeError):
    code = "image_too_large"


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class ServiceUnavailableError(ServiceError):
    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class QueueFullError(ServiceUnavailableError):
    """A model's queue is at its limit: the request was not admitted."""

    code = "queue_full"


class ShuttingDownError(ServiceUnavailableError):
    """The server is shutting down: new requests, and those still running when the grace period ends."""

    code = "shutting_down"


class QueueWaitError(QueueFullError):
    """The queue would keep the request waiting longer than ``max_queue_wait_ms``: refused at arrival."""

    code = "overloaded"


class ModelClosedError(ServiceUnavailableError):
    """The model's batcher is closing (shutdown, unload) and did not run the request."""


class ShedError(ServiceUnavailableError):
    """Low-priority work (a shadow) was dropped because normal traffic was queueing."""

    code = "shed"


class DeadlineExceededError(ServiceError):
    """The request's deadline passed before its result was ready."""

    status_code = 504
    code = "deadline_exceeded"


class ClientGoneError(ServiceError):
    """The client disconnected before its answer was ready: nginx's 499, logged and counted, never sent."""

    status_code = 499
    code = "client_closed_request"


class InferenceError(ServiceError):
    """The model's run failed, or broke its contract; ``__cause__`` holds the reason."""

    status_code = 500
    code = "inference_failed"
