//! The transfer saga end to end: workers as separate processes on a real Kafka broker and
//! PostgreSQL, each test on its own database and topics.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{assert_outcome, request, TestEnv};
use rand::Rng;
use rust_decimal::Decimal;
use twophase::client::{Outcome, TopicTail};
use twophase_messages::{
    reasons, AccountAction, AccountCommand, AccountCommandBody, Message, Participant, Topics,
    TransferRequested,
};
use twophase_runtime::Outgoing;
use uuid::Uuid;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_moves_money_once() {
    let mut env = TestEnv::new("happy").await;
    env.start_all(1);
    let a = env.open_account("USD", "100.00").await;
    let b = env.open_account("USD", "0").await;

    let outcome = env.transfer(&request(a, b, "12.34", "USD")).await;

    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(a).await, (dec("87.66"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("12.34"), Decimal::ZERO));
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_no_vote_fails_the_transfer_with_its_reason_and_moves_nothing() {
    let mut env = TestEnv::new("novote").await;
    let dest = env.open_account("USD", "0").await;
    let blocked = env.open_account("USD", "0").await;
    env.with_config(&format!(
        "[risk]\nvelocity_max_transfers = 3\nblocked_accounts = [\"{blocked}\"]\n\
         [risk.single_limit]\nUSD = \"1000\"\n[risk.daily_limit]\nUSD = \"500\"\n"
    ));
    env.start_all(1);

    let poor = env.open_account("USD", "5.00").await;
    let frozen_source = env.open_account("USD", "100").await;
    let frozen_dest = env.open_account("USD", "0").await;
    let euros = env.open_account("EUR", "100").await;
    for id in [frozen_source, frozen_dest] {
        let pool = env.pool("account").await;
        twophase_account::store::set_status(&pool, id, twophase_account::AccountStatus::Frozen)
            .await
            .unwrap();
    }
    let mut rich = Vec::new();
    for _ in 0..5 {
        rich.push(env.open_account("USD", "5000").await);
    }

    let cases: Vec<(TransferRequested, &str, &str)> = vec![
        (
            request(poor, dest, "10.00", "USD"),
            reasons::INSUFFICIENT_FUNDS,
            "source",
        ),
        (
            request(rich[0], Uuid::new_v4(), "10", "USD"),
            reasons::DESTINATION_NOT_FOUND,
            "destination",
        ),
        (
            request(rich[1], frozen_dest, "10", "USD"),
            reasons::DESTINATION_INACTIVE,
            "destination",
        ),
        (
            request(frozen_source, dest, "10", "USD"),
            reasons::SOURCE_INACTIVE,
            "source",
        ),
        (
            request(rich[2], euros, "10", "USD"),
            reasons::CURRENCY_MISMATCH,
            "destination",
        ),
        (
            request(euros, dest, "10", "USD"),
            reasons::CURRENCY_MISMATCH,
            "source",
        ),
        (
            request(rich[3], dest, "1500", "USD"),
            reasons::RISK_REJECTED,
            "risk",
        ),
        (
            request(rich[4], blocked, "10", "USD"),
            reasons::RISK_REJECTED,
            "risk",
        ),
    ];
    let requests: Vec<TransferRequested> = cases.iter().map(|c| c.0.clone()).collect();
    let outcomes = env.run_transfers(&requests, Duration::from_secs(60)).await;
    for (req, reason, participant) in &cases {
        let outcome = &outcomes[&req.transfer_id];
        assert_outcome(outcome, "failed", Some(reason));
        let Outcome::Failed(failed) = outcome else {
            unreachable!()
        };
        assert_eq!(
            failed.participant.map(|p| p.as_str()),
            Some(*participant),
            "{req:?}"
        );
    }
    let rules = |req: &TransferRequested| match &outcomes[&req.transfer_id] {
        Outcome::Failed(f) => f.risk.as_ref().unwrap().rules.clone(),
        other => panic!("{other:?}"),
    };
    assert!(rules(&cases[6].0).contains(&"single_transfer_limit".to_owned()));
    assert!(rules(&cases[7].0).contains(&"blocked_account".to_owned()));

    // Velocity: the fourth transfer within the window is refused. Daily: 300 + 300 > 500.
    let fast = env.open_account("USD", "100").await;
    let spender = env.open_account("USD", "1000").await;
    let mut burst: Vec<TransferRequested> =
        (0..4).map(|_| request(fast, dest, "1", "USD")).collect();
    burst.extend((0..2).map(|_| request(spender, dest, "300", "USD")));
    let outcomes = env.run_transfers(&burst, Duration::from_secs(60)).await;
    let refused_by =
        |outcomes: &HashMap<String, Outcome>, rule: &str, from: &[TransferRequested]| {
            from.iter()
                .filter(|r| match &outcomes[&r.transfer_id] {
                    Outcome::Failed(f) => f
                        .risk
                        .as_ref()
                        .is_some_and(|a| a.rules.iter().any(|x| x == rule)),
                    _ => false,
                })
                .count()
        };
    assert_eq!(
        refused_by(&outcomes, "velocity", &burst[..4]),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        refused_by(&outcomes, "daily_limit", &burst[4..]),
        1,
        "{outcomes:?}"
    );
    // Four evaluations are now stored in the window, more than the limit the count stops at:
    // the next ones are refused too.
    let later: Vec<TransferRequested> = (0..2).map(|_| request(fast, dest, "1", "USD")).collect();
    let outcomes = env.run_transfers(&later, Duration::from_secs(60)).await;
    assert_eq!(refused_by(&outcomes, "velocity", &later), 2, "{outcomes:?}");

    for (id, balance) in [
        (poor, "5"),
        (frozen_source, "100"),
        (euros, "100"),
        (rich[3], "5000"),
    ] {
        assert_eq!(env.balance(id).await, (dec(balance), Decimal::ZERO), "{id}");
    }
    assert_eq!(env.balance(fast).await, (dec("97"), Decimal::ZERO));
    assert_eq!(env.balance(spender).await, (dec("700"), Decimal::ZERO));
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_rejected_with_their_reason() {
    let mut env = TestEnv::new("rejects").await;
    env.with_config("[coordinator]\ndefault_max_amount = \"5000\"\n");
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;

    let mut malformed_id = request(a, b, "1", "USD");
    malformed_id.transfer_id = "not-a-uuid".into();
    let mut malformed_account = request(a, b, "1", "USD");
    malformed_account.from_account = "acct-42".into();
    let cases = vec![
        (request(a, b, "0", "USD"), reasons::INVALID_AMOUNT),
        (request(a, b, "-1.00", "USD"), reasons::INVALID_AMOUNT),
        (request(a, b, "ten", "USD"), reasons::INVALID_AMOUNT),
        (request(a, b, "1.001", "USD"), reasons::TOO_MANY_DECIMALS),
        (request(a, a, "1", "USD"), reasons::SAME_ACCOUNT),
        (request(a, b, "1", "XXY"), reasons::UNKNOWN_CURRENCY),
        (request(a, b, "5000.01", "USD"), reasons::AMOUNT_OVER_LIMIT),
        (malformed_id, reasons::INVALID_TRANSFER_ID),
        (malformed_account, reasons::INVALID_ACCOUNT_ID),
    ];
    let requests: Vec<_> = cases.iter().map(|c| c.0.clone()).collect();
    let outcomes = env.run_transfers(&requests, Duration::from_secs(60)).await;
    for (req, reason) in &cases {
        assert_outcome(&outcomes[&req.transfer_id], "rejected", Some(reason));
    }
    // Nothing was held or moved, and the workers are still serving.
    assert_eq!(env.balance(a).await, (dec("100"), Decimal::ZERO));
    let ok = env.transfer(&request(a, b, "1", "USD")).await;
    assert_outcome(&ok, "completed", None);
    env.check_invariants().await;
}

/// A rejection quotes what it refuses; a field of hundreds of kilobytes is quoted in part, so
/// that the rejection stays small enough to publish and its partition moves on.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_fields_are_rejected_with_a_short_quote_of_them() {
    let mut env = TestEnv::new("oversized").await;
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;

    // A record may be up to librdkafka's default of 1,000,000 bytes, key and headers included,
    // and a request carries its transfer id as its key and correlation id as well.
    let mut long_id = request(a, b, "1", "USD");
    long_id.transfer_id = "x".repeat(300_000);
    let echoed_id = format!("{}… (299744 more bytes)", "x".repeat(256));
    let mut long_amount = request(a, b, "1", "USD");
    long_amount.amount = format!("1.{}1", "0".repeat(900_000));
    let mut long_account = request(a, b, "1", "USD");
    long_account.to_account = "y".repeat(900_000);
    let mut long_currency = request(a, b, "1", "USD");
    long_currency.currency = "Z".repeat(900_000);
    let cases = [
        (
            &long_id,
            echoed_id.as_str(),
            reasons::INVALID_TRANSFER_ID,
            "transfer_id",
        ),
        (
            &long_amount,
            long_amount.transfer_id.as_str(),
            reasons::TOO_MANY_DECIMALS,
            "amount 1.000",
        ),
        (
            &long_account,
            long_account.transfer_id.as_str(),
            reasons::INVALID_ACCOUNT_ID,
            "to_account \"yyy",
        ),
        (
            &long_currency,
            long_currency.transfer_id.as_str(),
            reasons::UNKNOWN_CURRENCY,
            "currency \"ZZZ",
        ),
    ];
    let watcher = env.watcher().await;
    for (r, ..) in &cases {
        env.request(r).await;
    }
    let outcomes = watcher
        .wait_for(
            cases.iter().map(|(_, id, ..)| id.to_string()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes.len(),
        cases.len(),
        "logs in {}",
        env.log_dir.display()
    );
    for (_, id, reason, quote) in &cases {
        let Outcome::Rejected(rejected) = &outcomes[*id] else {
            panic!("{reason}: not a rejection");
        };
        assert_eq!(rejected.reason, *reason);
        assert!(
            rejected.detail.starts_with(quote)
                && rejected.detail.len() < 200
                && rejected.detail.contains(" more bytes)"),
            "{reason}: {}",
            rejected.detail
        );
    }
    let ok = env.transfer(&request(a, b, "1", "USD")).await;
    assert_outcome(&ok, "completed", None);
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_request_twice_is_one_transfer_and_a_changed_body_conflicts() {
    let mut env = TestEnv::new("idem").await;
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "10", "USD");

    let first = env.transfer(&req).await;
    assert_outcome(&first, "completed", None);
    // Published again: the outcome is published again, and nothing moves twice.
    let again = env.transfer(&req).await;
    assert_eq!(again, first);
    // The same ids spelled otherwise are the same request, and its outcome carries the
    // transfer id in lower case.
    let mut shouted = req.clone();
    shouted.transfer_id = req.transfer_id.to_uppercase();
    shouted.from_account = shouted.from_account.to_uppercase();
    let watcher = env.watcher().await;
    env.request(&shouted).await;
    let outcome = common::outcome_of(&watcher, &req.transfer_id, Duration::from_secs(60)).await;
    assert_eq!(outcome, first);
    let mut changed = req.clone();
    changed.amount = "20".into();
    let conflict = env.transfer(&changed).await;
    assert_outcome(&conflict, "rejected", Some(reasons::CONFLICT));

    assert_eq!(env.balance(a).await, (dec("90"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("10"), Decimal::ZERO));
    assert_eq!(
        env.count("SELECT count(*) FROM coordinator.transfers")
            .await,
        1
    );
    env.check_invariants().await;
}

/// Record headers, as a producer outside the project might set them.
fn headers(pairs: &[(&str, &str)]) -> rdkafka::message::OwnedHeaders {
    pairs
        .iter()
        .fold(rdkafka::message::OwnedHeaders::new(), |h, (key, value)| {
            h.insert(rdkafka::message::Header {
                key,
                value: Some(*value),
            })
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_on_the_outcome_topic_that_is_not_an_outcome_does_not_hide_the_next_one() {
    let mut env = TestEnv::new("foreign-event").await;
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let watcher = env.watcher().await;
    // What a newer coordinator might publish, and what a stray producer might.
    let id = Uuid::new_v4().to_string();
    let newer = headers(&[("ce_type", "twophase.transfer.settled"), ("ce_id", &id)]);
    for (payload, headers) in [(&b"{}"[..], newer), (&b"not JSON"[..], headers(&[]))] {
        env.publisher
            .send_raw(&env.topics.events(), None, payload, headers)
            .await
            .unwrap();
    }
    let transfer = request(a, b, "10", "USD");
    env.request(&transfer).await;
    let outcome =
        common::outcome_of(&watcher, &transfer.transfer_id, Duration::from_secs(60)).await;
    assert_outcome(&outcome, "completed", None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_cloudevents_id_is_not_a_uuid_is_settled() {
    let mut env = TestEnv::new("cloudevent-id").await;
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let watcher = env.watcher().await;
    // CloudEvents allows any non-empty string as an id.
    let transfer = request(a, b, "10", "USD");
    let cloud_event = headers(&[("ce_id", "order-42-evt"), ("ce_source", "/shop")]);
    env.publisher
        .send_raw(
            &env.topics.requests(),
            Some(transfer.transfer_id.as_bytes()),
            &serde_json::to_vec(&transfer).unwrap(),
            cloud_event,
        )
        .await
        .unwrap();
    let outcome =
        common::outcome_of(&watcher, &transfer.transfer_id, Duration::from_secs(60)).await;
    assert_outcome(&outcome, "completed", None);
}

/// Two requests under one malformed transfer_id are two requests, and so are two that conflict
/// with a transfer: each is rejected by an event of its own id, so that the audit log, which
/// keeps one message per id, keeps every rejection.
#[tokio::test(flavor = "multi_thread")]
async fn each_rejected_request_gets_an_event_of_its_own() {
    let mut env = TestEnv::new("rejected-twice").await;
    env.start("coordinator");
    let events = TopicTail::start(&env.kafka, env.topics.events())
        .await
        .unwrap();
    let mut malformed = request(Uuid::new_v4(), Uuid::new_v4(), "1", "USD");
    malformed.transfer_id = format!("order-{}", Uuid::new_v4().simple());
    let stored = request(Uuid::new_v4(), Uuid::new_v4(), "1", "USD");
    let conflicting = TransferRequested {
        amount: "2".into(),
        ..stored.clone()
    };
    for sent in [&malformed, &malformed, &stored, &conflicting, &conflicting] {
        env.request(sent).await;
    }
    let mut rejections: HashMap<String, Vec<Uuid>> = HashMap::new();
    while rejections.values().map(Vec::len).sum::<usize>() < 4 {
        let (envelope, message) = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("every request is answered")
            .unwrap();
        if let Message::TransferRejected(rejected) = message {
            rejections
                .entry(rejected.transfer_id)
                .or_default()
                .push(envelope.id);
        }
    }
    for transfer_id in [&malformed.transfer_id, &stored.transfer_id] {
        let ids = &rejections[transfer_id];
        assert_eq!(ids.len(), 2, "{transfer_id}: {rejections:?}");
        assert_ne!(ids[0], ids[1], "{transfer_id}");
    }
}

/// `twophase transfer --wait` waits for the answer to its own request: another request that
/// reuses its transfer id with another body meanwhile is answered with a `conflict`, and that
/// answer is not taken for this transfer's outcome.
#[tokio::test(flavor = "multi_thread")]
async fn transfer_wait_is_not_answered_by_a_conflict_someone_else_caused() {
    let mut env = TestEnv::new("cli-conflict").await;
    env.start("coordinator");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let id = Uuid::new_v4().to_string();
    let transfer = |amount: &str| {
        let mut cmd = env.command();
        cmd.args(["transfer", "--id", &id, "--from", &a.to_string(), "--to"])
            .args([&b.to_string(), "--amount", amount, "--currency", "USD"])
            .args(["--wait", "--timeout", "60s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    // The first request is stored, and waits for account and risk workers, none running yet.
    let first = transfer("10").spawn().unwrap();
    env.wait_count(
        "SELECT count(*) FROM coordinator.transfers",
        1,
        Duration::from_secs(30),
    )
    .await;
    let second = transfer("20").output().unwrap();
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    let said = String::from_utf8_lossy(&second.stdout);
    assert!(said.contains("reason conflict"), "{said}");

    env.start("account");
    env.start("risk");
    let first = first.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&first.stdout);
    assert_eq!(first.status.code(), Some(0), "{said}");
    assert!(
        said.starts_with(&format!("completed  transfer {id}  10.00 USD")),
        "{said}"
    );
}

/// A producer's `correlation-id` rides on every message of its transfer, those the timer sends
/// included, and the transfer stays one trace whatever its correlation id is.
#[tokio::test(flavor = "multi_thread")]
async fn a_producers_correlation_id_rides_on_the_timers_messages_in_the_transfers_trace() {
    let mut env = TestEnv::new("correlation").await;
    // No account worker answers: the prepare times out, and the timer sends the abort.
    env.with_config("[coordinator]\nprepare_timeout = \"1s\"\n");
    env.start("coordinator");
    let commands = TopicTail::start(&env.kafka, env.topics.account_commands())
        .await
        .unwrap();
    let transfer = request(Uuid::new_v4(), Uuid::new_v4(), "1", "USD");
    let mut sent = Outgoing::new(
        env.topics.requests(),
        &transfer.transfer_id,
        "/shop",
        &Message::TransferRequested(transfer.clone()),
    );
    sent.envelope.correlation_id = Some("order-42".to_owned());
    sent.envelope.traceparent = None;
    sent.envelope.tracestate = None;
    env.publisher.publish(&sent).await.unwrap();

    let trace = Uuid::parse_str(&transfer.transfer_id)
        .unwrap()
        .simple()
        .to_string();
    let mut seen = Vec::new();
    while !seen.contains(&AccountAction::Release) {
        let (envelope, message) = tokio::time::timeout(Duration::from_secs(60), commands.next())
            .await
            .expect("the hold, then its release after the timeout")
            .unwrap();
        let Message::Account(command) = message else {
            panic!("{message:?}");
        };
        assert_eq!(
            envelope.correlation_id.as_deref(),
            Some("order-42"),
            "{:?}",
            command.action
        );
        let traceparent = envelope.traceparent.as_deref().unwrap_or_default();
        assert_eq!(
            twophase_runtime::telemetry::trace_id_of(traceparent).as_deref(),
            Some(trace.as_str()),
            "{:?}",
            command.action
        );
        seen.push(command.action);
    }
    assert!(seen.contains(&AccountAction::Hold), "{seen:?}");
}

/// A request without `ce_time` is answered with its record's own Kafka time, so that an answer
/// published again after a redelivery is the same message, as the audit store dates it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_ce_time_is_answered_with_its_record_time() {
    let mut env = TestEnv::new("record-time").await;
    env.start("coordinator");
    let watcher = env.watcher().await;
    let producer: rdkafka::producer::FutureProducer =
        twophase_runtime::kafka::client_config(&env.kafka)
            .create()
            .unwrap();
    let transfer_id = format!("order-{}", Uuid::new_v4().simple());
    let payload = serde_json::json!({
        "transfer_id": transfer_id,
        "from_account": Uuid::new_v4().to_string(),
        "to_account": Uuid::new_v4().to_string(),
        "amount": "1",
        "currency": "USD",
    })
    .to_string();
    let written: chrono::DateTime<chrono::Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
    let topic = env.topics.requests();
    let record = rdkafka::producer::FutureRecord::to(&topic)
        .key(&transfer_id)
        .payload(&payload)
        .timestamp(written.timestamp_millis());
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let outcome = common::outcome_of(&watcher, &transfer_id, Duration::from_secs(60)).await;
    let Outcome::Rejected(rejected) = &outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(rejected.reason, reasons::INVALID_TRANSFER_ID);
    assert_eq!(rejected.rejected_at, written);
}

/// PostgreSQL's text and jsonb cannot hold a NUL; a request carrying one, in a free-text field,
/// a malformed field, its `tracestate` or its `correlation-id`, still gets its outcome.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_a_nul_in_it_gets_its_outcome() {
    let mut env = TestEnv::new("nul").await;
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let mut in_reference = request(a, b, "1", "USD");
    in_reference.reference = Some("invoice\u{0}42".into());
    let mut in_account = request(a, b, "1", "USD");
    in_account.to_account = format!("{b}\u{0}");
    let in_tracestate = request(a, b, "1", "USD");
    let in_correlation_id = request(a, b, "1", "USD");
    let watcher = env.watcher().await;
    env.request(&in_reference).await;
    env.request(&in_account).await;
    for (r, header) in [
        (&in_tracestate, ("tracestate", "vendor=a\u{0}b")),
        (&in_correlation_id, ("correlation-id", "order\u{0}7")),
    ] {
        env.publisher
            .send_raw(
                &env.topics.requests(),
                Some(r.transfer_id.as_bytes()),
                &serde_json::to_vec(r).unwrap(),
                headers(&[header]),
            )
            .await
            .unwrap();
    }
    let ids = [
        &in_reference,
        &in_account,
        &in_tracestate,
        &in_correlation_id,
    ]
    .map(|r| r.transfer_id.clone());
    let outcomes = watcher
        .wait_for(ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 4, "logs in {}", env.log_dir.display());
    assert_outcome(&outcomes[&in_reference.transfer_id], "completed", None);
    assert_outcome(
        &outcomes[&in_account.transfer_id],
        "rejected",
        Some(reasons::INVALID_ACCOUNT_ID),
    );
    assert_outcome(&outcomes[&in_tracestate.transfer_id], "completed", None);
    assert_outcome(&outcomes[&in_correlation_id.transfer_id], "completed", None);
    // The same request again is the same transfer: its fingerprint is of what was sent.
    let again = env.transfer(&in_reference).await;
    assert_eq!(again, outcomes[&in_reference.transfer_id]);
    assert_eq!(env.balance(b).await, (dec("3"), Decimal::ZERO));
}

/// Publishes an account command by hand and waits for the worker's reply to it.
async fn send_command(
    env: &TestEnv,
    replies: &TopicTail,
    action: AccountAction,
    body: &AccountCommandBody,
) -> Message {
    let message = Message::Account(AccountCommand::new(action, body.clone()));
    let out = Outgoing::new(
        env.topics.account_commands(),
        body.account_id,
        "/test",
        &message,
    );
    env.publisher.publish(&out).await.unwrap();
    loop {
        let (envelope, reply) = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await
            .expect("the account worker replies")
            .unwrap();
        if envelope.causation_id == Some(out.envelope.id) {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_delivered_twice_is_applied_once() {
    let mut env = TestEnv::new("dupcmd").await;
    env.start("account");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let replies = TopicTail::start(&env.kafka, env.topics.replies())
        .await
        .unwrap();
    let body = |account_id| AccountCommandBody {
        transfer_id: Uuid::from_u128(42),
        account_id,
        amount: dec("30"),
        currency: "USD".into(),
    };

    // Prepare twice: one hold.
    let first = send_command(&env, &replies, AccountAction::Hold, &body(a)).await;
    let second = send_command(&env, &replies, AccountAction::Hold, &body(a)).await;
    assert_eq!(first, second, "a redelivered command gets the stored reply");
    assert_eq!(env.balance(a).await, (dec("100"), dec("30")));
    send_command(&env, &replies, AccountAction::ReserveCredit, &body(b)).await;

    // Commit twice: one debit, one credit.
    for _ in 0..2 {
        send_command(&env, &replies, AccountAction::Capture, &body(a)).await;
        send_command(&env, &replies, AccountAction::Credit, &body(b)).await;
    }
    assert_eq!(env.balance(a).await, (dec("70"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("30"), Decimal::ZERO));
    let entries = env
        .count("SELECT count(*) FROM account.ledger WHERE transfer_id IS NOT NULL")
        .await;
    assert_eq!(entries, 2);

    // An abort that overtakes its prepare is recorded, and the late prepare is refused.
    let late = AccountCommandBody {
        transfer_id: Uuid::from_u128(43),
        ..body(a)
    };
    send_command(&env, &replies, AccountAction::Release, &late).await;
    let vote = send_command(&env, &replies, AccountAction::Hold, &late).await;
    let Message::Vote(vote) = vote else {
        panic!("{vote:?}")
    };
    assert_eq!(vote.reason.as_deref(), Some(reasons::ABORTED));
    assert_eq!(env.balance(a).await, (dec("70"), Decimal::ZERO));

    // A commit naming another currency than its prepare is not one the coordinator sent: it
    // is set aside, and nothing is debited.
    let held = AccountCommandBody {
        transfer_id: Uuid::from_u128(44),
        ..body(a)
    };
    send_command(&env, &replies, AccountAction::Hold, &held).await;
    let dead_letters = TopicTail::start(
        &env.kafka,
        Topics::dead_letters(&env.topics.account_commands()),
    )
    .await
    .unwrap();
    let in_euros = AccountCommandBody {
        currency: "EUR".into(),
        ..held
    };
    let capture = Message::Account(AccountCommand::new(AccountAction::Capture, in_euros));
    let out = Outgoing::new(env.topics.account_commands(), a, "/test", &capture);
    env.publisher.publish(&out).await.unwrap();
    let (envelope, _) = tokio::time::timeout(Duration::from_secs(30), dead_letters.next())
        .await
        .expect("the capture in euros is dead-lettered")
        .unwrap();
    assert_eq!(envelope.id, out.envelope.id);
    assert_eq!(env.balance(a).await, (dec("70"), dec("30")));
}

/// An operator whose deposit's answer never came runs it again: under its reference it is made
/// once, and the reference cannot name another amount.
#[tokio::test(flavor = "multi_thread")]
async fn a_deposit_run_again_under_its_reference_is_made_once() {
    let env = TestEnv::new("deposit-reference").await;
    let a = env.open_account("USD", "0").await;
    let run = |args: &[&str]| env.command().arg("accounts").args(args).output().unwrap();
    let account = a.to_string();
    let deposit = [
        "deposit",
        account.as_str(),
        "10.00",
        "--reference",
        "wire-1",
    ];
    let first = run(&deposit);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    assert!(first.stderr.is_empty(), "{first:?}");
    let again = run(&deposit);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert_eq!(again.stdout, first.stdout);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.starts_with("already made under this reference (ledger entry "),
        "{said}"
    );
    assert_eq!(env.balance(a).await, (dec("10.00"), Decimal::ZERO));

    let other = run(&["deposit", &account, "20.00", "--reference", "wire-1"]);
    assert_eq!(other.status.code(), Some(2), "{other:?}");
    let said = String::from_utf8_lossy(&other.stderr);
    assert!(
        said.contains(&format!(
            "reference \"wire-1\" was used on account {a} for a deposit of 10.00"
        )),
        "{said}"
    );
    // A reference is an identifier, not any text.
    let long = "r".repeat(257);
    for bad in ["", "wire\n2", long.as_str()] {
        let out = run(&["deposit", &account, "1.00", "--reference", bad]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("a reference is 1 to 256 bytes of text without control characters"),
            "{bad:?}: {said}"
        );
    }
    // A withdrawal is another movement, under its own references.
    let out = run(&["withdraw", &account, "4.00", "--reference", "wire-1"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(env.balance(a).await, (dec("6.00"), Decimal::ZERO));
    let entries = env
        .count("SELECT count(*) FROM account.ledger WHERE reference = 'wire-1'")
        .await;
    assert_eq!(entries, 2);
}

/// What an account refuses exits 2, apart from a command that failed itself (3), so that a
/// script can tell a refusal from an outage; amounts show their currency's decimals; and a
/// closed account stays closed.
#[tokio::test(flavor = "multi_thread")]
async fn an_account_command_the_account_refuses_exits_2_and_a_closed_account_stays_closed() {
    let env = TestEnv::new("account-refusals").await;
    let a = env.open_account("USD", "5").await;
    let b = env.open_account("EUR", "0").await;
    let run = |args: &[&str]| {
        let out = env.command().arg("accounts").args(args).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            said,
        )
    };
    let (a_id, b_id, nobody) = (a.to_string(), b.to_string(), Uuid::new_v4().to_string());

    let (code, shown, _) = run(&["show", &b_id]);
    assert_eq!(code, Some(0));
    assert!(
        shown.contains("balance 0.00  held 0.00  available 0.00"),
        "{shown}"
    );

    for (args, refusal) in [
        (
            ["withdraw", a_id.as_str(), "6.00"],
            "available, less than 6.00".to_owned(),
        ),
        (
            ["deposit", nobody.as_str(), "1.00"],
            format!("account {nobody} does not exist"),
        ),
        (
            ["deposit", a_id.as_str(), "1.001"],
            "has more decimals than USD allows".to_owned(),
        ),
        // Refused by the account's rules, not taken for a flag.
        (
            ["withdraw", a_id.as_str(), "-5.00"],
            "must be greater than zero".to_owned(),
        ),
    ] {
        let (code, _, said) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {said}");
        assert!(said.contains(&refusal), "{args:?}: {said}");
    }
    let (code, _, said) = run(&["close", &a_id]);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("cannot be closed"), "{said}");

    let (code, shown, _) = run(&["close", &b_id]);
    assert_eq!(code, Some(0));
    assert!(shown.contains(" closed "), "{shown}");
    for reopen in ["unfreeze", "freeze"] {
        let (code, _, said) = run(&[reopen, &b_id]);
        assert_eq!(code, Some(2), "{reopen}: {said}");
        assert!(
            said.contains(&format!("account {b} is closed for good")),
            "{reopen}: {said}"
        );
    }
    let (code, shown, _) = run(&["show", &b_id]);
    assert_eq!(code, Some(0));
    assert!(shown.contains(" closed "), "{shown}");
}

/// A velocity window longer than the calendar reaches back to the Unix epoch; it panicked the
/// risk worker on its first message.
#[tokio::test(flavor = "multi_thread")]
async fn a_velocity_window_longer_than_the_calendar_counts_from_the_epoch() {
    let mut env = TestEnv::new("long-window").await;
    env.with_config("[risk]\nvelocity_window = \"1000000years\"\n");
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let done = env.transfer(&request(a, b, "1", "USD")).await;
    assert_outcome(&done, "completed", None);
}

/// A balance takes an amount only exactly: one that would pass the largest decimal, or need
/// rounding to fit, is voted down at prepare, and a deposit or withdrawal refused, so that no
/// credit or debit can fail or round after the decision.
#[tokio::test(flavor = "multi_thread")]
async fn an_amount_a_balance_cannot_take_exactly_fails_the_transfer_and_moves_nothing() {
    let mut env = TestEnv::new("balance-limit").await;
    env.start_all(1);
    let largest = "79228162514264337593543950335";
    let small = env.open_account("JPY", "10").await;
    let full = env.open_account("JPY", largest).await;
    // A whole-number balance this large has no room left for cents.
    let whole = env.open_account("USD", largest).await;
    let empty = env.open_account("USD", "0").await;
    let credit_past_the_largest = request(small, full, "1", "JPY");
    let debit_needing_rounding = request(whole, empty, "0.01", "USD");
    let requests = [
        credit_past_the_largest.clone(),
        debit_needing_rounding.clone(),
    ];
    let outcomes = env.run_transfers(&requests, Duration::from_secs(60)).await;
    for (r, participant) in [
        (&credit_past_the_largest, Participant::Destination),
        (&debit_needing_rounding, Participant::Source),
    ] {
        let Outcome::Failed(failed) = &outcomes[&r.transfer_id] else {
            panic!("{:?}", outcomes[&r.transfer_id]);
        };
        assert_eq!(failed.reason, reasons::BALANCE_LIMIT);
        assert_eq!(failed.participant, Some(participant));
    }
    assert_eq!(env.balance(small).await, (dec("10"), Decimal::ZERO));
    assert_eq!(env.balance(full).await, (dec(largest), Decimal::ZERO));
    assert_eq!(env.balance(whole).await, (dec(largest), Decimal::ZERO));

    // An ordinary balance takes ordinary amounts, whatever their decimals: after a capture
    // leaves 0.00 held, a hold of 100 (no decimals) is exact.
    let (payer, payee) = (
        env.open_account("USD", "500").await,
        env.open_account("USD", "0").await,
    );
    for amount in ["12.34", "100"] {
        let done = env.transfer(&request(payer, payee, amount, "USD")).await;
        assert_outcome(&done, "completed", None);
    }
    assert_eq!(env.balance(payee).await, (dec("112.34"), Decimal::ZERO));

    // Nor does an operator's deposit or withdrawal round: the whole-number balance would keep
    // its value while the ledger recorded 0.49 gone.
    let db = env.pool("account").await;
    let refused = [
        twophase_account::store::deposit(&db, full, "1", None).await,
        twophase_account::store::withdraw(&db, whole, "0.49", None).await,
    ];
    db.close().await;
    for refused in refused {
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("would pass the largest amount")),
            "{refused:?}"
        );
    }
    assert_eq!(env.balance(full).await, (dec(largest), Decimal::ZERO));
    assert_eq!(env.balance(whole).await, (dec(largest), Decimal::ZERO));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_transfers_racing_for_one_balance_complete_exactly_one() {
    let mut env = TestEnv::new("race").await;
    env.start_all(1);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let c = env.open_account("USD", "0").await;
    let racers = [request(a, b, "70", "USD"), request(a, c, "70", "USD")];

    let outcomes = env.run_transfers(&racers, Duration::from_secs(60)).await;

    let mut statuses: Vec<_> = outcomes
        .values()
        .map(|o| (o.status(), o.reason()))
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![
            ("completed", None),
            ("failed", Some(reasons::INSUFFICIENT_FUNDS))
        ]
    );
    assert_eq!(env.balance(a).await, (dec("30"), Decimal::ZERO));
    env.check_invariants().await;
}

/// Which members of a consumer group hold partitions, read from the broker.
fn members_with_partitions(env: &TestEnv, group: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = twophase_runtime::kafka::client_config(&env.kafka)
        .create()
        .unwrap();
    let groups = client
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .unwrap();
    groups
        .groups()
        .iter()
        .flat_map(|g| g.members())
        .filter(|m| m.assignment().is_some_and(|a| assigned_partitions(a) > 0))
        .count()
}

/// Counts the partitions in a consumer-protocol member assignment.
fn assigned_partitions(bytes: &[u8]) -> usize {
    let i16_at = |at: usize| i16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
    let i32_at = |at: usize| i32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    if bytes.len() < 6 {
        return 0;
    }
    let topics = i32_at(2);
    let (mut at, mut count) = (6, 0);
    for _ in 0..topics {
        at += 2 + i16_at(at);
        let n = i32_at(at);
        count += n;
        at += 4 + 4 * n;
    }
    count
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_random_transfers_with_two_account_workers_keep_every_invariant() {
    let mut env = TestEnv::new("thousand").await;
    // Each account sends about fifty transfers in a burst: not what the velocity rule is for.
    env.with_config("[risk]\nvelocity_max_transfers = 1000\n");
    env.start_all(2);
    let mut accounts = Vec::new();
    for _ in 0..20 {
        accounts.push(env.open_account("USD", "2000.00").await);
    }
    let group = format!("{}-account", env.kafka.group_prefix);
    let joined = Instant::now();
    // The mock cluster of the embedded default does not describe groups; the real broker does.
    while !env.embedded() && members_with_partitions(&env, &group) < 2 {
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "both account workers take partitions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut rng = rand::rng();
    let requests: Vec<TransferRequested> = (0..1000)
        .map(|_| {
            let from = accounts[rng.random_range(0..accounts.len())];
            let mut to = from;
            while to == from {
                to = accounts[rng.random_range(0..accounts.len())];
            }
            let cents: i64 = rng.random_range(1..20_000);
            request(from, to, &Decimal::new(cents, 2).to_string(), "USD")
        })
        .collect();
    let started = Instant::now();
    let outcomes = env.run_transfers(&requests, Duration::from_secs(600)).await;
    let wall = started.elapsed();
    let mut by_status: HashMap<&str, usize> = HashMap::new();
    for o in outcomes.values() {
        *by_status.entry(o.status()).or_default() += 1;
    }
    eprintln!("1000 transfers, 20 accounts, 2 account workers: {wall:.2?} wall time, outcomes {by_status:?}");
    println!("1000 random transfers settled in {wall:.2?}");

    // What producers were told matches what the coordinator recorded.
    let mut tx = env.db.begin().await.unwrap();
    let rows = twophase_runtime::query_as!(
        &mut tx,
        (Uuid, String),
        fetch_all,
        "SELECT transfer_id, status FROM coordinator.transfers"
    )
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(rows.len(), 1000);
    for (id, status) in rows {
        assert_eq!(outcomes[&id.to_string()].status(), status, "transfer {id}");
    }
    assert!(by_status.get("completed").copied().unwrap_or(0) > 0);
    env.check_invariants().await;
}

/// `twophase bench` against running workers: a short closed loop settles what it sends, finds
/// invariants 1–4 holding, and, on a real broker, measures the ceiling reference, each part of
/// it above zero (the embedded broker cannot create the ceiling's topics).
#[tokio::test(flavor = "multi_thread")]
async fn a_short_bench_settles_its_load_keeps_the_invariants_and_measures_a_ceiling() {
    let mut env = TestEnv::new("bench").await;
    env.start_all(1);
    // Once one transfer is settled the workers hold their partitions: the loop measures them,
    // not their start.
    let a = env.open_account("USD", "10").await;
    let b = env.open_account("USD", "0").await;
    assert_outcome(
        &env.transfer(&request(a, b, "1", "USD")).await,
        "completed",
        None,
    );
    let json = env.log_dir.join("bench.json");
    let mut cmd = env.command();
    cmd.args([
        "bench",
        "--concurrency",
        "8",
        "--warmup",
        "1s",
        "--duration",
        "2s",
    ])
    .args(["--accounts", "20", "--json"])
    .arg(&json);
    if !env.embedded() {
        cmd.arg("--ceiling");
    }
    let out = common::output(cmd).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(results["transfers"].as_u64() > Some(0), "{results:#}");
    assert!(
        results["completed_per_second"].as_f64() > Some(0.0),
        "{results:#}"
    );
    let invariants = &results["invariants"];
    assert_eq!(
        invariants["violations"],
        serde_json::json!([]),
        "{results:#}"
    );
    assert!(invariants["transfers"].as_u64() >= results["transfers"].as_u64());
    if env.embedded() {
        return;
    }
    let ceiling = &results["ceiling"];
    for figure in [
        "broker_transfers_per_second",
        "database_rows_per_second",
        "database_transfers_per_second",
        "share_of_broker",
        "share_of_database",
    ] {
        assert!(
            ceiling[figure].as_f64() > Some(0.0),
            "{figure}: {results:#}"
        );
    }
}
