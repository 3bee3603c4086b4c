-- The reconciler's reports: one per day (the day as cut in the configured time zone). A re-run
-- of a day replaces its report and its discrepancies, and counts in `runs`.
CREATE TABLE reconciler.reports (
    report_date   date PRIMARY KEY,
    report_id     uuid NOT NULL,
    status        text NOT NULL
                    CHECK (status IN ('completed', 'completed_with_errors', 'failed')),
    time_zone     text NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    discrepancies integer NOT NULL CHECK (discrepancies >= 0),
    -- The whole report as printed and published.
    report        jsonb NOT NULL,
    runs          integer NOT NULL DEFAULT 1 CHECK (runs >= 1),
    first_run_at  timestamptz NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL
);

-- The discrepancies of each day's report, one row each, for queries by kind or account.
CREATE TABLE reconciler.discrepancies (
    report_date date NOT NULL REFERENCES reconciler.reports (report_date) ON DELETE CASCADE,
    seq         integer NOT NULL,
    kind        text NOT NULL,
    account_id  uuid,
    transfer_id uuid,
    currency    text,
    expected    numeric,
    actual      numeric,
    difference  numeric,
    detail      text,
    PRIMARY KEY (report_date, seq)
);
CREATE INDEX discrepancies_by_kind ON reconciler.discrepancies (kind, report_date);
CREATE INDEX discrepancies_by_account ON reconciler.discrepancies (account_id)
    WHERE account_id IS NOT NULL;
