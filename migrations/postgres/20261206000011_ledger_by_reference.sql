-- A reference names one deposit, or one withdrawal, of its account: `twophase accounts deposit`
-- and `withdraw` look it up before making another, and this finds it without reading the
-- account's whole ledger. (Built in the migration's transaction, so ledger writes wait while it builds: on
-- a ledger of many millions of rows, build it CONCURRENTLY under this name beforehand.)
CREATE INDEX IF NOT EXISTS ledger_by_reference ON account.ledger (account_id, reference)
    WHERE reference IS NOT NULL;
