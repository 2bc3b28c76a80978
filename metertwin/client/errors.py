"""Errors the client raises: one root, :class:`ApiError`, itself a :class:`metertwin.core.errors.MeterTwinError`.

Each is built from our JSON error body (``{"error": code, "message": ..., "details": ...}``):
the ``code`` picks the class where it names one (``unknown_meter``, ``version_mismatch``,
``meter_timeout`` ...), else the HTTP status does. Each class also derives from the
server-side class of the same meaning, so ``except metertwin.core.errors.NotFound`` works
on either side of the wire.
"""

from __future__ import annotations

from typing import Any

import httpx

from metertwin.core import errors as core


class ApiError(core.MeterTwinError):
    """A call answered with an error (or could not be made). ``status`` is 0 when no answer came."""

    code = "api_error"

    def __init__(self, message: str, *, status: int = 0, code: str | None = None,
                 details: dict[str, Any] | None = None, response: httpx.Response | None = None) -> None:
        super().__init__(message, **(details or {}))
        self.status = status
        self.code = code or type(self).code
        self.response = response

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}" if self.status else self.message


class BadRequest(ApiError, core.InvalidInput):
    code = "invalid_input"


class PayloadTooLarge(BadRequest, core.PayloadTooLarge):
    code = "payload_too_large"


class Unauthorized(ApiError, core.Unauthorized):
    """No token, a bad or expired token, or a revoked one (``details["reason"]`` says why)."""

    code = "unauthorized"


class Forbidden(ApiError, core.Forbidden):
    code = "forbidden"


class NotFound(ApiError, core.NotFound):
    code = "not_found"


class UnknownMeter(NotFound, core.UnknownMeter):
    code = "unknown_meter"


class MethodNotAllowed(ApiError, core.MethodNotAllowed):
    code = "method_not_allowed"


class Conflict(ApiError, core.Conflict):
    code = "conflict"


class VersionMismatch(ApiError, core.VersionMismatch):
    """``If-Match`` named a twin version that is no longer current (412)."""

    code = "version_mismatch"


class RateLimited(ApiError):
    """429 after every retry."""

    code = "rate_limited"


class ServerError(ApiError):
    code = "internal_error"


class Unavailable(ServerError, core.BackendUnavailable):
    """503 after every retry (a backend of the zone is down), or no answer at all (``status`` 0)."""

    code = "backend_unavailable"


class MeterTimeout(ServerError, core.MeterTimeout):
    """504: the meter did not answer in time; ``details`` may hold the stale value."""

    code = "meter_timeout"


_BY_CODE: dict[str, type[ApiError]] = {
    c.code: c for c in (BadRequest, PayloadTooLarge, Unauthorized, Forbidden, NotFound, UnknownMeter,
                        MethodNotAllowed, Conflict, VersionMismatch, RateLimited, Unavailable, MeterTimeout)
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed, 409: Conflict,
    412: VersionMismatch, 413: PayloadTooLarge, 429: RateLimited, 503: Unavailable, 504: MeterTimeout,
}


def error_of(response: httpx.Response) -> ApiError:
    """The exception for an error response (our JSON body, or whatever the gateway sent)."""
    code, message, details = None, "", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("error") if isinstance(body.get("error"), str) else None
        message = str(body.get("message") or "")
        details = body.get("details") if isinstance(body.get("details"), dict) else None
        if isinstance(body.get("stale"), dict):  # a 504 read carries the last known value
            details = {**(details or {}), "stale": body["stale"]}
    if not message:
        message = response.text[:300] or response.reason_phrase
    status = response.status_code
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or (
        BadRequest if 400 <= status < 500 else ServerError)
    where = f"{response.request.method} {response.request.url.path}"
    return cls(f"{message} ({where})", status=status, code=code, details=details, response=response)
