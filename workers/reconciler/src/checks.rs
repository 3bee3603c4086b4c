//! One run: read the outcomes, then the database, compare, and record the report.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use twophase_account::store::Mismatch;
use twophase_messages::money::in_minor_units;
use twophase_messages::{Envelope, Topics};
use twophase_runtime::db::{Amount, Db, Timestamp, Tx};
use twophase_runtime::{metrics, query_as, Outgoing, Publisher};
use uuid::Uuid;

use crate::events::{self, Ending, OutcomeEvent, Terms};
use crate::report::{CurrencyTotal, Discrepancy, EventsRead, Kind, Report, RunStatus, Totals};
use crate::window::Window;
use crate::{store, ReconcileError, ReconcilerConfig, Settings};

/// How long before the window the ledger is scanned for the entries of the window's completed
/// transfers. Entries older than that (a commit retried for more than a day) are still found,
/// one transfer at a time.
const LEDGER_LOOKBACK: TimeDelta = TimeDelta::days(1);

/// Reconciles one day as cut in `reconciler.time_zone`: checks, stores the report (replacing
/// an earlier one of the day), publishes it and sets the discrepancy gauges. Never fails: a run
/// that cannot finish returns a report with status `failed` and the reason.
pub async fn reconcile(settings: &Settings, date: NaiveDate) -> Report {
    reconcile_in(settings, date, settings.config.time_zone).await
}

/// [`reconcile`], with the day cut in `time_zone`. A report in another zone than
/// `reconciler.time_zone` is stored only while the day has no report in that zone, which it
/// then never replaces: the day's report of record is the configured zone's.
pub async fn reconcile_in(settings: &Settings, date: NaiveDate, time_zone: Tz) -> Report {
    let started = Utc::now();
    let window = Window::of(date, time_zone);
    let mut report = Report::new(&window, started);
    tracing::info!(
        %date,
        time_zone = window.time_zone.name(),
        start = %window.start,
        end = %window.end,
        "reconciling"
    );
    match check(settings, &window, started, &mut report).await {
        Ok(found) => report.set_discrepancies(found),
        Err(e) => report.fail(&e),
    }
    report.finished_at = Utc::now();
    if let Err(e) = store_and_publish(settings, &mut report).await {
        report.fail(&e);
    }
    set_gauges(&report, settings.config.time_zone.name());
    let seconds = (report.finished_at - report.started_at).as_seconds_f64();
    match report.status {
        RunStatus::Completed => tracing::info!(
            %date,
            accounts = report.accounts,
            completed = report.totals.completed,
            seconds,
            "reconciliation found no discrepancies"
        ),
        RunStatus::CompletedWithErrors => {
            let counts: Vec<String> = report
                .discrepancy_counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{}={n}", k.as_str()))
                .collect();
            tracing::warn!(
                %date,
                discrepancies = report.discrepancies.len(),
                by_kind = counts.join(" "),
                seconds,
                "reconciliation found discrepancies"
            );
        }
        RunStatus::Failed => tracing::error!(
            %date,
            error = report.error.as_deref().unwrap_or_default(),
            "reconciliation failed"
        ),
    }
    report
}

/// Every check; the discrepancies found. Fills in the report's counts and totals.
async fn check(
    settings: &Settings,
    window: &Window,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<Vec<Discrepancy>, ReconcileError> {
    let config = &settings.config;
    let grace = TimeDelta::from_std(config.grace).unwrap_or(TimeDelta::zero());

    // The outcomes first: every ledger entry that preceded an outcome read here is then
    // visible to the database reads below.
    let topic = Topics::new(&settings.kafka.topic_prefix).events();
    let scan = {
        let kafka = settings.kafka.clone();
        let (from, until) = (window.start - grace, window.end + grace);
        let idle = config.read_timeout;
        tokio::task::spawn_blocking(move || {
            events::read_outcomes(&kafka, &topic, from, until, idle)
        })
        .await
        .map_err(|e| ReconcileError::Reader(e.to_string()))??
    };
    report.events = EventsRead {
        records: scan.records,
        undecodable: scan.undecodable,
    };
    let outcomes = Outcomes::index(&scan.outcomes, window);
    report.totals = outcomes.totals(&[]);
    let mut found = outcomes.conflicts.clone();

    // 1. Balances and holds, as of one instant.
    let accounts = Db::connect(&settings.database_url, "account", 2)
        .await
        .map_err(ReconcileError::db("connecting to the account schema"))?;
    let balances = twophase_account::store::check_balances(&accounts).await;
    accounts.close().await;
    let (checked, mismatches) = balances.map_err(ReconcileError::Balances)?;
    report.accounts = checked as u64;
    found.extend(mismatches.iter().map(balance_discrepancy));

    // 2 and 4, in one snapshot of both schemas.
    let db = Db::connect_all(&settings.database_url)
        .await
        .map_err(ReconcileError::db("connecting to the database"))?;
    let result = cross_check(&db, window, &outcomes, now, config, report, &mut found).await;
    db.close().await;
    result?;
    Ok(found)
}

/// A debit or credit in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    entry_id: i64,
    account_id: Uuid,
    transfer_id: Uuid,
    kind: String,
    amount: Decimal,
    currency: String,
    created_at: DateTime<Utc>,
}

