-- The audit consumer's schema; its tables come in the migrations that follow.
CREATE SCHEMA IF NOT EXISTS audit;
