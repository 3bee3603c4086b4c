//! The audit consume loop: batches of raw records, one transaction per batch, offsets stored
//! only once the batch is committed.
//!
//! Delivery is at least once: a crash between the commit and the offset commit redelivers the
//! batch, and the unique keys of the table (topic/partition/offset, message id) turn the
//! second delivery into nothing, so every record is in the table exactly once. A batch that
//! cannot be written is retried with backoff for as long as it takes: the audit trail never
//! skips a record, and it never dead-letters one either (it keeps undecodable bytes as they
//! are).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use twophase_messages::envelope::headers as ce;
use twophase_messages::Topics;
use twophase_runtime::db::{Db, Timestamp};
use twophase_runtime::http::Health;
use twophase_runtime::kafka::headers as record_headers;
use twophase_runtime::worker::{commit_stored, member_config, MemberContext};
use twophase_runtime::{metrics, telemetry, KafkaConfig, RetryConfig};

use crate::record::{self, Source};
use crate::{store, AuditConfig};

/// What the loop needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaConfig,
    pub retry: RetryConfig,
    /// Its batches and commits (`[audit]`).
    pub audit: AuditConfig,
    pub health: Health,
}

impl Settings {
    pub fn group_id(&self) -> String {
        format!("{}-{}", self.kafka.group_prefix, crate::WORKER)
    }
}

/// Every topic the audit consumer reads: the saga topics, their dead-letter topics,
/// `reconciliation.reports` and `ops.replays` (each made at start-up if missing).
pub fn topics(kafka: &KafkaConfig) -> Vec<String> {
    Topics::new(&kafka.topic_prefix).all()
}

/// Runs the consume loop until `shutdown` is cancelled; the batch in hand is written before it
/// returns. A fatal error of its Kafka consumer cancels `shutdown` and is returned
/// (`twophase_runtime::kafka::fatal`).
pub async fn run(db: Db, settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let group = settings.group_id();
    let context = MemberContext::new(group.clone(), settings.health.clone());
    let mut config = member_config(&settings.kafka, &group, crate::WORKER, &settings.retry);
    let consumer: StreamConsumer<MemberContext> = config
        .set(
            "auto.commit.interval.ms",
            settings
                .audit
                .commit_interval
                .as_millis()
                .max(1)
                .to_string(),
        )
        .create_with_context(context)
        .context("the audit worker's Kafka consumer")?;
    let topics = topics(&settings.kafka);
    let subscription: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&subscription)?;
    metrics::init_worker(crate::WORKER, &topics);
    tracing::info!(group = %group, ?subscription, "auditing");
    twophase_runtime::kafka::fatal::stop_on_fatal(&shutdown);

    let prefix = settings.kafka.topic_prefix.clone();
    let saga = Topics::new(&prefix);
    loop {
        let batch = collect(&consumer, &settings, &shutdown).await;
        if batch.is_empty() {
            if shutdown.is_cancelled() {
                break;
            }
            continue;
        }
        let started = Instant::now();
        let now = Utc::now();
        let entries: Vec<_> = batch
            .iter()
            .map(|m| record::entry(&Source::of(m), &saga, &prefix, now))
            .collect();
        // With span export on, each record's write is a span in the record's own trace.
        let record_spans: Vec<tracing::Span> = if telemetry::exporting() {
            batch
                .iter()
                .map(|m| record_span(&Source::of(m), &group))
                .collect()
        } else {
            Vec::new()
        };
        let span = tracing::info_span!(
            "audit_batch",
            messaging.system = "kafka",
            messaging.consumer.group.name = %group,
            messaging.batch.message_count = batch.len(),
        );
        if !write(&db, &entries, &settings.retry, &shutdown)
            .instrument(span)
            .await
        {
            // Shut down before the batch could be written: its offsets stay unstored, and the
            // next owner reads it again.
            break;
        }
        drop(record_spans);
        store_offsets(&consumer, &batch);
        let seconds = started.elapsed().as_secs_f64();
        for m in &batch {
            metrics::message_handled(crate::WORKER, m.topic(), metrics::outcome::OK, seconds);
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    commit_stored(&consumer);
    tracing::info!("audit consumer stopped");
    twophase_runtime::kafka::fatal::outcome()
}

/// The span of one record's audit write, continuing the trace the record carries.
fn record_span(source: &Source<'_>, group: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "audit",
        otel.name = format!("audit {}", source.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = source.topic,
        messaging.consumer.group.name = group,
        messaging.kafka.partition = source.partition,
        messaging.kafka.offset = source.offset,
    );
    telemetry::continue_trace(
        &span,
        source.header(ce::TRACEPARENT),
        source.header(ce::TRACESTATE),
    );
    span
}

/// Up to `batch_size` records, or up to the one that brings them to `batch_bytes`: waits for the
/// first, then takes what comes within `batch_timeout` of it. Empty on shutdown.
async fn collect(
    consumer: &StreamConsumer<MemberContext>,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Vec<OwnedMessage> {
    let mut batch = Vec::new();
    let first = tokio::select! {
        _ = shutdown.cancelled() => return batch,
        m = consumer.recv() => m,
    };
    let mut bytes = 0;
    let take = |m: &BorrowedMessage<'_>, batch: &mut Vec<OwnedMessage>| {
        batch.push(m.detach());
        size_of_record(m)
    };
    match first {
        Ok(m) => bytes += take(&m, &mut batch),
        Err(e) => {
            consumer_error(&e);
            return batch;
        }
    }
    let audit = &settings.audit;
    let deadline = tokio::time::Instant::now() + audit.batch_timeout;
    while batch.len() < audit.batch_size.max(1) && bytes < audit.batch_bytes {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            m = consumer.recv() => match m {
                Ok(m) => bytes += take(&m, &mut batch),
                Err(e) => consumer_error(&e),
            },
        }
    }
    batch
}

