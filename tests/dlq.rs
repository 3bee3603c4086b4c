//! Dead letters end to end: poison messages of every kind are set aside on `<topic>.dlq` with
//! the headers that explain them while their partition moves on, and `twophase dlq` lists and
//! replays them. Workers and the `twophase` command run as separate processes on a real Kafka
//! broker and PostgreSQL, each test on its own database and topics.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Output, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_outcome, request, TestEnv};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use twophase::client::{Outcome, TopicTail};
use twophase::dlq::{replay_headers, DeadLetter, REPLAYS_TOPIC, REPLAY_RECORD_TYPE};
use twophase_messages::{
    AccountAction, AccountCommand, AccountCommandBody, Decision, Envelope, Message, Participant,
    Topics, TransferRequested, Vote,
};
use twophase_runtime::kafka::headers::{self as record_headers, RawHeader};
use twophase_runtime::Outgoing;
use uuid::Uuid;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Runs `twophase <args>` against the test's services.
async fn twophase(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = env.command();
    cmd.args(args).env("RUST_LOG", "warn");
    common::output(cmd).await
}

/// Runs `twophase <args>`, expects success, and returns its standard output.
async fn twophase_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = twophase(env, args).await;
    assert!(
        out.status.success(),
        "twophase {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `twophase dlq list --json` for `topic`.
async fn list(env: &TestEnv, topic: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["dlq", "list", "--topic", topic, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&twophase_ok(env, &args).await).unwrap()
}

/// Publishes records as they are (bytes and headers of any shape) and says where they landed.
struct RawProducer(FutureProducer);

impl RawProducer {
    fn new(env: &TestEnv) -> RawProducer {
        let producer = twophase_runtime::kafka::client_config(&env.kafka)
            .set("acks", "all")
            .create()
            .unwrap();
        RawProducer(producer)
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> (i32, i64) {
        self.send_to(topic, None, key, payload, headers).await
    }

    /// [`RawProducer::send`] to a partition of the caller's choice, whatever the key.
    async fn send_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> (i32, i64) {
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        self.send_with(topic, partition, key, payload, headers)
            .await
    }

    /// [`RawProducer::send_to`] with headers as they are, names that are not UTF-8 included.
    async fn send_with(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> (i32, i64) {
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let delivery = self
            .0
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("the broker takes the record");
        (delivery.partition, delivery.offset)
    }
}

/// The headers of a message as the project writes them, plus a marker to recognise it by.
fn headers_of(out: &Outgoing, marker: &str) -> Vec<(&'static str, String)> {
    let mut headers = out.envelope.to_headers();
    headers.push(("x-test", marker.to_owned()));
    headers
}

/// The sum of the high watermarks of a topic's partitions: how many records it ever took.
async fn high_watermark(env: &TestEnv, topic: &str) -> i64 {
    let kafka = env.kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = twophase_runtime::kafka::client_config(&kafka)
            .create()
            .unwrap();
        let timeout = Duration::from_secs(10);
        let metadata = client.fetch_metadata(Some(&topic), timeout).unwrap();
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        partitions
            .into_iter()
            .map(|p| client.fetch_watermarks(&topic, p, timeout).unwrap().1)
            .sum()
    })
    .await
    .unwrap()
}

/// Sets a topic's configuration to `entries`, and every other entry to its default.
async fn set_topic_config(env: &TestEnv, topic: &str, entries: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        twophase_runtime::kafka::client_config(&env.kafka)
            .create()
            .unwrap();
    let config = entries.iter().fold(
        AlterConfig::new(ResourceSpecifier::Topic(topic)),
        |config, (key, value)| config.set(key, value),
    );
    let results = admin
        .alter_configs([&config], &AdminOptions::new())
        .await
        .unwrap();
    for result in results {
        result.unwrap_or_else(|(_, code)| panic!("configuring {topic}: {code}"));
    }
}

/// The consumer groups the broker knows (`None` where it cannot list them: the mock cluster).
async fn consumer_groups(env: &TestEnv) -> Option<Vec<String>> {
    let kafka = env.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = twophase_runtime::kafka::client_config(&kafka)
            .create()
            .unwrap();
        let groups = client
            .fetch_group_list(None, Duration::from_secs(10))
            .ok()?;
        Some(
            groups
                .groups()
                .iter()
                .map(|g| g.name().to_owned())
                .collect(),
        )
    })
    .await
    .unwrap()
}

/// What one poison message is and where it must end up.
struct Poison {
    name: &'static str,
    topic: String,
    key: String,
    payload: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    message_id: Option<String>,
    class: &'static str,
    worker: &'static str,
    error: &'static str,
}

