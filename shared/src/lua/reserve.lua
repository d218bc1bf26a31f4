-- Reserve a task id in an open session; a later submit with that id takes it over.
-- KEYS: 1 session, 2 task
-- ARGV: 1 now_ms, 2 sid, 3 tid, 4 ttl ms
-- Returns: {'reserved'} | {'no_session'} | {'session_closed'}
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return { 'no_session' } end
if st ~= 'open' then return { 'session_closed' } end
redis.call('HSET', KEYS[2], 'session_id', ARGV[2], 'task_id', ARGV[3], 'state', 'reserved',
  'created_ms', ARGV[1], 'updated_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'last_activity_ms', ARGV[1])
return { 'reserved' }
