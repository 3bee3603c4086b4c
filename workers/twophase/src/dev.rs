//! `twophase dev`: the whole system in one process with nothing installed.
//!
//! It starts librdkafka's mock cluster in process, keeps every worker's state in SQLite files
//! under a data directory, runs the coordinator, account, risk and audit workers on them (the
//! same code as in production; only the connection strings differ), serves the audit API with
//! `/metrics` and `/healthz`, and opens demo accounts on first start. With `--demo N` it also
//! publishes N random transfers once the workers hold their partitions, shows their progress
//! and ends with a summary.
//!
//! The mock cluster keeps messages in memory only, so a restart begins with an empty broker
//! while SQLite keeps balances and history. Transfers caught in flight by a restart heal on
//! their own: the coordinator's timers abort those still preparing and re-send the commit or
//! abort commands of those already decided.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rust_decimal::Decimal;
use serde::Serialize;
use tokio::task::JoinSet;
use twophase_account::{store, AccountStatus};
use twophase_messages::{Topics, TransferRequested};
use twophase_runtime::db::{self, Db, Lookups};
use twophase_runtime::embedded::EmbeddedBroker;
use twophase_runtime::{http, outln, query_as, shutdown, CancellationToken, Publisher};
use uuid::Uuid;

use crate::client::{self, OutcomeWatcher};
use crate::config::Config;

/// Balance of each demo account when it is opened.
const DEMO_BALANCE: &str = "10000.00";
/// The reference of the deposit that opens each demo account: it tells them from accounts
/// opened by hand in the same data directory, which the demo leaves alone.
const DEMO_REFERENCE: &str = "demo";
const DEMO_ACCOUNTS: usize = 20;
/// The longest a consumer's fetch waits on the embedded broker, in milliseconds.
const EMBEDDED_FETCH_WAIT_MS: &str = "25";
/// How long the demo waits for the workers to hold their partitions.
const READY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the SQLite files live; kept across restarts.
    #[arg(long, default_value = ".twophase")]
    data_dir: PathBuf,
    /// Publish this many random transfers (a few invalid, a few refused), print a summary of
    /// their outcomes and a balance check, and exit.
    #[arg(long, value_name = "N")]
    demo: Option<usize>,
    /// Print the demo summary as JSON.
    #[arg(long, requires = "demo")]
    json: bool,
    // The real services' flags, which every other command takes: out of `dev --help`, as dev
    // refuses them (`cli::main` says why). Being `dev`'s own, they are not given it again from
    // the global ones, and what they read still reaches those.
    #[arg(long, hide = true)]
    brokers: Option<String>,
    #[arg(long, hide = true)]
    database_url: Option<String>,
}

impl DevArgs {
    /// Whether this run is a demo, which ends with a summary.
    pub fn is_demo(&self) -> bool {
        self.demo.is_some()
    }
}

/// What `--demo` reports.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub transfers: usize,
    /// Seconds from the workers' start until each saga worker held its partitions, before the
    /// first transfer was sent: not part of `seconds` nor of any latency.
    pub workers_ready_seconds: f64,
    /// Transfers that reached an outcome.
    pub terminal: usize,
    /// Outcomes by `status` or `status/reason`.
    pub outcomes: BTreeMap<String, usize>,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
    pub latency_max_ms: u64,
    pub seconds: f64,
    pub transfers_per_second: f64,
    /// Accounts whose balance was replayed from the ledger and held amount from open holds.
    pub accounts_checked: usize,
    pub discrepancies: Vec<store::Mismatch>,
    /// The reconciler's report for today, run once the demo's transfers have settled.
    pub reconciliation: twophase_reconciler::Report,
}

