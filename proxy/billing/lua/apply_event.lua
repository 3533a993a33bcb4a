-- Apply one verified Stripe event to one tenant, atomically: the ledger makes a redelivery a
-- no-op (even 100 concurrent copies), a per-subscription watermark keeps an older event from
-- overwriting newer state, and a finished subscription never comes back.
-- KEYS[1] tenant hash   KEYS[2] ledger entry for this event
-- ARGV: event_id, created, subscription ('' if none), terminal ('1'/'0'), mode,
--       ledger_ttl_s, invalidation channel, tenant id, then field/value pairs
-- Returns 'no_tenant' | 'duplicate' | 'stale' | 'applied' | 'recorded'.
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_tenant' end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[6]) then return 'duplicate' end

local created = tonumber(ARGV[2])
local sub = ARGV[3]
local mode = ARGV[5]
if sub ~= '' then
  if redis.call('HEXISTS', KEYS[1], 'sub_done:' .. sub) == 1 then return 'stale' end
  local mark = tonumber(redis.call('HGET', KEYS[1], 'sub_wm:' .. sub) or '0')
  if created < mark then return 'stale' end
  -- `created` has one-second resolution and delivery order is not guaranteed: within the
  -- same second, 'incomplete' is the older state, as a subscription never returns to it
  -- (its .created event can arrive after the .updated that activated it).
  if created == mark and mode == 'subscription' then
    local incoming = ''
    for i = 9, #ARGV, 2 do if ARGV[i] == 'status' then incoming = ARGV[i + 1] end end
    local recorded = redis.call('HMGET', KEYS[1], 'subscription_id', 'status')
    if incoming == 'incomplete' and recorded[1] == sub and recorded[2] ~= 'incomplete' then
      return 'stale'
    end
  end
  redis.call('HSET', KEYS[1], 'sub_wm:' .. sub, created)
  if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'sub_done:' .. sub, created) end
end

local status = redis.call('HGET', KEYS[1], 'status') or ''
local current = redis.call('HGET', KEYS[1], 'subscription_id') or ''
local result = 'applied'
if mode == 'invoice_failed' then
  if status == 'active' or status == 'trialing' then
    redis.call('HSET', KEYS[1], 'status', 'past_due', 'past_due_since', created)
  else
    result = 'recorded'
  end
elseif mode == 'invoice_paid' then
  if status == 'past_due' then
    redis.call('HSET', KEYS[1], 'status', 'active', 'past_due_since', '')
  else
    result = 'recorded'
  end
else
  local fields = {}
  for i = 9, #ARGV, 2 do fields[ARGV[i]] = ARGV[i + 1] end
  -- An event about another, older subscription does not take over a tenant whose current
  -- subscription is different, unless it is live (a new subscription replacing the old).
  local live = fields['status'] == 'active' or fields['status'] == 'trialing'
      or fields['status'] == 'past_due'
  if mode == 'subscription' and current ~= '' and sub ~= current and not live then
    return 'recorded'
  end
  for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
  if mode == 'subscription' then
    if fields['status'] == 'past_due' then
      if (redis.call('HGET', KEYS[1], 'past_due_since') or '') == '' then
        redis.call('HSET', KEYS[1], 'past_due_since', created)
      end
    else
      redis.call('HSET', KEYS[1], 'past_due_since', '')
    end
  end
end
redis.call('PUBLISH', ARGV[7], 'tenant:' .. ARGV[8])
return result
