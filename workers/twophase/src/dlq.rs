//! `twophase dlq`: look at dead letters, and re-publish chosen ones to the topic they came from.
//!
//! Dead letters are read with `assign()` by a client that joins no consumer group and commits
//! nothing, so listing or replaying never moves the offsets of a worker or of the audit
//! consumer. A read stops at the high watermarks taken when it starts, so it ends even while
//! workers keep dead-lettering.
//!
//! A replay publishes a dead letter's original key, bytes and headers (trace context included)
//! without the `dlq-*` headers, plus `twophase-replayed-*` headers that say from where, when and
//! by whom. Handlers are idempotent, so replaying the same dead letter twice applies it once, and
//! a replayed message that fails again returns to its dead-letter topic through the normal
//! consume loop. Each replay run is recorded on `<prefix>ops.replays` for the audit trail.
//!
//! A dead letter is only ever replayed to the topic whose dead-letter topic holds it: never to
//! whatever topic a header names.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Message as _, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use twophase_messages::envelope::headers;
use twophase_messages::{Envelope, Topics};
use twophase_runtime::kafka::headers::{self as record_headers, RawHeader};
use twophase_runtime::kafka::{self, consumer_config};
use twophase_runtime::telemetry;
use twophase_runtime::worker::dlq_headers;
use twophase_runtime::{outln, KafkaConfig, Outgoing, Publisher};
use uuid::Uuid;

/// The topic replay runs are recorded on, under the configured prefix.
pub use twophase_messages::topics::REPLAYS as REPLAYS_TOPIC;

/// The `ce_type` of a replay run record on [`REPLAYS_TOPIC`]. Do not change: the audit
/// consumer and stored audit rows depend on it.
pub use twophase_messages::types::OPS_REPLAY as REPLAY_RECORD_TYPE;

/// Headers a replayed message carries. Do not change: the audit trail and ops tooling read them.
pub mod replay_headers {
    /// `<dead-letter topic>/<partition>/<offset>` of the dead letter it was replayed from.
    pub const FROM: &str = "twophase-replayed-from";
    /// When it was replayed, RFC 3339.
    pub const AT: &str = "twophase-replayed-at";
    /// Who replayed it: `--actor`, or else `$USER`.
    pub const BY: &str = "twophase-replayed-by";
    /// What every one of them starts with.
    pub(crate) const PREFIX: &str = "twophase-replayed-";
}

/// What every header the consume loop adds to a dead letter starts with.
const DLQ_HEADER_PREFIX: &str = "dlq-";

/// The source of what `twophase dlq` publishes.
const SOURCE: &str = "/twophase/cli";

/// How long a read may go without receiving anything before it gives up.
const READ_STALL: Duration = Duration::from_secs(30);

const TOPIC_HELP: &str = "The topic whose dead letters to use: a saga topic's name without the \
    configured prefix (saga.replies; the prefix is added), or a dead-letter topic's full name \
    (<prefix>saga.replies.dlq)";

const TIME_HELP: &str = "RFC 3339 (2026-11-24T10:00:00Z) or a duration meaning that long ago \
    (2h, 30min, 1day)";

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List what is in a dead-letter topic, oldest first.
    ///
    /// For each dead letter: where it sits, when it was set aside, its message id, type and
    /// key, where it came from (topic/partition/offset), the error class (decode, permanent,
    /// retries_exhausted) and text, the worker and the attempts. Reading moves no consumer
    /// group's offsets.
    List(ListArgs),
    /// Re-publish chosen dead letters to the topic they came from.
    ///
    /// Each is published with its original key, bytes and headers (trace context kept), without
    /// the dlq-* headers, plus twophase-replayed-from/-at/-by (and, for a record that had no
    /// ce_id, the id the workers knew it by as its ce_id). Handlers are idempotent, so
    /// replaying twice is safe; a message that fails again goes back to the dead-letter topic.
    /// Prints one line per message re-published (or, with --dry-run, that would be), and records
    /// the run on the <prefix>ops.replays topic for the audit trail. Without --message-id,
    /// --since or --until, every dead letter in the topic is replayed.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long, help = TOPIC_HELP)]
    topic: String,
    /// Only dead letters set aside at or after TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time, long_help = format!("Only dead letters set aside at or after TIME: {TIME_HELP}."))]
    since: Option<DateTime<Utc>>,
    /// Show at most N (the oldest).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Print a JSON array, with each dead letter's headers and payload.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[arg(long, help = TOPIC_HELP)]
    topic: String,
    /// Replay the dead letter with this message id (its ce_id as `dlq list` shows it, or the
    /// UUID the workers and the audit store know it by); repeat for more. Every id given must be
    /// found, or nothing is replayed.
    #[arg(long = "message-id", value_name = "ID", value_parser = parse_message_id)]
    message_ids: Vec<String>,
    /// Only dead letters set aside at or after TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time, long_help = format!("Only dead letters set aside at or after TIME: {TIME_HELP}."))]
    since: Option<DateTime<Utc>>,
    /// Only dead letters set aside at or before TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time, long_help = format!("Only dead letters set aside at or before TIME: {TIME_HELP}."))]
    until: Option<DateTime<Utc>>,
    /// Print what would be replayed, and publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Who is replaying, for the audit trail (default: $USER).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
}

