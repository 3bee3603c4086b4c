//! The test harness: a fresh database and fresh topics per test, workers started as separate
//! `twophase` processes, and the invariants of DESIGN §4 checked against the database.
//!
//! The services come from `TWOPHASE_TEST_DATABASE_URL` and `TWOPHASE_TEST_BROKERS`
//! (`scripts/services.sh env` prints them).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;
use twophase::client::{self, Outcome, OutcomeWatcher};
use twophase_messages::{Topics, TransferRequested};
use twophase_runtime::{KafkaConfig, Publisher};
use uuid::Uuid;

/// One test's world: its own database, topic prefix and consumer groups.
pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub db: PgPool,
    pub publisher: Publisher,
    pub log_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    workers: Vec<Worker>,
}

/// A worker process; killed when dropped.
pub struct Worker {
    pub name: String,
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the services with `scripts/services.sh start` and \
             `eval \"$(scripts/services.sh env)\"`, or run `scripts/test.sh`"
        )
    })
}

impl TestEnv {
    /// A fresh database (migrated) and a fresh topic prefix (topics created).
    pub async fn new(name: &str) -> TestEnv {
        let admin_url = required_env("TWOPHASE_TEST_DATABASE_URL");
        let brokers = required_env("TWOPHASE_TEST_BROKERS");
        let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let db_name = format!("t_{}_{suffix}", name.replace('-', "_"));
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .expect("the test database server answers");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin)
            .await
            .expect("a test database can be created");
        admin.close().await;
        let options = PgConnectOptions::from_str(&admin_url)
            .unwrap()
            .database(&db_name);
        let database_url = options.to_url_lossy().to_string();
        twophase_runtime::db::migrate(&database_url)
            .await
            .expect("migrations apply");
        let db = PgPoolOptions::new()
            .max_connections(5)
            .connect(&database_url)
            .await
            .unwrap();
        let kafka = KafkaConfig {
            brokers,
            topic_prefix: format!("{name}-{suffix}."),
            group_prefix: format!("{name}-{suffix}"),
            ..KafkaConfig::default()
        };
        let topics = Topics::new(&kafka.topic_prefix);
        twophase_runtime::kafka::ensure_topics(&kafka, &topics.all())
            .await
            .expect("topics can be created");
        let publisher = Publisher::new(&kafka).unwrap();
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{suffix}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        eprintln!(
            "test {name}: database {db_name}, logs in {}",
            log_dir.display()
        );
        TestEnv {
            name: name.to_owned(),
            database_url,
            kafka,
            topics,
            db,
            publisher,
            log_dir,
            config_file: None,
            workers: Vec::new(),
        }
    }

    /// Writes a TOML configuration file every worker started afterwards reads.
    pub fn with_config(&mut self, toml: &str) {
        let path = self.log_dir.join("twophase.toml");
        std::fs::write(&path, toml).unwrap();
        self.config_file = Some(path);
    }

    /// The `twophase` command with this test's services in its environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twophase"));
        cmd.env("TWOPHASE_DATABASE_URL", &self.database_url)
            .env("TWOPHASE_KAFKA__BROKERS", &self.kafka.brokers)
            .env("TWOPHASE_KAFKA__TOPIC_PREFIX", &self.kafka.topic_prefix)
            .env("TWOPHASE_KAFKA__GROUP_PREFIX", &self.kafka.group_prefix)
            .env("TWOPHASE_COORDINATOR__RESEND_AFTER", "2s")
            .env_remove("TWOPHASE_CONFIG")
            .env("RUST_LOG", "info,twophase=debug");
        if let Some(file) = &self.config_file {
            cmd.arg("--config").arg(file);
        }
        cmd
    }

    /// Starts a worker process (`coordinator`, `account`, `risk`).
    pub fn start(&mut self, worker: &str) {
        let n = self.workers.iter().filter(|w| w.name == worker).count();
        let log = std::fs::File::create(self.log_dir.join(format!("{worker}-{n}.log"))).unwrap();
        let child = self
            .command()
            .arg(worker)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the twophase binary starts");
        self.workers.push(Worker {
            name: worker.to_owned(),
            child,
        });
    }

    /// Starts one coordinator, `accounts` account workers and one risk worker.
    pub fn start_all(&mut self, accounts: usize) {
        self.start("coordinator");
        for _ in 0..accounts {
            self.start("account");
        }
        self.start("risk");
    }

    pub async fn open_account(&self, currency: &str, deposit: &str) -> Uuid {
        let pool = self.pool("account").await;
        let account = twophase_account::store::open(&pool, currency)
            .await
            .unwrap();
        if deposit != "0" {
            twophase_account::store::deposit(&pool, account.account_id, deposit, None)
                .await
                .unwrap();
        }
        account.account_id
    }

    /// A pool that sees one worker's schema.
    pub async fn pool(&self, schema: &str) -> PgPool {
        twophase_runtime::db::connect(&self.database_url, schema, 5)
            .await
            .unwrap()
    }

    pub async fn watcher(&self) -> OutcomeWatcher {
        OutcomeWatcher::start(&self.kafka).await.unwrap()
    }

    pub async fn request(&self, request: &TransferRequested) {
        client::request_transfer(&self.publisher, &self.kafka, request)
            .await
            .unwrap();
    }

    /// Publishes each request and waits for all outcomes.
    pub async fn run_transfers(
        &self,
        requests: &[TransferRequested],
        timeout: Duration,
    ) -> HashMap<String, Outcome> {
        let watcher = self.watcher().await;
        let sends = requests.iter().map(|r| self.request(r));
        futures::future::join_all(sends).await;
        let outcomes = watcher
            .wait_for(requests.iter().map(|r| r.transfer_id.clone()), timeout)
            .await
            .unwrap();
        assert_eq!(
            outcomes.len(),
            requests.len(),
            "every transfer has an outcome within {timeout:?} (logs in {})",
            self.log_dir.display()
        );
        outcomes
    }

    pub async fn transfer(&self, request: &TransferRequested) -> Outcome {
        let mut outcomes = self
            .run_transfers(std::slice::from_ref(request), Duration::from_secs(60))
            .await;
        outcomes.remove(&request.transfer_id).unwrap()
    }

    pub async fn balance(&self, account: Uuid) -> (Decimal, Decimal) {
        sqlx::query_as("SELECT balance, held FROM account.accounts WHERE account_id = $1")
            .bind(account)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Checks invariants 1–4 of DESIGN §4 against the database; panics naming the first broken.
    pub async fn check_invariants(&self) {
        let db = &self.db;
        // 1. Conservation: balances sum to deposits minus withdrawals.
        let (total, external): (Option<Decimal>, Option<Decimal>) = sqlx::query_as(
            "SELECT (SELECT sum(balance) FROM account.accounts),
                    (SELECT sum(CASE kind WHEN 'deposit' THEN amount WHEN 'withdrawal' THEN -amount ELSE 0 END)
                     FROM account.ledger)",
        )
        .fetch_one(db)
        .await
        .unwrap();
        assert_eq!(total, external, "invariant 1 (conservation) broken");

        // 2. No overdraft, and each balance and hold replays from the ledger and the holds.
        let accounts: Vec<AccountCheck> = sqlx::query_as(
            "SELECT a.account_id, a.balance, a.held,
                    (SELECT sum(CASE WHEN kind IN ('deposit', 'credit') THEN amount ELSE -amount END)
                     FROM account.ledger l WHERE l.account_id = a.account_id) AS replayed,
                    (SELECT sum(amount) FROM account.holds h
                     WHERE h.account_id = a.account_id AND h.status = 'held') AS open_holds
             FROM account.accounts a",
        )
        .fetch_all(db)
        .await
        .unwrap();
        for AccountCheck {
            account_id: id,
            balance,
            held,
            replayed,
            open_holds,
        } in accounts
        {
            assert!(
                balance - held >= Decimal::ZERO,
                "invariant 2 (no overdraft) broken on {id}"
            );
            assert_eq!(
                balance,
                replayed.unwrap_or_default(),
                "balance of {id} does not replay from its ledger"
            );
            assert_eq!(
                held,
                open_holds.unwrap_or_default(),
                "held of {id} is not the sum of its open holds"
            );
        }

        // 3. Atomic outcome: terminal; completed ⇒ one debit and one credit of the amount;
        //    failed/rejected ⇒ no ledger entry and nothing left held or reserved.
        let transfers: Vec<TransferCheck> = sqlx::query_as(
            "SELECT transfer_id, status, from_account, to_account, amount FROM coordinator.transfers",
        )
        .fetch_all(db)
        .await
        .unwrap();
        let entries: Vec<(Uuid, Uuid, String, Decimal)> = sqlx::query_as(
            "SELECT transfer_id, account_id, kind, amount FROM account.ledger WHERE transfer_id IS NOT NULL",
        )
        .fetch_all(db)
        .await
        .unwrap();
        let open: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT transfer_id FROM account.holds WHERE status = 'held'
             UNION ALL SELECT transfer_id FROM account.credits WHERE status = 'reserved'",
        )
        .fetch_all(db)
        .await
        .unwrap();
        let mut by_transfer: HashMap<Uuid, Vec<(Uuid, String, Decimal)>> = HashMap::new();
        for (t, a, k, amt) in entries {
            by_transfer.entry(t).or_default().push((a, k, amt));
        }
        for TransferCheck {
            transfer_id: id,
            status,
            from_account: from,
            to_account: to,
            amount,
        } in &transfers
        {
            let mut ledger = by_transfer.remove(id).unwrap_or_default();
            match status.as_str() {
                "completed" => {
                    ledger.sort_by(|a, b| a.1.cmp(&b.1));
                    let expected = vec![
                        (to.unwrap(), "credit".to_owned(), amount.unwrap()),
                        (from.unwrap(), "debit".to_owned(), amount.unwrap()),
                    ];
                    assert_eq!(
                        ledger, expected,
                        "invariant 3: completed transfer {id} has the wrong ledger entries"
                    );
                }
                "failed" | "rejected" => {
                    assert!(
                        ledger.is_empty(),
                        "invariant 3: {status} transfer {id} moved money: {ledger:?}"
                    )
                }
                other => panic!("invariant 3: transfer {id} is not terminal: {other}"),
            }
            if status != "completed" {
                assert!(
                    !open.iter().any(|(t,)| t == id),
                    "invariant 3: {status} transfer {id} left a hold or reserved credit"
                );
            }
        }
        // 4. Exactly once: no ledger entry without a transfer the coordinator knows.
        assert!(
            by_transfer.is_empty(),
            "ledger entries of unknown transfers: {by_transfer:?}"
        );
        assert!(
            open.is_empty(),
            "holds or credits left open after every transfer ended: {open:?}"
        );
    }
}

#[derive(sqlx::FromRow)]
struct AccountCheck {
    account_id: Uuid,
    balance: Decimal,
    held: Decimal,
    replayed: Option<Decimal>,
    open_holds: Option<Decimal>,
}

#[derive(sqlx::FromRow)]
struct TransferCheck {
    transfer_id: Uuid,
    status: String,
    from_account: Option<Uuid>,
    to_account: Option<Uuid>,
    amount: Option<Decimal>,
}

pub fn request(from: Uuid, to: Uuid, amount: &str, currency: &str) -> TransferRequested {
    TransferRequested {
        transfer_id: Uuid::new_v4().to_string(),
        from_account: from.to_string(),
        to_account: to.to_string(),
        amount: amount.to_owned(),
        currency: currency.to_owned(),
        reference: None,
    }
}

/// Asserts an outcome's status and reason.
#[track_caller]
pub fn assert_outcome(outcome: &Outcome, status: &str, reason: Option<&str>) {
    assert_eq!(
        (outcome.status(), outcome.reason()),
        (status, reason),
        "unexpected outcome {outcome:?}"
    );
}
