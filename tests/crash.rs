//! Crash safety: a worker dying at the worst moment loses no money and no transfer. Each test
//! arms a failpoint (`TWOPHASE_FAILPOINTS`) that makes a worker process SIGKILL itself at a named
//! point, restarts it, and ends with the invariants checked and every transfer terminal.

mod common;

use std::time::Duration;

use common::{assert_outcome, request, TestEnv};
use rust_decimal::Decimal;
use twophase::client::TopicTail;
use twophase_messages::{CommitStuck, Envelope, Message, TransferRequested};
use twophase_runtime::failpoint;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_between_decision_and_commit_finishes_the_commit_on_restart() {
    let mut env = TestEnv::new("crash-decision").await;
    env.start_with(
        "coordinator",
        &[(failpoint::ENV, "coordinator.after_decision")],
    );
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "25", "USD");
    let watcher = env.watcher().await;

    env.request(&req).await;
    env.wait_failpoint("coordinator", WAIT).await;
    // The decision is durable; nothing was captured yet and the funds are still held.
    let committing = "SELECT count(*) FROM coordinator.transfers WHERE status = 'committing'";
    assert_eq!(env.count(committing).await, 1);
    assert_eq!(env.balance(a).await, (dec("100"), dec("25")));

    env.start("coordinator");
    let outcome = common::outcome_of(&watcher, &req.transfer_id, WAIT).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(a).await, (dec("75"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("25"), Decimal::ZERO));
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_killed_between_its_commit_and_its_reply_answers_from_its_record() {
    let mut env = TestEnv::new("crash-reply").await;
    env.start("coordinator");
    env.start("risk");
    env.start_with("account", &[(failpoint::ENV, "account.after_commit")]);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "40", "USD");
    let watcher = env.watcher().await;

    env.request(&req).await;
    env.wait_failpoint("account", WAIT).await;
    // Its first command was applied and recorded (with the other prepare, when both arrived
    // on one partition together and were committed in one transaction), but no vote left.
    let recorded = env
        .count("SELECT count(*) FROM account.processed_commands")
        .await;
    assert!((1..=2).contains(&recorded), "{recorded} commands recorded");

    env.start("account");
    let outcome = common::outcome_of(&watcher, &req.transfer_id, WAIT).await;
    assert_outcome(&outcome, "completed", None);
    // Every command applied exactly once: hold, reserve, capture, credit.
    assert_eq!(
        env.count("SELECT count(*) FROM account.processed_commands")
            .await,
        4
    );
    assert_eq!(env.balance(a).await, (dec("60"), Decimal::ZERO));
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_after_publishing_but_before_its_offset_sends_duplicates_that_change_nothing(
) {
    let mut env = TestEnv::new("crash-offset").await;
    // Dies after its second publish: the prepare commands of the second request went out, and
    // the request will be delivered again.
    env.start_with(
        "coordinator",
        &[(failpoint::ENV, "coordinator.after_publish@2")],
    );
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let reqs = [request(a, b, "10", "USD"), request(a, b, "20", "USD")];
    let watcher = env.watcher().await;

    for r in &reqs {
        env.request(r).await;
    }
    env.wait_failpoint("coordinator", WAIT).await;
    env.start("coordinator");
    let ids = reqs.iter().map(|r| r.transfer_id.clone());
    let outcomes = watcher.wait_for(ids, WAIT).await.unwrap();
    for r in &reqs {
        assert_outcome(&outcomes[&r.transfer_id], "completed", None);
    }
    assert_eq!(env.balance(a).await, (dec("70"), Decimal::ZERO));
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vote_that_never_comes_times_out_even_across_a_coordinator_restart() {
    let mut env = TestEnv::new("crash-timeout").await;
    env.with_config("[coordinator]\nprepare_timeout = \"3s\"\n");
    // No risk worker: its vote never comes.
    env.start("coordinator");
    env.start("account");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "30", "USD");
    let watcher = env.watcher().await;

    env.request(&req).await;
    // Once the source is held, kill the coordinator: its timer must survive the restart.
    env.wait_count(
        "SELECT count(*) FROM account.holds WHERE status = 'held'",
        1,
        WAIT,
    )
    .await;
    env.kill("coordinator");
    env.start("coordinator");

    let outcome = common::outcome_of(&watcher, &req.transfer_id, WAIT).await;
    assert_outcome(&outcome, "failed", Some("timeout"));
    assert_eq!(env.balance(a).await, (dec("100"), Decimal::ZERO));
    env.check_invariants().await;
}

