//! Kafka clients: the producer every worker publishes with, consumers, topic creation.

pub mod fatal;
pub mod headers;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use twophase_messages::{Envelope, EnvelopeError, Message};
use uuid::Uuid;

use crate::config::KafkaConfig;
use crate::telemetry;

/// The base client configuration: brokers plus the user's extra properties.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    set_all(&mut config, &kafka.properties);
    config
}

/// The base configuration of a consumer: [`client_config`] plus the user's consumer-only
/// properties.
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = client_config(kafka);
    set_all(&mut config, &kafka.consumer_properties);
    config
}

fn set_all(config: &mut ClientConfig, properties: &BTreeMap<String, String>) {
    for (key, value) in properties {
        config.set(key, value);
    }
}

/// Tuning defaults, each set unless the user's properties name it (`kafka.properties`, and for
/// a consumer `kafka.consumer_properties`). Settings that correctness depends on (idempotence,
/// acks, manual offset storage) are set outright instead.
pub fn with_defaults<'a>(
    config: &'a mut ClientConfig,
    defaults: &[(&str, &str)],
) -> &'a mut ClientConfig {
    for (key, value) in defaults {
        if config.get(key).is_none() {
            config.set(*key, *value);
        }
    }
    config
}

/// A message to publish, with its envelope.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub key: String,
    pub envelope: Envelope,
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// A message caused by `cause`: same correlation id, causation id set, trace continued.
    pub fn caused_by(
        cause: &Envelope,
        source: &str,
        topic: String,
        key: impl ToString,
        message: &Message,
    ) -> Outgoing {
        let mut envelope = Envelope::new(
            message.message_type(),
            source,
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| message.transfer_id()),
        );
        envelope.causation_id = Some(cause.id);
        telemetry::set_trace_of(&mut envelope, Some(cause), Some(&message.transfer_id()));
        Outgoing::with_envelope(topic, key, envelope, message)
    }

    /// A message that starts a new chain (a producer's request, an ops command).
    pub fn new(topic: String, key: impl ToString, source: &str, message: &Message) -> Outgoing {
        let mut envelope = Envelope::new(message.message_type(), source, message.transfer_id());
        telemetry::set_trace(&mut envelope, None);
        Outgoing::with_envelope(topic, key, envelope, message)
    }

    pub fn with_envelope(
        topic: String,
        key: impl ToString,
        envelope: Envelope,
        message: &Message,
    ) -> Outgoing {
        Outgoing {
            topic,
            key: key.to_string(),
            envelope,
            payload: message.to_json(),
        }
    }
}

/// The idempotent producer every worker publishes with.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer<PublisherContext>,
}

/// What librdkafka tells the producer beyond deliveries: errors, a fatal one among them.
#[derive(Debug, Default)]
pub struct PublisherContext {
    errors: ErrorLog,
}

impl ClientContext for PublisherContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, line: &str) {
        fatal::log(|| "the Kafka producer".to_owned(), level, facility, line);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(left_out) = self.errors.admit(&error) {
            tracing::error!(%error, reason, left_out, "librdkafka producer error");
        }
    }
}

/// How often a client's error of one kind is logged at most.
const ERROR_REPEAT: Duration = Duration::from_secs(30);

/// Which of a client's errors to log. While its brokers are down, librdkafka reports it again at
/// every attempt to reconnect, several times a second, for as long as an outage lasts: each kind
/// of error is logged once, then at most once every [`ERROR_REPEAT`], with how many like it
/// were left out since.
#[derive(Debug)]
pub(crate) struct ErrorLog {
    every: Duration,
    /// By kind: when it was last logged, and how many were left out since.
    seen: std::sync::Mutex<std::collections::HashMap<Option<i32>, (Instant, u64)>>,
}

impl Default for ErrorLog {
    fn default() -> ErrorLog {
        ErrorLog::every(ERROR_REPEAT)
    }
}

impl ErrorLog {
    fn every(every: Duration) -> ErrorLog {
        ErrorLog {
            every,
            seen: Default::default(),
        }
    }

    /// Whether to log `error` now: if so, how many of its kind were left out since it was last
    /// logged.
    pub(crate) fn admit(&self, error: &KafkaError) -> Option<u64> {
        let now = Instant::now();
        let kind = error.rdkafka_error_code().map(|code| code as i32);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(&kind) {
            Some((at, left_out)) if now.duration_since(*at) < self.every => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                seen.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

/// The configuration of the workers' producer, `[kafka.properties]` included.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = client_config(kafka);
    with_defaults(
        &mut config,
        &[
            // Replies of a whole polled batch go out together; a few milliseconds of linger
            // fill the produce requests without adding much to a lone message's latency.
            // (No linger at all measured no better: BENCHMARKS.md.)
            ("linger.ms", "2"),
            ("message.timeout.ms", "30000"),
        ],
    );
    config.set("enable.idempotence", "true").set("acks", "all");
    config
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig) -> Result<Publisher, KafkaError> {
        let producer = producer_config(kafka).create_with_context(PublisherContext::default())?;
        Ok(Publisher { producer })
    }

    /// See [`fatal::raise_for_test`].
    pub(crate) fn raise_fatal_for_test(&self) {
        use rdkafka::producer::Producer as _;
        fatal::raise_for_test(self.producer.client());
    }

    /// Publishes one message and waits until the broker has it.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), KafkaError> {
        let headers = envelope_headers(&message.envelope);
        self.send_raw(
            &message.topic,
            Some(message.key.as_bytes()),
            &message.payload,
            headers,
        )
        .await
    }

