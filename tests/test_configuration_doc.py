"""docs/configuration.md names every setting: pydantic settings fields (by their variables), secrets, CLI flags
of the gateway, its connectors and the VEN bridge, variables read straight from the environment, and stack.yml's
substitutions. A new setting without a line in the doc fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "configuration.md").read_text()
#: Everything the doc writes as code: `NAME`, `--flag`, `token-signing-key`.
DOCUMENTED = {m.lower() for m in re.findall(r"`([^`]+)`", DOC)} | {
    part.strip().lower() for m in re.findall(r"`([^`]+)`", DOC) for part in re.split(r"[ /,]+", m)}
SOURCE_DIRS = ("metertwin", "gateway", "dr_bridge", "embedded", "functions", "metertwin_upgrade", "storage")
ENV_READ = re.compile(r"""(?:environ\.get|getenv|env\.get|e\.get)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                      r"""|environ\[["']([A-Z][A-Z0-9_]+)["']\]""")


def _settings_classes() -> list[type[BaseSettings]]:
    found: list[type[BaseSettings]] = []
    for path in sorted((ROOT / "metertwin").rglob("settings.py")):
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        found += [v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, BaseSettings) and v is not BaseSettings
                  and v.__module__ == module.__name__]
    return found


def _variables(cls: type[BaseSettings]) -> list[tuple[str, list[str]]]:
    out = []
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        names = [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else []
        if field.annotation is SecretStr or field.annotation == "SecretStr":
            names = [name.replace("_", "-")]
        out.append((f"{cls.__name__}.{name}", names or [name.upper()]))
    return out


SETTINGS = [item for cls in _settings_classes() for item in _variables(cls)]


def test_the_settings_classes_are_all_found() -> None:
    names = {cls.__name__ for cls in _settings_classes()}
    assert {"Settings", "MdmsSettings", "DrSettings"} <= names


@pytest.mark.parametrize(("field", "names"), SETTINGS, ids=[f for f, _ in SETTINGS])
def test_every_settings_field_is_documented(field: str, names: list[str]) -> None:
    assert any(n.lower() in DOCUMENTED for n in names), (
        f"{field} ({' or '.join(names)}) is not in docs/configuration.md")


def _flags(path: str) -> list[str]:
    return re.findall(r"""add_argument\(\s*["'](--[a-z][a-z0-9-]*)["']""", (ROOT / path).read_text())


@pytest.mark.parametrize("path", ["gateway/__main__.py", "gateway/connect.py", "dr_bridge/__main__.py"])
def test_every_flag_is_documented(path: str) -> None:
    flags = _flags(path)
    assert flags
    missing = [f for f in flags if f not in DOCUMENTED]
    assert not missing, f"{path}: flags {missing} are not in docs/configuration.md"


def test_every_variable_read_from_the_environment_is_documented() -> None:
    read: dict[str, str] = {}
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for m in ENV_READ.finditer(path.read_text()):
                read.setdefault(m.group(1) or m.group(2), str(path.relative_to(ROOT)))
    assert {"GATEWAY_URL", "P2P_ZONE_GATEWAYS", "DR_BRIDGE_TOKEN"} <= set(read)
    missing = {k: v for k, v in read.items() if k.lower() not in DOCUMENTED}
    assert not missing, f"variables read but not in docs/configuration.md: {missing}"


def test_every_stack_substitution_and_secret_is_documented() -> None:
    stack = (ROOT / "stack.yml").read_text()
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", stack)) - {"VAR"}
    secrets = {s.strip() for line in re.findall(r"secrets:\s*\[([^\]]*)\]", stack) for s in line.split(",")}
    assert "REGISTRY" in names
    assert "token-signing-key" in secrets
    missing = sorted(n for n in names | secrets if n.lower() not in DOCUMENTED)
    assert not missing, f"stack.yml names {missing}, not in docs/configuration.md"