type EntryRow = (i64, Uuid, Option<Uuid>, String, Amount, String, Timestamp);

impl Entry {
    fn of(row: EntryRow) -> Option<Entry> {
        let (entry_id, account_id, transfer_id, kind, amount, currency, created_at) = row;
        Some(Entry {
            entry_id,
            account_id,
            transfer_id: transfer_id?,
            kind,
            amount: amount.0,
            currency,
            created_at: created_at.0,
        })
    }
}

const ENTRY_COLUMNS: &str = "entry_id, account_id, transfer_id, kind, amount, currency, created_at";

/// Every ledger entry of a transfer, whenever it was written.
async fn entries_of(tx: &mut Tx, id: Uuid) -> Result<Vec<Entry>, ReconcileError> {
    let rows = query_as!(
        tx,
        EntryRow,
        fetch_all,
        &format!(
            "SELECT {ENTRY_COLUMNS} FROM account.ledger WHERE transfer_id = $1 ORDER BY entry_id"
        ),
        id,
    )
    .map_err(ReconcileError::db("reading a transfer's ledger entries"))?;
    Ok(rows.into_iter().filter_map(Entry::of).collect())
}

/// Checks 2 (transfers against the ledger) and 4 (stale holds, stuck transfers).
async fn cross_check(
    db: &Db,
    window: &Window,
    outcomes: &Outcomes,
    now: DateTime<Utc>,
    config: &ReconcilerConfig,
    report: &mut Report,
    found: &mut Vec<Discrepancy>,
) -> Result<(), ReconcileError> {
    let read = ReconcileError::db("reading the ledger and the transfers");
    let mut tx = db
        .begin_snapshot()
        .await
        .map_err(ReconcileError::db("starting a read"))?;
    let grace = TimeDelta::from_std(config.grace).unwrap_or(TimeDelta::zero());
    let since = Timestamp::from(window.start - grace - LEDGER_LOOKBACK);
    let rows = query_as!(
        &mut tx,
        EntryRow,
        fetch_all,
        &format!(
            "SELECT {ENTRY_COLUMNS} FROM account.ledger
             WHERE kind IN ('debit', 'credit') AND created_at >= $1 ORDER BY entry_id"
        ),
        since,
    )
    .map_err(read)?;
    let mut by_transfer: HashMap<Uuid, Vec<Entry>> = HashMap::new();
    for entry in rows.into_iter().filter_map(Entry::of) {
        by_transfer
            .entry(entry.transfer_id)
            .or_default()
            .push(entry);
    }
    // A completed transfer of the window missing a leg in the scanned range is looked up
    // whole, whenever its entries were written.
    for (id, _) in outcomes.completed_in_window() {
        let legs = by_transfer.get(&id).map(Vec::as_slice).unwrap_or_default();
        let has = |kind: &str| legs.iter().any(|e| e.kind == kind);
        if has("debit") && has("credit") {
            continue;
        }
        by_transfer.insert(id, entries_of(&mut tx, id).await?);
    }
    report.ledger_entries = by_transfer
        .values()
        .flatten()
        .filter(|e| window.contains(e.created_at))
        .count() as u64;

    found.extend(check_transfers(outcomes, &by_transfer));

    // Entries of the window that no outcome read explains: completed with its outcome
    // published late, in flight, or unexpected.
    let mut completed_unread = Vec::new();
    for (id, entries) in unexplained(window, outcomes, &by_transfer) {
        let row = query_as!(
            &mut tx,
            (
                String,
                Option<Uuid>,
                Option<Uuid>,
                Option<Amount>,
                Option<String>,
                Option<Timestamp>
            ),
            fetch_optional,
            "SELECT status, from_account, to_account, amount, currency, finished_at
             FROM coordinator.transfers WHERE transfer_id = $1",
            id,
        )
        .map_err(ReconcileError::db("reading a transfer's status"))?;
        let status = row.as_ref().map(|r| r.0.as_str());
        match (status, &row) {
            // Completed in this snapshot, but no outcome was read for it: it was published
            // after the range read (the broker was down, or the coordinator restarted before
            // publishing it). Its legs are checked against the coordinator's terms, which the
            // outcome would have carried, so that no completed transfer goes unchecked; and it
            // counts in the day it completed in, as its outcome would have (the next day's run
            // reads that outcome, but counts only its own day's).
            (
                Some("completed"),
                Some((
                    _,
                    Some(from_account),
                    Some(to_account),
                    Some(amount),
                    Some(currency),
                    finished_at,
                )),
            ) => {
                let terms = Terms {
                    from_account: *from_account,
                    to_account: *to_account,
                    amount: amount.0,
                    currency: currency.clone(),
                };
                check_legs(found, id, &terms, &entries_of(&mut tx, id).await?);
                if finished_at.is_some_and(|at| window.contains(at.0)) {
                    completed_unread.push(terms);
                }
            }
            (Some("committing"), _) => {
                report.in_flight_entries += entries.len() as u64;
            }
            (other, _) => {
                let why = match other {
                    Some(status) => format!("the transfer is {status}"),
                    None => "the coordinator has no such transfer".to_owned(),
                };
                for e in entries {
                    found.push(
                        Discrepancy::new(
                            Kind::UnexpectedEntry,
                            format!(
                                "{} entry #{} without a completed transfer: {why}",
                                e.kind, e.entry_id
                            ),
                        )
                        .account(e.account_id)
                        .transfer(id)
                        .currency(&e.currency)
                        .amounts(Decimal::ZERO, e.amount),
                    );
                }
            }
        }
    }
    report.totals = outcomes.totals(&completed_unread);

    // The currency of each account with a mismatched balance or hold, for the report.
    for d in found.iter_mut().filter(|d| d.currency.is_none()) {
        if let Some(account) = d.account_id {
            let currency = query_as!(
                &mut tx,
                (String,),
                fetch_optional,
                "SELECT currency FROM account.accounts WHERE account_id = $1",
                account,
            )
            .map_err(ReconcileError::db("reading an account's currency"))?;
            d.currency = currency.map(|(c,)| c);
        }
    }

    // 4. What has been open too long.
    let hold_age = TimeDelta::from_std(config.stale_hold_after).unwrap_or(TimeDelta::MAX);
    let holds = query_as!(
        &mut tx,
        (Uuid, Uuid, Amount, String, Timestamp),
        fetch_all,
        "SELECT transfer_id, account_id, amount, currency, created_at FROM account.holds
         WHERE status = 'held' AND created_at < $1 ORDER BY created_at",
        Timestamp::from(now - hold_age),
    )
    .map_err(ReconcileError::db("reading open holds"))?;
    for (transfer, account, amount, currency, since) in holds {
        found.push(
            Discrepancy::new(
                Kind::StaleHold,
                format!(
                    "held since {}, more than {} ago",
                    since.0.to_rfc3339(),
                    humantime::format_duration(config.stale_hold_after)
                ),
            )
            .account(account)
            .transfer(transfer)
            .currency(&currency)
            .amounts(Decimal::ZERO, amount.0),
        );
    }
    let transfer_age = TimeDelta::from_std(config.stuck_transfer_after).unwrap_or(TimeDelta::MAX);
    let stuck = query_as!(
        &mut tx,
        (
            Uuid,
            String,
            Option<Uuid>,
            Option<Amount>,
            Option<String>,
            Timestamp
        ),
        fetch_all,
        "SELECT transfer_id, status, from_account, amount, currency, created_at
         FROM coordinator.transfers
         WHERE status IN ('preparing', 'committing', 'aborting') AND created_at < $1
         ORDER BY created_at",
        Timestamp::from(now - transfer_age),
    )
    .map_err(ReconcileError::db("reading transfers in flight"))?;
    for (transfer, status, from, amount, currency, since) in stuck {
        let mut d = Discrepancy::new(
            Kind::StuckTransfer,
            format!(
                "{status} since {}, more than {} ago{}",
                since.0.to_rfc3339(),
                humantime::format_duration(config.stuck_transfer_after),
                amount
                    .map(|a| format!(", amount {}", a.0))
                    .unwrap_or_default()
            ),
        )
        .transfer(transfer);
        d.account_id = from;
        d.currency = currency;
        found.push(d);
    }
    tx.commit()
        .await
        .map_err(ReconcileError::db("ending a read"))?;
    Ok(())
}