pub async fn run(mut config: Config, args: DevArgs) -> anyhow::Result<u8> {
    // The real services' settings, from the environment or a config file that other commands
    // share, do not stop the demo; but they are not used, and a user who set them is told so.
    let defaults = Config::default();
    for (key, env, set) in [
        (
            "database_url",
            "TWOPHASE_DATABASE_URL",
            config.database_url != defaults.database_url,
        ),
        (
            "kafka.brokers",
            "TWOPHASE_KAFKA__BROKERS",
            config.kafka.brokers != defaults.kafka.brokers,
        ),
    ] {
        if set {
            eprintln!(
                "note: {key} ({env}) is set but not used: twophase dev runs its own in-memory \
                 broker and keeps its data in --data-dir"
            );
        }
    }
    // Held until the process ends, when the system lets it go however it ended. Taken first:
    // a data directory in use is the reason a second `twophase dev` is refused, whatever else
    // it would find taken.
    let _lock = lock_data_dir(&args.data_dir)?;
    // One address serves the audit API beside /metrics and /healthz. Taken before anything
    // starts, so that an address in use is said then, not among the shutdown's broker errors.
    let listen = config
        .metrics_listen
        .unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 9100)));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!(
                "listening on {listen}: set metrics_listen (TWOPHASE_METRICS_LISTEN) to a free \
                 address"
            )
        })?;
    let topics = Topics::new(&config.kafka.topic_prefix);
    let broker = EmbeddedBroker::start(&topics.all(), config.kafka.partitions)
        .context("starting the embedded Kafka cluster")?;
    config.kafka.brokers = broker.bootstrap_servers().to_owned();
    // A fetch that finds nothing new waits out `fetch.wait.max.ms` on the embedded broker
    // (librdkafka's mock cluster does not answer early when a message arrives meanwhile, as
    // Kafka does), so with the default 500 ms each hop of a transfer could take half a second.
    config
        .kafka
        .consumer_properties
        .entry("fetch.wait.max.ms".into())
        .or_insert_with(|| EMBEDDED_FETCH_WAIT_MS.into());
    config.database_url = format!("sqlite:{}", args.data_dir.display());
    db::migrate(&config.database_url)
        .await
        .with_context(|| format!("preparing the data directory {}", args.data_dir.display()))?;
    let accounts_db = Db::connect(&config.database_url, twophase_account::SCHEMA, 1).await?;
    let accounts = demo_accounts(&accounts_db).await?;

    let shutdown = shutdown::on_signal();
    let publisher = Publisher::new(&config.kafka)?;
    let (mut workers, saga_workers) = start_workers(&config, &publisher, &shutdown).await?;
    // `/healthz` reports the coordinator's.
    let health = saga_workers.coordinator.clone();
    let audit_db = Db::connect(&config.database_url, twophase_audit::SCHEMA, 1).await?;
    let http = twophase_audit::api::serve_on(
        listener,
        audit_db.clone(),
        health.clone(),
        shutdown.clone(),
    )?;
    let reconciler = twophase_reconciler::Settings {
        database_url: config.database_url.clone(),
        kafka: config.kafka.clone(),
        config: config.reconciler.clone(),
        metrics_listen: None,
    };
    {
        // The daily run, as `twophase reconciler` does it.
        let (reconciler, shutdown) = (reconciler.clone(), shutdown.clone());
        workers.spawn(async move {
            twophase_reconciler::run_daily(&reconciler, shutdown).await;
            Ok(())
        });
    }
    // The audit consumer's own health: a rebalance of its group is not the coordinator's.
    let audit_health = twophase_runtime::http::Health::of_database(&audit_db);
    workers.spawn(twophase_audit::consumer::run(
        audit_db,
        twophase_audit::consumer::Settings {
            kafka: config.kafka.clone(),
            retry: config.retry.clone(),
            audit: config.audit.clone(),
            health: audit_health,
        },
        shutdown.clone(),
    ));

    eprintln!("twophase dev: every worker running in this process");
    eprintln!("  broker     {}", config.kafka.brokers);
    eprintln!("  data       {}", config.database_url);
    eprintln!("  metrics    http://{http}/metrics   health http://{http}/healthz");
    eprintln!("  audit      http://{http}/audit/logs   http://{http}/transfers/ID/timeline");
    eprintln!(
        "  accounts   {} demo accounts, opened with {DEMO_BALANCE} USD each, and {} (frozen)",
        accounts.active.len(),
        accounts.frozen
    );
    eprintln!(
        "  try        twophase --brokers {} transfer --from {} --to {} --amount 12.34 --currency USD --wait",
        config.kafka.brokers, accounts.active[0], accounts.active[1]
    );

    let code = match args.demo {
        Some(n) => {
            let summary = tokio::select! {
                summary = demo(
                    &config,
                    &reconciler,
                    &publisher,
                    &accounts_db,
                    &saga_workers,
                    &accounts,
                    n,
                ) => summary,
                // A worker that stops on its own ends the demo with its error at once, rather
                // than leaving the demo to wait out its deadline for transfers nobody settles.
                Some(result) = workers.join_next() => Err(match result {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => anyhow::anyhow!("a worker stopped before the demo was done"),
                    Err(e) => e.into(),
                }),
            };
            shutdown.cancel();
            let summary = summary?;
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print_summary(&summary);
            }
            u8::from(
                summary.terminal != summary.transfers
                    || !summary.discrepancies.is_empty()
                    || summary.reconciliation.status != twophase_reconciler::RunStatus::Completed,
            )
        }
        None => {
            eprintln!("  Ctrl-C stops");
            // Transfers sent before this line wait for it; none is lost.
            tokio::spawn(async move {
                saga_workers.ready().await;
                eprintln!(
                    "  ready      the workers hold their partitions ({:.1} s)",
                    saga_workers.started.elapsed().as_secs_f64()
                );
            });
            tokio::select! {
                _ = shutdown.cancelled() => {}
                // A worker that stops on its own is an error: take everything down.
                Some(result) = workers.join_next() => {
                    shutdown.cancel();
                    result??;
                }
            }
            0
        }
    };
    while let Some(result) = workers.join_next().await {
        result??;
    }
    accounts_db.close().await;
    // Every client goes before the cluster it talks to, or its last words are an error that
    // all brokers are down.
    drop(publisher);
    drop(broker);
    Ok(code)
}

