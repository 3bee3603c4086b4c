//! PostgreSQL stopped for a few seconds under running workers: transient failures are retried,
//! never dead-lettered, and every transfer completes once the database is back.
//!
//! This stops the shared PostgreSQL server, so it is the only test in its binary: cargo runs
//! test binaries one after another, so no other test of this suite runs meanwhile.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_outcome, request, TestEnv};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rust_decimal::Decimal;
use twophase_messages::TransferRequested;

/// How long PostgreSQL stays down.
const OUTAGE: Duration = Duration::from_secs(12);

fn postgres_script(action: &str) -> Result<(), String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres.sh");
    let out = Command::new(&script)
        .arg(action)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/postgres.sh {action} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// PostgreSQL stopped; started again when dropped, even if the test fails.
struct PostgresDown {
    restarted: bool,
}

impl PostgresDown {
    fn stop() -> PostgresDown {
        postgres_script("stop").expect("PostgreSQL stops");
        PostgresDown { restarted: false }
    }

    fn restart(mut self) {
        self.restarted = true;
        postgres_script("start").expect("PostgreSQL starts again");
    }
}

impl Drop for PostgresDown {
    fn drop(&mut self) {
        if !self.restarted {
            if let Err(e) = postgres_script("start") {
                eprintln!("could not restart PostgreSQL after the test: {e}");
            }
        }
    }
}

/// The sum of the high watermarks of a topic's partitions.
fn high_watermark(env: &TestEnv, topic: &str) -> i64 {
    let client: BaseConsumer = twophase_runtime::kafka::client_config(&env.kafka)
        .create()
        .unwrap();
    let timeout = Duration::from_secs(10);
    let metadata = client.fetch_metadata(Some(topic), timeout).unwrap();
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(!partitions.is_empty(), "{topic} exists");
    partitions
        .into_iter()
        .map(|p| client.fetch_watermarks(topic, p, timeout).unwrap().1)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_published_while_postgres_is_down_complete_after_it_returns_and_none_is_dead_lettered(
) {
    if !common::on_postgres("stops PostgreSQL") {
        return;
    }
    let mut env = TestEnv::new("outage").await;
    let port = env.start_serving("coordinator", &[]).await;
    env.start("account");
    env.start("risk");
    let a = env.open_account("USD", "100").await;
    let b = env.open_account("USD", "0").await;
    // Every worker is up and has its database connections before the outage.
    let warm_up = env.transfer(&request(a, b, "1", "USD")).await;
    assert_outcome(&warm_up, "completed", None);

    let watcher = env.watcher().await;
    let down = PostgresDown::stop();
    let stopped = Instant::now();
    let during: Vec<TransferRequested> = (0..5).map(|_| request(a, b, "2", "USD")).collect();
    for r in &during {
        env.request(r).await;
    }
    // The outage itself: a length of time, not a wait for something to happen. It outlasts
    // the pools' 10 s acquire timeout, so handlers do fail and the consume loop retries them.
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    down.restart();
    let restarted = Instant::now();

    let outcomes = watcher
        .wait_for(
            during.iter().map(|r| r.transfer_id.clone()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    eprintln!(
        "outage of {:.1?}; every transfer settled {:.1?} after PostgreSQL was back",
        restarted - stopped,
        restarted.elapsed()
    );
    assert_eq!(
        outcomes.len(),
        during.len(),
        "every transfer published during the outage has an outcome (logs in {})",
        env.log_dir.display()
    );
    for r in &during {
        assert_outcome(&outcomes[&r.transfer_id], "completed", None);
    }
    // The requests were retried, and counted for the alert that tells ops of an outage.
    let requests = env.topics.requests();
    let retries = common::metric(
        port,
        "twophase_handler_retries_total",
        &[("worker", "coordinator"), ("topic", &requests)],
    )
    .await;
    assert!(retries.is_some_and(|n| n >= 1.0), "{retries:?}");
    let dec = |s: &str| s.parse::<Decimal>().unwrap();
    assert_eq!(env.balance(a).await, (dec("89"), Decimal::ZERO));
    assert_eq!(env.balance(b).await, (dec("11"), Decimal::ZERO));
    for topic in env.topics.all().iter().filter(|t| t.ends_with(".dlq")) {
        assert_eq!(
            high_watermark(&env, topic),
            0,
            "a transient failure dead-lettered something on {topic}"
        );
    }
    env.check_invariants().await;
}
