-- Fleet task-state scripts: shared helpers.
--
-- Every key one call touches carries the session's hash tag {s:<sid>}, so each script is atomic
-- on Redis Cluster too. Client events are appended to the session log here, inside the same
-- atomic step as the state change, so a change and its event are never seen apart.

local TERMINAL = { completed = true, failed = true, cancelled = true, timed_out = true }

-- A session's keys live `ttl` ms after its last activity. Setting a TTL costs a command per
-- key, so the scripts renew the session's (hash, log) only when the session hash's
-- `ttl_refreshed_ms` is older than a hundredth of the TTL, and a task's (when it changes) when
-- its own `ttl_refreshed_ms`, or its creation, is that old: keys expire between 99 % and 100 %
-- of the TTL after the last activity.
local function renewal_due(last_ms, now, ttl)
  return (tonumber(now) - (tonumber(last_ms) or 0)) * 100 >= tonumber(ttl)
end
