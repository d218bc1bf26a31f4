-- Record one member's proposal for the current round, once.
-- KEYS: 1 deliberation hash, 2 proposals hash, 3 event stream
-- ARGV: 1 now_ms, 2 ttl ms, 3 event log max length, 4 member, 5 round, 6 proposal JSON
-- Returns {outcome, received, n, current round, rounds, status}:
--   recorded | round_complete (this proposal completed the round) | duplicate (already had it)
--   | stale (another round, or not collecting) | terminal | unknown_member | missing
local t = redis.call('HMGET', KEYS[1], 'status', 'round', 'n', 'member_ids', 'rounds')
local status = t[1]
if not status then return { 'missing', '0', '0', '0', '0', '' } end
local round, n, rounds = t[2] or '0', t[3] or '0', t[5] or '1'
local received = redis.call('HGET', KEYS[1], 'received:' .. round) or '0'
local function answer(outcome) return { outcome, tostring(received), n, round, rounds, status } end
if D_TERMINAL[status] then return answer('terminal') end
-- A member id never holds a comma: one that does would match a run of members of the list.
if ARGV[4] == '' or string.find(ARGV[4], ',', 1, true)
  or not string.find(',' .. (t[4] or '') .. ',', ',' .. ARGV[4] .. ',', 1, true) then
  return answer('unknown_member')
end
local field = ARGV[5] .. ':' .. ARGV[4]
if redis.call('HEXISTS', KEYS[2], field) == 1 then return answer('duplicate') end
if (status ~= 'generating' and status ~= 'reviewing') or ARGV[5] ~= round then
  return answer('stale')
end
redis.call('HSET', KEYS[2], field, ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
received = redis.call('HINCRBY', KEYS[1], 'received:' .. round, 1)
redis.call('HSET', KEYS[1], 'updated_ms', ARGV[1])
append_update(KEYS[3], ARGV[3], ARGV[2], status, round, tostring(received), 'proposal',
  ARGV[4], ARGV[6])
if received >= tonumber(n) then return answer('round_complete') end
return answer('recorded')