fn balance_discrepancy(m: &Mismatch) -> Discrepancy {
    let (kind, detail) = match (m.field, m.entry_id) {
        ("held", _) => (
            Kind::HeldMismatch,
            format!("held is {}; its open holds sum to {}", m.actual, m.expected),
        ),
        ("balance_after", Some(entry)) => (
            Kind::LedgerMismatch,
            format!(
                "ledger entry {entry} says the balance was {} after it; the entries up to it \
                 add up to {}",
                m.actual, m.expected
            ),
        ),
        _ => (
            Kind::BalanceMismatch,
            format!(
                "balance is {}; its ledger replays to {}",
                m.actual, m.expected
            ),
        ),
    };
    Discrepancy::new(kind, detail)
        .account(m.account_id)
        .amounts(m.expected, m.actual)
}

/// The outcomes read, indexed.
#[derive(Debug, Default)]
struct Outcomes {
    /// The first outcome of each transfer whose outcome time is in the window, by id.
    in_window: BTreeMap<String, OutcomeEvent>,
    /// Every transfer with a `completed` event anywhere in the range read.
    completed_anywhere: HashSet<Uuid>,
    /// Transfers with two different outcomes.
    conflicts: Vec<Discrepancy>,
}

impl Outcomes {
    fn index(events: &[OutcomeEvent], window: &Window) -> Outcomes {
        let mut first: HashMap<&str, &OutcomeEvent> = HashMap::new();
        let mut conflicting: BTreeMap<String, (Ending, Ending)> = BTreeMap::new();
        let mut completed_anywhere = HashSet::new();
        for event in events {
            if event.ending == Ending::Completed {
                if let Ok(id) = Uuid::parse_str(&event.transfer_id) {
                    completed_anywhere.insert(id);
                }
            }
            match first.get(event.transfer_id.as_str()) {
                None => {
                    first.insert(&event.transfer_id, event);
                }
                Some(earlier) if earlier.ending != event.ending => {
                    conflicting
                        .entry(event.transfer_id.clone())
                        .or_insert((earlier.ending, event.ending));
                }
                Some(_) => {}
            }
        }
        let in_window: BTreeMap<String, OutcomeEvent> = first
            .into_iter()
            .filter(|(_, e)| window.contains(e.at))
            .map(|(id, e)| (id.to_owned(), e.clone()))
            .collect();
        let conflicts = conflicting
            .into_iter()
            .filter(|(id, _)| in_window.contains_key(id))
            .map(|(id, (a, b))| {
                let d = Discrepancy::new(
                    Kind::ConflictingOutcome,
                    format!(
                        "transfer {id} was published as {} and then as {}",
                        a.as_str(),
                        b.as_str()
                    ),
                );
                match Uuid::parse_str(&id) {
                    Ok(uuid) => d.transfer(uuid),
                    Err(_) => d,
                }
            })
            .collect();
        Outcomes {
            in_window,
            completed_anywhere,
            conflicts,
        }
    }

