-- As on PostgreSQL: a deposit or withdrawal's reference is looked up before another is made.
CREATE INDEX ledger_by_reference ON ledger (account_id, reference)
    WHERE reference IS NOT NULL;
