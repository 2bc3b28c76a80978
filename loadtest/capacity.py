"""Capacity planner after seed 003 (Tables I-III), with our measured node throughput in place of theirs.

Seed 003 sizes a middleware by dividing link bandwidth by the traffic of one meter
(an ~800-byte event per meter; one per second in Table I, one per minute in Table II)
and a region's traffic by what one subsystem can take (Table III). We add the other
bound the seed leaves out: what one node (a zone gateway with its functions) serves,
measured by ``loadtest.compare``/``make bench`` in requests per second.

* meters per link  = link bit/s x 60 / (message bytes x 8 x messages per meter per minute)
* meters per node  = node requests/s x 60 / (messages per meter per minute x requests per message)
* fog nodes for a region = ceil(region meters / min(meters per node, meters per fog uplink))

Seed 003 is not consistent about "Mbps": Table I divides by 10^6 bit/s, Table II by 2^20
bit/s (100 Mbps -> 983,040 customers); ``--binary-mbit`` reproduces Table II. Table III's
"MBytes per minute" are 2^20 bytes, which we keep. Its subsystem counts imply about
400 k customers (~41 Mbit/s of 800-byte events per minute) per subsystem.

CLI::

    python -m loadtest.capacity --message-bytes 800 --rate-per-min 1 \\
        --link-mbps fibre=100 --link-mbps dsl=8 --node-throughput 2000 [--region "London=1274319" ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MBIT_DECIMAL = 1_000_000
MBIT_BINARY = 1 << 20
MBYTE = 1 << 20

#: Seed 003 Table III: DSO regions of the UK and their number of DR customers.
UK_DSO_REGIONS: dict[str, int] = {
    "East England": 2084080,
    "East Midlands": 1703343,
    "London": 1274319,
    "North Wales, Merseyside and Cheshire": 325692,
    "West Midlands": 547180,
    "North East England": 936528,
    "North West England": 1543985,
    "North Scotland": 4272092,
    "South Scotland": 4272092,
    "South East England": 2081355,
    "Southern England": 6762578,
    "South Wales": 2264911,
    "South West England": 2597361,
    "Yorkshire": 1297427,
}

#: Seed 003 Table II: WAN technologies' download bandwidths (Mbit/s).
SEED_003_WAN_LINKS: dict[str, float] = {
    "fibre-100": 100, "fibre-662": 662, "fibre-2448": 2448, "fibre-1000": 1000,
    "dsl-8": 8, "dsl-12": 12, "dsl-24": 24, "dsl-85": 85, "dsl-200": 200,
    "wimax-128": 128, "wimax-1000": 1000,
    "4g-14.4": 14.4, "4g-84": 84, "4g-326": 326, "4g-1000": 1000,
}


class CapacityError(ValueError):
    """A planner input is out of range; the message names it."""


@dataclass(frozen=True)
class Traffic:
    """What one meter sends."""

    message_bytes: float = 800.0
    rate_per_min: float = 1.0
    requests_per_message: float = 1.0

    def __post_init__(self) -> None:
        for name in ("message_bytes", "rate_per_min", "requests_per_message"):
            value = getattr(self, name)
            if not value > 0:
                raise CapacityError(f"{name} {value!r} must be > 0")

    @property
    def bits_per_s(self) -> float:
        """Average bit rate of one meter."""
        return self.message_bytes * 8 * self.rate_per_min / 60.0


def meters_per_link(link_mbps: float, traffic: Traffic, *, mbit: int = MBIT_DECIMAL) -> int:
    """How many meters fill a link of ``link_mbps`` (seed 003 Tables I-II)."""
    if not link_mbps > 0:
        raise CapacityError(f"link bandwidth {link_mbps!r} Mbit/s must be > 0")
    # Round before flooring: 100 x 2^20 x 60 / 6400 must give 983040, not 983039.
    return math.floor(round(link_mbps * mbit / traffic.bits_per_s, 6))


def meters_per_node(node_rps: float, traffic: Traffic) -> int:
    """How many meters one node serving ``node_rps`` requests/s can take."""
    if not node_rps > 0:
        raise CapacityError(f"node throughput {node_rps!r} req/s must be > 0")
    return math.floor(round(node_rps * 60.0 / (traffic.rate_per_min * traffic.requests_per_message), 6))


def mbytes_per_min(meters: int, traffic: Traffic) -> float:
    """A region's traffic in MBytes (2^20) per minute, as seed 003 Table III counts it."""
    return meters * traffic.message_bytes * traffic.rate_per_min / MBYTE


@dataclass(frozen=True)
class RegionPlan:
    region: str
    meters: int
    mbytes_per_min: float
    nodes_for_throughput: int
    nodes_for_uplink: int

    @property
    def fog_nodes(self) -> int:
        return max(self.nodes_for_throughput, self.nodes_for_uplink)


