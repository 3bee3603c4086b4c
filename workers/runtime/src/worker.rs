//! The at-least-once consume loop every worker runs.
//!
//! For each message, in partition order: decode it, apply it with the handler in a database
//! transaction, commit, publish the messages it calls for and wait for the broker's
//! acknowledgement, and only then store the offset. A crash anywhere in between redelivers the
//! message, and handlers are idempotent, so nothing is lost or applied twice.
//!
//! Whatever has arrived is taken as a batch and applied in one transaction: the handler reads
//! and writes the rows of all its messages at once, so a batch costs a few statements and one
//! commit rather than several of each per message. If the batch fails, each partition's share
//! is tried together, and then each message alone, so that a bad message fails by itself.
//!
//! A message that cannot be decoded, or whose handler fails permanently, or transiently for
//! longer than the retry budget, goes to `<topic>.dlq` with its original key, bytes and headers
//! plus headers that say why; then the partition moves on. An outage is not the message's
//! fault: while the database does not answer, or the broker takes none of its replies (down,
//! a topic missing, a permission refused), the message waits, however long that is, and the
//! budget counts only once the database answers.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message as _, OwnedHeaders};
use rdkafka::producer::DeliveryFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use twophase_messages::{Envelope, EnvelopeError, Message};

use crate::config::{KafkaConfig, RetryConfig};
use crate::db::{Db, Tx};
use crate::error::HandlerError;
use crate::http::Health;
use crate::kafka::{consumer_config, envelope_of, with_defaults, Outgoing, Publisher};
use crate::metrics;
use crate::telemetry;

/// A decoded message handed to a handler.
#[derive(Debug)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub envelope: Envelope,
    pub message: Message,
    /// The span of this message's handling, in the trace its headers carry. A handler enters
    /// it for the work on this message alone, so that logs and replies belong to its trace.
    pub span: tracing::Span,
}

/// A worker's logic. `apply` must be idempotent: it may see the same message again after a
/// crash or rebalance, and must then return the same replies without applying anything twice.
pub trait Handler: Send + Sync + 'static {
    /// The database the loop opens the handler's transactions on.
    fn db(&self) -> &Db;

    /// Applies messages inside `tx`, in order, and returns what each one handled, in the
    /// same order: one message alone, or whatever arrived together (from one partition or
    /// several; each partition's in offset order). Reading and writing the rows of the whole
    /// batch at once is what makes a batch cheaper than its messages one by one.
    ///
    /// The loop commits `tx` and publishes the replies only once it has committed. An error
    /// rolls the whole transaction back, and the loop then applies the messages one at a
    /// time, so a message's error is its own. Whatever the handler does outside the database
    /// belongs in [`Handled::then`].
    fn apply(
        &self,
        tx: &mut Tx,
        batch: &[Incoming],
    ) -> impl Future<Output = Result<Vec<Handled>, HandlerError>> + Send;
}

/// Each message of `batch` with what `pick` takes from it (the payload a worker handles), or a
/// permanent error naming the first message it does not take: `what` says what was expected
/// ("an account command").
pub fn expect_each<'a, T>(
    batch: &'a [Incoming],
    what: &str,
    pick: impl Fn(&'a Message) -> Option<&'a T>,
) -> Result<Vec<(&'a T, &'a Incoming)>, HandlerError> {
    batch
        .iter()
        .map(|incoming| {
            let picked = pick(&incoming.message).ok_or_else(|| {
                HandlerError::permanent(format!("{} is not {what}", incoming.envelope.message_type))
            })?;
            Ok((picked, incoming))
        })
        .collect()
}

/// A message applied: its replies, and what to do once its transaction has committed.
#[must_use]
pub struct Handled {
    pub replies: Vec<Outgoing>,
    committed: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handled")
            .field("replies", &self.replies)
            .finish_non_exhaustive()
    }
}

impl Handled {
    pub fn replies(replies: Vec<Outgoing>) -> Handled {
        Handled {
            replies,
            committed: None,
        }
    }

