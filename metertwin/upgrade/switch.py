"""The per-twin switch: the phases of one twin's move from one release to the next.

Per meter (every step idempotent; the truth is the meter's switch record, ``keys.upgrade_switch``):

1. **admit**: up to ``batch`` meters of ``queued`` into the pipeline, within ``max_in_flight``.
2. **prepare** (Fig. 3, flows 2-3): a switch record ``{op, from, to, rid, s0}``; the meter stays
   bound to ``from`` and keeps being served by it.
3. **sync** (flows 4-5): the state migration ``from -> to`` (:mod:`metertwin.upgrade.migrations`).
4. **rebind** (flow 6): a :class:`~metertwin.twin.messages.Control` ``rebind`` on the meter's control
   channel, ``params.id = rid``, paced by ``rebind_rate_per_s``; :meth:`SwitchSteps._reconcile`
   re-sends it with backoff until the meter answers, and collects refusals.
5. **flip** (flows 7-10): on the meter's ack, :meth:`~metertwin.upgrade.operations.UpgradeManager.on_ack`
   runs the migration's flip; what follows is :mod:`metertwin.upgrade.drain`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from metertwin.core import topics
from metertwin.core.clients import get_mqtt
from metertwin.core.errors import MeterTwinError
from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys
from metertwin.upgrade.migrations import migration
from metertwin.upgrade.spec import IN_FLIGHT, RECONCILE_EVERY_S, RELEASED_PHASES, Move, Operation
from metertwin.upgrade.store import OperationStore

log = logging.getLogger("metertwin.upgrade")

# --- Lua on the meter's slot -------------------------------------------------------------------
# KEYS: twin, switch; ARGV: op, from, to, rid, now, released phases (comma list)
_PREPARE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 'the twin no longer exists'} end
local sw = redis.call('HMGET', KEYS[2], 'op', 'phase')
if sw[1] == ARGV[1] then return {2, sw[2]} end
if sw[1] then
  local released = false
  for p in string.gmatch(ARGV[6], '[^,]+') do if p == sw[2] then released = true end end
  if not released then return {0, 'in operation ' .. sw[1] .. ' (' .. tostring(sw[2]) .. ')'} end
end
local bound = redis.call('HGET', KEYS[1], 'b') or 'v1'
if bound == ARGV[3] then return {3, 'already bound to ' .. bound} end
if bound ~= ARGV[2] then return {0, 'bound to ' .. bound .. ', not ' .. ARGV[2]} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'op', ARGV[1], 'from', ARGV[2], 'to', ARGV[3], 'phase', 'prepared', 'rid', ARGV[4],
  'created_at', ARGV[5], 's0', redis.call('HGET', KEYS[1], 's') or '-1', 'attempts', 0)
return {1, 'prepared'}
"""

