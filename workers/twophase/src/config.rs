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

    /// The configuration as TOML with the database password masked, for `twophase config`.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        toml::to_string_pretty(&shown).expect("the configuration serializes")
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = Config {
            database_url: "postgres://a:hunter2@h/d".into(),
            ..Config::default()
        };
        assert!(!c.redacted_toml().contains("hunter2"));
    }
}
