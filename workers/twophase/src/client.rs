//! What a producer does: publish a `TransferRequested` and read its outcome from
//! `transfers.events`. Used by `twophase transfer` and by the tests.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tracing::Instrument;
use twophase_messages::{Envelope, Message, Topics, TransferRequested};
use twophase_runtime::kafka::{consumer_config, envelope_of};
use twophase_runtime::{KafkaConfig, Outgoing, Publisher};

/// A transfer's outcome as a producer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed(twophase_messages::TransferCompleted),
    Failed(twophase_messages::TransferFailed),
    Rejected(twophase_messages::TransferRejected),
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Completed(_) => "completed",
            Outcome::Failed(_) => "failed",
            Outcome::Rejected(_) => "rejected",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Completed(_) => None,
            Outcome::Failed(f) => Some(&f.reason),
            Outcome::Rejected(r) => Some(&r.reason),
        }
    }

    /// The transfer it is the outcome of, as the producer spelled its id.
    pub fn transfer_id(&self) -> String {
        match self {
            Outcome::Completed(m) => m.transfer_id.to_string(),
            Outcome::Failed(m) => m.transfer_id.to_string(),
            Outcome::Rejected(m) => m.transfer_id.clone(),
        }
    }

    /// `status`, or `status/reason` when there is a reason: how summaries count outcomes.
    pub fn label(&self) -> String {
        match self.reason() {
            Some(reason) => format!("{}/{reason}", self.status()),
            None => self.status().to_owned(),
        }
    }

    /// The exit code of `twophase transfer --wait`: 0 completed, 1 failed, 2 rejected.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Completed(_) => 0,
            Outcome::Failed(_) => 1,
            Outcome::Rejected(_) => 2,
        }
    }
}

/// Reads a topic from its current end: it joins no consumer group and commits nothing, so any
/// number of readers can run beside the workers.
pub struct TopicTail {
    consumer: StreamConsumer,
}

impl std::fmt::Debug for TopicTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicTail").finish_non_exhaustive()
    }
}

impl TopicTail {
    /// Starts at the current end of every partition of `topic`, so that nothing published
    /// after this returns is missed.
    pub async fn start(kafka: &KafkaConfig, topic: String) -> anyhow::Result<TopicTail> {
        let consumer: StreamConsumer = consumer_config(kafka)
            .set(
                "group.id",
                format!("twophase-tail-{}", uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()?;
        let consumer = tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
            // Right after topics are created (or the broker started) the broker may not know
            // their leaders yet.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                match assign_at_end(&consumer, &topic) {
                    Ok(()) => return Ok(consumer),
                    Err(e) if std::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, "topic tail not assigned yet; retrying");
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await??;
        Ok(TopicTail { consumer })
    }

    /// The next message, decoded.
    pub async fn next(&self) -> anyhow::Result<(Envelope, Message)> {
        let record = loop {
            match self.consumer.recv().await {
                Ok(record) => break record,
                // The broker restarting or a connection dropping: librdkafka reconnects and
                // resumes from where this reader was.
                Err(e) => tracing::debug!(error = %e, "reading a topic: retrying"),
            }
        };
        let envelope = envelope_of(&record, None, uuid::Uuid::new_v4)?;
        let payload = record.payload().unwrap_or_default();
        let message = Message::decode(&envelope.message_type, envelope.schema_version, payload)?;
        Ok((envelope, message))
    }
}

/// Reads outcomes from `transfers.events`, from the moment it starts.
#[derive(Debug)]
pub struct OutcomeWatcher {
    tail: TopicTail,
}

impl OutcomeWatcher {
    pub async fn start(kafka: &KafkaConfig) -> anyhow::Result<OutcomeWatcher> {
        let topic = Topics::new(&kafka.topic_prefix).events();
        Ok(OutcomeWatcher {
            tail: TopicTail::start(kafka, topic).await?,
        })
    }

    /// The next outcome event. Other events, such as `commit_stuck`, are skipped, and so are
    /// records this version cannot read (a newer coordinator's event type or schema version, a
    /// stray record): none of them is the outcome anyone here waits for.
    pub async fn next(&self) -> Outcome {
        loop {
            match self.tail.next().await {
                Ok((_, Message::TransferCompleted(m))) => return Outcome::Completed(m),
                Ok((_, Message::TransferFailed(m))) => return Outcome::Failed(m),
                Ok((_, Message::TransferRejected(m))) => return Outcome::Rejected(m),
                Ok(_) => continue,
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "skipping a record on the outcome topic that is not an outcome this version reads"
                ),
            }
        }
    }

    /// Waits until every transfer in `ids` has an outcome, or `timeout` passes; returns the
    /// outcomes seen (the first one of each transfer).
    pub async fn wait_for(
        &self,
        ids: impl IntoIterator<Item = String>,
        timeout: Duration,
    ) -> anyhow::Result<HashMap<String, Outcome>> {
        let mut waiting: std::collections::HashSet<String> = ids.into_iter().collect();
        let mut seen = HashMap::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            let Ok(outcome) = tokio::time::timeout_at(deadline, self.next()).await else {
                break;
            };
            let id = outcome.transfer_id();
            if waiting.remove(&id) {
                seen.insert(id, outcome);
            }
        }
        Ok(seen)
    }
}

fn assign_at_end(consumer: &StreamConsumer, topic: &str) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic {topic} has no partitions: run `twophase topics create`"
    );
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        assignment.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&assignment)?;
    Ok(())
}

/// Publishes a transfer request as a producer would, keyed by its transfer id.
pub async fn request_transfer(
    publisher: &Publisher,
    kafka: &KafkaConfig,
    request: &TransferRequested,
) -> anyhow::Result<Outgoing> {
    let topic = Topics::new(&kafka.topic_prefix).requests();
    let span = tracing::info_span!(
        "send",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %topic,
        transfer.id = %request.transfer_id,
    );
    let message = Message::TransferRequested(request.clone());
    // The request's trace starts here: its consumers' spans hang under this one.
    let outgoing =
        span.in_scope(|| Outgoing::new(topic, &request.transfer_id, "/twophase/cli", &message));
    publisher.publish(&outgoing).instrument(span).await?;
    Ok(outgoing)
}
