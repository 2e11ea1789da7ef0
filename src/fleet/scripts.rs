//! The Lua scripts. Each runs atomically on the one Redis, reads the server's clock (`TIME`,
//! so replica clocks never matter) and refuses to write into a store that lost its marker
//! (a restart without persistence: the replica then reseeds budgets before using it).
//!
//! `redis::Script` sends `EVALSHA` and, after a Redis restart (`NOSCRIPT`), loads the script
//! once and retries.

use std::sync::OnceLock;

use redis::Script;

/// Limit check and budget reservation in one round trip, all-or-nothing.
///
/// KEYS: 1 marker, 2 cooldown, 3 limit bucket, 4 client bucket, 5 budget hash.
/// ARGV: 1 has_cooldown, 2 cooldown_shadow, 3 has_limit, 4 limit_T_us, 5 limit_tau_us,
/// 6 limit_shadow, 7 has_client, 8 client_T_us, 9 client_tau_us, 10 client_shadow,
/// 11 has_budget, 12 cost, 13 budget (-1: none), 14 budget_enforce, 15 budget_ttl_s.
///
/// Returns `{code, part, wait_us, remaining, spent, reserved, shadow_bits, marker}`: code 0
/// allowed, 1 refused by `part` (1 cooldown, 2 limit, 3 client, 4 budget), 2 store empty.
/// Shadow bits: 1 cooldown, 2 limit, 4 client, 8 budget (would have refused). `marker`: the
/// marker's value (empty when missing): a reservation belongs to the store seeded with it, and
/// `SETTLE` frees it only there.
///
/// GCRA as governor does it: emission T, tolerance tau = T * (burst - 1); a cell is allowed
/// when max(TAT, now) + T - now <= tau + T, and the wait is the excess. A refusal (or a
/// shadow refusal) leaves the bucket untouched, as governor does.
const ADMIT: &str = r#"
local marker = redis.call('GET', KEYS[1])
if not marker then return {2, 0, 0, 0, 0, 0, 0, ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local shadow = 0
if ARGV[1] == '1' then
  local left = redis.call('PTTL', KEYS[2])
  if left > 0 then
    if ARGV[2] == '1' then shadow = shadow + 1 else return {1, 1, left * 1000, 0, 0, 0, 0, marker} end
  end
end
local function gcra(key, T, tau)
  local v = redis.call('GET', key)
  local tat = (v and tonumber(v)) or 0
  if tat < now then tat = now end
  local new = tat + T
  return new, new - now - tau - T
end
local lnew, cnew, remaining = nil, nil, 0
if ARGV[3] == '1' then
  local T, tau = tonumber(ARGV[4]), tonumber(ARGV[5])
  local new, over = gcra(KEYS[3], T, tau)
  if over > 0 then
    if ARGV[6] == '1' then shadow = shadow + 2 else return {1, 2, over, 0, 0, 0, 0, marker} end
  else
    lnew = new
    remaining = math.floor((tau + T - (new - now)) / T)
  end
end
if ARGV[7] == '1' then
  local T, tau = tonumber(ARGV[8]), tonumber(ARGV[9])
  local new, over = gcra(KEYS[4], T, tau)
  if over > 0 then
    if ARGV[10] == '1' then shadow = shadow + 4 else return {1, 3, over, 0, 0, 0, 0, marker} end
  else
    cnew = new
  end
end
local spent, reserved = 0, 0
if ARGV[11] == '1' then
  spent = tonumber(redis.call('HGET', KEYS[5], 'spent') or '0')
  reserved = tonumber(redis.call('HGET', KEYS[5], 'reserved') or '0')
  local cost, budget = tonumber(ARGV[12]), tonumber(ARGV[13])
  if budget >= 0 and spent + reserved + cost > budget then
    if ARGV[14] == '1' then return {1, 4, 0, 0, spent, reserved, 0, marker} end
    shadow = shadow + 8
  end
end
if lnew then
  redis.call('SET', KEYS[3], string.format('%.0f', lnew), 'PX', math.floor((lnew - now) / 1000) + 1)
end
if cnew then
  redis.call('SET', KEYS[4], string.format('%.0f', cnew), 'PX', math.floor((cnew - now) / 1000) + 1)
end
if ARGV[11] == '1' then
  reserved = redis.call('HINCRBY', KEYS[5], 'reserved', ARGV[12])
  redis.call('EXPIRE', KEYS[5], ARGV[15])
end
return {0, 0, 0, remaining, spent, reserved, shadow, marker}
"#;

/// Replace a reservation by what was charged.
///
/// KEYS: 1 marker, 2 budget hash. ARGV: 1 reserved, 2 charged, 3 budget_ttl_s, 4 the marker
/// value `ADMIT` saw when it reserved.
/// Returns `{spent, reserved}`, or `{-1, -1}` when the store lost its marker (the reservation
/// went with it; the ledger row carries the charge into the reseed). When the marker changed
/// since the reservation (the store came back empty and was reseeded), the reservation went
/// with the old store: the charge is added to `spent` and `reserved` is left alone (it counts
/// only reservations made since the reseed, which are not this request's to free).
const SETTLE: &str = r#"
local marker = redis.call('GET', KEYS[1])
if not marker then return {-1, -1} end
local reserved
if marker == ARGV[4] then
  local r = tonumber(redis.call('HGET', KEYS[2], 'reserved') or '0')
  local dec = tonumber(ARGV[1])
  if dec > r then dec = r end
  -- `0 - dec`, not `-dec`: -0 would reach Redis as "-0", which HINCRBY refuses.
  reserved = redis.call('HINCRBY', KEYS[2], 'reserved', 0 - dec)
else
  reserved = tonumber(redis.call('HGET', KEYS[2], 'reserved') or '0')
end
local spent = redis.call('HINCRBY', KEYS[2], 'spent', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {spent, reserved}
"#;

/// Reseed today's spending after the store came back empty; only the first replica to see the
/// marker missing writes, and the marker goes in with the seed (so no replica reserves against
/// an unseeded budget: `ADMIT` refuses to run without the marker).
///
/// KEYS: 1 marker, 2.. budget hashes. ARGV: 1 marker value, 2 budget_ttl_s, 3.. spent.
/// Returns 1 when it seeded, 0 when another replica had.
const RESEED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do
  redis.call('HSETNX', KEYS[i], 'spent', ARGV[i + 1])
  redis.call('HSETNX', KEYS[i], 'reserved', 0)
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

/// Renew a checkpoint lease if it is still ours. KEYS: 1 lease. ARGV: 1 our value, 2 ms.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Release a checkpoint lease if it is still ours. KEYS: 1 lease. ARGV: 1 our value.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Publish a checkpoint answer: store it (late followers read it), release the lease if it is
/// still ours, and tell every replica.
///
/// KEYS: 1 answer, 2 lease. ARGV: 1 answer bytes, 2 answer ttl ms, 3 our lease value,
/// 4 channel, 5 our token (the message is `f<token>\n<answer>`).
const PUBLISH: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], 'f' .. ARGV[5] .. '\n' .. ARGV[1])
return 1
"#;

fn script(cell: &'static OnceLock<Script>, code: &str) -> &'static Script {
    cell.get_or_init(|| Script::new(code))
}

pub(crate) fn admit() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    script(&S, ADMIT)
}

pub(crate) fn settle() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    script(&S, SETTLE)
}

pub(crate) fn reseed() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    script(&S, RESEED)
}

pub(crate) fn renew() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    script(&S, RENEW)
}

pub(crate) fn publish() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    script(&S, PUBLISH)
}

pub(crate) fn release() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    script(&S, RELEASE)
}
