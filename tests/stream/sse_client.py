"""A plain-socket SSE client for the stream tests: frames with a deadline, and a mode that never reads."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Frame:
    """One SSE frame: ``id``, ``event`` (empty for a plain event), ``data``; ``comment`` for ``: ...`` lines."""

    id: str = ""
    event: str = ""
    data: str = ""
    comment: str = ""

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSE:
    """``GET /events`` on a raw socket; :meth:`frames` parses what arrives."""

    port: int
    query: str = ""
    token: str | None = None
    last_event_id: str | None = None
    rcvbuf: int | None = None
    status: int = 0
    sock: socket.socket = field(init=False)
    _buf: bytes = b""

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        if self.rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self.sock.settimeout(5.0)
        self.sock.connect(("127.0.0.1", self.port))
        headers = [f"GET /events{'?' + self.query if self.query else ''} HTTP/1.1", "Host: stream",
                   "Accept: text/event-stream"]
        if self.token:
            headers.append(f"Authorization: Bearer {self.token}")
        if self.last_event_id:
            headers.append(f"Last-Event-ID: {self.last_event_id}")
        self.sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())

    def head(self) -> tuple[int, str]:
        """Status and, for a non-stream answer, the body."""
        while b"\r\n\r\n" not in self._buf:
            self._recv()
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        if self.status != 200:
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(self._buf) < length:
                self._recv()
            return self.status, self._buf[:length].decode()
        return self.status, ""

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("stream closed")
        self._buf += chunk

    def _chunked_text(self) -> str:
        """Decode the chunked body received so far (leaving an incomplete chunk buffered)."""
        out, at, buf = [], 0, self._buf
        while True:
            end = buf.find(b"\r\n", at)
            if end < 0:
                break
            size = int(buf[at:end], 16)
            if len(buf) < end + 2 + size + 2:
                break
            out.append(buf[end + 2:end + 2 + size])
            at = end + 2 + size + 2
            if size == 0:
                out.append(b"\x00EOF")
                break
        self._buf = buf[at:]
        return b"".join(out).decode()

    _pending: list[str] = field(default_factory=list)
    _text: str = ""

    def frames(self, n: int, timeout_s: float = 5.0, *, comments: bool = False) -> list[Frame]:
        """The next ``n`` frames (events, or comments too), or fail after ``timeout_s``."""
        if not self.status:
            assert self.head()[0] == 200
        got: list[Frame] = []
        deadline = time.monotonic() + timeout_s
        while True:
            while self._pending and len(got) < n:
                frame = _parse(self._pending.pop(0))
                if comments or not frame.comment:
                    got.append(frame)
            if len(got) >= n:
                return got
            if "\x00EOF" in self._text:
                raise EOFError(f"stream ended after {got[-3:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {n} frames within {timeout_s} s: {got[-3:]}")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self._recv()
            except TimeoutError:
                continue
            parts = (self._text + self._chunked_text()).split("\n\n")
            self._text = parts.pop()
            self._pending.extend(parts)

    def close(self) -> None:
        self.sock.close()


def _parse(raw: str) -> Frame:
    frame = Frame()
    for line in raw.split("\n"):
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "":
            frame.comment = value
        elif key == "id":
            frame.id = value
        elif key == "event":
            frame.event = value
        elif key == "data":
            frame.data = value if not frame.data else frame.data + "\n" + value
    return frame