    /// Runs `f` once the transaction is committed (metrics, logs, failpoints).
    pub fn then(mut self, f: impl FnOnce() + Send + 'static) -> Handled {
        self.committed = Some(Box::new(f));
        self
    }

    fn committed(&mut self) {
        if let Some(f) = self.committed.take() {
            f();
        }
    }
}

/// Where a worker consumes from and how it retries.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The worker's name: `coordinator`, `account`, `risk`.
    pub name: &'static str,
    pub kafka: KafkaConfig,
    pub retry: RetryConfig,
    pub topics: Vec<String>,
    /// For topics written by producers outside the project, the one message type a record
    /// there may be: what a record without a `ce_type` header is, and the only type taken (a
    /// producer cannot send, say, a vote where requests go).
    pub default_types: Vec<(String, &'static str)>,
    /// Told whether the consumer holds partitions; served on `/healthz`.
    pub health: Health,
}

impl WorkerSettings {
    pub fn group_id(&self) -> String {
        format!("{}-{}", self.kafka.group_prefix, self.name)
    }

    /// The `ce_source` of what this worker publishes.
    pub fn source(&self) -> String {
        format!("/twophase/{}", self.name)
    }
}

/// Header names on dead letters. Do not change: `twophase dlq` and ops tooling read them.
pub mod dlq_headers {
    pub const ERROR: &str = "dlq-error";
    pub const ERROR_CLASS: &str = "dlq-error-class";
    pub const TOPIC: &str = "dlq-original-topic";
    pub const PARTITION: &str = "dlq-original-partition";
    pub const OFFSET: &str = "dlq-original-offset";
    pub const WORKER: &str = "dlq-worker";
    pub const ATTEMPTS: &str = "dlq-attempts";
    pub const FIRST_FAILURE: &str = "dlq-first-failure-time";
    /// On a dead letter too large to set aside whole: what it lacks and where the original is.
    pub const PAYLOAD_OMITTED: &str = "dlq-payload-omitted";
}

/// The longest error text a dead letter carries; the rest is in the worker's log.
const MAX_ERROR_HEADER: usize = 4096;

/// Whether the producer or the broker refused a record for what it is, too large or invalid as a
/// record, rather than for the broker's state or settings: it never will be taken.
fn refused_for_itself(error: &KafkaError) -> bool {
    too_large(error)
        || matches!(
            error,
            KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord)
        )
}

/// Whether the producer or the broker refused a record as too large: it never will be taken.
fn too_large(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// How much of a record its dead letter carries: all of it, or less when that is too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeadLetterForm {
    Whole,
    WithoutPayload,
    /// Without the payload, the record's own headers and its key: only the headers that say
    /// why and where the record is.
    Bare,
}

impl DeadLetterForm {
    fn smaller(self) -> DeadLetterForm {
        match self {
            DeadLetterForm::Whole => DeadLetterForm::WithoutPayload,
            DeadLetterForm::WithoutPayload | DeadLetterForm::Bare => DeadLetterForm::Bare,
        }
    }

    fn omits(self) -> &'static str {
        match self {
            DeadLetterForm::Whole => "nothing",
            DeadLetterForm::WithoutPayload => "the payload",
            DeadLetterForm::Bare => "the payload, the key and the record's headers",
        }
    }

    /// The [`dlq_headers::PAYLOAD_OMITTED`] header of a dead letter of `raw` in this form.
    fn note(self, raw: &BorrowedMessage<'_>, dead_letter_topic: &str) -> Option<String> {
        (self != DeadLetterForm::Whole).then(|| {
            format!(
                "set aside without {}, as the whole record was too large for \
                 {dead_letter_topic}; the original ({} bytes of payload) is at offset {} of \
                 partition {} of {}, and in the audit store",
                self.omits(),
                raw.payload_len(),
                raw.offset(),
                raw.partition(),
                raw.topic(),
            )
        })
    }
}

