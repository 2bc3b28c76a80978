"""The gateway's ``/system`` API: basic auth, function status, info (OpenFaaS's shapes).

Basic auth is checked by the app's dispatcher for every path under ``/system`` (also
unknown ones) before any routing; the routes here only declare it for the OpenAPI document.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import platform
import re
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic

if TYPE_CHECKING:
    from gateway.app import GatewayApp

VERSION = "0.1.0"
BASIC_USER = b"admin"
UNAUTHORIZED_BODY = b"Unauthorized\n"
UNAUTHORIZED_HEADERS = [
    (b"www-authenticate", b'Basic realm="OpenFaaS API"'),
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
]


REDACTED = "[redacted]"
#: Variable names that hold a secret whatever their value looks like.
_SECRET_NAME = re.compile(r"PASS|PWD|SECRET|TOKEN|KEY|CREDENTIAL|AUTH|DSN|PRIVATE", re.IGNORECASE)
#: ``scheme://user:password@host``: everything of the authority up to its *last* '@' (a password may
#: hold '@', as redis-py and urllib read it; a cluster URL may name credentials before each host).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
#: ``password=...`` / ``token=...`` in a URL's query or fragment, or in a ``key=value`` DSN.
_SECRET_QUERY = re.compile(
    r"(?P<key>(?:^|[?&;#\s])[^=&;#\s]*(?:pass|pwd|secret|token|key|auth)[^=&;#\s]*=)[^&;#\s]*", re.IGNORECASE)


def redact_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` as ``/system/functions`` shows it: secret-named values and URL credentials replaced.

    A Redis or broker URL may carry ``user:password@``; the deployment's own values are not
    the caller's business even behind basic auth (issue 10, item 10).
    """
    out: dict[str, str] = {}
    for name, value in env.items():
        if _SECRET_NAME.search(name):
            out[name] = REDACTED if value else value
            continue
        value = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
        out[name] = _SECRET_QUERY.sub(lambda m: f"{m['key']}{REDACTED}", value)
    return out


def basic_authorized(headers: list[tuple[bytes, bytes]], basic_password: bytes | None) -> bool:
    """True when ``headers`` carry basic auth of user ``admin`` with ``basic_password`` (never when it is unset)."""
    if basic_password is None:
        return False
    for key, value in headers:
        if key == b"authorization":
            scheme, _, encoded = value.partition(b" ")
            if scheme.lower() != b"basic":
                return False
            try:
                user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            # Compare both in full (no short-circuit) so timing tells nothing.
            ok_user = hmac.compare_digest(user, BASIC_USER)
            ok_password = hmac.compare_digest(password, basic_password)
            return ok_user and ok_password
    return False


def add_system_routes(api: FastAPI, gw: GatewayApp) -> None:
    """``/system/functions``, ``/system/function/{name}``, ``/system/scale-function/{name}``,
    ``/system/dead-letters``, ``/system/info``."""
    # Basic auth is enforced by the dispatcher for every /system path; this only documents it.
    basic = HTTPBasic(auto_error=False, realm="OpenFaaS API")
    system = [Depends(basic)]

    @api.get("/system/functions", dependencies=system, tags=["system"])
    async def list_functions() -> JSONResponse:
        """Every function of this zone with its invocation count (shared by the zone's workers)."""
        counts = await gw.invocation_counts()
        return JSONResponse([gw.function_status(fn, counts.get(name, 0)) for name, fn in gw.functions.items()])

    async def change_functions() -> PlainTextResponse:
        """Deploying, updating and removing functions is done by editing stack.yml and restarting."""
        return PlainTextResponse("the local gateway serves stack.yml as loaded; restart it to change functions\n",
                                 status_code=501)

    for method in ("POST", "PUT", "DELETE"):
        api.add_api_route("/system/functions", change_functions, methods=[method], dependencies=system,
                          tags=["system"], status_code=501, name=f"{method.lower()}_functions")

    @api.get("/system/function/{name}", dependencies=system, tags=["system"])
    async def get_function(name: str) -> Response:
        """One function's status; 404 when this zone has no such function."""
        fn = gw.functions.get(name)
        if fn is None:
            return PlainTextResponse(f"error finding function {name}: not found\n", status_code=404)
        counts = await gw.invocation_counts()
        return JSONResponse(gw.function_status(fn, counts.get(name, 0)))

    @api.post("/system/scale-function/{name}", dependencies=system, tags=["system"], status_code=501)
    async def scale_function(name: str) -> PlainTextResponse:
        """Scaling is fixed at one replica locally (run more gateway workers instead)."""
        return PlainTextResponse("scaling is not supported by the local gateway\n", status_code=501)

    @api.get("/system/dead-letters", dependencies=system, tags=["system"])
    async def dead_letters(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                           cursor: Annotated[str | None, Query(pattern=r"^\d{1,20}-\d{1,20}$")] = None
                           ) -> JSONResponse:
        """MQTT messages this zone's functions refused (kept by the connector before acknowledging), newest first."""
        if gw.dead_letters is None:
            return JSONResponse({"error": "not_started", "message": "the gateway has not started"}, status_code=503)
        try:
            entries, next_cursor = await gw.dead_letters.newest(limit, cursor)
        except Exception as exc:  # Redis down
            return JSONResponse({"error": "backend_unavailable", "message": f"zone Redis: {exc}"}, status_code=503)
        return JSONResponse({"dead_letters": [e.to_dict() for e in entries], "next_cursor": next_cursor})

    @api.get("/system/info", dependencies=system, tags=["system"])
    async def info() -> dict[str, Any]:
        """Provider and version, in the shape of OpenFaaS's /system/info."""
        return {
            "provider": {"provider": "metertwin-local", "orchestration": "process",
                         "version": {"release": VERSION, "sha": ""}},
            "version": {"release": VERSION, "sha": "", "commit_message": ""},
            "arch": platform.machine(),
            "zone": gw.zone,
            "instance": gw.instance,
            "connectors": gw.connector_status(),
        }
