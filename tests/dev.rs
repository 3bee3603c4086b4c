//! `twophase dev`: the embedded default runs the whole system with nothing installed, and a
//! restart on the same data directory keeps balances and history. Also the command line with
//! nothing running at all.

use std::path::Path;
use std::process::Command;

use rust_decimal::Decimal;
use serde_json::Value;

/// The exit code, stdout and stderr of `twophase args`.
fn twophase(args: &[&str]) -> (i32, String, String) {
    // Any free port for `dev`'s metrics and audit API: the default one may be taken, by
    // another test's demo among others.
    twophase_listening_on("127.0.0.1:0", args)
}

/// Runs `twophase <args>` with `dev`'s metrics and audit API on `listen`; its exit code,
/// standard output and standard error.
fn twophase_listening_on(listen: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twophase"))
        .args(args)
        .env("TWOPHASE_METRICS_LISTEN", listen)
        .env_remove("TWOPHASE_CONFIG")
        .env_remove("TWOPHASE_DATABASE_URL")
        .env_remove("TWOPHASE_KAFKA__BROKERS")
        .env_remove("RUST_LOG")
        .output()
        .expect("the twophase binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some(),
        "twophase {args:?} was killed: {stderr}"
    );
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        stderr.into_owned(),
    )
}

fn demo(dir: &Path, n: usize) -> Value {
    let (code, stdout, stderr) = twophase(&[
        "dev",
        "--data-dir",
        dir.to_str().unwrap(),
        "--demo",
        &n.to_string(),
        "--json",
    ]);
    let summary: Value = serde_json::from_str(&stdout).expect("the summary is JSON");
    assert_eq!(code, 0, "{summary:#}");
    // A run that went well logs no error, at its end (shutdown) included; nor, as a demo
    // reports in its own words, a line for each step of its transfers.
    let logged: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" INFO "))
        .collect();
    assert!(logged.is_empty(), "{logged:#?}");
    summary
}

