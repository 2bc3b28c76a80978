"""``make compare``: run the same workloads against TC, CC and FC-EC on one machine and write a report.

Per architecture (a topology file, :mod:`loadtest.topology`) the driver starts, on loopback:
the hot-store Redis, the Mosquitto broker, one gateway per zone that hosts functions (each
with the functions the topology places there, re-homed from ``stack.yml``), the delay-line
proxy (:mod:`loadtest.proxy`, one process, a listening port per link hop and service), the
simulated meters, and wires every client through the proxy so each request crosses the
links its path needs (:mod:`loadtest.launch`, :mod:`loadtest.wiring`). It then runs the scenarios
(:mod:`loadtest.scenarios`), each a small function taking the running architecture and returning
measured rows (or "not available: <what is missing>"):

* ``probe`` - synthetic: app -> function zone -> hot store (needs only a gateway);
* ``twin`` - seed 000 Scenario 1: app <-> meter through the twin (t1) vs directly (t1');
* ``p2p`` - seed 000 Scenario 2: a P2P negotiation between twins (t2) vs with the meters in every round (t2');
* ``ondemand`` - seed 000 Scenario 3: cache hit (t5), cache miss (t5'), no twin (t5'');
* ``ami`` - seed 001 section 5: households x devices reading plus billing queries, stepped load.

Locust runs in its own process (``locust --headless --json-file``); final counts come from its
JSON. Byte counters come from the proxy. The report (``loadtest/reports/<timestamp>/report.md``,
``results.json`` and PNG plots, :mod:`loadtest.report`) is written from those numbers only
(:mod:`loadtest.results`, the model both use).

``python -m loadtest.compare --quick`` takes about 2 minutes; the full run (seed 001's 1,000 devices,
8K..20K request steps) about 15-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest import report
from loadtest.arch import LOADTEST, CompareError
from loadtest.launch import started_arch
from loadtest.results import ArchResult, RunConfig, ScenarioResult
from loadtest.scenarios import SCENARIOS
from loadtest.topology import Topology, load_topology
from storage.embedded import ServiceError

REPORTS = LOADTEST / "reports"


def run_compare(topologies: list[Topology], cfg: RunConfig, out_dir: Path) -> Path:
    """Run every scenario on every architecture, write the report, return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + cfg.max_run_s
    results: list[ArchResult] = []
    work_root = Path(tempfile.mkdtemp(prefix="metertwin-compare-"))
    try:
        for topo in topologies:
            t0 = time.monotonic()
            scen: dict[str, ScenarioResult] = {}
            with started_arch(topo, cfg, work_root / topo.name) as arch:
                for name in cfg.scenarios:
                    if time.monotonic() > deadline:
                        budget = f"not run: the {cfg.max_run_s:.0f} s budget ran out"
                        scen[name] = ScenarioResult(name, unavailable=budget)
                        continue
                    print(f"[compare] {topo.name}: {name}", flush=True)
                    try:
                        scen[name] = SCENARIOS[name](arch, cfg)
                    except (CompareError, httpx.HTTPError, ServiceError) as exc:
                        scen[name] = ScenarioResult(name, unavailable=f"failed: {exc}")
                    except Exception as exc:  # one broken scenario must not lose the others' results
                        scen[name] = ScenarioResult(name, unavailable=f"failed: {type(exc).__name__}: {exc}")
                notes = list(arch.notes)
                _keep_logs(arch.dir, out_dir / "logs" / topo.name)
            results.append(ArchResult(topo, scen, notes, time.monotonic() - t0))
        return report.write_report(results, cfg, out_dir)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


def _keep_logs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*"):
        if f.is_file() and f.suffix in (".log", ".json", ".yml") and f.name not in ("meters.json",):
            shutil.copy2(f, dst / f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2-minute run (small counts, short steps)")
    parser.add_argument("--topology", action="append", default=[],
                        help="tc, cc, fcec or a YAML path (repeatable; default: tc cc fcec)")
    parser.add_argument("--scenario", action="append", default=[], choices=sorted(SCENARIOS),
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default loadtest/reports/<timestamp>)")
    args = parser.parse_args(argv)
    scenarios = tuple(args.scenario) or RunConfig.scenarios
    cfg = RunConfig.quick_run(scenarios) if args.quick else RunConfig(scenarios=scenarios)
    topologies = [load_topology(t) for t in (args.topology or ["tc", "cc", "fcec"])]
    out = args.out or REPORTS / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = run_compare(topologies, cfg, out)
    print(f"[compare] report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
