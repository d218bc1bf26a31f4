-- Apply a list of task operations of one session, in order, atomically.
-- KEYS: 1 session, 2 session event log, 3.. task keys
-- ARGV: 1 now_ms, 2 session ttl ms, 3 log max length, then 9 per op:
--   k (index into KEYS of the task key; 0: a session-level op), tid, op, a (attempt),
--   s (seq; for an unordered op, its once-key instead: see below, '' or 0 for none),
--   ev (client event JSON, '' for none), content, et (error type, '' for none), em (message)
--   op: started | chunk | progress | result | error  (ordered by seq within (tid, attempt))
--       cancel | timeout | fail                     (end any open task: cancelled,
--                                                    timed_out, failed)
--       restart                                     (attempt a takes the open task over:
--                                                    its seq and chunks start again, parked
--                                                    ops of the earlier attempt are dropped,
--                                                    ev is appended if that had applied any)
--       event                                       (append ev to the session log only)
--       close                                       (mark the session closed, append ev;
--                                                    the tasks ended before it in this call,
--                                                    and those a later cancel ends in the
--                                                    closed session, are kept as
--                                                    `close_cancelled`)
-- Seq-ordered ops apply strictly in seq order: a duplicate (seq <= applied) is dropped, an early
-- one (seq > applied + 1) is parked in the task hash as p:<seq> (`parked` counts them) and
-- applied when its predecessor arrives, so events reach the log in order whatever order the ops
-- came in. seq 0 means unordered: the op applies on arrival while the task is open. An unordered
-- op may carry a once-key (a string naming the delivery that carries it) in place of its seq: a
-- second op with the same key is a duplicate (the task hash keeps `u:<key>`), so a callback
-- redelivered after it applied is not applied twice.
-- Redis charges each redis.call several times the command's own cost, so a call reads each hash
-- once, writes each task hash once and the session hash at most twice (one HDEL of the ended
-- tasks' `open:<tid>`, one HSET), whatever the number of ops. Each log entry keeps the id of the
-- session's event before it (field p), so a reader can tell whether the log lost events before
-- its oldest.
-- Returns { statuses, events, ended, last_eid }:
--   statuses: one per op: applied | duplicate | buffered | stale | terminal | missing (no task,
--             or only a reserved id)
--   events:   flat { prev_eid, eid, source, ... } of every event appended; source is the index
--             (from 1) of the op whose `ev` it is, or the event JSON of an op parked earlier
--   ended:    flat { tid, state, created_ms, pool, ... } of every task this call ended
--   last_eid: the session's newest event id after this call ('' when it has none)
local now, ttl, maxlen = ARGV[1], ARGV[2], ARGV[3]
local skey, lkey = KEYS[1], KEYS[2]
local session = redis.call('HMGET', skey, 'last_eid', 'active_task', 'ttl_refreshed_ms',
  'tasks_completed', 'tasks_failed', 'tasks_cancelled', 'tasks_timed_out')
local last_eid = session[1] or ''
local log_is_new = last_eid == ''
local active = session[2]
local ends = { completed = session[4], failed = session[5], cancelled = session[6],
  timed_out = session[7] }
local ended_now = {}
local events, ended, closed_fields = {}, {}, {}
local touched = false
-- The session's state, read only by a cancel op (nil until then); and the tasks cancel ops of
-- this call ended in a closed session, as { tid, pool, ... }: a close's late cancels (tasks
-- created between its read of the open tasks and its apply), kept with the close's own.
local session_state
local late = {}

-- Appends one client event to the session log.
local function emit(tid, json, source)
  if json ~= '' then
    local eid = redis.call('XADD', lkey, 'MAXLEN', '~', maxlen, '*', 't', tid, 'p', last_eid, 'd', json)
    local n = #events
    events[n + 1], events[n + 2], events[n + 3] = last_eid, eid, source
    last_eid = eid
  end
end

-- What this call knows of each task hash it touched: read once, kept up to date here, and the
-- fields to write (`set`) written once at the end.
local known, dirty = {}, {}
local function task(k)
  local t = known[k]
  if not t then
    local r = redis.call('HMGET', KEYS[k], 'state', 'attempt', 'seq', 'created_ms', 'pool',
      'chunks', 'parked', 'ttl_refreshed_ms')
    t = { key = KEYS[k], state = r[1], attempt = tonumber(r[2]), seq = tonumber(r[3]) or 0,
      created = r[4], pool = r[5], chunks = tonumber(r[6]) or 0, parked = tonumber(r[7]) or 0,
      refreshed = r[8] }
    known[k] = t
  end
  return t
