//! The report of one run: what was checked, the totals, and every discrepancy.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::window::Window;
use twophase_messages::money::in_minor_units;

/// What kind of discrepancy. Do not change a value: it is the `kind` label of
/// `twophase_reconciliation_discrepancies`, and stored reports use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An account's balance differs from the replay of its ledger.
    BalanceMismatch,
    /// An account's held amount differs from the sum of its open holds.
    HeldMismatch,
    /// A ledger entry's `balance_after` differs from the sum of its account's entries up to
    /// it: the entry, or one before it, was altered (with the balance, or the replay would
    /// show it).
    LedgerMismatch,
    /// A completed transfer has no debit.
    MissingDebit,
    /// A completed transfer has no credit.
    MissingCredit,
    /// A completed transfer's debit or credit is not of its amount.
    AmountMismatch,
    /// A completed transfer's debit or credit is not in its currency.
    CurrencyMismatch,
    /// A completed transfer's debit is not on its source, or its credit not on its destination.
    AccountMismatch,
    /// A debit or credit of a failed or rejected transfer, or of no transfer that completed.
    UnexpectedEntry,
    /// A hold still open past `stale_hold_after`.
    StaleHold,
    /// A transfer not terminal past `stuck_transfer_after`.
    StuckTransfer,
    /// A transfer with two different outcomes on `transfers.events`.
    ConflictingOutcome,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::BalanceMismatch,
        Kind::HeldMismatch,
        Kind::LedgerMismatch,
        Kind::MissingDebit,
        Kind::MissingCredit,
        Kind::AmountMismatch,
        Kind::CurrencyMismatch,
        Kind::AccountMismatch,
        Kind::UnexpectedEntry,
        Kind::StaleHold,
        Kind::StuckTransfer,
        Kind::ConflictingOutcome,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BalanceMismatch => "balance_mismatch",
            Kind::HeldMismatch => "held_mismatch",
            Kind::LedgerMismatch => "ledger_mismatch",
            Kind::MissingDebit => "missing_debit",
            Kind::MissingCredit => "missing_credit",
            Kind::AmountMismatch => "amount_mismatch",
            Kind::CurrencyMismatch => "currency_mismatch",
            Kind::AccountMismatch => "account_mismatch",
            Kind::UnexpectedEntry => "unexpected_entry",
            Kind::StaleHold => "stale_hold",
            Kind::StuckTransfer => "stuck_transfer",
            Kind::ConflictingOutcome => "conflicting_outcome",
        }
    }
}

/// One thing that does not add up. `difference` is `actual − expected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrepancy {
    pub kind: Kind,
    pub account_id: Option<Uuid>,
    pub transfer_id: Option<Uuid>,
    pub currency: Option<String>,
    pub expected: Option<Decimal>,
    pub actual: Option<Decimal>,
    pub difference: Option<Decimal>,
    /// A sentence for people.
    pub detail: String,
}

impl Discrepancy {
    pub(crate) fn new(kind: Kind, detail: impl Into<String>) -> Discrepancy {
        Discrepancy {
            kind,
            account_id: None,
            transfer_id: None,
            currency: None,
            expected: None,
            actual: None,
            difference: None,
            detail: detail.into(),
        }
    }

    pub(crate) fn account(mut self, id: Uuid) -> Discrepancy {
        self.account_id = Some(id);
        self
    }

    pub(crate) fn transfer(mut self, id: Uuid) -> Discrepancy {
        self.transfer_id = Some(id);
        self
    }

    pub(crate) fn currency(mut self, currency: &str) -> Discrepancy {
        self.currency = Some(currency.to_owned());
        self
    }

    pub(crate) fn amounts(mut self, expected: Decimal, actual: Decimal) -> Discrepancy {
        self.expected = Some(expected);
        self.actual = Some(actual);
        // Saturated: amounts altered past the largest decimal still show as a difference.
        self.difference = Some(actual.saturating_sub(expected));
        self
    }
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Everything was checked and nothing is wrong.
    Completed,
    /// Everything was checked and discrepancies were found.
    CompletedWithErrors,
    /// The run itself could not finish; what it found so far is not a verdict.
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::CompletedWithErrors => "completed_with_errors",
            RunStatus::Failed => "failed",
        }
    }
}