/// Runs a `twophase dlq` command; returns the exit code.
pub async fn run(kafka: &KafkaConfig, command: DlqCommand) -> anyhow::Result<u8> {
    match command {
        DlqCommand::List(args) => list(kafka, args).await,
        DlqCommand::Replay(args) => replay(kafka, args).await,
    }
}

/// Parses `--since`/`--until`: RFC 3339, or a duration meaning that long before now.
/// A `--message-id`: any text but none (CloudEvents ids are non-empty strings).
fn parse_message_id(text: &str) -> Result<String, String> {
    match text.trim() {
        "" => Err("a message id is not empty: `twophase dlq list` shows each one".to_owned()),
        id => Ok(id.to_owned()),
    }
}

pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(text, Utc::now())
}

fn parse_time_at(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = text.strip_suffix("ago").map(str::trim_end).unwrap_or(text);
    match humantime::parse_duration(ago) {
        Ok(duration) => chrono::TimeDelta::from_std(duration)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .ok_or_else(|| format!("{text:?} reaches too far into the past")),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time such as 2026-11-24T10:00:00Z nor a duration \
             such as 2h (meaning 2 hours ago)"
        )),
    }
}

/// The dead-letter topic `--topic` names: a saga topic's base name (the configured prefix is
/// added), with or without `.dlq`, or a dead-letter topic's full name.
pub fn dead_letter_topic(prefix: &str, given: &str) -> anyhow::Result<String> {
    let known: Vec<String> = Topics::new(prefix)
        .all()
        .into_iter()
        .filter(|t| t.ends_with(".dlq"))
        .collect();
    let wanted = if given.ends_with(".dlq") {
        given.to_owned()
    } else {
        Topics::dead_letters(given)
    };
    for candidate in [wanted.clone(), format!("{prefix}{wanted}")] {
        if known.contains(&candidate) {
            return Ok(candidate);
        }
    }
    let bases: Vec<String> = Topics::new("")
        .all()
        .into_iter()
        .filter_map(|t| t.strip_suffix(".dlq").map(str::to_owned))
        .collect();
    anyhow::bail!(
        "no dead-letter topic for {given:?}: name a saga topic ({}), to which the configured \
         topic prefix {prefix:?} is added, or a dead-letter topic's full name ({})",
        bases.join(", "),
        known.join(", ")
    )
}

