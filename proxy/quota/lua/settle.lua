-- Settle a reservation: commit keeps the units, refund gives them back. Idempotent: a
-- reservation already reaped as overdue is re-charged on commit and ignored on refund.
-- KEYS[1] used counter for the period   KEYS[2] reservations (zset)
-- ARGV: reservation_id, cost, action ('commit' | 'refund'), counter_expire_at_ms
local member = ARGV[1] .. ':' .. ARGV[2]
local held = redis.call('ZREM', KEYS[2], member)
if ARGV[3] == 'commit' then
  if held == 0 then
    redis.call('INCRBY', KEYS[1], ARGV[2])
    redis.call('PEXPIREAT', KEYS[1], ARGV[4])
  end
elseif held == 1 then
  redis.call('DECRBY', KEYS[1], ARGV[2])
end
return held
