//! The test harness: a fresh database and fresh topics per test, workers started as separate
//! `twophase` processes, and the invariants of DESIGN §4 checked against the database.
//!
//! With `TWOPHASE_TEST_DATABASE_URL` and `TWOPHASE_TEST_BROKERS` set (`scripts/services.sh env`
//! prints them) the tests run on the real services; without them, on the embedded default: a
//! mock Kafka cluster in the test process and SQLite files, so that `cargo test` passes on a
//! machine with nothing installed. The workers are the same processes either way.

#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use rust_decimal::Decimal;
use twophase::client::{self, Outcome, OutcomeWatcher};
use twophase_messages::{Topics, TransferRequested};
use twophase_runtime::db::{Amount, Db};
use twophase_runtime::embedded::EmbeddedBroker;
use twophase_runtime::{failpoint, query_as, KafkaConfig, Publisher};
use uuid::Uuid;

/// One test's world: its own database, topic prefix and consumer groups.
pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub kafka: KafkaConfig,
    pub topics: Topics,
    /// Sees every worker's schema by name (`account.accounts`).
    pub db: Db,
    pub publisher: Publisher,
    pub log_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    workers: Vec<Worker>,
    /// How many times each kind of worker was started: its next log's number.
    starts: HashMap<String, usize>,
    /// The mock cluster, when running on the embedded default. Dropped last.
    broker: Option<EmbeddedBroker>,
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

impl TestEnv {
    /// A fresh database (migrated) and a fresh topic prefix (topics created).
    pub async fn new(name: &str) -> TestEnv {
        let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{suffix}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let prefix = format!("{name}-{suffix}.");
        let topics = Topics::new(&prefix);
        let real = (
            std::env::var("TWOPHASE_TEST_DATABASE_URL"),
            std::env::var("TWOPHASE_TEST_BROKERS"),
        );
        let (database_url, brokers, broker) = match real {
            (Ok(admin_url), Ok(brokers)) => {
                let db_name = format!("t_{}_{suffix}", name.replace('-', "_"));
                (
                    twophase_runtime::db::create_database(&admin_url, &db_name)
                        .await
                        .expect("a test database can be created"),
                    brokers,
                    None,
                )
            }
            (Err(_), Err(_)) => {
                let broker =
                    EmbeddedBroker::start(&topics.all(), 4).expect("the mock cluster starts");
                let url = format!("sqlite:{}", log_dir.join("data").display());
                (url, broker.bootstrap_servers().to_owned(), Some(broker))
            }
            // Half the real services would be the embedded default passed off as them.
            _ => panic!(
                "TWOPHASE_TEST_DATABASE_URL and TWOPHASE_TEST_BROKERS go together, and only \
                 one is set: set both for the real services (scripts/test.sh) or neither"
            ),
        };
        twophase_runtime::db::migrate(&database_url)
            .await
            .expect("migrations apply");
        let db = Db::connect_all(&database_url).await.unwrap();
        let kafka = KafkaConfig {
            brokers,
            topic_prefix: prefix,
            group_prefix: format!("{name}-{suffix}"),
            ..KafkaConfig::default()
        };
        twophase_runtime::kafka::ensure_topics(&kafka, &topics.all())
            .await
            .expect("topics can be created");
        let publisher = Publisher::new(&kafka).unwrap();
        eprintln!(
            "test {name}: {} and {}, logs in {}",
            if broker.is_some() {
                "embedded broker"
            } else {
                "Kafka"
            },
            twophase::config::redact_url(&database_url),
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
            starts: HashMap::new(),
            broker,
        }
    }

    /// Whether this test runs on the embedded default rather than the real services.
    pub fn embedded(&self) -> bool {
        self.broker.is_some()
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
            // Any free port: several workers of one kind run side by side.
            .env("TWOPHASE_METRICS_LISTEN", "127.0.0.1:0")
            .env_remove("TWOPHASE_CONFIG")
            .env("RUST_LOG", "info,twophase=debug");
        if let Some(file) = &self.config_file {
            cmd.arg("--config").arg(file);
        }
        cmd
    }

    /// Starts a worker process (`coordinator`, `account`, `risk`).
    pub fn start(&mut self, worker: &str) {
        self.start_with(worker, &[]);
    }