/// Completed transfers of one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyTotal {
    pub currency: String,
    pub count: u64,
    pub amount: Decimal,
}

/// The outcomes of the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub completed: u64,
    pub failed: u64,
    pub rejected: u64,
    /// Completed transfers per currency, by currency code.
    pub by_currency: Vec<CurrencyTotal>,
}

/// What was read from `transfers.events`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsRead {
    /// Records between the start of the read range and its end.
    pub records: u64,
    /// Records that could not be decoded (they are skipped, and logged).
    pub undecodable: u64,
}

/// Reports published before `stored` was a field were all stored.
fn stored_by_default() -> bool {
    true
}

/// The window, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// One run's report, as printed, stored and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub report_id: Uuid,
    pub date: NaiveDate,
    pub time_zone: String,
    pub window: WindowRange,
    pub status: RunStatus,
    /// Whether this run replaced an earlier report of the same day.
    pub replaced: bool,
    /// Whether this report was stored as the day's report. It is not when it failed and the
    /// day has one that did not, or when it is cut in another zone than the day's stored one,
    /// which is in `reconciler.time_zone`.
    #[serde(default = "stored_by_default")]
    pub stored: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Accounts whose balance and holds were checked.
    pub accounts: u64,
    pub events: EventsRead,
    /// Debit and credit ledger entries written in the window.
    pub ledger_entries: u64,
    /// Entries of the window whose transfer was still in flight (committing, or completed after
    /// the events were read): not discrepancies; see the crate documentation.
    pub in_flight_entries: u64,
    pub totals: Totals,
    /// The number of discrepancies of every kind, zeros included.
    pub discrepancy_counts: BTreeMap<Kind, u64>,
    pub discrepancies: Vec<Discrepancy>,
    /// Why the run failed.
    pub error: Option<String>,
}

impl Report {
    /// An empty report of a run starting at `started_at`.
    pub(crate) fn new(window: &Window, started_at: DateTime<Utc>) -> Report {
        Report {
            report_id: Uuid::new_v4(),
            date: window.date,
            time_zone: window.time_zone.name().to_owned(),
            window: WindowRange {
                start: window.start,
                end: window.end,
            },
            status: RunStatus::Completed,
            replaced: false,
            stored: false,
            started_at,
            finished_at: started_at,
            accounts: 0,
            events: EventsRead::default(),
            ledger_entries: 0,
            in_flight_entries: 0,
            totals: Totals::default(),
            discrepancy_counts: Kind::ALL.iter().map(|k| (*k, 0)).collect(),
            discrepancies: Vec::new(),
            error: None,
        }
    }

    /// Sets the discrepancies (sorted by kind, account, transfer), their counts and the status.
    pub(crate) fn set_discrepancies(&mut self, mut found: Vec<Discrepancy>) {
        for d in &mut found {
            if let Some(currency) = d.currency.clone() {
                for amount in [&mut d.expected, &mut d.actual, &mut d.difference]
                    .into_iter()
                    .flatten()
                {
                    *amount = in_minor_units(*amount, &currency);
                }
            }
        }
        found.sort_by(|a, b| {
            (a.kind, a.account_id, a.transfer_id).cmp(&(b.kind, b.account_id, b.transfer_id))
        });
        self.discrepancy_counts = Kind::ALL.iter().map(|k| (*k, 0)).collect();
        for d in &found {
            *self.discrepancy_counts.entry(d.kind).or_default() += 1;
        }
        self.discrepancies = found;
        if self.status != RunStatus::Failed {
            self.status = if self.discrepancies.is_empty() {
                RunStatus::Completed
            } else {
                RunStatus::CompletedWithErrors
            };
        }
    }

