//! `twophase bench`: a load generator and meter to point at a running system.
//!
//! It opens its own accounts, then publishes transfers among them either in a closed loop
//! (`--concurrency C` producers, each waiting for its outcome before the next request: the
//! maximum sustained throughput) or an open loop (`--rate R` requests per second for the
//! duration: the latency a producer sees at that rate, measured from each request's *scheduled*
//! send time so that a stall is not hidden by sending less). Only what is sent after a warm-up
//! at the same load (`--warmup`) is measured. Latency is request produced → outcome consumed,
//! also reported by the second each request was sent in. At the end it checks the invariants
//! of the whole store and fails loudly if any is broken: a fast run that loses money is not a
//! result.
//!
//! `--ceiling` measures, in the same run, what the same machine allows with no logic at all: the
//! saga's twelve messages per transfer pushed through the same broker in the same produce →
//! consume → produce pattern, and the rows per second the database takes when written as the
//! workers write a batch, as many rows per transfer as the saga writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt as _;
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::oneshot;
use twophase_account::store;
use twophase_messages::{Message, TransferRequested};
use twophase_runtime::db::{Db, Timestamp};
use twophase_runtime::kafka::{client_config, consumer_config};
use twophase_runtime::{execute, execute_rows, outln, KafkaConfig, Outgoing, Publisher};
use uuid::Uuid;

use crate::client::{self, Outcome, OutcomeWatcher};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Closed loop: this many producers, each sending its next request when the last one's
    /// outcome arrives.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second, sent on schedule whatever the outcomes do.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send for, and measure.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to send the same load for before measuring: a group's first joins and
    /// connections are not what a producer sees later.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Accounts the transfers move between (opened for this run).
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Share of transfers that touch the first account (a hot account), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    hot: f64,
    /// Share of transfers larger than any balance (they fail: insufficient funds), 0 to 1.
    #[arg(long, default_value_t = 0.02)]
    insufficient: f64,
    /// Share of invalid requests (they are rejected), 0 to 1.
    #[arg(long, default_value_t = 0.01)]
    invalid: f64,
    /// Also measure the broker's and the database's ceiling for this workload.
    #[arg(long)]
    ceiling: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Latency figures in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub mode: String,
    pub seconds: f64,
    pub transfers: usize,
    pub transfers_per_second: f64,
    pub completed_per_second: f64,
    pub latency_ms: Latency,
    /// Latency by the second each request was sent in: a tail from a stall shows as a few
    /// bad seconds, a tail from queueing as a steady level.
    pub seconds_sent: Vec<Second>,
    pub outcomes: BTreeMap<String, usize>,
    pub invariants: crate::invariants::Report,
    pub ceiling: Option<Ceiling>,
}

/// The requests sent in one second of the run, and the latency they saw (milliseconds).
#[derive(Debug, Serialize)]
pub struct Second {
    pub second: u64,
    pub requests: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What the machine allows with no logic: transfers per second if the broker or the database
/// were the only cost.
#[derive(Debug, Serialize)]
pub struct Ceiling {
    pub broker_transfers_per_second: f64,
    pub database_rows_per_second: f64,
    pub database_transfers_per_second: f64,
    pub share_of_broker: f64,
    pub share_of_database: f64,
}

/// Rows a transfer writes: the coordinator's insert and five updates (three votes, two acks);
/// the account worker's hold and credit (each inserted and updated), two ledger entries, four
/// processed commands and three balance updates; the risk worker's evaluation and daily total.
const ROWS_PER_TRANSFER: usize = 21;

/// Sessions and rows per commit of the database ceiling: the three saga workers, each writing
/// what a batch of a few dozen transfers writes.
const CEILING_SESSIONS: usize = 3;
const CEILING_ROWS_PER_COMMIT: usize = 512;

/// Refuses arguments that cannot give a measurement, before anything is opened or sent.
fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    anyhow::ensure!(
        !args.duration.is_zero(),
        "--duration must be longer than zero"
    );
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of requests a second"
        );
        anyhow::ensure!(
            rate * args.duration.as_secs_f64() >= 1.0,
            "--rate {rate}/s sends no request in --duration {}: raise either",
            humantime::format_duration(args.duration)
        );
    }
    for (name, share) in [
        ("hot", args.hot),
        ("insufficient", args.insufficient),
        ("invalid", args.invalid),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "--{name} must be between 0 and 1"
        );
    }
    Ok(())
}