def plan_region(region: str, meters: int, traffic: Traffic, *, node_rps: float, uplink_mbps: float,
                mbit: int = MBIT_DECIMAL) -> RegionPlan:
    """Fog nodes a region needs: bound by node throughput and by each node's uplink."""
    if meters < 0:
        raise CapacityError(f"region {region!r} has {meters!r} meters; must be >= 0")
    per_node = meters_per_node(node_rps, traffic)
    per_link = meters_per_link(uplink_mbps, traffic, mbit=mbit)
    return RegionPlan(
        region=region, meters=meters, mbytes_per_min=mbytes_per_min(meters, traffic),
        nodes_for_throughput=math.ceil(meters / per_node) if per_node else 0,
        nodes_for_uplink=math.ceil(meters / per_link) if per_link else 0,
    )


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def render(traffic: Traffic, links: dict[str, float], node_rps: float, regions: dict[str, int],
           uplink_mbps: float, *, mbit: int = MBIT_DECIMAL) -> str:
    """The three tables as Markdown."""
    unit = "2^20" if mbit == MBIT_BINARY else "10^6"
    out = [
        f"Traffic per meter: {traffic.message_bytes:g} bytes x {traffic.rate_per_min:g}/min "
        f"x {traffic.requests_per_message:g} request(s) per message = {traffic.bits_per_s:.2f} bit/s; "
        f"1 Mbit = {unit} bit.",
        "",
        "### Meters per link (seed 003 Tables I-II)",
        "",
        "| link | Mbit/s | meters per link |",
        "|---|---:|---:|",
    ]
    for name, mbps in links.items():
        out.append(f"| {name} | {mbps:g} | {_fmt_int(meters_per_link(mbps, traffic, mbit=mbit))} |")
    out += [
        "",
        "### Meters per node (measured throughput)",
        "",
        "| node throughput (req/s) | meters per node | fog uplink Mbit/s | meters per uplink | meters per fog node |",
        "|---:|---:|---:|---:|---:|",
    ]
    per_node = meters_per_node(node_rps, traffic)
    per_uplink = meters_per_link(uplink_mbps, traffic, mbit=mbit)
    out.append(f"| {node_rps:g} | {_fmt_int(per_node)} | {uplink_mbps:g} | {_fmt_int(per_uplink)} | "
               f"{_fmt_int(min(per_node, per_uplink))} |")
    out += [
        "",
        "### Fog nodes per region (seed 003 Table III)",
        "",
        "| region | meters | MBytes/min | nodes (throughput) | nodes (uplink) | fog nodes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total_m = 0
    total_nodes = 0
    for region, meters in regions.items():
        p = plan_region(region, meters, traffic, node_rps=node_rps, uplink_mbps=uplink_mbps, mbit=mbit)
        total_m += meters
        total_nodes += p.fog_nodes
        out.append(f"| {region} | {_fmt_int(meters)} | {p.mbytes_per_min:.2f} | {p.nodes_for_throughput} | "
                   f"{p.nodes_for_uplink} | {p.fog_nodes} |")
    out.append(f"| **total** | {_fmt_int(total_m)} | {mbytes_per_min(total_m, traffic):.2f} | | | {total_nodes} |")
    return "\n".join(out) + "\n"


def _parse_named(values: Sequence[str], what: str) -> dict[str, float]:
    parsed: dict[str, float] = {}
    for i, raw in enumerate(values):
        name, sep, num = raw.rpartition("=")
        if not sep:
            name, num = f"link-{i + 1}", raw
        try:
            parsed[name] = float(num)
        except ValueError:
            raise CapacityError(f"{what} {raw!r} is not NAME=NUMBER or NUMBER") from None
    return parsed


def throughput_from_report(path: Path) -> float:
    """Peak measured requests/s of one node, from a ``loadtest.compare`` ``results.json``."""
    data = json.loads(path.read_text())
    value = data.get("node_throughput_rps")
    if not isinstance(value, int | float) or value <= 0:
        raise CapacityError(f"{path} has no positive node_throughput_rps (got {value!r})")
    return float(value)


EXAMPLES = """examples:
  python -m loadtest.capacity --node-throughput 4000
      meters per node and per seed 003 WAN link, and the UK DSO regions, for a gateway measured at 4,000 req/s
  python -m loadtest.capacity --from-report loadtest/reports/<run>/results.json --link-mbps dsl=8 --region north=2500000
      the node figure from a `make compare` run, one 8 Mbit/s link and one region of 2.5 M meters"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--message-bytes", type=float, default=800.0)
    parser.add_argument("--rate-per-min", type=float, default=1.0, help="messages per meter per minute")
    parser.add_argument("--requests-per-message", type=float, default=1.0,
                        help="node requests each message costs (ingest + reads)")
    parser.add_argument("--link-mbps", action="append", default=[], metavar="[NAME=]MBPS",
                        help="a link to size (repeatable); default: seed 003 Table II's WAN links")
    parser.add_argument("--node-throughput", type=float, default=None, metavar="REQ_PER_S",
                        help="measured requests/s of one node (a zone gateway)")
    parser.add_argument("--from-report", type=Path, default=None,
                        help="take --node-throughput from a compare run's results.json")
    parser.add_argument("--fog-uplink-mbps", type=float, default=1000.0, help="each fog node's WAN uplink")
    parser.add_argument("--region", action="append", default=[], metavar="NAME=METERS",
                        help="a region to plan (repeatable); default: seed 003 Table III's UK DSO regions")
    parser.add_argument("--binary-mbit", action="store_true", help="1 Mbit = 2^20 bit (seed 003 Table II)")
    given = sys.argv[1:] if argv is None else argv
    if not given:
        # Nothing to plan for yet: say how to call it (not an error).
        print(parser.format_help())
        return 0
    args = parser.parse_args(given)
    try:
        if args.from_report is not None:
            node_rps = throughput_from_report(args.from_report)
        elif args.node_throughput is not None:
            node_rps = args.node_throughput
        else:
            parser.error("give --node-throughput REQ_PER_S or --from-report results.json, e.g. "
                         "python -m loadtest.capacity --node-throughput 4000")
        traffic = Traffic(args.message_bytes, args.rate_per_min, args.requests_per_message)
        links = _parse_named(args.link_mbps, "--link-mbps") or dict(SEED_003_WAN_LINKS)
        regions = {k: int(v) for k, v in _parse_named(args.region, "--region").items()} or dict(UK_DSO_REGIONS)
        print(render(traffic, links, node_rps, regions, args.fog_uplink_mbps,
                     mbit=MBIT_BINARY if args.binary_mbit else MBIT_DECIMAL), end="")
    except CapacityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
