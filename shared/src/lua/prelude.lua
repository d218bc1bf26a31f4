-- Fleet task-state scripts: shared helpers.
--
-- Every key one call touches carries the session's hash tag {s:<sid>}, so each script is atomic
-- on Redis Cluster too. Client events are appended to the session log here, inside the same
-- atomic step as the state change, so a change and its event are never seen apart.

local TERMINAL = { completed = true, failed = true, cancelled = true, timed_out = true }

-- Appends one client event to the session log and records it as the session's last event.
-- Returns { previous_event_id, event_id }; the previous id lets a gateway detect a gap. The entry
-- keeps it too (field p), so a reader can tell whether the log lost events before its oldest.
local function append_event(skey, lkey, tid, json, maxlen, ttl)
  local prev = redis.call('HGET', skey, 'last_eid') or ''
  local eid = redis.call('XADD', lkey, 'MAXLEN', '~', maxlen, '*', 't', tid, 'p', prev, 'd', json)
  redis.call('HSET', skey, 'last_eid', eid)
  redis.call('PEXPIRE', lkey, ttl)
  return { prev, eid }
end