    /// Hands one message to the producer without waiting: the returned future resolves with
    /// the broker's acknowledgement. Messages enqueued one after another keep their order per
    /// partition (idempotent producer). Fails at once when the local queue is full.
    pub fn enqueue(&self, message: &Outgoing) -> Result<DeliveryFuture, KafkaError> {
        let headers = envelope_headers(&message.envelope);
        let record = FutureRecord::to(&message.topic)
            .key(message.key.as_bytes())
            .payload(&message.payload)
            .headers(headers);
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Publishes all messages concurrently and waits for every acknowledgement. Per key,
    /// order is kept (idempotent producer).
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), KafkaError> {
        let sends = messages.iter().map(|m| self.publish(m));
        futures::future::try_join_all(sends).await.map(|_| ())
    }

    /// Publishes bytes and headers as they are (dead letters, replays).
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

/// The envelope of a record as read: from its headers, with the type the topic implies and the
/// id `fallback_id` gives for missing ones, and the record's own Kafka time for a missing
/// `ce_time` (see [`Envelope::from_headers`]).
pub fn envelope_of<M>(
    record: &M,
    default_type: Option<&str>,
    fallback_id: impl FnOnce() -> Uuid,
) -> Result<Envelope, EnvelopeError>
where
    M: rdkafka::Message + headers::Record,
{
    // A name that is not UTF-8 is none of the envelope's.
    let headers = headers::of(record)
        .into_iter()
        .filter_map(|h| Some((h.name_text()?, h.value)));
    let time = record
        .timestamp()
        .to_millis()
        .and_then(twophase_messages::envelope::time_of_millis);
    Envelope::from_headers(headers, default_type, fallback_id, time)
}

/// The Kafka headers of an envelope.
pub fn envelope_headers(envelope: &Envelope) -> OwnedHeaders {
    envelope
        .to_headers()
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
}

/// Creates the topics that do not exist yet. Existing topics are left as they are, and when
/// every topic exists no admin request is made (the embedded broker serves none). An error
/// names the brokers, or the topic that could not be made.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .with_context(|| format!("reaching the Kafka brokers at {}", kafka.brokers))?;
    let existing: Vec<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    let new: Vec<NewTopic> = topics
        .iter()
        .filter(|t| !existing.contains(&t.as_str()))
        .map(|t| {
            NewTopic::new(
                t,
                kafka.partitions,
                TopicReplication::Fixed(kafka.replication_factor),
            )
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code))
                    .with_context(|| format!("creating topic {topic}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brokers down, reported at every reconnect: the first report is logged, the repeats only
    /// once the interval has passed, with their count; another kind of error is its own.
    #[test]
    fn a_repeated_client_error_is_logged_once_an_interval_with_its_count() {
        let down = || KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let refused = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        let log = ErrorLog::every(Duration::from_millis(300));
        assert_eq!(log.admit(&down()), Some(0));
        assert_eq!(log.admit(&down()), None);
        assert_eq!(log.admit(&refused), Some(0));
        assert_eq!(log.admit(&down()), None);
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(log.admit(&down()), Some(2));
        assert_eq!(log.admit(&down()), None);
    }

    /// A bank's cluster speaks TLS, with SASL over it: the clients are built to.
    #[test]
    fn clients_can_be_made_for_tls_and_sasl_over_tls() {
        for properties in [
            vec![("security.protocol", "SSL")],
            vec![
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("sasl.username", "twophase"),
                ("sasl.password", "secret"),
            ],
        ] {
            let kafka = KafkaConfig {
                properties: properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..KafkaConfig::default()
            };
            let made: Result<FutureProducer, _> = producer_config(&kafka).create();
            assert!(made.is_ok(), "{properties:?}: {:?}", made.err());
        }
    }

    #[test]
    fn the_users_properties_override_tuning_defaults() {
        let kafka = KafkaConfig {
            properties: [("linger.ms".to_owned(), "20".to_owned())].into(),
            ..KafkaConfig::default()
        };
        let config = producer_config(&kafka);
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert_eq!(config.get("message.timeout.ms"), Some("30000"));
    }

    #[test]
    fn consumer_properties_reach_consumers_only_and_win_over_the_shared_ones() {
        let kafka = KafkaConfig {
            properties: [
                ("fetch.wait.max.ms".to_owned(), "100".to_owned()),
                ("socket.timeout.ms".to_owned(), "5000".to_owned()),
            ]
            .into(),
            consumer_properties: [
                ("fetch.wait.max.ms".to_owned(), "25".to_owned()),
                ("session.timeout.ms".to_owned(), "30000".to_owned()),
                ("max.poll.interval.ms".to_owned(), "900000".to_owned()),
            ]
            .into(),
            ..KafkaConfig::default()
        };
        let consumer = consumer_config(&kafka);
        assert_eq!(consumer.get("fetch.wait.max.ms"), Some("25"));
        assert_eq!(consumer.get("socket.timeout.ms"), Some("5000"));
        // A worker's own tuning defaults give way to them too.
        let member = crate::worker::member_config(
            &kafka,
            "group",
            "test",
            &crate::config::RetryConfig::default(),
        );
        assert_eq!(member.get("session.timeout.ms"), Some("30000"));
        assert_eq!(member.get("max.poll.interval.ms"), Some("900000"));
        assert_eq!(member.get("fetch.wait.max.ms"), Some("25"));
        let producer = producer_config(&kafka);
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("fetch.wait.max.ms"), Some("100"));
    }
}
