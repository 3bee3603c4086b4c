//! The reports table: one report per day, replaced by a re-run (see `checks::store_and_publish`
//! for when it is not), with its discrepancies.

use chrono::NaiveDate;
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{Amount, Db, Timestamp, Tx};
use twophase_runtime::{execute, query_as};

use crate::report::Report;

/// What is kept of an earlier report of the same day.
#[derive(Debug, Clone)]
pub(crate) struct Previous {
    /// Runs of the day so far.
    pub runs: i32,
    pub status: String,
    /// The time zone it cut the day in.
    pub time_zone: String,
}

/// Locks the day, whether it has a report yet or not, and reads its report, if there is one.
/// Two runs of a day (two reconciler copies, or the daily run and `twophase reconcile`) then
/// decide, publish and store one after the other: a row lock alone locks nothing when the day
/// has no row yet. On SQLite the transaction holds the database's write lock already.
pub(crate) async fn lock_day(
    tx: &mut Tx,
    date: NaiveDate,
) -> Result<Option<Previous>, sqlx::Error> {
    if let Tx::Postgres(pg) = tx {
        twophase_runtime::db::sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("twophase reconciler report {date}"))
            .execute(&mut **pg)
            .await?;
    }
    let row = query_as!(
        tx,
        (i32, String, String),
        fetch_optional,
        "SELECT runs, status, time_zone FROM reports WHERE report_date = $1 FOR UPDATE",
        date,
    )?;
    Ok(row.map(|(runs, status, time_zone)| Previous {
        runs,
        status,
        time_zone,
    }))
}

/// Writes the day's report over the earlier one (if any), with its discrepancies.
pub(crate) async fn write(
    tx: &mut Tx,
    report: &Report,
    previous: Option<Previous>,
) -> Result<(), sqlx::Error> {
    let count = i32::try_from(report.discrepancies.len()).unwrap_or(i32::MAX);
    let started = Timestamp::from(report.started_at);
    let finished = Timestamp::from(report.finished_at);
    execute!(
        tx,
        "DELETE FROM discrepancies WHERE report_date = $1",
        report.date,
    )?;
    match previous {
        Some(previous) => {
            execute!(
                tx,
                "UPDATE reports SET report_id = $2, status = $3, time_zone = $4, window_start = $5,
                        window_end = $6, discrepancies = $7, report = $8, runs = $9,
                        started_at = $10, finished_at = $11
                 WHERE report_date = $1",
                report.date,
                report.report_id,
                report.status.as_str(),
                &report.time_zone,
                Timestamp::from(report.window.start),
                Timestamp::from(report.window.end),
                count,
                Json(report),
                previous.runs.saturating_add(1),
                started,
                finished,
            )?;
        }
        None => {
            execute!(
                tx,
                "INSERT INTO reports (report_date, report_id, status, time_zone, window_start,
                                      window_end, discrepancies, report, runs, first_run_at,
                                      started_at, finished_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9, $10)",
                report.date,
                report.report_id,
                report.status.as_str(),
                &report.time_zone,
                Timestamp::from(report.window.start),
                Timestamp::from(report.window.end),
                count,
                Json(report),
                started,
                finished,
            )?;
        }
    }
    for (seq, d) in report.discrepancies.iter().enumerate() {
        execute!(
            tx,
            "INSERT INTO discrepancies (report_date, seq, kind, account_id, transfer_id, currency,
                                        expected, actual, difference, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            report.date,
            i32::try_from(seq).unwrap_or(i32::MAX),
            d.kind.as_str(),
            d.account_id,
            d.transfer_id,
            &d.currency,
            d.expected.map(Amount),
            d.actual.map(Amount),
            d.difference.map(Amount),
            &d.detail,
        )?;
    }
    Ok(())
}

/// The reports of the latest `days` days whose run did not fail, newest first: those the
/// discrepancy gauges choose from until the next run ([`crate::report::shown_at_start`]).
pub async fn latest_verdicts(db: &Db, days: i64) -> Result<Vec<Report>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let rows = query_as!(
        &mut tx,
        (Json<Report>,),
        fetch_all,
        "SELECT report FROM reports WHERE status <> 'failed' ORDER BY report_date DESC LIMIT $1",
        days,
    )?;
    tx.commit().await?;
    Ok(rows.into_iter().map(|(Json(report),)| report).collect())
}

/// The day of the oldest stored report, and the reports of `from` on, oldest first.
pub async fn since(
    db: &Db,
    from: NaiveDate,
) -> Result<(Option<NaiveDate>, Vec<Report>), sqlx::Error> {
    let mut tx = db.begin().await?;
    let first = query_as!(
        &mut tx,
        (NaiveDate,),
        fetch_optional,
        "SELECT report_date FROM reports ORDER BY report_date LIMIT 1",
    )?;
    let reports = query_as!(
        &mut tx,
        (Json<Report>,),
        fetch_all,
        "SELECT report FROM reports WHERE report_date >= $1 ORDER BY report_date",
        from,
    )?;
    tx.commit().await?;
    Ok((
        first.map(|(day,)| day),
        reports.into_iter().map(|(Json(r),)| r).collect(),
    ))
}

/// The stored report of a day.
pub async fn load(db: &Db, date: NaiveDate) -> Result<Option<Report>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let row = query_as!(
        &mut tx,
        (Json<Report>,),
        fetch_optional,
        "SELECT report FROM reports WHERE report_date = $1",
        date,
    )?;
    tx.commit().await?;
    Ok(row.map(|(Json(report),)| report))
}
