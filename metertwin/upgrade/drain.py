"""Drain and remove (Fig. 3, flows 11-12): the end of one twin's switch.

While a meter switches, every release that applies one of its readings counts it in the
switch record (``n:<release>``, see :mod:`metertwin.upgrade.inbox`). ``drain_s`` after the
flip the record is folded into the operation's counters - the readings applied by each
release during the switch, and the ones missing, which must be 0 - and removed.
"""

from __future__ import annotations

import time

import redis

from metertwin.core.errors import BackendUnavailable
from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys
from metertwin.upgrade.spec import Operation
from metertwin.upgrade.switch import SwitchSteps

# KEYS: switch, twin; ARGV: op. Switched -> done; returns the switch's counters (idempotent).
_FINISH = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase', 'from', 'to', 's0', 'flip_seq')
if sw[1] ~= ARGV[1] then return {0, 0, 0, 0, 0} end
if sw[2] ~= 'switched' and sw[2] ~= 'done' then return {0, 0, 0, 0, 0} end
redis.call('HSET', KEYS[1], 'phase', 'done')
local s_now = tonumber(redis.call('HGET', KEYS[1 + 1], 's') or '-1')
return {1, tonumber(redis.call('HGET', KEYS[1], 'n:' .. sw[3]) or '0'),
  tonumber(redis.call('HGET', KEYS[1], 'n:' .. sw[4]) or '0'), tonumber(sw[5] or '-1'), s_now}
"""

# KEYS: switched, done, op; ARGV: meter, readings by from, by to, missing. Count once per meter.
_COUNT_DONE = """
if redis.call('SMOVE', KEYS[1], KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[3], 'readings_old', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'readings_new', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'readings_missing', ARGV[4])
return 1
"""


class DrainSteps(SwitchSteps):
    """Switched meters past the drain time: counted once, then their switch records removed."""

    def _register_scripts(self) -> None:
        super()._register_scripts()
        self._finish, self._count_done = self.r.register_script(_FINISH), self.r.register_script(_COUNT_DONE)

    def _finish_switched(self, op: Operation) -> bool:
        """Switched meters past the drain time: fold their counters into the operation, forget the switch."""
        ids = self._members(op.id, "switched", max(op.spec.batch, 2000))
        if not ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        for meter_id in ids:
            pipe.hmget(keys.upgrade_switch(meter_id), ("op", "phase", "switched_at"))
        now = time.time()
        due: list[str] = []
        gone: list[str] = []
        for meter_id, (owner, phase, at) in zip(ids, self._call(pipe.execute), strict=True):
            if owner is None:
                gone.append(meter_id)  # counted and forgotten already (a crash came between)
            elif owner == op.id and (phase == "done" or (phase == "switched"
                                                          and now - float(at or now) >= op.spec.drain_s)):
                due.append(meter_id)
        if gone:
            self._move(op.id, [(m, "switched", "done", None) for m in gone])
        if not due:
            return bool(gone)
        pipe = self.r.pipeline(transaction=False)
        for meter_id in due:
            self._finish(keys=[keys.upgrade_switch(meter_id), twin_keys.twin(meter_id)], args=[op.id], client=pipe)
        results = self._call(pipe.execute)
        self._crash("finished")
        pipe = self.r.pipeline(transaction=False)
        for meter_id, (ok, n_old, n_new, s0, s_now) in zip(due, results, strict=True):
            if not ok:
                continue
            missing = (int(s_now) - int(s0)) - (int(n_old) + int(n_new))
            self._count_done(keys=[keys.upgrade_op_set(op.id, "switched"), keys.upgrade_op_set(op.id, "done"),
                                   keys.upgrade_op(op.id)],
                             args=[meter_id, int(n_old), int(n_new), missing], client=pipe)
        self._call(pipe.execute)
        self._crash("counted")
        pipe = self.r.pipeline(transaction=False)
        for meter_id in due:
            self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "done"], client=pipe)
        self._call(pipe.execute)
        return True

    def _forget_done(self, op: Operation) -> None:
        """Switch records still there for finished meters (a crash between counting and forgetting)."""
        cursor = 0
        while True:
            try:
                cursor, ids = self.r.sscan(keys.upgrade_op_set(op.id, "done"), cursor, count=2000)
            except redis.RedisError as exc:
                raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "done"], client=pipe)
            self._call(pipe.execute)
            if cursor == 0:
                return