# KEYS: switch; ARGV: op, now. After the rebind went out: synced -> rebinding (never backwards).
_SENT = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return 0 end
if sw[2] == 'synced' then redis.call('HSET', KEYS[1], 'phase', 'rebinding') end
redis.call('HSET', KEYS[1], 'sent_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""

# KEYS: switch; ARGV: op, rebind id, reason, now. The meter refused the rebind: it stays on ``from``.
_REJECT = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase', 'rid')
if sw[1] ~= ARGV[1] or sw[3] ~= ARGV[2] then return 0 end
if sw[2] ~= 'synced' and sw[2] ~= 'rebinding' then return 0 end
redis.call('HSET', KEYS[1], 'phase', 'rejected', 'reason', ARGV[3], 'rejected_at', ARGV[4])
return 1
"""

# KEYS: switch, twin, new state, new history; ARGV: op.
# Rollback of a meter not switched yet: forget the new state; returns the phase it was in.
_CANCEL = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return {2, 'untouched'} end
local phase = sw[2]
if phase == 'prepared' or phase == 'synced' or phase == 'rebinding' or phase == 'rejected' then
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('HSET', KEYS[1], 'phase', 'cancelled')
  return {1, phase}
end
if phase == 'switched' or phase == 'done' then return {3, phase} end
return {2, phase}
"""

# KEYS: switch; ARGV: op, expected phases (comma list). Delete the record if it is still ours.
_FORGET = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return 0 end
for p in string.gmatch(ARGV[2], '[^,]+') do
  if p == sw[2] then redis.call('DEL', KEYS[1]) return 1 end
end
return 0
"""

# --- Lua on the operation's slot ------------------------------------------------------------
# KEYS: queued, admitted, op; ARGV: n. Moves up to n meters into the pipeline, atomically.
_ADMIT = """
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
for _, id in ipairs(ids) do redis.call('SADD', KEYS[2], id) end
if #ids > 0 then redis.call('HINCRBY', KEYS[3], 'admitted', #ids) end
return #ids
"""


class SwitchSteps(OperationStore):
    """The forward steps of an operation's meters: admit, prepare, sync, rebind, reconcile."""

    def _register_scripts(self) -> None:
        super()._register_scripts()
        s = self.r.register_script
        self._prepare, self._sent, self._reject = s(_PREPARE), s(_SENT), s(_REJECT)
        self._cancel, self._forget, self._admit = s(_CANCEL), s(_FORGET), s(_ADMIT)

    def _admit_more(self, op: Operation) -> bool:
        counts = self.counts(op.id)
        in_flight = sum(counts[s] for s in IN_FLIGHT)
        room = op.spec.max_in_flight - in_flight
        if op.state == "canary":
            room = min(room, int(op.num("canary_size")) - int(op.num("admitted")))
        n = min(room, op.spec.batch)
        if n <= 0 or not counts["queued"]:
            return False
        moved = self._call(lambda: self._admit(
            keys=[keys.upgrade_op_set(op.id, "queued"), keys.upgrade_op_set(op.id, "admitted"),
                  keys.upgrade_op(op.id)], args=[n]))
        self._crash("admitted")
        return bool(moved)

    def _prepare_step(self, op: Operation) -> bool:
        ids = self._members(op.id, "admitted", op.spec.batch)
        if not ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        now = repr(time.time())
        for meter_id in ids:
            self._prepare(keys=[twin_keys.twin(meter_id), keys.upgrade_switch(meter_id)],
                          args=[op.id, op.spec.source, op.spec.to, op.rid, now, ",".join(RELEASED_PHASES)],
                          client=pipe)
        results = self._call(pipe.execute)
        self._crash("prepared")
        moves: list[Move] = []
        for meter_id, (code, why) in zip(ids, results, strict=True):
            if code in (1, 2):
                moves.append((meter_id, "admitted", "prepared", None))
            elif code == 3:
                moves.append((meter_id, "admitted", "skipped", str(why)))
            else:
                moves.append((meter_id, "admitted", "failed", str(why)))
        self._move(op.id, moves)
        return True

    def _sync_step(self, op: Operation) -> bool:
        ids = self._members(op.id, "prepared", op.spec.batch)
        if not ids:
            return False
        mig = migration(self.r, op.spec.source, op.spec.to)
        pipe = self.r.pipeline(transaction=False)
        for meter_id in ids:
            mig.sync_call(pipe, meter_id, op.id)
        results = self._call(pipe.execute)
        self._crash("synced")
        moves: list[Move] = []
        for meter_id, (code, why) in zip(ids, results, strict=True):
            if code == 1 or (code == 2 and why in ("synced", "rebinding", "switched", "done")):
                moves.append((meter_id, "prepared", "synced", None))
            else:
                moves.append((meter_id, "prepared", "failed", f"sync: {why or 'the twin no longer exists'}"))
        self._move(op.id, moves)
        return True

    def _paced(self, op: Operation, wanted: int) -> int:
        """How many rebinds may go now (``rebind_rate_per_s``, a token bucket of one second in the op)."""
        now = time.time()
        last = op.num("rebind_clock", now - 1.0)
        allowed = int(min(1.0, max(0.0, now - last)) * op.spec.rebind_rate_per_s)
        n = min(wanted, allowed)
        if n > 0:
            # Advance the clock by what was spent, so that the rate holds across steps.
            self._set(op.id, rebind_clock=repr(max(last, now - 1.0) + n / op.spec.rebind_rate_per_s))
        return n

    def _rebind_step(self, op: Operation) -> bool:
        if not self._call(lambda: self.r.scard(keys.upgrade_op_set(op.id, "synced"))):
            return False
        ids = self._members(op.id, "synced", self._paced(op, op.spec.batch))
        if not ids:
            return False
        half = len(ids) // 2
        sent: list[str] = []
        for chunk_no, chunk in enumerate((ids[:half], ids[half:])):
            for meter_id, error in self._send_rebinds(op, chunk, op.spec.to, op.rid):
                if error is None:
                    sent.append(meter_id)
                else:
                    log.warning("rebind of %s not sent: %s (retried next round)", meter_id, error)
            if chunk_no == 0:
                self._crash("rebind_half_sent")
        pipe = self.r.pipeline(transaction=False)
        now = repr(time.time())
        for meter_id in sent:
            self._sent(keys=[keys.upgrade_switch(meter_id)], args=[op.id, now], client=pipe)
        self._call(pipe.execute)
        self._crash("rebind_sent")
        self._move(op.id, [(m, "synced", "rebinding", None) for m in sent])
        return bool(sent)

    def _send_rebinds(self, op: Operation, ids: list[str], version: str,
                      rid: str) -> list[tuple[str, str | None]]:
        if not ids:
            return []

        def one(meter_id: str) -> tuple[str, str | None]:
            payload = {"action": "rebind", "params": {"id": rid, "version": version, "op": op.id}}
            try:
                self._publish(meter_id, payload, op.spec.rebind_ttl_s)
            except MeterTwinError as exc:
                return meter_id, exc.message
            return meter_id, None

        if len(ids) < 8:
            return [one(m) for m in ids]
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="rebind") as pool:
            return list(pool.map(one, ids))

    def _reconcile(self, op: Operation) -> bool:
        """Rebinding meters: move the flipped ones on, re-send overdue rebinds, collect refusals.

        The ack handler moves a flipped meter on by itself, so this full pass (a read of every
        rebinding meter's switch record) runs at most every :data:`RECONCILE_EVERY_S`.
        """
        now = time.time()
        if now - op.num("reconciled_at") < min(RECONCILE_EVERY_S, op.spec.resend_after_s / 2):
            return False
        self._set(op.id, reconciled_at=repr(now))
        key = keys.upgrade_op_set(op.id, "rebinding")
        ids = list(self._call(lambda: self.r.smembers(key)))
        if not ids:
            if op.num("unconfirmed"):
                self._set(op.id, unconfirmed=0)
            return False
        progressed = False
        unconfirmed = 0
        moves: list[Move] = []
        resend: list[str] = []
        for start in range(0, len(ids), 2000):
            chunk = ids[start:start + 2000]
            pipe = self.r.pipeline(transaction=False)
            for meter_id in chunk:
                pipe.hmget(keys.upgrade_switch(meter_id), ("op", "phase", "sent_at", "attempts", "reason"))
            for meter_id, (owner, phase, sent_at, attempts, reason) in zip(chunk, self._call(pipe.execute),
                                                                            strict=True):
                if owner != op.id:
                    moves.append((meter_id, "rebinding", "failed", "switch record taken over or lost"))
                elif phase in ("switched", "done"):
                    moves.append((meter_id, "rebinding", "switched", None))
                elif phase == "rejected":
                    moves.append((meter_id, "rebinding", "failed", f"the meter refused the rebind: {reason}"))
                elif phase in ("rebinding", "synced"):
                    tries = int(attempts or 0)
                    if tries >= op.spec.max_attempts:
                        unconfirmed += 1
                    delay = min(300.0, op.spec.resend_after_s * 2 ** min(max(0, tries - 1), 10))
                    if now - float(sent_at or 0) >= delay:
                        resend.append(meter_id)
        for meter_id, _, dest, _ in moves:
            if dest == "failed":
                self._cleanup_failed(op, meter_id)
        self._move(op.id, moves)
        if resend and op.state != "paused":
            resend = resend[:self._paced(op, len(resend))]
            sent = [m for m, err in self._send_rebinds(op, resend, op.spec.to, op.rid) if err is None]
            pipe = self.r.pipeline(transaction=False)
            stamp = repr(time.time())
            for meter_id in sent:
                self._sent(keys=[keys.upgrade_switch(meter_id)], args=[op.id, stamp], client=pipe)
            self._call(pipe.execute)
            progressed |= bool(sent)
        if unconfirmed != int(op.num("unconfirmed")):
            self._set(op.id, unconfirmed=unconfirmed)
        self._crash("reconciled")
        return progressed or bool(moves)

    def _cleanup_failed(self, op: Operation, meter_id: str) -> None:
        """A meter that will not switch: drop the new state we built for it (it stays on ``from``)."""
        pipe = self.r.pipeline(transaction=False)
        self._cancel(keys=[keys.upgrade_switch(meter_id), twin_keys.twin(meter_id), keys.twin_v2(meter_id),
                           keys.twin_v2_history(meter_id)], args=[op.id], client=pipe)
        self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "cancelled"], client=pipe)
        self._call(pipe.execute)


def mqtt_publish(meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
    """Publish a control message to the meter, expiring after ``ttl_s`` (the default :data:`Publish`)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = ttl_s
    get_mqtt().publish(topics.control(meter_id), payload, timeout_s=5.0, properties=props)

