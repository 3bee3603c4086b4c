//! `twophase audit` (the worker), `twophase audit verify`, `twophase audit query` and
//! `twophase transfers show`. The ops commands read the audit database directly; they need no
//! running worker.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Subcommand};
use twophase_messages::Topics;
use twophase_runtime::db::Db;
use twophase_runtime::http::{self, Health};
use twophase_runtime::output::EXIT_USAGE;
use twophase_runtime::{kafka, outln, shutdown, KafkaConfig, RetryConfig};

use crate::api::{self, parse_filter};
use crate::record::format_time;
use crate::store::{self, Row, Step};
use crate::{consumer, AuditConfig, SCHEMA};

/// Exit code of `twophase audit verify` when a chain is broken.
pub const EXIT_BROKEN: u8 = 1;
/// Exit code of `twophase transfers show` when nothing of the transfer is audited.
pub const EXIT_NOT_FOUND: u8 = 1;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check that no audit row was changed or removed since it was written.
    ///
    /// Walks the hash chain of every Kafka partition of origin from its first row, and reports
    /// per chain the first link that does not hold: a row whose content no longer matches its
    /// hash (names the row), a gap in the sequence (rows deleted), a row that does not link to
    /// the one before it. Prints each chain's head (last sequence number and hash): kept
    /// elsewhere, they show if the newest rows are ever removed, or a chain rewritten from some
    /// row on by someone who recomputed its hashes, which the chain alone cannot show.
    ///
    /// Exit code: 0 every chain intact, 1 a chain is broken.
    Verify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Look up audit rows, newest first (the same filters as GET /audit/logs).
    Query(QueryArgs),
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// transfer, account, reconciliation or replay.
    #[arg(long)]
    entity_type: Option<String>,
    /// A transfer or account id (or a report or replay run id).
    #[arg(long)]
    entity_id: Option<String>,
    /// A message type, e.g. twophase.transfer.failed, or twophase.dead_letter.
    #[arg(long)]
    event_type: Option<String>,
    /// info, warning, error or critical.
    #[arg(long)]
    severity: Option<String>,
    /// Rows that occurred at or after this RFC 3339 time.
    #[arg(long)]
    start_time: Option<String>,
    /// Rows that occurred before this RFC 3339 time.
    #[arg(long)]
    end_time: Option<String>,
    /// Only the rows after this place in the order: the `next` an earlier page gave, so that
    /// rows written meanwhile do not shift the pages.
    #[arg(long, value_name = "NEXT")]
    before: Option<String>,
    /// Which page, from 1 (counted from --before if given).
    #[arg(long, default_value_t = 1)]
    page: u32,
    /// Rows per page, 1 to 100.
    #[arg(long, default_value_t = store::DEFAULT_PAGE_SIZE)]
    page_size: u32,
    /// Print the page as JSON, as the API answers it.
    #[arg(long)]
    json: bool,
}

/// What the audit commands need from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Services<'a> {
    pub database_url: &'a str,
    pub max_connections: u32,
    pub kafka: &'a KafkaConfig,
    pub retry: &'a RetryConfig,
    pub audit: &'a AuditConfig,
    /// Where every worker serves `/metrics` and `/healthz`, if configured; the audit worker
    /// serves them on `audit.listen` too.
    pub metrics_listen: Option<SocketAddr>,
}

async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<Db> {
    Db::connect(database_url, SCHEMA, max_connections)
        .await
        .context("connecting to the audit database")
}

/// `twophase audit [verify | query …]`.
pub async fn audit(services: Services<'_>, args: AuditArgs) -> anyhow::Result<u8> {
    match args.command {
        None => worker(services).await,
        Some(AuditCommand::Verify { json }) => {
            let db = connect(services.database_url, 1).await?;
            verify(&db, json).await
        }
        Some(AuditCommand::Query(args)) => {
            let db = connect(services.database_url, 1).await?;
            query(&db, args).await
        }
    }
}

