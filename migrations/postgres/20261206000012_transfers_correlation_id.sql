-- The request's `correlation-id`, carried on by the messages the timers send (aborts, re-sends
-- and the outcomes they lead to) as by those the request's replies cause. Null where the
-- request had none, and for transfers stored before this column. Adding a nullable column with
-- no default rewrites nothing.
ALTER TABLE coordinator.transfers ADD COLUMN IF NOT EXISTS correlation_id text;