/// One record of a dead-letter topic, as stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// When it was set aside (the record's timestamp).
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Every header, in order: the original message's, then the consume loop's `dlq-*` ones.
    /// Names are bytes: a producer may have written one that is not UTF-8.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl DeadLetter {
    fn from_record(record: &BorrowedMessage<'_>) -> DeadLetter {
        let headers = record_headers::of(record)
            .into_iter()
            .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
            .collect();
        DeadLetter {
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
            timestamp: record
                .timestamp()
                .to_millis()
                .and_then(twophase_messages::envelope::time_of_millis),
            key: record.key().map(<[u8]>::to_vec),
            payload: record.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// A header's value as text; the last one with a value wins if it occurs more than once, as
    /// in the workers and the audit store.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, v)| k == name.as_bytes() && v.is_some())
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// `<topic>/<partition>/<offset>`: where the dead letter sits.
    pub fn position(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    pub fn message_id(&self) -> Option<String> {
        self.header(headers::ID)
    }

    /// The id the workers and the audit store know the record by: its `ce_id` as
    /// [`Envelope::id_of`] reads it (a UUID however spelled, or derived with `ce_source`), or,
    /// without one, the id of where it was consumed.
    pub fn identity(&self) -> Option<Uuid> {
        match self.message_id().filter(|id| !id.is_empty()) {
            Some(ce_id) => Some(Envelope::id_of(
                &ce_id,
                self.header(headers::SOURCE).as_deref(),
            )),
            None => Some(Envelope::position_id(
                &self.original_topic()?,
                i32::try_from(self.number(dlq_headers::PARTITION)?).ok()?,
                self.number(dlq_headers::OFFSET)?,
            )),
        }
    }

    /// The id to show for this dead letter, as `--message-id` takes it: its `ce_id`, or without
    /// one its identity.
    fn id_to_show(&self) -> Option<String> {
        self.message_id()
            .filter(|id| !id.is_empty())
            .or_else(|| self.identity().map(|id| id.to_string()))
    }

    /// Whether `id` names this dead letter's record: its `ce_id` as written, or its identity.
    fn is(&self, id: &str) -> bool {
        self.message_id().as_deref() == Some(id)
            || Uuid::parse_str(id).is_ok_and(|id| self.identity() == Some(id))
    }

    pub fn original_topic(&self) -> Option<String> {
        self.header(dlq_headers::TOPIC)
    }

    fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    fn number(&self, name: &str) -> Option<i64> {
        self.header(name).and_then(|v| v.parse().ok())
    }

    /// The headers a replay carries: the original ones, without the consume loop's `dlq-*`
    /// ones and any earlier replay's, plus where, when and by whom this replay came.
    pub fn replay_headers(&self, at: DateTime<Utc>, by: &str) -> OwnedHeaders {
        // A record without a `ce_id` is known by where it was consumed, and its copy would sit
        // elsewhere: the copy carries that id as its `ce_id`, so that the workers know it by the
        // same id, and a dead letter of the copy is the same message's for the next replay.
        let given_id = match self.message_id().filter(|id| !id.is_empty()) {
            Some(_) => None,
            None => self.identity().map(|id| id.to_string()),
        };
        let mut out = OwnedHeaders::new();
        for (name, value) in &self.headers {
            if name.starts_with(DLQ_HEADER_PREFIX.as_bytes())
                || name.starts_with(replay_headers::PREFIX.as_bytes())
                || (given_id.is_some() && name == headers::ID.as_bytes())
            {
                continue;
            }
            let header = RawHeader {
                name,
                value: value.as_deref(),
            };
            out = record_headers::add(out, header);
        }
        let from = self.position();
        let at = at.to_rfc3339();
        let given_id = given_id.as_deref().map(|id| (headers::ID, id));
        for (key, value) in given_id.into_iter().chain([
            (replay_headers::FROM, from.as_str()),
            (replay_headers::AT, at.as_str()),
            (replay_headers::BY, by),
        ]) {
            out = out.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        out
    }

    fn to_json(&self) -> serde_json::Value {
        let original_headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(DLQ_HEADER_PREFIX.as_bytes()))
            .map(|(k, v)| {
                let value = v
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                (String::from_utf8_lossy(k).into_owned(), json!(value))
            })
            .collect();
        let payload = self.payload.as_deref().unwrap_or_default();
        let (text, hex) = match std::str::from_utf8(payload) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(to_hex(payload))),
        };
        json!({
            "dlq_topic": self.topic,
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "dead_lettered_at": self.timestamp.map(|t| t.to_rfc3339()),
            "message_id": self.message_id(),
            "identity": self.identity(),
            "type": self.header(headers::TYPE),
            "key": self.key_text(),
            "message_time": self.header(headers::TIME),
            "original_topic": self.original_topic(),
            "original_partition": self.number(dlq_headers::PARTITION),
            "original_offset": self.number(dlq_headers::OFFSET),
            "error_class": self.header(dlq_headers::ERROR_CLASS),
            "error": self.header(dlq_headers::ERROR),
            "worker": self.header(dlq_headers::WORKER),
            "attempts": self.number(dlq_headers::ATTEMPTS),
            "first_failure_at": self.header(dlq_headers::FIRST_FAILURE),
            "replayed_from": self.header(replay_headers::FROM),
            "headers": original_headers,
            "payload": text,
            "payload_hex": hex,
            "payload_omitted": self.header(dlq_headers::PAYLOAD_OMITTED),
        })
    }

    fn summary(&self) -> String {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        let omitted = self
            .header(dlq_headers::PAYLOAD_OMITTED)
            .map(|note| format!(" ({note})"))
            .unwrap_or_default();
        format!(
            "{}/{}  {}  id {}  type {}  key {}  from {}/{}/{}  {} after {} attempt(s) in {}: {}{}",
            self.partition,
            self.offset,
            or_dash(self.timestamp.map(|t| t.to_rfc3339())),
            or_dash(self.id_to_show()),
            or_dash(self.header(headers::TYPE)),
            or_dash(self.key_text()),
            or_dash(self.original_topic()),
            or_dash(self.header(dlq_headers::PARTITION)),
            or_dash(self.header(dlq_headers::OFFSET)),
            or_dash(self.header(dlq_headers::ERROR_CLASS)),
            or_dash(self.header(dlq_headers::ATTEMPTS)),
            or_dash(self.header(dlq_headers::WORKER)),
            or_dash(self.header(dlq_headers::ERROR)),
            omitted,
        )
    }
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Reads `topic` from the beginning up to the high watermarks it has when the read starts, and
/// returns its records (those set aside at or after `since`, if given), oldest first.
pub async fn read(
    kafka: &KafkaConfig,
    topic: &str,
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let kafka = kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_blocking(&kafka, &topic, since)).await?
}

