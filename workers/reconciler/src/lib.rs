//! The reconciler: a batch consumer that checks, one day at a time, that the money and the
//! records of every worker agree (DESIGN §4, invariant 7).
//!
//! For a day (cut in a configured time zone) it reads the outcomes on `transfers.events`, seeking
//! by timestamp and stopping at the end offsets it saw when it started, then reads the account
//! ledger, holds and balances and the coordinator's saga rows, and checks:
//!
//! 1. every account's balance equals the replay of its ledger, and its held amount the sum of
//!    its open holds ([`twophase_account::store::check_balances`]);
//! 2. every transfer completed in the window has exactly one debit on its source and one credit
//!    on its destination, of its amount and currency; a failed or rejected one has none; and no
//!    debit or credit entry of the window lacks a completed transfer;
//! 3. the totals of the window per currency (count and amount of completed transfers);
//! 4. holds still open past an age, and transfers not terminal past an age.
//!
//! The result is a [`Report`]: stored in the `reconciler` schema (one per day; a re-run
//! replaces it, except that a run that failed never replaces a finished one), published to
//! `reconciliation.reports`, printed, and exported as the `twophase_reconciliation_discrepancies`
//! gauge (set for every kind, zeros included, by each run that finishes).
//!
//! It owns the `reconciler` schema. It only ever *reads* the `account` and `coordinator`
//! schemas (on PostgreSQL through read-only transactions), and never joins a consumer group
//! or commits an offset: it must never change what it checks.
//!
//! # Transfers in flight at the window's edge
//!
//! A transfer belongs to the day of its outcome: the `completed_at`/`failed_at`/`rejected_at`
//! carried by its event (a re-published outcome carries the original time, so it is counted
//! once). Its ledger entries are written *before* its outcome, so at midnight a transfer can
//! have its debit in one day and its `completed` event in the next. Two rules keep such a
//! transfer from being reported:
//!
//! - The topic is read from a grace period ([`ReconcilerConfig::grace`]) before the window's
//!   start to a grace period past its end. A debit or credit of the window whose transfer
//!   completed within that range is not unexpected; if the completion falls in the next day,
//!   that day's run checks the entries (looked up by transfer, whenever they were written).
//! - A debit or credit of the window with no completed event in that range (the run happens
//!   while the day is still going on, or a commit was retried past the grace period) is looked
//!   up in `coordinator.transfers`. `committing` means it is in flight, counted in
//!   [`Report::in_flight_entries`] and not a discrepancy; if it never finishes, the
//!   `stuck_transfer` check reports it once it is older than
//!   [`ReconcilerConfig::stuck_transfer_after`]. `completed` means its outcome was published
//!   after the range read (the broker was down, or the coordinator restarted before publishing
//!   it): its legs are checked against the terms in the coordinator's row, as an outcome's
//!   would be. Any other status, or no row at all, is an `unexpected_entry`.
//!
//! The events are read before the database, and the database in one snapshot per check
//! (PostgreSQL `REPEATABLE READ`; on SQLite the transaction holds the write lock), so an outcome
//! that was read always finds the ledger entries that preceded it, and balances, holds and the
//! ledger are compared as of one instant even while transfers flow.

mod checks;
pub mod cli;
mod events;
mod report;
mod store;
mod window;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::NaiveTime;
use serde::{Deserialize, Serialize};
use twophase_runtime::KafkaConfig;

pub use checks::{reconcile, reconcile_in, stored_report};
pub use chrono_tz::Tz;
pub use cli::{reconcile_command, reconciler_command, run_daily, ReconcileArgs, ReconcilerArgs};
pub use report::{CurrencyTotal, Discrepancy, Kind, Report, RunStatus, Totals};
pub use window::{next_run, today, Window};

/// The database schema this worker owns.
pub const SCHEMA: &str = "reconciler";

/// The `ce_type` of a report on `reconciliation.reports`; the payload is the report as JSON.
pub const REPORT_TYPE: &str = "twophase.reconciliation.report";

/// The `ce_source` of the reports.
pub const SOURCE: &str = "/twophase/reconciler";

