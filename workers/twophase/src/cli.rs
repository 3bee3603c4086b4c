//! The command line: `twophase <worker>` runs a worker; the other subcommands are ops tasks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use twophase_account::AccountStatus;
use twophase_messages::money::in_minor_units;
use twophase_messages::{Topics, TransferRequested};
use twophase_runtime::output::{self, EXIT_ERROR, EXIT_USAGE};
use twophase_runtime::{db, http, kafka, out, outln, shutdown, telemetry, Publisher};
use uuid::Uuid;

use crate::client::{self, Outcome, OutcomeWatcher};
use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "twophase",
    version,
    about = "Money transfers as two-phase saga workers on Kafka",
    long_about = "Money transfers as two-phase saga workers on Kafka.\n\n\
        Run the workers (coordinator, account, risk) as separate processes, each a Kafka consumer \
        group; run more copies to scale out. Configuration comes from defaults, --config FILE, \
        TWOPHASE_* environment variables (TWOPHASE_DATABASE_URL, TWOPHASE_KAFKA__BROKERS, ...; \
        `__` separates nested keys) and the flags below, in that order. \
        `twophase config` prints the result."
)]
pub struct Cli {
    /// A TOML configuration file.
    #[arg(long, global = true, env = "TWOPHASE_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides kafka.brokers).
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// Database URL: postgres://…, or sqlite:DIR for the data directory of `twophase dev`
    /// (overrides database_url).
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The first flag given that names a real service, if any.
    fn real_services_flag(&self) -> Option<&'static str> {
        if self.brokers.is_some() {
            Some("--brokers")
        } else if self.database_url.is_some() {
            Some("--database-url")
        } else {
            None
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process on the embedded default: an in-memory Kafka cluster and
    /// SQLite files, with demo accounts. Nothing to install.
    Dev(crate::dev::DevArgs),
    /// Run the coordinator: drives transfers through prepare and commit or abort.
    Coordinator,
    /// Run the account worker: holds, captures, credits and the ledger.
    Account,
    /// Run the risk worker: scores transfers and votes.
    Risk,
    /// Create or upgrade the database schemas.
    Migrate,
    /// Kafka topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Open accounts, move money in and out, look at balances.
    ///
    /// Exit code: 0 done, 2 the account refused (unknown, frozen or closed, funds it lacks, an
    /// amount its currency does not take), 3 the command itself failed.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Publish a transfer request, and with --wait print its outcome.
    ///
    /// Exit code with --wait: 0 completed, 1 failed, 2 rejected, 3 no outcome in time.
    Transfer(TransferArgs),
    /// Print the JSON Schema of each message (or of one, by type).
    Schema {
        /// A message type, e.g. twophase.transfer.requested.
        message_type: Option<String>,
    },
    /// Dead letters: list them, or replay chosen ones to their original topic.
    #[command(subcommand)]
    Dlq(crate::dlq::DlqCommand),
    /// Run the audit worker: stores every message once in the tamper-evident audit log and
    /// serves the query API (GET /audit/logs, GET /transfers/{id}/timeline) on audit.listen.
    /// `audit verify` checks the hash chains; `audit query` looks rows up.
    Audit(twophase_audit::cli::AuditArgs),
    /// Transfers: one's timeline as the audit log saw it, or those stuck in commit or abort.
    #[command(subcommand)]
    Transfers(TransfersCommand),
    /// Reconcile one day once: balances against the ledger, transfer outcomes against debits
    /// and credits, totals, stale holds and stuck transfers. Prints the report (a table, or
    /// --json), stores it (replacing an earlier one of the day) and publishes it to
    /// reconciliation.reports.
    ///
    /// Exit code: 0 no discrepancies, 1 discrepancies found, 3 the run could not finish.
    Reconcile(twophase_reconciler::ReconcileArgs),
    /// Run the reconciler: every day at reconciler.run_at (02:00 by default, in
    /// reconciler.time_zone) it reconciles the day before. Serves /metrics and /healthz.
    Reconciler(twophase_reconciler::ReconcilerArgs),
    /// Measure throughput and latency against a running system, then check the invariants.
    Bench(crate::bench::BenchArgs),
    /// Print the effective configuration (passwords, secrets and private keys masked).
    Config,
}

impl Command {
    /// The service name this command's spans are exported under.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Dev(_) => "twophase-dev",
            Command::Coordinator => "twophase-coordinator",
            Command::Account => "twophase-account",
            Command::Risk => "twophase-risk",
            Command::Audit(_) | Command::Transfers(_) => "twophase-audit",
            Command::Reconcile(_) | Command::Reconciler(_) => "twophase-reconciler",
            Command::Bench(_) => "twophase-bench",
            _ => "twophase-cli",
        }
    }
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create every saga topic (and its dead-letter topic) that does not exist yet.
    Create,
    /// List the saga topic names under the configured prefix.
    List,
}

