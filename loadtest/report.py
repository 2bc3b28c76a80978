"""The comparison report: Markdown tables, ``results.json`` and PNG plots, from measured numbers only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

from loadtest import capacity
from loadtest.results import ArchResult, Row, RunConfig
from loadtest.topology import ZONE_LABEL

#: Seed 001 section 5 (Figs. 8-10): FC-EC's improvement over CC and TC, percent.
SEED_CLAIMS: dict[str, tuple[float, float]] = {
    "latency": (35.0, 65.0), "traffic": (20.0, 45.0), "traffic to zone-1": (20.0, 45.0),
    "time to respond": (20.0, 35.0),
}
#: A case with more failures than this share is left out of the headline (and named in it).
MAX_FAILURE_SHARE = 0.05
SCENARIO_TITLES = {
    "probe": "Synthetic probe: app -> function zone -> hot store",
    "twin": "(a) Seed 000 Scenario 1: app <-> meter through the twin (t1) vs directly (t1'), RTT/2",
    "p2p": "(b) Seed 000 Scenario 2: P2P negotiation between twins (t2) vs meters in every round (t2')",
    "ondemand": "(c) Seed 000 Scenario 3: on-demand read, cache hit (t5), cache miss (t5'), no twin (t5'')",
    "ami": "(d) Seed 001 section 5: AMI devices reading + billing queries, stepped load",
    "node": "Node throughput: cached reads straight to the read zone's gateway (no app link), flat out",
}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(base: float | None, ours: float | None) -> float | None:
    if base is None or ours is None or base <= 0:
        return None
    return (base - ours) / base * 100.0


def headline_metrics(results: list[ArchResult]) -> tuple[str, dict[str, dict[str, float | None]], list[str]]:
    """Per architecture: latency (p50 of reads), time to respond (mean), traffic (bytes per request, on all
    links and on the links to zone-1). From the AMI workload when it ran, else from the synthetic probe.

    Returns (source, metrics, excluded) where ``excluded`` names cases left out for failing.
    """
    for source in ("ami", "probe"):
        metrics: dict[str, dict[str, float | None]] = {}
        excluded: list[str] = []
        for res in results:
            sc = res.scenarios.get(source)
            if sc is None or sc.unavailable or not sc.rows:
                break
            good = []
            for r in sc.rows:
                if r.requests and r.failures / r.requests > MAX_FAILURE_SHARE:
                    excluded.append(f"{res.topo.name} {r.case} @{r.step or '-'} ({r.failures}/{r.requests} failed)")
                else:
                    good.append(r)
            n = sum(r.requests for r in good)
            if not n:
                break
            reads = [r for r in good if r.case in ("read", "probe")] or good
            n_reads = sum(r.requests for r in reads)
            # Median of the reads, weighted by request count per step.
            p50 = sum((r.p50_ms or 0.0) * r.requests for r in reads) / n_reads if n_reads else None
            mean = sum((r.mean_ms or 0.0) * r.requests for r in good) / n
            # Every row of one run carries the run's link counters: count them once, per request of the run.
            first = sc.rows[0]
            run_n = first.run_requests or first.requests
            wan = sum(sum(d.values()) for link, d in first.bytes_by_link.items() if "cloud" in link.split("-"))
            metrics[res.topo.name] = {"latency": p50, "time to respond": mean, "traffic": first.total_bytes / run_n,
                                      "traffic to zone-1": wan / run_n,
                                      "requests": float(n), "failures": float(sum(r.failures for r in good))}
        else:
            return source, metrics, excluded
    return "none", {}, []


def node_throughput(results: list[ArchResult]) -> float | None:
    """Highest request rate one gateway sustained without failures: from the ``node`` scenario when it ran
    (a saturation run), else the best rate any scenario reached (offered load: a lower bound)."""
    for scenarios in (("node",), None):
        best = 0.0
        for res in results:
            for name, sc in res.scenarios.items():
                if scenarios is not None and name not in scenarios:
                    continue
                for r in sc.rows:
                    if r.requests >= 20 and r.failures == 0:
                        best = max(best, r.rps)
        if best:
            return best
    return None


def _p50(results: ArchResult, scenario: str, case: str) -> float | None:
    sc = results.scenarios.get(scenario)
    for r in (sc.rows if sc else []):
        if r.case == case and r.requests and r.failures / r.requests <= MAX_FAILURE_SHARE:
            return r.p50_ms
    return None


def _seed000_table(results: list[ArchResult]) -> list[str]:
    """Seed 000's three scenarios side by side with its published figures (medians of this run)."""
    if not any(s in r.scenarios for r in results for s in ("twin", "p2p", "ondemand")):
        return []
    out = [
        "## Seed 000 scenarios side by side",
        "",
        "Medians (p50) of this run; t1/t1' are RTT/2. Seed 000 measured a cloud deployment (NB-IoT meters, "
        "comparable to our CC) and an edge deployment (WiFi meters, comparable to FC-EC).",
        "",
        "| architecture | t1 ms | t1' ms | t1 - t1' ms | t2 ms | t2' ms | t2'/t2 | t5 ms | t5' ms | t5'' ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        t1, t1d = _p50(res, "twin", "t1"), _p50(res, "twin", "t1'")
        t2, t2d = _p50(res, "p2p", "t2"), _p50(res, "p2p", "t2'")
        diff = None if t1 is None or t1d is None else t1 - t1d
        ratio = None if not t2 or t2d is None else t2d / t2
        t5s = " | ".join(_fmt(_p50(res, "ondemand", case)) for case in ("t5", "t5'", "t5''"))
        out.append(f"| {res.topo.name} | {_fmt(t1)} | {_fmt(t1d)} | {_fmt(diff)} | {_fmt(t2)} | {_fmt(t2d)} | "
                   f"{_fmt(ratio)} | {t5s} |")
    out += [
        "| *seed 000, cloud* | | | within 10 | 2,400 (100 rounds) | 208,000 | ~87 | < 40 | 800-2,400 | ~ t5' |",
        "| *seed 000, edge* | | | ~0 | 200 (100 rounds) | 17,500 | ~88 | < 280 | < 280 | ~ t5' |",
        "",
        "t2 and t2' cover the number of rounds given in the scenario table below (100 in the full run, as seed 000).",
        "",
    ]
    return out


def _row_table(rows: list[Row]) -> list[str]:
    out = ["| architecture | case | step | requests | failures | p50 ms | p95 ms | p99 ms | mean ms | req/s | "
           "bytes/request |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.arch} | {r.case} | {r.step or '-'} | {r.requests:,} | {r.failures:,} | {_fmt(r.p50_ms)} | "
                   f"{_fmt(r.p95_ms)} | {_fmt(r.p99_ms)} | {_fmt(r.mean_ms)} | {_fmt(r.rps)} | "
                   f"{_fmt(r.bytes_per_request, 0)} |")
    return out


def _bytes_table(results: list[ArchResult], scenario: str) -> list[str]:
    seen: dict[str, dict[str, dict[str, int]]] = {}
    for res in results:
        sc = res.scenarios.get(scenario)
        if sc and sc.rows:
            merged: dict[str, dict[str, int]] = {}
            # Runs of one scenario (cases) have their own counters; add them up once per run.
            runs: dict[int, dict[str, dict[str, int]]] = {id(r.bytes_by_link): r.bytes_by_link for r in sc.rows}
            for counters in runs.values():
                for link, dirs in counters.items():
                    for d, v in dirs.items():
                        merged.setdefault(link, {}).setdefault(d, 0)
                        merged[link][d] += v
            seen[res.topo.name] = merged
    if not seen:
        return []
    out = ["| architecture | link | direction | bytes |", "|---|---|---|---:|"]
    for arch, links in seen.items():
        for link, dirs in sorted(links.items()):
            for d, v in sorted(dirs.items()):
                out.append(f"| {arch} | {link} | {d} | {v:,} |")
    return out


def _plots(results: list[ArchResult], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    names = [r.topo.name for r in results]
    # Latency percentiles per scenario and case.
    for scen in ("probe", "twin", "ondemand", "p2p"):
        groups: list[tuple[str, str, Row]] = []
        for res in results:
            sc = res.scenarios.get(scen)
            for row in (sc.rows if sc else []):
                groups.append((res.topo.name, row.case, row))
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{a}\n{c}" for a, c, _ in groups]
        xs = range(len(groups))
        for i, (q, attr) in enumerate((("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"))):
            ax.bar([x + (i - 1) * 0.27 for x in xs], [getattr(r, attr) or 0 for _, _, r in groups], 0.27, label=q)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(SCENARIO_TITLES[scen], fontsize=9)
        ax.legend()
        fig.tight_layout()
        fname = f"latency-{scen}.png"
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        made.append(fname)
    # Time to respond vs load (AMI steps).
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for res in results:
        sc = res.scenarios.get("ami")
        if not sc or not sc.rows:
            continue
        steps: dict[str, list[Row]] = {}
        for r in sc.rows:
            steps.setdefault(r.step, []).append(r)
        step_labels = list(steps)
        ys = [sum((r.mean_ms or 0) * r.requests for r in rs) / max(1, sum(r.requests for r in rs))
              for rs in steps.values()]
        ax.plot(step_labels, ys, marker="o", label=res.topo.name)
        plotted = True
    if plotted:
        ax.set_xlabel("load step (seed 001 Fig. 10: number of requests)")
        ax.set_ylabel("mean time to respond, ms")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "time-to-respond.png", dpi=100)
        made.append("time-to-respond.png")
    plt.close(fig)
    # Bytes per link (headline source).
    fig, ax = plt.subplots(figsize=(8, 4))
    link_names: list[str] = []
    per_arch: dict[str, dict[str, int]] = {}
    for res in results:
        sc = res.scenarios.get("ami") or res.scenarios.get("probe")
        if not sc or not sc.rows:
            continue
        counters = sc.rows[0].bytes_by_link
        per_arch[res.topo.name] = {link: sum(d.values()) for link, d in counters.items()}
        link_names += [k for k in counters if k not in link_names]
    if per_arch:
        bottom = [0.0] * len(names)
        for link in link_names:
            vals = [per_arch.get(n, {}).get(link, 0) / 1024 for n in names]
            ax.bar(names, vals, bottom=bottom, label=link)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("KiB on emulated links")
        ax.set_title("Traffic per link (AMI workload, or probe)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "bytes-per-link.png", dpi=100)
        made.append("bytes-per-link.png")
    plt.close(fig)
    return made


def write_report(results: list[ArchResult], cfg: RunConfig, out_dir: Path) -> Path:
    """Write ``report.md``, ``results.json`` and the plots into ``out_dir``; return the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source, metrics, excluded = headline_metrics(results)
    lines = [
        "# metertwin architecture comparison: TC vs CC vs FC-EC",
        "",
        f"Generated {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by "
        f"`python -m loadtest.compare{' --quick' if cfg.quick else ''}` on one machine (loopback, links emulated by "
        "`loadtest.proxy`). Every number below was measured in this run (Locust JSON, proxy byte counters).",
        "",
        "## Architectures",
        "",
        "| architecture | read/write/ingest/p2p | mdms-query | broker | hot store | cold store | apps enter at | "
        "app->read one-way ms | meter->broker one-way ms | run s |",
        "|---|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for res in results:
        t = res.topo
        p = t.placement
        fns = "/".join(sorted({p.read, p.write, p.ingest, p.p2p}))
        lines.append(
            f"| **{t.name}** | {fns} | {p.mdms_query} | {p.broker} | {p.hot_store} | {p.cold_store} | "
            f"{ZONE_LABEL[t.ingress.apps]} | {t.one_way_ms(t.path('apps', 'read')):g} | "
            f"{t.one_way_ms(t.path('meters', 'broker')):g} | {res.seconds:.0f} |")
    lines += ["", "Link figures and their sources: `loadtest/topologies/*.yml` and `docs/compare.md`.", ""]

    lines += ["## Headline: FC-EC against CC and TC", ""]
    if metrics and "fcec" in metrics:
        lines += [
            f"Source: the **{source}** scenario. Latency = median response time of the reads; time to respond = "
            "mean response time of all requests (all load steps); traffic = bytes on all emulated links per request; "
            "traffic to zone-1 = bytes per request on the links to the cloud (the WAN/backbone that seed 001's "
            "\"contact with the main services\" loads).",
            "",
            "| metric | " + " | ".join(metrics) + " | FC-EC vs CC | FC-EC vs TC | seed 001 claim |",
            "|---|" + "---:|" * len(metrics) + "---:|---:|---:|",
        ]
        for metric, (lo, hi) in SEED_CLAIMS.items():
            unit = "bytes" if metric.startswith("traffic") else "ms"
            vals = " | ".join(f"{_fmt(m[metric])} {unit}" for m in metrics.values())
            vs_cc = _pct(metrics.get("cc", {}).get(metric), metrics["fcec"][metric])
            vs_tc = _pct(metrics.get("tc", {}).get(metric), metrics["fcec"][metric])
            lines.append(f"| {metric} | {vals} | {_fmt(vs_cc)} % | {_fmt(vs_tc)} % | {lo:g}-{hi:g} % better |")
        lines += ["", "Positive percentages mean FC-EC is better (lower)."]
        if excluded:
            lines.append(f"Left out for failing (> {MAX_FAILURE_SHARE:.0%} failures): " + "; ".join(excluded) + ".")
    else:
        lines.append("Not available: the headline needs the `ami` or `probe` scenario on `fcec` and at least one "
                     "other architecture.")
    lines.append("")

    lines += _seed000_table(results)
    for scen in cfg.scenarios:
        lines += [f"## {SCENARIO_TITLES.get(scen, scen)}", ""]
        rows: list[Row] = []
        for res in results:
            sc = res.scenarios.get(scen)
            if sc is None:
                continue
            if sc.unavailable:
                lines.append(f"- **{res.topo.name}**: {sc.unavailable}")
            rows += sc.rows
        if rows:
            lines += ["", *_row_table(rows), ""]
            bt = _bytes_table(results, scen)
            if bt:
                lines += ["Bytes on each emulated link (all cases of the scenario):", "", *bt, ""]
        lines.append("")

    throughput = node_throughput(results)
    lines += ["## Capacity (seed 003 Tables I-III with our measured throughput)", ""]
    if throughput:
        lines += [
            f"Node throughput: **{throughput:,.0f} req/s**, the highest rate one gateway sustained without failures "
            "in this run (the `node` scenario: one gateway process on a 2-core machine shared with Locust, Redis and "
            "the other engineers' work; a lower bound).",
            "",
            capacity.render(capacity.Traffic(800, 1), dict(list(capacity.SEED_003_WAN_LINKS.items())[:4]),
                            throughput, dict(list(capacity.UK_DSO_REGIONS.items())[:4]), 1000.0),
            f"Full table: `python -m loadtest.capacity --from-report {out_dir / 'results.json'}`.",
        ]
    else:
        lines.append("Not available: no scenario completed without failures.")
    lines.append("")

    notes = [f"- {r.topo.name}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["## Notes", "", *sorted(set(notes)), ""]
    plots = _plots(results, out_dir)
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]

    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps({
        "quick": cfg.quick,
        "config": dataclasses.asdict(cfg),
        "headline_source": source,
        "headline": metrics,
        "headline_excluded": excluded,
        "node_throughput_rps": throughput,
        "architectures": {
            r.topo.name: {
                "seconds": r.seconds, "notes": r.notes,
                "scenarios": {k: {"unavailable": v.unavailable,
                                  "rows": [dataclasses.asdict(x) for x in v.rows]} for k, v in r.scenarios.items()},
            } for r in results
        },
    }, indent=1, default=str))
    return report_path


__all__ = ["SEED_CLAIMS", "headline_metrics", "node_throughput", "write_report"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m loadtest.compare")