/// What librdkafka tells a consumer group member beyond messages: statistics (for the
/// consumer-lag metric) and rebalances (for `/healthz`). When partitions are revoked, the
/// offsets stored so far (only ever those of messages whose effects are durable) are committed,
/// so that the next owner does not redo them.
#[derive(Debug)]
pub struct MemberContext {
    group: String,
    health: Health,
    errors: crate::kafka::ErrorLog,
}

impl MemberContext {
    pub fn new(group: String, health: Health) -> MemberContext {
        MemberContext {
            group,
            health,
            errors: Default::default(),
        }
    }
}

impl ClientContext for MemberContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        metrics::record_consumer_lag(&self.group, &statistics);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, line: &str) {
        let client = || format!("the Kafka consumer of group {}", self.group);
        crate::kafka::fatal::log(client, level, facility, line);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let Some(left_out) = self.errors.admit(&error) else {
            return;
        };
        if reason.starts_with("Subscribed topic not available") {
            // Right after topics are created the broker may not know them yet.
            tracing::warn!(%error, reason, left_out, "librdkafka error");
        } else {
            tracing::error!(%error, reason, left_out, "librdkafka error");
        }
    }
}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(_) = rebalance {
            commit_stored(consumer);
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "rebalance failed");
            return;
        }
        // What the member holds now: with the cooperative protocol (a
        // partition.assignment.strategy of cooperative-sticky), a rebalance names only the
        // partitions it adds or takes away, and the member keeps the rest.
        let held = consumer.assignment().map_or(0, |a| a.count());
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(partitions = partitions.count(), held, "partitions assigned");
        }
        self.health.set_assigned(held > 0);
    }
}

/// The configuration of a consumer group member (`name` says which: `coordinator`, `audit`, …)
/// that stores offsets by hand, only once what their messages caused is durable, and commits
/// them in the background.
pub fn member_config(
    kafka: &KafkaConfig,
    group: &str,
    name: &str,
    retry: &RetryConfig,
) -> ClientConfig {
    // A message may fail for its whole retry budget, with a minute to spare, before it is set
    // aside. Each message of a batch has a budget of its own, and an outage is waited out, so
    // in a longer one the member leaves the group while it waits, and rejoins when it polls
    // again; what it had not stored is redone by whoever holds the partition then (handlers
    // are idempotent). (librdkafka's ceiling is a day.)
    let max_poll_interval = (retry.give_up_after.as_millis() as u64 + 60_000)
        .min(86_400_000)
        .to_string();
    let mut config = consumer_config(kafka);
    with_defaults(
        &mut config,
        &[
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            // A crashed member's partitions move within seconds, not the default 45.
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "2000"),
            ("statistics.interval.ms", "5000"),
            ("max.poll.interval.ms", &max_poll_interval),
        ],
    );
    config
        .set("group.id", group)
        .set(
            "client.id",
            format!("twophase-{name}-{}", std::process::id()),
        )
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    config
}

/// Commits the offsets stored since the last commit, if any.
pub fn commit_stored<C: Consumer<X>, X: ConsumerContext>(consumer: &C) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "offset commit failed; the next owner will read some messages again"
        ),
    }
}