#[derive(Debug, Subcommand)]
enum TransfersCommand {
    /// Show a transfer's timeline from the audit log: its request, prepare commands, votes,
    /// commit or abort commands, acks and outcome, in order, with the time between steps.
    ///
    /// Exit code: 0 found, 1 nothing of this transfer is audited.
    Show {
        /// The transfer id.
        id: String,
        /// Print the timeline as JSON, as GET /transfers/{id}/timeline answers it.
        #[arg(long)]
        json: bool,
    },
    /// List the transfers whose commit or abort has gone unacknowledged past the re-send
    /// threshold (coordinator.commit_stuck_after_attempts), the longest decided first, with the
    /// commands each still awaits: the ones the SagasStuck alert counts. Read from the
    /// coordinator's store.
    ///
    /// Exit code: 0 none is stuck, 1 some are.
    Stuck {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// Open an empty account.
    Open {
        /// The ISO 4217 code of the money it holds, e.g. USD; it never changes.
        #[arg(long)]
        currency: String,
    },
    /// Add money from outside (a ledger entry of kind deposit).
    Deposit {
        /// The account.
        id: Uuid,
        /// A positive decimal string in the account's currency, e.g. 100.00.
        #[arg(allow_negative_numbers = true)]
        amount: String,
        /// Names this movement (a payment or wire id): run again with it, as after an answer
        /// that never came, the deposit is not made twice; another amount under it is refused.
        #[arg(long)]
        reference: Option<String>,
    },
    /// Take money out (a ledger entry of kind withdrawal).
    Withdraw {
        /// The account.
        id: Uuid,
        /// A positive decimal string in the account's currency, no more than it has available.
        #[arg(allow_negative_numbers = true)]
        amount: String,
        /// Names this movement, as for deposit: the same withdrawal is not made twice.
        #[arg(long)]
        reference: Option<String>,
    },
    /// Show an account and its latest ledger entries.
    Show {
        /// The account.
        id: Uuid,
        /// How many of its latest ledger entries to show.
        #[arg(long, default_value_t = 10)]
        entries: u32,
        /// Print the account and its entries as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every account.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop an account from sending or receiving new transfers.
    Freeze { id: Uuid },
    /// Let a frozen account take part in transfers again.
    Unfreeze { id: Uuid },
    /// Close an empty account for good.
    Close { id: Uuid },
}

#[derive(Debug, clap::Args)]
struct TransferArgs {
    /// The account debited (a UUID).
    #[arg(long)]
    from: String,
    /// The account credited (a UUID), in the same currency.
    #[arg(long)]
    to: String,
    /// A decimal string, e.g. 12.34.
    #[arg(long, allow_negative_numbers = true)]
    amount: String,
    /// An ISO 4217 code.
    #[arg(long)]
    currency: String,
    /// The idempotency key; a new UUID if absent. Re-sending the same request with the same
    /// id is safe.
    #[arg(long)]
    id: Option<String>,
    /// Free text for your own bookkeeping, carried on the request; not interpreted.
    #[arg(long)]
    reference: Option<String>,
    /// Wait for the outcome and print it.
    #[arg(long)]
    wait: bool,
    /// How long the brokers have to take the request and, with --wait, the outcome to come.
    #[arg(long, default_value = "30s", value_parser = some_time)]
    timeout: Duration,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

/// About as long as `transfer --wait` takes to start watching for its outcome: joining a
/// consumer group and taking its partitions.
const WATCH_START: Duration = Duration::from_secs(5);

/// A duration longer than none, as `--timeout` takes it.
fn some_time(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("a wait of no time could never see an outcome".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses the command line, runs the command and maps the result to an exit code.
pub async fn main() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if let (Command::Dev(_), Some(flag)) = (&cli.command, cli.real_services_flag()) {
        eprintln!(
            "error: twophase dev runs its own in-memory broker and keeps its data in --data-dir, \
             so it takes no {flag}; that is for the workers on real services \
             (twophase coordinator, account, risk, ...)"
        );
        return EXIT_USAGE;
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::error_text(&e));
            if refused_by_the_account(&e) {
                EXIT_REFUSED
            } else {
                EXIT_ERROR
            }
        }
    }
}

/// Exit status of an account command that the account refused (an unknown account, funds it
/// does not have, a closed account), as of a transfer rejected: apart from a failure of the
/// command itself, which a script may retry.
const EXIT_REFUSED: u8 = 2;

fn refused_by_the_account(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<twophase_account::AccountError>()
        .is_some_and(|e| !matches!(e, twophase_account::AccountError::Database(_)))
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config: Config = twophase_runtime::config::load(cli.config.as_deref())
        .map_err(|e| anyhow::anyhow!(twophase_runtime::config::describe(&e)))
        .context("reading the configuration")?;
    if let Some(brokers) = &cli.brokers {
        config.kafka.brokers = brokers.clone();
    }
    if let Some(url) = &cli.database_url {
        config.database_url = url.clone();
    }
    let config = config.with_currency_codes_uppercased();
    config.validate()?;
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let config = load_config(&cli)?;
    if !matches!(cli.command, Command::Dev(_)) {
        config.validate_services()?;
    }
    // The demo reports in its own words: a log line per step of its thousand transfers would
    // bury its progress bar and summary.
    let default_log = match &cli.command {
        Command::Dev(args) if args.is_demo() => telemetry::LOG_WARNINGS,
        _ => telemetry::LOG_EVERY_STEP,
    };
    // Flushes the spans not yet exported when the command ends.
    let _telemetry = telemetry::init(config.log_json, cli.command.service_name(), default_log)?;
    let topics = Topics::new(&config.kafka.topic_prefix);
    match cli.command {
        Command::Dev(args) => return crate::dev::run(config, args).await,
        Command::Coordinator => {
            let db = pool(&config, twophase_coordinator::SCHEMA, db::Lookups::Keyed).await?;
            let mut settings = twophase_coordinator::Coordinator::settings(
                config.kafka.clone(),
                config.retry.clone(),
            );
            let (publisher, token) = start_worker(&config, &mut settings, &db, 9101).await?;
            twophase_coordinator::Coordinator::run(
                db,
                config.coordinator.clone(),
                settings,
                publisher,
                token,
            )
            .await?;
        }
        Command::Account => {
            let db = pool(&config, twophase_account::SCHEMA, db::Lookups::Keyed).await?;
            let mut settings = twophase_account::AccountWorker::settings(
                config.kafka.clone(),
                config.retry.clone(),
            );
            let (publisher, token) = start_worker(&config, &mut settings, &db, 9102).await?;
            twophase_account::AccountWorker::run(db, settings, publisher, token).await?;
        }
        Command::Risk => {
            let db = pool(&config, twophase_risk::SCHEMA, db::Lookups::Keyed).await?;
            let mut settings =
                twophase_risk::RiskWorker::settings(config.kafka.clone(), config.retry.clone());
            let (publisher, token) = start_worker(&config, &mut settings, &db, 9104).await?;
            twophase_risk::RiskWorker::run(db, config.risk.clone(), settings, publisher, token)
                .await?;
        }
        Command::Migrate => {
            db::migrate(&config.database_url)
                .await
                .context("applying migrations")?;
            outln!("migrations applied");
        }
        Command::Topics(TopicsCommand::Create) => {
            kafka::ensure_topics(&config.kafka, &topics.all())
                .await
                .context("creating topics")?;
            for t in topics.all() {
                outln!("{t}");
            }
        }
        Command::Topics(TopicsCommand::List) => {
            for t in topics.all() {
                outln!("{t}");
            }
        }
        Command::Accounts(command) => return accounts(&config, command).await,
        Command::Transfer(args) => return transfer(&config, args).await,
        Command::Schema { message_type } => {
            let schemas = twophase_messages::json_schemas();
            let chosen: Vec<_> = schemas
                .iter()
                .filter(|(t, _)| message_type.as_deref().is_none_or(|m| m == *t))
                .collect();
            if chosen.is_empty() {
                let known: Vec<_> = schemas.iter().map(|(t, _)| *t).collect();
                anyhow::bail!(
                    "no message type {:?}; the types are: {}",
                    message_type.unwrap_or_default(),
                    known.join(", ")
                );
            }
            let out: serde_json::Map<String, serde_json::Value> = chosen
                .into_iter()
                .map(|(t, s)| ((*t).to_owned(), s.clone()))
                .collect();
            outln!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Dlq(command) => return crate::dlq::run(&config.kafka, command).await,
        Command::Audit(args) => {
            let services = twophase_audit::cli::Services {
                database_url: &config.database_url,
                max_connections: config.database_max_connections,
                kafka: &config.kafka,
                retry: &config.retry,
                audit: &config.audit,
                metrics_listen: config.metrics_listen,
            };
            return twophase_audit::cli::audit(services, args).await;
        }
        Command::Transfers(TransfersCommand::Show { id, json }) => {
            return twophase_audit::cli::timeline(&config.database_url, &id, json).await
        }
        Command::Transfers(TransfersCommand::Stuck { json }) => return stuck(&config, json).await,
        Command::Reconcile(args) => {
            return twophase_reconciler::reconcile_command(reconciler_settings(&config), args).await
        }
        Command::Reconciler(args) => {
            return twophase_reconciler::reconciler_command(reconciler_settings(&config), args)
                .await
        }
        Command::Bench(args) => return crate::bench::run(&config, args).await,
        Command::Config => out!("{}", config.redacted_toml()),
    }
    Ok(0)
}

fn reconciler_settings(config: &Config) -> twophase_reconciler::Settings {
    twophase_reconciler::Settings {
        database_url: config.database_url.clone(),
        kafka: config.kafka.clone(),
        config: config.reconciler.clone(),
        metrics_listen: config.metrics_listen,
    }
}

async fn pool(config: &Config, schema: &str, lookups: db::Lookups) -> anyhow::Result<db::Db> {
    db::Db::connect_for(
        &config.database_url,
        schema,
        config.database_max_connections,
        lookups,
    )
    .await
    .with_context(|| {
        format!(
            "connecting to {}",
            crate::config::redact_url(&config.database_url)
        )
    })
}

/// What every worker needs before it consumes: its topics, a producer, a shutdown signal, and
/// `/metrics` and `/healthz` on `metrics_listen` (by default loopback, `default_port`).
async fn start_worker(
    config: &Config,
    settings: &mut twophase_runtime::worker::WorkerSettings,
    db: &db::Db,
    default_port: u16,
) -> anyhow::Result<(Publisher, twophase_runtime::CancellationToken)> {
    let topics = Topics::new(&config.kafka.topic_prefix);
    kafka::ensure_topics(&config.kafka, &topics.all())
        .await
        .context("creating topics")?;
    let publisher = Publisher::new(&config.kafka)?;
    let token = shutdown::on_signal();
    settings.health = http::Health::of_database(db);
    let listen = config
        .metrics_listen
        .unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], default_port)));
    http::serve(listen, settings.health.clone(), token.clone())
        .await
        .context("set metrics_listen (TWOPHASE_METRICS_LISTEN) to a free address")?;
    Ok((publisher, token))
}