    /// Marks the run failed, with the error and its causes. The first reason given is kept.
    pub(crate) fn fail(&mut self, error: &(dyn std::error::Error + 'static)) {
        self.status = RunStatus::Failed;
        if self.error.is_none() {
            let mut text = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            self.error = Some(text);
        }
    }

    /// Whether this report is the verdict of record on its whole day: its run did not fail,
    /// began once the day was over (not a run by hand of the day itself), and cut the day in
    /// `of_record`, the configured zone.
    pub fn is_whole_day_verdict(&self, of_record: &str) -> bool {
        self.status != RunStatus::Failed
            && self.started_at >= self.window.end
            && self.time_zone == of_record
    }

    /// The exit code of `twophase reconcile`: 0 no discrepancies, 1 discrepancies, 3 failed.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            RunStatus::Completed => 0,
            RunStatus::CompletedWithErrors => 1,
            RunStatus::Failed => 3,
        }
    }

    /// The number of discrepancies of one kind.
    pub fn count(&self, kind: Kind) -> u64 {
        self.discrepancy_counts
            .get(&kind)
            .copied()
            .unwrap_or_default()
    }

    /// The report for people: a summary, the totals and a table of discrepancies.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "reconciliation of {} ({}: {} to {})",
            self.date,
            self.time_zone,
            self.window.start.to_rfc3339(),
            self.window.end.to_rfc3339()
        );
        let _ = writeln!(
            out,
            "status        {}{}",
            self.status.as_str(),
            match (self.replaced, self.stored) {
                (true, _) => "  (replaced: true, an earlier report of this day was replaced)",
                (false, true) => "",
                (false, false) => "  (not stored: the day's earlier report is kept)",
            }
        );
        if let Some(error) = &self.error {
            let _ = writeln!(out, "error         {error}");
        }
        let _ = writeln!(out, "accounts      {}", self.accounts);
        let _ = writeln!(
            out,
            "events        {} read, {} undecodable",
            self.events.records, self.events.undecodable
        );
        let _ = writeln!(
            out,
            "ledger        {} debit/credit entries in the window, {} of transfers in flight",
            self.ledger_entries, self.in_flight_entries
        );
        let _ = writeln!(
            out,
            "transfers     {} completed, {} failed, {} rejected",
            self.totals.completed, self.totals.failed, self.totals.rejected
        );
        if !self.totals.by_currency.is_empty() {
            let rows: Vec<Vec<String>> = self
                .totals
                .by_currency
                .iter()
                .map(|t| {
                    vec![
                        t.currency.clone(),
                        t.count.to_string(),
                        t.amount.to_string(),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&table(&["currency", "completed", "amount"], &rows, &[2, 3]));
        }
        out.push('\n');
        if self.discrepancies.is_empty() {
            let verdict = if self.status == RunStatus::Failed {
                "no verdict: the run did not finish its checks"
            } else {
                "no discrepancies"
            };
            let _ = writeln!(out, "{verdict}");
            return out;
        }
        let _ = writeln!(out, "{} discrepancies", self.discrepancies.len());
        let show = |d: Option<Decimal>| d.map(|d| d.to_string()).unwrap_or_default();
        let rows: Vec<Vec<String>> = self
            .discrepancies
            .iter()
            .map(|d| {
                vec![
                    d.kind.as_str().to_owned(),
                    d.account_id.map(|a| a.to_string()).unwrap_or_default(),
                    d.transfer_id.map(|t| t.to_string()).unwrap_or_default(),
                    d.currency.clone().unwrap_or_default(),
                    show(d.expected),
                    show(d.actual),
                    show(d.difference),
                    d.detail.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "kind",
                "account",
                "transfer",
                "currency",
                "expected",
                "actual",
                "difference",
                "detail",
            ],
            &rows,
            &[5, 6, 7],
        ));
        out
    }
}