#[tokio::test(flavor = "multi_thread")]
async fn each_kind_of_poison_message_is_dead_lettered_and_its_partition_moves_on() {
    let mut env = TestEnv::new("poison").await;
    let coordinator_port = env.start_serving("coordinator", &[]).await;
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let raw = RawProducer::new(&env);
    let topics = env.topics.clone();

    // One valid transfer per poison message, published after it under the same key: a
    // request's key is its transfer id, its votes are keyed by transfer id on saga.replies, and
    // its hold is keyed by the source account on saga.commands.account. So each poison message
    // shares its partition with a message that must still be processed.
    let valid: Vec<TransferRequested> = (0..5).map(|_| request(a, b, "1.00", "USD")).collect();
    let body = |r: &TransferRequested| serde_json::to_vec(r).unwrap();
    let typed = |r: &TransferRequested, ce_type: &str, version: &str, marker: &str| {
        let message = Message::TransferRequested(r.clone());
        let out = Outgoing::new(topics.requests(), &r.transfer_id, "/test", &message);
        let mut headers = headers_of(&out, marker);
        for (k, v) in headers.iter_mut() {
            match *k {
                "ce_type" => *v = ce_type.to_owned(),
                "schema-version" => *v = version.to_owned(),
                _ => {}
            }
        }
        (out.envelope.id.to_string(), headers)
    };
    let requested = twophase_messages::types::TRANSFER_REQUESTED;
    let (wrong_shape_id, wrong_shape_headers) = typed(&valid[1], requested, "1", "wrong-shape");
    let (unknown_type_id, unknown_type_headers) =
        typed(&valid[2], "twophase.transfer.requestd", "1", "unknown-type");
    let (future_id, future_headers) = typed(&valid[3], requested, "2", "future-version");

    // A risk worker's yes for a transfer, sent to `topic`.
    let risk_yes = |topic: String, r: &TransferRequested| {
        let vote = Vote {
            transfer_id: r.transfer_id.parse().unwrap(),
            participant: Participant::Risk,
            decision: Decision::Yes,
            reason: None,
            risk: None,
        };
        Outgoing::new(topic, &r.transfer_id, "/test", &Message::Vote(vote))
    };
    // One sent where requests go, as a producer might to skip the risk check.
    let forged_vote = risk_yes(topics.requests(), &valid[0]);
    let stray_vote = risk_yes(topics.replies(), &valid[4]);
    let never_held = AccountCommandBody {
        transfer_id: Uuid::new_v4(),
        account_id: a,
        amount: dec("1.00"),
        currency: "USD".into(),
    };
    let stray_capture = Outgoing::new(
        topics.account_commands(),
        a,
        "/test",
        &Message::Account(AccountCommand::new(AccountAction::Capture, never_held)),
    );

    let poisons = vec![
        Poison {
            name: "garbage",
            topic: topics.requests(),
            key: valid[0].transfer_id.clone(),
            payload: b"\xff\xfe not JSON \x00".to_vec(),
            // As a producer outside the project might: no envelope headers at all.
            headers: vec![("x-test", "garbage".to_owned())],
            message_id: None,
            class: "decode",
            worker: "coordinator",
            error: "payload of twophase.transfer.requested is not JSON",
        },
        Poison {
            name: "wrong-shape",
            topic: topics.requests(),
            key: valid[1].transfer_id.clone(),
            payload: format!(r#"{{"transfer_id":"{}","amount":5}}"#, valid[1].transfer_id)
                .into_bytes(),
            headers: wrong_shape_headers,
            message_id: Some(wrong_shape_id),
            class: "decode",
            worker: "coordinator",
            error: "payload of twophase.transfer.requested is not valid",
        },
        Poison {
            name: "unknown-type",
            topic: topics.requests(),
            key: valid[2].transfer_id.clone(),
            payload: body(&valid[2]),
            headers: unknown_type_headers,
            message_id: Some(unknown_type_id),
            class: "decode",
            worker: "coordinator",
            error: "unknown message type \"twophase.transfer.requestd\"",
        },
        Poison {
            name: "future-version",
            topic: topics.requests(),
            key: valid[3].transfer_id.clone(),
            payload: body(&valid[3]),
            headers: future_headers,
            message_id: Some(future_id),
            class: "decode",
            worker: "coordinator",
            error: "schema version 2 of twophase.transfer.requested is newer",
        },
        Poison {
            name: "vote-on-requests",
            topic: topics.requests(),
            key: valid[0].transfer_id.clone(),
            payload: forged_vote.payload.clone(),
            headers: headers_of(&forged_vote, "vote-on-requests"),
            message_id: Some(forged_vote.envelope.id.to_string()),
            class: "decode",
            worker: "coordinator",
            error: "carries only twophase.transfer.requested, not twophase.saga.vote",
        },
        Poison {
            name: "reply-for-unknown-transfer",
            topic: topics.replies(),
            key: valid[4].transfer_id.clone(),
            payload: stray_vote.payload.clone(),
            headers: headers_of(&stray_vote, "reply-for-unknown-transfer"),
            message_id: Some(stray_vote.envelope.id.to_string()),
            class: "permanent",
            worker: "coordinator",
            error: "which this coordinator never started",
        },
        Poison {
            name: "capture-never-held",
            topic: topics.account_commands(),
            key: a.to_string(),
            payload: stray_capture.payload.clone(),
            headers: headers_of(&stray_capture, "capture-never-held"),
            message_id: Some(stray_capture.envelope.id.to_string()),
            class: "permanent",
            worker: "account",
            error: "protocol violation: capture for transfer",
        },
    ];

    let watcher = env.watcher().await;
    let replies_dlq = TopicTail::start(&env.kafka, Topics::dead_letters(&topics.replies()))
        .await
        .unwrap();
    let mut positions = HashMap::new();
    for p in &poisons {
        let at = raw.send(&p.topic, &p.key, &p.payload, &p.headers).await;
        positions.insert(p.name, at);
    }
    // Requests and replies are different topics, so nothing orders the stray vote before its
    // transfer's request: had the request come first, the vote would count. The request waits
    // until the vote is set aside; its real votes then follow on the stray vote's partition.
    let (envelope, _) = tokio::time::timeout(Duration::from_secs(30), replies_dlq.next())
        .await
        .expect("the stray vote is dead-lettered")
        .unwrap();
    assert_eq!(envelope.id, stray_vote.envelope.id);
    for r in &valid {
        env.request(r).await;
    }

    // Every valid message after a poison one on its partition is processed.
    let outcomes = watcher
        .wait_for(
            valid.iter().map(|r| r.transfer_id.clone()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes.len(),
        valid.len(),
        "every transfer has an outcome (logs in {})",
        env.log_dir.display()
    );
    for r in &valid {
        assert_outcome(&outcomes[&r.transfer_id], "completed", None);
    }
    assert_eq!(env.balance(a).await, (dec("95.00"), Decimal::ZERO));

    // A partition moves on only once its dead letter is acknowledged, so every one is there.
    // The base name, the prefixed name and the full dead-letter name all work.
    let full_requests_dlq = Topics::dead_letters(&topics.requests());
    let mut listed = list(&env, "transfers.requests", &[]).await;
    listed.extend(list(&env, &topics.replies(), &[]).await);
    listed.extend(list(&env, &Topics::dead_letters(&topics.account_commands()), &[]).await);
    assert_eq!(
        listed.len(),
        poisons.len(),
        "one dead letter per poison message: {listed:#?}"
    );
    for p in &poisons {
        let (partition, offset) = positions[p.name];
        let d = listed
            .iter()
            .find(|d| d["headers"]["x-test"] == p.name)
            .unwrap_or_else(|| panic!("{} is dead-lettered: {listed:#?}", p.name));
        let what = format!("{}: {d:#}", p.name);
        assert_eq!(d["dlq_topic"], Topics::dead_letters(&p.topic), "{what}");
        assert_eq!(d["original_topic"], p.topic, "{what}");
        assert_eq!(d["original_partition"], partition, "{what}");
        assert_eq!(d["original_offset"], offset, "{what}");
        assert_eq!(d["error_class"], p.class, "{what}");
        assert!(d["error"].as_str().unwrap().contains(p.error), "{what}");
        assert_eq!(d["worker"], p.worker, "{what}");
        assert_eq!(d["attempts"], 1, "{what}");
        assert!(d["first_failure_at"].is_string(), "{what}");
        assert!(d["dead_lettered_at"].is_string(), "{what}");
        assert_eq!(d["key"], p.key, "{what}");
        assert_eq!(d["message_id"], serde_json::json!(p.message_id), "{what}");
        // The original bytes and headers, untouched.
        match std::str::from_utf8(&p.payload) {
            Ok(text) => assert_eq!(d["payload"], text, "{what}"),
            Err(_) => {
                let hex: String = p.payload.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(d["payload_hex"], hex, "{what}");
            }
        }
        for (k, v) in &p.headers {
            assert_eq!(d["headers"][*k], v.as_str(), "{what}: header {k}");
        }
    }
    assert_eq!(
        list(&env, "saga.commands.risk", &[]).await,
        Vec::<Value>::new()
    );

    // A dead letter without a ce_id is shown, and chosen for a replay, by the id the workers
    // know its record by. A dry run does not ask who runs it.
    let (partition, offset) = positions["garbage"];
    let identity = Envelope::position_id(&topics.requests(), partition, offset).to_string();
    let garbage = listed
        .iter()
        .find(|d| d["headers"]["x-test"] == "garbage")
        .unwrap();
    assert_eq!(garbage["identity"], identity.as_str(), "{garbage:#}");
    let text = twophase_ok(&env, &["dlq", "list", "--topic", "transfers.requests"]).await;
    assert!(text.contains(&format!("id {identity}")), "{text}");
    let mut dry = env.command();
    dry.args([
        "dlq",
        "replay",
        "--topic",
        "transfers.requests",
        "--dry-run",
    ])
    .args(["--message-id", &identity])
    .env_remove("USER");
    let out = common::output(dry).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("would replay ") && stdout.contains(&identity),
        "{stdout}"
    );

    // The coordinator counts what it set aside, by topic and class, for the dead-letter alert.
    let counted = |topic: String, class: &'static str| async move {
        let series = [("topic", topic.as_str()), ("error_class", class)];
        common::metric(coordinator_port, "twophase_dead_letters_total", &series).await
    };
    assert_eq!(counted(topics.requests(), "decode").await, Some(5.0));
    assert_eq!(counted(topics.replies(), "permanent").await, Some(1.0));
    assert_eq!(counted(topics.requests(), "permanent").await, Some(0.0));
    let handled = [
        ("worker", "coordinator"),
        ("topic", &*topics.requests()),
        ("outcome", "dead_lettered"),
    ];
    let dead_lettered = common::metric(
        coordinator_port,
        "twophase_messages_handled_total",
        &handled,
    )
    .await;
    assert_eq!(dead_lettered, Some(5.0));

    // --limit keeps the oldest; --since in the future finds nothing; text output is one line each.
    let first_two = list(&env, &full_requests_dlq, &["--limit", "2"]).await;
    let all_five = list(&env, "transfers.requests", &[]).await;
    assert_eq!(first_two[..], all_five[..2]);
    let later = list(
        &env,
        "transfers.requests",
        &["--since", "2099-01-01T00:00:00Z"],
    )
    .await;
    assert!(later.is_empty(), "{later:#?}");
    let recent = list(&env, "transfers.requests", &["--since", "10min"]).await;
    assert_eq!(recent.len(), 5);
    let text = twophase_ok(&env, &["dlq", "list", "--topic", "saga.replies"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains(&stray_vote.envelope.id.to_string()) && lines[0].contains("permanent"),
        "{text}"
    );

    // Reading never joined or committed to a consumer group.
    match consumer_groups(&env).await {
        Some(groups) => assert!(
            !groups.iter().any(|g| g.starts_with("twophase-dlq")),
            "{groups:?}"
        ),
        None => eprintln!("the broker cannot list consumer groups; not checked"),
    }
    env.check_invariants().await;
}

/// A header's name is bytes on the wire, and a producer outside the project can write one
/// that is not UTF-8. rdkafka panics reading such a name; the workers read headers through
/// librdkafka themselves, so a request that carries one is settled, a dead letter keeps it, and
/// the audit store keeps both.
#[tokio::test(flavor = "multi_thread")]
async fn a_header_name_that_is_not_utf8_stops_nothing_and_is_kept() {
    let mut env = TestEnv::new("header-bytes").await;
    env.start("coordinator");
    env.start("account");
    env.start("risk");
    env.start_with(
        "audit",
        &[
            ("TWOPHASE_AUDIT__LISTEN", "127.0.0.1:0"),
            ("TWOPHASE_AUDIT__BATCH_TIMEOUT", "50ms"),
        ],
    );
    let a = env.open_account("USD", "10").await;
    let b = env.open_account("USD", "0").await;
    let raw = RawProducer::new(&env);
    let watcher = env.watcher().await;
    let requests = env.topics.requests();
    let with_foreign = |headers: Vec<(&str, String)>| {
        let named = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            record_headers::add(
                h,
                RawHeader {
                    name: k.as_bytes(),
                    value: Some(v.as_bytes()),
                },
            )
        });
        let foreign = RawHeader {
            name: b"x-\xff\xfe",
            value: Some(b"from-elsewhere"),
        };
        record_headers::add(named, foreign)
    };

    // One the coordinator cannot decode, then a transfer, on one partition: the first is set
    // aside and the second settled.
    let transfer = request(a, b, "1.00", "USD");
    let message = Message::TransferRequested(transfer.clone());
    let out = Outgoing::new(requests.clone(), &transfer.transfer_id, "/test", &message);
    let garbage = with_foreign(vec![("x-test", "garbage".to_owned())]);
    let key = &transfer.transfer_id;
    let (partition, offset) = raw
        .send_with(&requests, Some(0), key, b"not JSON", garbage)
        .await;
    let valid = with_foreign(out.envelope.to_headers());
    let (_, valid_offset) = raw
        .send_with(&requests, Some(0), key, &out.payload, valid)
        .await;

    let outcome = common::outcome_of(&watcher, key, Duration::from_secs(60)).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(b).await, (dec("1.00"), Decimal::ZERO));

    let listed = list(&env, "transfers.requests", &[]).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let d = &listed[0];
    assert_eq!(
        (
            d["original_partition"].as_i64(),
            d["original_offset"].as_i64()
        ),
        (Some(partition.into()), Some(offset)),
        "{d:#}"
    );
    assert_eq!(d["error_class"], "decode", "{d:#}");
    assert_eq!(d["headers"]["x-test"], "garbage", "{d:#}");
    assert_eq!(
        d["headers"]["x-\u{fffd}\u{fffd}"], "from-elsewhere",
        "{d:#}"
    );

    let audited = format!(
        "SELECT count(*) FROM audit.audit_log
         WHERE (topic = '{requests}' AND kafka_partition = 0 AND kafka_offset IN ({offset}, \
         {valid_offset})) OR topic = '{}'",
        Topics::dead_letters(&requests)
    );
    let started = Instant::now();
    while env.count(&audited).await < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the audit store lacks the records with the foreign header (logs in {})",
            env.log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.check_invariants().await;
}

