"""A copy of stack.yml for local runs of the upgrade tests and benchmark.

stack.yml itself declares the versioned functions (``edge-read-v2``, ``edge-ingest-v2``) and
``edge-upgrade-manager`` (see docs/upgrade.md); :func:`write_stack` keeps a subset of its
functions, with handlers as absolute paths, so that the copy may live anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "stack.yml"

def write_stack(dst: Path, *, base: Path = STACK, schedule: str | None = None, zones: tuple[str, ...] = ("edge",),
                functions: tuple[str, ...] | None = None) -> Path:
    """Write the stack with the entries to ``dst`` (handlers made absolute so it may live anywhere).

    ``schedule`` replaces the manager's cron (e.g. ``*/1 * * * * *`` locally); ``zones`` and
    ``functions`` keep only those functions (a lighter gateway for tests).
    """
    doc: dict[str, Any] = yaml.safe_load(base.read_text())
    kept = {}
    for name, fn in doc["functions"].items():
        if not any(name.startswith(f"{z}-") for z in zones):
            continue
        if functions is not None and name not in functions:
            continue
        fn["handler"] = str((base.parent / fn["handler"]).resolve())
        kept[name] = fn
    if schedule is not None and "edge-upgrade-manager" in kept:
        kept["edge-upgrade-manager"]["annotations"]["schedule"] = schedule
    doc["functions"] = kept
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst
