//! Reading the outcomes of a time range from `transfers.events` as a batch: no consumer group,
//! no commits, a start found by timestamp and an end fixed when the read begins.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use twophase_messages::{reasons, Message};
use twophase_runtime::kafka::{consumer_config, envelope_of};
use twophase_runtime::KafkaConfig;
use uuid::Uuid;

use crate::ReconcileError;

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Completed,
    Failed,
    Rejected,
}

impl Ending {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Failed => "failed",
            Ending::Rejected => "rejected",
        }
    }
}

/// What a completed transfer moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Terms {
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Decimal,
    pub currency: String,
}

/// One outcome event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutcomeEvent {
    /// As published: a rejected request's id may not be a UUID.
    pub transfer_id: String,
    pub ending: Ending,
    /// The outcome's own time (`completed_at`, …), which decides its day.
    pub at: DateTime<Utc>,
    /// Set for completed transfers.
    pub terms: Option<Terms>,
}

impl OutcomeEvent {
    fn of(message: Message) -> Option<OutcomeEvent> {
        Some(match message {
            Message::TransferCompleted(m) => OutcomeEvent {
                transfer_id: m.transfer_id.to_string(),
                ending: Ending::Completed,
                at: m.completed_at,
                terms: Some(Terms {
                    from_account: m.from_account,
                    to_account: m.to_account,
                    amount: m.amount,
                    currency: m.currency,
                }),
            },
            Message::TransferFailed(m) => OutcomeEvent {
                transfer_id: m.transfer_id.to_string(),
                ending: Ending::Failed,
                at: m.failed_at,
                terms: None,
            },
            // The refusal of a request that reused a transfer's id with another body answers
            // that request; the transfer it names has an outcome of its own.
            Message::TransferRejected(m) if m.reason == reasons::CONFLICT => return None,
            Message::TransferRejected(m) => OutcomeEvent {
                transfer_id: m.transfer_id,
                ending: Ending::Rejected,
                at: m.rejected_at,
                terms: None,
            },
            _ => return None,
        })
    }
}

/// The outcomes read, in the order of each partition.
#[derive(Debug, Default)]
pub(crate) struct EventScan {
    pub outcomes: Vec<OutcomeEvent>,
    pub records: u64,
    pub undecodable: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The broker found no record at or after the start time. That is either true (every
    /// record is older) or the broker cannot look up by time (librdkafka's mock cluster
    /// answers "none" to every such lookup): the last record's timestamp tells which.
    Probe,
    Reading,
    Done,
}

#[derive(Debug)]
struct Partition {
    low: i64,
    /// The end offset when the read began: records from here on are not read.
    high: i64,
    state: State,
    /// Whether a record of the range has been seen since the partition was (re)positioned;
    /// until then a record at or past `high` is a leftover of the probe, not the end.
    started: bool,
}

/// Reads every outcome on `topic` whose record was written in `[from, until]`, up to the end
/// offsets of the moment it starts. Blocking: run it on a blocking thread.
pub(crate) fn read_outcomes(
    kafka: &KafkaConfig,
    topic: &str,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    idle_timeout: Duration,
) -> Result<EventScan, ReconcileError> {
    let kafka_error = |source| ReconcileError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let consumer: BaseConsumer = consumer_config(kafka)
        // A group id is required of a consumer, but it never joins the group nor commits.
        .set(
            "group.id",
            format!(
                "{}-reconciler-{}",
                kafka.group_prefix,
                Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(kafka_error)?;
    let timeout = Duration::from_secs(10);
    let from_ms = from.timestamp_millis();
    let until_ms = until.timestamp_millis();

    let mut parts: BTreeMap<i32, Partition> = BTreeMap::new();
    let mut lookup = TopicPartitionList::new();
    for id in partition_ids(&consumer, topic, timeout)? {
        let (low, high) =
            settled(|| consumer.fetch_watermarks(topic, id, timeout)).map_err(kafka_error)?;
        if high > low {
            lookup
                .add_partition_offset(topic, id, Offset::Offset(from_ms))
                .map_err(kafka_error)?;
            parts.insert(
                id,
                Partition {
                    low,
                    high,
                    state: State::Reading,
                    started: false,
                },
            );
        }
    }
    let mut scan = EventScan::default();
    if parts.is_empty() {
        return Ok(scan);
    }
    let found =
        settled(|| consumer.offsets_for_times(lookup.clone(), timeout)).map_err(kafka_error)?;
    let mut assignment = TopicPartitionList::new();
    for element in found.elements() {
        let Some(part) = parts.get_mut(&element.partition()) else {
            continue;
        };
        let start = match element.offset() {
            Offset::Offset(o) if o >= part.high => {
                part.state = State::Done;
                continue;
            }
            Offset::Offset(o) => {
                if o <= part.low && part.low > 0 {
                    return Err(incomplete(topic, element.partition(), part.low));
                }
                o.max(part.low)
            }
            _ => {
                part.state = State::Probe;
                part.high - 1
            }
        };
        assignment
            .add_partition_offset(topic, element.partition(), Offset::Offset(start))
            .map_err(kafka_error)?;
    }
    consumer.assign(&assignment).map_err(kafka_error)?;

    let mut last_progress = Instant::now();
    while let Some((id, low, high)) = parts
        .iter()
        .find(|(_, p)| p.state != State::Done)
        .map(|(&id, p)| (id, p.low, p.high))
    {
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => {
                if last_progress.elapsed() > idle_timeout {
                    return Err(ReconcileError::Stalled {
                        topic: topic.to_owned(),
                        partition: id,
                        position: consumer
                            .position()
                            .ok()
                            .and_then(|p| {
                                p.find_partition(topic, id)
                                    .and_then(|e| e.offset().to_raw())
                            })
                            .unwrap_or(low),
                        high,
                        waited: idle_timeout,
                    });
                }
                continue;
            }
            // librdkafka reports broker trouble here and keeps retrying on its own; a read
            // that really cannot go on ends at the idle timeout above.
            Some(Err(e)) => {
                tracing::warn!(error = %e, topic, "reading transfer outcomes");
                continue;
            }
            Some(Ok(message)) => message,
        };
        let Some(part) = parts.get_mut(&message.partition()) else {
            continue;
        };
        let offset = message.offset();
        let timestamp = message.timestamp().to_millis();
        match part.state {
            State::Done => continue,
            State::Probe => {
                if offset != part.high - 1 {
                    continue;
                }
                last_progress = Instant::now();
                if timestamp.is_some_and(|t| t < from_ms) {
                    finish(&consumer, topic, message.partition(), part);
                } else if part.low > 0 {
                    return Err(incomplete(topic, message.partition(), part.low));
                } else {
                    part.state = State::Reading;
                    consumer
                        .seek(
                            topic,
                            message.partition(),
                            Offset::Offset(part.low),
                            timeout,
                        )
                        .map_err(kafka_error)?;
                }
                continue;
            }
            State::Reading => {}
        }
        if offset >= part.high {
            if part.started {
                finish(&consumer, topic, message.partition(), part);
            }
            continue;
        }
        part.started = true;
        last_progress = Instant::now();
        if timestamp.is_some_and(|t| t > until_ms) {
            finish(&consumer, topic, message.partition(), part);
            continue;
        }
        if offset + 1 >= part.high {
            finish(&consumer, topic, message.partition(), part);
        }
        if timestamp.is_some_and(|t| t < from_ms) {
            continue;
        }
        scan.records += 1;
        match decode(&message) {
            Ok(Some(outcome)) => scan.outcomes.push(outcome),
            Ok(None) => {}
            Err(e) => {
                scan.undecodable += 1;
                tracing::warn!(
                    error = %e,
                    topic,
                    partition = message.partition(),
                    offset,
                    "skipping a record of transfers.events that does not decode"
                );
            }
        }
    }
    Ok(scan)
}

/// The records before `low` are gone (retention, or the embedded broker's size limit), and
/// some of them may have been in the range: counting without them would be wrong.
fn incomplete(topic: &str, partition: i32, low: i64) -> ReconcileError {
    ReconcileError::Incomplete {
        topic: topic.to_owned(),
        partition,
        low,
    }
}

/// Marks a partition read to its end and stops fetching it.
fn finish(consumer: &BaseConsumer, topic: &str, id: i32, part: &mut Partition) {
    part.state = State::Done;
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, id);
    // Only saves fetching what would be skipped anyway.
    let _ = consumer.pause(&list);
}

fn decode(message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<Option<OutcomeEvent>> {
    let envelope = envelope_of(message, None, Uuid::new_v4)?;
    let payload = message.payload().unwrap_or_default();
    let decoded = Message::decode(&envelope.message_type, envelope.schema_version, payload)?;
    Ok(OutcomeEvent::of(decoded))
}

/// Retries a lookup for a few seconds: right after a topic is made, its partitions have no
/// leader yet and lookups answer `NotLeaderForPartition` or `LeaderNotAvailable`.
fn settled<T>(
    mut lookup: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> rdkafka::error::KafkaResult<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lookup() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "transfers.events not ready for lookups; retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The partitions of `topic`. Right after the topics are made the broker may not know them yet.
fn partition_ids(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, ReconcileError> {
    let mut attempt = 0;
    loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|source| ReconcileError::Kafka {
                topic: topic.to_owned(),
                source,
            })?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !ids.is_empty() {
            return Ok(ids);
        }
        if attempt >= 20 {
            return Err(ReconcileError::NoPartitions(topic.to_owned()));
        }
        attempt += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
}
