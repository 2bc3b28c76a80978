"""The client's HTTP core: one pooled httpx client per zone gateway, a bearer token, retries, pagination.

Retries: a 429 or 503 answer (and, for idempotent methods, a connection that could not be
made) is retried up to ``retries`` times, waiting what ``Retry-After`` asks (seconds or an
HTTP date, capped at ``max_backoff_s``), else an exponential back-off with jitter. Both
mean the call was not processed, so POSTs are retried too.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import httpx

from metertwin.client.errors import ApiError, Unavailable, error_of

RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: Query values: numbers, booleans (sent as true/false), text, datetimes (sent as ISO 8601).
QueryValue = str | int | float | bool | datetime | None
FnT = TypeVar("FnT", bound=Callable[..., Any])


def route(method: str, template: str) -> Callable[[FnT], FnT]:
    """Mark a client method as the one covering ``method template`` of its function (checked by the tests)."""

    def mark(fn: FnT) -> FnT:
        fn.__route__ = (method, template)  # type: ignore[attr-defined]
        return fn

    return mark


def _query(params: Mapping[str, QueryValue] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (params or {}).items():
        if v is None:
            continue
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, datetime):
            out[k] = v.isoformat()
        else:
            out[k] = str(v)
    return out


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), ``None`` if absent or unreadable."""
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class Transport:
    """Calls to the functions of one zone's gateway (``/function/<name><path>``)."""

    base_url: str
    token: str | None = None
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    http: httpx.Client | None = None
    sleep: Callable[[float], None] = time.sleep
    _owned: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.http is None:
            self.http = httpx.Client(timeout=httpx.Timeout(self.timeout_s))
            self._owned = True

    def close(self) -> None:
        if self._owned and self.http is not None:
            self.http.close()

    def with_token(self, token: str | None) -> Transport:
        """The same gateway and connection pool, another token."""
        return Transport(self.base_url, token, self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s,
                         self.http, self.sleep)

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        asked = retry_after_s(response) if response is not None else None
        if asked is not None:
            return float(min(asked, self.max_backoff_s))
        return float(min(self.backoff_s * 2**attempt * (0.5 + random.random()), self.max_backoff_s))

    def send(
        self, method: str, url_path: str, *, params: Mapping[str, QueryValue] | None = None, json: Any = None,
        headers: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None, content: bytes | None = None,
    ) -> httpx.Response:
        """One call with retries; returns the response if its status is below 400, raises otherwise."""
        assert self.http is not None
        hdrs = dict(headers or {})
        if self.token and auth is None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        url = f"{self.base_url}{url_path}"
        attempt = 0
        while True:
            try:
                resp = self.http.request(method, url, params=_query(params), json=json, headers=hdrs, auth=auth,
                                         content=content)
            except httpx.TransportError as exc:
                if method.upper() in IDEMPOTENT and attempt < self.retries:
                    self.sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise Unavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                self.sleep(self._delay(attempt, resp))
                attempt += 1
                continue
            if resp.status_code >= 400:
                raise error_of(resp)
            return resp

    def call(
        self, function: str, method: str, path: str, *, params: Mapping[str, QueryValue] | None = None,
        json: Any = None, headers: Mapping[str, str] | None = None, text: bool = False, content: bytes | None = None,
    ) -> Any:
        """Call ``path`` of ``function``; the decoded JSON body (or the text, with ``text=True``)."""
        resp = self.send(method, f"/function/{function}{path}", params=params, json=json, headers=headers,
                         content=content)
        if text:
            return resp.text
        try:
            return resp.json()
        except ValueError:
            raise ApiError(f"{method} {function}{path} answered {resp.status_code} with a body that is not JSON: "
                           f"{resp.text[:200]!r}", status=resp.status_code, response=resp) from None


def paginate(fetch: Callable[[str | None], dict[str, Any]], items: str, *, cursor_key: str = "next_cursor",
             ) -> Iterator[Any]:
    """Every item of a cursor route: ``fetch(cursor)`` gets one page, ``items`` names its list."""
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        yield from page.get(items) or []
        nxt = page.get(cursor_key)
        if not nxt or str(nxt) == "0":
            return
        cursor = str(nxt)


@dataclass
class Api:
    """Base of a client for one function: its name and the zone transport that reaches it."""

    transport: Transport
    function: str = ""

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.transport.call(self.function, method, path, **kwargs)
