"""What the operator CLIs (``python -m metertwin.jobs``, ``python -m metertwin.upgrade``) share: the
error that ends them with an exit code, and one function's routes called through a gateway."""

from __future__ import annotations

from typing import Any

import httpx


class CliError(Exception):
    """Ends a CLI: ``message`` on stderr, exit ``code`` (2: usage or an unreachable gateway)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class FunctionClient:
    """``/function/<zone>-<name>`` on a gateway, with a bearer token; answers as dicts, errors as :class:`CliError`."""

    def __init__(self, gateway: str, zone: str, name: str, token: str, timeout_s: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        self.base = f"{gateway.rstrip('/')}/function/{zone}-{name}"
        self.http = http or httpx.Client(timeout=timeout_s)
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            resp = self.http.request(method, self.base + path, json=body, params=params, headers=self.headers)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {self.base}: {exc}", 2) from exc
        try:
            data = resp.json()
        except ValueError:
            raise CliError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:300]}") from None
        if resp.status_code >= 400:
            raise CliError(f"{method} {path}: {data.get('message', resp.text[:300])}")
        return dict(data)