    fn completed_in_window(&self) -> impl Iterator<Item = (Uuid, &Terms)> {
        self.in_window.values().filter_map(|e| {
            let terms = e.terms.as_ref()?;
            Some((Uuid::parse_str(&e.transfer_id).ok()?, terms))
        })
    }

    /// The window's totals: its outcomes, and `completed_unread`, the transfers completed in
    /// it whose outcome was not read.
    fn totals(&self, completed_unread: &[Terms]) -> Totals {
        let mut by_currency: BTreeMap<&str, (u64, Decimal)> = BTreeMap::new();
        let mut totals = Totals::default();
        for event in self.in_window.values() {
            match event.ending {
                Ending::Completed => totals.completed += 1,
                Ending::Failed => totals.failed += 1,
                Ending::Rejected => totals.rejected += 1,
            }
        }
        totals.completed += completed_unread.len() as u64;
        let completed = self
            .in_window
            .values()
            .filter_map(|e| e.terms.as_ref())
            .chain(completed_unread);
        for terms in completed {
            let t = by_currency.entry(terms.currency.as_str()).or_default();
            t.0 += 1;
            t.1 = t.1.saturating_add(terms.amount);
        }
        totals.by_currency = by_currency
            .into_iter()
            .map(|(currency, (count, amount))| CurrencyTotal {
                currency: currency.to_owned(),
                count,
                amount: in_minor_units(amount, currency),
            })
            .collect();
        totals
    }
}