/// A producer's `ce_id` need not be a UUID, and is unique only within its `ce_source`:
/// `replay --message-id` takes the id as `dlq list` shows it, or the UUID the workers know the
/// message by, and two messages with one `ce_id` from two sources are two messages, as are two
/// different ones a producer sent under one. A message that fails again after a replay is one
/// message, even one without a `ce_id`: the next replay sends it once, from its later dead
/// letter.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_chosen_by_the_ids_producers_gave_them() {
    let mut env = TestEnv::new("dlqids").await;
    env.start("coordinator");
    let requests = env.topics.requests();
    // Rejected at once by the coordinator alone; published after the dead letters on the same
    // key, so that its outcome comes after every dead letter before it. Sent again, its outcome
    // is published again.
    let mut last = request(Uuid::new_v4(), Uuid::new_v4(), "0", "USD");
    last.transfer_id = Uuid::new_v4().to_string();
    let key = last.transfer_id.clone();
    let shouted = Uuid::new_v4().to_string().to_uppercase();
    let raw = RawProducer::new(&env);
    for (ce_id, ce_source, payload) in [
        ("order-42-evt", "/shop", "not JSON"),
        ("order-42-evt", "/till", "not JSON"),
        (shouted.as_str(), "/shop", "not JSON"),
        ("order-43-evt", "/shop", "not JSON, once"),
        ("order-43-evt", "/shop", "not JSON, twice"),
    ] {
        let headers = [
            ("ce_id", ce_id.to_owned()),
            ("ce_source", ce_source.to_owned()),
        ];
        raw.send(&requests, &key, payload.as_bytes(), &headers)
            .await;
    }
    let (partition, offset) = raw.send(&requests, &key, b"not JSON", &[]).await;
    let headerless = Envelope::position_id(&requests, partition, offset).to_string();
    let settle = || async {
        let watcher = env.watcher().await;
        env.request(&last).await;
        watcher
            .wait_for([last.transfer_id.clone()], Duration::from_secs(60))
            .await
            .unwrap();
    };
    settle().await;

    let would_replay = |ids: &[&str]| {
        let mut args = vec![
            "dlq",
            "replay",
            "--topic",
            "transfers.requests",
            "--dry-run",
            "--actor",
            "t",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        for id in ids {
            args.extend(["--message-id".to_owned(), id.to_string()]);
        }
        let env = &env;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = twophase_ok(env, &args).await;
            out.lines()
                .filter(|l| l.starts_with("would replay"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(would_replay(&["order-42-evt"]).await.len(), 2);
    assert_eq!(would_replay(&["order-43-evt"]).await.len(), 2);
    assert_eq!(would_replay(&[&shouted]).await.len(), 1);
    assert_eq!(would_replay(&[&shouted.to_lowercase()]).await.len(), 1);
    assert_eq!(would_replay(&[]).await.len(), 6);

    // The record without headers is replayed, fails again, and is set aside again.
    let out = twophase_ok(
        &env,
        &[
            "dlq",
            "replay",
            "--topic",
            "transfers.requests",
            "--message-id",
            &headerless,
            "--actor",
            "t",
        ],
    )
    .await;
    assert_eq!(out.lines().count(), 1, "{out}");
    settle().await;
    let letters: Vec<Value> = list(&env, "transfers.requests", &[])
        .await
        .into_iter()
        .filter(|d| d["identity"] == headerless.as_str())
        .collect();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let (first, again) = (&letters[0], &letters[1]);
    let position = |d: &Value| {
        format!(
            "{}/{}/{}",
            d["dlq_topic"].as_str().unwrap(),
            d["dlq_partition"],
            d["dlq_offset"]
        )
    };
    assert_eq!(first["message_id"], Value::Null, "{first:#}");
    assert_eq!(again["message_id"], headerless.as_str(), "{again:#}");
    assert_eq!(
        again["replayed_from"].as_str(),
        Some(position(first).as_str()),
        "{again:#}"
    );
    let chosen = would_replay(&[&headerless]).await;
    assert_eq!(chosen.len(), 1, "{chosen:?}");
    assert!(
        chosen[0].starts_with(&format!("would replay {} ", position(again))),
        "{chosen:?}"
    );
    assert_eq!(would_replay(&[]).await.len(), 6);
}

/// A record near the producer's size limit cannot be dead-lettered whole: the headers that
/// say why push it over. It is set aside without its payload, saying where the original is, and
/// its partition moves on; the dead letter cannot be replayed, and `replay` says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_too_large_to_dead_letter_whole_is_set_aside_without_its_payload() {
    let mut env = TestEnv::new("dlqlarge").await;
    env.start("coordinator");
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "10").await;
    let b = env.open_account("USD", "0").await;
    let valid = request(a, b, "1.00", "USD");
    // Not JSON, and as large as librdkafka's default `message.max.bytes` (1,000,000) lets the
    // record be with its key and header.
    let payload = vec![b'x'; 999_800];
    let requests = env.topics.requests();
    let marker = vec![("x-test", "too-large".to_owned())];
    let raw = RawProducer::new(&env);
    let (partition, offset) = raw
        .send(&requests, &valid.transfer_id, &payload, &marker)
        .await;
    // Too large even without their payload: the headers of one, the key of the other.
    let big_headers = vec![("x-test", "x".repeat(999_800))];
    let (_, big_headers_offset) = raw
        .send(&requests, &valid.transfer_id, b"not JSON", &big_headers)
        .await;
    let big_key = "k".repeat(999_800);
    let (_, big_key_offset) = raw
        .send_to(&requests, Some(partition), &big_key, b"not JSON", &[])
        .await;

    // The valid request shares the large one's partition, so its outcome comes only once the
    // large one is set aside.
    let watcher = env.watcher().await;
    env.request(&valid).await;
    let outcomes = watcher
        .wait_for([valid.transfer_id.clone()], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        outcomes.len(),
        1,
        "the partition moved on (logs in {})",
        env.log_dir.display()
    );
    assert_outcome(&outcomes[&valid.transfer_id], "completed", None);

    let listed = list(&env, "transfers.requests", &[]).await;
    assert_eq!(listed.len(), 3, "{listed:#?}");
    let d = &listed[0];
    assert_eq!(d["error_class"], "decode", "{d:#}");
    assert_eq!(d["original_partition"], partition, "{d:#}");
    assert_eq!(d["original_offset"], offset, "{d:#}");
    assert_eq!(d["headers"]["x-test"], "too-large", "{d:#}");
    assert!(
        d["payload"].as_str().unwrap_or_default().is_empty() && d["payload_hex"].is_null(),
        "{d:#}"
    );
    let omitted = d["payload_omitted"].as_str().unwrap_or_default();
    assert!(
        omitted.starts_with("set aside without the payload")
            && omitted.contains(&format!(
                "(999800 bytes of payload) is at offset {offset} of partition {partition} of \
                 {requests}"
            )),
        "{d:#}"
    );

    for (bare, offset) in listed[1..].iter().zip([big_headers_offset, big_key_offset]) {
        assert_eq!(bare["original_offset"], offset, "{bare:#}");
        assert_eq!(bare["error_class"], "decode", "{bare:#}");
        assert!(bare["key"].is_null(), "{bare:#}");
        assert_eq!(bare["headers"], serde_json::json!({}), "{bare:#}");
        let omitted = bare["payload_omitted"].as_str().unwrap_or_default();
        assert!(
            omitted.starts_with("set aside without the payload, the key and the record's headers"),
            "{bare:#}"
        );
    }

    let before = high_watermark(&env, &requests).await;
    let out = twophase(
        &env,
        &[
            "dlq",
            "replay",
            "--topic",
            "transfers.requests",
            "--actor",
            "t",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("cannot be replayed, since it was set aside without the payload"),
        "{stderr}"
    );
    assert_eq!(high_watermark(&env, &requests).await, before);
    env.check_invariants().await;
}

/// A TCP proxy in front of PostgreSQL that can cut one worker off its database.
struct DbProxy {
    addr: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    async fn start(upstream: String) -> DbProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(watch::Sender::new(true));
        let state = Arc::clone(&open);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut = state.subscribe();
                if !*cut.borrow() {
                    // Cut off: the connection is closed before the database says a word.
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        DbProxy { addr, open, task }
    }

    /// Drops every connection and refuses new ones.
    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }

    /// `database_url` with its host and port replaced by the proxy's.
    fn url(&self, database_url: &str) -> String {
        PgConnectOptions::from_str(database_url)
            .unwrap()
            .host("127.0.0.1")
            .port(self.addr.port())
            .to_url_lossy()
            .to_string()
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A worker process started with extra environment; killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_with_env(env: &TestEnv, worker: &str, log: &str, vars: &[(&str, &str)]) -> Process {
    let log = std::fs::File::create(env.log_dir.join(log)).unwrap();
    let mut cmd = env.command();
    cmd.arg(worker)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    Process(cmd.spawn().expect("the twophase binary starts"))
}

/// Starts a coordinator that waits five minutes for votes, a risk worker, and an account worker
/// whose retry budget is 1 s (logging to `account_log`, with `vars` beside), opens accounts A
/// (100 USD) and B, and settles 10 USD from A to B, so that every worker has its connections.
async fn with_a_short_budget(
    env: &mut TestEnv,
    account_log: &str,
    vars: &[(&str, &str)],
) -> (Process, Uuid, Uuid) {
    env.with_config("[coordinator]\nprepare_timeout = \"5min\"\n");
    env.start("coordinator");
    env.start("risk");
    let mut vars = vars.to_vec();
    vars.push(("TWOPHASE_RETRY__GIVE_UP_AFTER", "1s"));
    let account = start_with_env(env, "account", account_log, &vars);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let warm_up = env.transfer(&request(a, b, "10", "USD")).await;
    assert_outcome(&warm_up, "completed", None);
    (account, a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_replayed_once_the_database_is_back_completes_its_transfer() {
    if !common::on_postgres("makes PostgreSQL refuse holds") {
        return;
    }
    let mut env = TestEnv::new("replay").await;
    let pg = PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.database_url)
        .await
        .unwrap();
    // The prepare phase outlasts the failures, so only the replay can finish the transfer.
    let (_account, a, b) = with_a_short_budget(&mut env, "account-short-budget.log", &[]).await;

    // Every hold and credit the account worker writes now fails with a serialization failure,
    // an error worth retrying, for longer than its retry budget, while its database answers.
    let account_dlq = Topics::dead_letters(&env.topics.account_commands());
    let tail = TopicTail::start(&env.kafka, account_dlq.clone())
        .await
        .unwrap();
    for statement in [
        "CREATE FUNCTION account.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'refused by the test' USING ERRCODE = '40001'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT ON account.holds \
         FOR EACH ROW EXECUTE FUNCTION account.refuse()",
        "CREATE TRIGGER refuse BEFORE INSERT ON account.credits \
         FOR EACH ROW EXECUTE FUNCTION account.refuse()",
    ] {
        sqlx::query(statement).execute(&pg).await.unwrap();
    }
    let stuck = request(a, b, "25", "USD");
    let transfer_id: Uuid = stuck.transfer_id.parse().unwrap();
    let watcher = env.watcher().await;
    env.request(&stuck).await;
    let mut dead: Vec<(Uuid, AccountAction)> = Vec::new();
    while dead.len() < 2 {
        let (envelope, message) = tokio::time::timeout(Duration::from_secs(30), tail.next())
            .await
            .expect("the prepare commands are dead-lettered once retries run out")
            .unwrap();
        let Message::Account(command) = message else {
            panic!("{message:?}")
        };
        assert_eq!(command.body.transfer_id, transfer_id);
        dead.push((envelope.id, command.action));
    }
    let mut actions: Vec<_> = dead.iter().map(|(_, a)| a.as_str()).collect();
    actions.sort();
    assert_eq!(actions, ["hold", "reserve_credit"]);
    let status: (String,) =
        sqlx::query_as("SELECT status FROM coordinator.transfers WHERE transfer_id = $1")
            .bind(transfer_id)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(status.0, "preparing");
    let listed = list(&env, "saga.commands.account", &[]).await;
    assert_eq!(listed.len(), 2, "{listed:#?}");
    for d in &listed {
        assert_eq!(d["error_class"], "retries_exhausted", "{d:#}");
        assert_eq!(d["worker"], "account", "{d:#}");
        assert!(d["attempts"].as_i64().unwrap() >= 2, "retried first: {d:#}");
        assert_eq!(d["original_topic"], env.topics.account_commands(), "{d:#}");
    }

    // The cause is fixed.
    sqlx::query("DROP FUNCTION account.refuse() CASCADE")
        .execute(&pg)
        .await
        .unwrap();
    let ids: Vec<String> = dead.iter().map(|(id, _)| id.to_string()).collect();
    let mut replay: Vec<&str> = vec!["dlq", "replay", "--topic", "saga.commands.account"];
    for id in &ids {
        replay.extend(["--message-id", id.as_str()]);
    }
    replay.extend(["--actor", "ops-tester"]);

    // A dry run prints what it would do and publishes nothing.
    let commands_before = high_watermark(&env, &env.topics.account_commands()).await;
    let mut dry = replay.clone();
    dry.push("--dry-run");
    let out = twophase_ok(&env, &dry).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines.iter().all(|l| l.starts_with("would replay ")),
        "{out}"
    );
    assert_eq!(
        high_watermark(&env, &env.topics.account_commands()).await,
        commands_before
    );
    let replays_topic = format!("{}{REPLAYS_TOPIC}", env.kafka.topic_prefix);
    assert_eq!(high_watermark(&env, &replays_topic).await, 0);

    // The replay completes the transfer.
    let out = twophase_ok(&env, &replay).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for id in &ids {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("replayed ") && l.contains(id.as_str())),
            "{out}"
        );
    }
    let outcome = common::outcome_of(&watcher, &stuck.transfer_id, Duration::from_secs(30)).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(a).await, (dec("65"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("35"), Decimal::ZERO));

    // What was re-published: the same message (id, key, bytes, trace context) without the
    // dlq-* headers, saying where it came from and who replayed it.
    let commands = twophase::dlq::read(&env.kafka, &env.topics.account_commands(), None)
        .await
        .unwrap();
    let originals: Vec<&DeadLetter> = commands
        .iter()
        .filter(|d| {
            d.message_id().is_some_and(|id| ids.contains(&id))
                && d.header(replay_headers::FROM).is_none()
        })
        .collect();
    let replayed: Vec<&DeadLetter> = commands
        .iter()
        .filter(|d| d.header(replay_headers::FROM).is_some())
        .collect();
    assert_eq!((originals.len(), replayed.len()), (2, 2));
    for r in &replayed {
        let original = originals
            .iter()
            .find(|o| o.message_id() == r.message_id())
            .unwrap();
        assert_eq!(r.key, original.key);
        assert_eq!(r.payload, original.payload);
        assert_eq!(r.header("traceparent"), original.header("traceparent"));
        assert!(r
            .header(replay_headers::FROM)
            .unwrap()
            .starts_with(&format!("{account_dlq}/")));
        assert_eq!(r.header(replay_headers::BY).as_deref(), Some("ops-tester"));
        assert!(r.header(replay_headers::AT).is_some());
        assert!(
            !r.headers.iter().any(|(k, _)| k.starts_with(b"dlq-")),
            "{:?}",
            r.headers
        );
    }
    let (hold_id,): (Uuid,) = sqlx::query_as(
        "SELECT message_id FROM account.processed_commands WHERE transfer_id = $1 AND action = 'hold'",
    )
    .bind(transfer_id)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(dead.contains(&(hold_id, AccountAction::Hold)));

    // Replayed again: the account worker answers with its stored votes, the coordinator sends
    // the outcome again for each, and nothing moves twice.
    let again = env.watcher().await;
    let out = twophase_ok(&env, &replay).await;
    assert_eq!(out.lines().count(), 2, "{out}");
    for _ in 0..2 {
        loop {
            let outcome = tokio::time::timeout(Duration::from_secs(30), again.next())
                .await
                .expect("each duplicate vote gets the outcome again");
            if let Outcome::Completed(c) = &outcome {
                if c.transfer_id == transfer_id {
                    break;
                }
            }
        }
    }
    assert_eq!(env.balance(a).await, (dec("65"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("35"), Decimal::ZERO));
    assert_eq!(
        high_watermark(&env, &account_dlq).await,
        2,
        "nothing failed again"
    );
    for dlq in [
        Topics::dead_letters(&env.topics.replies()),
        Topics::dead_letters(&env.topics.requests()),
    ] {
        assert_eq!(high_watermark(&env, &dlq).await, 0, "{dlq}");
    }

    // Each replay run, and only the real ones, is on record for the audit trail.
    let runs = twophase::dlq::read(&env.kafka, &replays_topic, None)
        .await
        .unwrap();
    assert_eq!(runs.len(), 2);
    for run in &runs {
        assert_eq!(run.header("ce_type").as_deref(), Some(REPLAY_RECORD_TYPE));
        let record: Value = serde_json::from_slice(run.payload.as_deref().unwrap()).unwrap();
        assert_eq!(record["who"], "ops-tester", "{record:#}");
        assert_eq!(record["dry_run"], false, "{record:#}");
        assert_eq!(record["dlq_topic"], account_dlq.as_str(), "{record:#}");
        assert!(record["when"].is_string(), "{record:#}");
        let recorded: HashSet<&str> = record["message_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            recorded,
            ids.iter().map(String::as_str).collect::<HashSet<_>>()
        );
    }
    env.check_invariants().await;
}

/// A database outage longer than the retry budget is waited out: the message is not set aside,
/// and its transfer completes once the database answers again.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_longer_than_the_retry_budget_dead_letters_nothing() {
    if !common::on_postgres("cuts a worker off PostgreSQL") {
        return;
    }
    let mut env = TestEnv::new("outage-budget").await;
    let upstream = PgConnectOptions::from_str(&env.database_url).unwrap();
    let upstream = format!("{}:{}", upstream.get_host(), upstream.get_port());
    let proxy = DbProxy::start(upstream).await;
    let log = "account-behind-proxy.log";
    let behind_proxy = proxy.url(&env.database_url);
    let vars = [("TWOPHASE_DATABASE_URL", behind_proxy.as_str())];
    let (_account, a, b) = with_a_short_budget(&mut env, log, &vars).await;

    // The account worker loses its database; its messages outlast their retry budget.
    proxy.cut();
    let watcher = env.watcher().await;
    let during = request(a, b, "25", "USD");
    env.request(&during).await;
    let waiting = "the database does not answer: the message waits for it";
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(env.log_dir.join(log)).unwrap();
        if text.matches(waiting).count() >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the account worker never found its budget spent with the database down:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.restore();

    let outcome = common::outcome_of(&watcher, &during.transfer_id, Duration::from_secs(60)).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(a).await, (dec("65"), Decimal::ZERO));
    let account_dlq = Topics::dead_letters(&env.topics.account_commands());
    assert_eq!(high_watermark(&env, &account_dlq).await, 0);
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_a_clear_sentence_and_nothing_is_published() {
    let env = TestEnv::new("dlqinput").await;
    let expect = |out: &Output, code: i32, says: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains(says), "expected {says:?} in: {stderr}");
    };
    let missing = Uuid::new_v4().to_string();

    let out = twophase(&env, &["dlq", "list", "--topic", "saga.replys"]).await;
    expect(&out, 3, "no dead-letter topic for \"saga.replys\"");
    let out = twophase(
        &env,
        &[
            "dlq",
            "list",
            "--topic",
            "saga.replies",
            "--since",
            "yesterday",
        ],
    )
    .await;
    expect(&out, 64, "is neither an RFC 3339 time");
    let out = twophase(
        &env,
        &["dlq", "list", "--topic", "saga.replies", "--limit", "0"],
    )
    .await;
    expect(&out, 64, "--limit");
    let out = twophase(
        &env,
        &[
            "dlq",
            "replay",
            "--topic",
            "saga.replies",
            "--message-id",
            " ",
            "--actor",
            "t",
        ],
    )
    .await;
    expect(&out, 64, "a message id is not empty");
    let out = twophase(
        &env,
        &[
            "dlq",
            "replay",
            "--topic",
            "saga.replies",
            "--message-id",
            &missing,
            "--actor",
            "t",
        ],
    )
    .await;
    expect(
        &out,
        3,
        &format!("no dead letter with message id {missing}"),
    );
    let out = twophase(
        &env,
        &[
            "dlq",
            "replay",
            "--topic",
            "saga.replies",
            "--since",
            "1h",
            "--until",
            "2h",
            "--actor",
            "t",
        ],
    )
    .await;
    expect(&out, 3, "is later than --until");
    let mut cmd = env.command();
    cmd.args(["dlq", "replay", "--topic", "saga.replies"])
        .env_remove("USER");
    let out = common::output(cmd).await;
    expect(&out, 3, "cannot tell who is replaying");

    // An empty dead-letter topic: an empty list, and a replay with nothing to do.
    assert!(list(&env, "saga.replies", &[]).await.is_empty());
    let out = twophase(
        &env,
        &["dlq", "replay", "--topic", "saga.replies", "--actor", "t"],
    )
    .await;
    expect(&out, 0, "nothing to replay");
    assert_eq!(high_watermark(&env, &env.topics.replies()).await, 0);

    // Brokers that cannot be reached are named.
    let out = twophase(&env, &["--brokers", "127.0.0.1:1", "topics", "create"]).await;
    expect(&out, 3, "reaching the Kafka brokers at 127.0.0.1:1");
}

