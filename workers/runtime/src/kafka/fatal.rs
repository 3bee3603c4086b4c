//! Fatal errors of the process's Kafka clients.
//!
//! After a fatal error a librdkafka client can do nothing more: an idempotent producer raises
//! one when it can no longer keep the order or the exactly-once delivery of what it sent, and
//! fails every later message with it; a consumer raises one when its group fences it. The only
//! way on is a new client. A worker that kept running would hold its partitions and settle
//! nothing, with `/healthz` still ready, until someone restarted it. So the clients' contexts
//! note a fatal error here ([`log`]), the consume loops stop on it ([`stop_on_fatal`]), and the
//! worker exits with it (exit 3), for its supervisor to start it again. Nothing is lost: as
//! after any crash, a message counts as done only once its effects are durable and its replies
//! taken.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::sync::{LazyLock, OnceLock};

use rdkafka::bindings::rd_kafka_test_fatal_error;
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::types::RDKafkaRespErr;
use tokio_util::sync::CancellationToken;

/// The first fatal error, with the client it came from.
static FIRST: OnceLock<String> = OnceLock::new();
/// Cancelled once a fatal error is noted.
static RAISED: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);

/// Notes a fatal error of the client `client` names ("the Kafka producer"), `reason` being
/// librdkafka's account of it.
pub fn note(client: &str, reason: &str) {
    tracing::error!(
        client,
        reason,
        "fatal Kafka client error: the client can do nothing more"
    );
    let _ = FIRST.set(format!("{client} hit a fatal error: {reason}"));
    RAISED.cancel();
}

/// A librdkafka log line, passed on to the process's log. librdkafka logs a fatal error under
/// the facility `FATAL` as it raises it, for producers and consumers alike, so this is where it
/// is noted, for the client `client` names. (rdkafka hands a producer's fatal error to the
/// context's `error` with its underlying code, not as fatal: the crash test shows it.)
pub fn log(client: impl FnOnce() -> String, level: RDKafkaLogLevel, facility: &str, line: &str) {
    if facility == "FATAL" {
        note(&client(), line);
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", facility, "{line}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{line}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{line}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{line}"),
    }
}

/// Cancels `shutdown` once a fatal error is noted, for a consume loop to stop on it.
pub fn stop_on_fatal(shutdown: &CancellationToken) {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = RAISED.cancelled() => shutdown.cancel(),
            _ = shutdown.cancelled() => {}
        }
    });
}

/// What a stopped consume loop returns: the fatal error that stopped it, if one did.
pub fn outcome() -> anyhow::Result<()> {
    match FIRST.get() {
        Some(fatal) => Err(anyhow::anyhow!(
            "{fatal}; a new process makes new clients and goes on where this one stopped"
        )),
        None => Ok(()),
    }
}

/// Makes librdkafka raise a fatal error on `client`, an idempotent producer, as it does on a
/// failure of idempotence it cannot recover from (`rd_kafka_test_fatal_error`, which librdkafka
/// provides for this). Only the `<worker>.kafka_fatal` failpoint calls it.
pub(crate) fn raise_for_test<C: ClientContext>(client: &Client<C>) {
    let reason = CString::new("raised by the kafka_fatal failpoint").expect("no NUL");
    // SAFETY: `client` is a live librdkafka handle for the call, and `reason` a NUL-terminated
    // string that librdkafka copies.
    let err = unsafe {
        rd_kafka_test_fatal_error(
            client.native_ptr(),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__INCONSISTENT,
            reason.as_ptr(),
        )
    };
    if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        tracing::error!(?err, "librdkafka raised no fatal error for the failpoint");
    }
}
