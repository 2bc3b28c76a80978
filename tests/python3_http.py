"""A stand-in for the OpenFaaS python3-http template's ``index.py`` (Flask), for parity tests.

It keeps to the template's contract: the event carries ``body`` (raw bytes),
``headers``, ``method``, ``query`` (the parsed query string) and ``path`` (what the
watchdog forwards: the part after ``/function/<name>``); the context carries
``hostname``. A ``None`` answer is an empty 200; ``statusCode`` defaults to 200; a
``dict`` body goes out through ``jsonify``, an ``application/octet-stream`` body as
is, anything else as ``str(body)``; ``headers`` are added to the response.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from flask import Flask, jsonify, request

METHODS = ["GET", "PUT", "POST", "PATCH", "DELETE"]


class Event:
    """Built from the current Flask request."""

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


def _as_response(answer: Any) -> Any:
    if answer is None:
        return "", 200
    status = answer.get("statusCode", 200)
    given = answer.get("headers", [])
    content_type = given.get("Content-type", "") if isinstance(given, dict) else ""
    if "body" not in answer:
        body: Any = ""
    elif content_type == "application/octet-stream":
        body = answer["body"]
    elif isinstance(answer["body"], dict):
        body = jsonify(answer["body"])
    else:
        body = str(answer["body"])
    headers = list(given.items()) if isinstance(given, dict) else given
    return body, status, headers


def create_app(handler: ModuleType) -> Flask:
    """A Flask app that serves ``handler.handle`` on every path, as the template does."""
    app = Flask(f"python3-http-{handler.__name__}")

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def call_handler(path: str) -> Any:
        return _as_response(handler.handle(Event(), Context()))

    return app