/// Runs the consume loop until `shutdown` is cancelled, then commits the stored offsets. A fatal
/// error of a Kafka client (see [`crate::kafka::fatal`]) cancels `shutdown` and is returned.
pub async fn run<H: Handler>(
    handler: Arc<H>,
    settings: WorkerSettings,
    publisher: Publisher,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let context = MemberContext::new(settings.group_id(), settings.health.clone());
    let consumer: StreamConsumer<MemberContext> = member_config(
        &settings.kafka,
        &settings.group_id(),
        settings.name,
        &settings.retry,
    )
    .create_with_context(context)
    .with_context(|| format!("the {} worker's Kafka consumer", settings.name))?;
    metrics::init_worker(settings.name, &settings.topics);
    // A poison message waits for its dead-letter topic to take it: make sure each exists.
    let dead_letters: Vec<String> = settings
        .topics
        .iter()
        .map(|t| twophase_messages::Topics::dead_letters(t))
        .collect();
    crate::kafka::ensure_topics(&settings.kafka, &dead_letters)
        .await
        .with_context(|| format!("the {} worker's dead-letter topics", settings.name))?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .with_context(|| format!("the {} worker's subscription to {topics:?}", settings.name))?;
    tracing::info!(worker = settings.name, group = %settings.group_id(), ?topics, "consuming");
    crate::kafka::fatal::stop_on_fatal(&shutdown);

    let loop_ = ConsumeLoop {
        handler,
        settings,
        publisher,
        shutdown: shutdown.clone(),
    };
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let mut batch = match first {
            Ok(message) => vec![message],
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                continue;
            }
        };
        // Whatever else has already arrived joins the batch, without waiting for more.
        while batch.len() < MAX_BATCH {
            match consumer.recv().now_or_never() {
                Some(Ok(message)) => batch.push(message),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        // The whole batch is applied in one transaction if it can be; if not, partitions are
        // independent: each is worked through in order, all at once.
        let partitions = by_partition(&batch);
        let mut applied = if partitions.len() > 1 {
            let all: Vec<&BorrowedMessage<'_>> = partitions.iter().flatten().copied().collect();
            loop_.apply_together(&all).await.map(Vec::into_iter)
        } else {
            None
        };
        let done = futures::future::join_all(partitions.iter().map(|messages| {
            // Each partition's share of what the whole batch queued, in partition order.
            let queued = applied
                .as_mut()
                .map(|queued| queued.by_ref().take(messages.len()).collect());
            loop_.process_in_order(messages, queued)
        }))
        .await;
        let mut interrupted = false;
        for (messages, (handled, complete)) in partitions.iter().zip(done) {
            interrupted |= !complete;
            let Some(last) = handled.checked_sub(1).map(|i| messages[i]) else {
                continue;
            };
            // Refused only for a partition no longer ours; its next owner redoes the
            // messages, and handlers are idempotent.
            if let Err(e) = consumer.store_offset_from_message(last) {
                tracing::warn!(error = %e, "offset not stored");
            }
        }
        if interrupted {
            break;
        }
    }
    // Stored offsets are committed before leaving, so the next owner does not redo work.
    commit_stored(&consumer);
    tracing::info!(worker = loop_.settings.name, "stopped");
    crate::kafka::fatal::outcome()
}

/// The most messages taken into one batch.
const MAX_BATCH: usize = 512;

/// The batch's messages grouped by topic and partition, each group in offset order.
fn by_partition<'a, 'm>(batch: &'a [BorrowedMessage<'m>]) -> Vec<Vec<&'a BorrowedMessage<'m>>> {
    let mut groups: Vec<Vec<&BorrowedMessage<'m>>> = Vec::new();
    for message in batch {
        let same = |g: &&mut Vec<&BorrowedMessage<'m>>| {
            g[0].partition() == message.partition() && g[0].topic() == message.topic()
        };
        match groups.iter_mut().find(same) {
            Some(group) => group.push(message),
            None => groups.push(vec![message]),
        }
    }
    groups
}

/// Whether a message's replies are only handed to the producer or also acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pipelined,
    Careful,
}

/// Where a message stands after [`ConsumeLoop::process`].
enum Processed {
    /// Applied; its replies are with the producer, acknowledged when these resolve.
    Queued(Vec<DeliveryFuture>),
    /// Applied and acknowledged, or dead-lettered.
    Done,
    /// Shutdown came first; its offset must not be stored.
    Interrupted,
}

struct ConsumeLoop<H> {
    handler: Arc<H>,
    settings: WorkerSettings,
    publisher: Publisher,
    shutdown: CancellationToken,
}