/// `twophase transfers stuck`.
async fn stuck(config: &Config, json: bool) -> anyhow::Result<u8> {
    let db = pool(config, twophase_coordinator::SCHEMA, db::Lookups::Any).await?;
    let stuck = twophase_coordinator::stuck_transfers(&db, &config.coordinator).await;
    db.close().await;
    let stuck = stuck.context("reading the transfers in flight")?;
    let code = u8::from(!stuck.is_empty());
    if json {
        outln!("{}", serde_json::to_string_pretty(&stuck)?);
        return Ok(code);
    }
    if stuck.is_empty() {
        outln!("no transfer is stuck in commit or abort");
    }
    for t in &stuck {
        outln!(
            "{}  {:<10}  awaiting {:<21}  re-sent {:>3} times  decided {}  {} {} from {} to {}",
            t.transfer_id,
            t.status,
            t.awaiting.join(", "),
            t.attempts,
            t.decided_at.map_or("-".to_owned(), |at| at
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()),
            t.amount.map_or("-".to_owned(), |a| a.to_string()),
            t.currency.as_deref().unwrap_or("-"),
            t.from_account.map_or("-".to_owned(), |a| a.to_string()),
            t.to_account.map_or("-".to_owned(), |a| a.to_string()),
        );
    }
    Ok(code)
}