/// Every account with its balance, as `twophase accounts list --json` shows it.
fn accounts(dir: &Path) -> Vec<(String, Decimal)> {
    let url = format!("sqlite:{}", dir.display());
    let (code, stdout, _) = twophase(&["--database-url", &url, "accounts", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    list.iter()
        .map(|a| {
            (
                a["account_id"].as_str().unwrap().to_owned(),
                a["balance"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_demo_settles_every_transfer_and_a_restart_keeps_the_books() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));

    let first = demo(&dir, 200);
    assert_eq!(first["terminal"], 200, "{first:#}");
    assert_eq!(first["discrepancies"], Value::Array(vec![]), "{first:#}");
    assert_eq!(first["accounts_checked"], 21);
    // The first transfer went out once the workers held their partitions, and the summary
    // says how long that took.
    let ready = first["workers_ready_seconds"].as_f64();
    assert!(ready.is_some_and(|s| s > 0.0), "{first:#}");
    // The reconciler's report for the day: clean, with the demo's completed transfers counted.
    let reconciliation = &first["reconciliation"];
    assert_eq!(reconciliation["status"], "completed", "{reconciliation:#}");
    assert_eq!(reconciliation["discrepancies"], Value::Array(vec![]));
    let outcomes = first["outcomes"].as_object().unwrap();
    for kind in [
        "completed",
        "failed/destination_inactive",
        "rejected/too_many_decimals",
    ] {
        assert!(
            outcomes.get(kind).is_some_and(|n| n.as_u64() > Some(0)),
            "no {kind} in {first:#}"
        );
    }
    let after_first = accounts(&dir);
    let total: Decimal = after_first.iter().map(|a| a.1).sum();
    assert_eq!(total, Decimal::from(200_000), "money is conserved");

    // A restart starts an empty broker but keeps SQLite: the same accounts, the same balances.
    let idle = demo(&dir, 0);
    assert_eq!(idle["discrepancies"], Value::Array(vec![]));
    assert_eq!(accounts(&dir), after_first);

    let second = demo(&dir, 50);
    assert_eq!(second["terminal"], 50, "{second:#}");
    assert_eq!(second["discrepancies"], Value::Array(vec![]), "{second:#}");
    assert_eq!(
        second["reconciliation"]["status"], "completed",
        "{second:#}"
    );
    let total: Decimal = accounts(&dir).iter().map(|a| a.1).sum();
    assert_eq!(total, Decimal::from(200_000));
}

#[test]
fn a_worker_that_cannot_start_ends_the_demo_with_its_own_error() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // A typo in a consumer property: librdkafka refuses it when each worker creates its
    // consumer, after the demo has started waiting for the workers.
    let config = dir.join("typo.toml");
    std::fs::write(
        &config,
        "[kafka.consumer_properties]\n\"fetch.wait.max.mss\" = \"10\"\n",
    )
    .unwrap();
    let data = dir.join("data");
    let (code, stdout, stderr) = twophase(&[
        "--config",
        config.to_str().unwrap(),
        "dev",
        "--data-dir",
        data.to_str().unwrap(),
        "--demo",
        "5",
        "--json",
    ]);
    assert_ne!(code, 0, "{stdout}");
    assert!(stdout.is_empty(), "no summary: {stdout}");
    // The user is told what the worker was told, not that the workers are late.
    let error = error_line(&stderr);
    assert!(error.contains("Kafka consumer"), "{error}");
    assert!(error.contains("fetch.wait.max.mss"), "{error}");
}

/// The flags every other command takes to reach Kafka and the database: `dev` refuses them
/// before or after its name, and its help does not offer them.
#[test]
fn dev_refuses_the_flags_that_name_real_services() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));
    let data = dir.join("data");
    let (code, help, stderr) = twophase(&["dev", "--help"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(help.contains("--data-dir"), "{help}");
    let dev = ["dev", "--data-dir", data.to_str().unwrap(), "--demo", "1"];
    for (flag, value) in [
        ("--brokers", "kafka.example:9092"),
        ("--database-url", "postgres://db.example/twophase"),
    ] {
        assert!(!help.contains(flag), "{help}");
        for before in [true, false] {
            let args: Vec<&str> = if before {
                [flag, value].iter().chain(&dev).copied().collect()
            } else {
                dev.iter().chain(&[flag, value]).copied().collect()
            };
            let (code, stdout, stderr) = twophase(&args);
            assert_eq!(code, 64, "{stdout}{stderr}");
            assert!(stdout.is_empty(), "{stdout}");
            assert!(
                stderr.starts_with("error: twophase dev runs its own in-memory broker")
                    && stderr.contains(&format!("so it takes no {flag}")),
                "{stderr}"
            );
            // Nothing was started or written.
            assert!(!data.exists());
        }
    }
}

/// The real services' settings, set in the environment for other commands, do not stop the
/// demo, and are said to be unused rather than silently passed over.
#[test]
fn settings_for_the_real_services_are_said_to_be_unused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));
    let data = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_twophase"))
        .args([
            "dev",
            "--data-dir",
            data.to_str().unwrap(),
            "--demo",
            "1",
            "--json",
        ])
        .env("TWOPHASE_METRICS_LISTEN", "127.0.0.1:0")
        .env(
            "TWOPHASE_DATABASE_URL",
            "postgres://ops@db.example:5432/twophase",
        )
        .env("TWOPHASE_KAFKA__BROKERS", "kafka.example:9092")
        .env_remove("TWOPHASE_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for (key, env) in [
        ("database_url", "TWOPHASE_DATABASE_URL"),
        ("kafka.brokers", "TWOPHASE_KAFKA__BROKERS"),
    ] {
        let note = format!("note: {key} ({env}) is set but not used: twophase dev runs its own");
        assert!(stderr.contains(&note), "{stderr}");
    }
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["terminal"], 1, "{summary:#}");
}

#[test]
fn an_address_in_use_is_said_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));
    let data = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_twophase"))
        .args(["dev", "--data-dir", data.to_str().unwrap(), "--demo", "1"])
        .env("TWOPHASE_METRICS_LISTEN", &addr)
        .env_remove("TWOPHASE_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [format!(
            "error: listening on {addr}: set metrics_listen (TWOPHASE_METRICS_LISTEN) to a free \
             address: Address already in use (os error 98)"
        )],
    );
    // Only its lock was taken: no database was made.
    let made: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(made, ["dev.lock"]);
}