impl<H: Handler> ConsumeLoop<H> {
    /// Processes one partition's messages in order. Returns how many were handled to their end
    /// and whether all were (false: shutdown interrupted).
    ///
    /// Unless `applied` (with the rest of the batch) already, the messages are applied in one
    /// transaction ([`Self::apply_together`]); if that fails, each is applied and committed
    /// before the next one is handled. Either way the replies are only handed to the
    /// producer; the acknowledgements are awaited together at the end, before any offset is
    /// stored. If one was refused, the messages from that one on are handled again, one at a
    /// time, each waiting for its acknowledgements (handlers are idempotent: the stored
    /// replies go out again).
    async fn process_in_order(
        &self,
        messages: &[&BorrowedMessage<'_>],
        applied: Option<Vec<Vec<DeliveryFuture>>>,
    ) -> (usize, bool) {
        let mut interrupted = false;
        let together = match applied {
            Some(queued) => Some(queued),
            None if messages.len() > 1 => self.apply_together(messages).await,
            None => None,
        };
        let queued = match together {
            Some(queued) => queued,
            None => {
                let mut queued: Vec<Vec<DeliveryFuture>> = Vec::with_capacity(messages.len());
                for message in messages {
                    match self.process(message, Mode::Pipelined).await {
                        Processed::Queued(deliveries) => queued.push(deliveries),
                        Processed::Done => queued.push(Vec::new()),
                        Processed::Interrupted => {
                            interrupted = true;
                            break;
                        }
                    }
                }
                queued
            }
        };
        let mut acknowledged = 0;
        'messages: for deliveries in queued {
            for delivery in deliveries {
                if !matches!(delivery.await, Ok(Ok(_))) {
                    break 'messages;
                }
            }
            acknowledged += 1;
        }
        crate::failpoint::hit_at(self.settings.name, "after_publish");
        if interrupted {
            return (acknowledged, false);
        }
        for (i, message) in messages.iter().enumerate().skip(acknowledged) {
            tracing::warn!("replies not acknowledged: handling the message again");
            if !matches!(self.process(message, Mode::Careful).await, Processed::Done) {
                return (i, false);
            }
        }
        (messages.len(), true)
    }

    /// Applies messages (a partition's, or a whole batch's in partition order) in one
    /// transaction, then hands every reply to the producer: one commit instead of one per
    /// message. `None` if a message could not be decoded or applied (the transaction is
    /// rolled back), or the commit or a hand-over to the producer failed; the caller then
    /// handles the messages one at a time, with retries and dead letters, and whatever of them
    /// did commit is found applied (handlers are idempotent).
    async fn apply_together(
        &self,
        messages: &[&BorrowedMessage<'_>],
    ) -> Option<Vec<Vec<DeliveryFuture>>> {
        let started = Instant::now();
        let fail = |step: &str, error: &dyn std::fmt::Display| {
            tracing::debug!(%error, step, "applying the batch together failed: one at a time");
        };
        let mut tx = match self.handler.db().begin().await {
            Ok(tx) => tx,
            Err(e) => {
                fail("begin", &e);
                return None;
            }
        };
        let mut batch = Vec::with_capacity(messages.len());
        for raw in messages {
            match self.decode(raw) {
                Ok(incoming) => batch.push(incoming),
                Err(e) => {
                    fail("decode", &e);
                    return None;
                }
            }
        }
        let handled = match self.handler.apply(&mut tx, &batch).await {
            Ok(handled) => handled,
            Err(e) => {
                fail("apply", &e);
                return None;
            }
        };
        assert_eq!(
            handled.len(),
            batch.len(),
            "a handler answers every message"
        );
        if let Err(e) = tx.commit().await {
            fail("commit", &e);
            return None;
        }
        let seconds = started.elapsed().as_secs_f64();
        let mut queued = Vec::with_capacity(handled.len());
        for (incoming, mut h) in batch.iter().zip(handled) {
            // In the message's span, but not entered across the wait for the producer's queue:
            // a span entered over an await would be current for whatever else ran on the thread.
            incoming.span.in_scope(|| h.committed());
            let published = self
                .publish_committed(&h.replies, Mode::Pipelined)
                .instrument(incoming.span.clone())
                .await;
            match published {
                Ok(Processed::Queued(deliveries)) => queued.push(deliveries),
                Ok(_) => queued.push(Vec::new()),
                Err(e) => {
                    fail("publish", &e);
                    return None;
                }
            }
            metrics::message_handled(
                self.settings.name,
                &incoming.topic,
                metrics::outcome::OK,
                seconds,
            );
        }
        Some(queued)
    }

    /// The span of one message's handling: in the trace its headers carry, with its ids as
    /// fields (so every log line of it has the transfer's trace id). A message whose headers
    /// could not be read has neither; one whose payload could not be read has no transfer id.
    fn span(
        &self,
        raw: &BorrowedMessage<'_>,
        envelope: Option<&Envelope>,
        transfer_id: Option<&str>,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            "consume",
            otel.name = format!("process {}", raw.topic()),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = raw.topic(),
            messaging.consumer.group.name = %self.settings.group_id(),
            messaging.kafka.partition = raw.partition(),
            messaging.kafka.offset = raw.offset(),
            message.id = tracing::field::Empty,
            message.r#type = tracing::field::Empty,
            transfer.id = tracing::field::Empty,
            trace.id = tracing::field::Empty,
        );
        let Some(envelope) = envelope else {
            return span;
        };
        telemetry::continue_trace(
            &span,
            envelope.traceparent.as_deref(),
            envelope.tracestate.as_deref(),
        );
        span.record("message.id", tracing::field::display(envelope.id));
        span.record("message.type", envelope.message_type.as_str());
        if let Some(transfer_id) = transfer_id {
            span.record("transfer.id", transfer_id);
        }
        if let Some(trace_id) = telemetry::exported_trace_id(&span).or_else(|| {
            envelope
                .traceparent
                .as_deref()
                .and_then(telemetry::trace_id_of)
        }) {
            span.record("trace.id", trace_id);
        }
        span
    }

