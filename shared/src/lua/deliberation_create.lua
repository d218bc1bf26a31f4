-- Create a deliberation as `pending`, once.
-- KEYS: 1 deliberation hash, 2 event stream
-- ARGV: 1 now_ms, 2 ttl ms, 3 event log max length, 4.. field/value pairs of the spec
--       (including created_ms)
-- Returns: {'created'} | {'exists', status}
local st = redis.call('HGET', KEYS[1], 'status')
if st then return { 'exists', st } end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
redis.call('HSET', KEYS[1], 'status', 'pending', 'round', '0', 'updated_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
append_update(KEYS[2], ARGV[3], ARGV[2], 'pending', '0', '0', 'accepted', '', '')
return { 'created' }
