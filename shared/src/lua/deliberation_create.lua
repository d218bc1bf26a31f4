-- Create a deliberation as `pending`, once.
-- KEYS: 1 deliberation hash, 2 event stream
-- ARGV: 1 now_ms, 2 ttl ms, 3 event log max length, 4 the spec's fingerprint (stored as
--       `spec_fp`), 5.. field/value pairs of the spec (including created_ms)
-- Returns: {'created'} | {'exists', status} (same fingerprint: a retry)
--          | {'conflict', status} (another spec under this id; nothing was changed)
-- A deliberation stored without a fingerprint (created before they were) matches any spec.
local t = redis.call('HMGET', KEYS[1], 'status', 'spec_fp')
local st, fp = t[1], t[2]
if st then
  if fp and fp ~= '' and fp ~= ARGV[4] then return { 'conflict', st } end
  return { 'exists', st }
end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
redis.call('HSET', KEYS[1], 'spec_fp', ARGV[4], 'status', 'pending', 'round', '0',
  'updated_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
append_update(KEYS[2], ARGV[3], ARGV[2], 'pending', '0', '0', 'accepted', '', '')
return { 'created' }