fn read_blocking(
    kafka: &KafkaConfig,
    topic: &str,
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = consumer_config(kafka)
        // A group id only because librdkafka routes fetched records through the group queue:
        // the client only assign()s, so it never joins this group and commits nothing to it.
        .set(
            "group.id",
            format!("twophase-dlq-reader-{}", Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating a Kafka client")?;
    // Right after a topic is created its partitions may have no leader yet: look again
    // briefly before calling it missing.
    let patience = Instant::now() + Duration::from_secs(5);
    let Extent {
        partitions,
        mut start,
        end,
    } = loop {
        match extent(&consumer, kafka, topic, timeout) {
            Ok(found) => break found,
            Err(e) if Instant::now() < patience => {
                tracing::debug!(error = %e, topic, "topic not readable yet; looking again");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e),
        }
    };
    if let Some(since) = since {
        let mut wanted = TopicPartitionList::new();
        for &p in &partitions {
            wanted.add_partition_offset(topic, p, Offset::Offset(since.timestamp_millis()))?;
        }
        let found = consumer
            .offsets_for_times(wanted, timeout)
            .with_context(|| format!("finding the offsets of {topic} at {since}"))?;
        for e in found.elements() {
            // "No record that recent" (`End`) is not taken on trust: librdkafka's mock cluster,
            // which `twophase dev` runs on, answers it for every timestamp. Such a partition is
            // read from its start, and records are filtered by their timestamp anyway.
            if let Offset::Offset(at) = e.offset() {
                let p = e.partition();
                start.insert(p, at.max(start[&p]));
            }
        }
    }

    let mut assignment = TopicPartitionList::new();
    let mut remaining = BTreeMap::new();
    for &p in &partitions {
        if start[&p] < end[&p] {
            assignment.add_partition_offset(topic, p, Offset::Offset(start[&p]))?;
            remaining.insert(p, end[&p]);
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&assignment)?;
    let mut last_progress = Instant::now();
    while !remaining.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(record)) => {
                last_progress = Instant::now();
                let p = record.partition();
                if let Some(&high) = remaining.get(&p) {
                    if record.offset() < high {
                        let letter = DeadLetter::from_record(&record);
                        if since.is_none_or(|s| letter.timestamp.is_some_and(|t| t >= s)) {
                            out.push(letter);
                        }
                    }
                    if record.offset() + 1 >= high {
                        remaining.remove(&p);
                    }
                }
            }
            // The client retries by itself; the stall check below bounds how long.
            Some(Err(e)) => tracing::debug!(error = %e, topic, "reading dead letters"),
            None => {}
        }
        // Offsets a record does not occupy (transaction markers) are only visible here.
        if let Ok(positions) = consumer.position() {
            for e in positions.elements() {
                if let Offset::Offset(at) = e.offset() {
                    if remaining
                        .get(&e.partition())
                        .is_some_and(|high| at >= *high)
                    {
                        remaining.remove(&e.partition());
                    }
                }
            }
        }
        anyhow::ensure!(
            last_progress.elapsed() < READ_STALL,
            "reading {topic} stalled: nothing received for {}s, partitions {:?} not read to their end",
            READ_STALL.as_secs(),
            remaining.keys().collect::<Vec<_>>()
        );
    }
    out.sort_by_key(|d| (d.timestamp, d.partition, d.offset));
    Ok(out)
}