    /// Handles one message: applied and replied (in `Careful` mode, acknowledged too), or
    /// dead-lettered.
    async fn process(&self, raw: &BorrowedMessage<'_>, mode: Mode) -> Processed {
        let incoming = match self.decode(raw) {
            Ok(incoming) => incoming,
            Err(e) => {
                let first = Utc::now();
                // A payload that cannot be read under headers that can is still in its trace.
                let envelope = self.envelope(raw, self.default_type(raw)).ok();
                let span = self.span(raw, envelope.as_ref(), None);
                return self
                    .dead_letter(raw, "decode", &e, 1, first, Instant::now())
                    .instrument(span)
                    .await;
            }
        };
        let span = incoming.span.clone();
        self.handle(raw, &incoming, mode).instrument(span).await
    }

    /// Applies one message in a transaction of its own and commits it.
    async fn apply_alone(&self, incoming: &Incoming) -> Result<Handled, HandlerError> {
        let mut tx = self.handler.db().begin().await?;
        let mut handled = self
            .handler
            .apply(&mut tx, std::slice::from_ref(incoming))
            .await?
            .pop()
            .expect("a handler answers every message");
        tx.commit().await?;
        handled.committed();
        Ok(handled)
    }

    /// The record's envelope, read from its headers (`default_type` for a record without a
    /// `ce_type`: [`Self::default_type`]).
    fn envelope(
        &self,
        raw: &BorrowedMessage<'_>,
        default_type: Option<&str>,
    ) -> Result<Envelope, EnvelopeError> {
        envelope_of(raw, default_type, || {
            Envelope::position_id(raw.topic(), raw.partition(), raw.offset())
        })
    }