/// Check 2 for the transfers of the window: a completed one has one debit on its source and
/// one credit on its destination, of its amount and currency; a failed or rejected one has no
/// entry at all.
fn check_transfers(
    outcomes: &Outcomes,
    by_transfer: &HashMap<Uuid, Vec<Entry>>,
) -> Vec<Discrepancy> {
    let mut found = Vec::new();
    for event in outcomes.in_window.values() {
        let Ok(id) = Uuid::parse_str(&event.transfer_id) else {
            // A rejected request with a malformed id: nothing can have moved for it.
            continue;
        };
        let entries = by_transfer.get(&id).map(Vec::as_slice).unwrap_or_default();
        match (&event.terms, event.ending) {
            (Some(terms), Ending::Completed) => check_legs(&mut found, id, terms, entries),
            (_, ending) => {
                for e in entries {
                    found.push(
                        Discrepancy::new(
                            Kind::UnexpectedEntry,
                            format!(
                                "{} entry #{} of a {} transfer",
                                e.kind,
                                e.entry_id,
                                ending.as_str()
                            ),
                        )
                        .account(e.account_id)
                        .transfer(id)
                        .currency(&e.currency)
                        .amounts(Decimal::ZERO, e.amount),
                    );
                }
            }
        }
    }
    found
}

/// A completed transfer's debit of its source and credit of its destination, against its terms.
fn check_legs(found: &mut Vec<Discrepancy>, id: Uuid, terms: &Terms, entries: &[Entry]) {
    for (leg, role, account, missing) in [
        ("debit", "source", terms.from_account, Kind::MissingDebit),
        (
            "credit",
            "destination",
            terms.to_account,
            Kind::MissingCredit,
        ),
    ] {
        let legs: Vec<&Entry> = entries.iter().filter(|e| e.kind == leg).collect();
        check_leg(found, id, terms, leg, role, account, missing, &legs);
    }
}

#[allow(clippy::too_many_arguments)]
fn check_leg(
    found: &mut Vec<Discrepancy>,
    id: Uuid,
    terms: &Terms,
    leg: &str,
    role: &str,
    account: Uuid,
    missing: Kind,
    entries: &[&Entry],
) {
    if entries.is_empty() {
        found.push(
            Discrepancy::new(
                missing,
                format!("completed transfer has no {leg} on its {role}"),
            )
            .account(account)
            .transfer(id)
            .currency(&terms.currency)
            .amounts(terms.amount, Decimal::ZERO),
        );
        return;
    }
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            found.push(
                Discrepancy::new(
                    Kind::UnexpectedEntry,
                    format!(
                        "a second {leg} (entry #{}) of a completed transfer",
                        e.entry_id
                    ),
                )
                .account(e.account_id)
                .transfer(id)
                .currency(&e.currency)
                .amounts(Decimal::ZERO, e.amount),
            );
            continue;
        }
        if e.account_id != account {
            found.push(
                Discrepancy::new(
                    Kind::AccountMismatch,
                    format!(
                        "{leg} entry #{} is on {}, not on the {role} {account}",
                        e.entry_id, e.account_id
                    ),
                )
                .account(account)
                .transfer(id)
                .currency(&terms.currency),
            );
        }
        if e.currency != terms.currency {
            found.push(
                Discrepancy::new(
                    Kind::CurrencyMismatch,
                    format!(
                        "{leg} entry #{} is in {}, the transfer in {}",
                        e.entry_id, e.currency, terms.currency
                    ),
                )
                .account(e.account_id)
                .transfer(id)
                .currency(&terms.currency),
            );
        }
        if e.amount != terms.amount {
            found.push(
                Discrepancy::new(
                    Kind::AmountMismatch,
                    format!(
                        "{leg} entry #{} is not of the transfer's amount",
                        e.entry_id
                    ),
                )
                .account(e.account_id)
                .transfer(id)
                .currency(&terms.currency)
                .amounts(terms.amount, e.amount),
            );
        }
    }
}

