"""The demo's grid steps (issue 13): the fleet on a grid tree, a feeder's load, an overloaded transformer's
alert and the job its rule starts, a job on one feeder's meters, and the OpenADR group the topology made.

:func:`demo_grid` is the topology ``make demo`` provisions its twins with (:mod:`meter_sim.topology`);
:class:`GridSteps` runs on a :class:`embedded.demo.Demo` (its client, fleet, tally and ``wait``). Every
call goes through :mod:`metertwin.client` (``Grid``, ``Jobs``, ``Fleet``).
"""

from __future__ import annotations

import math
import time
from typing import Any

from meter_sim.topology import GridTopology
from metertwin.client import ApiError

#: The feeder whose load the demo shows (half its meters have PV), and the one its job commands.
SUNNY, HILL = "F-Harbour", "F-Hill"
#: The transformer the demo overloads (EV chargers on its meters), and its rating.
OVERLOADED, RATING_W = "T-Harbour-2", 12_000.0
#: The OpenADR group the topology puts the hill feeder's meters in.
DR_GROUP = "dr-pilot"
EV_CHARGER_W = 7_400.0


def demo_grid() -> GridTopology:
    """One region, one substation, two feeders of two transformers each (meters spread evenly)."""
    return GridTopology.from_dict({"regions": [{"name": "North", "substations": [{"name": "SS-North", "feeders": [
        {"name": SUNNY, "pv_share": 0.5, "transformers": [
            {"name": "T-Harbour-1", "rating_w": RATING_W, "phase": "A"},
            {"name": OVERLOADED, "rating_w": RATING_W, "phase": "B"}]},
        {"name": HILL, "pv_share": 0.1, "groups": [DR_GROUP], "transformers": [
            {"name": "T-Hill-1", "rating_w": RATING_W, "phase": "C"},
            {"name": "T-Hill-2", "rating_w": RATING_W, "phase": "A"}]}]}]}]})


def await_places(grid: Any, meters: list[str], timeout_s: float = 30.0) -> None:
    """Wait until fog-grid holds every meter's place (copied from the edge topology on its cron tick), so
    the history back-loaded next is aggregated up the tree too."""
    deadline = time.monotonic() + timeout_s
    pending = list(meters)
    while pending:
        pending = [m for m in pending if not (grid.place(m).get("place") or {}).get("transformer")]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"fog-grid has no place for {pending[:5]} after {timeout_s} s")
        if pending:
            time.sleep(0.2)


