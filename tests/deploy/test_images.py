"""The images built from this repository install what the tests ran with.

Every package a Dockerfile pip-installs is either pinned (``name==version``) to the version installed
in this environment, or comes from the pinned ``requirements.txt``: an unpinned ``aiohttp`` in the
VEN bridge's image would be whatever PyPI serves on build day, not the version tested here.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "dr_bridge" / "Dockerfile", *sorted((ROOT / "deploy").glob("Dockerfile.*"))]


def pip_installs(dockerfile: Path) -> list[str]:
    """The requirement arguments of every ``pip install`` (``-r`` files and options left out)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    out: list[str] = []
    for line in text.splitlines():
        m = re.search(r"\bpip3? install\b(.*?)(?:&&|;|$)", line)
        if m is None:
            continue
        words = shlex.split(m.group(1))
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in ("-r", "--requirement", "-c", "--constraint"):
                skip = True
            elif not word.startswith("-"):
                out.append(word)
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pip_install_is_pinned_to_the_tested_version(dockerfile: Path) -> None:
    for requirement in pip_installs(dockerfile):
        name, sep, version = requirement.partition("==")
        assert sep, f"{dockerfile.relative_to(ROOT)}: {requirement!r} is not pinned (name==version)"
        assert importlib.metadata.version(name) == version, \
            f"{dockerfile.relative_to(ROOT)}: {requirement} but the tests ran with {importlib.metadata.version(name)}"


def test_the_parser_sees_unpinned_packages(tmp_path: Path) -> None:
    f = tmp_path / "Dockerfile"
    f.write_text('RUN pip install --no-cache-dir "a==1" b \\\n    -r /app/requirements.txt c==2 && echo x\n')
    assert pip_installs(f) == ["a==1", "b", "c==2"]
