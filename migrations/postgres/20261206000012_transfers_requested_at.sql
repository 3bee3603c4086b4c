-- When the request was made, as its message says (its `ce_time`, or the Kafka record's time):
-- a transfer's latency counts from here, the time it waited in the requests topic included.
-- Null for transfers stored before this column, whose latency counted from `created_at`.
-- Adding a nullable column with no default rewrites nothing.
ALTER TABLE coordinator.transfers ADD COLUMN IF NOT EXISTS requested_at timestamptz;
