//! The effective configuration of every subcommand, layered: defaults, then `--config FILE`
//! (TOML), then `TWOPHASE_*` environment variables, then command-line flags.

use serde::{Deserialize, Serialize};
use twophase_coordinator::CoordinatorConfig;
use twophase_risk::RiskConfig;
use twophase_runtime::{KafkaConfig, RetryConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL, e.g. `postgres://user:password@127.0.0.1:5432/twophase`.
    pub database_url: String,
    /// Connections per worker pool.
    pub database_max_connections: u32,
    /// Log lines as JSON (for log shippers) rather than text.
    pub log_json: bool,
    /// Where a worker serves `/metrics` and `/healthz`. Unset: loopback on the worker's own port
    /// (coordinator 9101, account 9102, risk 9104, audit 9105, reconciler 9106).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub kafka: KafkaConfig,
    pub retry: RetryConfig,
    pub coordinator: CoordinatorConfig,
    pub risk: RiskConfig,
    pub reconciler: twophase_reconciler::ReconcilerConfig,
    pub audit: twophase_audit::AuditConfig,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            database_url: "postgres://twophase:twophase@127.0.0.1:5432/twophase".into(),
            database_max_connections: 10,
            log_json: false,
            metrics_listen: None,
            kafka: KafkaConfig::default(),
            retry: RetryConfig::default(),
            coordinator: CoordinatorConfig::default(),
            risk: RiskConfig::default(),
            reconciler: twophase_reconciler::ReconcilerConfig::default(),
            audit: twophase_audit::AuditConfig::default(),
        }
    }
}

impl Config {
    /// Per-currency limits keyed by ISO 4217 code, uppercase whatever the source: environment
    /// variable names reach the loader lowercased (`TWOPHASE_RISK__DAILY_LIMIT__USD` → `usd`).
    pub fn with_currency_codes_uppercased(mut self) -> Config {
        for map in [
            &mut self.risk.single_limit,
            &mut self.risk.daily_limit,
            &mut self.coordinator.max_amount,
        ] {
            // Lowercase keys sort after uppercase ones, so a value from the environment
            // overrides the default of the same currency.
            *map = std::mem::take(map)
                .into_iter()
                .map(|(code, limit)| (code.to_ascii_uppercase(), limit))
                .collect();
        }
        self
    }

    /// Refuses settings no worker can run with, naming the key: a zero interval would panic
    /// the task that ticks on it or spin its retries, and a zero count would never let work
    /// through.
    pub fn validate(&self) -> anyhow::Result<()> {
        let (c, r, a) = (&self.coordinator, &self.retry, &self.audit);
        let durations = [
            ("coordinator.prepare_timeout", c.prepare_timeout),
            ("coordinator.resend_after", c.resend_after),
            ("coordinator.resend_max_backoff", c.resend_max_backoff),
            ("coordinator.timer_interval", c.timer_interval),
            ("retry.initial_backoff", r.initial_backoff),
            ("retry.max_backoff", r.max_backoff),
            ("audit.batch_timeout", a.batch_timeout),
            ("audit.commit_interval", a.commit_interval),
            ("reconciler.read_timeout", self.reconciler.read_timeout),
            ("reconciler.gauges_refresh", self.reconciler.gauges_refresh),
        ];
        for (key, value) in durations {
            anyhow::ensure!(!value.is_zero(), "{key} must be longer than zero");
        }
        let counts = [
            (
                "database_max_connections",
                i64::from(self.database_max_connections),
            ),
            ("kafka.partitions", i64::from(self.kafka.partitions)),
            (
                "kafka.replication_factor",
                i64::from(self.kafka.replication_factor),
            ),
            (
                "audit.batch_size",
                i64::try_from(a.batch_size).unwrap_or(i64::MAX),
            ),
            (
                "audit.batch_bytes",
                i64::try_from(a.batch_bytes).unwrap_or(i64::MAX),
            ),
            (
                "coordinator.commit_stuck_after_attempts",
                i64::from(c.commit_stuck_after_attempts),
            ),
        ];
        for (key, value) in counts {
            anyhow::ensure!(value > 0, "{key} must be at least 1");
        }
        Ok(())
    }

    /// Checks the settings that name the real services, for every command but `twophase dev`,
    /// which runs its own and leaves them unused. The URL itself is never repeated: written
    /// in another form, it could show its password.
    pub fn validate_services(&self) -> anyhow::Result<()> {
        if !["postgres://", "postgresql://", "sqlite:"]
            .iter()
            .any(|scheme| self.database_url.starts_with(scheme))
        {
            let kind = match self.database_url.split_once("://") {
                Some((scheme, _)) => format!("a {scheme}:// URL"),
                None => "no URL of any kind".to_owned(),
            };
            anyhow::bail!(
                "database_url must be a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE) \
                 or sqlite:DIR; it is {kind}"
            );
        }
        anyhow::ensure!(
            self.kafka.brokers.split(',').any(|b| !b.trim().is_empty()),
            "kafka.brokers must name at least one broker (HOST:PORT, comma-separated)"
        );
        Ok(())
    }

