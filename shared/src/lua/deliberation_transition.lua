-- Move a deliberation to a new status by compare-and-set, with its update.
-- KEYS: 1 deliberation hash, 2 event stream
-- ARGV: 1 now_ms, 2 ttl ms, 3 event log max length,
--       4 allowed current statuses (comma list; '*' = any non-terminal),
--       5 required current round ('' = any), 6 new status, 7 step text, 8 agent, 9 data JSON,
--       10 received (for the update), 11.. field/value pairs to set
-- Returns: {'applied', status, round} | {'refused', status, round} | {'terminal', status, round}
--          | {'missing'}
local t = redis.call('HMGET', KEYS[1], 'status', 'round')
if not t[1] then return { 'missing' } end
local round = t[2] or '0'
if D_TERMINAL[t[1]] then return { 'terminal', t[1], round } end
if ARGV[4] ~= '*' and not string.find(',' .. ARGV[4] .. ',', ',' .. t[1] .. ',', 1, true) then
  return { 'refused', t[1], round }
end
if ARGV[5] ~= '' and ARGV[5] ~= round then return { 'refused', t[1], round } end
if #ARGV > 10 then redis.call('HSET', KEYS[1], unpack(ARGV, 11)) end
redis.call('HSET', KEYS[1], 'status', ARGV[6], 'updated_ms', ARGV[1])
if D_TERMINAL[ARGV[6]] then redis.call('HSET', KEYS[1], 'finished_ms', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
round = redis.call('HGET', KEYS[1], 'round') or '0'
append_update(KEYS[2], ARGV[3], ARGV[2], ARGV[6], round, ARGV[10], ARGV[7], ARGV[8], ARGV[9])
return { 'applied', ARGV[6], round }