end
local function set(t, field, value)
  if not t.set then
    t.set = {}
    dirty[#dirty + 1] = t
  end
  t.set[field] = value
end

-- Ends task t as `state`.
local function finish(t, o, state)
  set(t, 'state', state)
  set(t, 'finished_ms', now)
  set(t, 'updated_ms', now)
  if o.et ~= '' then
    set(t, 'error_type', o.et)
    set(t, 'error', o.em)
  end
  t.state = state
  ends[state] = (tonumber(ends[state]) or 0) + 1
  ended_now[state] = true
  closed_fields[#closed_fields + 1] = 'open:' .. o.tid
  if active == o.tid then
    closed_fields[#closed_fields + 1] = 'active_task'
    active = false
  end
  touched = true
  local n = #ended
  ended[n + 1], ended[n + 2], ended[n + 3], ended[n + 4] = o.tid, state, t.created or '0',
    t.pool or ''
  emit(o.tid, o.ev, o.source)
end

-- One in-order step.
local function step(t, o)
  if o.s > 0 then
    set(t, 'seq', o.s)
    t.seq = o.s
  end
  if o.op == 'result' then
    set(t, 'result', o.content)
    finish(t, o, 'completed')
    return
  elseif o.op == 'error' then
    finish(t, o, 'failed')
    return
  end
  set(t, 'updated_ms', now)
  local running = false
  if o.op == 'started' then
    running = t.state == 'queued' or t.state == 'dispatched'
  elseif o.op == 'chunk' then
    running = t.state ~= 'running'
  end
  if running then
    set(t, 'state', 'running')
    set(t, 'started_ms', now)
    t.state = 'running'
  end
  if o.op == 'chunk' then
    t.chunks = t.chunks + 1
    set(t, 'chunks', t.chunks)
    emit(o.tid, o.ev, o.source)
  elseif o.op == 'progress' then
    emit(o.tid, o.ev, o.source)
  end
end

local function apply_one(o)
  if o.op == 'event' then
    emit(o.tid, o.ev, o.source)
    return 'applied'
  end
  if o.op == 'close' then
    local st = redis.call('HGET', skey, 'state')
    if not st then return 'missing' end
    if st == 'closed' then return 'terminal' end
    -- The tasks this close ended, as { tid, pool, ... }: a redelivered close that finds the
    -- session closed still tells their executors to stop.
    local cancelled = {}
    for j = 1, #ended, 4 do
      cancelled[#cancelled + 1], cancelled[#cancelled + 2] = ended[j], ended[j + 3]
    end
    if #cancelled > 0 then
      redis.call('HSET', skey, 'state', 'closed', 'closed_ms', now, 'close_cancelled',
        cjson.encode(cancelled))
    else
      redis.call('HSET', skey, 'state', 'closed', 'closed_ms', now)
    end
    session_state = 'closed'
    touched = true
    emit('', o.ev, o.source)
    return 'applied'
  end
  local t = task(o.k)
  -- A reserved id is no task yet (no attempt, not open): nothing to end, restart or move.
  if not t.state or t.state == 'reserved' then return 'missing' end
  if TERMINAL[t.state] then return 'terminal' end
  if o.op == 'restart' then
    if o.a == t.attempt then return 'duplicate' end
    if o.a < t.attempt then return 'stale' end
    if t.parked > 0 then
      local drop = {}
      for _, f in ipairs(redis.call('HKEYS', t.key)) do
        if string.sub(f, 1, 2) == 'p:' then drop[#drop + 1] = f end
      end
      if #drop > 0 then redis.call('HDEL', t.key, unpack(drop)) end
      t.parked = 0
      set(t, 'parked', 0)
    end
    -- Unordered chunks (seq 0) streamed too, without moving seq.
    local streamed = t.seq > 0 or t.chunks > 0
    t.attempt, t.seq, t.chunks = o.a, 0, 0
    set(t, 'attempt', o.a)
    set(t, 'seq', 0)
    set(t, 'chunks', 0)
    set(t, 'updated_ms', now)
    if streamed then emit(o.tid, o.ev, o.source) end
    return 'applied'
  elseif o.op == 'cancel' then
    finish(t, o, 'cancelled')
    if not session_state then session_state = redis.call('HGET', skey, 'state') or '' end
    if session_state == 'closed' then
      late[#late + 1], late[#late + 2] = o.tid, t.pool or ''
    end
    return 'applied'
  elseif o.op == 'timeout' then
    finish(t, o, 'timed_out')
    return 'applied'
  elseif o.op == 'fail' then
    finish(t, o, 'failed')
    return 'applied'
  end
  if t.attempt ~= o.a then return 'stale' end
  local seq = o.s
  if seq == 0 then
    -- A result or error ends the task, so a second one is `terminal` without a key.
    if o.once ~= '' and o.op ~= 'result' and o.op ~= 'error'
      and redis.call('HSETNX', t.key, 'u:' .. o.once, 1) == 0 then
      return 'duplicate'
    end
    step(t, o)
    return 'applied'
  end
  if seq <= t.seq then return 'duplicate' end
  if seq > t.seq + 1 then
    -- Parked with its event JSON: the call that applies it has only this.
    o.source = nil
    if redis.call('HSET', t.key, 'p:' .. seq, cjson.encode(o)) == 1 then
      t.parked = t.parked + 1
      set(t, 'parked', t.parked)
    end
    return 'buffered'
  end
  step(t, o)
  local nxt = seq + 1
  while t.parked > 0 and not TERMINAL[t.state] do
    local raw = redis.call('HGET', t.key, 'p:' .. nxt)
    if not raw then break end
    redis.call('HDEL', t.key, 'p:' .. nxt)
    t.parked = t.parked - 1
    set(t, 'parked', t.parked)
    local p = cjson.decode(raw)
    p.source = p.ev
    step(t, p)
    nxt = nxt + 1
  end
  return 'applied'
end

local statuses = {}
local i, n = 4, 0
while i + 8 <= #ARGV do
  n = n + 1
  local s = tonumber(ARGV[i + 4])
  statuses[n] = apply_one({ k = tonumber(ARGV[i]), tid = ARGV[i + 1], op = ARGV[i + 2],
    a = tonumber(ARGV[i + 3]), s = s or 0, once = s and '' or ARGV[i + 4], ev = ARGV[i + 5],
    content = ARGV[i + 6], et = ARGV[i + 7], em = ARGV[i + 8], source = n })
  i = i + 9
end

for _, t in ipairs(dirty) do
  -- A task that changes lives as long as its session, which its events keep alive: its TTL is
  -- renewed by the same rule, from its own last renewal (or its creation).
  local renew_task = renewal_due(t.refreshed or t.created, now, ttl)
  if renew_task then t.set.ttl_refreshed_ms = now end
  local fields, m = {}, 0
  for f, v in pairs(t.set) do
    fields[m + 1], fields[m + 2] = f, v
    m = m + 2
  end
  redis.call('HSET', t.key, unpack(fields))
  if renew_task then redis.call('PEXPIRE', t.key, ttl) end
end
if #closed_fields > 0 then redis.call('HDEL', skey, unpack(closed_fields)) end
if #late > 0 then
  local prior = redis.call('HGET', skey, 'close_cancelled')
  local all = prior and cjson.decode(prior) or {}
  for _, v in ipairs(late) do all[#all + 1] = v end
  redis.call('HSET', skey, 'close_cancelled', cjson.encode(all))
end
local fields = {}
if #events > 0 then
  fields[#fields + 1], fields[#fields + 2] = 'last_eid', last_eid
end
if touched then
  fields[#fields + 1], fields[#fields + 2] = 'last_activity_ms', now
end
for state in pairs(ended_now) do
  fields[#fields + 1], fields[#fields + 2] = 'tasks_' .. state, ends[state]
end
local renew = (#events > 0 or touched) and (log_is_new or renewal_due(session[3], now, ttl))
if renew then
  fields[#fields + 1], fields[#fields + 2] = 'ttl_refreshed_ms', now
end
if #fields > 0 then redis.call('HSET', skey, unpack(fields)) end
-- After the HSET, which creates the session hash if it had expired.
if renew then
  redis.call('PEXPIRE', lkey, ttl)
  redis.call('PEXPIRE', skey, ttl)
end
return { statuses, events, ended, last_eid }