    /// The configuration as TOML with its secrets masked, for `twophase config`: the database
    /// password, and librdkafka properties that hold a password, a secret or a private key.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        for properties in [
            &mut shown.kafka.properties,
            &mut shown.kafka.consumer_properties,
        ] {
            for (key, value) in properties.iter_mut() {
                if is_secret_property(key) {
                    *value = MASK.to_owned();
                }
            }
        }
        toml::to_string_pretty(&shown).expect("the configuration serializes")
    }
}

/// What a secret is shown as.
const MASK: &str = "***";

/// Whether a librdkafka property holds a secret: `sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`, `sasl.oauthbearer.config` (which may carry
/// credentials) and the like.
fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key == "ssl.key.pem"
        || key == "sasl.oauthbearer.config"
}

/// `scheme://user:secret@host/db?password=secret` → `scheme://user:***@host/db?password=***`.
pub fn redact_url(url: &str) -> String {
    let (address, query) = match url.split_once('?') {
        Some((address, query)) => (address, Some(query)),
        None => (url, None),
    };
    let mut shown = match address.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((credentials, host)) => match credentials.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}"),
                None => address.to_owned(),
            },
            None => address.to_owned(),
        },
        None => address.to_owned(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                    format!("{name}={MASK}")
                }
                _ => parameter.to_owned(),
            })
            .collect();
        shown = format!("{shown}?{}", parameters.join("&"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_no_worker_can_run_with_are_refused_by_name() {
        assert!(Config::default().validate().is_ok());
        let mut zero_interval = Config::default();
        zero_interval.coordinator.timer_interval = std::time::Duration::ZERO;
        let mut no_partitions = Config::default();
        no_partitions.kafka.partitions = -1;
        let mut never_stuck = Config::default();
        never_stuck.coordinator.commit_stuck_after_attempts = 0;
        let mut spinning_gauges = Config::default();
        spinning_gauges.reconciler.gauges_refresh = std::time::Duration::ZERO;
        for (config, says) in [
            (
                zero_interval,
                "coordinator.timer_interval must be longer than zero",
            ),
            (no_partitions, "kafka.partitions must be at least 1"),
            (
                never_stuck,
                "coordinator.commit_stuck_after_attempts must be at least 1",
            ),
            (
                spinning_gauges,
                "reconciler.gauges_refresh must be longer than zero",
            ),
        ] {
            assert_eq!(config.validate().unwrap_err().to_string(), says);
        }
    }

    #[test]
    fn a_service_setting_no_worker_can_use_is_refused_without_its_secret() {
        assert!(Config::default().validate_services().is_ok());
        let url = |url: &str| Config {
            database_url: url.into(),
            ..Config::default()
        };
        let mut no_brokers = Config::default();
        no_brokers.kafka.brokers = " ,".into();
        let must = "database_url must be a PostgreSQL URL \
                    (postgres://USER:PASSWORD@HOST:PORT/DATABASE) or sqlite:DIR; it is";
        for (config, says) in [
            (
                url("mysql://root:hunter2@db/twophase"),
                format!("{must} a mysql:// URL"),
            ),
            (
                url("host=db user=app password=hunter2"),
                format!("{must} no URL of any kind"),
            ),
            (
                no_brokers,
                "kafka.brokers must name at least one broker (HOST:PORT, comma-separated)".into(),
            ),
        ] {
            let said = config.validate_services().unwrap_err().to_string();
            assert_eq!(said, says);
            assert!(!said.contains("hunter2"));
        }
    }

    #[test]
    fn currency_limits_from_the_environment_use_iso_codes() {
        let mut c = Config::default();
        c.risk
            .daily_limit
            .insert("usd".into(), rust_decimal::Decimal::ONE);
        c.coordinator
            .max_amount
            .insert("eur".into(), rust_decimal::Decimal::TWO);
        let c = c.with_currency_codes_uppercased();
        assert_eq!(c.risk.daily_limit["USD"], rust_decimal::Decimal::ONE);
        assert!(!c.risk.daily_limit.contains_key("usd"));
        assert_eq!(c.coordinator.max_amount["EUR"], rust_decimal::Decimal::TWO);
    }

    #[test]
    fn passwords_are_never_printed() {
        assert_eq!(
            redact_url("postgres://app:s3cr@t@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=s3cr%40t&user=app"),
            "postgres://app@db/x?sslmode=require&password=***&user=app"
        );
        let mut c = Config {
            database_url: "postgres://a:hunter2@h/d".into(),
            ..Config::default()
        };
        for (key, secret) in [
            ("sasl.password", "hunter3"),
            ("ssl.key.password", "hunter4"),
            ("sasl.oauthbearer.client.secret", "hunter5"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY----- hunter6"),
        ] {
            c.kafka.properties.insert(key.into(), secret.into());
        }
        c.kafka
            .consumer_properties
            .insert("SASL.PASSWORD".into(), "hunter7".into());
        c.kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        let shown = c.redacted_toml();
        for n in 2..=7 {
            assert!(!shown.contains(&format!("hunter{n}")), "{shown}");
        }
        // What is not a secret is shown as it is, to check a deployment by.
        assert!(shown.contains("SASL_SSL"), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
    }
}
