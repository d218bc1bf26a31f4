-- Apply a list of task operations of one session, in order, atomically.
-- KEYS: 1 session, 2 session event log, 3 open-task set, 4.. task keys
-- ARGV: 1 now_ms, 2 session ttl ms, 3 log max length, 4.. one JSON op each:
--   { k = index into KEYS of the task key (0: session-level event), tid, op, a = attempt,
--     s = seq, ev = client event JSON ('' for none), content, et = error type, em = message }
--   op: started | chunk | progress | result | error  (ordered by seq within (tid, attempt))
--       cancel | timeout | fail                     (end any open task: cancelled,
--                                                    timed_out, failed)
--       event                                       (append ev to the session log only)
--       close                                       (mark the session closed, append ev)
-- Seq-ordered ops apply strictly in seq order: a duplicate (seq <= applied) is dropped, an early
-- one (seq > applied + 1) is parked in the task hash as p:<seq> and applied when its
-- predecessor arrives, so events reach the log in order whatever order the ops came in.
-- seq 0 means unordered: the op applies on arrival while the task is open.
-- Returns { statuses, events, ended, last_eid }:
--   statuses: one per op: applied | duplicate | buffered | stale | terminal | missing
--   events:   flat { prev_eid, eid, json, ... } of every event appended
--   ended:    flat { tid, state, created_ms, pool, ... } of every task this call ended
--   last_eid: the session's newest event id after this call ('' when it has none)
local now, ttl, maxlen = ARGV[1], ARGV[2], ARGV[3]
local skey, lkey, okey = KEYS[1], KEYS[2], KEYS[3]
local events, ended = {}, {}

local function emit(tid, json)
  if json and json ~= '' then
    local ids = append_event(skey, lkey, tid, json, maxlen, ttl)
    events[#events + 1] = ids[1]
    events[#events + 1] = ids[2]
    events[#events + 1] = json
  end
end

local function finish(tkey, op, state)
  redis.call('HSET', tkey, 'state', state, 'finished_ms', now, 'updated_ms', now)
  if op.et then redis.call('HSET', tkey, 'error_type', op.et, 'error', op.em or '') end
  redis.call('SREM', okey, op.tid)
  redis.call('HINCRBY', skey, 'tasks_' .. state, 1)
  if redis.call('HGET', skey, 'active_task') == op.tid then
    redis.call('HDEL', skey, 'active_task')
  end
  redis.call('HSET', skey, 'last_activity_ms', now)
  redis.call('PEXPIRE', tkey, ttl)
  local info = redis.call('HMGET', tkey, 'created_ms', 'pool')
  ended[#ended + 1] = op.tid
  ended[#ended + 1] = state
  ended[#ended + 1] = info[1] or '0'
  ended[#ended + 1] = info[2] or ''
  emit(op.tid, op.ev)
end

-- One in-order step; returns the task's state after it.
local function step(tkey, op, state)
  if tonumber(op.s) > 0 then redis.call('HSET', tkey, 'seq', op.s) end
  redis.call('HSET', tkey, 'updated_ms', now)
  if op.op == 'started' then
    if state == 'queued' or state == 'dispatched' then
      redis.call('HSET', tkey, 'state', 'running', 'started_ms', now)
      return 'running'
    end
    return state
  elseif op.op == 'chunk' then
    if state ~= 'running' then
      redis.call('HSET', tkey, 'state', 'running', 'started_ms', now)
    end
    redis.call('HINCRBY', tkey, 'chunks', 1)
    emit(op.tid, op.ev)
    return 'running'
  elseif op.op == 'progress' then
    emit(op.tid, op.ev)
    return state
  elseif op.op == 'result' then
    redis.call('HSET', tkey, 'result', op.content or '')
    finish(tkey, op, 'completed')
    return 'completed'
  elseif op.op == 'error' then
    finish(tkey, op, 'failed')
    return 'failed'
  end
  return state
end

local function apply_one(op)
  if op.op == 'event' then
    emit(op.tid or '', op.ev)
    return 'applied'
  end
  if op.op == 'close' then
    local st = redis.call('HGET', skey, 'state')
    if not st then return 'missing' end
    if st == 'closed' then return 'terminal' end
    redis.call('HSET', skey, 'state', 'closed', 'closed_ms', now, 'last_activity_ms', now)
    emit('', op.ev)
    return 'applied'
  end
  local tkey = KEYS[op.k]
  local t = redis.call('HMGET', tkey, 'state', 'attempt', 'seq')
  local state = t[1]
  if not state then return 'missing' end
  if TERMINAL[state] then return 'terminal' end
  if op.op == 'cancel' then
    finish(tkey, op, 'cancelled')
    return 'applied'
  elseif op.op == 'timeout' then
    finish(tkey, op, 'timed_out')
    return 'applied'
  elseif op.op == 'fail' then
    finish(tkey, op, 'failed')
    return 'applied'
  end
  if tonumber(t[2]) ~= tonumber(op.a) then return 'stale' end
  local applied = tonumber(t[3]) or 0
  local seq = tonumber(op.s)
  if seq == 0 then
    step(tkey, op, state)
    return 'applied'
  end
  if seq <= applied then return 'duplicate' end
  if seq > applied + 1 then
    redis.call('HSET', tkey, 'p:' .. seq, cjson.encode(op))
    return 'buffered'
  end
  state = step(tkey, op, state)
  local nxt = seq + 1
  while not TERMINAL[state] do
    local raw = redis.call('HGET', tkey, 'p:' .. nxt)
    if not raw then break end
    redis.call('HDEL', tkey, 'p:' .. nxt)
    state = step(tkey, cjson.decode(raw), state)
    nxt = nxt + 1
  end
  return 'applied'
end

local statuses = {}
for i = 4, #ARGV do
  statuses[#statuses + 1] = apply_one(cjson.decode(ARGV[i]))
end
if #events > 0 then redis.call('PEXPIRE', skey, ttl) end
return { statuses, events, ended, redis.call('HGET', skey, 'last_eid') or '' }