/// A partition's messages that arrive together are applied in one transaction; when one of
/// them fails, none of that transaction stays, and each is applied again on its own: the good
/// ones exactly once, the bad one dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_message_in_a_batch_undoes_the_batch_and_each_is_applied_once_alone() {
    let mut env = TestEnv::new("batch").await;
    let a = env.open_account("USD", "100").await;
    let hold = |amount: &str| {
        let body = AccountCommandBody {
            transfer_id: Uuid::new_v4(),
            account_id: a,
            amount: dec(amount),
            currency: "USD".into(),
        };
        Outgoing::new(
            env.topics.account_commands(),
            a,
            "/test",
            &Message::Account(AccountCommand::new(AccountAction::Hold, body)),
        )
    };
    let capture_never_held = Outgoing::new(
        env.topics.account_commands(),
        a,
        "/test",
        &Message::Account(AccountCommand::new(
            AccountAction::Capture,
            AccountCommandBody {
                transfer_id: Uuid::new_v4(),
                account_id: a,
                amount: dec("1.00"),
                currency: "USD".into(),
            },
        )),
    );
    // All on account a's partition, in place before the worker starts, so that its first poll
    // takes them together.
    let batch = [hold("10.00"), capture_never_held.clone(), hold("20.00")];
    for message in &batch {
        env.publisher.publish(message).await.unwrap();
    }
    let dead = TopicTail::start(
        &env.kafka,
        Topics::dead_letters(&env.topics.account_commands()),
    )
    .await
    .unwrap();
    env.start("account");

    let (envelope, _) = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .expect("the capture is dead-lettered")
        .unwrap();
    assert_eq!(envelope.id, capture_never_held.envelope.id);
    env.wait_count(
        "SELECT count(*) FROM account.processed_commands",
        2,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        env.balance(a).await,
        (dec("100"), dec("30.00")),
        "each hold once"
    );
    let log = std::fs::read_to_string(env.log_dir.join("account-0.log")).unwrap();
    assert!(
        log.contains("one at a time"),
        "the batch was tried together first (logs in {})",
        env.log_dir.display()
    );
}

