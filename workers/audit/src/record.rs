//! What one Kafka record becomes in the audit log: which message it is, what happened to which
//! entity, who did it, how severe it is, in which trace. No I/O here, so that every rule is
//! tested on its own.
//!
//! Nothing is decoded strictly: a record the workers would refuse (bad JSON, an unknown type, a
//! missing header) is still audited, with what could be read from it and severity `error`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use twophase_messages::envelope::{headers as ce, parse_time, time_of_millis};
use twophase_messages::{named, types, AccountAction, Envelope, Topics};
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::Timestamp;
use twophase_runtime::kafka::headers::{self as record_headers, RawHeader};
use twophase_runtime::telemetry;
use twophase_runtime::worker::dlq_headers;
use uuid::Uuid;

pub use twophase_messages::topics::REPLAYS as REPLAYS_TOPIC;
pub use twophase_messages::types::OPS_REPLAY as REPLAY_RECORD_TYPE;
/// The event type of a row for a record on a dead-letter topic. Do not change: stored rows and
/// queries use it.
pub const DEAD_LETTER_TYPE: &str = "twophase.dead_letter";
/// The event type of a reconciliation report that came without a `ce_type`.
pub const RECONCILIATION_REPORT_TYPE: &str = "twophase.reconciliation.report";
/// The event type of a record whose type cannot be told.
pub const UNKNOWN_TYPE: &str = "unknown";

/// Headers a producer may set to say where a request came from.
pub mod client_headers {
    pub const IP: &str = "client-ip";
    pub const USER_AGENT: &str = "user-agent";
}

/// Headers `twophase dlq replay` puts on a replayed message (`twophase::dlq::replay_headers`).
mod replay_headers {
    pub const FROM: &str = "twophase-replayed-from";
    pub const AT: &str = "twophase-replayed-at";
}

/// The values of `entity_type`.
pub mod entity {
    pub const TRANSFER: &str = "transfer";
    pub const ACCOUNT: &str = "account";
    pub const RECONCILIATION: &str = "reconciliation";
    pub const REPLAY: &str = "replay";
    pub const ALL: [&str; 4] = [TRANSFER, ACCOUNT, RECONCILIATION, REPLAY];
}

/// The values of `actor_type`.
pub mod actor {
    /// A twophase worker (`ce_source` `/twophase/<worker>`).
    pub const WORKER: &str = "worker";
    /// A person through the `twophase` command line.
    pub const OPERATOR: &str = "operator";
    /// Anyone else: the payment front ends that request transfers.
    pub const PRODUCER: &str = "producer";
}

/// How bad an audited event is. Do not change the words: they are stored and filtered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The normal flow of a transfer.
    Info,
    /// A transfer failing or being rolled back: `transfer.failed`, a no vote, the release and
    /// cancel_credit commands and their acks.
    Warning,
    /// A refused request (`transfer.rejected`), a dead letter, a record that cannot be read.
    Error,
    /// A commit that does not complete (`commit_stuck`), a reconciliation that found
    /// discrepancies.
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A Kafka record as the consumer got it.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<RawHeader<'a>>,
    /// The record's Kafka timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Source<'a> {
    pub fn of<M>(message: &'a M) -> Source<'a>
    where
        M: rdkafka::Message + record_headers::Record,
    {
        let headers = record_headers::of(message);
        Source {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    /// A header's value, if it is text, with the spaces around it trimmed. The last value
    /// wins if the header occurs more than once, as in the workers and `twophase dlq`.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.exact_header(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// A header's value as sent, if it is text: what the workers read a message's ids from.
    fn exact_header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.name == name.as_bytes() && h.value.is_some())
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The id a record without a usable `ce_id` gets. Do not change: it is the id the workers
    /// give such a record (`twophase_runtime::worker`), and stored rows are unique on it.
    fn position_id(&self) -> Uuid {
        Envelope::position_id(self.topic, self.partition, self.offset)
    }

    fn kafka_time(&self) -> Option<DateTime<Utc>> {
        self.timestamp_ms.and_then(time_of_millis)
    }
}

/// What a record becomes: every column of its audit row that the record decides (the chain
/// columns are added when it is appended).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub topic: String,
    #[serde(rename = "partition")]
    pub kafka_partition: i32,
    #[serde(rename = "offset")]
    pub kafka_offset: i64,
    pub message_id: Uuid,
    pub message_key: Option<String>,
    pub event_type: String,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub transfer_id: Option<String>,
    pub action: Option<String>,
    pub actor_id: Option<String>,
    pub actor_type: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    pub severity: String,
    pub payload_encoding: String,
    pub payload: Json<Value>,
    pub headers: Json<Value>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub occurred_at: Timestamp,
    #[serde(skip)]
    pub occurred_at_us: i64,
}

