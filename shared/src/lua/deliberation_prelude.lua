-- Fleet deliberation-state scripts: shared helpers.
--
-- Every key one call touches carries the deliberation's hash tag {d:<id>}, so each script is
-- atomic on Redis Cluster too. Each state change appends its progress update to the
-- deliberation's event stream in the same atomic step, so a waiting caller never misses one.

local D_TERMINAL = { completed = true, failed = true, timed_out = true, cancelled = true }

-- Appends one progress update; returns its entry id.
-- Entry fields: status, round, received (proposals of the round so far), step (words),
-- agent (the member it is about), d (JSON payload: a proposal, or the final result).
local function append_update(ekey, maxlen, ttl, status, round, received, step, agent, data)
  local id = redis.call('XADD', ekey, 'MAXLEN', '~', maxlen, '*',
    'status', status, 'round', round, 'received', received, 'step', step, 'agent', agent,
    'd', data)
  redis.call('PEXPIRE', ekey, ttl)
  return id
end