/// A plain-text table; columns in `right` are right-aligned (numbers).
fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if right.contains(&(i + 1)) {
                let _ = write!(text, "{cell:>w$}", w = widths[i]);
            } else {
                let _ = write!(text, "{cell:<w$}", w = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// The report the discrepancy gauges show before a reconciler's first run, of `reports` newest
/// first: the latest verdict of record on a whole day, so that neither a day run by hand
/// before it was over nor one cut in another zone clears the alert of a day that found
/// something; else the latest that did not fail.
pub(crate) fn shown_at_start<'a>(reports: &'a [Report], of_record: &str) -> Option<&'a Report> {
    reports
        .iter()
        .find(|r| r.is_whole_day_verdict(of_record))
        .or_else(|| reports.iter().find(|r| r.status != RunStatus::Failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let window = Window::of("2026-11-23".parse().unwrap(), chrono_tz::Tz::UTC);
        Report::new(&window, window.end)
    }

    #[test]
    fn only_a_run_of_a_day_that_was_over_in_the_zone_of_record_is_its_verdict() {
        let whole = report();
        assert!(whole.is_whole_day_verdict("UTC"));
        assert!(!whole.is_whole_day_verdict("Europe/Berlin"));
        let mut by_hand = report();
        by_hand.started_at = by_hand.window.end - chrono::TimeDelta::seconds(1);
        assert!(!by_hand.is_whole_day_verdict("UTC"));
        let mut failed = report();
        failed.status = RunStatus::Failed;
        assert!(!failed.is_whole_day_verdict("UTC"));
        let mut found = report();
        found.status = RunStatus::CompletedWithErrors;
        assert!(found.is_whole_day_verdict("UTC"));
    }

    #[test]
    fn a_restart_shows_the_latest_whole_day_verdict_not_a_day_run_before_it_was_over() {
        let whole = report();
        let mut today = Report::new(
            &Window::of("2026-11-24".parse().unwrap(), chrono_tz::Tz::UTC),
            whole.window.end + chrono::TimeDelta::hours(9),
        );
        today.status = RunStatus::Completed;
        let newest_first = [today.clone(), whole.clone()];
        assert_eq!(shown_at_start(&newest_first, "UTC"), Some(&whole));
        // With no verdict on a whole day, the latest that did not fail.
        assert_eq!(shown_at_start(&newest_first[..1], "UTC"), Some(&today));
        let mut failed = today.clone();
        failed.status = RunStatus::Failed;
        assert_eq!(shown_at_start(&[failed], "UTC"), None);
    }

    #[test]
    fn every_kind_is_counted_and_named_as_it_serializes() {
        for kind in Kind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().to_owned())
            );
        }
        let mut r = report();
        let a = Uuid::new_v4();
        r.set_discrepancies(vec![Discrepancy::new(Kind::BalanceMismatch, "x")
            .account(a)
            .amounts("10.00".parse().unwrap(), "10.01".parse().unwrap())]);
        assert_eq!(r.status, RunStatus::CompletedWithErrors);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.discrepancy_counts.len(), Kind::ALL.len());
        assert_eq!(r.count(Kind::BalanceMismatch), 1);
        assert_eq!(r.count(Kind::StaleHold), 0);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "completed_with_errors");
        assert_eq!(json["discrepancy_counts"]["stale_hold"], 0);
        assert_eq!(json["discrepancies"][0]["difference"], "0.01");
        assert_eq!(json["discrepancies"][0]["expected"], "10.00");
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        let table = r.to_table();
        assert!(table.contains("balance_mismatch"), "{table}");
        assert!(table.contains(&a.to_string()), "{table}");
    }

    #[test]
    fn a_difference_past_the_largest_decimal_is_shown_saturated() {
        let d = Discrepancy::new(Kind::BalanceMismatch, "x").amounts(Decimal::MAX, Decimal::MIN);
        assert_eq!(d.difference, Some(Decimal::MIN));
    }

    #[test]
    fn a_clean_run_exits_0_and_a_failed_one_3() {
        let mut r = report();
        r.set_discrepancies(Vec::new());
        assert_eq!((r.status, r.exit_code()), (RunStatus::Completed, 0));
        assert!(r.to_table().contains("no discrepancies"));
        let mut failed = r.clone();
        failed.status = RunStatus::Failed;
        assert!(!failed.to_table().contains("no discrepancies"));
        assert!(failed.to_table().contains("no verdict"));
        r.fail(anyhow::anyhow!("broker down").as_ref());
        r.set_discrepancies(Vec::new());
        assert_eq!((r.status, r.exit_code()), (RunStatus::Failed, 3));
        assert_eq!(r.error.as_deref(), Some("broker down"));
    }
}
