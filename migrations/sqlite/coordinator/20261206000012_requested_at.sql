-- As on PostgreSQL: when the request was made, as its message says.
ALTER TABLE transfers ADD COLUMN requested_at TEXT;
