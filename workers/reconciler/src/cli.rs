//! The subcommands: `twophase reconcile` reconciles one day and exits; `twophase reconciler`
//! runs every day at `reconciler.run_at` and serves `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chrono::{Days, NaiveDate, Utc};
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;
use twophase_runtime::db::Db;
use twophase_runtime::{http, out, outln, shutdown};

use crate::checks::{set_gauges_of, show_reconciled_through};
use crate::report::{self, Report};
use crate::store;
use crate::window::{catch_up_from, missed_days, next_run, today, MAX_CATCH_UP};
use crate::{reconcile, reconcile_in, Settings, DEFAULT_METRICS_PORT, SCHEMA};

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// The day to reconcile, YYYY-MM-DD, as a day in the time zone (default: yesterday).
    #[arg(long, value_parser = parse_day)]
    pub date: Option<NaiveDate>,
    /// The IANA time zone the day is cut in, e.g. Europe/Berlin (default: reconciler.time_zone).
    /// A report in another zone is printed and published, but does not replace the day's
    /// stored report in reconciler.time_zone.
    #[arg(long)]
    pub time_zone: Option<Tz>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReconcilerArgs {
    /// Reconcile the last day (yesterday in reconciler.time_zone) now, print the report and
    /// exit with its code, instead of running every day.
    #[arg(long)]
    pub once: bool,
    /// With --once: print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `twophase reconcile`: exit code 0 no discrepancies, 1 discrepancies, 3 the run failed.
pub async fn reconcile_command(settings: Settings, args: ReconcileArgs) -> anyhow::Result<u8> {
    let tz = args.time_zone.unwrap_or(settings.config.time_zone);
    let today = today(tz, Utc::now());
    let date = args.date.unwrap_or_else(|| yesterday(today));
    anyhow::ensure!(
        date <= today,
        "{date} has not begun in {tz} yet (it is {today} there)"
    );
    let report = reconcile_in(&settings, date, tz).await;
    print(&report, args.json)?;
    Ok(report.exit_code())
}

/// `twophase reconciler`: every day at `run_at`, the day before; with `--once`, the last day
/// now.
pub async fn reconciler_command(settings: Settings, args: ReconcilerArgs) -> anyhow::Result<u8> {
    if args.once {
        let date = yesterday(today(settings.config.time_zone, Utc::now()));
        let report = reconcile(&settings, date).await;
        print(&report, args.json)?;
        return Ok(report.exit_code());
    }
    let token = shutdown::on_signal();
    let db = Db::connect(&settings.database_url, SCHEMA, 2)
        .await
        .context("connecting to the reconciler schema")?;
    // The gauges show the last verdict from the start, not only after the next run: a restart
    // must not clear a discrepancy alert.
    refresh_gauges(&settings, &[]).await;
    let health = http::Health::of_database(&db);
    // No consumer group to wait for: ready as soon as the database answers.
    health.set_assigned(true);
    let listen = settings
        .metrics_listen
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT)));
    http::serve(listen, health, token.clone())
        .await
        .context("set metrics_listen (TWOPHASE_METRICS_LISTEN) to a free address")?;
    run_daily(&settings, token).await;
    db.close().await;
    Ok(0)
}

