-- When the request was made, as its message says (its `ce_time`, or the Kafka record's time):
-- a transfer's latency counts from here, the time it waited in the requests topic included.
-- Null for transfers stored before this column, whose latency counted from `created_at`.
ALTER TABLE coordinator.transfers ADD COLUMN IF NOT EXISTS requested_at timestamptz;
-- The request's `correlation-id`, carried on by the messages the timers send (aborts, re-sends
-- and the outcomes they lead to) as by those the request's replies cause. Null where the
-- request had none, and for transfers stored before this column.
ALTER TABLE coordinator.transfers ADD COLUMN IF NOT EXISTS correlation_id text;
-- Adding nullable columns with no default rewrites nothing.