/// A topic's partitions, and the offset each starts and ends at now.
struct Extent {
    partitions: Vec<i32>,
    start: BTreeMap<i32, i64>,
    end: BTreeMap<i32, i64>,
}

fn extent(
    consumer: &BaseConsumer,
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Extent> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading the metadata of {topic} from {}", kafka.brokers))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic {topic} does not exist on {}: `twophase topics create` creates it",
        kafka.brokers
    );
    let mut start = BTreeMap::new();
    let mut end = BTreeMap::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .with_context(|| format!("reading the offsets of {topic} partition {p}"))?;
        start.insert(p, low);
        end.insert(p, high);
    }
    Ok(Extent {
        partitions,
        start,
        end,
    })
}

async fn list(kafka: &KafkaConfig, args: ListArgs) -> anyhow::Result<u8> {
    let topic = dead_letter_topic(&kafka.topic_prefix, &args.topic)?;
    let mut letters = read(kafka, &topic, args.since).await?;
    letters.retain(|d| in_window(d, args.since, None));
    if let Some(limit) = args.limit {
        letters.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    if args.json {
        let all: Vec<serde_json::Value> = letters.iter().map(DeadLetter::to_json).collect();
        outln!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for d in &letters {
            outln!("{}", d.summary());
        }
        eprintln!("{} dead letter(s) listed from {topic}", letters.len());
    }
    Ok(0)
}

fn in_window(d: &DeadLetter, since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>) -> bool {
    // A record without a timestamp cannot be placed in time: only an open window takes it.
    match d.timestamp {
        Some(t) => since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u),
        None => since.is_none() && until.is_none(),
    }
}