class GridSteps:
    """The grid part of the scenario, on a running :class:`embedded.demo.Demo`."""

    def __init__(self, demo: Any, grid: GridTopology) -> None:
        self.demo, self.topology = demo, grid
        self.api = demo.api

    def feeder_load(self) -> None:
        """fog-grid's aggregates of one feeder: now (GET /feeders/{id}) and per 15 min (GET .../load)."""
        grid, meters = self.api.grid, self.topology.meters_of(feeder=SUNNY)
        found = self.demo.call("fleet (search by feeder)", lambda: self.api.fleet.search(feeder=SUNNY),
                               outcome=lambda r: f"{r['count']} twins")

        def reporting() -> bool:
            try:
                return int(grid.feeder(SUNNY)["reporting"]) >= len(meters)
            except ApiError:  # the node appears with its first drained reading (404 before)
                return False

        self.demo.wait(f"feeder {SUNNY}'s aggregates to count its {len(meters)} meters", reporting, 30)
        now = self.demo.call("grid (feeder now)", lambda: grid.feeder(SUNNY),
                             outcome=lambda r: "import>0" if r["import_w"] > 0 else "import=0")
        t = time.time()
        load = self.demo.call("grid (feeder load)",
                              lambda: grid.feeder_load(SUNNY, start=int(t - 6 * 3600), end=int(t), interval="15m"),
                              outcome=lambda r: f"{len(r['rows'])} intervals")
        rows = [r for r in load["rows"] if r.get("readings")]
        kwh = sum(r["import_kwh"] for r in rows)
        pv = sum(self.topology.placements[m].prosumer for m in meters)
        self.demo.tally.notes.append(
            f"grid: feeder {SUNNY} ({found['count']} twins found by the fleet search, {pv} with PV): now "
            f"import {now['import_w']:.0f} W, export {now['export_w']:.0f} W, {now['reporting']} reporting, "
            f"voltage {now['voltage_min_v']}-{now['voltage_max_v']} V; last 6 h in {len(rows)} 15-min "
            f"intervals: {kwh:.2f} kWh imported")

    def overload(self) -> None:
        """A rule on every transformer's rating; EV chargers drive one over it; the alert opens and the
        rule's job (through edge-jobs) limits that transformer's meters."""
        grid = self.api.grid
        ratings = {t.name: t.rating_w for t in self.topology.transformers if t.rating_w}
        limit_job = {"target": {"filter": {"transformer": OVERLOADED}},
                     "action": {"type": "command", "kind": "load_limit", "params": {"watts": 4000}},
                     "rollout": {"rate_per_s": 50, "timeout_s": 60}}
        rule = self.demo.call("grid (create rule)", lambda: grid.create_rule({
            "name": "transformer over its rating", "level": "transformer", "metric": "import_w",
            "condition": "above", "threshold": max(ratings.values()), "thresholds": ratings, "hysteresis": 2000,
            "for_s": 2, "severity": "critical", "actions": [{"type": "alert"}, {"type": "job", "job": limit_job}]}),
            outcome=lambda r: "201")
        victims = self.topology.meters_of(transformer=OVERLOADED)
        if not victims:
            raise RuntimeError(f"no meter on {OVERLOADED} to overload it (run the demo with more meters)")
        # Enough chargers for the rating whatever the fleet size: one per meter in a large demo, more
        # on each meter of a small one (the sum must pass the rating with a margin).
        chargers = math.ceil((RATING_W + 1_000) / (EV_CHARGER_W * len(victims)))
        for meter in victims:
            self.demo.fleet.add_load(meter, EV_CHARGER_W * chargers)
        t0 = time.perf_counter()
        # The aggregate follows the meters' readings within a cron tick or two (fog-grid every 2 s).
        self.demo.wait(f"{OVERLOADED}'s aggregate import to pass its rating",
                       lambda: grid.transformer(OVERLOADED)["import_w"] > RATING_W, 30)
        self.demo.tally.record("grid (load follows EVs)", "import>rating", (time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        found: dict[str, Any] = {}

        def fired() -> bool:
            alerts = grid.alerts(rule_id=rule["id"], subject=OVERLOADED)["alerts"]
            found.update(alerts[0] if alerts else {})
            return any(a.get("type") == "job" for a in found.get("actions") or [])

        self.demo.wait(f"the overload alert on {OVERLOADED} and its job", fired, 45)
        self.demo.tally.record("grid (overload -> alert)", f"alert {found['status']}",
                               (time.perf_counter() - t0) * 1000)
        for meter in victims:
            self.demo.fleet.add_load(meter, 0)
        [action] = [a for a in found["actions"] if a["type"] == "job"]
        if action["status"] != "sent":
            raise RuntimeError(f"the rule's job action was not sent: {action}")
        job_id = action["detail"].removeprefix("job ")
        job = self.finished(job_id)
        self.demo.tally.notes.append(
            f"grid: {len(victims) * chargers} EV chargers ({EV_CHARGER_W:.0f} W each) on {OVERLOADED} "
            f"(rating {RATING_W:.0f} W):"
            f" alert {found['status']} at {found['value']:.0f} W (rule '{rule['name']}', {found['severity']}); "
            f"its job {job_id} limited the transformer's meters to 4 kW: {self.counts(job)}")

    def feeder_job(self) -> None:
        """A job sending a command to one feeder's meters (a fleet-search filter), to its final counts."""
        jobs = self.api.jobs
        made = self.demo.call("jobs (create, feeder filter)", lambda: jobs.create(
            {"filter": {"feeder": HILL}},
            {"type": "command", "kind": "tariff", "params": {"tariff_id": "hill-tou-2027"}},
            {"rate_per_s": 20, "max_in_flight": 50, "timeout_s": 60}, description=f"new tariff on {HILL}"),
            outcome=lambda r: r["state"])
        job = self.finished(made["id"])
        self.demo.tally.notes.append(f"jobs: tariff command to feeder {HILL}'s meters, job {made['id']} "
                                     f"{job['state']}: {self.counts(job)}")

    def finished(self, job_id: str) -> dict[str, Any]:
        jobs, got = self.api.jobs, {}

        def done() -> bool:
            got.update(jobs.get(job_id))
            return got["state"] in ("completed", "cancelled", "aborted")

        self.demo.wait(f"job {job_id} to finish", done, 60)
        p = got["progress"]
        self.demo.tally.record("jobs (final counts)", f"{got['state']} {p['succeeded']}/{p['total']} succeeded", 0.0)
        return got

    @staticmethod
    def counts(job: dict[str, Any]) -> str:
        p = job["progress"]
        return (f"{p['succeeded']}/{p['total']} succeeded, failed {p['failed']}, rejected {p['rejected']}, "
                f"timed_out {p['timed_out']}, cancelled {p['cancelled']}")

    def dr_note(self, summary: dict[str, Any]) -> str:
        """Which twins opted in to the event targeted at :data:`DR_GROUP`, and whether they are its members."""
        members = set(self.topology.meters_of(group=DR_GROUP))
        opted_in = sorted(m for m, v in summary["per_meter"].items() if v.get("opt") == "optIn")
        exact = "exactly the group's members" if set(opted_in) == members else f"group members: {sorted(members)}"
        return (f"dr by group: event targeted at group '{DR_GROUP}' (feeder {HILL}); opted in: "
                f"{', '.join(opted_in)} ({exact}); {summary['opt_out']} others opted out (not targeted)")
