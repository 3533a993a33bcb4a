-- Settle a reservation: commit keeps the units, refund gives them back. Idempotent: a second
-- commit or refund changes nothing; a commit of a reservation reaped as overdue (and so
-- refunded) charges it again, once. The reaper refunds a reservation into its own period
-- whichever period it was reserving in, so KEYS[1] is right for a reaped one too.
-- KEYS[1] used counter of the reservation's period   KEYS[2] held reservations   KEYS[3] reaped
-- ARGV: reservation_id, cost, action ('commit' | 'refund'), counter_ttl_ms, period_start
local member = ARGV[1] .. ':' .. ARGV[5] .. ':' .. ARGV[2]
local held = redis.call('ZREM', KEYS[2], member)
local reaped = 0
if held == 0 then reaped = redis.call('ZREM', KEYS[3], member) end
if ARGV[3] == 'commit' then
  if reaped == 1 then
    redis.call('INCRBY', KEYS[1], ARGV[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
elseif held == 1 then
  redis.call('DECRBY', KEYS[1], ARGV[2])
end
return held
