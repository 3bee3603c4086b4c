//! Reconciliation end to end: the workers run transfers, `twophase reconcile` (a process) or
//! the library checks the day, and the report says what it must. Discrepancies are planted
//! directly in the database. Every run covers today (UTC), so the test's transfers fall in it.

mod common;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Days, NaiveDate, NaiveTime, TimeDelta, Utc};
use common::{assert_outcome, request, TestEnv};
use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use twophase::client::{self, Outcome};
use twophase_messages::{reasons, Message, TransferCompleted, TransferRequested};
use twophase_reconciler::{Kind, ReconcilerConfig, Report, RunStatus, Settings};
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{Amount, Timestamp, Tx};
use twophase_runtime::{execute, Outgoing};
use uuid::Uuid;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Today in the configured zone (UTC here): the window every test reconciles.
fn today() -> NaiveDate {
    Utc::now().date_naive()
}

/// Today's stored report, which must be there.
async fn stored_today(env: &TestEnv) -> Report {
    twophase_reconciler::stored_report(&env.database_url, today())
        .await
        .unwrap()
        .expect("the day's report is stored")
}

fn settings(env: &TestEnv) -> Settings {
    Settings {
        database_url: env.database_url.clone(),
        kafka: env.kafka.clone(),
        config: ReconcilerConfig {
            time_zone: twophase_reconciler::Tz::UTC,
            ..ReconcilerConfig::default()
        },
        metrics_listen: None,
    }
}

/// Runs `twophase reconcile --date <today> --json` as a process: its exit code and report.
async fn reconcile_cli(env: &TestEnv, date: NaiveDate) -> (i32, Report) {
    let mut cmd = env.command();
    cmd.env("TWOPHASE_RECONCILER__TIME_ZONE", "UTC").args([
        "reconcile",
        "--date",
        &date.to_string(),
        "--json",
    ]);
    let output = common::output(cmd).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "reconcile printed no report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), report)
}

/// Every record on `reconciliation.reports`, as (ce_type, JSON payload), read from the start.
fn published_reports(env: &TestEnv, expected: usize) -> Vec<(String, serde_json::Value)> {
    let topic = env.topics.reconciliation_reports();
    let consumer: BaseConsumer = twophase_runtime::kafka::client_config(&env.kafka)
        .set(
            "group.id",
            format!("{}-reports-reader", env.kafka.group_prefix),
        )
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(&topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        let Some(Ok(record)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let ce_type = record
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == "ce_type")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap_or_default();
        let payload = serde_json::from_slice(record.payload().unwrap_or_default()).unwrap();
        out.push((ce_type, payload));
    }
    out
}

/// The discrepancies of a report as (kind, account, transfer, expected, actual, difference).
type Row = (
    Kind,
    Option<Uuid>,
    Option<Uuid>,
    Option<Decimal>,
    Option<Decimal>,
    Option<Decimal>,
);

