"""Architecture topologies for the comparison runs (TC, CC, FC-EC), loaded from YAML and validated.

A topology says which zone hosts each function and store, where meters and apps enter
the system, and the emulated links between the nodes. Format (``loadtest/topologies/*.yml``,
documented in ``docs/compare.md``)::

    name: fcec                       # short id used in reports
    title: "FC-EC: ..."              # one line for humans
    placement:                       # zone of every function and store: edge | fog | cloud
      read: edge
      write: edge
      ingest: edge
      mdms-query: fog
      p2p: edge
      broker: edge                   # the MQTT broker the meters and twins talk through
      hot-store: fog                 # Redis with the twins and recent readings
      cold-store: cloud              # billing history (object store / archive)
    ingress:                         # zone where requests from each outside node enter
      apps: edge
      meters: edge
    links:                           # one-way figures, applied in each direction
      - between: [meters, edge]
        latency_ms: 60
        jitter_ms: 20
        bandwidth_mbps: 54           # optional; omit for unshaped
        reverse_bandwidth_mbps: 54   # optional; the second->first direction if it differs
        source: "seed 000 ..."       # where the figure comes from

Nodes are ``meters``, ``apps`` and the zones ``edge`` (zone-3), ``fog`` (zone-2) and
``cloud`` (zone-1). Zones form the chain edge - fog - cloud; a request entering at zone A
and served in zone B crosses every link of the chain between them (this is how TC's serial
zone-3 -> zone-2 -> zone-1 path is expressed: ingress at edge, everything placed in cloud).
Loading checks that every path the placement needs has its links, and rejects unknown keys
and bad values with an error naming them.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Zone = Literal["edge", "fog", "cloud"]
Node = Literal["meters", "apps", "edge", "fog", "cloud"]
ZONES: tuple[Zone, ...] = ("edge", "fog", "cloud")
#: Zone names in the seeds' numbering.
ZONE_LABEL: dict[str, str] = {"edge": "zone-3 edge", "fog": "zone-2 fog", "cloud": "zone-1 cloud"}
TOPOLOGY_DIR = Path(__file__).resolve().parent / "topologies"


class TopologyError(ValueError):
    """A topology file is missing, unreadable or invalid; the message names the bad key and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Placement(_Strict):
    """Zone of every function and store."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    read: Zone
    write: Zone
    ingest: Zone
    mdms_query: Zone = Field(alias="mdms-query")
    p2p: Zone
    broker: Zone
    hot_store: Zone = Field(alias="hot-store")
    cold_store: Zone = Field(alias="cold-store")

    def zone_of(self, component: str) -> Zone:
        """Zone of ``component`` given by its file name (``mdms-query``) or attribute name."""
        value: Zone = getattr(self, component.replace("-", "_"))
        return value


class Ingress(_Strict):
    """Zone where requests from the outside nodes enter."""

    apps: Zone
    meters: Zone


class Link(_Strict):
    """An emulated link; figures are one-way and apply in each direction."""

    between: tuple[Node, Node]
    latency_ms: Annotated[float, Field(ge=0, le=10_000)]
    jitter_ms: Annotated[float, Field(ge=0, le=10_000)] = 0.0
    bandwidth_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    reverse_bandwidth_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    source: str = ""

    @field_validator("between")
    @classmethod
    def _distinct(cls, value: tuple[str, str]) -> tuple[str, str]:
        if value[0] == value[1]:
            raise ValueError(f"a link joins two different nodes, got {list(value)!r}")
        return value

    @model_validator(mode="after")
    def _jitter_below_latency(self) -> Link:
        if self.jitter_ms > self.latency_ms:
            raise ValueError(
                f"jitter_ms {self.jitter_ms!r} exceeds latency_ms {self.latency_ms!r} "
                f"on link {'-'.join(self.between)} (delays would go negative)"
            )
        return self

    @property
    def name(self) -> str:
        return f"{self.between[0]}-{self.between[1]}"

    def bandwidth_from(self, src: str) -> float | None:
        """Bandwidth (Mbit/s) of the direction leaving ``src``."""
        if src == self.between[0]:
            return self.bandwidth_mbps
        return self.reverse_bandwidth_mbps if self.reverse_bandwidth_mbps is not None else self.bandwidth_mbps


class Topology(_Strict):
    """One architecture: placement, ingress and links."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    title: str
    description: str = ""
    placement: Placement
    ingress: Ingress
    links: Annotated[list[Link], Field(min_length=1)]

    @model_validator(mode="after")
    def _links_cover_paths(self) -> Topology:
        seen: set[frozenset[str]] = set()
        for link in self.links:
            key = frozenset(link.between)
            if key in seen:
                raise ValueError(f"link {link.name!r} is listed twice")
            seen.add(key)
        for hops in self.required_paths().values():
            for a, b in itertools.pairwise(hops):
                if frozenset((a, b)) not in seen:
                    raise ValueError(f"links: no link between {a!r} and {b!r}, needed by path {' -> '.join(hops)}")
        return self

    # --- paths -------------------------------------------------------------------
    def link(self, a: str, b: str) -> Link:
        for link in self.links:
            if set(link.between) == {a, b}:
                return link
        raise TopologyError(f"topology {self.name!r} has no link between {a!r} and {b!r}")

    @staticmethod
    def zone_chain(a: Zone, b: Zone) -> list[Zone]:
        """Zones crossed going from zone ``a`` to zone ``b`` along edge - fog - cloud, both ends included."""
        i, j = ZONES.index(a), ZONES.index(b)
        step = 1 if j >= i else -1
        return [ZONES[k] for k in range(i, j + step, step)]

    def path(self, src: str, dst_component: str) -> list[str]:
        """Nodes crossed from ``src`` (a node: meters/apps/a zone) to the zone hosting ``dst_component``."""
        target = self.placement.zone_of(dst_component)
        if src in ("apps", "meters"):
            entry: Zone = getattr(self.ingress, src)
            return [src, *self.zone_chain(entry, target)]
        return list(self.zone_chain(src, target))  # type: ignore[arg-type]

    def required_paths(self) -> dict[str, list[str]]:
        """Every path the placement uses, keyed ``source->component``."""
        p = self.placement
        paths: dict[str, list[str]] = {}
        for comp in ("read", "write", "mdms-query", "p2p"):
            paths[f"apps->{comp}"] = self.path("apps", comp)
        paths["meters->broker"] = self.path("meters", "broker")
        paths["meters->ingest"] = self.path("meters", "ingest")
        for fn in ("read", "write", "ingest", "p2p", "mdms-query"):
            zone = p.zone_of(fn)
            paths[f"{fn}->hot-store"] = self.path(zone, "hot-store")
            paths[f"{fn}->broker"] = self.path(zone, "broker")
        paths["mdms-query->cold-store"] = self.path(p.mdms_query, "cold-store")
        return paths

    def hops(self, path: list[str]) -> list[Link]:
        return [self.link(a, b) for a, b in itertools.pairwise(path)]

    def one_way_ms(self, path: list[str]) -> float:
        """Sum of the configured one-way latencies along ``path``."""
        return sum(link.latency_ms for link in self.hops(path))


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def parse_topology(data: object, *, origin: str = "<topology>") -> Topology:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, dict):
        raise TopologyError(f"{origin}: a topology is a mapping, got {type(data).__name__}")
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise TopologyError(f"{origin}: {_format_errors(exc)}") from None


def load_topology(name_or_path: str | Path) -> Topology:
    """Load ``tc``/``cc``/``fcec`` from ``loadtest/topologies`` or any YAML file path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = TOPOLOGY_DIR / f"{name_or_path}.yml"
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read topology {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    return parse_topology(data, origin=str(path))


__all__ = [
    "TOPOLOGY_DIR", "ZONES", "ZONE_LABEL", "Ingress", "Link", "Placement", "Topology", "TopologyError",
    "load_topology", "parse_topology",
]
