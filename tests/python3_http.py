"""A stand-in for the OpenFaaS python3-http template's ``index.py`` (Flask), for parity tests.

Matched against the template's own source: openfaas/python-flask-template,
``template/python3-http/index.py`` at commit 344a21a62cff27b6e3b5a835443332350317c8a5 (the
newest stored; its request/response logic is the same as at 686f769b763fd69586feeeb5f33e1290d1453548,
which differs only in the later ``site.addsitedir("/home/app/python")`` line). What it does, and so
what this module does (written anew, not copied):

- Event: ``body`` is ``request.get_data()`` (raw bytes, whatever the content type), ``headers`` the
  request's (case-insensitive), ``method``, ``query`` = ``request.args`` (a MultiDict: ``get`` gives
  the first value), ``path`` = ``request.path`` (percent-decoded). Context: ``hostname`` from
  ``$HOSTNAME``, else ``localhost``.
- Routes ``/`` and ``/<path:path>`` for GET, PUT, POST, PATCH, DELETE. Flask adds HEAD (the handler
  runs, the body is dropped) and OPTIONS (answered by Flask itself: 200, empty, ``Allow``; the
  handler never runs); any other method is Flask's HTML 405.
- Nothing is caught around ``handle``: an exception is Flask's HTML 500 page.
- Answer ``None`` → empty 200 (``text/html``). An answer of exact type ``dict`` → (body, status,
  headers); anything else goes to Flask as it is. ``statusCode`` defaults to 200. Body: missing →
  ``""``; exact type ``dict`` → ``jsonify`` (``application/json``); anything else → ``str(body)``
  sent as ``text/html`` unless the headers say otherwise — so ``bytes`` arrive as ``b'...'`` and a
  ``list`` as its Python repr. There is NO ``application/octet-stream`` pass-through: that is only in
  ``template/python3-http-debian/index.py`` (commit e420a6fbdc800bc95cba982b511677ce2345b057).
  Headers: missing → none; a ``dict`` → its items; anything else is passed to Flask as it is.
- ``python index.py`` imports ``function.handler`` and serves with waitress on 0.0.0.0:5000, behind
  of-watchdog (which owns the container's port). Run as a script, this stand-in serves the
  ``function`` package beside it on 127.0.0.1 and ``$PORT`` (default 5000), so a test can start it
  the way Knative would start a container that listens on ``PORT``.

The image installs the template's ``requirements.txt`` (flask, waitress; the ``tox`` line there only
runs the image's build-time test step) before the function's own: tests/deploy/test_function_envs.py
pins them as :data:`TEMPLATE_REQUIREMENTS`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from flask import Flask, jsonify, request

#: The methods the template's two routes declare (Flask adds HEAD and OPTIONS itself).
METHODS = ["GET", "PUT", "POST", "PATCH", "DELETE"]
#: The template's Python packages, pinned to what a python3-http image built now installs.
TEMPLATE_REQUIREMENTS = ("flask==3.1.3", "waitress==3.0.2")


class Event:
    """Built from the current Flask request, field for field as the template does."""

    def __init__(self) -> None:
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    def __init__(self) -> None:
        self.hostname = os.getenv("HOSTNAME", "localhost")


def import_handler(path: str | Path, module_name: str | None = None) -> ModuleType:
    """Import a ``handler.py`` by file path (a fresh module each time unless the name is taken)."""
    path = Path(path)
    name = module_name or f"_p3http_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _body(answer: dict[str, Any]) -> Any:
    if "body" not in answer:
        return ""
    body = answer["body"]
    # An exact type test, as the template's: a dict subclass is sent as str(), not JSON.
    return jsonify(body) if type(body) is dict else str(body)


def _headers(answer: dict[str, Any]) -> Any:
    if "headers" not in answer:
        return []
    given = answer["headers"]
    return list(given.items()) if type(given) is dict else given


def as_response(answer: Any) -> Any:
    """What the template hands Flask for ``handle``'s return value."""
    if answer is None:
        return "", 200
    if type(answer) is not dict:
        return answer  # Flask makes of it what it can (or raises: an HTML 500)
    return _body(answer), answer.get("statusCode", 200), _headers(answer)


def create_app(handler: ModuleType) -> Flask:
    """A Flask app that serves ``handler.handle`` on every path, as the template does.

    ``testing`` stays off, as in the image, so an exception from ``handle`` gives Flask's HTML 500
    (with a test client too) instead of propagating into the test.
    """
    app = Flask(f"python3-http-{handler.__name__}")

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def call_handler(path: str) -> Any:
        return as_response(handler.handle(Event(), Context()))

    return app


def listen_port(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """``$PORT`` (Knative's contract) when set, else the template's 5000."""
    raw = environ.get("PORT", "").strip()
    if not raw:
        return 5000
    port = int(raw)
    if not 0 < port < 65536:
        raise ValueError(f"PORT {raw!r} is not a TCP port")
    return port


def main() -> None:
    """``python index.py`` in a build folder: serve ``function.handler`` with waitress."""
    from waitress import serve

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from function import handler  # the build folder's package, as the template imports it

    serve(create_app(handler), host="127.0.0.1", port=listen_port(), threads=4)


if __name__ == "__main__":
    main()