pub async fn run(config: &Config, args: BenchArgs) -> anyhow::Result<u8> {
    check_args(&args)?;
    let accounts_db = Db::connect(&config.database_url, twophase_account::SCHEMA, 4)
        .await
        .context("connecting to the account store")?;
    eprintln!("opening {} accounts…", args.accounts);
    let mut accounts = Vec::with_capacity(args.accounts);
    for _ in 0..args.accounts {
        let a = store::open(&accounts_db, "USD").await?;
        store::deposit(&accounts_db, a.account_id, "100000.00", Some("bench")).await?;
        accounts.push(a.account_id);
    }
    let publisher = Publisher::new(&config.kafka)?;
    let outcomes = Dispatcher::start(&config.kafka).await?;
    let workload = Workload {
        accounts,
        hot: args.hot,
        insufficient: args.insufficient,
        invalid: args.invalid,
    };

    let (mode, samples, seconds) = match (args.concurrency, args.rate) {
        (_, Some(rate)) => {
            let (s, secs) = open_loop(
                config,
                &publisher,
                &outcomes,
                &workload,
                rate,
                args.warmup,
                args.duration,
            )
            .await?;
            (format!("open loop, {rate}/s"), s, secs)
        }
        (concurrency, None) => {
            let c = concurrency.unwrap_or(32).max(1);
            let (s, secs) = closed_loop(
                config,
                &publisher,
                &outcomes,
                &workload,
                c,
                args.warmup,
                args.duration,
            )
            .await?;
            (format!("closed loop, concurrency {c}"), s, secs)
        }
    };

    let histogram = || {
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .expect("the bounds are valid")
    };
    let mut overall = histogram();
    let mut by_second: BTreeMap<u64, hdrhistogram::Histogram<u64>> = BTreeMap::new();
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut completed = 0;
    for sample in &samples {
        overall.saturating_record(sample.micros);
        by_second
            .entry(sample.sent.as_secs())
            .or_insert_with(histogram)
            .saturating_record(sample.micros);
        if matches!(sample.outcome, Outcome::Completed(_)) {
            completed += 1;
        }
        *by_outcome.entry(sample.outcome.label()).or_default() += 1;
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let all = Db::connect_all(&config.database_url).await?;
    let invariants = crate::invariants::check(&all).await?;
    let ceiling = if args.ceiling {
        let in_flight = args.concurrency.unwrap_or(64).max(1);
        // Completed transfers are the ones that took all twelve messages.
        Some(measure_ceiling(config, in_flight, completed as f64 / seconds).await?)
    } else {
        None
    };
    let results = Results {
        mode,
        seconds,
        transfers: samples.len(),
        transfers_per_second: samples.len() as f64 / seconds,
        completed_per_second: completed as f64 / seconds,
        latency_ms: Latency {
            p50: ms(&overall, 0.5),
            p95: ms(&overall, 0.95),
            p99: ms(&overall, 0.99),
            p999: ms(&overall, 0.999),
            max: overall.max() as f64 / 1000.0,
        },
        seconds_sent: by_second
            .iter()
            .map(|(second, h)| Second {
                second: *second,
                requests: h.len(),
                p99_ms: ms(h, 0.99),
                max_ms: h.max() as f64 / 1000.0,
            })
            .collect(),
        outcomes: by_outcome,
        invariants,
        ceiling,
    };
    print_results(&results);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !results.invariants.holds() {
        eprintln!("INVARIANTS BROKEN: these figures are not a result");
        for v in &results.invariants.violations {
            eprintln!("  {v}");
        }
        return Ok(1);
    }
    Ok(0)
}

struct Workload {
    accounts: Vec<Uuid>,
    hot: f64,
    insufficient: f64,
    invalid: f64,
}

impl Workload {
    fn request(&self, rng: &mut impl Rng) -> TransferRequested {
        let n = self.accounts.len();
        let pick = |rng: &mut _| {
            if rand::Rng::random_bool(rng, self.hot) {
                0
            } else {
                rand::Rng::random_range(rng, 0..n)
            }
        };
        let from = pick(rng);
        let mut to = pick(rng);
        while to == from {
            to = rng.random_range(0..n);
        }
        let amount = if rng.random_bool(self.invalid) {
            "0".to_owned()
        } else if rng.random_bool(self.insufficient) {
            // More than any account holds, within the request limit: refused by the source.
            "900000.00".to_owned()
        } else {
            rust_decimal::Decimal::new(rng.random_range(100..10_000), 2).to_string()
        };
        TransferRequested {
            transfer_id: Uuid::new_v4().to_string(),
            from_account: self.accounts[from].to_string(),
            to_account: self.accounts[to].to_string(),
            amount,
            currency: "USD".into(),
            reference: None,
        }
    }
}

/// Hands each outcome to whoever waits for its transfer.
struct Dispatcher {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Outcome>>>>,
}

impl Dispatcher {
    async fn start(kafka: &KafkaConfig) -> anyhow::Result<Dispatcher> {
        let watcher = OutcomeWatcher::start(kafka).await?;
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Outcome>>>> = Default::default();
        let map = Arc::clone(&waiting);
        tokio::spawn(async move {
            loop {
                let outcome = watcher.next().await;
                let id = outcome.transfer_id();
                if let Some(tx) = map.lock().expect("not poisoned").remove(&id) {
                    let _ = tx.send(outcome);
                }
            }
        });
        Ok(Dispatcher { waiting })
    }

    fn expect(&self, transfer_id: &str) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("not poisoned")
            .insert(transfer_id.to_owned(), tx);
        rx
    }
}

