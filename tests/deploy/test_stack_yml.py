"""stack.yml is what operators hand to faas-cli: check it the way faas-cli would read it.

faas-cli silently ignores unknown keys, so a typo would deploy a function without
its setting; these tests catch that, and check every function against the repo.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.stack import load_stack, substitute
from metertwin.core import topics

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "stack.yml"
# openfaas/go-sdk stack/schema.go (see shared FIELD_NOTES): the keys faas-cli reads.
FUNCTION_KEYS = {
    "lang", "handler", "image", "fprocess", "environment", "environment_file", "secrets", "skip_build",
    "constraints", "labels", "annotations", "limits", "requests", "readonly_root_filesystem", "build_options",
    "build_args", "build_secrets", "namespace", "platforms",
}
TOP_KEYS = {"version", "provider", "functions", "configuration", "stackconfig"}
RFC1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def raw_stack() -> dict[str, Any]:
    data = yaml.safe_load(substitute(STACK.read_text(), env={}))
    assert isinstance(data, dict)
    return data


def test_top_level_is_what_faas_cli_reads() -> None:
    data = raw_stack()
    assert set(data) <= TOP_KEYS
    assert str(data["version"]) == "1.0"
    assert data["provider"]["name"] == "openfaas"
    assert "${OPENFAAS_URL:-" in STACK.read_text()
    assert data["configuration"]["templates"][0]["name"] == "python3-http"
    assert data["configuration"]["copy"] == ["./metertwin"]


@pytest.mark.parametrize("name", sorted(raw_stack()["functions"]))
def test_function_entry(name: str) -> None:
    fn = raw_stack()["functions"][name]
    assert RFC1123.match(name), name
    assert name.split("-", 1)[0] in {"edge", "fog", "cloud"}, f"{name} has no zone prefix"
    assert set(fn) <= FUNCTION_KEYS, f"{name}: unknown keys {set(fn) - FUNCTION_KEYS}"
    assert fn["lang"] == "python3-http"
    folder = ROOT / fn["handler"]
    assert (folder / "handler.py").is_file()
    assert (folder / "requirements.txt").is_file()
    for line in (folder / "requirements.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        # pip installs requirements.txt before the folder is copied: no local paths.
        assert not spec.startswith((".", "/", "-e", "file:")), f"{name}: local requirement {spec!r}"
        assert not spec or "==" in spec, f"{name}: requirement {spec!r} is not pinned"
    for value in fn.get("environment", {}).values():
        assert isinstance(value, str), f"{name}: environment values must be strings (got {value!r})"
    for label in fn.get("labels", {}).values():
        assert isinstance(label, str)
    for topic in fn.get("annotations", {}).get("topic", "").split(","):
        if topic:
            assert topic.startswith((topics.ROOT + "/+/up/", topics.CONCENTRATOR_ROOT + "/+/up/")), \
                f"{name}: topic {topic!r} is not a meter or concentrator uplink"


@pytest.mark.parametrize("zone", ["edge", "fog", "cloud"])
def test_each_zone_loads_and_is_selectable_by_prefix(zone: str) -> None:
    stack = load_stack(STACK, env={})
    names = [n for n in stack.functions if n.startswith(f"{zone}-")]
    assert names, f"no {zone}- functions"