async fn accounts(config: &Config, command: AccountsCommand) -> anyhow::Result<u8> {
    use twophase_account::store;
    let pool = pool(config, twophase_account::SCHEMA, db::Lookups::Any).await?;
    // Amounts with their currency's decimals, as money is read: 0.00 USD, not 0.
    let written = |mut a: twophase_account::Account| {
        a.balance = in_minor_units(a.balance, &a.currency);
        a.held = in_minor_units(a.held, &a.currency);
        a
    };
    let show = |a: &twophase_account::Account| {
        outln!(
            "{}  {}  {}  balance {}  held {}  available {}",
            a.account_id,
            a.currency,
            a.status,
            a.balance,
            a.held,
            a.available()
        );
    };
    let moved = |m: &twophase_account::Moved| {
        if let Some(entry) = m.earlier_entry {
            eprintln!("already made under this reference (ledger entry {entry}): nothing changed");
        }
        show(&written(m.account.clone()));
    };
    match command {
        AccountsCommand::Open { currency } => {
            let a = store::open(&pool, &currency).await?;
            outln!("{}", a.account_id);
        }
        AccountsCommand::Deposit {
            id,
            amount,
            reference,
        } => moved(&store::deposit(&pool, id, &amount, reference.as_deref()).await?),
        AccountsCommand::Withdraw {
            id,
            amount,
            reference,
        } => moved(&store::withdraw(&pool, id, &amount, reference.as_deref()).await?),
        AccountsCommand::Show { id, entries, json } => {
            let account = written(store::get(&pool, id).await?);
            let mut ledger = store::ledger(&pool, id, i64::from(entries)).await?;
            for e in &mut ledger {
                e.amount = in_minor_units(e.amount, &e.currency);
                e.balance_after = in_minor_units(e.balance_after, &e.currency);
            }
            if json {
                let out = serde_json::json!({ "account": account, "ledger": ledger });
                outln!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                show(&account);
                for e in ledger {
                    outln!(
                        "  #{:<6} {}  {:<10} {:>14}  balance {:>14}  {}",
                        e.entry_id,
                        e.created_at.format("%Y-%m-%d %H:%M:%S"),
                        e.kind,
                        e.amount,
                        e.balance_after,
                        e.transfer_id
                            .map(|t| format!("transfer {t}"))
                            .or(e.reference)
                            .unwrap_or_default()
                    );
                }
            }
        }
        AccountsCommand::List { json } => {
            let all: Vec<_> = store::list(&pool).await?.into_iter().map(written).collect();
            if json {
                outln!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                all.iter().for_each(show);
            }
        }
        AccountsCommand::Freeze { id } => show(&written(
            store::set_status(&pool, id, AccountStatus::Frozen).await?,
        )),
        AccountsCommand::Unfreeze { id } => show(&written(
            store::set_status(&pool, id, AccountStatus::Active).await?,
        )),
        AccountsCommand::Close { id } => show(&written(
            store::set_status(&pool, id, AccountStatus::Closed).await?,
        )),
    }
    Ok(0)
}

