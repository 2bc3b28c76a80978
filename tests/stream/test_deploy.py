"""The stream service's Kubernetes manifest matches the program it runs (the schemas: tests/deploy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metertwin.stream import __main__ as entry
from metertwin.stream.settings import StreamSettings

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "stream" / "stream.yml"


def test_manifest_args_and_environment_are_the_services(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    runs: list[dict[str, object]] = []
    monkeypatch.setattr("uvicorn.run", lambda _app, **kw: runs.append(kw))
    entry.main(container["args"])
    assert runs[0]["port"] == container["ports"][0]["containerPort"]
    assert runs[0]["host"] == "0.0.0.0"
    for var in container["env"]:
        if var["name"].startswith("STREAM_"):
            monkeypatch.setenv(var["name"], var["value"])
    settings = StreamSettings()
    assert settings.heartbeat_s == 15.0
    assert settings.client_queue_max == 2000
    assert docs["Service"]["spec"]["ports"][0]["port"] == runs[0]["port"]