/// How long one transfer may take before the run gives up on it.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(120);

/// One transfer: when it was (to be) sent, from the start of the run (after
/// [`measured`], of the measurement); its latency; its outcome.
struct Sample {
    sent: Duration,
    micros: u64,
    outcome: Outcome,
}

/// Sends `request` (at `scheduled`, or now) and waits for its outcome; the latency is counted
/// from `scheduled`.
async fn one(
    config: &Config,
    publisher: &Publisher,
    outcomes: &Dispatcher,
    request: TransferRequested,
    started: Instant,
    scheduled: Instant,
) -> anyhow::Result<Sample> {
    let rx = outcomes.expect(&request.transfer_id);
    client::request_transfer(publisher, &config.kafka, &request).await?;
    let outcome = tokio::time::timeout(OUTCOME_TIMEOUT, rx)
        .await
        .with_context(|| {
            format!(
                "no outcome for {} within {OUTCOME_TIMEOUT:?}",
                request.transfer_id
            )
        })??;
    Ok(Sample {
        sent: scheduled - started,
        micros: scheduled.elapsed().as_micros() as u64,
        outcome,
    })
}

async fn closed_loop(
    config: &Config,
    publisher: &Publisher,
    outcomes: &Dispatcher,
    workload: &Workload,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    let started = Instant::now();
    let producers = (0..concurrency).map(|_| async {
        let mut samples = Vec::new();
        while started.elapsed() < warmup + duration {
            let request = workload.request(&mut rand::rng());
            let sample = one(
                config,
                publisher,
                outcomes,
                request,
                started,
                Instant::now(),
            );
            samples.push(sample.await?);
        }
        anyhow::Ok(samples)
    });
    let all = futures::future::try_join_all(producers).await?;
    Ok(measured(
        all.into_iter().flatten().collect(),
        started,
        warmup,
    ))
}

async fn open_loop(
    config: &Config,
    publisher: &Publisher,
    outcomes: &Dispatcher,
    workload: &Workload,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    let started = Instant::now();
    let total = (rate * (warmup + duration).as_secs_f64()).round() as usize;
    let sends = (0..total).map(|i| {
        let scheduled = started + Duration::from_secs_f64(i as f64 / rate);
        let request = workload.request(&mut rand::rng());
        async move {
            tokio::time::sleep_until(scheduled.into()).await;
            one(config, publisher, outcomes, request, started, scheduled).await
        }
    });
    let samples = futures::future::try_join_all(sends).await?;
    Ok(measured(samples, started, warmup))
}

/// The samples of requests sent after the warm-up, their send times counted from its end, and
/// the seconds from then until the last outcome.
fn measured(mut samples: Vec<Sample>, started: Instant, warmup: Duration) -> (Vec<Sample>, f64) {
    samples.retain(|s| s.sent >= warmup);
    for sample in &mut samples {
        sample.sent -= warmup;
    }
    let seconds = started.elapsed().saturating_sub(warmup).as_secs_f64();
    (samples, seconds)
}