async fn replay(kafka: &KafkaConfig, args: ReplayArgs) -> anyhow::Result<u8> {
    let topic = dead_letter_topic(&kafka.topic_prefix, &args.topic)?;
    let origin = topic
        .strip_suffix(".dlq")
        .expect("dead-letter topic names end in .dlq")
        .to_owned();
    if let (Some(since), Some(until)) = (args.since, args.until) {
        anyhow::ensure!(
            since <= until,
            "--since {} is later than --until {}: no dead letter can match",
            since.to_rfc3339(),
            until.to_rfc3339()
        );
    }
    let actor = args
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty());
    // A dry run publishes nothing, so it need not say who runs it.
    anyhow::ensure!(
        actor.is_some() || args.dry_run,
        "cannot tell who is replaying: pass --actor NAME (or set $USER); the audit trail \
         records who replayed what"
    );

    let letters = read(kafka, &topic, args.since).await?;
    let ids: HashSet<&str> = args.message_ids.iter().map(String::as_str).collect();
    let matching: Vec<&DeadLetter> = letters
        .iter()
        .filter(|d| in_window(d, args.since, args.until))
        .filter(|d| ids.is_empty() || ids.iter().any(|id| d.is(id)))
        .collect();
    let mut missing: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !matching.iter().any(|d| d.is(id)))
        .collect();
    missing.sort();
    if !missing.is_empty() {
        anyhow::bail!(
            "no dead letter with message id {} in {topic}{}; nothing was replayed \
             (`twophase dlq list --topic {topic}` shows what is there)",
            missing.join(", "),
            if args.since.is_some() || args.until.is_some() {
                " within --since/--until"
            } else {
                ""
            }
        );
    }
    // A message set aside more than once (it failed again after a replay) is replayed once,
    // from its latest dead letter. Two messages a producer sent under one id are two: their
    // keys or bytes differ.
    let mut seen = HashSet::new();
    let mut chosen: Vec<&DeadLetter> = Vec::new();
    for d in matching.iter().rev() {
        match d.identity() {
            Some(id) if !seen.insert((id, &d.key, &d.payload)) => {
                eprintln!(
                    "skipping {}: message {} is replayed from its later dead letter",
                    d.position(),
                    d.message_id().unwrap_or_else(|| id.to_string())
                );
            }
            _ => chosen.push(d),
        }
    }
    chosen.reverse();
    for d in &chosen {
        if let Some(note) = d.header(dlq_headers::PAYLOAD_OMITTED) {
            anyhow::bail!(
                "dead letter {} cannot be replayed, since it was {note}; nothing was replayed",
                d.position()
            );
        }
        match d.original_topic() {
            Some(t) if t == origin => {}
            Some(t) => anyhow::bail!(
                "dead letter {} says it came from {t}, but it sits in the dead-letter topic of \
                 {origin}; nothing was replayed",
                d.position()
            ),
            None => anyhow::bail!(
                "dead letter {} has no {} header, so where it came from is unknown; nothing was \
                 replayed",
                d.position(),
                dlq_headers::TOPIC
            ),
        }
    }
    if chosen.is_empty() {
        eprintln!("no dead letter in {topic} matches; nothing to replay");
        return Ok(0);
    }

    let line = |d: &DeadLetter| {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        format!(
            "{} -> {origin}  id {}  type {}  key {}",
            d.position(),
            or_dash(d.id_to_show()),
            or_dash(d.header(headers::TYPE)),
            or_dash(d.key_text()),
        )
    };
    if args.dry_run {
        for d in &chosen {
            outln!("would replay {}", line(d));
        }
        eprintln!(
            "dry run: {} dead letter(s) would be replayed; nothing was published",
            chosen.len()
        );
        return Ok(0);
    }

    let actor = actor.expect("a replay that publishes has an actor, checked above");
    let publisher = Publisher::new(kafka).context("creating a Kafka producer")?;
    let at = Utc::now();
    let mut replayed: Vec<&DeadLetter> = Vec::new();
    let mut failure = None;
    // One at a time, oldest first, so messages of one key keep their order.
    for d in &chosen {
        let payload = d.payload.as_deref().unwrap_or_default();
        match publisher
            .send_raw(
                &origin,
                d.key.as_deref(),
                payload,
                d.replay_headers(at, &actor),
            )
            .await
        {
            Ok(()) => {
                outln!("replayed {}", line(d));
                replayed.push(d);
            }
            Err(e) => {
                failure = Some(anyhow::Error::new(e).context(format!(
                    "re-publishing {} to {origin} ({} of {} replayed before it)",
                    d.position(),
                    replayed.len(),
                    chosen.len()
                )));
                break;
            }
        }
    }
    // Recorded even when the run stopped part way: what was re-published must be on record.
    let recorded = record_run(kafka, &publisher, &actor, at, &topic, &origin, &replayed)
        .await
        .context("recording the replay run for the audit trail");
    if let Some(failure) = failure {
        if let Err(e) = recorded {
            eprintln!("error: {}", twophase_runtime::output::error_text(&e));
        }
        return Err(failure);
    }
    recorded?;
    eprintln!(
        "{} dead letter(s) replayed to {origin} by {actor}",
        replayed.len()
    );
    Ok(0)
}