/// Entries written in the window whose transfer has no outcome in the window and no
/// `completed` event in the range read, by transfer.
fn unexplained<'a>(
    window: &Window,
    outcomes: &Outcomes,
    by_transfer: &'a HashMap<Uuid, Vec<Entry>>,
) -> BTreeMap<Uuid, Vec<&'a Entry>> {
    let mut out: BTreeMap<Uuid, Vec<&Entry>> = BTreeMap::new();
    for (id, entries) in by_transfer {
        if outcomes.completed_anywhere.contains(id)
            || outcomes.in_window.contains_key(&id.to_string())
        {
            continue;
        }
        for e in entries.iter().filter(|e| window.contains(e.created_at)) {
            out.entry(*id).or_default().push(e);
        }
    }
    out
}

/// Stores the report, replacing the day's earlier one, and publishes it. The day's row stays
/// locked while the report is published, so that two runs of a day do not interleave. The
/// earlier report is kept, and this one only published, in two cases: a failed run is no
/// verdict, so it replaces only a report of a run that failed too; and a report in another zone
/// than `reconciler.time_zone` does not replace one in it.
async fn store_and_publish(settings: &Settings, report: &mut Report) -> Result<(), ReconcileError> {
    let of_record = settings.config.time_zone.name();
    let db = Db::connect(&settings.database_url, crate::SCHEMA, 2)
        .await
        .map_err(ReconcileError::db("connecting to the reconciler schema"))?;
    let result = async {
        let store_error = || ReconcileError::db("storing the report");
        let mut tx = db.begin().await.map_err(store_error())?;
        let previous = store::lock_day(&mut tx, report.date)
            .await
            .map_err(store_error())?;
        let kept = |report: &Report| {
            previous.as_ref().is_some_and(|p| {
                (report.status == RunStatus::Failed && p.status != "failed")
                    || (report.time_zone != of_record && p.time_zone == of_record)
            })
        };
        let decide = |report: &mut Report| {
            report.stored = !kept(report);
            report.replaced = previous.is_some() && report.stored;
        };
        decide(report);
        let published = publish(settings, report).await;
        if let Err(e) = &published {
            report.fail(e);
            decide(report);
        }
        if !kept(report) {
            store::write(&mut tx, report, previous)
                .await
                .map_err(store_error())?;
        }
        tx.commit().await.map_err(store_error())?;
        published
    }
    .await;
    db.close().await;
    result
}

async fn publish(settings: &Settings, report: &Report) -> Result<(), ReconcileError> {
    let topic = Topics::new(&settings.kafka.topic_prefix).reconciliation_reports();
    let error = |source| ReconcileError::Publish {
        topic: topic.clone(),
        source,
    };
    let publisher = Publisher::new(&settings.kafka).map_err(error)?;
    let mut envelope = Envelope::new(
        crate::REPORT_TYPE,
        crate::SOURCE,
        report.report_id.to_string(),
    );
    twophase_runtime::telemetry::set_trace(&mut envelope, None);
    let outgoing = Outgoing {
        topic: topic.clone(),
        // All runs of a day on one partition, in order.
        key: report.date.to_string(),
        envelope,
        payload: serde_json::to_vec(report).expect("reports serialize"),
    };
    publisher.publish(&outgoing).await.map_err(error)
}

/// Sets the discrepancy gauges from a report, unless its run failed (a failed run is no
/// verdict), and how far the books are reconciled if it is a verdict on its whole day.
pub(crate) fn set_gauges(report: &Report, of_record: &str) {
    set_gauges_of(std::slice::from_ref(report), of_record);
}

/// [`set_gauges`] for several reports at once, such as the days a start caught up on: each
/// discrepancy gauge shows the most of its kind any of them found, so that a day's findings are
/// not cleared by the next day's before anyone could see them.
pub(crate) fn set_gauges_of(reports: &[Report], of_record: &str) {
    let verdicts: Vec<&Report> = reports
        .iter()
        .filter(|r| r.status != RunStatus::Failed)
        .collect();
    if !verdicts.is_empty() {
        for kind in Kind::ALL {
            let most = verdicts.iter().map(|r| r.count(kind)).max().unwrap_or(0);
            let n = i64::try_from(most).unwrap_or(i64::MAX);
            metrics::set_reconciliation_discrepancies(kind.as_str(), n);
        }
    }
    show_reconciled_through(reports, of_record);
}