/// The broker's and the database's ceiling for this workload, measured for a few seconds each.
async fn measure_ceiling(
    config: &Config,
    in_flight: usize,
    achieved: f64,
) -> anyhow::Result<Ceiling> {
    eprintln!("measuring the ceiling reference…");
    let broker = broker_ceiling(&config.kafka, in_flight, Duration::from_secs(10)).await?;
    let rows = database_ceiling(&config.database_url, Duration::from_secs(10)).await?;
    let database = rows / ROWS_PER_TRANSFER as f64;
    Ok(Ceiling {
        broker_transfers_per_second: broker,
        database_rows_per_second: rows,
        database_transfers_per_second: database,
        share_of_broker: achieved / broker,
        share_of_database: achieved / database,
    })
}

/// Transfers per second when each is only its twelve Kafka messages (a request, three prepare
/// commands, three votes, two commit commands, two acks, an outcome): a relay standing in for the
/// coordinator turns a request into three commands, three replies into two commands, two
/// replies into an outcome; one standing in for the participants answers each command.
///
/// The relays work as the workers do, minus the database and the logic: they take what has
/// arrived as a batch, hand every message it causes to the producer at once and wait for the
/// broker's acknowledgements before taking the next batch. `in_flight` transfers are kept
/// going, as the closed loop does. Each message is the size of a saga's: a transfer request's
/// JSON under its envelope's headers, keyed by a UUID's text.
async fn broker_ceiling(
    kafka: &KafkaConfig,
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let run = Uuid::new_v4().simple().to_string();
    let topics = ["requests", "commands", "replies", "events"]
        .map(|name| format!("bench-ceiling-{run}.{name}"));
    twophase_runtime::kafka::ensure_topics(kafka, &topics)
        .await
        .context("creating the ceiling reference's topics (the embedded broker cannot)")?;
    let measured = relay_chain(kafka, &run, &topics, in_flight, duration).await;
    // The run's topics go with it, measured or not: a long-lived cluster keeps no litter.
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    match admin.delete_topics(&names, &AdminOptions::new()).await {
        Ok(results) => {
            for (topic, code) in results.into_iter().filter_map(Result::err) {
                eprintln!("the ceiling's topic {topic} was not deleted: {code}");
            }
        }
        Err(e) => eprintln!("the ceiling's topics {names:?} were not deleted: {e}"),
    }
    measured
}

/// The chain of [`broker_ceiling`] on its four topics (requests, commands, replies, events):
/// transfers settled per second.
async fn relay_chain(
    kafka: &KafkaConfig,
    run: &str,
    [requests, commands, replies, events]: &[String; 4],
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let producer: FutureProducer = twophase_runtime::kafka::producer_config(kafka).create()?;
    let body = Arc::new(Body::of_a_request(requests));
    let consumer = |group: &str, topics: &[&str]| -> anyhow::Result<StreamConsumer> {
        let c: StreamConsumer = consumer_config(kafka)
            .set("group.id", format!("bench-ceiling-{run}-{group}"))
            .set("auto.offset.reset", "earliest")
            .create()?;
        c.subscribe(topics)?;
        Ok(c)
    };
    let coordinator = consumer("coordinator", &[requests, replies])?;
    let participant = consumer("participant", &[commands])?;
    let outcomes = consumer("outcomes", &[events])?;
    let stop = tokio_util::sync::CancellationToken::new();
    let relay_coordinator = {
        let (producer, stop, body) = (producer.clone(), stop.clone(), body.clone());
        let (commands, events, replies) = (commands.clone(), events.clone(), replies.clone());
        let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
        tokio::spawn(relay(coordinator, producer, stop, body, move |m| {
            let key = m.key().unwrap_or_default().to_vec();
            if m.topic() != replies {
                return vec![(commands.clone(), key, 3)];
            }
            let n = seen.entry(key.clone()).or_default();
            *n += 1;
            match *n {
                3 => vec![(commands.clone(), key, 2)],
                5 => {
                    seen.remove(&key);
                    vec![(events.clone(), key, 1)]
                }
                _ => Vec::new(),
            }
        }))
    };
    let relay_participant = {
        let (producer, stop, body) = (producer.clone(), stop.clone(), body.clone());
        let replies = replies.clone();
        tokio::spawn(relay(participant, producer, stop, body, move |m| {
            vec![(replies.clone(), m.key().unwrap_or_default().to_vec(), 1)]
        }))
    };
    // Keep `in_flight` transfers going; count those whose outcome arrives within the duration.
    let started = Instant::now();
    let mut next = 0u64;
    let mut keys = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                next += 1;
                // As long as a transfer id.
                format!("{next:036}")
            })
            .collect()
    };
    fn on<'a>(topic: &'a str, keys: &'a [String]) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        keys.iter().map(move |k| (topic, k.as_bytes()))
    }
    let first = keys(in_flight);
    publish_all(&producer, &body, on(requests, &first)).await?;
    let mut done = 0usize;
    while started.elapsed() < duration {
        let Ok(outcome) = tokio::time::timeout(Duration::from_secs(10), outcomes.recv()).await
        else {
            anyhow::bail!("the ceiling relays stalled: no outcome in 10 s");
        };
        outcome?;
        let mut settled = 1;
        while let Some(outcome) = outcomes.recv().now_or_never() {
            outcome?;
            settled += 1;
        }
        done += settled;
        // As many new transfers as settled, sent together.
        let more = keys(settled);
        publish_all(&producer, &body, on(requests, &more)).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    relay_coordinator.await??;
    relay_participant.await??;
    Ok(done as f64 / seconds)
}

