-- Create a queued task in an open session (or take over a reserved task id).
-- KEYS: 1 session, 2 task, 3 idempotency key (the task key again when none), 4 open-task set
-- ARGV: 1 now_ms, 2 sid, 3 tid, 4 message, 5 metadata json, 6 deadline_ms, 7 source,
--       8 "1" when an idempotency key is given, 9 idempotency ttl ms, 10 session ttl ms
-- Returns: {'created', agent_id} | {'duplicate', tid} | {'exists', state}
--          | {'no_session'} | {'session_closed'}
local s = redis.call('HMGET', KEYS[1], 'state', 'agent_id')
if not s[1] then return { 'no_session' } end
if s[1] ~= 'open' then return { 'session_closed' } end
if ARGV[8] == '1' then
  local prior = redis.call('GET', KEYS[3])
  if prior then return { 'duplicate', prior } end
end
local cur = redis.call('HGET', KEYS[2], 'state')
if cur and cur ~= 'reserved' then return { 'exists', cur } end
local now = ARGV[1]
redis.call('HSET', KEYS[2],
  'session_id', ARGV[2], 'task_id', ARGV[3], 'agent_id', s[2], 'state', 'queued',
  'attempt', '1', 'seq', '0', 'chunks', '0', 'message', ARGV[4], 'metadata', ARGV[5],
  'created_ms', now, 'updated_ms', now, 'deadline_ms', ARGV[6], 'source', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[10])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[10])
if ARGV[8] == '1' then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[9])
end
redis.call('HINCRBY', KEYS[1], 'tasks_total', 1)
redis.call('HSET', KEYS[1], 'last_activity_ms', now, 'active_task', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[10])
return { 'created', s[2] }
