"""Locust HTTP scenarios for ``loadtest.compare`` (run by it as a subprocess; never imported elsewhere).

Configured by the JSON file named in ``MT_LOCUST_CONFIG`` (written by the driver)::

    {"scenario": "probe" | "twin" | "ami", "headers": {...}, "max_requests": N, ...}

* ``probe``: ``GET {probe_url}/probe?ops=..`` (synthetic: app -> function zone -> hot store).
* ``twin``: one request kind per run, named after the seed-000 delay it measures:
  ``t1`` / ``t5'`` (live read through the twin: app -> twin -> meter -> twin -> app),
  ``t5`` (cache hit), ``no-twin-probe`` (the twin answers 404 for an unknown meter).
* ``ami``: seed 001's AMI workload: consumers' devices reading through their twins plus
  billing queries, in load steps (``steps``: request budget and duration of each); every
  request is named ``<kind> @<step>`` so the report gets time to respond per step.

Every user stops when the run's request budget (``max_requests``) is spent; Locust's
``--run-time`` bounds the time. Only loopback URLs are accepted.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task
from locust.exception import StopUser

CFG: dict[str, Any] = json.loads(Path(os.environ["MT_LOCUST_CONFIG"]).read_text())
for _key, _url in CFG.items():
    if _key.endswith("_url") and urlparse(str(_url)).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"{_key} {_url!r} is not a loopback URL")

_budget = itertools.count()
_MAX = int(CFG.get("max_requests", 1000))
_rng = random.Random(CFG.get("seed", 1))
#: Current AMI step label, set by the shape (same process: local runner).
_step = {"label": str(CFG.get("steps", [{"label": "-"}])[0]["label"]) if CFG.get("steps") else "-"}


def _spend() -> None:
    if next(_budget) >= _MAX:
        raise StopUser()


def _quit_when_spent(environment: Any) -> None:
    import gevent

    def watch() -> None:
        while True:
            gevent.sleep(0.1)
            if environment.runner is None:
                return
            stats = environment.runner.stats.total
            if stats.num_requests >= _MAX:
                environment.runner.quit()
                return

    gevent.spawn(watch)


def _on_start(environment: Any, **_: Any) -> None:
    _quit_when_spent(environment)


events.test_start.add_listener(_on_start)  # type: ignore[no-untyped-call]
_failures_logged = itertools.count()


def _log_failure(name: str = "", exception: Exception | None = None, response: Any = None, **_: Any) -> None:
    # The first few failures go to the log, with the answer's body, so failure counts can be explained.
    if exception is not None and next(_failures_logged) < 10:
        body = getattr(response, "text", None) or ""
        print(f"failure: {name}: {exception!r} {body[:300]}"[:500], flush=True)


events.request.add_listener(_log_failure)  # type: ignore[no-untyped-call]


class _Base(FastHttpUser):
    abstract = True
    host = "http://127.0.0.1"
    connection_timeout = 10.0
    network_timeout = float(CFG.get("timeout_s", 10.0))
    mt_headers: dict[str, str] = CFG.get("headers", {})


class ProbeUser(_Base):
    """Synthetic request: app -> function zone -> ``ops`` round trips to the hot store."""

    wait_time = constant(float(CFG.get("think_s", 0.0)))

    @task
    def probe(self) -> None:
        _spend()
        self.client.get(f"{CFG['probe_url']}/probe?ops={CFG.get('ops', 2)}", headers=self.mt_headers, name="probe")


class TwinUser(_Base):
    """Seed 000 Scenarios 1 and 3, through the twin: one request kind per run (``case``)."""

    wait_time = constant(float(CFG.get("think_s", 0.0)))

    @task
    def request(self) -> None:
        _spend()
        case = CFG["case"]
        meter = _rng.choice(CFG["meters"])
        base = CFG["read_url"]
        if case in ("t1", "t5'"):
            path = f"{base}/meters/{meter}/reading?live=true&timeout={CFG.get('meter_timeout_s', 5)}"
        elif case == "t5":
            path = f"{base}/meters/{meter}/reading?max_age=31536000"
        else:
            raise StopUser()
        self.client.get(path, headers=self.mt_headers, name=case)


_step_spent: dict[str, int] = {}
_step_budget = {str(s["label"]): int(s.get("budget", 1 << 30)) for s in CFG.get("steps", [])}


def _spend_step() -> bool:
    """Count one request against the current step's budget; False (and a short pause) once it is spent."""
    import gevent

    label = _step["label"]
    if _step_spent.get(label, 0) >= _step_budget.get(label, 1 << 30):
        gevent.sleep(0.05)
        return False
    _step_spent[label] = _step_spent.get(label, 0) + 1
    _spend()
    return True


class AmiUser(_Base):
    """Seed 001 AMI: device reads through the twins plus billing queries, stepped by :class:`AmiSteps`."""

    wait_time = constant_throughput(float(CFG.get("per_user_rps", 2.0)))

    @task(int(CFG.get("read_weight", 9)))
    def device_read(self) -> None:
        if not _spend_step():
            return
        meter = _rng.choice(CFG["meters"])
        self.client.get(f"{CFG['read_url']}/meters/{meter}/reading?max_age=31536000",
                        headers=self.mt_headers, name=f"read @{_step['label']}")

    @task(int(CFG.get("billing_weight", 1)))
    def billing_query(self) -> None:
        if not CFG.get("billing_path"):
            return self.device_read()
        if not _spend_step():
            return None
        meter = _rng.choice(CFG["meters"])
        path = CFG["billing_path"].format(meter=meter)
        self.client.get(f"{CFG['mdms_url']}{path}", headers=self.mt_headers, name=f"billing @{_step['label']}")
        return None


class P2PUser(_Base):
    """Seed 000 Scenario 2 (t2): run one pre-opened market (N rounds between the twins) per request."""

    wait_time = constant(0.0)

    @task
    def negotiate(self) -> None:
        _spend()
        markets: list[str] = CFG["markets"]
        index = _p2p_next()
        if index >= len(markets):
            raise StopUser()
        self.client.post(f"{CFG['market_url']}/markets/{markets[index]}/run", headers=self.mt_headers, name="t2")


_p2p_counter = itertools.count()


def _p2p_next() -> int:
    return next(_p2p_counter)


class AmiSteps(LoadTestShape):
    """Steps of ``steps[i] = {label, users, duration_s}``; stops after the last one."""

    use_common_options = False

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.steps: list[dict[str, Any]] = list(CFG.get("steps", []))

    def tick(self) -> tuple[int, float] | None:
        if CFG.get("scenario") != "ami" or not self.steps:
            return None
        elapsed = self.get_run_time()  # type: ignore[no-untyped-call]
        end = 0.0
        for step in self.steps:
            end += float(step["duration_s"])
            if elapsed < end:
                _step["label"] = str(step["label"])
                users = int(step["users"])
                return users, float(max(users, 1))
        return None


# Only the AMI run uses the shape; Locust picks up any LoadTestShape in the file, so the
# other scenarios get their own file-level switch through the config.
if CFG.get("scenario") != "ami":
    del AmiSteps

