"""The rules of the house (docs/ARCHITECTURE.md), checked over the source tree itself.

* who may import whom: the shared package is copied into every function image, so nothing
  under ``metertwin/`` imports the local platform (gateway, storage, embedded, meter_sim,
  loadtest); ``metertwin.core`` imports no capability; a capability reaches another one only
  through that capability's named interface modules;
* each capability owns its Redis keys: no two capabilities share a key prefix, and every
  key of one meter carries the meter's hash tag (one Redis Cluster slot per meter);
* module sizes: one concept per module (at most ~450 lines), thin handlers (at most 250).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Every subpackage of ``metertwin/`` is a capability, except the plumbing and the integrators' client:
#: found, not listed, so a new capability is under the rules from its first commit.
NOT_CAPABILITIES = ("core", "client")
CAPABILITIES = tuple(sorted(p.name for p in (ROOT / "metertwin").iterdir()
                            if (p / "__init__.py").is_file() and p.name not in NOT_CAPABILITIES))
LOCAL_PLATFORM = ("gateway", "storage", "embedded", "meter_sim", "loadtest", "dr_bridge", "metertwin_upgrade", "tests")

#: The modules through which one capability may use another. Anything else is private to
#: its capability. The twin core is what every capability builds on; the upgrade
#: capability's binding and inbox decide which release of a twin's functions serves a call.
INTERFACES: dict[str, frozenset[str]] = {
    "twin": frozenset({"state", "commands", "messages", "keys", "read_query", "uplink"}),
    "upgrade": frozenset({"binding", "inbox", "operations"}),  # jobs hand an upgrade to the manager
    "mdms": frozenset(),
    "dr": frozenset({"keys", "decisions", "store", "schedule"}),  # fleet search: opt-outs; jobs: set preferences
    "p2p": frozenset(),
    "stream": frozenset({"events"}),
    "fleet": frozenset({"topology", "search", "status"}),  # the twin and ingest paths write the live indexes
    "jobs": frozenset({"service", "spec"}),  # e.g. a rule whose action is a bulk job
    "grid": frozenset({"aggregates"}),  # the MDMS ingest aggregates up the grid tree
}

MAX_MODULE_LINES = 450
MAX_HANDLER_LINES = 250


def _python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """Every absolute module name ``path`` imports (``from a.b import c`` yields ``a.b.c`` and ``a.b``);
    relative imports are resolved against the file's package (``root`` is the tree's top)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:
                package = list(path.relative_to(root).parts[:-1])
                base = package[:len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            if not module:
                continue
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _capability_of(path: Path, root: Path = ROOT) -> str | None:
    rel = path.relative_to(root / "metertwin").parts
    return rel[0] if len(rel) > 1 and rel[0] in (*CAPABILITIES, "core") else None


def _files(root: Path, folder: str) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def local_platform_imports(root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)}:{line} imports {name}"
            for p in _files(root, "metertwin") for line, name in _imports(p, root)
            if name.split(".")[0] in LOCAL_PLATFORM]


def core_capability_imports(root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)}:{line} imports {name}"
            for p in _files(root, "metertwin/core") for line, name in _imports(p, root)
            if name.startswith("metertwin.") and name.split(".")[1] in CAPABILITIES]


def non_interface_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for path in _files(root, "metertwin"):
        own = _capability_of(path, root)
        if own in (None, "core"):
            continue
        for line, name in _imports(path, root):
            parts = name.split(".")
            if parts[0] != "metertwin" or len(parts) < 3 or parts[1] in ("core", own):
                continue
            if parts[1] in CAPABILITIES and parts[2] not in INTERFACES.get(parts[1], frozenset()):
                bad.append(f"{path.relative_to(root)}:{line} imports {name}, not an interface of {parts[1]}")
    return bad


def test_shared_package_imports_nothing_of_the_local_platform() -> None:
    bad = local_platform_imports()
    assert not bad, "\n".join(bad)


def test_core_imports_no_capability() -> None:
    bad = core_capability_imports()
    assert not bad, "\n".join(bad)


def test_capabilities_meet_only_through_named_interfaces() -> None:
    bad = non_interface_imports()
    assert not bad, "\n".join(bad)


def test_every_subpackage_is_core_the_client_or_a_capability() -> None:
    """A capability without an INTERFACES entry has none: another capability may not import it."""
    assert {"twin", "mdms", "dr", "p2p", "upgrade", "stream", "fleet"} <= set(CAPABILITIES)
    assert not set(CAPABILITIES) & set(NOT_CAPABILITIES)


