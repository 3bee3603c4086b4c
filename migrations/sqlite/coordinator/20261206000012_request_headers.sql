-- As on PostgreSQL: when the request was made, as its message says, and its correlation-id.
ALTER TABLE transfers ADD COLUMN requested_at TEXT;
ALTER TABLE transfers ADD COLUMN correlation_id TEXT;