/// A broker that refuses a worker's replies is waited out, however long past the retry
/// budget: what the message did is committed, and the refusal is the broker's or its
/// settings' (a topic deleted, a permission taken away), not the message's. Here the outcome
/// topic refuses every record, as too old for it; nothing is dead-lettered, and the outcome
/// goes out once the topic takes records again.
#[tokio::test(flavor = "multi_thread")]
async fn replies_the_broker_refuses_are_waited_for_and_not_dead_lettered() {
    let mut env = TestEnv::new("refused").await;
    if env.embedded() {
        // The mock cluster has no topic settings to refuse records by.
        return;
    }
    let budget = [("TWOPHASE_RETRY__GIVE_UP_AFTER", "1s")];
    let port = env.start_serving("coordinator", &budget).await;
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let warm_up = env.transfer(&request(a, b, "10", "USD")).await;
    assert_outcome(&warm_up, "completed", None);

    // A record stamped even a millisecond before the broker reads it is refused
    // (INVALID_TIMESTAMP, which the producer does not retry); the producer lingers 2 ms.
    let events = env.topics.events();
    set_topic_config(&env, &events, &[("message.timestamp.before.max.ms", "0")]).await;
    let watcher = env.watcher().await;
    let refused = request(a, b, "5", "USD");
    env.request(&refused).await;
    // The ack that settles the transfer is retried well past its 1 s budget: by the 6th retry,
    // 3 s of backoff have passed.
    let replies = env.topics.replies();
    let replies_dlq = Topics::dead_letters(&replies);
    let labels = [("worker", "coordinator"), ("topic", replies.as_str())];
    let started = Instant::now();
    loop {
        let retries = common::metric(port, "twophase_handler_retries_total", &labels).await;
        assert_eq!(
            high_watermark(&env, &replies_dlq).await,
            0,
            "set aside after {retries:?} retries"
        );
        if retries.is_some_and(|n| n >= 6.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the refused outcome was not retried: {retries:?} (logs in {})",
            env.log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    set_topic_config(&env, &events, &[]).await;
    let outcome = common::outcome_of(&watcher, &refused.transfer_id, Duration::from_secs(60)).await;
    assert_outcome(&outcome, "completed", None);
    for topic in env.topics.all().iter().filter(|t| t.ends_with(".dlq")) {
        assert_eq!(high_watermark(&env, topic).await, 0, "{topic}");
    }
    assert_eq!(env.balance(b).await, (dec("15"), Decimal::ZERO));
}
