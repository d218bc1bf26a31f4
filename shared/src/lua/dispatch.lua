-- Move a task queued -> dispatched, once per attempt.
-- KEYS: 1 task
-- ARGV: 1 now_ms, 2 attempt, 3 pool
-- Returns: {'dispatched'} when this call moved it, otherwise {'missing'} | {'stale'} | {<state>}
local t = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if not t[1] then return { 'missing' } end
if tonumber(t[2]) ~= tonumber(ARGV[2]) then return { 'stale' } end
if t[1] ~= 'queued' then return { t[1] } end
redis.call('HSET', KEYS[1], 'state', 'dispatched', 'pool', ARGV[3],
  'dispatched_ms', ARGV[1], 'updated_ms', ARGV[1])
return { 'dispatched' }