/// The health handles of the saga workers, each set from its consumer's rebalance callback.
struct SagaWorkers {
    /// When they were started.
    started: Instant,
    coordinator: http::Health,
    account: http::Health,
    risk: http::Health,
}

impl SagaWorkers {
    /// Resolves once each of them holds its partitions. A new consumer group gets them only
    /// after the embedded broker's `group.initial.rebalance.delay.ms` (3 s, Kafka's default).
    async fn ready(&self) {
        tokio::join!(
            self.coordinator.assigned(),
            self.account.assigned(),
            self.risk.assigned()
        );
    }
}

/// Locks the data directory for this process, made if it is new. A second `twophase dev` on it
/// would run its own broker's timers over the same sagas, and abort transfers the first is
/// settling, so it is refused. Ops commands (`--database-url sqlite:DIR`) take no lock.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let shown = dir.display();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("preparing the data directory {shown}"))?;
    let path = dir.join("dev.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => anyhow::bail!(
            "the data directory {shown} is in use by another twophase dev: stop that one, or \
             give this one another --data-dir"
        ),
        Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Starts every worker on its own pool; returns them with their health handles.
async fn start_workers(
    config: &Config,
    publisher: &Publisher,
    shutdown: &CancellationToken,
) -> anyhow::Result<(JoinSet<anyhow::Result<()>>, SagaWorkers)> {
    use twophase_account::AccountWorker;
    use twophase_coordinator::Coordinator;
    use twophase_risk::RiskWorker;

    let connect =
        |schema: &'static str| Db::connect_for(&config.database_url, schema, 1, Lookups::Keyed);
    let (kafka, retry) = (&config.kafka, &config.retry);
    let started = Instant::now();
    let mut set = JoinSet::new();
    let coordinator_db = connect(twophase_coordinator::SCHEMA).await?;
    let mut coordinator = Coordinator::settings(kafka.clone(), retry.clone());
    coordinator.health = http::Health::of_database(&coordinator_db);
    let account = AccountWorker::settings(kafka.clone(), retry.clone());
    let risk = RiskWorker::settings(kafka.clone(), retry.clone());
    let health = SagaWorkers {
        started,
        coordinator: coordinator.health.clone(),
        account: account.health.clone(),
        risk: risk.health.clone(),
    };
    set.spawn(Coordinator::run(
        coordinator_db,
        config.coordinator.clone(),
        coordinator,
        publisher.clone(),
        shutdown.clone(),
    ));
    set.spawn(AccountWorker::run(
        connect(twophase_account::SCHEMA).await?,
        account,
        publisher.clone(),
        shutdown.clone(),
    ));
    set.spawn(RiskWorker::run(
        connect(twophase_risk::SCHEMA).await?,
        config.risk.clone(),
        risk,
        publisher.clone(),
        shutdown.clone(),
    ));
    Ok((set, health))
}

