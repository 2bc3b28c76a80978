"""A batch is never lost or half-applied: a process applies part of a batch and is killed (SIGKILL)
before it could answer; the redelivered batch then applies exactly what was missing, at the edge
(twin) and in the fog (MDMS hot tier)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from metertwin.core.clients import get_redis
from metertwin.mdms import hot_store
from tests.concentrator.support import (
    batch,
    connector_call,
    ingest,
    mdms_ingest,
    provision,
    reading,
    readings_topic,
    twin_hash,
)

ROOT = Path(__file__).resolve().parents[2]
METERS, PER_METER, APPLIED_BEFORE_KILL = 5, 4, 7

#: Applies the first APPLIED_BEFORE_KILL readings of the batch as the function would (edge: the
#: pipelined scripts; fog: VEE), then dies by SIGKILL: no answer, so the connector redelivers.
EDGE = """
from metertwin.core.clients import get_redis
from metertwin.twin.uplink import concentrator_items
from metertwin.upgrade.inbox import v1_ingest
items, _ = concentrator_items(DCU, PAYLOAD)
v1_ingest(get_redis()).run_many(items[:K])
"""
FOG = """
from metertwin.mdms import mqtt_ingest, vee
candidates = mqtt_ingest._concentrator_candidates("dcu/" + DCU + "/up/readings", PAYLOAD)
vee.ingest(candidates[:K])
"""


def _killed_after(step: str, dcu: str, payload: bytes) -> None:
    code = (f"DCU, PAYLOAD, K = {dcu!r}, {payload!r}, {APPLIED_BEFORE_KILL}\n" + textwrap.dedent(step)
            + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nprint('survived')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]


def _batch(meters: list[str]) -> bytes:
    return batch(*[{"meter_id": m, **reading(seq)} for seq in range(1, PER_METER + 1) for m in meters])


def test_edge_batch_killed_between_steps_is_applied_exactly_once(env: dict[str, str]) -> None:
    meters = [f"cr-{uuid.uuid4().hex[:8]}-{i}" for i in range(METERS)]
    dcu = f"dcu-{uuid.uuid4().hex[:8]}"
    provision(meters, dcu)
    versions = {m: int(twin_hash(get_redis(), m)["v"]) for m in meters}
    payload = _batch(meters)
    _killed_after(EDGE, dcu, payload)
    status, body = connector_call(ingest, readings_topic(dcu), payload)  # the broker's redelivery
    assert status == 200, body
    assert (body["applied"], body["duplicate"], body["rejected"]) == (
        METERS * PER_METER - APPLIED_BEFORE_KILL, APPLIED_BEFORE_KILL, 0)
    for m in meters:
        twin = twin_hash(get_redis(), m)
        assert int(twin["v"]) == versions[m] + PER_METER  # every reading applied once
        assert twin["s"] == str(PER_METER)


def test_fog_batch_killed_between_steps_is_stored_exactly_once(env: dict[str, str]) -> None:
    meters = [f"cf-{uuid.uuid4().hex[:8]}-{i}" for i in range(METERS)]
    dcu = f"dcu-{uuid.uuid4().hex[:8]}"
    payload = _batch(meters)
    _killed_after(FOG, dcu, payload)
    status, body = connector_call(mdms_ingest, readings_topic(dcu), payload)
    assert status == 200, body
    assert (body["accepted"], body["duplicate"], body["rejected"]) == (
        METERS * PER_METER - APPLIED_BEFORE_KILL, APPLIED_BEFORE_KILL, 0)
    assert [len(hot_store.rows(m, 0, 2**62)) for m in meters] == [PER_METER] * METERS
    assert hot_store.known_meter(meters[0])