/// Shows how far the books are reconciled: to the end of the newest day among `reports` with
/// a verdict on the whole of it, if any has one.
pub(crate) fn show_reconciled_through<'a>(
    reports: impl IntoIterator<Item = &'a Report>,
    of_record: &str,
) {
    let through = reports
        .into_iter()
        .filter(|r| r.is_whole_day_verdict(of_record))
        .map(|r| r.window.end)
        .max();
    if let Some(end) = through {
        metrics::set_reconciled_through(end);
    }
}

/// Reads the stored report of a day.
pub async fn stored_report(
    database_url: &str,
    date: NaiveDate,
) -> Result<Option<Report>, sqlx::Error> {
    let db = Db::connect(database_url, crate::SCHEMA, 1).await?;
    let report = store::load(&db, date).await;
    db.close().await;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        Window::of("2026-11-23".parse().unwrap(), chrono_tz::Tz::UTC)
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn completed(id: Uuid, from: Uuid, to: Uuid, amount: &str, when: &str) -> OutcomeEvent {
        OutcomeEvent {
            transfer_id: id.to_string(),
            ending: Ending::Completed,
            at: at(when),
            terms: Some(Terms {
                from_account: from,
                to_account: to,
                amount: dec(amount),
                currency: "USD".into(),
            }),
        }
    }

    fn ended(id: Uuid, ending: Ending, when: &str) -> OutcomeEvent {
        OutcomeEvent {
            transfer_id: id.to_string(),
            ending,
            at: at(when),
            terms: None,
        }
    }

    fn entry(n: i64, account: Uuid, transfer: Uuid, kind: &str, amount: &str, when: &str) -> Entry {
        Entry {
            entry_id: n,
            account_id: account,
            transfer_id: transfer,
            kind: kind.into(),
            amount: dec(amount),
            currency: "USD".into(),
            created_at: at(when),
        }
    }

    fn group(entries: Vec<Entry>) -> HashMap<Uuid, Vec<Entry>> {
        let mut out: HashMap<Uuid, Vec<Entry>> = HashMap::new();
        for e in entries {
            out.entry(e.transfer_id).or_default().push(e);
        }
        out
    }

    #[test]
    fn a_day_is_decided_by_the_outcome_time_and_counted_once() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (t1, t2, t3, t4) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let events = vec![
            completed(t1, a, b, "10.00", "2026-11-23T10:00:00Z"),
            // Published again later (a redelivered request): the same outcome time.
            completed(t1, a, b, "10.00", "2026-11-23T10:00:00Z"),
            completed(t2, a, b, "2.50", "2026-11-24T00:00:01Z"),
            ended(t3, Ending::Failed, "2026-11-23T11:00:00Z"),
            ended(t4, Ending::Rejected, "2026-11-22T23:59:59Z"),
        ];
        let outcomes = Outcomes::index(&events, &window());
        let totals = outcomes.totals(&[]);
        assert_eq!(
            (totals.completed, totals.failed, totals.rejected),
            (1, 1, 0)
        );
        assert_eq!(
            totals.by_currency,
            vec![CurrencyTotal {
                currency: "USD".into(),
                count: 1,
                amount: dec("10.00")
            }]
        );
        assert!(outcomes.completed_anywhere.contains(&t2));
        assert!(outcomes.conflicts.is_empty());
    }

    #[test]
    fn each_leg_is_checked_for_presence_account_currency_and_amount() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let noon = "2026-11-23T12:00:00Z";
        let events = vec![
            completed(ids[0], a, b, "10.00", noon),
            completed(ids[1], a, b, "10.00", noon),
            completed(ids[2], a, b, "10.00", noon),
            ended(ids[3], Ending::Failed, noon),
            completed(ids[4], a, b, "1", noon),
        ];
        let mut euro = entry(9, b, ids[4], "credit", "1.00", noon);
        euro.currency = "EUR".into();
        let entries = group(vec![
            // ids[0]: clean (amounts equal at another scale).
            entry(1, a, ids[0], "debit", "10", noon),
            entry(2, b, ids[0], "credit", "10.00", noon),
            // ids[1]: the credit is missing, the debit is short.
            entry(3, a, ids[1], "debit", "9.99", noon),
            // ids[2]: the credit landed on the wrong account.
            entry(4, a, ids[2], "debit", "10.00", noon),
            entry(5, c, ids[2], "credit", "10.00", noon),
            // ids[3]: a failed transfer moved money.
            entry(6, a, ids[3], "debit", "5.00", noon),
            // ids[4]: the credit is in another currency.
            entry(8, a, ids[4], "debit", "1.00", noon),
            euro,
        ]);
        let outcomes = Outcomes::index(&events, &window());
        let mut found = check_transfers(&outcomes, &entries);
        found.sort_by_key(|d| d.kind);
        type Summary = (Kind, Option<Uuid>, Option<Uuid>, Option<Decimal>);
        let summary: Vec<Summary> = found
            .iter()
            .map(|d| (d.kind, d.transfer_id, d.account_id, d.difference))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    Kind::MissingCredit,
                    Some(ids[1]),
                    Some(b),
                    Some(dec("-10.00"))
                ),
                (
                    Kind::AmountMismatch,
                    Some(ids[1]),
                    Some(a),
                    Some(dec("-0.01"))
                ),
                (Kind::CurrencyMismatch, Some(ids[4]), Some(b), None),
                (Kind::AccountMismatch, Some(ids[2]), Some(b), None),
                (
                    Kind::UnexpectedEntry,
                    Some(ids[3]),
                    Some(a),
                    Some(dec("5.00"))
                ),
            ]
        );
    }

    #[test]
    fn entries_of_the_window_are_explained_by_any_completion_in_the_range_read() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (edge, orphan, before) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // Debited just before midnight, completed just after: the next day's transfer.
        let events = vec![completed(edge, a, b, "1", "2026-11-24T00:00:00.500Z")];
        let entries = group(vec![
            entry(1, a, edge, "debit", "1", "2026-11-23T23:59:59.900Z"),
            entry(2, b, edge, "credit", "1", "2026-11-24T00:00:00.100Z"),
            entry(3, a, orphan, "debit", "1", "2026-11-23T08:00:00Z"),
            // Outside the window: not this day's to explain.
            entry(4, a, before, "debit", "1", "2026-11-22T23:00:00Z"),
        ]);
        let outcomes = Outcomes::index(&events, &window());
        assert!(check_transfers(&outcomes, &entries).is_empty());
        let unexplained = unexplained(&window(), &outcomes, &entries);
        assert_eq!(
            unexplained.keys().copied().collect::<Vec<_>>(),
            vec![orphan]
        );
    }

    #[test]
    fn two_different_outcomes_of_one_transfer_are_a_discrepancy() {
        let t = Uuid::new_v4();
        let events = vec![
            ended(t, Ending::Failed, "2026-11-23T01:00:00Z"),
            ended(t, Ending::Rejected, "2026-11-23T01:00:00Z"),
        ];
        let outcomes = Outcomes::index(&events, &window());
        assert_eq!(outcomes.conflicts.len(), 1);
        assert_eq!(outcomes.conflicts[0].kind, Kind::ConflictingOutcome);
        assert_eq!(outcomes.conflicts[0].transfer_id, Some(t));
    }

    #[test]
    fn balance_mismatches_keep_expected_actual_and_difference() {
        let account = Uuid::new_v4();
        let d = balance_discrepancy(&Mismatch {
            account_id: account,
            field: "balance",
            entry_id: None,
            expected: dec("100.00"),
            actual: dec("100.01"),
        });
        assert_eq!(d.kind, Kind::BalanceMismatch);
        assert_eq!(d.difference, Some(dec("0.01")));
        let d = balance_discrepancy(&Mismatch {
            account_id: account,
            field: "held",
            entry_id: None,
            expected: dec("0"),
            actual: dec("5"),
        });
        assert_eq!((d.kind, d.difference), (Kind::HeldMismatch, Some(dec("5"))));
        let d = balance_discrepancy(&Mismatch {
            account_id: account,
            field: "balance_after",
            entry_id: Some(7),
            expected: dec("200"),
            actual: dec("100"),
        });
        assert_eq!(d.kind, Kind::LedgerMismatch);
        assert!(d.detail.contains("ledger entry 7"), "{}", d.detail);
    }
}