/// A time as RFC 3339 with milliseconds, as it is stored.
pub fn format_time(t: &Timestamp) -> String {
    t.0.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub(crate) fn rfc3339<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// Which of the audited topics a record is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicKind {
    /// `transfers.requests`, the commands, `saga.replies`, `transfers.events`.
    Saga,
    DeadLetter,
    Reports,
    Replays,
    /// Anything else (never subscribed; kept for completeness).
    Other,
}

fn kind_of(topic: &str, topics: &Topics, prefix: &str) -> TopicKind {
    let saga = [
        topics.requests(),
        topics.risk_commands(),
        topics.account_commands(),
        topics.replies(),
        topics.events(),
    ];
    if saga.iter().any(|t| t == topic) {
        TopicKind::Saga
    } else if topic.ends_with(".dlq") && topic.starts_with(prefix) {
        TopicKind::DeadLetter
    } else if topic == topics.reconciliation_reports() {
        TopicKind::Reports
    } else if topic == format!("{prefix}{REPLAYS_TOPIC}") {
        TopicKind::Replays
    } else {
        TopicKind::Other
    }
}

/// The payload as stored: its JSON, or its bytes in base64 when they are not JSON.
fn payload_of(bytes: Option<&[u8]>) -> (&'static str, Value) {
    match bytes {
        None | Some([]) => ("none", Value::Null),
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            // PostgreSQL's jsonb cannot hold a NUL character; such JSON is kept as bytes.
            Ok(value) if !has_nul(&value) => ("json", value),
            _ => ("base64", Value::String(BASE64.encode(bytes))),
        },
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Text as stored ([`twophase_runtime::db::stored_text`]).
pub(crate) fn text(s: &str) -> String {
    twophase_runtime::db::stored_text(s).into_owned()
}

/// Bytes as text a text column takes: UTF-8 without NUL (which PostgreSQL refuses).
fn storable_text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.contains('\0'))
}

/// Bytes as stored in a text column: the text itself, or `base64:` and the bytes.
fn bytes_text(bytes: &[u8]) -> String {
    match storable_text(bytes) {
        Some(s) => s.to_owned(),
        None => format!("base64:{}", BASE64.encode(bytes)),
    }
}

/// Every header in order as `[name, value]`: each as text, or `{"base64": …}` when it is not
/// text; a value may also be null.
fn headers_of(source: &Source<'_>) -> Value {
    let bytes = |bytes: &[u8]| match storable_text(bytes) {
        Some(s) => Value::String(s.to_owned()),
        None => json!({ "base64": BASE64.encode(bytes) }),
    };
    Value::Array(
        source
            .headers
            .iter()
            .map(|h| json!([bytes(h.name), h.value.map_or(Value::Null, bytes)]))
            .collect(),
    )
}

/// A transfer id as stored: the canonical form of a UUID (so `ABC…` and `abc…` are one
/// transfer), or the producer's text as the coordinator's rejection names it when it is not
/// one ([`indexed`]).
pub fn normalize_transfer_id(id: &str) -> String {
    match Uuid::parse_str(id.trim()) {
        Ok(uuid) => uuid.to_string(),
        Err(_) => indexed(id),
    }
}

/// A producer's identifier (a type, an id) as an indexed column stores it: as the system names
/// it ([`twophase_messages::named`]: PostgreSQL refuses an index entry over about 2.7 KB, and
/// the whole value stays in the headers and payload), then as text a column takes. Named first,
/// so that a value named by a worker (a rejection's transfer id) is stored as the value it
/// names.
pub(crate) fn indexed(s: &str) -> String {
    text(&named(s))
}

