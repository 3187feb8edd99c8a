//! The Lua scripts that make the Redis store's multi-key steps atomic on
//! the server (one round trip each).
//!
//! Every script takes the namespace's epoch and sequence keys as `KEYS[1]`
//! and `KEYS[2]` and answers `{epoch, seq, result}`, so every round trip
//! tells the replica whether the server still holds the history it knows
//! (see `generation`). Scripts that write what routing depends on (pins)
//! increment the sequence. The scripts that read or write pins also take
//! this replica's own write count `NS:writer:ID` as their last key and
//! answer it fourth, `{epoch, seq, result, writes}`: the pin writers
//! increment it (and keep it twice the pins' lifetime, so that it outlives
//! them whatever the replicas' clocks say), the lookup reads it.

/// Sets `KEYS[1]` to `ARGV[2]` if it still holds `ARGV[1]` (empty:
/// absent; compared with runs of blanks as one, none at either end, as a
/// reader splits it) and answers nil; else answers what it holds. Not a
/// generation-reporting script: the record it writes routes nothing.
pub(super) const SET_IF_STILL: &str = r"
local now = redis.call('GET', KEYS[1])
local read = ((now or ''):gsub('%s+', ' '):gsub('^ ', ''):gsub(' $', ''))
if read == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return false
end
return now
";

/// Reads the pins `KEYS[3..n-1]` and, for each, its identity's hash
/// (`ARGV[1]` is the identity key prefix); `KEYS[n]` is the write count.
pub(super) const LOOKUP: &str = r"
local out = {}
for i = 3, #KEYS - 1 do
  local pin = redis.call('GET', KEYS[i])
  if pin then
    out[i - 2] = {pin, redis.call('HGETALL', ARGV[1] .. string.sub(pin, 1, 16))}
  else
    out[i - 2] = false
  end