/// `twophase transfers show ID`: a transfer's timeline from the audit log. Exit code 0 found, 1
/// nothing of this transfer is audited.
pub async fn timeline(database_url: &str, id: &str, json: bool) -> anyhow::Result<u8> {
    let db = connect(database_url, 1).await?;
    let steps = store::timeline(&db, id).await?;
    db.close().await;
    if steps.is_empty() {
        eprintln!("no audited message of transfer {id}");
        return Ok(EXIT_NOT_FOUND);
    }
    if json {
        let out = serde_json::json!({
            "transfer_id": crate::record::normalize_transfer_id(id),
            "steps": store::to_json(&steps),
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    outln!("transfer {}", crate::record::normalize_transfer_id(id));
    for step in &steps {
        print_step(step);
    }
    Ok(0)
}

/// Runs the audit worker: the consumer, and the API with `/metrics` and `/healthz`.
async fn worker(services: Services<'_>) -> anyhow::Result<u8> {
    let db = connect(services.database_url, services.max_connections).await?;
    let topics = Topics::new(&services.kafka.topic_prefix);
    kafka::ensure_topics(services.kafka, &topics.all())
        .await
        .context("creating topics")?;
    let token = shutdown::on_signal();
    let health = Health::of_database(&db);
    let bound = api::serve(
        services.audit.listen,
        db.clone(),
        health.clone(),
        token.clone(),
    )
    .await
    .context("set audit.listen (TWOPHASE_AUDIT__LISTEN) to a free address")?;
    tracing::info!(%bound, "serving the audit API (/audit/logs, /transfers/{{id}}/timeline), /metrics and /healthz");
    if let Some(metrics) = services
        .metrics_listen
        .filter(|m| *m != services.audit.listen)
    {
        http::serve(metrics, health.clone(), token.clone())
            .await
            .context("set metrics_listen (TWOPHASE_METRICS_LISTEN) to a free address")?;
    }
    let settings = consumer::Settings {
        kafka: services.kafka.clone(),
        retry: services.retry.clone(),
        audit: services.audit.clone(),
        health,
    };
    consumer::run(db.clone(), settings, token).await?;
    db.close().await;
    Ok(0)
}

async fn verify(db: &Db, json: bool) -> anyhow::Result<u8> {
    let reports = store::verify(db).await.context("reading the audit log")?;
    db.close().await;
    let broken: Vec<_> = reports.iter().filter(|r| r.broken.is_some()).collect();
    let rows: i64 = reports.iter().map(|r| r.rows).sum();
    if json {
        let out = serde_json::json!({
            "intact": broken.is_empty(),
            "rows": rows,
            "chains": store::to_json(&reports),
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for r in &reports {
            let state = if r.broken.is_some() { "BROKEN" } else { "ok" };
            outln!(
                "{}/{}  {} rows  head seq {} hash {}  {state}",
                r.topic,
                r.partition,
                r.rows,
                r.head_seq,
                r.head_hash
            );
        }
        for r in &broken {
            let b = r.broken.as_ref().expect("filtered on broken");
            outln!(
                "broken: chain {}/{} at row {} (seq {}): {}",
                r.topic,
                r.partition,
                b.id,
                b.chain_seq,
                b.problem
            );
        }
        outln!(
            "{} chains, {rows} rows: {}",
            reports.len(),
            if broken.is_empty() {
                "intact".to_owned()
            } else {
                format!("{} broken", broken.len())
            }
        );
    }
    Ok(if broken.is_empty() { 0 } else { EXIT_BROKEN })
}

async fn query(db: &Db, args: QueryArgs) -> anyhow::Result<u8> {
    let page = args.page.to_string();
    let page_size = args.page_size.to_string();
    let given = [
        ("entity_type", args.entity_type.as_deref()),
        ("entity_id", args.entity_id.as_deref()),
        ("event_type", args.event_type.as_deref()),
        ("severity", args.severity.as_deref()),
        ("start_time", args.start_time.as_deref()),
        ("end_time", args.end_time.as_deref()),
        ("before", args.before.as_deref()),
        ("page", Some(page.as_str())),
        ("page_size", Some(page_size.as_str())),
    ];
    let filter = match parse_filter(given.into_iter().filter_map(|(k, v)| v.map(|v| (k, v)))) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: --{}: {}", e.parameter.replace('_', "-"), e.message);
            return Ok(EXIT_USAGE);
        }
    };
    let page = store::query(db, &filter)
        .await
        .context("reading the audit log")?;
    db.close().await;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&store::to_json(&page))?);
        return Ok(0);
    }
    for row in &page.rows {
        print_row(row);
    }
    let pages = (page.total + i64::from(page.page_size) - 1) / i64::from(page.page_size);
    let more = if page.total_exact { "" } else { "more than " };
    outln!(
        "page {} of {more}{} ({more}{} rows match)",
        page.page,
        pages.max(1),
        page.total
    );
    if let Some(next) = &page.next {
        outln!("next page: --before {next}");
    }
    Ok(0)
}

fn print_row(row: &Row) {
    let e = &row.entry;
    outln!(
        "#{:<8} {}  {:<8} {:<34} {:<48} {:<16} {}  trace {}",
        row.id,
        format_time(&e.occurred_at),
        e.severity,
        e.event_type,
        match (&e.entity_type, &e.entity_id) {
            (Some(t), Some(id)) => format!("{t} {id}"),
            _ => "-".to_owned(),
        },
        e.action.as_deref().unwrap_or("-"),
        e.actor_id.as_deref().unwrap_or("-"),
        e.trace_id.as_deref().unwrap_or("-"),
    );
}

/// The time between two steps, in the unit that reads best: a step after a restart or an
/// outage can come minutes or days after the one before.
fn gap(ms: f64) -> String {
    if ms < 1_000.0 {
        return format!("{ms:.1} ms");
    }
    if ms < 60_000.0 {
        return format!("{:.2} s", ms / 1_000.0);
    }
    let seconds = (ms / 1_000.0).round() as u64;
    let (minutes, seconds) = (seconds / 60, seconds % 60);
    let (hours, minutes) = (minutes / 60, minutes % 60);
    match (hours / 24, hours % 24) {
        (0, 0) => format!("{minutes}m {seconds:02}s"),
        (0, hours) => format!("{hours}h {minutes:02}m {seconds:02}s"),
        (days, hours) => format!("{days}d {hours:02}h {minutes:02}m"),
    }
}

fn print_step(step: &Step) {
    let e = &step.row.entry;
    let since = step
        .since_previous_ms
        .map_or_else(String::new, |ms| format!("+{}", gap(ms)));
    outln!(
        "  {}  {:>12}  {:<8} {:<34} {:<18} {:<24} {}",
        format_time(&e.occurred_at),
        since,
        e.severity,
        e.event_type,
        e.action.as_deref().unwrap_or("-"),
        e.actor_id.as_deref().unwrap_or("-"),
        e.topic,
    );
}

#[cfg(test)]
mod tests {
    use super::gap;

    #[test]
    fn a_gap_between_steps_is_written_in_the_unit_that_reads_best() {
        for (ms, shown) in [
            (0.4, "0.4 ms"),
            (999.94, "999.9 ms"),
            (1_000.0, "1.00 s"),
            (5_214.0, "5.21 s"),
            (333_934.3, "5m 34s"),
            (3_600_000.0, "1h 00m 00s"),
            (90_061_000.0, "1d 01h 01m"),
        ] {
            assert_eq!(gap(ms), shown, "{ms}");
        }
    }
}
