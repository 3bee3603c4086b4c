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
use uuid::Uuid;

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
            .set("group.id", format!("twophase-tail-{}", Uuid::new_v4()))
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
        let envelope = envelope_of(&record, None, Uuid::new_v4)?;
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
        self.next_with_envelope().await.1
    }

    async fn next_with_envelope(&self) -> (Envelope, Outcome) {
        loop {
            match self.tail.next().await {
                Ok((e, Message::TransferCompleted(m))) => return (e, Outcome::Completed(m)),
                Ok((e, Message::TransferFailed(m))) => return (e, Outcome::Failed(m)),
                Ok((e, Message::TransferRejected(m))) => return (e, Outcome::Rejected(m)),
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

    /// Waits until `sent`, a request published as `request`, is answered, or `timeout` passes.
    /// Another request may use the same transfer id meanwhile: see [`answers`].
    pub async fn wait_for_answer(
        &self,
        request: &TransferRequested,
        sent: &Outgoing,
        timeout: Duration,
    ) -> Option<Outcome> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (envelope, outcome) = tokio::time::timeout_at(deadline, self.next_with_envelope())
                .await
                .ok()?;
            if answers(request, sent.envelope.id, &envelope, &outcome) {
                return Some(outcome);
            }
        }
    }
}

/// Whether an outcome answers a request sent as message `request_message_id`. Its transfer id
/// must be the request's, as outcomes name it. Another request under that id, with another
/// body, is answered by a `conflict` caused by that request, which does not answer this one;
/// and a transfer that another body started is not this one's where a completed outcome's
/// terms (accounts, amount, currency) show it. A failed outcome carries no terms, nor does a
/// completed one carry the request's `reference`: a body that differs only there, or a
/// transfer that failed, is taken as this request's.
pub fn answers(
    request: &TransferRequested,
    request_message_id: Uuid,
    envelope: &Envelope,
    outcome: &Outcome,
) -> bool {
    if outcome.transfer_id() != twophase_messages::named(&request.transfer_id) {
        return false;
    }
    match outcome {
        Outcome::Rejected(r) if r.reason == twophase_messages::reasons::CONFLICT => {
            envelope.causation_id == Some(request_message_id)
        }
        Outcome::Completed(c) => {
            let same = |named: &str, id: Uuid| Uuid::parse_str(named).is_ok_and(|n| n == id);
            same(&request.from_account, c.from_account)
                && same(&request.to_account, c.to_account)
                && request.currency == c.currency
                && request.amount.parse::<rust_decimal::Decimal>().ok() == Some(c.amount)
        }
        _ => true,
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

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use rust_decimal::Decimal;
    use twophase_messages::{reasons, TransferCompleted, TransferFailed, TransferRejected};

    use super::*;

    fn request(transfer_id: &str, amount: &str) -> TransferRequested {
        TransferRequested {
            transfer_id: transfer_id.to_owned(),
            from_account: "6F0C9C1E-3B0A-4D5E-9F10-2A3B4C5D6E7F".to_owned(),
            to_account: "0b8c3b2e-4a5d-4e6f-8a9b-0c1d2e3f4a5b".to_owned(),
            amount: amount.to_owned(),
            currency: "USD".to_owned(),
            reference: None,
        }
    }

    fn caused_by(id: Uuid) -> Envelope {
        let mut envelope = Envelope::new("twophase.transfer.rejected", "/test", "t".to_owned());
        envelope.causation_id = Some(id);
        envelope
    }

    fn rejected(transfer_id: &str, reason: &str) -> Outcome {
        Outcome::Rejected(TransferRejected {
            transfer_id: transfer_id.to_owned(),
            reason: reason.to_owned(),
            detail: String::new(),
            rejected_at: Utc::now(),
        })
    }

    #[test]
    fn a_conflict_answers_only_the_request_that_caused_it() {
        let id = Uuid::new_v4().to_string();
        let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());
        let conflict = rejected(&id, reasons::CONFLICT);
        let asked = request(&id, "20");
        assert!(answers(&asked, mine, &caused_by(mine), &conflict));
        assert!(!answers(&asked, mine, &caused_by(theirs), &conflict));
        // Any other rejection under the id answers it.
        let invalid = rejected(&id, reasons::INVALID_AMOUNT);
        assert!(answers(&asked, mine, &caused_by(theirs), &invalid));
    }

    #[test]
    fn a_completed_transfer_answers_a_request_for_its_terms_only() {
        let id = Uuid::new_v4();
        let asked = request(&id.to_string(), "10");
        let completed = |amount: i64| {
            Outcome::Completed(TransferCompleted {
                transfer_id: id,
                from_account: asked.from_account.parse().unwrap(),
                to_account: asked.to_account.parse().unwrap(),
                amount: Decimal::new(amount, 2),
                currency: "USD".to_owned(),
                completed_at: Utc::now(),
            })
        };
        let envelope = caused_by(Uuid::new_v4());
        // "10" is 10.00, and the accounts are UUIDs however they are spelled.
        assert!(answers(&asked, Uuid::new_v4(), &envelope, &completed(1000)));
        assert!(!answers(
            &asked,
            Uuid::new_v4(),
            &envelope,
            &completed(2000)
        ));
        let failed = Outcome::Failed(TransferFailed {
            transfer_id: id,
            reason: reasons::TIMEOUT.to_owned(),
            participant: None,
            risk: None,
            failed_at: Utc::now(),
        });
        assert!(answers(&asked, Uuid::new_v4(), &envelope, &failed));
        let other = request(&Uuid::new_v4().to_string(), "10");
        assert!(!answers(&other, Uuid::new_v4(), &envelope, &failed));
    }

    #[test]
    fn a_long_malformed_id_is_matched_as_its_rejection_names_it() {
        let long = "x".repeat(300);
        let echoed = twophase_messages::named(&long).into_owned();
        assert_ne!(echoed, long);
        let outcome = rejected(&echoed, reasons::INVALID_TRANSFER_ID);
        let envelope = caused_by(Uuid::new_v4());
        assert!(answers(
            &request(&long, "1"),
            Uuid::new_v4(),
            &envelope,
            &outcome
        ));
    }
}
