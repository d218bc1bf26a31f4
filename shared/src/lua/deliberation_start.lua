-- Move a deliberation pending -> generating (round 1) with its members, once.
-- KEYS: 1 deliberation hash, 2 event stream
-- ARGV: 1 now_ms, 2 ttl ms, 3 event log max length, 4 members JSON, 5 member ids (comma list),
--       6 number of members, 7 step text, 8 hydrated context
-- Returns: {'started'} | {'missing'} | {status, round} (not pending: an earlier delivery, or done)
local t = redis.call('HMGET', KEYS[1], 'status', 'round')
if not t[1] then return { 'missing' } end
if t[1] ~= 'pending' then return { t[1], t[2] or '0' } end
redis.call('HSET', KEYS[1], 'status', 'generating', 'round', '1', 'members', ARGV[4],
  'member_ids', ARGV[5], 'n', ARGV[6], 'context', ARGV[8], 'started_ms', ARGV[1],
  'updated_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
append_update(KEYS[2], ARGV[3], ARGV[2], 'generating', '1', '0', ARGV[7], '', '')
return { 'started' }
