"""The Lua scripts of a job. Each touches only the keys of one job (hash tag ``{job:<id>}``).

Counters live in the job hash as ``n_<status>``; every status change moves the meter between
the per-status sorted sets and the counters in the same script, so counts never disagree with
the listing, and a meter is claimed (queued -> in_progress) exactly once.
"""

from __future__ import annotations

from metertwin.jobs import keys

#: KEYS order shared by the scripts below: job, executions, deadlines, then one set per status.
STATUS_INDEX = {status: 4 + i for i, status in enumerate(keys.STATUSES)}
_STATUS_TABLE = "{" + ", ".join(f"{s}={i}" for s, i in STATUS_INDEX.items()) + "}"


def job_keys(job_id: str) -> list[str]:
    return [keys.job(job_id), keys.executions(job_id), keys.deadlines(job_id),
            *(keys.by_status(job_id, s) for s in keys.STATUSES)]


# ARGV: cursor reached after this page, then meter ids. New meters only (a replayed page adds nothing).
SNAPSHOT = f"""
local ix = {_STATUS_TABLE}
if redis.call('HGET', KEYS[1], 'state') ~= 'snapshotting' then return -1 end
local added = 0
for i = 2, #ARGV do
  if redis.call('HSETNX', KEYS[2], ARGV[i], '{{"s":"queued"}}') == 1 then
    redis.call('ZADD', KEYS[ix.queued], 0, ARGV[i])
    added = added + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'n_queued', added)
redis.call('HINCRBY', KEYS[1], 'total', added)
redis.call('HSET', KEYS[1], 'snap_cursor', ARGV[1])
return added
"""

# ARGV: now, most to claim[, 'all': no rate or max_in_flight (an upgrade hands its set over at once)].
# Token bucket (burst: one second of rate) and max_in_flight.
CLAIM = f"""
local ix = {_STATUS_TABLE}
local d = redis.call('HMGET', KEYS[1], 'state', 'rate', 'max_in_flight', 'tokens', 'filled_at',
                     'n_in_progress', 'timeout_s')
if d[1] ~= 'running' then return {{}} end
local now, rate, mif = tonumber(ARGV[1]), tonumber(d[2]), tonumber(d[3])
local tokens, last = tonumber(d[4] or '0'), tonumber(d[5] or ARGV[1])
tokens = math.min(math.max(1, rate), tokens + math.max(0, now - last) * rate)
local n = math.min(math.floor(tokens), mif - tonumber(d[6] or '0'), tonumber(ARGV[2]))
if ARGV[3] == 'all' then n = tonumber(ARGV[2]) end
local ids = {{}}
if n > 0 then ids = redis.call('ZRANGE', KEYS[ix.queued], 0, n - 1) end
local due = now + tonumber(d[7])
for _, m in ipairs(ids) do
  redis.call('ZREM', KEYS[ix.queued], m)
  redis.call('ZADD', KEYS[ix.in_progress], 0, m)
  redis.call('ZADD', KEYS[3], due, m)
  redis.call('HSET', KEYS[2], m, cjson.encode({{s = 'in_progress', t0 = now}}))
end
redis.call('HINCRBY', KEYS[1], 'n_queued', 0 - #ids)
redis.call('HINCRBY', KEYS[1], 'n_in_progress', #ids)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - #ids), 'filled_at', ARGV[1])
return ids
"""

# ARGV: now, the status moved from, then (meter, new status, reason) triples. Then the abort rule.
# Returns {moved, state, 1 when this call aborted the job else 0, then the 1-based triple index of each moved meter}.
FINISH = f"""
local ix = {_STATUS_TABLE}
local now, from, moved, which = tonumber(ARGV[1]), ARGV[2], 0, {{}}
for i = 3, #ARGV, 3 do
  local m, to, why = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local raw = redis.call('HGET', KEYS[2], m)
  if raw then
    local e = cjson.decode(raw)
    if e.s == from then
      redis.call('ZREM', KEYS[ix[from]], m)
      redis.call('ZADD', KEYS[ix[to]], 0, m)
      redis.call('ZREM', KEYS[3], m)
      e.s = to
      e.t1 = now
      if why ~= '' then e.r = why end
      redis.call('HSET', KEYS[2], m, cjson.encode(e))
      redis.call('HINCRBY', KEYS[1], 'n_' .. from, -1)
      redis.call('HINCRBY', KEYS[1], 'n_' .. to, 1)
      moved = moved + 1
      which[#which + 1] = (i - 3) / 3
    end
  end
end
local d = redis.call('HMGET', KEYS[1], 'state', 'abort_percent', 'abort_min', 'n_succeeded', 'n_failed',
                     'n_rejected', 'n_timed_out')
local state, aborted = d[1], 0
if (state == 'running' or state == 'paused') and d[2] and d[2] ~= '' then
  local fails = tonumber(d[5] or '0') + tonumber(d[6] or '0') + tonumber(d[7] or '0')
  local done = fails + tonumber(d[4] or '0')
  if done >= tonumber(d[3]) and fails * 100 > tonumber(d[2]) * done then
    state, aborted = 'aborted', 1
    redis.call('HSET', KEYS[1], 'state', state, 'updated_at', ARGV[1], 'reason',
      string.format('abort rule: %d of %d finished executions failed (more than %s%% after at least %s)',
                    fails, done, d[2], d[3]))
  end
end
local out = {{moved, state, aborted}}
for _, k in ipairs(which) do out[#out + 1] = k end
return out
"""

# ARGV: (meter, reference) pairs — a command id or operation id, kept on an in-progress execution.
ATTACH = """
local n = 0
for i = 1, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local e = cjson.decode(raw)
    if e.s == 'in_progress' and not e.c then
      e.c = ARGV[i + 1]
      redis.call('HSET', KEYS[2], ARGV[i], cjson.encode(e))
      n = n + 1
    end
  end
end
return n
"""

# ARGV: action (pause, resume, cancel, running), now, reason. Returns {changed (1/0), state}.
STATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
local to
if ARGV[1] == 'pause' and state == 'running' then to = 'paused'
elseif ARGV[1] == 'resume' and state == 'paused' then to = 'running'
elseif ARGV[1] == 'running' and state == 'snapshotting' then to = 'running'
elseif ARGV[1] == 'cancel' and (state == 'running' or state == 'paused' or state == 'snapshotting') then
  to = 'cancelled'
end
if not to then return {0, state} end
redis.call('HSET', KEYS[1], 'state', to, 'updated_at', ARGV[2])
if to == 'running' then redis.call('HSET', KEYS[1], 'filled_at', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[3]) end
return {1, to}
"""

# ARGV: now, retention s. A job with nothing queued or in progress ends: running -> completed.
# Returns {ended (1/0), state, 1 when this call ended it else 0}.
FINALIZE = """
local d = redis.call('HMGET', KEYS[1], 'state', 'n_queued', 'n_in_progress', 'finished_at')
if d[4] and d[4] ~= '' then return {1, d[1], 0} end
if tonumber(d[2] or '0') > 0 or tonumber(d[3] or '0') > 0 then return {0, d[1], 0} end
local state = d[1]
if state == 'running' then state = 'completed'
elseif state ~= 'cancelled' and state ~= 'aborted' then return {0, state, 0} end
redis.call('HSET', KEYS[1], 'state', state, 'finished_at', ARGV[1], 'updated_at', ARGV[1])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return {1, state, 1}
"""
