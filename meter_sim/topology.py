"""Where simulated meters sit on the grid: regions → substations → feeders → transformers → meters.

A :class:`GridTopology` is read from a JSON file (``--topology FILE``) or generated from a shape
(``--grid 1x2x2x2``: regions x substations per region x feeders per substation x transformers per
feeder). Each feeder has a PV share: that share of its meters (chosen by the seed) are prosumers,
whose PV exports at midday (:class:`meter_sim.profile.LoadModel`). :meth:`GridTopology.assign`
places a fleet's meters on the transformers, in order; each placement gives the registry profile
the twin is provisioned with (``region``, ``substation``, ``feeder``, ``transformer``, ``phase``,
``groups``, ``kind``: ``metertwin.fleet.topology``).

The file::

    {"pv_share": 0.3,
     "regions": [{"name": "north", "groups": ["north-pilot"], "substations": [
       {"name": "SS-1", "feeders": [
         {"name": "F-1", "pv_share": 0.6, "transformers": [
           {"name": "T-1", "meters": 4, "rating_w": 20000, "phase": "A", "groups": ["dr-pilot"]},
           {"name": "T-2"}]}]}]}]}

``pv_share`` (top level: the default; per feeder: its own), ``groups`` (at any level, inherited
downwards), ``meters`` (a transformer's count; the meters left over are spread evenly over the
transformers without a count), ``rating_w`` (a transformer's rating, for the demo's overload rule)
and ``phase`` are optional. Names follow the fleet's name rule (``metertwin.fleet.topology.NAME_RE``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The fleet's name rule, checked here so a bad file fails before any meter is provisioned.
from metertwin.fleet.topology import NAME_RE, NAME_RULE

PHASES = ("A", "B", "C", "AB", "BC", "CA", "ABC")


class TopologyError(ValueError):
    """A topology file or shape that cannot be used; the message names the place and value."""


@dataclass(frozen=True)
class Transformer:
    name: str
    feeder: str
    substation: str
    region: str
    pv_share: float
    meters: int | None = None
    rating_w: float | None = None
    phase: str | None = None
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    """One meter's place on the grid and whether it has PV."""

    meter_id: str
    region: str
    substation: str
    feeder: str
    transformer: str
    prosumer: bool
    phase: str | None = None
    groups: tuple[str, ...] = ()

    def profile(self) -> dict[str, Any]:
        """The registry profile to provision the twin with (its topology, and its kind)."""
        out: dict[str, Any] = {"region": self.region, "substation": self.substation, "feeder": self.feeder,
                               "transformer": self.transformer, "kind": "prosumer" if self.prosumer else "household"}
        if self.phase:
            out["phase"] = self.phase
        if self.groups:
            out["groups"] = list(self.groups)
        return out


