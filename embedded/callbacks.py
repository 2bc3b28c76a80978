"""A loopback HTTP receiver for the demo's async-invocation callbacks (``X-Callback-Url``)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any

from storage.embedded import free_port


@contextlib.contextmanager
def callback_receiver(received: list[dict[str, Any]]) -> Iterator[str]:
    """A one-route HTTP server on loopback that records POSTed callbacks; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            received.append({"status": self.headers.get("X-Function-Status"), "body": body[:200]})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            return

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/callback"
    finally:
        server.shutdown()
        server.server_close()