/// The coordinator's settings for a commit that sticks quickly.
const STUCK_QUICKLY: &str =
    "[coordinator]\ncommit_stuck_after_attempts = 2\nresend_after = \"500ms\"\n";

/// The account worker, dying on its third command: both prepares answered, the capture not.
fn start_an_account_worker_that_dies_before_the_capture(env: &mut TestEnv) {
    env.start_with("account", &[(failpoint::ENV, "account.after_commit@3")]);
}

/// Opens two accounts and sends a transfer between them; returns it, its destination and a
/// tail of the outcome topic once the account worker (started by
/// [`start_an_account_worker_that_dies_before_the_capture`]) has died before its capture.
async fn a_transfer_whose_capture_is_never_acknowledged(
    env: &mut TestEnv,
) -> (TransferRequested, Uuid, TopicTail) {
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "15", "USD");
    let events = TopicTail::start(&env.kafka, env.topics.events())
        .await
        .unwrap();
    env.request(&req).await;
    env.wait_failpoint("account", WAIT).await;
    (req, b, events)
}

/// The next `commit_stuck` event on `events`, which must be `transfer`'s.
async fn next_commit_stuck(events: &TopicTail, transfer: &str) -> (Envelope, CommitStuck) {
    loop {
        let (envelope, message) = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("a commit_stuck event")
            .unwrap();
        if let Message::CommitStuck(stuck) = message {
            assert_eq!(stuck.transfer_id.to_string(), transfer);
            assert!(!stuck.pending.is_empty());
            return (envelope, stuck);
        }
    }
}

/// Starts the account worker again, and checks that `req` then completes, crediting `to`.
async fn completes_once_the_account_worker_is_back(
    env: &mut TestEnv,
    req: &TransferRequested,
    to: Uuid,
) {
    let watcher = env.watcher().await;
    env.start("account");
    let outcome = common::outcome_of(&watcher, &req.transfer_id, WAIT).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(to).await, (dec(&req.amount), Decimal::ZERO));
    env.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_is_never_abandoned_and_a_stuck_one_raises_a_critical_event() {
    let mut env = TestEnv::new("crash-stuck").await;
    env.with_config(STUCK_QUICKLY);
    env.start("coordinator");
    env.start("risk");
    start_an_account_worker_that_dies_before_the_capture(&mut env);
    let (req, b, events) = a_transfer_whose_capture_is_never_acknowledged(&mut env).await;
    // The coordinator keeps re-sending and says so loudly.
    let (envelope, _) = next_commit_stuck(&events, &req.transfer_id).await;
    assert_eq!(
        envelope.correlation_id.as_deref(),
        Some(req.transfer_id.as_str())
    );
    let status = "SELECT count(*) FROM coordinator.transfers WHERE status = 'committing'";
    assert_eq!(
        env.count(status).await,
        1,
        "never aborted after the decision"
    );
    completes_once_the_account_worker_is_back(&mut env, &req, b).await;
}