/// The demo's accounts.
struct DemoAccounts {
    /// At least two.
    active: Vec<Uuid>,
    /// It refuses credits, so some demo transfers fail their votes.
    frozen: Uuid,
}

/// The demo accounts: opened on first start, found again afterwards.
async fn demo_accounts(db: &Db) -> anyhow::Result<DemoAccounts> {
    let mut accounts = store::list(db).await?;
    if accounts.is_empty() {
        for _ in 0..DEMO_ACCOUNTS {
            let account = store::open(db, "USD").await?;
            store::deposit(db, account.account_id, DEMO_BALANCE, Some(DEMO_REFERENCE)).await?;
        }
        let frozen = store::open(db, "USD").await?;
        store::set_status(db, frozen.account_id, AccountStatus::Frozen).await?;
        accounts = store::list(db).await?;
    }
    let mut tx = db.begin().await?;
    let opened: HashSet<Uuid> = query_as!(
        &mut tx,
        (Uuid,),
        fetch_all,
        "SELECT account_id FROM ledger WHERE kind = 'deposit' AND reference = $1",
        DEMO_REFERENCE,
    )?
    .into_iter()
    .map(|(id,)| id)
    .collect();
    tx.commit().await?;
    let active: Vec<Uuid> = accounts
        .iter()
        .filter(|a| a.status == "active" && opened.contains(&a.account_id))
        .map(|a| a.account_id)
        .collect();
    let frozen = accounts
        .iter()
        .find(|a| a.status == "frozen")
        .map(|a| a.account_id);
    match (active.len(), frozen) {
        (2.., Some(frozen)) => Ok(DemoAccounts { active, frozen }),
        _ => anyhow::bail!(
            "the data directory holds accounts that are not the demo's; use another --data-dir"
        ),
    }
}

/// A random transfer request: mostly valid, one in fifty invalid, one in thirty to the frozen
/// account.
fn random_request(rng: &mut impl Rng, i: usize, accounts: &DemoAccounts) -> TransferRequested {
    let DemoAccounts { active, frozen } = accounts;
    let from = active[rng.random_range(0..active.len())];
    let mut to = active[rng.random_range(0..active.len())];
    while to == from {
        to = active[rng.random_range(0..active.len())];
    }
    let cents: i64 = rng.random_range(100..30_000);
    let mut amount = Decimal::new(cents, 2).to_string();
    if i % 50 == 7 {
        amount = "0.001".into();
    } else if i % 30 == 3 {
        to = *frozen;
    }
    TransferRequested {
        transfer_id: Uuid::new_v4().to_string(),
        from_account: from.to_string(),
        to_account: to.to_string(),
        amount,
        currency: "USD".into(),
        reference: Some(format!("demo {i}")),
    }
}

