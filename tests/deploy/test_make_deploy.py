"""Issue 12 item 6: `make deploy` without faas-cli says how to install it; the README names REGISTRY and TAG."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_make_deploy_without_faas_cli_says_how_to_install_it(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # A PATH holding make alone: whatever is installed on this machine, faas-cli is not on it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").symlink_to(make)
    out = subprocess.run([str(bin_dir / "make"), "-s", "deploy", "ZONE=edge"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PATH": str(bin_dir)}, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "faas-cli is not installed" in text
    assert "https://cli.openfaas.com" in text
    assert "command not found" not in text


def test_readme_deploy_steps_name_registry_tag_and_make_secrets() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying a zone with faas-cli"):]
    section = section[:section.index("\n## ", 1)]
    assert re.search(r"\bREGISTRY=\S+", section)
    assert re.search(r"\bTAG=\S+", section)
    assert "make secrets ZONE=" in section
    assert "${REGISTRY:-ghcr.io/metertwin}/<function>:${TAG:-0.1.0}" in section