/// The bytes of a record a batch holds: its payload, key and headers (read as bytes: rdkafka's
/// own reader panics on a name that is not UTF-8).
fn size_of_record(m: &BorrowedMessage<'_>) -> usize {
    let headers: usize = record_headers::of(m)
        .iter()
        .map(|h| h.name.len() + h.value.map_or(0, <[u8]>::len))
        .sum();
    m.payload_len() + m.key_len() + headers
}

fn consumer_error(e: &KafkaError) {
    tracing::warn!(error = %e, "consumer error");
}

/// Writes a batch, retrying until it is committed; false if shutdown came first.
async fn write(
    db: &Db,
    entries: &[record::Entry],
    retry: &RetryConfig,
    shutdown: &CancellationToken,
) -> bool {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store::append(db, entries, Timestamp::now()).await {
            Ok(appended) => {
                tracing::debug!(
                    inserted = appended.inserted,
                    duplicates = appended.duplicates,
                    "batch audited"
                );
                return true;
            }
            Err(e) => {
                let first = &entries[0];
                let wait = retry.backoff(attempt);
                let mut topics: Vec<&str> = entries.iter().map(|e| e.topic.as_str()).collect();
                topics.sort_unstable();
                topics.dedup();
                for topic in topics {
                    metrics::handler_retry(crate::WORKER, topic);
                }
                // Every failure is retried: skipping a record would leave a hole in the audit
                // trail. A failure that does not go away shows as lag and in these lines.
                let level_error = !e.is_transient() || attempt > 10;
                if level_error {
                    tracing::error!(error = format!("{:#}", anyhow::Error::new(e)), attempt, ?wait, topic = %first.topic, partition = first.kafka_partition, offset = first.kafka_offset, records = entries.len(), "audit batch not written; retrying");
                } else {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::new(e)),
                        attempt,
                        ?wait,
                        records = entries.len(),
                        "audit batch not written; retrying"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Stores, per partition, the offset after the batch's last record of it. A partition revoked
/// meanwhile refuses; its next owner reads those records again and finds them stored.
fn store_offsets(consumer: &StreamConsumer<MemberContext>, batch: &[OwnedMessage]) {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        let offset = last.entry((m.topic(), m.partition())).or_insert(m.offset());
        *offset = (*offset).max(m.offset());
    }
    for ((topic, partition), offset) in last {
        if let Err(e) = consumer.store_offset(topic, partition, offset) {
            tracing::debug!(error = %e, topic, partition, offset, "offset not stored (partition revoked?)");
        }
    }
}
