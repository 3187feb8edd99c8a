//! The Lua scripts that make the Redis store's multi-key steps atomic on
//! the server (one round trip each).

/// Reads the pins `KEYS` and, for each, its identity's hash (`ARGV[1]` is
/// the identity key prefix).
pub(super) const LOOKUP: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local pin = redis.call('GET', key)
  if pin then
    out[i] = {pin, redis.call('HGETALL', ARGV[1] .. string.sub(pin, 1, 16))}
  else
    out[i] = false
  end
end
return out
";

/// Sets pin `KEYS[1]` to `ARGV[1]` unless it is set (TTL `ARGV[2]` ms);
/// returns whether it was set, the pin in force and its identity's hash.
pub(super) const PIN_IF_ABSENT: &str = r"
for attempt = 1, 2 do
  if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1, ARGV[1], redis.call('HGETALL', ARGV[3] .. string.sub(ARGV[1], 1, 16))}
  end
  local pin = redis.call('GET', KEYS[1])
  if pin then
    return {0, pin, redis.call('HGETALL', ARGV[3] .. string.sub(pin, 1, 16))}
  end
end
return redis.error_reply('pin vanished twice')
";

/// Records that exit `ARGV[1]` died at `ARGV[2]` unless a later death is
/// recorded.
pub(super) const EXIT_DEATH: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
";