fn field<'v>(payload: &'v Value, name: &str) -> Option<&'v str> {
    payload.get(name).and_then(Value::as_str)
}

/// What the type and payload of a saga message say: entity, action, severity.
struct Meaning {
    entity_type: Option<&'static str>,
    entity_id: Option<String>,
    action: Option<String>,
    severity: Severity,
}

fn saga_meaning(
    event_type: &str,
    payload: &Value,
    readable: bool,
    transfer: Option<&str>,
) -> Meaning {
    let on_transfer = |action: &str, severity: Severity| Meaning {
        entity_type: transfer.map(|_| entity::TRANSFER),
        entity_id: transfer.map(str::to_owned),
        action: Some(action.to_owned()),
        severity,
    };
    if !readable {
        return on_transfer("undecodable", Severity::Error);
    }
    match event_type {
        types::TRANSFER_REQUESTED => on_transfer("request", Severity::Info),
        types::RISK_EVALUATE => on_transfer("evaluate", Severity::Info),
        types::VOTE => {
            let decision = field(payload, "decision").unwrap_or("unknown");
            let severity = if decision == "yes" {
                Severity::Info
            } else {
                Severity::Warning
            };
            on_transfer(&format!("vote_{decision}"), severity)
        }
        types::ACK => {
            let action = field(payload, "action").unwrap_or("unknown");
            on_transfer(&format!("ack_{action}"), rollback_severity(action))
        }
        types::TRANSFER_COMPLETED => on_transfer("complete", Severity::Info),
        types::TRANSFER_FAILED => on_transfer("fail", Severity::Warning),
        types::TRANSFER_REJECTED => on_transfer("reject", Severity::Error),
        types::COMMIT_STUCK => on_transfer("commit_stuck", Severity::Critical),
        other => match AccountAction::from_message_type(other) {
            Some(action) => Meaning {
                entity_type: Some(entity::ACCOUNT),
                entity_id: field(payload, "account_id").map(normalize_transfer_id),
                action: Some(action.as_str().to_owned()),
                severity: rollback_severity(action.as_str()),
            },
            // A type no worker knows: the workers dead-letter it.
            None => on_transfer("unknown", Severity::Error),
        },
    }
}

/// `warning` for the abort side of the protocol (release, cancel_credit), `info` otherwise.
fn rollback_severity(action: &str) -> Severity {
    let release = AccountAction::Release.as_str();
    let cancel = AccountAction::CancelCredit.as_str();
    if action == release || action == cancel {
        Severity::Warning
    } else {
        Severity::Info
    }
}

/// Whether a reconciliation report says it found discrepancies: status
/// `completed_with_errors`, a non-empty `discrepancies` list, or a positive count in
/// `discrepancy_counts` (or `discrepancy_count`, `total_discrepancies`).
fn has_discrepancies(report: &Value) -> bool {
    let positive = |v: &Value| match v {
        Value::Array(items) => !items.is_empty(),
        Value::Number(n) => n.as_f64().is_some_and(|n| n > 0.0),
        Value::Object(map) => map.values().any(|v| v.as_f64().is_some_and(|n| n > 0.0)),
        _ => false,
    };
    field(report, "status") == Some("completed_with_errors")
        || [
            "discrepancies",
            "discrepancy_counts",
            "discrepancy_count",
            "total_discrepancies",
        ]
        .iter()
        .any(|k| report.get(k).is_some_and(positive))
}

/// Who did it: the worker that dead-lettered a record, the operator of a replay, or the
/// `ce_source` of the message.
fn actor_of(
    source: &Source<'_>,
    kind: TopicKind,
    payload: &Value,
) -> (Option<String>, Option<String>) {
    if kind == TopicKind::DeadLetter {
        if let Some(worker) = source.header(dlq_headers::WORKER) {
            return (
                Some(text(&format!("/twophase/{worker}"))),
                Some(actor::WORKER.into()),
            );
        }
    }
    if kind == TopicKind::Replays {
        if let Some(who) = field(payload, "who") {
            return (Some(text(who)), Some(actor::OPERATOR.into()));
        }
    }
    match source.header(ce::SOURCE) {
        Some("/twophase/cli") => (Some("/twophase/cli".into()), Some(actor::OPERATOR.into())),
        Some(s) if s.starts_with("/twophase/") => (Some(text(s)), Some(actor::WORKER.into())),
        Some(s) => (Some(text(s)), Some(actor::PRODUCER.into())),
        None => (None, Some(actor::PRODUCER.into())),
    }
}

