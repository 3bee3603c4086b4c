-- The reconciler's reports on SQLite (the embedded default). Same tables as PostgreSQL's
-- reconciler schema; amounts are decimal text, times fixed-width RFC 3339 text, dates
-- YYYY-MM-DD text, ids 16-byte blobs.
CREATE TABLE reports (
    report_date   TEXT PRIMARY KEY,
    report_id     BLOB NOT NULL,
    status        TEXT NOT NULL
                    CHECK (status IN ('completed', 'completed_with_errors', 'failed')),
    time_zone     TEXT NOT NULL,
    window_start  TEXT NOT NULL,
    window_end    TEXT NOT NULL,
    discrepancies INTEGER NOT NULL CHECK (discrepancies >= 0),
    report        TEXT NOT NULL,
    runs          INTEGER NOT NULL DEFAULT 1 CHECK (runs >= 1),
    first_run_at  TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    finished_at   TEXT NOT NULL
);

CREATE TABLE discrepancies (
    report_date TEXT NOT NULL REFERENCES reports (report_date) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    account_id  BLOB,
    transfer_id BLOB,
    currency    TEXT,
    expected    TEXT,
    actual      TEXT,
    difference  TEXT,
    detail      TEXT,
    PRIMARY KEY (report_date, seq)
);
CREATE INDEX discrepancies_by_kind ON discrepancies (kind, report_date);
CREATE INDEX discrepancies_by_account ON discrepancies (account_id) WHERE account_id IS NOT NULL;
