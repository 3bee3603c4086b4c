//! Layered configuration: built-in defaults, then a TOML file, then `TWOPHASE_*` environment
//! variables (`__` separates nested keys: `TWOPHASE_RISK__MAX_SCORE=70`). Unknown keys in the
//! file are refused; environment variables that name no configuration key are left alone, since
//! the environment also carries variables meant for scripts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "TWOPHASE_";

/// Loads `T` from its defaults, an optional TOML file and the environment.
pub fn load<T>(file: Option<&Path>) -> Result<T, Box<figment::Error>>
where
    T: Serialize + DeserializeOwned + Default,
{
    let defaults = T::default();
    // The top-level keys of the configuration, so that only variables naming one are read.
    let keys: Vec<String> = match serde_json::to_value(&defaults) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Box::new(figment::Error::from(format!(
                "configuration file {} does not exist",
                file.display()
            ))));
        }
        figment = figment.merge(Toml::file(file));
    }
    let env = Env::prefixed(ENV_PREFIX).split("__").filter(move |key| {
        // Keys keep the variable's case: `KAFKA.BROKERS`.
        let top = key.as_str().split('.').next().unwrap_or_default();
        keys.iter().any(|k| k.eq_ignore_ascii_case(top))
    });
    figment.merge(env).extract().map_err(Box::new)
}

/// A configuration error as a person reads it: for each setting at fault, where it was set (the
/// file, or the environment variable), the setting, and what is wrong with it.
pub fn describe(error: &figment::Error) -> String {
    use figment::error::Kind;
    let sentences: Vec<String> = error
        .clone()
        .into_iter()
        .map(|e| {
            let metadata = e.metadata.as_ref();
            let from_env = metadata.is_some_and(|m| m.name.contains("environment"));
            let file = metadata
                .and_then(|m| m.source.as_ref())
                .and_then(|s| s.file_path());
            let place = match (from_env, file) {
                (false, Some(file)) => Some(file.display().to_string()),
                _ if e.path.is_empty() => None,
                (true, _) => Some(format!(
                    "environment variable {ENV_PREFIX}{}",
                    e.path.join("__").to_uppercase()
                )),
                (false, None) => None,
            };
            let key = e.path.join(".").to_lowercase();
            let what = match &e.kind {
                Kind::UnknownField(_, known) => {
                    let within = match e.path.len() {
                        0 | 1 => "the settings are".to_owned(),
                        n => format!("those of {} are", e.path[..n - 1].join(".").to_lowercase()),
                    };
                    format!("{key} is no setting; {within} {}", known.join(", "))
                }
                kind if key.is_empty() => kind.to_string(),
                kind => format!("{key}: {kind}"),
            };
            match place {
                Some(place) => format!("{place}: {what}"),
                None => what,
            }
        })
        .collect();
    sentences.join("; ")
}

/// How workers reach Kafka.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Prepended to every topic name.
    pub topic_prefix: String,
    /// Prepended to every consumer group name: `<prefix>-<worker>`.
    pub group_prefix: String,
    /// Partitions of the topics `twophase topics create` makes (and workers make if missing).
    pub partitions: i32,
    pub replication_factor: i32,
    /// Extra librdkafka properties for every client, e.g. `"security.protocol" = "SSL"`.
    pub properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for consumers only, on top of `properties`, e.g.
    /// `"fetch.wait.max.ms" = "100"` (librdkafka warns of a consumer property given to a
    /// producer).
    pub consumer_properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            group_prefix: "twophase".into(),
            partitions: 4,
            replication_factor: 1,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
        }
    }
}

/// How transient handler failures are retried before a message is dead-lettered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long a message may keep failing transiently, with its database answering, before it
    /// is set aside. While the database does not answer, or the broker takes none of its replies
    /// (down, a topic missing, a permission refused), the message waits and this does not run
    /// out.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            give_up_after: Duration::from_secs(15 * 60),
        }
    }
}

impl RetryConfig {
    /// The wait before retry number `attempt` (1-based): doubling, capped, with jitter so that
    /// many workers do not hammer a recovering database in step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max_backoff);
        let jitter = rand::random::<f64>() * 0.2 + 0.9;
        capped.mul_f64(jitter)
    }
}

#[cfg(test)]
// figment's `Jail` closures return its own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        kafka: KafkaConfig,
        name: String,
    }

    /// How loading a configuration file of `text` is refused.
    fn refusal_of_file(jail: &mut figment::Jail, text: &str) -> figment::error::Result<String> {
        jail.create_file("c.toml", text)?;
        let err = load::<Sample>(Some(Path::new("c.toml"))).unwrap_err();
        Ok(describe(&err))
    }

    #[test]
    fn file_then_env_override_defaults_and_stray_env_is_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "name = \"file\"\n[kafka]\npartitions = 8\n")?;
            jail.set_env("TWOPHASE_KAFKA__BROKERS", "b:1");
            jail.set_env("TWOPHASE_SERVICES_DIR", "/elsewhere");
            let c: Sample = load(Some(Path::new("c.toml"))).map_err(|e| *e)?;
            assert_eq!(c.name, "file");
            assert_eq!(c.kafka.partitions, 8);
            assert_eq!(c.kafka.brokers, "b:1");
            Ok(())
        });
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            let said = refusal_of_file(jail, "nmae = \"typo\"\n")?;
            assert!(
                said.ends_with("c.toml: nmae is no setting; the settings are kafka, name"),
                "{said}"
            );
            let said = refusal_of_file(jail, "[kafka]\nbrokres = \"typo\"\n")?;
            assert!(
                said.contains("c.toml: kafka.brokres is no setting; those of kafka are brokers, "),
                "{said}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_file_that_is_no_toml_is_named() {
        figment::Jail::expect_with(|jail| {
            let said = refusal_of_file(jail, "name = \"unclosed\n")?;
            assert!(said.contains("c.toml: "), "{said}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_in_the_environment_names_its_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TWOPHASE_KAFKA__PARTITIONS", "many");
            let err = load::<Sample>(None).unwrap_err();
            let said = describe(&err);
            assert!(
                said.starts_with(
                    "environment variable TWOPHASE_KAFKA__PARTITIONS: kafka.partitions: "
                ),
                "{said}"
            );
            assert!(said.contains("\"many\""), "{said}");
            Ok(())
        });
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryConfig::default();
        assert!(r.backoff(1) < Duration::from_millis(111));
        assert!(r.backoff(4) > Duration::from_millis(700));
        assert!(r.backoff(30) <= Duration::from_secs(11));
    }
}