/// The `[reconciler]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcilerConfig {
    /// The time zone days are cut in: an IANA name such as `UTC` or `Europe/Berlin`.
    pub time_zone: Tz,
    /// When `twophase reconciler` runs each day, in `time_zone` (`HH:MM`). It reconciles the
    /// day before.
    #[serde(with = "hh_mm")]
    pub run_at: NaiveTime,
    /// How far before the window's start and past its end `transfers.events` is read, so that
    /// an outcome published just after midnight for money moved just before it is found.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// A hold still open after this long is reported as `stale_hold`.
    #[serde(with = "humantime_serde")]
    pub stale_hold_after: Duration,
    /// A transfer still preparing, committing or aborting after this long is reported as
    /// `stuck_transfer`.
    #[serde(with = "humantime_serde")]
    pub stuck_transfer_after: Duration,
    /// The run fails when `transfers.events` yields nothing for this long before its end
    /// offsets are reached.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// How often `twophase reconciler` reads again the stored reports its gauges show, so that
    /// a day reconciled again by hand (`twophase reconcile --date`) shows in them within it.
    #[serde(with = "humantime_serde")]
    pub gauges_refresh: Duration,
}

impl Default for ReconcilerConfig {
    fn default() -> ReconcilerConfig {
        ReconcilerConfig {
            time_zone: Tz::UTC,
            run_at: NaiveTime::from_hms_opt(2, 0, 0).expect("02:00 is a time"),
            grace: Duration::from_secs(5 * 60),
            stale_hold_after: Duration::from_secs(60 * 60),
            stuck_transfer_after: Duration::from_secs(15 * 60),
            read_timeout: Duration::from_secs(30),
            gauges_refresh: Duration::from_secs(5 * 60),
        }
    }
}

/// Everything a run needs: where the services are and how to reconcile.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub kafka: KafkaConfig,
    pub config: ReconcilerConfig,
    /// Where `twophase reconciler` serves `/metrics` and `/healthz`; unset: loopback, port
    /// [`DEFAULT_METRICS_PORT`].
    pub metrics_listen: Option<SocketAddr>,
}

/// The reconciler's default port for `/metrics` and `/healthz`.
pub const DEFAULT_METRICS_PORT: u16 = 9106;

/// Why a run could not finish. Each variant names what was being read.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading {topic}")]
    Kafka {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("topic {0} has no partitions: run `twophase topics create`")]
    NoPartitions(String),
    #[error(
        "reading {topic}: partition {partition} gave nothing for {waited:?} at offset {position}, \
         before its end offset {high}"
    )]
    Stalled {
        topic: String,
        partition: i32,
        position: i64,
        high: i64,
        waited: Duration,
    },
    #[error(
        "reading {topic}: partition {partition} no longer holds its records before offset {low}, \
         and some of them may be of the window; it cannot be checked (is the topic's retention \
         shorter than the age of the day?)"
    )]
    Incomplete {
        topic: String,
        partition: i32,
        low: i64,
    },
    #[error("database: {context}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("checking balances")]
    Balances(#[source] twophase_account::AccountError),
    #[error("publishing the report to {topic}")]
    Publish {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("the event reader stopped: {0}")]
    Reader(String),
}

impl ReconcileError {
    fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> ReconcileError {
        move |source| ReconcileError::Database { context, source }
    }
}

/// `HH:MM` (or `HH:MM:SS`) for [`ReconcilerConfig::run_at`].
mod hh_mm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format("%H:%M").to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let text = String::deserialize(d)?;
        NaiveTime::parse_from_str(&text, "%H:%M")
            .or_else(|_| NaiveTime::parse_from_str(&text, "%H:%M:%S"))
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a time of day HH:MM")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_round_trips_through_toml_text() {
        let config: ReconcilerConfig = serde_json::from_value(serde_json::json!({
            "time_zone": "Europe/Berlin",
            "run_at": "03:30",
            "grace": "10m",
        }))
        .unwrap();
        assert_eq!(config.time_zone, chrono_tz::Europe::Berlin);
        assert_eq!(config.run_at, NaiveTime::from_hms_opt(3, 30, 0).unwrap());
        assert_eq!(config.grace, Duration::from_secs(600));
        assert_eq!(config.stale_hold_after, Duration::from_secs(3600));
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["run_at"], "03:30");
        assert_eq!(back["time_zone"], "Europe/Berlin");
    }

    #[test]
    fn bad_values_are_refused_with_the_value() {
        let err = serde_json::from_value::<ReconcilerConfig>(serde_json::json!({"run_at": "2am"}))
            .unwrap_err();
        assert!(err.to_string().contains("2am"), "{err}");
        assert!(serde_json::from_value::<ReconcilerConfig>(
            serde_json::json!({"time_zone": "Mars/Olympus"})
        )
        .is_err());
        assert!(
            serde_json::from_value::<ReconcilerConfig>(serde_json::json!({"gracee": "1m"}))
                .is_err()
        );
    }
}
