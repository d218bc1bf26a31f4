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
-- Each task hash is read once per call and the session's fields written once at its end, so a
-- call runs a handful of commands however many ops it carries. Each log entry keeps the id of
-- the session's event before it (field p), so a reader can tell whether the log lost events
-- before its oldest.
-- Returns { statuses, events, ended, last_eid }:
--   statuses: one per op: applied | duplicate | buffered | stale | terminal | missing
--   events:   flat { prev_eid, eid, json, ... } of every event appended
--   ended:    flat { tid, state, created_ms, pool, ... } of every task this call ended
--   last_eid: the session's newest event id after this call ('' when it has none)
local now, ttl, maxlen = ARGV[1], ARGV[2], ARGV[3]
local skey, lkey, okey = KEYS[1], KEYS[2], KEYS[3]
local events, ended = {}, {}
-- The session's newest event id: read once, written once at the end.
local last_eid = redis.call('HGET', skey, 'last_eid') or ''
local touched = false

local function push(t, ...)
  for _, v in ipairs({ ... }) do t[#t + 1] = v end
end

-- Appends one client event to the session log.
local function emit(tid, json)
  if json and json ~= '' then
    local eid = redis.call('XADD', lkey, 'MAXLEN', '~', maxlen, '*', 't', tid, 'p', last_eid, 'd', json)
    push(events, last_eid, eid, json)
    last_eid = eid
  end
end

-- What this call knows of each task hash it touched: read once, then kept up to date here.
local known = {}
local function task(tkey)
  local t = known[tkey]
  if not t then
    local r = redis.call('HMGET', tkey, 'state', 'attempt', 'seq', 'created_ms', 'pool')
    t = { state = r[1], attempt = r[2], seq = tonumber(r[3]) or 0, created = r[4], pool = r[5] }
    known[tkey] = t
  end
  return t
end

-- Ends task t as `state`; `fields` are more fields to set in the same HSET.
local function finish(tkey, t, op, state, fields)
  push(fields, 'state', state, 'finished_ms', now, 'updated_ms', now)
  if op.et then push(fields, 'error_type', op.et, 'error', op.em or '') end
  redis.call('HSET', tkey, unpack(fields))
  redis.call('PEXPIRE', tkey, ttl)
  t.state = state
  redis.call('SREM', okey, op.tid)
  redis.call('HINCRBY', skey, 'tasks_' .. state, 1)
  if redis.call('HGET', skey, 'active_task') == op.tid then
    redis.call('HDEL', skey, 'active_task')
  end
  touched = true
  push(ended, op.tid, state, t.created or '0', t.pool or '')
  emit(op.tid, op.ev)
end

-- One in-order step; returns the task's state after it.
local function step(tkey, t, op)
  local fields = {}
  if tonumber(op.s) > 0 then
    push(fields, 'seq', op.s)
    t.seq = tonumber(op.s)
  end
  if op.op == 'result' then
    push(fields, 'result', op.content or '')
    finish(tkey, t, op, 'completed', fields)
    return t.state
  elseif op.op == 'error' then
    finish(tkey, t, op, 'failed', fields)
    return t.state
  end
  push(fields, 'updated_ms', now)
  local running = false
  if op.op == 'started' then
    running = t.state == 'queued' or t.state == 'dispatched'
  elseif op.op == 'chunk' then
    running = t.state ~= 'running'
  end
  if running then
    push(fields, 'state', 'running', 'started_ms', now)
    t.state = 'running'
  end
  redis.call('HSET', tkey, unpack(fields))
  if op.op == 'chunk' then
    redis.call('HINCRBY', tkey, 'chunks', 1)
    emit(op.tid, op.ev)
  elseif op.op == 'progress' then
    emit(op.tid, op.ev)
  end
  return t.state
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
    redis.call('HSET', skey, 'state', 'closed', 'closed_ms', now)
    touched = true
    emit('', op.ev)
    return 'applied'
  end
  local tkey = KEYS[op.k]
  local t = task(tkey)
  if not t.state then return 'missing' end
  if TERMINAL[t.state] then return 'terminal' end
  if op.op == 'cancel' then
    finish(tkey, t, op, 'cancelled', {})
    return 'applied'
  elseif op.op == 'timeout' then
    finish(tkey, t, op, 'timed_out', {})
    return 'applied'
  elseif op.op == 'fail' then
    finish(tkey, t, op, 'failed', {})
    return 'applied'
  end
  if tonumber(t.attempt) ~= tonumber(op.a) then return 'stale' end
  local seq = tonumber(op.s)
  if seq == 0 then
    step(tkey, t, op)
    return 'applied'
  end
  if seq <= t.seq then return 'duplicate' end
  if seq > t.seq + 1 then
    redis.call('HSET', tkey, 'p:' .. seq, cjson.encode(op))
    return 'buffered'
  end
  local state = step(tkey, t, op)
  local nxt = seq + 1
  while not TERMINAL[state] do
    local raw = redis.call('HGET', tkey, 'p:' .. nxt)
    if not raw then break end
    redis.call('HDEL', tkey, 'p:' .. nxt)
    state = step(tkey, t, cjson.decode(raw))
    nxt = nxt + 1
  end
  return 'applied'
end

local statuses = {}
for i = 4, #ARGV do
  statuses[#statuses + 1] = apply_one(cjson.decode(ARGV[i]))
end
local session = {}
if #events > 0 then push(session, 'last_eid', last_eid) end
if touched then push(session, 'last_activity_ms', now) end
if #session > 0 then redis.call('HSET', skey, unpack(session)) end
if #events > 0 then
  redis.call('PEXPIRE', lkey, ttl)
  redis.call('PEXPIRE', skey, ttl)
end
return { statuses, events, ended, last_eid }