/// The message id a row is unique on. Do not change any derivation: stored rows are unique on
/// it, and a record redelivered after a restart must get the same id to be recognised.
fn message_id_of(source: &Source<'_>, kind: TopicKind) -> Uuid {
    // As the workers read it, spaces and all (a `ce_id` that is not a UUID stands for one
    // derived from it and `ce_source`).
    let ce_id = || {
        source
            .exact_header(ce::ID)
            .filter(|v| !v.is_empty())
            .map(|v| Envelope::id_of(v, source.exact_header(ce::SOURCE)))
    };
    if kind == TopicKind::DeadLetter {
        // A dead letter keeps the original's headers, ce_id included; it is a message of its
        // own: the setting aside of the record at its original position.
        return match (
            source.header(dlq_headers::TOPIC),
            source.header(dlq_headers::PARTITION),
            source.header(dlq_headers::OFFSET),
        ) {
            (Some(t), Some(p), Some(o)) => {
                let seed = format!("dead-letter/{t}/{p}/{o}");
                Uuid::new_v5(&Uuid::NAMESPACE_OID, seed.as_bytes())
            }
            _ => source.position_id(),
        };
    }
    if let Some(from) = source.header(replay_headers::FROM) {
        // A replayed message keeps the original's ce_id; each replay of it is a message of its
        // own.
        let at = source.header(replay_headers::AT).unwrap_or_default();
        let original = ce_id().unwrap_or_else(|| source.position_id());
        let seed = format!("replayed/{from}/{at}/{original}");
        return Uuid::new_v5(&Uuid::NAMESPACE_OID, seed.as_bytes());
    }
    ce_id().unwrap_or_else(|| source.position_id())
}