/// One relay of [`broker_ceiling`]: for each consumed message, `causes` names the messages to
/// publish (topic, key, how many).
async fn relay(
    consumer: StreamConsumer,
    producer: FutureProducer,
    stop: tokio_util::sync::CancellationToken,
    body: Arc<Body>,
    mut causes: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Vec<u8>, usize)>,
) -> anyhow::Result<()> {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = consumer.recv() => m?,
        };
        let mut out = causes(&first);
        while let Some(m) = consumer.recv().now_or_never() {
            out.extend(causes(&m?));
        }
        let records = out
            .iter()
            .flat_map(|(topic, key, n)| std::iter::repeat_n((topic.as_str(), key.as_slice()), *n));
        publish_all(&producer, &body, records).await?;
    }
}

/// What every message of [`broker_ceiling`] carries, whatever its topic and key.
struct Body {
    payload: Vec<u8>,
    headers: OwnedHeaders,
}

impl Body {
    /// A transfer request's payload and headers, as a producer publishes it on `topic`.
    fn of_a_request(topic: &str) -> Body {
        let request = TransferRequested {
            transfer_id: Uuid::new_v4().to_string(),
            from_account: Uuid::new_v4().to_string(),
            to_account: Uuid::new_v4().to_string(),
            amount: "1234.56".into(),
            currency: "USD".into(),
            reference: None,
        };
        let id = request.transfer_id.clone();
        let out = Outgoing::new(
            topic.to_owned(),
            &id,
            "/twophase/bench",
            &Message::TransferRequested(request),
        );
        Body {
            headers: twophase_runtime::kafka::envelope_headers(&out.envelope),
            payload: out.payload,
        }
    }
}

