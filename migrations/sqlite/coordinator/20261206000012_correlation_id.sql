-- As on PostgreSQL: the request's correlation-id, which the timers' messages carry on.
ALTER TABLE transfers ADD COLUMN correlation_id TEXT;