end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', out,
  tonumber(redis.call('GET', KEYS[#KEYS]) or '0')}
";

/// For each pin `KEYS[3..n-1]`, sets it to the matching `ARGV[3..]` unless
/// it is set (TTL `ARGV[1]` ms); answers, for each, whether it was set, the
/// pin in force and its identity's hash (`ARGV[2]` is the identity key
/// prefix). Each pin set increments the sequence; the write count
/// `KEYS[n]` is incremented once.
pub(super) const PIN_ALL_IF_ABSENT: &str = r"
local out = {}
for i = 3, #KEYS - 1 do
  local value = ARGV[i]
  local done = false
  for attempt = 1, 2 do
    if not done then
      if redis.call('SET', KEYS[i], value, 'NX', 'PX', ARGV[1]) then
        redis.call('INCR', KEYS[2])
        out[i - 2] = {1, value, redis.call('HGETALL', ARGV[2] .. string.sub(value, 1, 16))}
        done = true
      else
        local pin = redis.call('GET', KEYS[i])
        if pin then
          out[i - 2] = {0, pin, redis.call('HGETALL', ARGV[2] .. string.sub(pin, 1, 16))}
          done = true
        end
      end
    end
  end
  if not done then return redis.error_reply('pin vanished twice') end
end
local writes = redis.call('INCR', KEYS[#KEYS])
redis.call('PEXPIRE', KEYS[#KEYS], math.floor(tonumber(ARGV[1]) * 2))
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', out, writes}
";

/// Founds an identity: unless pin `KEYS[4]` is set, writes the identity
/// hash `KEYS[3]` (`rec` `ARGV[3]`, `last` `ARGV[4]`, `egress` `ARGV[5]`
/// unless empty) and sets each pin `KEYS[4..n-1]` to the matching
/// `ARGV[6..]` unless it is set; pins and the identity live `ARGV[1]` ms
/// (`ARGV[2]` is the identity key prefix). Answers `{1, rows}` with a row
/// per pin as `PIN_ALL_IF_ABSENT` does, or, when `KEYS[4]` was someone
/// else's and nothing was written, `{0, {row}}` with its row. The write
/// count `KEYS[n]` is incremented once either way.
pub(super) const FOUND: &str = r"
local function row(set, pin)
  return {set, pin, redis.call('HGETALL', ARGV[2] .. string.sub(pin, 1, 16))}
end
local function answer(result)
  local writes = redis.call('INCR', KEYS[#KEYS])
  redis.call('PEXPIRE', KEYS[#KEYS], math.floor(tonumber(ARGV[1]) * 2))
  return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', result, writes}
end
if #KEYS >= 5 and not redis.call('SET', KEYS[4], ARGV[6], 'NX', 'PX', ARGV[1]) then
  local pin = redis.call('GET', KEYS[4])
  if not pin then return redis.error_reply('pin vanished') end
  return answer({0, {row(0, pin)}})
end
redis.call('HSET', KEYS[3], 'rec', ARGV[3], 'last', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[3], 'egress', ARGV[5]) end
redis.call('PEXPIRE', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[2])
local out = {}
if #KEYS >= 5 then
  redis.call('INCR', KEYS[2])
  out[1] = row(1, ARGV[6])
end
for i = 5, #KEYS - 1 do
  local value = ARGV[i + 2]
  if redis.call('SET', KEYS[i], value, 'NX', 'PX', ARGV[1]) then
    redis.call('INCR', KEYS[2])
    out[i - 3] = row(1, value)
  else
    local pin = redis.call('GET', KEYS[i])
    if not pin then return redis.error_reply('pin vanished') end
    out[i - 3] = row(0, pin)
  end
end
return answer({1, out})
";

/// Retires identity hash `KEYS[3]` with record `ARGV[1]` unless it is
/// retired (the first retirement stands), keeps it at least `ARGV[2]` ms
/// more (never less than it had: its pins live as long as it would have
/// live, and a record gone before them would be rebuilt live by a restore
/// or an import), and publishes the identity id `ARGV[4]` on channel
/// `ARGV[3]` for the other
/// replicas' hit caches. A Redis user not allowed that channel (an ACL
/// without pub/sub) still retires: the publish is best effort, and such a
/// user cannot subscribe either, so no replica caches. The write count
/// `KEYS[4]` is incremented (kept twice the pins' lifetime `ARGV[5]`), as
/// for a pin: a failover that loses the retirement is then noticed by the
/// replica that wrote it, however far other replicas move the sequence.
/// With `ARGV[6]` `1` it answers the identity's hash as it now is (for a
/// journal that does not hold it yet), else `1`.
pub(super) const RETIRE: &str = r"
redis.call('HSETNX', KEYS[3], 'retired', ARGV[1])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
redis.call('INCR', KEYS[2])
pcall(redis.call, 'PUBLISH', ARGV[3], ARGV[4])
local writes = redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], math.floor(tonumber(ARGV[5]) * 2))
local result = 1
if ARGV[6] == '1' then result = redis.call('HGETALL', KEYS[3]) end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', result, writes}
";

/// Records that exit `ARGV[1]` died at `ARGV[2]` (in hash `KEYS[3]`)
/// unless a later death is recorded.
pub(super) const EXIT_DEATH: &str = r"
local current = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', 1}
";

/// Reads the namespace's generation.
pub(super) const GENERATION: &str = r"
if #KEYS >= 3 then
  return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', 1,
    tonumber(redis.call('GET', KEYS[3]) or '0')}
end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', 1}
";

/// Writes the identity `KEYS[3]`: its record `ARGV[1]`, last use `ARGV[2]`,
/// retirement `ARGV[3]` and egress address `ARGV[4]` (empty: none), merged
/// with what the server holds. The record, the first retirement and the
/// first egress address stand; the latest last use wins (after a loss each
/// replica's journal restores the identity with only the uses that replica
/// saw, in any order). It then lives `ARGV[5]` ms, or once retired at
/// least `ARGV[6]` ms more (as `RETIRE` keeps it). A retirement it writes
/// where there was none is published as `RETIRE` publishes it (identity id
/// `ARGV[8]` on channel `ARGV[7]`): a restore that writes back a
/// retirement Redis lost reaches the hit caches that answered it live.
pub(super) const WRITE_IDENTITY: &str = r"
redis.call('HSETNX', KEYS[3], 'rec', ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[3], 'last') or '0') or 0
if tonumber(ARGV[2]) > last then redis.call('HSET', KEYS[3], 'last', ARGV[2]) end
local newly_retired = false
if ARGV[3] ~= '' then
  newly_retired = redis.call('HSETNX', KEYS[3], 'retired', ARGV[3]) == 1
end
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[3], 'egress', ARGV[4]) end
if redis.call('HEXISTS', KEYS[3], 'retired') == 1 then
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[6]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
  end
else
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
if newly_retired and ARGV[7] then pcall(redis.call, 'PUBLISH', ARGV[7], ARGV[8]) end
redis.call('INCR', KEYS[2])
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', 1}
";

/// Records uses of the identity `KEYS[3]`: last use `ARGV[1]` (unless a
/// later one is recorded: replicas write their coalesced uses in any
/// order), `ARGV[2]` more requests, whether one worked (`ARGV[3]`, `1` or
/// `0`) and the egress address unless one is recorded (`ARGV[4]`, empty for
/// none). Only while the identity exists: a hash written after it expired
/// or was lost would hold no record and no TTL, and stay forever. The last
/// use of a retired identity stays as it was (an answer that arrives after
/// its retirement is no use of it): a restore that takes an idle one back
/// live judges its idleness again from it. Answers whether it wrote.
pub(super) const TOUCH: &str = r"
local written = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  local last = tonumber(redis.call('HGET', KEYS[3], 'last') or '0') or 0
  if tonumber(ARGV[1]) > last and redis.call('HEXISTS', KEYS[3], 'retired') == 0 then
    redis.call('HSET', KEYS[3], 'last', ARGV[1])
  end
  redis.call('HINCRBY', KEYS[3], 'reqs', ARGV[2])
  if ARGV[3] == '1' then redis.call('HSET', KEYS[3], 'worked', '1') end
  if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[3], 'egress', ARGV[4]) end
  written = 1
end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', written}
";

/// Records the egress address `ARGV[1]` of the identity `KEYS[3]` unless
/// one is recorded, and answers the recorded one; nothing (and no write)
/// when the identity does not exist, for the reason [`TOUCH`] gives. A
/// first address is published (identity id `ARGV[4]` on channel `ARGV[3]`,
/// best effort, as [`RETIRE`] does): the hit caches stop answering the
/// identity without it, since a new tunnel is checked against it. The
/// write count `KEYS[4]` is incremented whatever happened (kept twice the
/// pins' lifetime `ARGV[2]`): a failover that loses the address, which
/// every later tunnel of the identity is checked against, is then noticed
/// by the replica that wrote it. (This runs once per identity, at its first
/// answer, so the extra count costs nothing worth saving.)
pub(super) const RECORD_EGRESS: &str = r"
local egress = false
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('HSETNX', KEYS[3], 'egress', ARGV[1]) == 1 then
    redis.call('INCR', KEYS[2])
    pcall(redis.call, 'PUBLISH', ARGV[3], ARGV[4])
  end
  egress = redis.call('HGET', KEYS[3], 'egress')
end
local writes = redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], math.floor(tonumber(ARGV[2]) * 2))
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', egress, writes}
";

/// Sets pin `KEYS[3]` to `ARGV[2]` (its time to live kept) if it still
/// holds `ARGV[1]` and Redis keeps it at least until `ARGV[3]` (Unix ms;
/// `ARGV[4]` is now): the same pin with a later cookie expiry, which must
/// end, as routing reads it, while the key is still there (its time to
/// live was set by whichever replica wrote it, with the lifetimes in force
/// then). Answers 1 when it was set.
pub(super) const EXTEND_PIN: &str = r"
local set = 0
if redis.call('GET', KEYS[3]) == ARGV[1] then
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl == -1 or tonumber(ARGV[4]) + ttl >= tonumber(ARGV[3]) then
    redis.call('SET', KEYS[3], ARGV[2], 'KEEPTTL')
    redis.call('INCR', KEYS[2])
    set = 1
  end
end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', set}
";

/// Makes the fleet's quarantine after a loss (`KEYS[3]`, expiring when it
/// ends) last at least `ARGV[1]` ms more (`0` only reads it); answers how
/// long it lasts from now (0: no quarantine). Kept as a time to live, on
/// Redis's own clock: an end written as a wall-clock time would be ended
/// early, or at once, by a replica whose clock reads ahead of Redis's or
/// behind it. The key's value is the end as the writer's clock reads it
/// (`ARGV[2]`, Unix ms), for releases that read it.
pub(super) const QUARANTINE: &str = r"
local left = redis.call('PTTL', KEYS[3])
if left < 0 then left = 0 end
local wanted = tonumber(ARGV[1])
if wanted > left then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[1])
  left = wanted
end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or '0', left}
";

/// Replaces the epoch by `ARGV[2]` if it still is `ARGV[1]` (`''`: none),
/// so that of several replicas noticing one loss, one epoch wins; answers
/// the epoch in force. An epoch founded where there was none also sets the
/// founding mark `KEYS[3]` for `ARGV[3]` ms, in the same step: replicas
/// that start without history meanwhile wait it out too (see `recovery`).
pub(super) const NEW_EPOCH: &str = r"
local current = redis.call('GET', KEYS[1]) or ''
if current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  if current == '' then redis.call('SET', KEYS[3], '1', 'PX', ARGV[3]) end
  current = ARGV[2]
end
return {current, redis.call('GET', KEYS[2]) or '0', 1}
";

/// Founds the namespace's pin-hashing key `KEYS[1]` as `ARGV[1]` unless
/// one is set, and only where no pin was ever written (the sequence
/// `KEYS[2]` is absent or 0); answers the key in force, or `false` when
/// there is none though pins were written: they were hashed with a key
/// that is gone, and a new one would miss every one of them.
pub(super) const FOUND_HASH_KEY: &str = r"
local held = redis.call('GET', KEYS[1])
if held then return held end
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then return false end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";
