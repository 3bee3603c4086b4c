-- A deposit or withdrawal's reference names one movement of its account: the account worker's
-- store looks it up before making another, and this finds it without reading the account's
-- whole ledger.
CREATE INDEX ledger_by_reference ON account.ledger (account_id, reference)
    WHERE reference IS NOT NULL;