@dataclass
class GridTopology:
    """The transformers of a grid tree, in file order, each with its feeder's PV share."""

    transformers: list[Transformer]
    placements: dict[str, Placement] = field(default_factory=dict)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, doc: Any) -> GridTopology:
        if not isinstance(doc, dict) or not isinstance(doc.get("regions"), list) or not doc["regions"]:
            raise TopologyError("topology: needs a non-empty list 'regions'")
        default_pv = _share(doc.get("pv_share", 0.3), "pv_share")
        out: list[Transformer] = []
        seen: dict[str, set[str]] = {"region": set(), "substation": set(), "feeder": set(), "transformer": set()}
        for r_i, region in enumerate(doc["regions"]):
            r_where = f"regions.{r_i}"
            r_name = _name(region, r_where, seen["region"])
            r_groups = _groups(region, r_where)
            for s_i, sub in enumerate(_children(region, "substations", r_where)):
                s_where = f"{r_where}.substations.{s_i}"
                s_name = _name(sub, s_where, seen["substation"])
                s_groups = r_groups + _groups(sub, s_where)
                for f_i, feeder in enumerate(_children(sub, "feeders", s_where)):
                    f_where = f"{s_where}.feeders.{f_i}"
                    f_name = _name(feeder, f_where, seen["feeder"])
                    pv = _share(feeder.get("pv_share", default_pv), f"{f_where}.pv_share")
                    f_groups = s_groups + _groups(feeder, f_where)
                    for t_i, tr in enumerate(_children(feeder, "transformers", f_where)):
                        t_where = f"{f_where}.transformers.{t_i}"
                        out.append(Transformer(
                            name=_name(tr, t_where, seen["transformer"]), feeder=f_name, substation=s_name,
                            region=r_name, pv_share=pv, meters=_count(tr.get("meters"), f"{t_where}.meters"),
                            rating_w=_rating(tr.get("rating_w"), f"{t_where}.rating_w"),
                            phase=_phase(tr.get("phase"), f"{t_where}.phase"),
                            groups=tuple(sorted(set(f_groups + _groups(tr, t_where))))))
        return cls(out)

    @classmethod
    def load(cls, path: Path) -> GridTopology:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TopologyError(f"topology file {str(path)!r}: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def generate(cls, shape: str, *, pv_share: float = 0.3, feeder_pv: dict[str, float] | None = None,
                 rating_w: float | None = None) -> GridTopology:
        """A balanced tree from ``RxSxFxT`` (e.g. ``1x2x2x2``); names ``R1``, ``R1-S1``, ``R1-S1-F1``,
        ``R1-S1-F1-T1``. ``feeder_pv`` overrides the PV share of named feeders."""
        parts = shape.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and 1 <= int(p) <= 10_000 for p in parts):
            raise TopologyError(f"grid shape {shape!r} is not REGIONSxSUBSTATIONSxFEEDERSxTRANSFORMERS "
                                "(each 1..10000), e.g. 1x2x2x2")
        n_r, n_s, n_f, n_t = (int(p) for p in parts)
        overrides = dict(feeder_pv or {})
        regions = []
        for r in range(1, n_r + 1):
            subs = []
            for s in range(1, n_s + 1):
                feeders = []
                for f in range(1, n_f + 1):
                    name = f"R{r}-S{s}-F{f}"
                    feeders.append({"name": name, "pv_share": overrides.pop(name, pv_share),
                                    "transformers": [{"name": f"{name}-T{t}", "rating_w": rating_w}
                                                     for t in range(1, n_t + 1)]})
                subs.append({"name": f"R{r}-S{s}", "feeders": feeders})
            regions.append({"name": f"R{r}", "substations": subs})
        if overrides:
            raise TopologyError(f"feeder PV share for {sorted(overrides)}: no such feeder in grid {shape!r}")
        return cls.from_dict({"pv_share": pv_share, "regions": regions})

    # ---------------------------------------------------------------- placing meters
    def assign(self, meter_ids: Sequence[str], *, seed: int = 1) -> dict[str, Placement]:
        """Place ``meter_ids`` in order: transformers with a count take that many, the rest are spread
        evenly over the transformers without one; per feeder, ``round(pv_share * meters)`` of its meters
        (drawn with ``seed``) are prosumers. Deterministic for the same ids, file and seed."""
        counted = sum(t.meters or 0 for t in self.transformers)
        free = [t for t in self.transformers if t.meters is None]
        left = max(0, len(meter_ids) - counted)
        if left and not free:
            raise TopologyError(f"{len(meter_ids)} meters but the topology's transformers hold {counted}: "
                                "give a transformer no 'meters' count to take the rest")
        share, extra = divmod(left, len(free)) if free else (0, 0)
        by_transformer: list[tuple[Transformer, list[str]]] = []
        pos = 0
        for t in self.transformers:
            if t.meters is not None:
                n = t.meters
            else:
                n, extra = share + (1 if extra > 0 else 0), extra - 1
            by_transformer.append((t, list(meter_ids[pos:pos + n])))
            pos += n
        feeders: dict[str, list[str]] = {}
        shares: dict[str, float] = {}
        for t, ids in by_transformer:
            feeders.setdefault(t.feeder, []).extend(ids)
            shares[t.feeder] = t.pv_share
        pv: set[str] = set()
        for name, ids in feeders.items():
            pv.update(random.Random(f"{seed}:pv:{name}").sample(ids, round(shares[name] * len(ids))))
        self.placements = {
            m: Placement(m, t.region, t.substation, t.feeder, t.name, m in pv, t.phase, t.groups)
            for t, ids in by_transformer for m in ids
        }
        return self.placements

    def prosumers(self) -> set[str]:
        """The placed meters with PV (:meth:`assign` first)."""
        return {m for m, p in self.placements.items() if p.prosumer}

    def meters_of(self, *, feeder: str | None = None, transformer: str | None = None,
                  group: str | None = None) -> list[str]:
        """The placed meters of one feeder, transformer or group, in placement order."""
        return [m for m, p in self.placements.items()
                if (feeder is None or p.feeder == feeder) and (transformer is None or p.transformer == transformer)
                and (group is None or group in p.groups)]

    def transformer(self, name: str) -> Transformer:
        for t in self.transformers:
            if t.name == name:
                return t
        raise TopologyError(f"transformer {name!r} is not in the topology")

    def summary(self) -> str:
        """One line: counts per level and the PV meters per feeder."""
        levels = {lv: len({getattr(t, lv) for t in self.transformers}) for lv in ("region", "substation", "feeder")}
        pv = {f: sum(p.prosumer for p in self.placements.values() if p.feeder == f)
              for f in dict.fromkeys(t.feeder for t in self.transformers)}
        per_feeder = ", ".join(f"{f} {n}/{len(self.meters_of(feeder=f))}" for f, n in pv.items())
        return (f"{levels['region']} regions, {levels['substation']} substations, {levels['feeder']} feeders, "
                f"{len(self.transformers)} transformers, {len(self.placements)} meters; PV per feeder: {per_feeder}")


