//! Every metric the shipped alert rules and dashboard use is exported by a running worker, with
//! the labels they select on, and `/healthz` says ready once a worker consumes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{request, TestEnv};
use twophase_messages::{reasons, Message, TransferRequested};
use twophase_runtime::Outgoing;

/// `GET path` on a worker's loopback port.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    common::http_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// Waits until `worker`'s `/healthz` on `port` says ready, for at most `within`.
async fn wait_ready(worker: &str, port: u16, within: Duration) {
    let started = Instant::now();
    loop {
        match get(port, "/healthz").await {
            Some((200, body)) => {
                assert!(body.contains("ready"), "{worker}: {body}");
                return;
            }
            other => assert!(
                started.elapsed() < within,
                "{worker} never became ready: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every `twophase_*` series name in a text, histogram suffixes folded into their base name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("twophase_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The series a scrape exports: name → the label sets seen.
fn exported(scrape: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.split_whitespace().next().unwrap_or_default();
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        for base in metric_names(name) {
            out.entry(base)
                .or_default()
                .push(labels.trim_end_matches('}').to_owned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_alerts_and_dashboard_use_is_exported_by_a_worker() {
    let mut env = TestEnv::new("metrics").await;
    let mut ports: Vec<(&str, u16)> = Vec::new();
    for worker in ["coordinator", "account", "risk"] {
        ports.push((worker, env.start_serving(worker, &[]).await));
    }
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let completed = request(a, b, "10", "USD");
    let mut malformed_id = request(a, b, "1", "USD");
    malformed_id.transfer_id = "not-a-uuid".into();
    let outcomes = env
        .run_transfers(
            &[
                completed.clone(),
                request(a, b, "1000", "USD"),
                request(a, a, "1", "USD"),
                malformed_id,
            ],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(outcomes.len(), 4);
    // Its id again for another amount: rejected, and stored as nothing.
    let conflict = TransferRequested {
        amount: "20".into(),
        ..completed
    };
    common::assert_outcome(
        &env.transfer(&conflict).await,
        "rejected",
        Some(reasons::CONFLICT),
    );

    // Ready once consuming: every worker has partitions and a database that answers.
    for (worker, port) in &ports {
        wait_ready(worker, *port, Duration::from_secs(30)).await;
    }

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let alerts = std::fs::read_to_string(format!("{root}/prometheus/alerts.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(format!("{root}/grafana/dashboards/twophase.json")).unwrap();
    let used: BTreeSet<String> = metric_names(&alerts)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(!used.is_empty());
    // The reconciler exports its own (tests/reconcile.rs); the saga workers export the rest.
    let elsewhere = [
        "twophase_reconciliation_discrepancies",
        "twophase_reconciled_through_timestamp_seconds",
    ];

    // Consumer lag comes with librdkafka's periodic statistics: scrape until it has arrived.
    let started = Instant::now();
    loop {
        let mut scraped: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (worker, port) in &ports {
            let (status, body) = get(*port, "/metrics").await.expect("/metrics answers");
            assert_eq!(status, 200, "{worker}");
            for (name, labels) in exported(&body) {
                scraped.entry(name).or_default().extend(labels);
            }
        }
        let missing: Vec<&String> = used
            .iter()
            .filter(|name| !scraped.contains_key(*name) && !elsewhere.contains(&name.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "used by alerts or dashboard but not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Each of this run's outcomes is counted, under the labels the alert ratios select on.
    // (Every series exists at 0 from the start: only a count shows that anything counted.)
    let port = |worker: &str| ports.iter().find(|(w, _)| *w == worker).unwrap().1;
    let outcomes = [
        ("completed", "none"),
        ("failed", reasons::INSUFFICIENT_FUNDS),
        ("rejected", reasons::SAME_ACCOUNT),
        ("rejected", reasons::INVALID_TRANSFER_ID),
        ("rejected", reasons::CONFLICT),
    ];
    let counts = outcomes
        .iter()
        .map(|&(status, reason)| {
            let labels = vec![("status", status), ("reason", reason)];
            ("coordinator", "twophase_transfers_total", labels)
        })
        .chain([(
            "risk",
            "twophase_risk_decisions_total",
            vec![("decision", "approved")],
        )]);
    for (worker, name, labels) in counts {
        let counted = common::metric(port(worker), name, &labels).await;
        assert!(
            counted.is_some_and(|n| n >= 1.0),
            "{name}{labels:?} is {counted:?} on the {worker}, after this run's outcomes"
        );
    }
}

/// A request that waited in the topic (a coordinator down, a backlog) shows its wait, from the
/// request's own time, in a histogram of its own; the transfer's duration, which alerts read,
/// counts on the coordinator's clock from when the request was read, whatever a producer's
/// clock says.
#[tokio::test(flavor = "multi_thread")]
async fn a_requests_wait_in_the_topic_is_measured_apart_from_the_transfers_duration() {
    let mut env = TestEnv::new("latency").await;
    let port = env.start_serving("coordinator", &[]).await;
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let waited = request(a, b, "10", "USD");
    let watcher = env.watcher().await;
    let mut outgoing = Outgoing::new(
        env.topics.requests(),
        &waited.transfer_id,
        "/test/latency",
        &Message::TransferRequested(waited.clone()),
    );
    outgoing.envelope.time -= chrono::TimeDelta::seconds(45);
    env.publisher.publish(&outgoing).await.unwrap();
    let outcome = common::outcome_of(&watcher, &waited.transfer_id, Duration::from_secs(60)).await;
    common::assert_outcome(&outcome, "completed", None);

    // Counted once the outcome is published: scrape until it is.
    let completed = [("status", "completed")];
    let started = Instant::now();
    while common::metric(port, "twophase_transfer_duration_seconds_count", &completed).await
        != Some(1.0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the completed transfer was never counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let duration = "twophase_transfer_duration_seconds_bucket";
    let wait = "twophase_request_wait_seconds_bucket";
    let within = |le| [("status", "completed"), ("le", le)];
    assert_eq!(
        common::metric(port, duration, &within("30")).await,
        Some(1.0)
    );
    for (le, requests) in [("30", 0.0), ("60", 1.0)] {
        let found = common::metric(port, wait, &[("le", le)]).await;
        assert_eq!(found, Some(requests), "requests that waited up to {le} s");
    }
}

/// The value of a series in a scrape (`name{labels}`), if exported.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Scrapes `port` until `series` has `expected`, or fails after 30 s with what it had.
async fn wait_for_value(port: u16, series: &str, expected: f64) {
    let started = Instant::now();
    loop {
        // Until the worker listens, there is no answer.
        let found = get(port, "/metrics")
            .await
            .and_then(|(_, body)| value(&body, series));
        if found == Some(expected) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{series} is {found:?}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An abort no participant acknowledges is as stuck as such a commit: the funds it would
/// release stay held.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_left_unacknowledged_counts_as_stuck() {
    let mut env = TestEnv::new("stuck-abort").await;
    env.with_config(
        "[coordinator]\nprepare_timeout = \"2s\"\nresend_after = \"200ms\"\n\
         commit_stuck_after_attempts = 2\n",
    );
    let port = env.start_serving("coordinator", &[]).await;
    // The account worker dies once its prepare is applied; no risk worker votes, so the
    // transfer times out and is aborted, and no one acknowledges the abort.
    env.start_with(
        "account",
        &[(twophase_runtime::failpoint::ENV, "account.after_commit")],
    );
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let watcher = env.watcher().await;
    let transfer = request(a, b, "10", "USD");
    env.request(&transfer).await;
    env.wait_failpoint("account", Duration::from_secs(60)).await;
    wait_for_value(port, r#"twophase_sagas_in_flight{status="aborting"}"#, 1.0).await;
    wait_for_value(port, "twophase_sagas_stuck", 1.0).await;
    // Ops find which transfer it is, and what it waits on.
    let listed = env
        .command()
        .args(["transfers", "stuck", "--json"])
        .output()
        .unwrap();
    assert_eq!(listed.status.code(), Some(1), "{listed:?}");
    let stuck: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let stuck = stuck.as_array().unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0]["transfer_id"], transfer.transfer_id);
    assert_eq!(stuck[0]["status"], "aborting");
    assert!(
        stuck[0]["awaiting"]
            .as_array()
            .unwrap()
            .contains(&"release".into()),
        "{stuck:?}"
    );
    assert!(stuck[0]["attempts"].as_i64() >= Some(2), "{stuck:?}");

    env.start("account");
    let outcome =
        common::outcome_of(&watcher, &transfer.transfer_id, Duration::from_secs(60)).await;
    common::assert_outcome(&outcome, "failed", Some("timeout"));
    wait_for_value(port, "twophase_sagas_stuck", 0.0).await;
    let listed = env.command().args(["transfers", "stuck"]).output().unwrap();
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "no transfer is stuck in commit or abort\n"
    );
    let zero = rust_decimal::Decimal::ZERO;
    assert_eq!(
        env.balance(a).await,
        (rust_decimal::Decimal::from(100), zero)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_in_flight_gauge_counts_a_transfer_waiting_for_its_votes() {
    let mut env = TestEnv::new("in-flight").await;
    let port = env.start_serving("coordinator", &[]).await;
    env.start("account");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    let watcher = env.watcher().await;
    let transfer = request(a, b, "10", "USD");
    env.request(&transfer).await;

    // No risk worker yet: the transfer waits for its vote.
    let preparing = r#"twophase_sagas_in_flight{status="preparing"}"#;
    wait_for_value(port, preparing, 1.0).await;

    env.start("risk");
    let outcome =
        common::outcome_of(&watcher, &transfer.transfer_id, Duration::from_secs(60)).await;
    common::assert_outcome(&outcome, "completed", None);
    wait_for_value(port, preparing, 0.0).await;
    for status in ["committing", "aborting"] {
        let series = format!(r#"twophase_sagas_in_flight{{status="{status}"}}"#);
        wait_for_value(port, &series, 0.0).await;
    }
}

/// With the cooperative protocol a rebalance names only the partitions it moves: a copy that
/// hands some of its partitions to a new one keeps the rest, and stays ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_keeps_partitions_through_a_cooperative_rebalance_stays_ready() {
    let mut env = TestEnv::new("cooperative").await;
    env.with_config(
        "[kafka.consumer_properties]\n\"partition.assignment.strategy\" = \"cooperative-sticky\"\n",
    );
    let first = env.start_serving("risk", &[]).await;
    wait_ready("the first risk worker", first, Duration::from_secs(30)).await;
    let second = env.start_serving("risk", &[]).await;
    // The second takes partitions only once the first has given them up.
    wait_ready("the second risk worker", second, Duration::from_secs(60)).await;
    wait_ready("the first risk worker", first, Duration::from_secs(10)).await;
}
