-- XADDs several entries to one stream in one command.
--
-- Redis serves a reader blocked on a stream after each command: the entries of a pipeline reach
-- it one read at a time (the first alone, the rest in a second read), those of one script in
-- one read. One read is one batch: one handler call, one ack.
--
-- KEYS: 1 the stream
-- ARGV: 1 approximate maximum length (0: uncapped), then for each entry its number of fields n
--       followed by n field/value pairs
-- Returns the ids of the entries, in order.
local key, maxlen = KEYS[1], tonumber(ARGV[1])
local ids = {}
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local args = { 'XADD', key }
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = maxlen
  end
  args[#args + 1] = '*'
  for j = i + 1, i + 2 * n do
    args[#args + 1] = ARGV[j]
  end
  ids[#ids + 1] = redis.call(unpack(args))
  i = i + 1 + 2 * n
end
return ids
