//! The shared worker runtime: configuration, Kafka clients, the at-least-once consume loop with
//! retries and dead letters, database pools and migrations, logging, and shutdown.
//!
//! Every worker is a [`Handler`] run by [`worker::run`]; the runtime owns delivery semantics so
//! that no worker can get them wrong: an offset is stored only after the handler's effects are
//! committed and every message it produced is acknowledged by the broker.

pub mod config;
pub mod db;
pub mod embedded;
pub mod error;
pub mod failpoint;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod output;
pub mod shutdown;
pub mod telemetry;
pub mod worker;

pub use config::{KafkaConfig, RetryConfig};
pub use error::HandlerError;
pub use kafka::{Outgoing, Publisher};
pub use tokio_util::sync::CancellationToken;
pub use worker::{Handled, Handler, Incoming};