fn rows(report: &Report) -> Vec<Row> {
    report
        .discrepancies
        .iter()
        .map(|d| {
            (
                d.kind,
                d.account_id,
                d.transfer_id,
                d.expected,
                d.actual,
                d.difference,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_day_after_a_mixed_run_has_no_discrepancies_and_exact_totals() {
    let mut env = TestEnv::new("recon-clean").await;
    env.start_all(1);
    let a = env.open_account("USD", "1000.00").await;
    let b = env.open_account("USD", "0").await;
    let euros = env.open_account("EUR", "500.00").await;
    let euros_to = env.open_account("EUR", "0").await;
    let poor = env.open_account("USD", "5.00").await;

    let completed = [
        request(a, b, "12.34", "USD"),
        request(a, b, "7.66", "USD"),
        request(euros, euros_to, "100.00", "EUR"),
    ];
    let failed = [
        (
            request(poor, b, "10.00", "USD"),
            reasons::INSUFFICIENT_FUNDS,
        ),
        (
            request(a, Uuid::new_v4(), "1.00", "USD"),
            reasons::DESTINATION_NOT_FOUND,
        ),
    ];
    let rejected = [
        (request(a, a, "1.00", "USD"), reasons::SAME_ACCOUNT),
        (request(a, b, "-5", "USD"), reasons::INVALID_AMOUNT),
    ];
    let mut all: Vec<TransferRequested> = completed.to_vec();
    all.extend(failed.iter().map(|f| f.0.clone()));
    all.extend(rejected.iter().map(|r| r.0.clone()));
    let outcomes = env.run_transfers(&all, Duration::from_secs(60)).await;
    for r in &completed {
        assert_outcome(&outcomes[&r.transfer_id], "completed", None);
    }
    for (r, reason) in &failed {
        assert_outcome(&outcomes[&r.transfer_id], "failed", Some(reason));
    }
    for (r, reason) in &rejected {
        assert_outcome(&outcomes[&r.transfer_id], "rejected", Some(reason));
    }
    // A producer reusing a completed transfer's id for another request is refused. The refusal
    // answers that request: the transfer still completed, and its legs still match.
    let mut reused = completed[0].clone();
    reused.amount = "99.00".into();
    assert_outcome(
        &env.transfer(&reused).await,
        "rejected",
        Some(reasons::CONFLICT),
    );

    let (code, report) = reconcile_cli(&env, today()).await;
    assert_eq!(report.discrepancies, vec![], "{}", report.to_table());
    assert_eq!((code, report.status), (0, RunStatus::Completed));
    assert_eq!(report.date, today());
    assert_eq!(report.time_zone, "UTC");
    assert!(!report.replaced);
    assert_eq!(report.accounts, 5);
    assert_eq!(
        (
            report.totals.completed,
            report.totals.failed,
            report.totals.rejected
        ),
        (3, 2, 2)
    );
    let by_currency: Vec<(String, u64, Decimal)> = report
        .totals
        .by_currency
        .iter()
        .map(|t| (t.currency.clone(), t.count, t.amount))
        .collect();
    assert_eq!(
        by_currency,
        vec![
            ("EUR".to_owned(), 1, dec("100.00")),
            ("USD".to_owned(), 2, dec("20.00")),
        ]
    );
    assert_eq!(report.ledger_entries, 6, "one debit and one credit each");
    assert_eq!(report.in_flight_entries, 0);
    assert!(Kind::ALL.iter().all(|k| report.discrepancy_counts[k] == 0));
    env.check_invariants().await;
}

/// Writes a USD debit or credit of `transfer` on `account` by hand, and the balance it leaves.
async fn plant_leg(
    tx: &mut Tx,
    account: Uuid,
    transfer: Uuid,
    kind: &str,
    amount: &str,
    balance: &str,
) {
    execute!(
        tx,
        "INSERT INTO account.ledger (account_id, transfer_id, kind, amount, currency, balance_after, created_at)
         VALUES ($1, $2, $3, $4, 'USD', $5, $6)",
        account,
        transfer,
        kind,
        Amount(dec(amount)),
        Amount(dec(balance)),
        Timestamp::now()
    )
    .unwrap();
    execute!(
        tx,
        "UPDATE account.accounts SET balance = $1 WHERE account_id = $2",
        Amount(dec(balance)),
        account
    )
    .unwrap();
}

/// Plants one discrepancy of each kind; each is reported with its kind and amounts, and
/// nothing else is.
#[tokio::test(flavor = "multi_thread")]
async fn each_planted_discrepancy_is_reported_and_a_rerun_replaces_the_report() {
    let mut env = TestEnv::new("recon-planted").await;
    env.start_all(1);
    let a = env.open_account("USD", "1000.00").await;
    let b = env.open_account("USD", "0").await;
    let c = env.open_account("USD", "0").await;
    let d = env.open_account("USD", "100.00").await;
    let e = env.open_account("USD", "50.00").await;
    let t1 = request(a, b, "10.00", "USD");
    let t2 = request(a, c, "5.00", "USD");
    let outcomes = env
        .run_transfers(&[t1.clone(), t2.clone()], Duration::from_secs(60))
        .await;
    for t in [&t1, &t2] {
        assert_outcome(&outcomes[&t.transfer_id], "completed", None);
    }
    let t2_id = Uuid::from_str(&t2.transfer_id).unwrap();
    let extra = Uuid::new_v4();
    let hold = Uuid::new_v4();
    let stuck = Uuid::new_v4();
    let two_hours_ago = Timestamp::from(Utc::now() - TimeDelta::hours(2));

    let mut tx = env.db.begin().await.unwrap();
    // A balance nudged by 0.01.
    execute!(
        &mut tx,
        "UPDATE account.accounts SET balance = $1 WHERE account_id = $2",
        Amount(dec("100.01")),
        d
    )
    .unwrap();
    // A deposit made larger, with the balance to match, so that the replay adds up: only the
    // balance its entry recorded tells.
    execute!(
        &mut tx,
        "UPDATE account.ledger SET amount = $1 WHERE account_id = $2",
        Amount(dec("70.00")),
        e
    )
    .unwrap();
    execute!(
        &mut tx,
        "UPDATE account.accounts SET balance = $1 WHERE account_id = $2",
        Amount(dec("70.00")),
        e
    )
    .unwrap();
    // A credit lost, its balance fixed so that only the missing credit shows.
    let deleted = execute!(
        &mut tx,
        "DELETE FROM account.ledger WHERE transfer_id = $1 AND kind = 'credit'",
        t2_id
    )
    .unwrap();
    assert_eq!(deleted, 1);
    execute!(
        &mut tx,
        "UPDATE account.accounts SET balance = $1 WHERE account_id = $2",
        Amount(Decimal::ZERO),
        c
    )
    .unwrap();
    // A credit of no transfer, with the balance it would give.
    plant_leg(&mut tx, b, extra, "credit", "3.00", "13.00").await;
    // A hold left open for two hours, counted in the account's held amount.
    execute!(
        &mut tx,
        "INSERT INTO account.holds (transfer_id, account_id, amount, currency, status, created_at, updated_at)
         VALUES ($1, $2, $3, 'USD', 'held', $4, $4)",
        hold,
        a,
        Amount(dec("2.00")),
        two_hours_ago
    )
    .unwrap();
    execute!(
        &mut tx,
        "UPDATE account.accounts SET held = $1 WHERE account_id = $2",
        Amount(dec("2.00")),
        a
    )
    .unwrap();
    // A transfer committing for two hours (its next resend not due for a day, so the
    // coordinator leaves it be).
    execute!(
        &mut tx,
        "INSERT INTO coordinator.transfers (transfer_id, request_hash, request, from_account, to_account,
                                            amount, currency, status, next_resend_at, created_at,
                                            updated_at)
         VALUES ($1, 'planted', $2, $3, $4, $5, 'USD', 'committing', $6, $7, $7)",
        stuck,
        Json(serde_json::json!({})),
        a,
        d,
        Amount(dec("1.00")),
        Timestamp::from(Utc::now() + TimeDelta::days(1)),
        two_hours_ago
    )
    .unwrap();
    tx.commit().await.unwrap();

    let (code, report) = reconcile_cli(&env, today()).await;
    assert_eq!(
        (code, report.status),
        (1, RunStatus::CompletedWithErrors),
        "{}",
        report.to_table()
    );
    let z = Some(Decimal::ZERO);
    assert_eq!(
        rows(&report),
        vec![
            (
                Kind::BalanceMismatch,
                Some(d),
                None,
                Some(dec("100.00")),
                Some(dec("100.01")),
                Some(dec("0.01"))
            ),
            (
                Kind::LedgerMismatch,
                Some(e),
                None,
                Some(dec("70.00")),
                Some(dec("50.00")),
                Some(dec("-20.00"))
            ),
            (
                Kind::MissingCredit,
                Some(c),
                Some(t2_id),
                Some(dec("5.00")),
                z,
                Some(dec("-5.00"))
            ),
            (
                Kind::UnexpectedEntry,
                Some(b),
                Some(extra),
                z,
                Some(dec("3.00")),
                Some(dec("3.00"))
            ),
            (
                Kind::StaleHold,
                Some(a),
                Some(hold),
                z,
                Some(dec("2.00")),
                Some(dec("2.00"))
            ),
            (Kind::StuckTransfer, Some(a), Some(stuck), None, None, None),
        ],
        "{}",
        report.to_table()
    );
    for kind in Kind::ALL {
        let planted = matches!(
            kind,
            Kind::BalanceMismatch
                | Kind::LedgerMismatch
                | Kind::MissingCredit
                | Kind::UnexpectedEntry
                | Kind::StaleHold
                | Kind::StuckTransfer
        );
        assert_eq!(report.count(kind), u64::from(planted), "{kind:?}");
    }
    assert!(report
        .discrepancies
        .iter()
        .all(|d| d.currency.as_deref() == Some("USD")));
    assert!(!report.replaced);
    assert_eq!(report.totals.completed, 2);

    // Re-running the day (in process this time) replaces the report with the same findings.
    let again = twophase_reconciler::reconcile(&settings(&env), today()).await;
    assert!(again.replaced);
    assert_eq!(again.exit_code(), 1);
    assert_eq!(again.discrepancies, report.discrepancies);
    assert_eq!(again.totals, report.totals);
    let stored = stored_today(&env).await;
    assert_eq!(stored, again);
    assert_eq!(
        env.count("SELECT count(*) FROM reconciler.reports").await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM reconciler.reports WHERE runs = 2")
            .await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM reconciler.discrepancies")
            .await,
        6
    );

    // Both runs were published, the second saying it replaced the first.
    let published = published_reports(&env, 2);
    assert_eq!(published.len(), 2);
    for (ce_type, _) in &published {
        assert_eq!(ce_type, twophase_reconciler::REPORT_TYPE);
    }
    let replaced: Vec<bool> = published
        .iter()
        .map(|(_, p)| p["replaced"].as_bool().unwrap())
        .collect();
    assert_eq!(replaced, vec![false, true]);
    assert_eq!(published[1].1["report_id"], again.report_id.to_string());
    assert_eq!(published[1].1["discrepancy_counts"]["stale_hold"], 1);

    // The day cut in another zone is reported, but the day's report of record, in
    // reconciler.time_zone (UTC here), is kept.
    let tokyo = twophase_reconciler::reconcile_in(
        &settings(&env),
        today(),
        twophase_reconciler::Tz::Asia__Tokyo,
    )
    .await;
    assert_eq!(tokyo.time_zone, "Asia/Tokyo");
    assert!(!tokyo.stored && !tokyo.replaced, "{}", tokyo.to_table());
    assert!(tokyo
        .to_table()
        .contains("(not stored: the day's earlier report is kept)"));
    let stored = stored_today(&env).await;
    assert_eq!(stored, again);
    assert_eq!(
        env.count("SELECT count(*) FROM reconciler.reports WHERE runs = 2 AND time_zone = 'UTC'")
            .await,
        1
    );

    // A restarted reconciler shows the last verdict before its next run, so that a restart does
    // not clear the discrepancy alert.
    let port = env
        .start_serving(
            "reconciler",
            &[("TWOPHASE_RECONCILER__GAUGES_REFRESH", "1s")],
        )
        .await;
    // (Scraped from a process of its own: tests in this one reconcile side by side.)
    for (kind, n) in [
        ("stale_hold", 1.0),
        ("missing_credit", 1.0),
        ("ledger_mismatch", 1.0),
        ("held_mismatch", 0.0),
    ] {
        let found = scrape(
            port,
            "twophase_reconciliation_discrepancies",
            &[("kind", kind)],
        )
        .await;
        assert_eq!(found, Some(n), "{kind}");
    }

    // Once the stale hold is released and the day run again by hand, the running reconciler's
    // gauge shows it gone, without waiting for its next run.
    let mut tx = env.db.begin().await.unwrap();
    execute!(
        &mut tx,
        "UPDATE account.holds SET status = 'released' WHERE transfer_id = $1",
        hold
    )
    .unwrap();
    execute!(
        &mut tx,
        "UPDATE account.accounts SET held = $1 WHERE account_id = $2",
        Amount(Decimal::ZERO),
        a
    )
    .unwrap();
    tx.commit().await.unwrap();
    let (_, fixed) = reconcile_cli(&env, today()).await;
    assert_eq!(fixed.count(Kind::StaleHold), 0, "{}", fixed.to_table());
    let started = Instant::now();
    loop {
        let stale = common::metric(
            port,
            "twophase_reconciliation_discrepancies",
            &[("kind", "stale_hold")],
        )
        .await;
        if stale == Some(0.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the reconciler still shows {stale:?} stale holds (logs in {})",
            env.log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The series `name` with `labels` on a worker's `/metrics`, once it answers (within 30 s).
async fn scrape(port: u16, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let started = Instant::now();
    loop {
        let found = common::metric(port, name, labels).await;
        if found.is_some() || started.elapsed() > Duration::from_secs(30) {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A transfer the coordinator completed but whose outcome is not on the topic (published after
/// the range the run reads: the broker was down, or the coordinator restarted before publishing
/// it) is still checked, against the coordinator's terms.
#[tokio::test(flavor = "multi_thread")]
async fn a_completed_transfer_whose_outcome_was_not_read_is_still_checked() {
    let env = TestEnv::new("recon-unread").await;
    let a = env.open_account("USD", "100.00").await;
    let b = env.open_account("USD", "0").await;
    let transfer = Uuid::new_v4();
    let now = Timestamp::now();
    let mut tx = env.db.begin().await.unwrap();
    // Its debit, with the balance it gives; its credit lost.
    plant_leg(&mut tx, a, transfer, "debit", "7.00", "93.00").await;
    execute!(
        &mut tx,
        "INSERT INTO coordinator.transfers (transfer_id, request_hash, request, from_account, to_account,
                                            amount, currency, status, created_at, decided_at,
                                            finished_at, updated_at)
         VALUES ($1, 'planted', $2, $3, $4, $5, 'USD', 'completed', $6, $6, $6, $6)",
        transfer,
        Json(serde_json::json!({})),
        a,
        b,
        Amount(dec("7.00")),
        now
    )
    .unwrap();
    tx.commit().await.unwrap();

    let report = twophase_reconciler::reconcile(&settings(&env), today()).await;
    assert_eq!(
        rows(&report),
        vec![(
            Kind::MissingCredit,
            Some(b),
            Some(transfer),
            Some(dec("7.00")),
            Some(Decimal::ZERO),
            Some(dec("-7.00"))
        )],
        "{}",
        report.to_table()
    );
    assert_eq!(report.in_flight_entries, 0);
    // It completed today, so today's totals count it: tomorrow's run reads its outcome, but
    // counts only tomorrow's.
    assert_eq!(report.totals.completed, 1, "{}", report.to_table());
    assert_eq!(
        (
            report.totals.by_currency[0].currency.as_str(),
            report.totals.by_currency[0].count
        ),
        ("USD", 1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_cannot_finish_exits_3_and_says_why() {
    let env = TestEnv::new("recon-failed").await;
    let mut cmd = env.command();
    // A database that cannot be reached: the events are read, the ledger cannot be.
    cmd.env("TWOPHASE_DATABASE_URL", "sqlite:/proc/no-such-dir/data")
        .args(["reconcile", "--date", &today().to_string(), "--json"]);
    let output = common::output(cmd).await;
    let report: Report = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("connecting to the account schema"),
        "{error}"
    );
    // Nothing could be stored: the report is in the output only.
    assert_eq!(
        env.count("SELECT count(*) FROM reconciler.reports").await,
        0
    );
}

/// Two runs of a day at once (two reconciler copies, or the daily run and an ad-hoc one) are
/// stored one after the other: the first as the day's report, the second replacing it. Before
/// the day had a row, neither locked anything, both published a report as the day's, and the
/// second failed on the first's row.
#[tokio::test(flavor = "multi_thread")]
async fn two_runs_of_a_day_at_once_are_stored_one_after_the_other() {
    let env = TestEnv::new("recon-twice").await;
    let settings = settings(&env);
    let (one, other) = tokio::join!(
        twophase_reconciler::reconcile(&settings, today()),
        twophase_reconciler::reconcile(&settings, today()),
    );
    for report in [&one, &other] {
        assert_eq!(report.status, RunStatus::Completed, "{}", report.to_table());
        assert!(report.stored);
    }
    let (first, second) = if one.replaced {
        (&other, &one)
    } else {
        (&one, &other)
    };
    assert!(!first.replaced && second.replaced);
    let stored = stored_today(&env).await;
    assert_eq!(stored.report_id, second.report_id);
    assert_eq!(
        env.count("SELECT count(*) FROM reconciler.reports WHERE runs = 2")
            .await,
        1
    );
}

/// `twophase reconciler` runs at `run_at` for the day before; `--once` runs that day now.
#[tokio::test(flavor = "multi_thread")]
async fn the_daily_run_reconciles_the_day_before_at_its_time() {
    let env = TestEnv::new("recon-daily").await;
    let mut settings = settings(&env);
    let due = Utc::now() + TimeDelta::seconds(2);
    settings.config.run_at = due.time();
    let yesterday = due.date_naive().pred_opt().unwrap();
    let shutdown = twophase_runtime::CancellationToken::new();
    let daily = tokio::spawn({
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        async move { twophase_reconciler::run_daily(&settings, shutdown).await }
    });
    // The published report is the event that says the run happened.
    let published = published_reports(&env, 1);
    shutdown.cancel();
    daily.await.unwrap();
    assert_eq!(published.len(), 1, "no report within 30 s of {due}");
    let report: Report = serde_json::from_value(published[0].1.clone()).unwrap();
    assert_eq!(report.date, yesterday);
    assert_eq!(report.status, RunStatus::Completed);
    assert!(report.started_at >= due - TimeDelta::milliseconds(1));

    let mut cmd = env.command();
    cmd.env("TWOPHASE_RECONCILER__TIME_ZONE", "UTC")
        .args(["reconciler", "--once", "--json"]);
    let output = common::output(cmd).await;
    let again: Report = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!((again.date, again.replaced), (yesterday, true));
}

/// A reconciler that was not running when a day's run was due reconciles that day when it
/// starts: every day after the newest stored report, up to the one whose run was last due.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconciler_started_late_reconciles_the_days_it_missed() {
    let env = TestEnv::new("recon-catch-up").await;
    let mut settings = settings(&env);
    // The daily run was due an hour ago, for the day before.
    let due = Utc::now() - TimeDelta::hours(1);
    settings.config.run_at = due.time();
    let last_due = due.date_naive().pred_opt().unwrap();
    let newest = last_due - Days::new(3);
    let earlier = twophase_reconciler::reconcile(&settings, newest).await;
    assert!(earlier.stored, "{}", earlier.to_table());

    let shutdown = twophase_runtime::CancellationToken::new();
    let daily = tokio::spawn({
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        async move { twophase_reconciler::run_daily(&settings, shutdown).await }
    });
    let published = published_reports(&env, 4);
    shutdown.cancel();
    daily.await.unwrap();
    let mut days: Vec<NaiveDate> = published
        .iter()
        .map(|(_, r)| serde_json::from_value::<Report>(r.clone()).unwrap().date)
        .collect();
    days.sort();
    let expected: Vec<NaiveDate> = (0..4).map(|n| newest + Days::new(n)).collect();
    assert_eq!(days, expected, "the day run by hand, then each day missed");
    for day in &expected[1..] {
        let stored = twophase_reconciler::stored_report(&env.database_url, *day)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{day} has no stored report"));
        assert_eq!(stored.status, RunStatus::Completed);
    }
    // How far the books are reconciled is exported for the ReconciliationOverdue alert, by a
    // reconciler process of its own (tests in this one reconcile side by side): at least
    // through the last day caught up, which it finds stored.
    let mut env = env;
    let port = env.start_serving("reconciler", &[]).await;
    let through = scrape(port, "twophase_reconciled_through_timestamp_seconds", &[]).await;
    let last_end = expected[3]
        .succ_opt()
        .unwrap()
        .and_time(NaiveTime::MIN)
        .and_utc();
    assert!(
        through.is_some_and(|t| t >= last_end.timestamp() as f64),
        "{through:?}, before {last_end}"
    );
}

/// Keeps `in_flight` transfers between `accounts` in flight, publishing a new one as each
/// outcome arrives, until `stop`; then waits for the last ones. Returns every outcome.
async fn run_load(
    env: &TestEnv,
    accounts: Vec<Uuid>,
    in_flight: usize,
    stop: Arc<AtomicBool>,
    seen: tokio::sync::watch::Sender<usize>,
) -> HashMap<String, Outcome> {
    let watcher = env.watcher().await;
    let publisher = env.publisher.clone();
    let kafka = env.kafka.clone();
    let next = || {
        let mut rng = rand::rng();
        let from = rng.random_range(0..accounts.len());
        let to = (from + rng.random_range(1..accounts.len())) % accounts.len();
        let cents: u32 = rng.random_range(1..500);
        request(
            accounts[from],
            accounts[to],
            &format!("{}.{:02}", cents / 100, cents % 100),
            "USD",
        )
    };
    let mut pending: std::collections::HashSet<String> = Default::default();
    let mut outcomes = HashMap::new();
    for _ in 0..in_flight {
        let r = next();
        client::request_transfer(&publisher, &kafka, &r)
            .await
            .unwrap();
        pending.insert(r.transfer_id);
    }
    while !pending.is_empty() {
        let outcome = tokio::time::timeout(Duration::from_secs(60), watcher.next())
            .await
            .expect("an outcome within a minute");
        let id = match &outcome {
            Outcome::Completed(m) => m.transfer_id.to_string(),
            Outcome::Failed(m) => m.transfer_id.to_string(),
            Outcome::Rejected(m) => m.transfer_id.clone(),
        };
        if !pending.remove(&id) {
            continue;
        }
        outcomes.insert(id, outcome);
        let _ = seen.send(outcomes.len());
        if !stop.load(Ordering::Relaxed) {
            let r = next();
            client::request_transfer(&publisher, &kafka, &r)
                .await
                .unwrap();
            pending.insert(r.transfer_id);
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciling_while_transfers_flow_reports_no_false_discrepancy() {
    let mut env = TestEnv::new("recon-load").await;
    env.start_all(1);
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(env.open_account("USD", "1000.00").await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0usize);
    let settings = settings(&env);

    let load = run_load(&env, accounts, 16, stop.clone(), seen_tx);
    let reconcile_during_load = async {
        // Once the load is well under way (40 outcomes), with 16 transfers always in flight.
        seen.wait_for(|n| *n >= 40).await.unwrap();
        let before = *seen.borrow();
        let report = twophase_reconciler::reconcile(&settings, today()).await;
        let after = *seen.borrow();
        stop.store(true, Ordering::Relaxed);
        (report, before, after)
    };
    let (outcomes, (during, before, after)) = tokio::join!(load, reconcile_during_load);
    eprintln!(
        "during the load: {} outcomes before the run, {} after; {} entries in flight; {}",
        before,
        after,
        during.in_flight_entries,
        during.to_table()
    );
    assert_eq!(during.status, RunStatus::Completed, "{}", during.to_table());
    assert!(during.discrepancies.is_empty());

    // Once everything has ended, the day adds up to exactly what the load did.
    let report = twophase_reconciler::reconcile(&settings, today()).await;
    assert_eq!(report.status, RunStatus::Completed, "{}", report.to_table());
    assert!(report.replaced);
    assert_eq!(report.in_flight_entries, 0);
    let completed: Vec<&TransferCompleted> = outcomes
        .values()
        .filter_map(|o| match o {
            Outcome::Completed(m) => Some(m),
            _ => None,
        })
        .collect();
    assert!(completed.len() >= 40);
    assert_eq!(report.totals.completed, completed.len() as u64);
    assert_eq!(
        report.totals.completed + report.totals.failed + report.totals.rejected,
        outcomes.len() as u64
    );
    let amount: Decimal = completed.iter().map(|m| m.amount).sum();
    assert_eq!(report.totals.by_currency.len(), 1);
    assert_eq!(report.totals.by_currency[0].amount, amount);
    assert_eq!(report.ledger_entries, 2 * completed.len() as u64);
    env.check_invariants().await;
}

/// The figure for BENCHMARKS.md: one reconcile run over 100,000 ledger entries. On the real
/// services they are the debits and credits of 50,000 completed transfers, each with its saga row
/// and its `completed` event. The embedded broker keeps at most 5 MB per partition (about 7,000
/// events), so there 20,000 transfers make 40,000 of the entries and 60,000 deposits the rest.
/// Run with `cargo test -p twophase --release --test reconcile -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: plants 100,000 ledger entries"]
async fn bench_reconcile_100k_ledger_entries() {
    const ENTRIES: usize = 100_000;
    const ACCOUNTS: usize = 100;
    let env = TestEnv::new("recon-bench").await;
    let transfers: usize = if env.embedded() { 20_000 } else { 50_000 };
    let deposits = ENTRIES - 2 * transfers;
    let mut accounts = Vec::new();
    for _ in 0..ACCOUNTS {
        accounts.push(env.open_account("USD", "1000000.00").await);
    }
    let planting = Instant::now();
    let now = Timestamp::now();
    let amount = dec("1.00");
    let mut events = Vec::with_capacity(transfers);
    // Each entry records the balance its account had after it, as the workers write it.
    let mut balances: HashMap<Uuid, Decimal> =
        accounts.iter().map(|a| (*a, dec("1000000.00"))).collect();
    let mut tx = env.db.begin().await.unwrap();
    for i in 0..transfers {
        // Each account sends as many transfers as it receives: balances stay as deposited.
        let (from, to) = (accounts[i % ACCOUNTS], accounts[(i + 1) % ACCOUNTS]);
        let id = Uuid::new_v4();
        execute!(
            &mut tx,
            "INSERT INTO coordinator.transfers (transfer_id, request_hash, request, from_account,
                    to_account, amount, currency, status, captured, credited, created_at,
                    finished_at, updated_at)
             VALUES ($1, 'bench', $2, $3, $4, $5, 'USD', 'completed', true, true, $6, $6, $6)",
            id,
            Json(serde_json::json!({})),
            from,
            to,
            Amount(amount),
            now
        )
        .unwrap();
        for (account, kind) in [(from, "debit"), (to, "credit")] {
            let balance = balances.get_mut(&account).unwrap();
            *balance += if kind == "debit" { -amount } else { amount };
            execute!(
                &mut tx,
                "INSERT INTO account.ledger (account_id, transfer_id, kind, amount, currency,
                                             balance_after, created_at)
                 VALUES ($1, $2, $3, $4, 'USD', $5, $6)",
                account,
                id,
                kind,
                Amount(amount),
                Amount(*balance),
                now
            )
            .unwrap();
        }
        let message = Message::TransferCompleted(TransferCompleted {
            transfer_id: id,
            from_account: from,
            to_account: to,
            amount,
            currency: "USD".into(),
            completed_at: now.0,
        });
        events.push(Outgoing::new(
            env.topics.events(),
            id,
            "/twophase/coordinator",
            &message,
        ));
    }
    for i in 0..deposits {
        let balance = balances.get_mut(&accounts[i % ACCOUNTS]).unwrap();
        *balance += amount;
        execute!(
            &mut tx,
            "INSERT INTO account.ledger (account_id, kind, amount, currency, balance_after,
                                         created_at)
             VALUES ($1, 'deposit', $2, 'USD', $3, $4)",
            accounts[i % ACCOUNTS],
            Amount(amount),
            Amount(*balance),
            now
        )
        .unwrap();
    }
    for (account, balance) in &balances {
        execute!(
            &mut tx,
            "UPDATE account.accounts SET balance = $1 WHERE account_id = $2",
            Amount(*balance),
            account
        )
        .unwrap();
    }
    tx.commit().await.unwrap();
    for chunk in events.chunks(5_000) {
        env.publisher.publish_all(chunk).await.unwrap();
    }
    eprintln!(
        "planted {ENTRIES} ledger entries ({} of {transfers} transfers) and {transfers} events in \
         {:.1} s",
        2 * transfers,
        planting.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let report = twophase_reconciler::reconcile(&settings(&env), today()).await;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(report.status, RunStatus::Completed, "{}", report.to_table());
    assert_eq!(report.totals.completed, transfers as u64);
    assert_eq!(report.ledger_entries, 2 * transfers as u64);
    assert_eq!(report.events.records, transfers as u64);
    assert_eq!(report.accounts, ACCOUNTS as u64);
    eprintln!(
        "BENCH reconcile: {} ledger entries ({} debits and credits), {} events, {ACCOUNTS} \
         accounts on {}: {seconds:.2} s",
        ENTRIES + ACCOUNTS,
        report.ledger_entries,
        report.events.records,
        if env.embedded() {
            "SQLite and the embedded broker"
        } else {
            "PostgreSQL and Kafka"
        }
    );
}