/// What a record becomes in the audit log. `topics` carries the configured prefix; `now` is
/// the time of a record that says nothing of its own.
pub fn entry(source: &Source<'_>, topics: &Topics, prefix: &str, now: DateTime<Utc>) -> Entry {
    let kind = kind_of(source.topic, topics, prefix);
    let (encoding, payload) = payload_of(source.payload);
    let correlation_id = source.header(ce::CORRELATION_ID).map(text);
    let declared_type = source.header(ce::TYPE).map(indexed);
    let correlation_as_id = || source.header(ce::CORRELATION_ID).map(indexed);
    // A request from a producer that sets no headers is a TransferRequested, as the
    // coordinator reads it.
    let event_type = declared_type.clone().unwrap_or_else(|| {
        if source.topic == topics.requests() {
            types::TRANSFER_REQUESTED.to_owned()
        } else {
            UNKNOWN_TYPE.to_owned()
        }
    });
    let readable = encoding == "json" && payload.is_object();

    let saga_transfer = || {
        field(&payload, "transfer_id")
            .or(correlation_id.as_deref())
            .map(normalize_transfer_id)
    };
    let (event_type, transfer_id, meaning) = match kind {
        TopicKind::Saga | TopicKind::Other => {
            let transfer = saga_transfer();
            let meaning = saga_meaning(&event_type, &payload, readable, transfer.as_deref());
            (event_type, transfer, meaning)
        }
        TopicKind::DeadLetter => {
            let transfer = saga_transfer();
            let inner = saga_meaning(&event_type, &payload, readable, transfer.as_deref());
            let meaning = Meaning {
                action: Some("dead_letter".into()),
                severity: Severity::Error,
                ..inner
            };
            (DEAD_LETTER_TYPE.to_owned(), transfer, meaning)
        }
        TopicKind::Reports => {
            let id = ["report_id", "run_id", "id"]
                .iter()
                .find_map(|k| field(&payload, k))
                .map(indexed)
                .or_else(correlation_as_id);
            // A run that could not finish is no verdict, but ops must know it failed.
            let severity = if !readable {
                Severity::Error
            } else if has_discrepancies(&payload) {
                Severity::Critical
            } else if field(&payload, "status") == Some("failed") {
                Severity::Error
            } else {
                Severity::Info
            };
            let meaning = Meaning {
                entity_type: id.as_ref().map(|_| entity::RECONCILIATION),
                entity_id: id,
                action: Some("reconcile".into()),
                severity,
            };
            let event_type = declared_type.unwrap_or_else(|| RECONCILIATION_REPORT_TYPE.into());
            (event_type, None, meaning)
        }
        TopicKind::Replays => {
            let id = field(&payload, "run_id")
                .map(indexed)
                .or_else(correlation_as_id);
            let meaning = Meaning {
                entity_type: id.as_ref().map(|_| entity::REPLAY),
                entity_id: id,
                action: Some("replay".into()),
                severity: if readable {
                    Severity::Info
                } else {
                    Severity::Error
                },
            };
            let event_type = declared_type.unwrap_or_else(|| REPLAY_RECORD_TYPE.into());
            (event_type, None, meaning)
        }
    };

    let (actor_id, actor_type) = actor_of(source, kind, &payload);
    let (trace_id, span_id) = source
        .header(ce::TRACEPARENT)
        .and_then(telemetry::parse_traceparent)
        .unzip();
    // A dead letter happened when it was set aside, and a replayed message when it was
    // replayed (each its own Kafka time), not when the message it carries was first produced:
    // in a transfer's timeline the replay comes after the dead letter it puts back.
    let ce_time = || source.header(ce::TIME).and_then(parse_time);
    let replayed = source.header(replay_headers::FROM).is_some();
    let occurred = match kind {
        TopicKind::DeadLetter => source.kafka_time().or_else(ce_time),
        _ if replayed => source.kafka_time().or_else(ce_time),
        _ => ce_time().or_else(|| source.kafka_time()),
    }
    .unwrap_or(now);

    Entry {
        topic: text(source.topic),
        kafka_partition: source.partition,
        kafka_offset: source.offset,
        message_id: message_id_of(source, kind),
        message_key: source.key.map(bytes_text),
        event_type,
        entity_type: meaning.entity_type.map(str::to_owned),
        entity_id: meaning.entity_id,
        transfer_id,
        action: meaning.action,
        actor_id,
        actor_type,
        correlation_id,
        causation_id: source.header(ce::CAUSATION_ID).map(text),
        trace_id,
        span_id,
        severity: meaning.severity.as_str().to_owned(),
        payload_encoding: encoding.to_owned(),
        payload: Json(payload),
        headers: Json(headers_of(source)),
        ip_address: source.header(client_headers::IP).map(text),
        user_agent: source.header(client_headers::USER_AGENT).map(text),
        occurred_at: Timestamp::from(occurred),
        occurred_at_us: occurred.timestamp_micros(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "t.";
    const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn topics() -> Topics {
        Topics::new(PREFIX)
    }

    struct Record {
        topic: String,
        headers: Vec<(&'static str, String)>,
        payload: Option<Vec<u8>>,
    }

    impl Record {
        fn new(topic: String, ce_type: &str, payload: Value) -> Record {
            Record {
                topic,
                headers: vec![
                    (ce::ID, Uuid::new_v4().to_string()),
                    (ce::TYPE, ce_type.to_owned()),
                    (ce::SOURCE, "/twophase/coordinator".to_owned()),
                    (ce::TIME, "2026-11-24T10:00:00.123456Z".to_owned()),
                    (ce::TRACEPARENT, TRACE.to_owned()),
                ],
                payload: Some(serde_json::to_vec(&payload).unwrap()),
            }
        }

        fn entry(&self) -> Entry {
            let source = Source {
                topic: &self.topic,
                partition: 2,
                offset: 7,
                key: Some(b"k"),
                payload: self.payload.as_deref(),
                headers: self
                    .headers
                    .iter()
                    .map(|(k, v)| RawHeader {
                        name: k.as_bytes(),
                        value: Some(v.as_bytes()),
                    })
                    .collect(),
                timestamp_ms: Some(1_790_000_000_000),
            };
            entry(&source, &topics(), PREFIX, Utc::now())
        }
    }

    fn severity_of(topic: String, ce_type: &str, payload: Value) -> String {
        Record::new(topic, ce_type, payload).entry().severity
    }

    #[test]
    fn severities_follow_the_protocol() {
        let t = topics();
        let id = Uuid::new_v4();
        let body = json!({"transfer_id": id, "account_id": Uuid::new_v4(), "amount": "1", "currency": "USD"});
        let cases = [
            (
                t.requests(),
                types::TRANSFER_REQUESTED,
                json!({"transfer_id": "x"}),
                "info",
            ),
            (
                t.risk_commands(),
                types::RISK_EVALUATE,
                body.clone(),
                "info",
            ),
            (
                t.account_commands(),
                types::ACCOUNT_HOLD,
                body.clone(),
                "info",
            ),
            (
                t.account_commands(),
                types::ACCOUNT_CAPTURE,
                body.clone(),
                "info",
            ),
            (
                t.account_commands(),
                types::ACCOUNT_RELEASE,
                body.clone(),
                "warning",
            ),
            (
                t.account_commands(),
                types::ACCOUNT_CANCEL_CREDIT,
                body.clone(),
                "warning",
            ),
            (
                t.replies(),
                types::VOTE,
                json!({"transfer_id": id, "decision": "yes"}),
                "info",
            ),
            (
                t.replies(),
                types::VOTE,
                json!({"transfer_id": id, "decision": "no"}),
                "warning",
            ),
            (
                t.replies(),
                types::ACK,
                json!({"transfer_id": id, "action": "credit"}),
                "info",
            ),
            (
                t.replies(),
                types::ACK,
                json!({"transfer_id": id, "action": "release"}),
                "warning",
            ),
            (
                t.replies(),
                types::ACK,
                json!({"transfer_id": id, "action": "cancel_credit"}),
                "warning",
            ),
            (
                t.events(),
                types::TRANSFER_COMPLETED,
                json!({"transfer_id": id}),
                "info",
            ),
            (
                t.events(),
                types::TRANSFER_FAILED,
                json!({"transfer_id": id}),
                "warning",
            ),
            (
                t.events(),
                types::TRANSFER_REJECTED,
                json!({"transfer_id": "x"}),
                "error",
            ),
            (
                t.events(),
                types::COMMIT_STUCK,
                json!({"transfer_id": id}),
                "critical",
            ),
            (
                t.events(),
                "twophase.nope",
                json!({"transfer_id": id}),
                "error",
            ),
            (
                Topics::dead_letters(&t.replies()),
                types::VOTE,
                json!({"transfer_id": id}),
                "error",
            ),
            (
                t.reconciliation_reports(),
                "twophase.reconciliation.report",
                json!({"discrepancies": []}),
                "info",
            ),
            (
                t.reconciliation_reports(),
                "twophase.reconciliation.report",
                json!({"discrepancies": [{"kind": "balance"}]}),
                "critical",
            ),
            (
                t.reconciliation_reports(),
                "twophase.reconciliation.report",
                json!({"discrepancy_count": 2}),
                "critical",
            ),
            (
                t.reconciliation_reports(),
                "twophase.reconciliation.report",
                json!({"status": "completed", "discrepancy_counts": {"balance": 0}, "discrepancies": []}),
                "info",
            ),
            (
                t.reconciliation_reports(),
                "twophase.reconciliation.report",
                json!({"status": "completed_with_errors", "discrepancy_counts": {"balance": 1}}),
                "critical",
            ),
            (
                t.reconciliation_reports(),
                "twophase.reconciliation.report",
                json!({"status": "failed", "discrepancies": []}),
                "error",
            ),
        ];
        for (topic, ce_type, payload, expected) in cases {
            assert_eq!(
                severity_of(topic.clone(), ce_type, payload.clone()),
                expected,
                "{topic} {ce_type} {payload}"
            );
        }
    }

    #[test]
    fn a_saga_message_names_its_entity_actor_and_trace() {
        let t = topics();
        let transfer = Uuid::new_v4();
        let account = Uuid::new_v4();
        let body = json!({"transfer_id": transfer.to_string().to_uppercase(), "account_id": account, "amount": "1", "currency": "USD"});
        let mut record = Record::new(t.account_commands(), types::ACCOUNT_HOLD, body);
        record
            .headers
            .push((client_headers::IP, "203.0.113.9".into()));
        record
            .headers
            .push((client_headers::USER_AGENT, "pay-frontend/2.1".into()));
        let e = record.entry();
        assert_eq!(e.message_id.to_string(), record.headers[0].1);
        assert_eq!(e.event_type, types::ACCOUNT_HOLD);
        assert_eq!(e.entity_type.as_deref(), Some("account"));
        assert_eq!(e.entity_id, Some(account.to_string()));
        assert_eq!(e.transfer_id, Some(transfer.to_string()));
        assert_eq!(e.action.as_deref(), Some("hold"));
        assert_eq!(e.actor_id.as_deref(), Some("/twophase/coordinator"));
        assert_eq!(e.actor_type.as_deref(), Some("worker"));
        assert_eq!(
            e.trace_id.as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(e.span_id.as_deref(), Some("b7ad6b7169203331"));
        assert_eq!(e.ip_address.as_deref(), Some("203.0.113.9"));
        assert_eq!(e.user_agent.as_deref(), Some("pay-frontend/2.1"));
        assert_eq!(e.payload_encoding, "json");
        assert_eq!(format_time(&e.occurred_at), "2026-11-24T10:00:00.123Z");
        assert_eq!(e.occurred_at_us % 1_000_000, 123_456);
        assert_eq!(e.message_key.as_deref(), Some("k"));
    }

    /// A leap second is stored as the second after it (PostgreSQL keeps microseconds since an
    /// epoch), and the row is hashed as it is stored, so that verification agrees with it.
    #[test]
    fn a_leap_second_is_recorded_as_the_second_after_it() {
        let mut record = Record::new(topics().requests(), types::TRANSFER_REQUESTED, json!({}));
        for (name, value) in record.headers.iter_mut() {
            if *name == ce::TIME {
                *value = "2026-11-24T10:15:60Z".to_owned();
            }
        }
        let e = record.entry();
        assert_eq!(format_time(&e.occurred_at), "2026-11-24T10:16:00.000Z");
        assert_eq!(e.occurred_at_us % 60_000_000, 0);
    }

    #[test]
    fn a_dead_letter_keeps_its_bytes_and_is_a_message_of_its_own() {
        let t = topics();
        let dlq = Topics::dead_letters(&t.replies());
        let mut record = Record::new(dlq, types::VOTE, json!({}));
        record.payload = Some(vec![0xff, 0x00, b'{']);
        record.headers.extend([
            (dlq_headers::TOPIC, t.replies()),
            (dlq_headers::PARTITION, "1".into()),
            (dlq_headers::OFFSET, "42".into()),
            (dlq_headers::WORKER, "coordinator".into()),
            (ce::CORRELATION_ID, "t-1".into()),
        ]);
        let e = record.entry();
        assert_eq!(e.payload_encoding, "base64");
        assert_eq!(e.payload.0, Value::String("/wB7".into()));
        assert_eq!(e.event_type, DEAD_LETTER_TYPE);
        assert_eq!(e.action.as_deref(), Some("dead_letter"));
        assert_eq!(e.severity, "error");
        assert_eq!(e.transfer_id.as_deref(), Some("t-1"));
        assert_eq!(e.actor_id.as_deref(), Some("/twophase/coordinator"));
        assert_ne!(e.message_id.to_string(), record.headers[0].1);
        // Stable: the same dead letter read again is the same message.
        assert_eq!(record.entry().message_id, e.message_id);
        // Set aside at its own Kafka time, not the original's ce_time.
        assert_eq!(e.occurred_at.0.timestamp_millis(), 1_790_000_000_000);
    }

    #[test]
    fn a_bare_request_gets_the_workers_id_and_type() {
        let t = topics();
        let record = Record {
            topic: t.requests(),
            headers: vec![],
            payload: Some(br#"{"transfer_id":"abc"}"#.to_vec()),
        };
        let e = record.entry();
        let expected = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{}/2/7", t.requests()).as_bytes(),
        );
        assert_eq!(e.message_id, expected);
        assert_eq!(e.event_type, types::TRANSFER_REQUESTED);
        assert_eq!(e.actor_type.as_deref(), Some("producer"));
        assert_eq!(e.actor_id, None);
        assert_eq!(e.transfer_id.as_deref(), Some("abc"));
        assert_eq!(e.occurred_at.0.timestamp_millis(), 1_790_000_000_000);
    }

    #[test]
    fn a_request_whose_id_is_not_a_uuid_gets_the_id_the_workers_give_it() {
        let t = topics();
        let headers = |id: &str| vec![(ce::ID, id.to_owned()), (ce::SOURCE, "/shop ".to_owned())];
        let record = |id: &str| Record {
            topic: t.requests(),
            headers: headers(id),
            payload: Some(br#"{"transfer_id":"abc"}"#.to_vec()),
        };
        // Spaces around an id or a source are part of it, to the workers as to the audit.
        let uuid = Uuid::new_v4().to_string();
        for id in ["order-42-evt", " order-42-evt", &format!("{uuid}\n"), &uuid] {
            let worker = Envelope::from_headers(
                headers(id).iter().map(|(k, v)| (*k, Some(v.as_bytes()))),
                Some(types::TRANSFER_REQUESTED),
                || unreachable!("the id header is present"),
                None,
            )
            .unwrap();
            assert_eq!(record(id).entry().message_id, worker.id, "{id:?}");
        }
        // An empty one is no id: the record's position is.
        let position = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{}/2/7", t.requests()).as_bytes(),
        );
        assert_eq!(record("").entry().message_id, position);
    }

    #[test]
    fn a_replayed_message_is_dated_when_it_was_replayed() {
        let mut record = Record::new(topics().replies(), types::VOTE, json!({}));
        let original = record.entry().occurred_at_us;
        assert_eq!(original, 1_795_514_400_123_456, "its ce_time");
        record.headers.push((
            replay_headers::FROM,
            format!("{}/0/3", Topics::dead_letters(&topics().replies())),
        ));
        // Its own Kafka time (2026-09-21T14:13:20Z), which the broker gave it when it was
        // replayed.
        record
            .headers
            .push((replay_headers::AT, "2026-09-21T14:13:19.5Z".to_owned()));
        assert_eq!(record.entry().occurred_at_us, 1_790_000_000_000_000);
    }

    /// A time no RFC 3339 text can hold (year 10000 once in UTC) would be stored as text the
    /// SQLite store cannot read back: the record's Kafka time is taken instead.
    #[test]
    fn a_ce_time_past_year_9999_dates_the_row_by_its_kafka_time() {
        let mut record = Record::new(topics().events(), types::TRANSFER_COMPLETED, json!({}));
        record.headers.retain(|(k, _)| *k != ce::TIME);
        record
            .headers
            .push((ce::TIME, "9999-12-31T23:30:00-01:00".to_owned()));
        let e = record.entry();
        assert_eq!(e.occurred_at_us, 1_790_000_000_000_000);
    }

    #[test]
    fn headers_are_kept_byte_for_byte_and_the_last_of_a_name_wins() {
        let name = ce::CORRELATION_ID.as_bytes();
        let source = Source {
            topic: "t",
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            headers: vec![
                RawHeader {
                    name,
                    value: Some(b"first"),
                },
                RawHeader {
                    name: b"x-\xff",
                    value: Some(b"\x00"),
                },
                RawHeader {
                    name,
                    value: Some(b"last"),
                },
                RawHeader { name, value: None },
            ],
            timestamp_ms: None,
        };
        assert_eq!(source.header(ce::CORRELATION_ID), Some("last"));
        assert_eq!(
            headers_of(&source),
            json!([
                [ce::CORRELATION_ID, "first"],
                [{ "base64": "eC3/" }, { "base64": "AA==" }],
                [ce::CORRELATION_ID, "last"],
                [ce::CORRELATION_ID, null],
            ])
        );
    }

    #[test]
    fn unreadable_and_nul_bearing_payloads_are_kept_as_bytes() {
        assert_eq!(payload_of(None), ("none", Value::Null));
        assert_eq!(payload_of(Some(b"")), ("none", Value::Null));
        assert_eq!(payload_of(Some(b"not json")).0, "base64");
        assert_eq!(payload_of(Some(br#"{"a":"x\u0000y"}"#)).0, "base64");
        assert_eq!(
            payload_of(Some(br#"{"a":[1,2.5]}"#)),
            ("json", json!({"a": [1, 2.5]}))
        );
        assert_eq!(bytes_text(b"k\0"), "base64:awA=");
    }
}
