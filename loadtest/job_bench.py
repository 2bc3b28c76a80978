"""Bulk-job throughput (issue 13 benchmark, the ``job_per_s`` figure of ``loadtest.fleet_bench``).

One job sends a ``relay`` command to ``job_twins`` twins at ``rate_per_s`` (default 1000) through
:mod:`metertwin.jobs` in-process — the same slices the ``edge-jobs`` cron route runs — with real
Mosquitto (QoS 1 publishes) and Redis. The benchmark plays the meters: it acks each in-progress
command through the twin's ack path (``CommandService.on_ack``, what ``edge-write``
calls for ``meters/<id>/up/ack``) in a child process, apart from the job's. It reports:

* ``job_per_s``: twins started per second after the first second's burst (the bucket starts full):
  ``(total - burst) / (last claim - creation)``; the target is ``rate_per_s`` ±5 %;
* ``job_counts``: the final counts (every twin accounted for: succeeded == total);
* ``job_wall_s``: creation to the job's end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from metertwin.core import clients
from metertwin.core.clients import get_redis
from metertwin.core.settings import reset_settings
from metertwin.jobs import keys as job_keys
from metertwin.jobs.service import job_service
from metertwin.jobs.spec import JobSpec
from metertwin.twin.commands import CommandService
from metertwin.twin.messages import CommandAck
from storage.embedded import Mosquitto


def run_job(redis_url: str, meter_ids: list[str], rate_per_s: float = 1000.0, slice_s: float = 0.25) -> dict[str, Any]:
    """Run one command job over ``meter_ids`` (twins that exist in ``redis_url``) to its end."""
    with Mosquitto(max_queued_messages=1_000_000) as broker, tempfile.TemporaryDirectory() as secrets:
        (Path(secrets) / "mqtt-password").write_text(broker.service_password)
        saved = dict(os.environ)
        os.environ.update({"REDIS_URL": redis_url, "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port),
                           "MQTT_USERNAME": broker.service_user, "SECRETS_DIR": secrets, "STREAM_ENABLED": "false"})
        clients.close_all()
        reset_settings()
        try:
            return _run(meter_ids, rate_per_s, slice_s)
        finally:
            clients.close_all()
            os.environ.clear()
            os.environ.update(saved)
            reset_settings()


def _run(meter_ids: list[str], rate_per_s: float, slice_s: float) -> dict[str, Any]:
    r = get_redis()
    jobs = job_service(r)
    spec = JobSpec.model_validate({
        "target": {"meters": meter_ids}, "action": {"type": "command", "kind": "relay", "params": {"state": "open"}},
        "rollout": {"rate_per_s": rate_per_s, "max_in_flight": 100_000, "timeout_s": 600}})
    started = time.time()
    job = jobs.create(spec, actor="bench", budget_s=slice_s)
    job_id = job["id"]
    # The meters' acks come from another process, as edge-write's workers are not the job's.
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    meters = ctx.Process(target=_meters, args=(os.environ["REDIS_URL"], job_id, stop), daemon=True)
    meters.start()
    try:
        while not job["finished_at"]:
            job = jobs.advance(job_id, slice_s)
            if job["progress"]["queued"] == 0 and not job["finished_at"]:
                time.sleep(0.05)  # only acks are awaited: do not spin against the acking process
    finally:
        stop.set()
        meters.join(10)
    last = max(float(json.loads(raw).get("t0", 0)) for raw in
               r.hmget(job_keys.executions(job_id), sorted(set(meter_ids))[-10:]) if raw)
    total = job["progress"]["total"]
    burst = min(total, max(1.0, rate_per_s))
    steady = total > burst  # with no more twins than the first second's burst there is no rate to measure
    return {"job_per_s": round((total - burst) / max(1e-9, last - job["created_at"]), 1) if steady else None,
            "job_rate_per_s": rate_per_s, "job_twins": total, "job_wall_s": round(job["finished_at"] - started, 2),
            "job_counts": {k: v for k, v in job["progress"].items() if k not in ("percent_done",)},
            "job_state": job["state"]}


def _meters(redis_url: str, job_id: str, stop: Any) -> None:
    """Child process: ack what the job has in flight until told to stop (its own Redis client: the
    parent's inherited clients are left alone)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    commands = CommandService(r)
    while not stop.is_set():
        if not _ack_in_progress(r, commands, job_id):
            time.sleep(0.01)


def _ack_in_progress(r: Any, commands: Any, job_id: str) -> int:
    """The meters' acks for every command the job has in flight (edge-write's ack path)."""
    ids = r.zrange(job_keys.by_status(job_id, "in_progress"), 0, 4999)
    if not ids:
        return 0
    now = time.time()
    done = 0
    for meter_id, raw in zip(ids, r.hmget(job_keys.executions(job_id), ids), strict=True):
        ref = json.loads(raw).get("c") if raw else None
        if ref and commands.on_ack(meter_id, CommandAck(id=ref, status="applied", ts=now)):
            done += 1
    return done