def test_import_rule_checks_can_fail(tmp_path: Path) -> None:
    """Each rule, run over a planted tree, reports exactly the planted violations (relative imports too)."""
    def plant(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    plant("metertwin/__init__.py", "")
    plant("metertwin/core/http.py", "from ..dr import decisions\nimport metertwin.core.errors\n")
    plant("metertwin/dr/store.py", "from gateway import keys\nfrom ..twin import dynsec\n"
                                   "from metertwin.twin import state\nfrom . import wire\n")
    plant("metertwin/twin/state.py", "import storage.embedded\n")
    assert local_platform_imports(tmp_path) == ["metertwin/dr/store.py:1 imports gateway",
                                                "metertwin/dr/store.py:1 imports gateway.keys",
                                                "metertwin/twin/state.py:1 imports storage.embedded"]
    assert core_capability_imports(tmp_path) == ["metertwin/core/http.py:1 imports metertwin.dr",
                                                 "metertwin/core/http.py:1 imports metertwin.dr.decisions"]
    assert non_interface_imports(tmp_path) == [
        "metertwin/dr/store.py:2 imports metertwin.twin.dynsec, not an interface of twin"]


# --- keys --------------------------------------------------------------------------------
KEY_MODULES = {cap: f"metertwin.{cap}.keys" for cap in CAPABILITIES
               if (ROOT / "metertwin" / cap / "keys.py").is_file()} | {"gateway": "gateway.keys"}
SAMPLE_METER = "m-0042"


def _sample_args(fn: object) -> dict[str, object]:
    args: dict[str, object] = {}
    for name, param in inspect.signature(fn).parameters.items():  # type: ignore[arg-type]
        args[name] = 7 if param.annotation in (int, "int") else (SAMPLE_METER if name == "meter_id" else f"<{name}>")
    return args


def _keys_of(module: ModuleType) -> Iterator[tuple[str, str, bool]]:
    """(name, key, per_meter) for every key (function or string constant) a keys module defines."""
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", module.__name__) != module.__name__:
            continue
        if inspect.isfunction(value):
            args = _sample_args(value)
            yield name, value(**args), "meter_id" in args
        elif isinstance(value, str) and value.startswith("mt:"):
            yield name, value, False


def _prefix(key: str) -> str:
    return key.split(":")[1]


def test_no_two_capabilities_share_a_key_prefix() -> None:
    owners: dict[str, set[str]] = {}
    for cap, module_name in KEY_MODULES.items():
        for _name, key, _ in _keys_of(importlib.import_module(module_name)):
            owners.setdefault(_prefix(key), set()).add(cap)
    shared = {prefix: caps for prefix, caps in owners.items() if len(caps) > 1}
    assert not shared, f"key prefixes used by more than one capability: {shared}"
    assert len(owners) >= len(KEY_MODULES)


@pytest.mark.parametrize("cap", sorted(KEY_MODULES))
def test_every_key_of_one_meter_carries_its_hash_tag(cap: str) -> None:
    module = importlib.import_module(KEY_MODULES[cap])
    per_meter = [(name, key) for name, key, meter in _keys_of(module) if meter]
    bad = [f"{name} -> {key}" for name, key in per_meter if re.search(r"\{([^}]*)\}", key) is None
           or re.search(r"\{([^}]*)\}", key).group(1) != SAMPLE_METER]  # type: ignore[union-attr]
    assert not bad, f"{cap}: per-meter keys without the meter's hash tag: {bad}"


# --- sizes -----------------------------------------------------------------------------------
def test_no_module_is_over_the_size_limit() -> None:
    big = []
    for path in _python_files("metertwin", *[f for f in LOCAL_PLATFORM if f != "tests"], "functions", "tests"):
        if ".venv" in path.parts:
            continue
        lines = len(path.read_text().splitlines())
        limit = MAX_HANDLER_LINES if path.parent.parent.name == "functions" and path.name == "handler.py" \
            else MAX_MODULE_LINES
        if lines > limit:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines (limit {limit})")
    assert not big, "split by concept:\n" + "\n".join(big)


def test_script_key_guard_sees_a_meter_outside_its_hash_tag() -> None:
    from tests.script_keys import untagged_mentions

    assert untagged_mentions(["mt:twin:{m-1}", "mt:seen:{m-1}", "mt:twins"]) == []
    assert untagged_mentions(["mt:twin:{m-1}", "mt:seen:m-1"]) == ["mt:seen:m-1"]
    assert untagged_mentions(["mt:p2p:{mk}:market", "mt:p2p:mtrades:{m-1}"]) == []
