"""``python -m metertwin_upgrade`` still runs the CLI (now :mod:`metertwin.upgrade.cli`) as a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from storage.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metertwin_upgrade", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def test_python_m_metertwin_upgrade_prints_its_usage() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert "usage: python -m metertwin_upgrade" in done.stdout
    assert "start --to v2 --percent 5 --canary 20 --follow" in done.stdout


def test_python_m_metertwin_upgrade_reports_an_unreachable_manager() -> None:
    done = _run("--gateway", f"http://127.0.0.1:{free_port()}", "--token", "t", "list")
    assert done.returncode == 2
    assert "error: cannot reach" in done.stderr