/// `step`'s result if it comes within `left`, of a `timeout` given for all the steps.
async fn within<T>(
    left: Duration,
    timeout: Duration,
    step: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(left, step)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(timeout)))?
}

async fn transfer(config: &Config, args: TransferArgs) -> anyhow::Result<u8> {
    // Outcomes carry a transfer id in its lower-case hyphenated form, whatever form the
    // request spelled it in: so the request does too, and the wait looks for that.
    let transfer_id = match args.id {
        Some(id) => Uuid::parse_str(&id).map_or(id, |id| id.to_string()),
        None => Uuid::new_v4().to_string(),
    };
    let request = TransferRequested {
        transfer_id,
        from_account: args.from,
        to_account: args.to,
        amount: args.amount,
        currency: args.currency,
        reference: args.reference,
    };
    let reaching = || format!("reaching the Kafka brokers at {}", config.kafka.brokers);
    // The watcher starts before the request is published, so the outcome cannot slip past.
    // Both count against --timeout.
    let started = tokio::time::Instant::now();
    let watcher = if args.wait {
        let start = OutcomeWatcher::start(&config.kafka);
        Some(
            within(args.timeout, args.timeout, start)
                .await
                .with_context(|| {
                    // A timeout this short may end first, whatever the brokers do.
                    let timed_out = started.elapsed() >= args.timeout;
                    let hint = if timed_out && args.timeout < WATCH_START {
                        ", which takes a second or two where they answer at once"
                    } else {
                        ""
                    };
                    format!("{} to watch for the outcome{hint}", reaching())
                })?,
        )
    } else {
        None
    };
    let publisher = Publisher::new(&config.kafka)?;
    let send = client::request_transfer(&publisher, &config.kafka, &request);
    let left = args.timeout.saturating_sub(started.elapsed());
    // A request the brokers did not acknowledge may still have reached them. Its id, which
    // the command may have made up, is what lets it be sent again without being made twice.
    let sent = within(left, args.timeout, send).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: {}; transfer {} may have reached them all the same, and sending it again \
             with --id {2} is safe: an id is applied once",
            reaching(),
            output::error_text(&e),
            request.transfer_id
        )
    })?;
    let Some(watcher) = watcher else {
        outln!("{}", request.transfer_id);
        return Ok(0);
    };
    let left = args.timeout.saturating_sub(started.elapsed());
    let answer = watcher.wait_for_answer(&request, &sent, left).await;
    let Some(outcome) = &answer else {
        eprintln!(
            "no outcome for transfer {} within {}; it may still complete: look again with the same --id",
            request.transfer_id,
            humantime::format_duration(args.timeout)
        );
        return Ok(EXIT_ERROR);
    };
    if args.json {
        let value = match outcome {
            Outcome::Completed(m) => serde_json::to_value(m)?,
            Outcome::Failed(m) => serde_json::to_value(m)?,
            Outcome::Rejected(m) => serde_json::to_value(m)?,
        };
        let out = serde_json::json!({ "status": outcome.status(), "outcome": value });
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match outcome {
            Outcome::Completed(m) => outln!(
                "completed  transfer {}  {} {} from {} to {}",
                m.transfer_id,
                m.amount,
                m.currency,
                m.from_account,
                m.to_account
            ),
            Outcome::Failed(m) => outln!(
                "failed  transfer {}  reason {}{}",
                m.transfer_id,
                m.reason,
                m.participant
                    .map(|p| format!(" (voted no: {})", p.as_str()))
                    .unwrap_or_default()
            ),
            Outcome::Rejected(m) => outln!(
                "rejected  transfer {}  reason {}: {}",
                m.transfer_id,
                m.reason,
                m.detail
            ),
        }
    }
    Ok(outcome.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `twophase transfer` between two accounts in USD, and then `amount`'s arguments.
    fn transfer(amount: &[&str]) -> Result<Cli, clap::Error> {
        let head = ["twophase", "transfer", "--from", "a", "--to", "b"];
        let tail = ["--currency", "USD"];
        Cli::try_parse_from(head.iter().chain(&tail).chain(amount))
    }

    /// A negative amount reaches the transfer's validation, which says why it is refused, rather
    /// than being taken for a flag the command does not know.
    #[test]
    fn a_negative_amount_is_read_as_an_amount() {
        let cli = transfer(&["--amount", "-1.00"]).unwrap();
        let Command::Transfer(args) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.amount, "-1.00");
        // A flag where the amount should be is not taken for one.
        let missing = transfer(&["--amount", "--wait"]);
        assert!(missing.is_err(), "{missing:?}");
    }
}
