"""Rollback of an operation, from any state (completed included).

Never-switched meters are cancelled (their new state goes; one that may have seen the rebind
is told back), switched ones are flipped back (the migration's down-migration) and told to
rebind to ``from``; each rolled-back meter is re-sent its rebind with backoff until it
confirms, then its abandoned new state is removed.
"""

from __future__ import annotations

import time

from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys
from metertwin.upgrade.migrations import migration
from metertwin.upgrade.spec import IN_FLIGHT, Move, Operation
from metertwin.upgrade.switch import SwitchSteps

# KEYS: switch; ARGV: op, rebind id, ack status (applied|rejected), reason, now
_ACK_BACK = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase', 'rrid')
if sw[1] ~= ARGV[1] or sw[3] ~= ARGV[2] then return 0 end
if sw[2] == 'rolled_back' or sw[2] == 'cancelled' then
  redis.call('HSET', KEYS[1], 'phase', 'confirmed', 'confirmed_at', ARGV[5])
  return 1
end
return 0
"""

# KEYS: switch, new state, new history; ARGV: op. A rolled-back meter confirmed: drop the abandoned state.
_DESTROY_ABANDONED = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return 0 end
if sw[2] ~= 'confirmed' and sw[2] ~= 'rolled_back' and sw[2] ~= 'cancelled' then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[1])
return 1
"""


class RollbackSteps(SwitchSteps):
    """Restores the old binding of every meter an operation touched."""

    def _register_scripts(self) -> None:
        super()._register_scripts()
        s = self.r.register_script
        self._ack_back, self._destroy_abandoned = s(_ACK_BACK), s(_DESTROY_ABANDONED)

    def _begin_rollback(self, op: Operation, reason: str) -> None:
        self._set(op.id, state="rolling_back", reason=reason, rollback_started_at=repr(time.time()), resume_to="")

    def _rollback_step(self, op: Operation) -> bool:
        mig = migration(self.r, op.spec.source, op.spec.to)
        progressed = False
        # Not switched yet: cancel (the new state goes; a meter that may have seen the rebind is told back).
        for name in ("admitted", "prepared", "synced", "rebinding"):
            ids = self._members(op.id, name, op.spec.batch)
            if not ids:
                continue
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                self._cancel(keys=[keys.upgrade_switch(meter_id), twin_keys.twin(meter_id), keys.twin_v2(meter_id),
                                   keys.twin_v2_history(meter_id)], args=[op.id], client=pipe)
            results = self._call(pipe.execute)
            self._crash("cancelled")
            moves: list[Move] = []
            pipe = self.r.pipeline(transaction=False)
            for meter_id, (code, was) in zip(ids, results, strict=True):
                if code == 3:
                    moves.append((meter_id, name, "switched", None))  # flipped meanwhile: flip back below
                elif was in ("rebinding", "rejected") or (name == "rebinding" and was == "cancelled"):
                    moves.append((meter_id, name, "rb_confirming", None))  # it may have rebound: tell it back
                else:
                    # The meter never heard of the switch: nothing to tell it, nothing to keep.
                    self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "cancelled"], client=pipe)
                    moves.append((meter_id, name, "rolled_back", None))
            self._call(pipe.execute)
            self._move(op.id, moves)
            progressed = True
        # Switched (or done): flip back now; the meter is told to rebind and confirms later.
        for name in ("switched", "done"):
            ids = self._members(op.id, name, op.spec.batch)
            if not ids:
                continue
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                mig.flip_back(meter_id, op.id, pipe=pipe)
            results = self._call(pipe.execute)
            self._crash("flipped_back")
            moves = []
            for meter_id, (code, why) in zip(ids, results, strict=True):
                if code in (1, 2):
                    moves.append((meter_id, name, "rb_confirming", None))
                else:
                    moves.append((meter_id, name, "failed", f"rollback: {why}"))
            pipe = self.r.pipeline(transaction=False)
            for meter_id, _, dest, _ in moves:
                if dest == "rb_confirming":
                    pipe.hset(keys.upgrade_switch(meter_id), mapping={"rrid": op.back_rid, "sent_at": "0",
                                                                      "attempts": "0"})
            self._call(pipe.execute)
            self._move(op.id, moves)
            progressed = True
        progressed |= self._confirm_back(op)
        counts = self.counts(op.id)
        if not any(counts[s] for s in IN_FLIGHT) and not counts["done"]:
            self._set(op.id, state="rolled_back", completed_at=repr(time.time()))
            return True
        return progressed

    def _confirm_back(self, op: Operation) -> bool:
        """Rolled-back meters: (re-)send the rebind to ``from``; forget them once they confirmed."""
        key = keys.upgrade_op_set(op.id, "rb_confirming")
        ids = list(self._call(lambda: self.r.smembers(key)))
        if not ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        for meter_id in ids:
            pipe.hmget(keys.upgrade_switch(meter_id), ("op", "phase", "rrid", "sent_at", "attempts", "back_at",
                                                       "created_at"))
        now = time.time()
        resend: list[str] = []
        confirmed: list[str] = []
        moves: list[Move] = []
        for meter_id, (owner, phase, rrid, sent_at, attempts, back_at, _c) in zip(ids, self._call(pipe.execute),
                                                                                  strict=True):
            if owner != op.id:
                moves.append((meter_id, "rb_confirming", "rolled_back", None))
            elif phase == "confirmed" and now - float(back_at or 0) >= op.spec.drain_s:
                confirmed.append(meter_id)
            elif phase in ("rolled_back", "cancelled"):
                if rrid != op.back_rid:
                    self.r.hset(keys.upgrade_switch(meter_id), mapping={"rrid": op.back_rid, "sent_at": "0",
                                                                        "attempts": "0"})
                tries = int(attempts or 0)
                delay = 0.0 if tries == 0 else min(300.0, op.spec.resend_after_s * 2 ** min(tries - 1, 10))
                if now - float(sent_at or 0) >= delay:
                    resend.append(meter_id)
        resend = resend[:self._paced(op, len(resend))] if resend else resend
        if resend:
            sent = [m for m, err in self._send_rebinds(op, resend, op.spec.source, op.back_rid) if err is None]
            pipe = self.r.pipeline(transaction=False)
            stamp = repr(time.time())
            for meter_id in sent:
                pipe.hset(keys.upgrade_switch(meter_id), "sent_at", stamp)
                pipe.hincrby(keys.upgrade_switch(meter_id), "attempts", 1)
            self._call(pipe.execute)
            self._crash("back_rebind_sent")
        if confirmed:
            pipe = self.r.pipeline(transaction=False)
            for meter_id in confirmed:
                self._destroy_abandoned(keys=[keys.upgrade_switch(meter_id), keys.twin_v2(meter_id),
                                              keys.twin_v2_history(meter_id)], args=[op.id], client=pipe)
            self._call(pipe.execute)
            moves += [(m, "rb_confirming", "rolled_back", None) for m in confirmed]
        self._move(op.id, moves)
        return bool(resend or confirmed or moves)