/// Reconciles the day before at `run_at` every day until `shutdown`. Before each wait for the
/// next run it catches up on the days of the last `MAX_CATCH_UP` that have no verdict: missed
/// while no reconciler ran, failed, or only reconciled before they were over. A run that has begun is
/// finished before stopping.
pub async fn run_daily(settings: &Settings, shutdown: CancellationToken) {
    let config = &settings.config;
    // The days the gauges show: the latest report's until a run, then the run's days.
    let mut shown = Vec::new();
    loop {
        let caught_up = catch_up(settings, &shutdown).await;
        if !caught_up.is_empty() {
            shown = caught_up;
        }
        if shutdown.is_cancelled() {
            return;
        }
        let (due, day) = next_run(Utc::now(), config.time_zone, config.run_at);
        tracing::info!(%due, %day, "next reconciliation");
        loop {
            let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            if wait.is_zero() {
                break;
            }
            // Wakes at least hourly, so that a clock change is noticed, and to read again the
            // reports the gauges show, so that a day run again by hand shows in them.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait.min(config.gauges_refresh).min(Duration::from_secs(3600))) => {}
            }
            refresh_gauges(settings, &shown).await;
        }
        reconcile(settings, day).await;
        shown = vec![day];
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Shows in the gauges the stored reports of `days`, or, with none, the one
/// [`report::shown_at_start`] picks of the latest.
async fn refresh_gauges(settings: &Settings, days: &[NaiveDate]) {
    let stored = async {
        let db = Db::connect(&settings.database_url, SCHEMA, 1).await?;
        let mut reports = Vec::new();
        if days.is_empty() {
            // The days a catch-up looks at, and today.
            let recent = store::latest_verdicts(&db, MAX_CATCH_UP as i64 + 1).await?;
            let of_record = settings.config.time_zone.name();
            reports.extend(report::shown_at_start(&recent, of_record).cloned());
        }
        for day in days {
            reports.extend(store::load(&db, *day).await?);
        }
        db.close().await;
        Ok::<_, sqlx::Error>(reports)
    };
    match stored.await {
        Ok(reports) => set_gauges_of(&reports, settings.config.time_zone.name()),
        Err(e) => tracing::warn!(error = %e, "the stored reports could not be read for the gauges"),
    }
}

/// Reconciles the days that have no verdict, oldest first, and shows what all of them found.
/// Returns the days reconciled.
async fn catch_up(settings: &Settings, shutdown: &CancellationToken) -> Vec<NaiveDate> {
    let mut reports = Vec::new();
    for day in missed(settings).await {
        if shutdown.is_cancelled() {
            break;
        }
        tracing::info!(%day, "catching up: the day has no verdict");
        reports.push(reconcile(settings, day).await);
    }
    if reports.len() > 1 {
        set_gauges_of(&reports, settings.config.time_zone.name());
    }
    reports.iter().map(|r| r.date).collect()
}

/// The days to catch up on now, from the stored reports.
async fn missed(settings: &Settings) -> Vec<NaiveDate> {
    let config = &settings.config;
    let (now, tz, at) = (Utc::now(), config.time_zone, config.run_at);
    let Some(from) = catch_up_from(now, tz, at) else {
        return Vec::new();
    };
    let stored = async {
        let db = Db::connect(&settings.database_url, SCHEMA, 1).await?;
        let stored = store::since(&db, from).await;
        db.close().await;
        stored
    };
    let (first, reports) = match stored.await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(error = %e, "the stored reports could not be read: no day is caught up");
            return Vec::new();
        }
    };
    // How far the books are reconciled shows from the start, not only after the next run.
    show_reconciled_through(&reports, tz.name());
    let verdicts = reports
        .iter()
        .filter(|r| r.is_whole_day_verdict(tz.name()))
        .map(|r| r.date)
        .collect();
    let (days, earlier) = missed_days(now, tz, at, first, &verdicts);
    if earlier {
        tracing::warn!(
            %from,
            "days before {from} may have no verdict either; reconcile them with `twophase \
             reconcile --date`"
        );
    }
    days
}

/// A day as `--date` takes it: YYYY-MM-DD with a four-digit year (chrono alone reads `26-12-06`
/// as the year 26), no earlier than 1970-01-02, the first day every time zone has Kafka
/// timestamps for.
fn parse_day(text: &str) -> Result<NaiveDate, String> {
    let digits = |from: usize, to: usize| {
        text.get(from..to)
            .is_some_and(|part| part.bytes().all(|b| b.is_ascii_digit()))
    };
    let shape = text.len() == 10
        && digits(0, 4)
        && text.get(4..5) == Some("-")
        && digits(5, 7)
        && text.get(7..8) == Some("-")
        && digits(8, 10);
    if !shape {
        return Err("write the day as YYYY-MM-DD, e.g. 2026-11-23".to_owned());
    }
    let day = text.parse::<NaiveDate>().map_err(|_| {
        format!("{text} is no day of the calendar: its month or day is out of range")
    })?;
    let first = NaiveDate::from_ymd_opt(1970, 1, 2).expect("a date");
    if day < first {
        return Err(format!(
            "{day} is before {first}: Kafka keeps no records of it to reconcile"
        ));
    }
    Ok(day)
}

fn yesterday(today: NaiveDate) -> NaiveDate {
    today.checked_sub_days(Days::new(1)).unwrap_or(today)
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?);
    } else {
        out!("{}", report.to_table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_written_in_full_and_kafka_has_times_for_it() {
        assert_eq!(
            parse_day("2026-11-23"),
            Ok(NaiveDate::from_ymd_opt(2026, 11, 23).unwrap())
        );
        for bad in ["2026-13-01", "2026-02-29", "2026-04-31"] {
            let err = parse_day(bad).unwrap_err();
            assert!(err.contains("no day of the calendar"), "{bad}: {err}");
        }
        for bad in [
            "26-12-06",
            "2026-1-05",
            " 2026-11-05",
            "2026-11-05x",
            "２０２６-11-05",
        ] {
            let err = parse_day(bad).unwrap_err();
            assert!(
                err.starts_with("write the day as YYYY-MM-DD"),
                "{bad}: {err}"
            );
        }
        assert!(parse_day("1970-01-01")
            .unwrap_err()
            .contains("before 1970-01-02"));
        assert!(parse_day("1970-01-02").is_ok());
    }
}
