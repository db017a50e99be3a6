-- The gate's atomic check: consent, caps, fatigue, quiet hours, then the reservation, in one step.
-- All keys belong to one customer and share its {shop:person} hash tag (Redis Cluster safe).
-- KEYS[1] policy (hash; its field v marks counters Redis holds in full)  KEYS[2] sent (zset
--   message_id -> ms)  KEYS[3] channels (hash message_id -> "<channel> <log entry id>")
--   KEYS[4] log (stream: decisions kept for the durable log)
-- ARGV: 1 mode (check|dry|peek)  2 message_id  3 channel  4 now ms  5 transactional (0|1)
--   6 global cap  7 channel cap  8 fatigue threshold (hundredths)  9 fatigue window ms
--   10 key ttl ms  11 log retention ms, then the calendar: five arguments per time zone the
--   shop's customers use (zone "" = customers without one of their own): zone, local day start
--   ms, next local midnight ms, quiet hours now (0|1), quiet hours end ms.
-- Returns {status, allowed, reason, retry_at_ms, today_total, last_window, fatigue,
--   log_entry_id, channel1, count1, ...}; status OK, REPLAY, CONFLICT (the message_id is
--   reserved on another channel; reason holds it), REBUILD (Redis does not hold the customer in
--   full: lost, never seen, or, for a check, only their counts) or TZ (the customer's zone has
--   no row; reason holds it). Counts are as before this message.
local policy, sent, channels, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, message_id, channel = ARGV[1], ARGV[2], ARGV[3]
local now, transactional = tonumber(ARGV[4]), ARGV[5] == '1'
local global_cap, channel_cap, threshold = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local window, ttl, retention = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])

local fields = redis.call('HMGET', policy, 'v', 'tz', 'consent', 'unsub', 'suppressed')
-- v: 1 when Redis holds the customer in full, c when it holds their counts but not their policy.
if not fields[1] or (fields[1] ~= '1' and mode ~= 'peek') then
  return {'REBUILD', 0, '', 0, 0, 0, 0, ''}
end
local tz = fields[2] or ''
local day_start, next_midnight, quiet, quiet_end
for i = 12, #ARGV, 5 do
  if ARGV[i] == tz then
    day_start, next_midnight = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    quiet, quiet_end = ARGV[i + 3] == '1', tonumber(ARGV[i + 4])
    break
  end
end
if not day_start then
  return {'TZ', 0, tz, 0, 0, 0, 0, ''}
end

-- Counts before this message: forget what left the window (a message sent at T counts until
-- T + window, exclusive), then count.
local expired = redis.call('ZRANGEBYSCORE', sent, '-inf', now - window)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', sent, '-inf', now - window)
  redis.call('HDEL', channels, unpack(expired))
end
local last_window = redis.call('ZCARD', sent)
local today = redis.call('ZRANGEBYSCORE', sent, day_start, '+inf')
local by_channel, today_total = {}, #today
if today_total > 0 then
  local sent_on = redis.call('HMGET', channels, unpack(today))
  for _, reservation in ipairs(sent_on) do
    if reservation then
      local c = string.match(reservation, '^%S+')
      by_channel[c] = (by_channel[c] or 0) + 1
    end
  end
end
local fatigue = math.min(last_window * 10, 100)

local function answer(status, allowed, reason, retry_at, entry)
  local out = {status, allowed, reason, retry_at, today_total, last_window, fatigue, entry or ''}
  for c, n in pairs(by_channel) do
    out[#out + 1] = c
    out[#out + 1] = n
  end
  return out
end

if mode == 'peek' then
  return answer('OK', 0, '', 0)
end
local reserved = redis.call('HGET', channels, message_id)
if reserved then
  local reserved_on = string.match(reserved, '^%S+')
  if reserved_on ~= channel then
    return answer('CONFLICT', 0, reserved_on, 0)
  end
  return answer('REPLAY', 1, '', 0)
end

local function listed(list, item)
  return list and string.find(list, ',' .. item .. ',', 1, true) ~= nil
end

local function decide()
  if listed(fields[5], channel) then
    return 0, 'suppressed:' .. channel, 0
  end
  if transactional then
    return 1, '', 0
  end
  if fields[4] == '1' then
    return 0, 'global_unsubscribe', 0
  end
  if not listed(fields[3], channel) then
    return 0, 'no_consent:' .. channel, 0
  end
  if today_total >= global_cap then
    return 0, 'global_cap_reached:' .. today_total .. '/' .. global_cap, next_midnight
  end
  local on_channel = by_channel[channel] or 0
  if on_channel >= channel_cap then
    return 0, 'channel_cap_reached:' .. channel .. ':' .. on_channel .. '/' .. channel_cap,
      next_midnight
  end
  if fatigue >= threshold then
    -- Eligible again once enough of the oldest messages have left the window.
    local allowed_max = math.ceil(threshold / 10) - 1
    local leaving = redis.call('ZRANGE', sent, last_window - allowed_max - 1,
      last_window - allowed_max - 1, 'WITHSCORES')
    local function hundredths(n) return string.format('%d.%02d', math.floor(n / 100), n % 100) end
    return 0, 'fatigue:' .. hundredths(fatigue) .. '/' .. hundredths(threshold),
      tonumber(leaving[2]) + window
  end
  if quiet then
    return 0, 'quiet_hours', quiet_end
  end
  return 1, '', 0
end

local allowed, reason, retry_at = decide()
if mode == 'dry' then
  return answer('OK', allowed, reason, retry_at)
end
-- The log stream only bridges the moments between this answer and the durable log's next write:
-- entries older than the retention go, and the stream itself with them when the customer is idle.
local entry = redis.call('XADD', log, 'MINID', '~', now - retention, '*', 'm', message_id,
  'c', channel, 'k', transactional and 't' or 'm', 'a', allowed, 'r', reason, 't', now)
redis.call('PEXPIRE', log, retention)
-- Counters live a key ttl past the last message they count; the policy a key ttl past its last
-- use by a decision (then it is rebuilt from the database).
redis.call('PEXPIRE', policy, ttl)
if allowed == 1 and not transactional then
  redis.call('ZADD', sent, now, message_id)
  redis.call('HSET', channels, message_id, channel .. ' ' .. entry)
  redis.call('PEXPIRE', sent, ttl)
  redis.call('PEXPIRE', channels, ttl)
end
return answer('OK', allowed, reason, retry_at, entry)