async fn demo(
    config: &Config,
    reconciler: &twophase_reconciler::Settings,
    publisher: &Publisher,
    accounts_db: &Db,
    saga_workers: &SagaWorkers,
    accounts: &DemoAccounts,
    n: usize,
) -> anyhow::Result<Summary> {
    // Transfers sent before the workers hold their partitions would wait for them, and the
    // summary would time the start-up rather than the transfers.
    tokio::time::timeout(READY_WITHIN, saga_workers.ready())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the coordinator, account and risk workers did not all hold their partitions \
                 {} s after starting",
                READY_WITHIN.as_secs()
            )
        })?;
    let workers_ready_seconds = saga_workers.started.elapsed().as_secs_f64();
    let mut rng = rand::rng();
    let requests: Vec<TransferRequested> = (0..n)
        .map(|i| random_request(&mut rng, i, accounts))
        .collect();
    let watcher = OutcomeWatcher::start(&config.kafka).await?;
    let bar = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} transfers settled ({per_sec})",
        )
        .expect("the template is valid"),
    );
    let started = Instant::now();
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(n);
    for request in &requests {
        sent.insert(request.transfer_id.clone(), Instant::now());
    }
    let publishes = requests
        .iter()
        .map(|r| client::request_transfer(publisher, &config.kafka, r));
    let publishing = futures::future::try_join_all(publishes);
    tokio::pin!(publishing);
    let mut published = false;

    // Milliseconds, from 1 ms to an hour, to three significant figures.
    let mut latencies = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)
        .expect("the bounds are valid");
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(60)
        + Duration::from_millis(50) * n as u32;
    let mut terminal = 0;
    while terminal < n {
        let outcome = tokio::select! {
            result = &mut publishing, if !published => {
                result?;
                published = true;
                continue;
            }
            outcome = tokio::time::timeout_at(deadline, watcher.next()) => match outcome {
                Ok(outcome) => outcome,
                Err(_) => break,
            },
        };
        let id = outcome.transfer_id();
        let Some(at) = sent.remove(&id) else { continue };
        latencies.saturating_record(at.elapsed().as_millis() as u64);
        let key = outcome.label();
        *outcomes.entry(key).or_default() += 1;
        terminal += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let (accounts_checked, discrepancies) = store::check_balances(accounts_db).await?;
    let today = twophase_reconciler::today(reconciler.config.time_zone, chrono::Utc::now());
    let reconciliation = twophase_reconciler::reconcile(reconciler, today).await;
    Ok(Summary {
        transfers: n,
        workers_ready_seconds,
        terminal,
        outcomes,
        latency_p50_ms: latencies.value_at_quantile(0.5),
        latency_p99_ms: latencies.value_at_quantile(0.99),
        latency_max_ms: latencies.max(),
        seconds,
        transfers_per_second: terminal as f64 / seconds,
        accounts_checked,
        discrepancies,
        reconciliation,
    })
}

fn print_summary(s: &Summary) {
    outln!(
        "workers ready after {:.1} s; {} of {} transfers settled in {:.1} s ({:.0} transfers/s)",
        s.workers_ready_seconds,
        s.terminal,
        s.transfers,
        s.seconds,
        s.transfers_per_second
    );
    for (outcome, count) in &s.outcomes {
        outln!("  {count:>6}  {outcome}");
    }
    outln!(
        "latency from request to outcome: p50 {} ms, p99 {} ms, max {} ms",
        s.latency_p50_ms,
        s.latency_p99_ms,
        s.latency_max_ms
    );
    let r = &s.reconciliation;
    outln!(
        "reconciliation of {}: {}, {} accounts, {} discrepancies",
        r.date,
        r.status.as_str(),
        r.accounts,
        r.discrepancies.len()
    );
    if s.discrepancies.is_empty() {
        outln!(
            "balance check: {} accounts replayed from their ledgers, no discrepancies",
            s.accounts_checked
        );
    } else {
        outln!("balance check: {} discrepancies", s.discrepancies.len());
        for d in &s.discrepancies {
            outln!(
                "  account {} {}: expected {}, found {}",
                d.account_id,
                d.field,
                d.expected,
                d.actual
            );
        }
    }
}
