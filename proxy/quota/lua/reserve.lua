-- Reserve quota for one call atomically: every limit is checked before anything is written,
-- so a refusal changes nothing and an acceptance changes everything at once.
-- KEYS[1] used counter of the current period, named "<stem><period_start>"
-- KEYS[2] rate state (GCRA arrival time, us)
-- KEYS[3] held reservations (zset "id:period:cost" -> deadline ms)
-- KEYS[4] reaped reservations (zset "id:period:cost" -> forget-after ms)
-- ARGV: cost, allowed_total (-1 = unlimited), interval_us (0 = no rate limit),
--       tolerance_us ((burst - 1) * interval_us), now_us, now_ms, counter_ttl_ms,
--       reservation_id, reservation_deadline_ms, period_start
-- Expiries are relative (PEXPIRE): the caller's clock, not Redis's, decides periods.
-- Returns {status, used_after, retry_after_ms}; status 1 allowed, 0 quota, 2 rate.
local cost = tonumber(ARGV[1])
local allowed_total = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local now_us = tonumber(ARGV[5])
local now_ms = tonumber(ARGV[6])
local period = ARGV[10]

-- Reservations whose holder died (killed mid-call) are refunded once overdue, into their own
-- period; a late commit finds them in the reaped set and charges them again exactly once.
-- An overdue member of another period (the tenant's period moved, e.g. by a webhook) is
-- refunded here too: left held, it would wait for a reserve in a period that may never come
-- again. Its counter's name is KEYS[1] with the period swapped, so it shares KEYS[1]'s
-- {tenant} hash tag and slot: Redis (7.0 checks it) and Cluster run a script touching an
-- undeclared key of its own slot; its name cannot be declared, the period is only known here.
local overdue = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms)
if #overdue > 0 then
  local back = {}
  for _, member in ipairs(overdue) do
    local p, c = string.match(member, ':(%d+):(%d+)$')
    back[p] = (back[p] or 0) + tonumber(c)
    redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[7]), member)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
  local stem = string.sub(KEYS[1], 1, #KEYS[1] - #period)
  for p, units in pairs(back) do
    local counter = stem .. p
    -- An expired counter has nothing left to give back (and must not turn negative).
    if redis.call('EXISTS', counter) == 1 then redis.call('DECRBY', counter, units) end
  end
end

local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if allowed_total >= 0 and used + cost > allowed_total then
  return {0, used, 0}
end

local tat = 0
if interval > 0 then
  tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now_us then tat = now_us end
  if tat - now_us > tolerance then
    return {2, used, math.ceil((tat - tolerance - now_us) / 1000)}
  end
end

local after = redis.call('INCRBY', KEYS[1], cost)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if interval > 0 then
  local next_tat = tat + interval
  -- %d keeps all digits: Lua's default number format would round microsecond timestamps.
  redis.call('SET', KEYS[2], string.format('%d', next_tat),
             'PX', string.format('%d', math.ceil((next_tat - now_us) / 1000) + 1000))
end
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[8] .. ':' .. period .. ':' .. cost)
redis.call('PEXPIRE', KEYS[3], ARGV[7])
return {1, after, 0}
