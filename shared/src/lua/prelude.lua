-- Fleet task-state scripts: shared helpers.
--
-- Every key one call touches carries the session's hash tag {s:<sid>}, so each script is atomic
-- on Redis Cluster too. Client events are appended to the session log here, inside the same
-- atomic step as the state change, so a change and its event are never seen apart.

local TERMINAL = { completed = true, failed = true, cancelled = true, timed_out = true }