/// Publishes one record of a replay run on `<prefix>ops.replays`.
async fn record_run(
    kafka: &KafkaConfig,
    publisher: &Publisher,
    actor: &str,
    at: DateTime<Utc>,
    dlq_topic: &str,
    origin: &str,
    replayed: &[&DeadLetter],
) -> anyhow::Result<()> {
    let topic = format!("{}{REPLAYS_TOPIC}", kafka.topic_prefix);
    kafka::ensure_topics(kafka, std::slice::from_ref(&topic))
        .await
        .with_context(|| format!("creating {topic}"))?;
    let run_id = Uuid::new_v4();
    let record = json!({
        "run_id": run_id,
        "who": actor,
        "when": at.to_rfc3339(),
        "dlq_topic": dlq_topic,
        "original_topic": origin,
        "message_ids": replayed.iter().map(|d| d.message_id()).collect::<Vec<_>>(),
        "replayed_from": replayed.iter().map(|d| d.position()).collect::<Vec<_>>(),
        "count": replayed.len(),
        "dry_run": false,
    });
    let mut envelope = Envelope::new(REPLAY_RECORD_TYPE, SOURCE, run_id.to_string());
    envelope.time = at;
    telemetry::set_trace(&mut envelope, None);
    let outgoing = Outgoing {
        topic,
        key: dlq_topic.to_owned(),
        envelope,
        payload: serde_json::to_vec(&record)?,
    };
    publisher.publish(&outgoing).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use rdkafka::message::Headers as _;

    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
        let at = |s: &str| parse_time_at(s, now);
        assert_eq!(
            at("2026-11-24T10:00:00Z").unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap()
        );
        assert_eq!(
            at("2026-11-24T11:00:00+01:00").unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap()
        );
        assert_eq!(
            at("2h").unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap()
        );
        assert_eq!(
            at("90min ago").unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 24, 10, 30, 0).unwrap()
        );
        let err = at("yesterday").unwrap_err();
        assert!(err.contains("neither an RFC 3339 time"), "{err}");
        assert!(at("5").is_err());
    }

    #[test]
    fn topics_are_named_by_base_or_full_name() {
        let p = "acme.";
        for given in [
            "saga.replies",
            "saga.replies.dlq",
            "acme.saga.replies",
            "acme.saga.replies.dlq",
        ] {
            assert_eq!(
                dead_letter_topic(p, given).unwrap(),
                "acme.saga.replies.dlq",
                "{given}"
            );
        }
        assert_eq!(
            dead_letter_topic("", "transfers.requests").unwrap(),
            "transfers.requests.dlq"
        );
        let err = dead_letter_topic(p, "saga.replys").unwrap_err().to_string();
        assert!(
            err.contains("no dead-letter topic for \"saga.replys\""),
            "{err}"
        );
        assert!(err.contains("saga.replies"), "{err}");
        // Outcomes are consumed by no worker, so they have no dead-letter topic.
        assert!(dead_letter_topic(p, "reconciliation.reports").is_err());
    }

    fn letter(headers: &[(&str, &str)]) -> DeadLetter {
        DeadLetter {
            topic: "p.saga.replies.dlq".into(),
            partition: 2,
            offset: 7,
            timestamp: None,
            key: Some(b"k".to_vec()),
            payload: Some(b"{}".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn a_replay_keeps_the_original_headers_and_says_where_it_came_from() {
        let d = letter(&[
            ("ce_id", "id-1"),
            ("traceparent", "00-abc-def-01"),
            (replay_headers::FROM, "older/0/1"),
            (dlq_headers::ERROR_CLASS, "permanent"),
            (dlq_headers::TOPIC, "p.saga.replies"),
        ]);
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap();
        let h = d.replay_headers(at, "ops-1");
        let got: Vec<(String, String)> = h
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap()).into_owned(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("ce_id", "id-1"),
            ("traceparent", "00-abc-def-01"),
            (replay_headers::FROM, "p.saga.replies.dlq/2/7"),
            (replay_headers::AT, "2026-11-24T10:00:00+00:00"),
            (replay_headers::BY, "ops-1"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_replay_keeps_a_header_name_that_is_not_utf8_as_it_was() {
        let mut d = letter(&[(dlq_headers::TOPIC, "p.saga.replies")]);
        d.headers
            .insert(0, (b"x-\xff\xfe".to_vec(), Some(b"\xff".to_vec())));
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap();
        let replay = rdkafka::message::OwnedMessage::new(
            None,
            None,
            "t".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            Some(d.replay_headers(at, "ops-1")),
        );
        let first = record_headers::of(&replay)[0];
        assert_eq!(first.name, b"x-\xff\xfe");
        assert_eq!(first.value, Some(&b"\xff"[..]));
        assert_eq!(
            d.to_json()["headers"],
            json!({ "x-\u{fffd}\u{fffd}": "\u{fffd}" })
        );
    }

    #[test]
    fn the_last_header_of_a_name_with_a_value_wins() {
        let mut d = letter(&[(dlq_headers::ATTEMPTS, "1"), (dlq_headers::ATTEMPTS, "3")]);
        assert_eq!(d.number(dlq_headers::ATTEMPTS), Some(3));
        d.headers
            .push((dlq_headers::ATTEMPTS.as_bytes().to_vec(), None));
        assert_eq!(d.number(dlq_headers::ATTEMPTS), Some(3));
    }
}
