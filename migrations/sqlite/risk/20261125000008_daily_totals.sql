-- The approved amount per source account, UTC day and currency (see PostgreSQL's risk
-- migrations); the amount is decimal text.
CREATE TABLE daily_totals (
    account_id BLOB NOT NULL,
    day        TEXT NOT NULL,
    currency   TEXT NOT NULL,
    approved   TEXT NOT NULL,
    PRIMARY KEY (account_id, day, currency)
);