/// Hands every record (topic, key) to the producer at once, each with `body`, then waits until
/// the broker has them all.
async fn publish_all<'a>(
    producer: &FutureProducer,
    body: &Body,
    records: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> anyhow::Result<()> {
    let mut deliveries = Vec::new();
    for (topic, key) in records {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(&body.payload)
            .headers(body.headers.clone());
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Rows per second the database takes from [`CEILING_SESSIONS`] concurrent sessions, each
/// inserting [`CEILING_ROWS_PER_COMMIT`] rows per transaction with one statement, as the
/// workers write a batch: the bound on a design that writes [`ROWS_PER_TRANSFER`] rows per
/// transfer in batches, with no reads, no indexes beyond a key and no logic.
async fn database_ceiling(url: &str, duration: Duration) -> anyhow::Result<f64> {
    let db = Db::connect(url, twophase_account::SCHEMA, CEILING_SESSIONS as u32).await?;
    let mut tx = db.begin().await?;
    // A scratch table beside the account worker's, dropped at the end.
    execute!(
        &mut tx,
        "CREATE TABLE IF NOT EXISTS bench_rows (id TEXT PRIMARY KEY, at TEXT)"
    )?;
    tx.commit().await?;
    let started = Instant::now();
    let sessions = (0..CEILING_SESSIONS).map(|_| {
        let db = db.clone();
        async move {
            let mut n = 0;
            while started.elapsed() < duration {
                let rows: Vec<(String, String)> = (0..CEILING_ROWS_PER_COMMIT)
                    .map(|_| (Uuid::new_v4().to_string(), Timestamp::now().0.to_rfc3339()))
                    .collect();
                let mut tx = db.begin().await?;
                execute_rows!(
                    &mut tx,
                    "INSERT INTO bench_rows (id, at) VALUES {rows}",
                    &rows,
                    |(id, at)| (id, at),
                )?;
                tx.commit().await?;
                n += rows.len();
            }
            anyhow::Ok(n)
        }
    });
    let counts = futures::future::try_join_all(sessions).await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut tx = db.begin().await?;
    execute!(&mut tx, "DROP TABLE bench_rows")?;
    tx.commit().await?;
    Ok(counts.iter().sum::<usize>() as f64 / seconds)
}

fn print_results(r: &Results) {
    outln!(
        "{}: {} transfers in {:.1} s",
        r.mode,
        r.transfers,
        r.seconds
    );
    outln!(
        "  throughput   {:.0} transfers/s ({:.0} completed/s)",
        r.transfers_per_second,
        r.completed_per_second
    );
    let l = &r.latency_ms;
    outln!(
        "  latency ms   p50 {:.1}  p95 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        l.p50,
        l.p95,
        l.p99,
        l.p999,
        l.max
    );
    if let Some(worst) = r
        .seconds_sent
        .iter()
        .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
    {
        outln!(
            "  worst second #{} of {}: {} requests, p99 {:.1}  max {:.1}",
            worst.second,
            r.seconds_sent.len(),
            worst.requests,
            worst.p99_ms,
            worst.max_ms
        );
    }
    for (outcome, n) in &r.outcomes {
        outln!("  {n:>8}  {outcome}");
    }
    if let Some(c) = &r.ceiling {
        outln!(
            "  ceiling      broker {:.0} transfers/s ({:.0}% reached), database {:.0} rows/s = {:.0} transfers/s ({:.0}% reached)",
            c.broker_transfers_per_second,
            100.0 * c.share_of_broker,
            c.database_rows_per_second,
            c.database_transfers_per_second,
            100.0 * c.share_of_database
        );
    }
    outln!(
        "  invariants   {} ({} accounts, {} transfers checked)",
        if r.invariants.holds() {
            "hold"
        } else {
            "BROKEN"
        },
        r.invariants.accounts,
        r.invariants.transfers
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent_ms: u64) -> Sample {
        Sample {
            sent: Duration::from_millis(sent_ms),
            micros: 1_000,
            outcome: Outcome::Rejected(twophase_messages::TransferRejected {
                transfer_id: sent_ms.to_string(),
                reason: "invalid_amount".into(),
                detail: "zero".into(),
                rejected_at: chrono::Utc::now(),
            }),
        }
    }

    #[test]
    fn arguments_that_cannot_measure_anything_are_refused() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: BenchArgs,
        }
        let check = |line: &[&str]| {
            let command = <Command as clap::Parser>::try_parse_from(
                std::iter::once("bench").chain(line.iter().copied()),
            )
            .unwrap();
            check_args(&command.args).map_err(|e| e.to_string())
        };
        assert_eq!(check(&["--rate", "500"]), Ok(()));
        assert_eq!(check(&["--concurrency", "64", "--duration", "1s"]), Ok(()));
        for (line, says) in [
            (&["--rate", "inf"][..], "--rate must be a positive number"),
            (&["--rate", "NaN"], "--rate must be a positive number"),
            (&["--rate", "0"], "--rate must be a positive number"),
            (&["--rate", "0.5", "--duration", "1s"], "sends no request"),
            (&["--duration", "0s"], "--duration must be longer than zero"),
            (&["--accounts", "1"], "--accounts must be at least 2"),
            (&["--hot", "1.5"], "--hot must be between 0 and 1"),
        ] {
            let refused = check(line).expect_err(&format!("{line:?} is refused"));
            assert!(refused.contains(says), "{line:?}: {refused}");
        }
    }

    #[test]
    fn the_warm_up_is_left_out_and_send_times_count_from_its_end() {
        let started = Instant::now() - Duration::from_secs(12);
        let samples = [0, 4_999, 5_000, 7_500, 11_000].map(sample).into();
        let (kept, seconds) = measured(samples, started, Duration::from_secs(5));
        let sent: Vec<u128> = kept.iter().map(|s| s.sent.as_millis()).collect();
        assert_eq!(sent, [0, 2_500, 6_000]);
        assert!((7.0..8.0).contains(&seconds), "{seconds}");
    }
}
