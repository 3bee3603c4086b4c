-- The audit consumer's file; its tables come in the migrations that follow.
SELECT 1;