    /// The one type a topic carries, for records without a `ce_type` header.
    fn default_type(&self, raw: &BorrowedMessage<'_>) -> Option<&'static str> {
        self.settings
            .default_types
            .iter()
            .find(|(t, _)| t == raw.topic())
            .map(|(_, ty)| *ty)
    }

    fn decode(&self, raw: &BorrowedMessage<'_>) -> anyhow::Result<Incoming> {
        let default_type = self.default_type(raw);
        let envelope = self.envelope(raw, default_type)?;
        let payload = raw.payload().unwrap_or_default();
        let message = Message::decode(&envelope.message_type, envelope.schema_version, payload)?;
        if let Some(only) = default_type {
            anyhow::ensure!(
                envelope.message_type == only,
                "{} carries only {only}, not {}",
                raw.topic(),
                envelope.message_type
            );
        }
        let mut incoming = Incoming {
            topic: raw.topic().to_owned(),
            partition: raw.partition(),
            offset: raw.offset(),
            envelope,
            message,
            span: tracing::Span::none(),
        };
        incoming.span = self.span(
            raw,
            Some(&incoming.envelope),
            Some(&incoming.message.transfer_id()),
        );
        Ok(incoming)
    }

    async fn handle(
        &self,
        raw: &BorrowedMessage<'_>,
        incoming: &Incoming,
        mode: Mode,
    ) -> Processed {
        let started = Instant::now();
        let first_failure = Utc::now();
        // The retry budget counts from here, and again from when the database was last found
        // down: an outage is waited out, not held against the message.
        let mut budget_from = started;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let mut unpublished = false;
            let error = match self.apply_alone(incoming).await {
                Ok(handled) => match self.publish_committed(&handled.replies, mode).await {
                    Ok(processed) => {
                        let seconds = started.elapsed().as_secs_f64();
                        metrics::message_handled(
                            self.settings.name,
                            &incoming.topic,
                            metrics::outcome::OK,
                            seconds,
                        );
                        return processed;
                    }
                    // A reply too large for the producer or its topic, or one the broker finds
                    // invalid as a record, never will be taken.
                    Err(e) if refused_for_itself(&e) => {
                        HandlerError::Permanent(anyhow::Error::new(e).context("publishing replies"))
                    }
                    // Any other refusal is the broker's or its settings' (down, a topic missing,
                    // a permission taken away, a clock), not the message's: what it did is
                    // committed, and setting it aside would leave its replies unsent until a
                    // replay.
                    Err(e) => {
                        unpublished = true;
                        HandlerError::Transient(anyhow::Error::new(e).context("publishing replies"))
                    }
                },
                Err(e) => e,
            };
            let give_up = match &error {
                HandlerError::Permanent(_) => true,
                HandlerError::Transient(_) if unpublished => false,
                HandlerError::Transient(_) => self.budget_spent(&mut budget_from).await,
            };
            if give_up {
                let class = match &error {
                    HandlerError::Permanent(_) => "permanent",
                    HandlerError::Transient(_) => "retries_exhausted",
                };
                return self
                    .dead_letter(raw, class, error.cause(), attempt, first_failure, started)
                    .await;
            }
            let wait = self.settings.retry.backoff(attempt);
            tracing::warn!(attempt, ?wait, error = %error, "handler failed; retrying");
            metrics::handler_retry(self.settings.name, &incoming.topic);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Processed::Interrupted,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Whether a message failing since `budget_from` has spent its retry budget. While the
    /// database does not answer, it has not: the budget starts again, and the message waits.
    async fn budget_spent(&self, budget_from: &mut Instant) -> bool {
        if budget_from.elapsed() < self.settings.retry.give_up_after {
            return false;
        }
        if self.settings.health.database_answers().await {
            return true;
        }
        tracing::warn!(
            "the database does not answer: the message waits for it, and its retry budget \
             starts again"
        );
        *budget_from = Instant::now();
        false
    }

    /// Publishes the replies of a committed message (the `after_commit` failpoint counts
    /// messages, whether they committed alone or in a batch).
    async fn publish_committed(
        &self,
        outgoing: &[Outgoing],
        mode: Mode,
    ) -> Result<Processed, KafkaError> {
        crate::failpoint::hit_at(self.settings.name, "after_commit");
        if crate::failpoint::fires_at(self.settings.name, "kafka_fatal") {
            self.publisher.raise_fatal_for_test();
        }
        self.publish(outgoing, mode).await
    }

    /// Publishes a handler's replies: hands them to the producer (`Pipelined`), or waits for
    /// the broker to acknowledge them (`Careful`, and whenever the producer's queue is full).
    async fn publish(&self, outgoing: &[Outgoing], mode: Mode) -> Result<Processed, KafkaError> {
        if mode == Mode::Pipelined {
            let queued: Result<Vec<DeliveryFuture>, KafkaError> =
                outgoing.iter().map(|m| self.publisher.enqueue(m)).collect();
            match queued {
                Ok(deliveries) => return Ok(Processed::Queued(deliveries)),
                // Whatever was queued stays queued (a repeat is harmless); wait this time.
                Err(e) => tracing::debug!(error = %e, "producer queue full: waiting"),
            }
        }
        self.publisher.publish_all(outgoing).await?;
        Ok(Processed::Done)
    }

    /// Publishes the record to its dead-letter topic, retrying until the broker takes it, and
    /// counts it. `class` is one of [`metrics::ERROR_CLASSES`]; `started` is when its handling
    /// started.
    ///
    /// A dead letter is the record's key, bytes and headers plus the headers that say why. If
    /// that is too large for the producer or the dead-letter topic (a record near the source
    /// topic's size limit), it is set aside without its bytes, and then without its key and
    /// headers too, with a [`dlq_headers::PAYLOAD_OMITTED`] header saying what is missing and
    /// where the original is: at its place in its topic, and in the audit store. Retrying a dead
    /// letter the broker can never take would stop the partition for good.
    async fn dead_letter(
        &self,
        raw: &BorrowedMessage<'_>,
        class: &str,
        error: &anyhow::Error,
        attempts: u32,
        first_failure: chrono::DateTime<Utc>,
        started: Instant,
    ) -> Processed {
        let error =
            twophase_messages::excerpt(&format!("{error:#}"), MAX_ERROR_HEADER).into_owned();
        tracing::error!(class, error, "dead-lettering message");
        let why = [
            (dlq_headers::ERROR, error),
            (dlq_headers::ERROR_CLASS, class.to_owned()),
            (dlq_headers::TOPIC, raw.topic().to_owned()),
            (dlq_headers::PARTITION, raw.partition().to_string()),
            (dlq_headers::OFFSET, raw.offset().to_string()),
            (dlq_headers::WORKER, self.settings.name.to_owned()),
            (dlq_headers::ATTEMPTS, attempts.to_string()),
            (dlq_headers::FIRST_FAILURE, first_failure.to_rfc3339()),
        ];
        let topic = twophase_messages::Topics::dead_letters(raw.topic());
        let payload = raw.payload().unwrap_or_default();
        let mut form = DeadLetterForm::Whole;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut headers = OwnedHeaders::new();
            if form != DeadLetterForm::Bare {
                for h in crate::kafka::headers::of(raw) {
                    headers = crate::kafka::headers::add(headers, h);
                }
            }
            let omitted = form.note(raw, &topic);
            let extra = why
                .iter()
                .map(|(k, v)| (*k, v))
                .chain(omitted.as_ref().map(|o| (dlq_headers::PAYLOAD_OMITTED, o)));
            for (key, value) in extra {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let bytes = if form == DeadLetterForm::Whole {
                payload
            } else {
                &[]
            };
            let key = if form == DeadLetterForm::Bare {
                None
            } else {
                raw.key()
            };
            match self.publisher.send_raw(&topic, key, bytes, headers).await {
                Ok(()) => {
                    metrics::dead_letter(raw.topic(), class);
                    metrics::message_handled(
                        self.settings.name,
                        raw.topic(),
                        metrics::outcome::DEAD_LETTERED,
                        started.elapsed().as_secs_f64(),
                    );
                    return Processed::Done;
                }
                Err(e) if too_large(&e) && form != DeadLetterForm::Bare => {
                    form = form.smaller();
                    tracing::error!(error = %e, omitted = form.omits(), "dead letter too large; setting it aside without part of it");
                }
                Err(e) => {
                    let wait = self.settings.retry.backoff(attempt);
                    tracing::warn!(error = %e, ?wait, "dead letter not accepted; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Processed::Interrupted,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}
