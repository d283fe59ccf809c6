"""protege's one error hierarchy.

Every dependency boundary (student HTTP client, litellm, SQLite, adapters) translates its own
exceptions into one of these with ``raise ... from exc``; ``gateway.app`` maps them to HTTP in one
handler. The body is always OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations


class ProtegeError(Exception):
    status_code = 500
    error_type = "internal_error"
    default_code: str | None = "internal_error"
    # Set by CallRecord.fail once the request is logged under an id: the error answer carries
    # it, so a caller can find the failed call in the log and give feedback on it like any other.
    request_id: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ProtegeError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(ProtegeError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(ProtegeError):
    status_code = 403
    error_type = "permission_error"
    default_code = "forbidden"


class NotFound(ProtegeError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class PayloadTooLarge(ProtegeError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class Overloaded(ProtegeError):
    """The gateway's own concurrency limit: refuse now rather than queue forever."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "overloaded"


class Conflict(ProtegeError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class BackendError(ProtegeError):
    """A model backend (student or teacher) failed. ``backend`` says which."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        upstream_status: int | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.backend = backend
        self.upstream_status = upstream_status


class BackendRejected(BackendError):
    """The backend refused the request itself (its 4xx): the caller's fault, passed on as 400."""

    status_code = 400
    error_type = "invalid_request_error"
    default_code = "upstream_rejected"


class BackendRateLimited(BackendError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "upstream_rate_limited"


class BackendUnavailable(BackendError):
    """Connection refused, 503, cooled down, or not configured."""

    status_code = 503
    error_type = "upstream_unavailable"
    default_code = "upstream_unavailable"


class BackendTimeout(BackendError):
    status_code = 504
    error_type = "upstream_timeout"
    default_code = "upstream_timeout"


class StoreError(ProtegeError):
    """SQLite failed. Never surfaces on the request path: the writer buffers and retries."""

    default_code = "store_error"


class AdapterError(ProtegeError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "adapter_error"


class ExportError(AdapterError):
    """`protege adapters export` could not build or write the merged model."""

    default_code = "export_failed"
