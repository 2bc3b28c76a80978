"""The one exception root of metertwin and the one table that maps errors to HTTP.

Every error carries a machine-readable ``code`` and a message that names the bad
value. Handlers raise; :func:`metertwin.core.http.handler` turns the exception into a
JSON response through :data:`HTTP_STATUS`.
"""

from __future__ import annotations

from typing import Any


class MeterTwinError(Exception):
    """Root of every error metertwin raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(MeterTwinError):
    """The request is malformed: bad JSON, wrong type, value out of range."""

    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class Unauthorized(MeterTwinError):
    """No credentials, or credentials that do not verify."""

    code = "unauthorized"


class Forbidden(MeterTwinError):
    """Valid credentials that do not reach this resource."""

    code = "forbidden"


class NotFound(MeterTwinError):
    code = "not_found"


class UnknownMeter(NotFound):
    code = "unknown_meter"


class MethodNotAllowed(MeterTwinError):
    code = "method_not_allowed"


class Conflict(MeterTwinError):
    code = "conflict"


class VersionMismatch(MeterTwinError):
    """``If-Match`` named a twin version that is no longer current."""

    code = "version_mismatch"


class MeterTimeout(MeterTwinError):
    """The meter did not answer within the timeout."""

    code = "meter_timeout"


class BackendUnavailable(MeterTwinError):
    """Redis, the MQTT broker or S3 could not be reached in time."""

    code = "backend_unavailable"


#: Exception class -> HTTP status. Lookup walks the MRO, so subclasses inherit.
HTTP_STATUS: dict[type[MeterTwinError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    Conflict: 409,
    VersionMismatch: 412,
    PayloadTooLarge: 413,
    BackendUnavailable: 503,
    MeterTimeout: 504,
    MeterTwinError: 500,
}


def http_status(exc: MeterTwinError) -> int:
    """Return the HTTP status for ``exc`` from :data:`HTTP_STATUS`."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
