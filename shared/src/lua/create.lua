-- Create a task in an open session (or take over a reserved task id): `queued` for the
-- dispatchers, or `dispatched` to a pool when the caller sends the executor's request itself.
-- KEYS: 1 session, 2 session event log, 3 task, 4 idempotency key (the task key again when none)
-- ARGV: 1 now_ms, 2 sid, 3 tid, 4 message, 5 metadata json, 6 deadline_ms, 7 source,
--       8 "1" when an idempotency key is given, 9 idempotency ttl ms, 10 session ttl ms,
--       11 pool: when not empty, the task is created `dispatched` to it instead of `queued`
-- Returns: {'created', agent_id} | {'duplicate', tid} | {'exists', state}
--          | {'no_session'} | {'session_closed'}
-- The task is open until it ends: the session hash holds `open:<tid>` meanwhile.
local s = redis.call('HMGET', KEYS[1], 'state', 'agent_id', 'tasks_total', 'ttl_refreshed_ms')
if not s[1] then return { 'no_session' } end
if s[1] ~= 'open' then return { 'session_closed' } end
if ARGV[8] == '1' then
  local prior = redis.call('GET', KEYS[4])
  if prior then return { 'duplicate', prior } end
end
local cur = redis.call('HGET', KEYS[3], 'state')
if cur and cur ~= 'reserved' then return { 'exists', cur } end
local now, ttl = ARGV[1], ARGV[10]
local pool = ARGV[11] or ''
local task = { 'session_id', ARGV[2], 'task_id', ARGV[3], 'agent_id', s[2],
  'state', pool == '' and 'queued' or 'dispatched',
  'attempt', '1', 'seq', '0', 'chunks', '0', 'message', ARGV[4], 'metadata', ARGV[5],
  'created_ms', now, 'updated_ms', now, 'deadline_ms', ARGV[6], 'source', ARGV[7] }
if pool ~= '' then
  task[#task + 1], task[#task + 2] = 'pool', pool
  task[#task + 1], task[#task + 2] = 'dispatched_ms', now
end
redis.call('HSET', KEYS[3], unpack(task))
redis.call('PEXPIRE', KEYS[3], ttl)
if ARGV[8] == '1' then
  redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[9])
end
local fields = { 'tasks_total', (tonumber(s[3]) or 0) + 1, 'last_activity_ms', now,
  'active_task', ARGV[3], 'open:' .. ARGV[3], now }
local renew = renewal_due(s[4], now, ttl)
if renew then
  fields[#fields + 1], fields[#fields + 2] = 'ttl_refreshed_ms', now
end
redis.call('HSET', KEYS[1], unpack(fields))
if renew then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return { 'created', s[2] }
