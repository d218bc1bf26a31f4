-- Register a council subtask's deliberation with its planning session, while the session is open,
-- so that closing the session finds it (and cancels it while it runs).
-- KEYS: 1 session hash ({s:<sid>}: one slot, the session's)
-- ARGV: 1 field (`council:<deliberation id>`), 2 now_ms
-- Returns the session's state: 'open' (registered), another state (nothing written: closed),
-- or 'missing' (no session: nothing written, not recreated without its TTL).
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
if st == 'open' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return st