    /// Starts a worker process with extra environment variables.
    pub fn start_with(&mut self, worker: &str, env: &[(&str, &str)]) {
        // Numbered by start, so that a restarted worker does not write over its predecessor's.
        let started = self.starts.entry(worker.to_owned()).or_default();
        let n = *started;
        *started += 1;
        let log = std::fs::File::create(self.log_dir.join(format!("{worker}-{n}.log"))).unwrap();
        let child = self
            .command()
            .arg(worker)
            .envs(env.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the twophase binary starts");
        self.workers.push(Worker {
            name: worker.to_owned(),
            child,
        });
    }

    /// Waits until the newest `worker` process ends by itself; how it ended.
    pub async fn wait_exit(&mut self, worker: &str, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        let w = self
            .workers
            .iter_mut()
            .rev()
            .find(|w| w.name == worker)
            .expect("the worker was started");
        loop {
            if let Some(status) = w.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{worker} did not exit within {timeout:?} (logs in {})",
                self.log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log of the newest `worker` process.
    pub fn newest_log(&self, worker: &str) -> PathBuf {
        let n = self.starts[worker] - 1;
        self.log_dir.join(format!("{worker}-{n}.log"))
    }

    /// Starts a worker serving `/metrics` and `/healthz` on a free loopback port, and returns
    /// the port once it serves. The port is the one the worker bound and said in its log: one
    /// picked beforehand could be taken by a test running beside it in between.
    pub async fn start_serving(&mut self, worker: &str, env: &[(&str, &str)]) -> u16 {
        let mut all = vec![("TWOPHASE_METRICS_LISTEN", "127.0.0.1:0")];
        all.extend_from_slice(env);
        self.start_with(worker, &all);
        self.bound(worker, "serving /metrics and /healthz")
            .await
            .port()
    }

    /// The address the newest `worker` process says, in the log line containing `what`, that
    /// it bound (`bound=ADDR`), once it has said it.
    pub async fn bound(&self, worker: &str, what: &str) -> std::net::SocketAddr {
        let path = self.newest_log(worker);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let bound = log.lines().filter(|l| l.contains(what)).find_map(|l| {
                l.split("bound=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
            if let Some(addr) = bound {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{worker} never said it was {what} (logs in {})",
                self.log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the newest `worker` process is killed by the failpoint it was started with.
    pub async fn wait_failpoint(&mut self, worker: &str, timeout: Duration) {
        let status = self.wait_exit(worker, timeout).await;
        let log = std::fs::read_to_string(self.newest_log(worker));
        // The signal, and the failpoint saying it sent it: not some other SIGKILL.
        let by_failpoint = log.is_ok_and(|l| l.lines().any(|l| l.starts_with("failpoint ")));
        assert!(
            status.signal() == Some(failpoint::SIGNAL.as_raw()) && by_failpoint,
            "{worker} was to be killed by its failpoint, but {status} (logs in {})",
            self.log_dir.display()
        );
    }

    /// SIGKILLs the newest `worker` process.
    pub fn kill(&mut self, worker: &str) {
        let at = self
            .workers
            .iter()
            .rposition(|w| w.name == worker)
            .expect("the worker was started");
        // Dropping a worker kills it with SIGKILL and reaps it.
        self.workers.remove(at);
    }

    /// SIGKILLs the `pick`-th (modulo how many run) `worker` process.
    pub fn kill_one(&mut self, worker: &str, pick: usize) {
        let running: Vec<usize> = (0..self.workers.len())
            .filter(|i| self.workers[*i].name == worker)
            .collect();
        assert!(!running.is_empty(), "no {worker} is running");
        self.workers.remove(running[pick % running.len()]);
    }

    /// Waits until a counting query returns `n`.
    pub async fn wait_count(&self, sql: &str, n: i64, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let found = self.count(sql).await;
            if found == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{sql} is {found}, not {n}, after {timeout:?} (logs in {})",
                self.log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        let db = self.pool("account").await;
        let account = twophase_account::store::open(&db, currency).await.unwrap();
        if deposit != "0" {
            twophase_account::store::deposit(&db, account.account_id, deposit, None)
                .await
                .unwrap();
        }
        db.close().await;
        account.account_id
    }

    /// A pool that sees one worker's schema.
    pub async fn pool(&self, schema: &str) -> Db {
        Db::connect(&self.database_url, schema, 5).await.unwrap()
    }

    /// Runs a counting query (`SELECT count(*) …`) across schemas.
    pub async fn count(&self, sql: &str) -> i64 {
        let mut tx = self.db.begin().await.unwrap();
        let (n,) = query_as!(&mut tx, (i64,), fetch_one, sql).unwrap();
        tx.commit().await.unwrap();
        n
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
        let mut tx = self.db.begin().await.unwrap();
        let (balance, held) = query_as!(
            &mut tx,
            (Amount, Amount),
            fetch_one,
            "SELECT balance, held FROM account.accounts WHERE account_id = $1",
            account
        )
        .unwrap();
        tx.commit().await.unwrap();
        (balance.0, held.0)
    }

    /// Checks invariants 1–4 of DESIGN §4 against the database; panics listing what is broken.
    pub async fn check_invariants(&self) {
        let report = twophase::invariants::check(&self.db).await.unwrap();
        assert!(
            report.holds(),
            "invariants broken (logs in {}):\n{}",
            self.log_dir.display(),
            report.violations.join("\n")
        );
    }
}

/// Runs `cmd` (such as [`TestEnv::command`] with its arguments) to its end on a blocking
/// thread, so that the workers' test tasks go on meanwhile; its exit status and output.
pub async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("the twophase binary runs"))
        .await
        .unwrap()
}

/// A plain HTTP/1.0 GET (the server closes the connection after answering): status and body,
/// or nothing if nobody answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Whether the tests run on the real PostgreSQL; if not, says that the test, which `does`
/// something only PostgreSQL can take, is skipped.
pub fn on_postgres(does: &str) -> bool {
    let real = std::env::var("TWOPHASE_TEST_DATABASE_URL").is_ok();
    if !real {
        eprintln!("skipped: this test {does}; it needs TWOPHASE_TEST_DATABASE_URL");
    }
    real
}

/// The value of the series `name` whose labels include every one of `labels`, in a scrape of
/// the worker's `/metrics` on loopback `port`; nothing if it does not answer or has no such
/// series.
pub async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, scrape) = http_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "/metrics",
    )
    .await?;
    scrape.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        let pairs: Vec<&str> = series_labels.trim_end_matches('}').split(',').collect();
        let wanted = labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
        (series_name == name && wanted).then(|| value.parse().ok())?
    })
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

/// The outcome of one transfer, waited for on `watcher` for at most `timeout`; panics if none
/// came.
pub async fn outcome_of(watcher: &OutcomeWatcher, transfer_id: &str, timeout: Duration) -> Outcome {
    watcher
        .wait_for([transfer_id.to_owned()], timeout)
        .await
        .unwrap()
        .remove(transfer_id)
        .unwrap_or_else(|| panic!("no outcome for transfer {transfer_id} within {timeout:?}"))
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
