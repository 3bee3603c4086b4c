//! The chaos run: 2,000 transfers among 50 accounts published at a steady rate while a driver
//! SIGKILLs a random worker process (two copies of each) every couple of seconds and starts a
//! new one, and (on the real broker) stops and restarts Kafka once mid-run. After the load
//! every transfer is terminal and the invariants hold.

mod common;

use std::time::{Duration, Instant};

use common::{request, TestEnv};
use rand::Rng;
use twophase::client;
use twophase_messages::TransferRequested;

const TRANSFERS: usize = 2000;
const RATE: f64 = 100.0;
const KILL_EVERY: Duration = Duration::from_secs(2);

fn kafka_script(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kafka.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(action)
        .status()
        .expect("scripts/kafka.sh runs");
    assert!(status.success(), "scripts/kafka.sh {action} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn kills_and_a_broker_restart_lose_no_money_and_no_transfer() {
    let mut env = TestEnv::new("chaos").await;
    env.with_config(
        "[risk]\nvelocity_max_transfers = 100000\n[coordinator]\nprepare_timeout = \"120s\"\n",
    );
    let kinds = ["coordinator", "account", "risk"];
    for kind in kinds {
        env.start(kind);
        env.start(kind);
    }
    let mut accounts = Vec::new();
    for _ in 0..50 {
        accounts.push(env.open_account("USD", "1000.00").await);
    }
    let mut rng = rand::rng();
    let requests: Vec<TransferRequested> = (0..TRANSFERS)
        .map(|_| {
            let from = accounts[rng.random_range(0..accounts.len())];
            let mut to = from;
            while to == from {
                to = accounts[rng.random_range(0..accounts.len())];
            }
            let amount = rust_decimal::Decimal::new(rng.random_range(100..5_000), 2);
            request(from, to, &amount.to_string(), "USD")
        })
        .collect();
    let watcher = env.watcher().await;

    // The load: each request sent on its schedule, whatever workers are being killed. (The
    // broker's restart below holds it up: what fell due meanwhile is sent once it is back.)
    let (publisher, kafka) = (env.publisher.clone(), env.kafka.clone());
    let started = Instant::now();
    let load = futures::future::join_all(requests.iter().enumerate().map(|(i, r)| {
        let (publisher, kafka) = (&publisher, &kafka);
        async move {
            let at = started + Duration::from_secs_f64(i as f64 / RATE);
            tokio::time::sleep_until(at.into()).await;
            // As a producer would: the same request again until the broker takes it (the
            // transfer id makes a repeat harmless).
            let mut attempts = 0;
            while let Err(e) = client::request_transfer(publisher, kafka, r).await {
                attempts += 1;
                assert!(
                    attempts < 10,
                    "the broker never took {}: {e}",
                    r.transfer_id
                );
            }
        }
    }));
    tokio::pin!(load);

    // The chaos, until the load is out.
    let mut kills = 0;
    let mut broker_restarted = env.embedded();
    let mut tick = tokio::time::interval(KILL_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut load => break,
            _ = tick.tick() => {
                let kind = kinds[rng.random_range(0..kinds.len())];
                env.kill_one(kind, rng.random_range(0..2));
                env.start(kind);
                kills += 1;
                if !broker_restarted && started.elapsed() > Duration::from_secs(8) {
                    broker_restarted = true;
                    tokio::task::spawn_blocking(|| {
                        kafka_script("stop");
                        kafka_script("start");
                    })
                    .await
                    .unwrap();
                }
            }
        }
    }
    let load_done = Instant::now();
    assert!(kills > 0, "the load was out before any worker was killed");

    let ids = requests.iter().map(|r| r.transfer_id.clone());
    let outcomes = watcher
        .wait_for(ids, Duration::from_secs(600))
        .await
        .unwrap();
    let settle = load_done.elapsed();
    println!(
        "chaos: {TRANSFERS} transfers at {RATE}/s, {kills} workers killed, broker restarted: {}, \
         settled {settle:.1?} after the load",
        !env.embedded()
    );
    assert_eq!(
        outcomes.len(),
        TRANSFERS,
        "every transfer reached an outcome"
    );
    env.wait_count(
        "SELECT count(*) FROM coordinator.transfers WHERE status IN ('preparing', 'committing', 'aborting')",
        0,
        Duration::from_secs(120),
    )
    .await;
    env.check_invariants().await;
}