/// A second `twophase dev` on a data directory in use is refused, and the lock goes with the
/// process that held it, however it ended.
#[test]
fn a_data_directory_in_use_is_refused_until_its_dev_ends() {
    use std::io::BufRead;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));
    let mut first = Command::new(env!("CARGO_BIN_EXE_twophase"))
        .args(["dev", "--data-dir", dir.to_str().unwrap()])
        .env("TWOPHASE_METRICS_LISTEN", "127.0.0.1:0")
        .env_remove("TWOPHASE_CONFIG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its banner comes once every worker runs, long after it took the lock.
    let stderr = first.stderr.take().unwrap();
    let (lines, banner) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    loop {
        let line = banner
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the first dev starts");
        if line.starts_with("twophase dev: every worker running") {
            break;
        }
    }

    // Its address taken too (as the first one's default would be): the data directory is
    // what it is told of, as the reason it must not run.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let data_dir = dir.to_str().unwrap();
    let (code, _, stderr) =
        twophase_listening_on(&listen, &["dev", "--data-dir", data_dir, "--demo", "1"]);
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: the data directory {data_dir} is in use by another twophase dev: stop that \
             one, or give this one another --data-dir"
        )
    );

    first.kill().unwrap();
    first.wait().unwrap();
    let summary = demo(&dir, 1);
    assert_eq!(summary["terminal"], 1, "{summary:#}");
}

/// A command pointed at a directory that holds no data says so and makes nothing there: a
/// mistyped path is not taken for a new, empty data directory.
#[test]
fn a_data_directory_that_was_never_made_is_named_and_not_made() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", uuid::Uuid::new_v4()));
    let url = format!("sqlite:{}", dir.display());
    for command in [
        &["accounts", "list"][..],
        &["transfers", "stuck"],
        &["audit", "verify"],
    ] {
        let args: Vec<&str> = ["--database-url", url.as_str()]
            .iter()
            .chain(command)
            .copied()
            .collect();
        let (code, _, stderr) = twophase(&args);
        assert_eq!(code, 3, "{command:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{} holds no twophase data (", dir.display()))
                && stderr.contains("`twophase migrate --database-url sqlite:DIR`"),
            "{command:?}: {stderr}"
        );
        assert!(!dir.exists(), "{command:?} made {}", dir.display());
    }
}

/// A wait of no time is refused as the command line is read, not taken for brokers that do not
/// answer.
#[test]
fn a_wait_of_no_time_is_refused() {
    let id = uuid::Uuid::new_v4().to_string();
    let (code, _, stderr) = twophase(&[
        "transfer",
        "--from",
        &id,
        "--to",
        &id,
        "--amount",
        "1",
        "--currency",
        "USD",
        "--wait",
        "--timeout",
        "0s",
    ]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("a wait of no time could never see an outcome"),
        "{stderr}"
    );
}

/// The line of `stderr` that says what went wrong: the first that starts `error: `.
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"))
}

/// `twophase transfer` of 1.00 USD between two new ids through brokers that are not there, with
/// `--timeout 2s` and `extra`: its exit code, output and error output. It fails the test if the
/// command outlasts its own timeout and the start of a process (not a client's deadline of 20
/// or 30 s).
fn transfer_to_no_brokers(extra: &[&str]) -> (i32, String, String) {
    let (from, to) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let mut args = vec![
        "--brokers",
        "127.0.0.1:1",
        "transfer",
        "--from",
        &from,
        "--to",
        &to,
        "--amount",
        "1.00",
        "--currency",
        "USD",
        "--timeout",
        "2s",
    ];
    args.extend(extra);
    let started = std::time::Instant::now();
    let ran = twophase(&args);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    ran
}

/// Brokers out of reach: the command says which, within the --timeout it was given.
#[test]
fn a_transfer_to_brokers_out_of_reach_says_so_within_its_timeout() {
    let (code, stdout, stderr) = transfer_to_no_brokers(&["--wait"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    let said = "error: reaching the Kafka brokers at 127.0.0.1:1 to watch for the outcome, which \
                takes a second or two where they answer at once: no answer within 2s";
    assert!(stderr.lines().any(|l| l == said), "{stderr}");
}

/// Without --wait, --timeout bounds the publish too; and since a request the brokers did not
/// acknowledge may have reached them, the error names the id the command made up, so that it
/// can be sent again without being made twice.
#[test]
fn a_transfer_not_acknowledged_in_time_names_its_id_for_sending_again() {
    let (code, stdout, stderr) = transfer_to_no_brokers(&[]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "printed an id as if sent: {stdout}");
    let line = error_line(&stderr);
    let id = line
        .split_once("; transfer ")
        .and_then(|(said, rest)| {
            assert_eq!(
                said,
                "error: reaching the Kafka brokers at 127.0.0.1:1: no answer within 2s"
            );
            rest.split_once(' ')
        })
        .map(|(id, _)| id)
        .unwrap_or_else(|| panic!("no transfer id in: {line}"));
    uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id} in {line}: {e}"));
    assert!(
        line.ends_with(&format!(
            " may have reached them all the same, and sending it again with --id {id} is safe: \
             an id is applied once"
        )),
        "{line}"
    );
}