def parse_feeder_pv(spec: str) -> tuple[str, float]:
    """``NAME=SHARE`` (``--feeder-pv R1-S1-F1=0.6``)."""
    name, sep, value = spec.rpartition("=")
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not sep or not name or not 0.0 <= share <= 1.0:
        raise TopologyError(f"feeder PV {spec!r} is not FEEDER=SHARE with SHARE in [0, 1]")
    return name, share


def _children(node: Any, key: str, where: str) -> list[dict[str, Any]]:
    items = node.get(key)
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise TopologyError(f"topology {where}.{key}: needs a non-empty list of objects (got {items!r})"[:300])
    return items


def _name(node: Any, where: str, seen: set[str]) -> str:
    name = node.get("name") if isinstance(node, dict) else None
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TopologyError(f"topology {where}.name: {name!r} is not a valid name ({NAME_RULE})")
    if name in seen:
        raise TopologyError(f"topology {where}.name: {name!r} appears twice (the topology is a tree)")
    seen.add(name)
    return name


def _groups(node: dict[str, Any], where: str) -> tuple[str, ...]:
    groups = node.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) and NAME_RE.match(g) for g in groups):
        raise TopologyError(f"topology {where}.groups: {groups!r} is not a list of valid names ({NAME_RULE})")
    return tuple(groups)


def _share(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise TopologyError(f"topology {where}: {value!r} is not a share in [0, 1]")
    return float(value)


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TopologyError(f"topology {where}: {value!r} is not a count >= 0")
    return value


def _rating(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e9:
        raise TopologyError(f"topology {where}: {value!r} is not a rating in W (0, 1e9]")
    return float(value)


def _phase(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in PHASES:
        raise TopologyError(f"topology {where}: {value!r} is not one of {list(PHASES)}")
    return str(value)
