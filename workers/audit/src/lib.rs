//! The audit consumer, the tamper-evident audit store and the audit query API.
//!
//! `twophase audit` reads every saga topic, their dead-letter topics, `reconciliation.reports`
//! and `ops.replays` as one consumer group and stores each message once in `audit.audit_log`,
//! undecodable bytes included (which is why it has a consume loop of its own rather than the
//! runtime's decoded [`Handler`](twophase_runtime::Handler) loop). It serves the rows back over
//! HTTP (`GET /audit/logs`, `GET /transfers/{id}/timeline`), and `twophase audit verify` proves
//! that no row was altered or removed since it was written.
//!
//! It owns the `audit` schema and touches no other. It never publishes, and it never updates or
//! deletes an audit row: the database refuses both, and the hash chain ([`chain`]) shows it if
//! someone goes around the database's refusal.

pub mod api;
pub mod chain;
pub mod cli;
pub mod consumer;
pub mod record;
pub mod store;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use record::{Entry, Severity};
pub use store::Row;

/// The database schema this worker owns.
pub const SCHEMA: &str = "audit";

/// The worker's name: its consumer group is `<group_prefix>-audit`.
pub const WORKER: &str = "audit";

/// The `[audit]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Where the query API listens, with `/metrics` and `/healthz` beside it. Loopback by
    /// default: the API has no authentication of its own, so expose it only behind one.
    pub listen: SocketAddr,
    /// The most messages written in one database transaction.
    pub batch_size: usize,
    /// The most bytes of records (payloads, keys and headers) taken into one batch: the batch
    /// ends with the record that reaches it, so that a backlog of large records is written a
    /// few at a time rather than held all at once.
    pub batch_bytes: usize,
    /// How long a batch waits to fill up before it is written anyway.
    #[serde(with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// How often the offsets of written batches are committed to Kafka. After a crash the
    /// records of up to this long are read again (and found stored).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9105)),
            batch_size: 500,
            batch_bytes: 16 << 20,
            batch_timeout: Duration::from_millis(100),
            commit_interval: Duration::from_secs(1),
        }
    }
}

/// Why the audit store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Another writer kept extending the chain of a partition while this batch tried to append
    /// to it (two audit copies during a rebalance); the batch is retried as a whole.
    #[error("the chain of {topic}/{partition} kept moving while offset {offset} was appended")]
    ChainContention {
        topic: String,
        partition: i32,
        offset: i64,
    },
}

impl AuditError {
    /// Whether retrying the same batch may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            AuditError::Database(e) => twophase_runtime::db::is_transient(e),
            AuditError::ChainContention { .. } => true,
        }
    }
}
