-- Writes one stream entry once per NATS message.
--
-- KEYS[1]  the stream to XADD to
-- KEYS[2]  the message's marker (same hash slot as KEYS[1])
-- ARGV[1]  how long the marker lives, ms
-- ARGV[2]  approximate MAXLEN of the stream (0: uncapped)
-- ARGV[3..] field, value, field, value, ...
--
-- Returns the new entry's id, or false when the marker exists: an earlier delivery of the same
-- message wrote it already (and died before its ack reached NATS). The script runs atomically,
-- so there is never a marker without its entry or an entry without its marker.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
local id
if tonumber(ARGV[2]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return id
