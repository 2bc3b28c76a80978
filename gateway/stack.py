"""Read an OpenFaaS ``stack.yml`` the way faas-cli does, and pick one zone's functions.

* ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` are substituted over the raw
  text before YAML parsing (faas-cli runs envsubst first, so substitution works in
  keys, lists and comments alike). An unset ``${VAR}`` without default becomes ``""``.
* Validation is stricter than faas-cli (which ignores unknown keys): every error
  names the file and the key at fault, e.g. ``functions.edge-read.handler``.
* Zones are name prefixes: ``--zone edge`` selects ``edge-*``; ``all`` selects every
  function (the regex ``^edge-`` that ``faas-cli deploy --regex`` would use).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metertwin.core.errors import InvalidInput

#: Kubernetes object names (RFC 1123 labels): lower case alphanumerics and '-', at most 63.
RFC1123_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")
#: The function keys faas-cli knows (openfaas/go-sdk stack/schema.go); others are reported.
KNOWN_FUNCTION_KEYS = frozenset({
    "lang", "handler", "image", "fprocess", "environment", "environment_file", "secrets", "skip_build",
    "constraints", "labels", "annotations", "limits", "requests", "readonly_root_filesystem",
    "build_options", "build_args", "build_secrets", "namespace", "platforms",
})
ALL_ZONES = "all"


class StackError(InvalidInput):
    """stack.yml is malformed; the message names the file and the key."""

    code = "invalid_stack"


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One function of the stack, as the gateway needs it."""

    name: str
    lang: str
    handler_dir: Path
    image: str
    environment: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> tuple[str, ...]:
        """MQTT topic filters from the ``topic`` annotation (comma-separated, like connector-sdk)."""
        raw = self.annotations.get("topic", "")
        return tuple(t.strip() for t in raw.split(",") if t.strip())

    @property
    def schedule(self) -> str | None:
        """The cron expression of the ``schedule`` annotation, if any."""
        value = self.annotations.get("schedule", "").strip()
        return value or None


@dataclass(frozen=True, slots=True)
class Stack:
    path: Path
    gateway: str
    functions: dict[str, FunctionSpec]

    def select(self, zone: str) -> list[FunctionSpec]:
        """The functions of ``zone`` (name prefix ``<zone>-``), or every one for ``all``."""
        if zone == ALL_ZONES:
            chosen = list(self.functions.values())
        else:
            if not RFC1123_RE.match(zone):
                raise StackError(f"zone {zone!r} is not a valid name prefix (lower case letters, digits, '-')")
            chosen = [f for f in self.functions.values() if f.name.startswith(f"{zone}-")]
        if not chosen:
            raise StackError(
                f"{self.path}: no function matches zone {zone!r} (expected names starting with '{zone}-'; "
                f"functions: {sorted(self.functions)})"
            )
        return chosen


def substitute(text: str, env: Mapping[str, str] | None = None) -> str:
    """envsubst as faas-cli applies it: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``."""
    values = os.environ if env is None else env

    def repl(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3)
        value = values.get(name)
        if op == ":-":
            return value if value else default
        if op == "-":
            return value if value is not None else default
        return value or ""

    return _VAR_RE.sub(repl, text)


def load_stack(path: str | Path, env: Mapping[str, str] | None = None) -> Stack:
    """Parse and validate ``path``; raise :class:`StackError` naming the bad key."""
    path = Path(path)
    try:
        raw = path.read_text()
    except OSError as exc:
        raise StackError(f"cannot read stack file {str(path)!r}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(substitute(raw, env))
    except yaml.YAMLError as exc:
        raise StackError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise StackError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    version = str(doc.get("version", "")).strip()
    if version != "1.0":
        raise StackError(f"{path}: version must be '1.0', got {doc.get('version')!r}")
    provider = doc.get("provider")
    if not isinstance(provider, dict):
        raise StackError(f"{path}: provider must be a mapping with name: openfaas")
    if provider.get("name") != "openfaas":
        raise StackError(f"{path}: provider.name must be 'openfaas', got {provider.get('name')!r}")
    functions = doc.get("functions")
    if not isinstance(functions, dict) or not functions:
        raise StackError(f"{path}: functions must be a non-empty mapping")
    specs: dict[str, FunctionSpec] = {}
    for name, body in functions.items():
        spec = _function(path, str(name), body)
        specs[spec.name] = spec
    return Stack(path=path, gateway=str(provider.get("gateway", "")), functions=specs)


def _function(path: Path, name: str, body: Any) -> FunctionSpec:
    where = f"{path}: functions.{name}"
    if not RFC1123_RE.match(name):
        raise StackError(
            f"{where}: function name {name!r} is not RFC 1123 (lower case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    if not isinstance(body, dict):
        raise StackError(f"{where}: expected a mapping, got {type(body).__name__}")
    unknown = sorted(set(body) - KNOWN_FUNCTION_KEYS)
    if unknown:
        raise StackError(f"{where}: unknown key(s) {unknown} (faas-cli would silently ignore them)")
    for key in ("lang", "handler"):
        if not isinstance(body.get(key), str) or not body[key].strip():
            raise StackError(f"{where}.{key} is required (a non-empty string)")
    handler_dir = (path.parent / body["handler"]).resolve()
    if not handler_dir.is_dir():
        raise StackError(f"{where}.handler: folder {body['handler']!r} does not exist (looked in {handler_dir})")
    if not (handler_dir / "handler.py").is_file():
        raise StackError(f"{where}.handler: folder {body['handler']!r} has no handler.py")
    environment: dict[str, str] = {}
    if "environment_file" in body:
        files = body["environment_file"]
        if not isinstance(files, list):
            raise StackError(f"{where}.environment_file must be a list of file names")
        for item in files:
            environment.update(_environment_file(path, where, str(item)))
    environment.update(_str_map(body.get("environment"), f"{where}.environment"))
    secrets = body.get("secrets") or []
    if not isinstance(secrets, list) or not all(isinstance(s, str) and s for s in secrets):
        raise StackError(f"{where}.secrets must be a list of secret names")
    return FunctionSpec(
        name=name,
        lang=body["lang"].strip(),
        handler_dir=handler_dir,
        image=str(body.get("image") or f"local/{handler_dir.name}"),
        environment=environment,
        secrets=tuple(secrets),
        labels=_str_map(body.get("labels"), f"{where}.labels"),
        annotations=_str_map(body.get("annotations"), f"{where}.annotations"),
    )


def _environment_file(path: Path, where: str, name: str) -> dict[str, str]:
    # faas-cli reads these as YAML with an ``environment:`` map (not dotenv).
    file = path.parent / name
    try:
        doc = yaml.safe_load(substitute(file.read_text()))
    except OSError as exc:
        raise StackError(f"{where}.environment_file: cannot read {name!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise StackError(f"{where}.environment_file: {name!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise StackError(f"{where}.environment_file: {name!r} must hold a mapping with an environment: key")
    return _str_map(doc.get("environment"), f"{where}.environment_file[{name}].environment")


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StackError(f"{where} must be a mapping, got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)):
            raise StackError(f"{where}.{key} must be a scalar, got {type(item).__name__}")
        # YAML turns 1 / true into int / bool; faas-cli's map[string]string keeps the text.
        out[str(key)] = "" if item is None else (str(item).lower() if isinstance(item, bool) else str(item))
    return out