/// The round of re-sends that makes a commit stuck is recorded, and the coordinator dies
/// before it publishes the `commit_stuck` event. The restarted coordinator publishes it with its
/// next re-send, and with each one after that under the same id, and counts each for the
/// critical alert.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_stuck_event_lost_to_a_crash_is_published_after_the_restart() {
    let mut env = TestEnv::new("crash-stuck-lost").await;
    env.with_config(STUCK_QUICKLY);
    // Its second round of re-sends is the one that crosses the threshold.
    env.start_with(
        "coordinator",
        &[(failpoint::ENV, "coordinator.timer_after_commit@2")],
    );
    env.start("risk");
    start_an_account_worker_that_dies_before_the_capture(&mut env);
    let (req, b, events) = a_transfer_whose_capture_is_never_acknowledged(&mut env).await;
    env.wait_failpoint("coordinator", WAIT).await;
    let committing = |attempts: &str| {
        format!(
            "SELECT count(*) FROM coordinator.transfers \
             WHERE status = 'committing' AND resend_attempts {attempts}"
        )
    };
    assert_eq!(
        env.count(&committing("= 2")).await,
        1,
        "the stuck round was recorded"
    );

    let port = env.start_serving("coordinator", &[]).await;
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let (envelope, stuck) = next_commit_stuck(&events, &req.transfer_id).await;
        assert_eq!(stuck.attempts, 2);
        ids.push(envelope.id);
    }
    assert_eq!(
        ids[0], ids[1],
        "a repeated commit_stuck event is the same message"
    );
    assert_eq!(env.count(&committing("> 2")).await, 1);
    // The critical alert's counter rises with each of those re-sends, in the new process too.
    let counted = common::metric(port, "twophase_commit_stuck_total", &[]).await;
    assert!(counted.is_some_and(|n| n >= 2.0), "{counted:?}");

    completes_once_the_account_worker_is_back(&mut env, &req, b).await;
}

/// Every participant votes yes while the coordinator is down for longer than the prepare
/// timeout. The restarted coordinator reads those votes before it aborts anything, so the
/// transfer completes rather than failing with `timeout` for the coordinator's own absence.
#[tokio::test(flavor = "multi_thread")]
async fn votes_that_came_while_the_coordinator_was_down_are_read_before_any_timeout() {
    let mut env = TestEnv::new("crash-votes-waiting").await;
    env.with_config("[coordinator]\nprepare_timeout = \"3s\"\n");
    // The coordinator dies once its prepare commands are out.
    env.start_with(
        "coordinator",
        &[(failpoint::ENV, "coordinator.after_publish")],
    );
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "30", "USD");
    let replies = TopicTail::start(&env.kafka, env.topics.replies())
        .await
        .unwrap();
    let watcher = env.watcher().await;

    let sent = tokio::time::Instant::now();
    env.request(&req).await;
    env.wait_failpoint("coordinator", WAIT).await;
    let mut votes = 0;
    while votes < 3 {
        let (_, message) = tokio::time::timeout(WAIT, replies.next())
            .await
            .expect("the participants vote")
            .unwrap();
        if matches!(message, Message::Vote(v) if v.transfer_id.to_string() == req.transfer_id) {
            votes += 1;
        }
    }
    // The downtime under test, not a wait for an event: the transfer's prepare deadline (3 s
    // after the coordinator read the request, which was after `sent`) passes with no
    // coordinator running.
    tokio::time::sleep_until(sent + Duration::from_secs(4)).await;

    env.start("coordinator");
    let outcome = common::outcome_of(&watcher, &req.transfer_id, WAIT).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(b).await, (dec("30"), Decimal::ZERO));
    env.check_invariants().await;
}

/// librdkafka's idempotent producer raises a fatal error when it can no longer keep the order
/// or the exactly-once delivery of what it sent, and then publishes nothing more. The account
/// worker whose producer raises one just after it committed its first command (the hold or the
/// credit reservation, whichever it took first) stops with the error rather than hold its
/// partitions and settle nothing; started again, it answers from its record.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_producer_hits_a_fatal_error_exits_and_its_restart_settles_the_transfer() {
    let mut env = TestEnv::new("crash-kafka-fatal").await;
    env.start("coordinator");
    env.start("risk");
    env.start_with("account", &[(failpoint::ENV, "account.kafka_fatal")]);
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let req = request(a, b, "40", "USD");
    let watcher = env.watcher().await;

    env.request(&req).await;
    // Exit 3, the command line's for an error, with the error said.
    assert_eq!(env.wait_exit("account", WAIT).await.code(), Some(3));
    let log = std::fs::read_to_string(env.log_dir.join("account-0.log")).unwrap();
    assert!(
        log.contains("error: the Kafka producer hit a fatal error"),
        "the account worker's log says why it stopped:\n{log}"
    );

    env.start("account");
    let outcome = common::outcome_of(&watcher, &req.transfer_id, WAIT).await;
    assert_outcome(&outcome, "completed", None);
    assert_eq!(env.balance(a).await, (dec("60"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("40"), Decimal::ZERO));
    env.check_invariants().await;
}
