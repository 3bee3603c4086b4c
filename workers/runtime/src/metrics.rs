//! The Prometheus metrics every worker exports on `/metrics`: one registry, every metric defined
//! here with its help text and labels, and typed functions that the workers call.
//!
//! The names are a contract: `deploy/prometheus/alerts.yml` and the Grafana dashboard query
//! them, and a test below fails if either uses a name or label that is not defined here. Rename a
//! metric only together with the rules and the dashboard.
//!
//! Label values come from closed sets (statuses, reasons, outcomes, topics, currencies). Never
//! pass an id, an amount or an error message as a label value: every distinct value is a new
//! time series kept for as long as the process lives.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use rdkafka::Statistics;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use twophase_messages::{reasons, Decision};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's definition: name, help text, label names and kind.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub kind: Kind,
}

pub const TRANSFERS: Def = Def {
    name: "twophase_transfers_total",
    help: "Transfers that reached an outcome, by status (completed, failed, rejected) and \
           reason (none when completed).",
    labels: &["status", "reason"],
    kind: Kind::Counter,
};

pub const TRANSFER_DURATION: Def = Def {
    name: "twophase_transfer_duration_seconds",
    help: "Time from the coordinator's reading a transfer's request to its outcome, by status \
           (the time the request waited before it was read is twophase_request_wait_seconds).",
    labels: &["status"],
    kind: Kind::Histogram,
};

pub const REQUEST_WAIT: Def = Def {
    name: "twophase_request_wait_seconds",
    help: "Time from a transfer request's own time (its ce_time, else its Kafka record's time: \
           the producer's clock) to the coordinator's reading it, for each request it stores: \
           how long requests waited in the topic.",
    labels: &[],
    kind: Kind::Histogram,
};

pub const RISK_DECISIONS: Def = Def {
    name: "twophase_risk_decisions_total",
    help: "Risk evaluations by decision (approved, rejected).",
    labels: &["decision"],
    kind: Kind::Counter,
};

pub const RISK_SCORE: Def = Def {
    name: "twophase_risk_score",
    help: "Scores (0 to 100) of risk evaluations.",
    labels: &[],
    kind: Kind::Histogram,
};

pub const ACCOUNTS_NEGATIVE_BALANCE: Def = Def {
    name: "twophase_accounts_negative_balance",
    help: "Accounts whose available balance (balance minus holds) is below zero. Anything but 0 \
           means the no-overdraft invariant is broken.",
    labels: &[],
    kind: Kind::Gauge,
};

// Not `twophase_account_balance_total`: `_total` marks a counter, and this goes down as well.
pub const ACCOUNTS_BALANCE: Def = Def {
    name: "twophase_accounts_balance",
    help: "Sum of all account balances per currency, in the currency's major unit. For \
           dashboards only: it is a float, money itself never is.",
    labels: &["currency"],
    kind: Kind::Gauge,
};

pub const RECONCILIATION_DISCREPANCIES: Def = Def {
    name: "twophase_reconciliation_discrepancies",
    help: "Discrepancies found by the latest reconciliation run, by kind.",
    labels: &["kind"],
    kind: Kind::Gauge,
};

pub const RECONCILED_THROUGH: Def = Def {
    name: "twophase_reconciled_through_timestamp_seconds",
    help: "End of the newest day a reconciliation run gave a verdict on (discrepancies or \
           none; a failed run is no verdict), as a Unix time. Exported by the reconciler once \
           it has one.",
    labels: &[],
    kind: Kind::Gauge,
};

pub const CONSUMER_LAG: Def = Def {
    name: "twophase_consumer_lag",
    help: "Messages between the group's committed offset and the end of each partition this \
           process is assigned, from librdkafka statistics. They come while the worker polls, \
           so the gauge stands still while a message is retried (twophase_handler_retries_total).",
    labels: &["group", "topic", "partition"],
    kind: Kind::Gauge,
};

pub const DEAD_LETTERS: Def = Def {
    name: "twophase_dead_letters_total",
    help: "Messages set aside on a dead-letter topic, by original topic and error class \
           (decode, permanent, retries_exhausted).",
    labels: &["topic", "error_class"],
    kind: Kind::Counter,
};

pub const HANDLER_RETRIES: Def = Def {
    name: "twophase_handler_retries_total",
    help: "Failed attempts at handling a message that are to be tried again (a transient error: \
           the database or the broker out of reach, a lost race), by worker and topic. Through an \
           outage they go on while the message's partition waits.",
    labels: &["worker", "topic"],
    kind: Kind::Counter,
};

pub const MESSAGES_HANDLED: Def = Def {
    name: "twophase_messages_handled_total",
    help: "Messages a worker is done with, by topic and outcome (ok, dead_lettered).",
    labels: &["worker", "topic", "outcome"],
    kind: Kind::Counter,
};

pub const MESSAGE_HANDLING: Def = Def {
    name: "twophase_message_handling_seconds",
    help: "Time from receiving a message to being done with it (applied and replied, or \
           dead-lettered), retries included.",
    labels: &["worker"],
    kind: Kind::Histogram,
};

pub const SAGAS_IN_FLIGHT: Def = Def {
    name: "twophase_sagas_in_flight",
    help: "Transfers without an outcome yet, by saga status (preparing, committing, aborting).",
    labels: &["status"],
    kind: Kind::Gauge,
};

pub const SAGAS_STUCK: Def = Def {
    name: "twophase_sagas_stuck",
    help: "Transfers whose commit or abort is still unacknowledged after the stuck threshold of \
           re-sends. They keep being retried.",
    labels: &[],
    kind: Kind::Gauge,
};

pub const COMMIT_RETRIES: Def = Def {
    name: "twophase_commit_retries_total",
    help: "Commit commands sent again because no acknowledgement came in time.",
    labels: &[],
    kind: Kind::Counter,
};

pub const COMMIT_STUCK: Def = Def {
    name: "twophase_commit_stuck_total",
    help: "Re-sends of a commit past the stuck threshold, each with its commit_stuck event. \
           The coordinator keeps retrying such a commit until it is acknowledged.",
    labels: &[],
    kind: Kind::Counter,
};

/// Every metric this module registers.
pub const ALL: &[Def] = &[
    TRANSFERS,
    TRANSFER_DURATION,
    REQUEST_WAIT,
    RISK_DECISIONS,
    RISK_SCORE,
    ACCOUNTS_NEGATIVE_BALANCE,
    ACCOUNTS_BALANCE,
    RECONCILIATION_DISCREPANCIES,
    RECONCILED_THROUGH,
    CONSUMER_LAG,
    DEAD_LETTERS,
    HANDLER_RETRIES,
    MESSAGES_HANDLED,
    MESSAGE_HANDLING,
    SAGAS_IN_FLIGHT,
    SAGAS_STUCK,
    COMMIT_RETRIES,
    COMMIT_STUCK,
];

/// Values of the `status` label of [`TRANSFERS`] and [`TRANSFER_DURATION`].
pub mod status {
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const REJECTED: &str = "rejected";
}

/// Values of the `outcome` label of [`MESSAGES_HANDLED`].
pub mod outcome {
    pub const OK: &str = "ok";
    pub const DEAD_LETTERED: &str = "dead_lettered";
}

/// Values of the `error_class` label of [`DEAD_LETTERS`]; the same words as the `dlq-error-class`
/// header the consume loop writes.
pub const ERROR_CLASSES: [&str; 3] = ["decode", "permanent", "retries_exhausted"];

/// The `reason` label of a completed transfer.
const NO_REASON: &str = "none";

/// Request to outcome: a few milliseconds on a quiet system, up to the 30 s prepare timeout
/// (and a little past it, for transfers that fail by timing out).
const TRANSFER_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One message: usually milliseconds, but retries while a database recovers take minutes.
const HANDLING_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Scores are 0..=100; 0 gets its own bucket because most transfers fire no rule.
const SCORE_BUCKETS: &[f64] = &[
    0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0,
];

struct Metrics {
    registry: Registry,
    transfers: IntCounterVec,
    transfer_duration: HistogramVec,
    // Without labels, yet a vector, so that only the coordinator exports it.
    request_wait: HistogramVec,
    risk_decisions: IntCounterVec,
    risk_score: Histogram,
    // This and `sagas_stuck` have no labels, yet are vectors (with none) so that they appear
    // only in the process that sets them: a risk worker exporting "0 negative balances" would
    // claim something it never checked, and hide the account workers' absence.
    accounts_negative_balance: IntGaugeVec,
    accounts_balance: prometheus::GaugeVec,
    reconciliation_discrepancies: IntGaugeVec,
    reconciled_through: IntGaugeVec,
    consumer_lag: IntGaugeVec,
    dead_letters: IntCounterVec,
    handler_retries: IntCounterVec,
    messages_handled: IntCounterVec,
    message_handling: HistogramVec,
    sagas_in_flight: IntGaugeVec,
    sagas_stuck: IntGaugeVec,
    commit_retries: IntCounter,
    commit_stuck: IntCounter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn opts(def: Def) -> Opts {
    Opts::new(def.name, def.help)
}

fn histogram_opts(def: Def, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(def.name, def.help).buckets(buckets.to_vec())
}

impl Metrics {
    fn new() -> Metrics {
        // The definitions are constants, so a failure here is a programming error that the
        // first test run shows.
        let registry = Registry::new();
        fn reg<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
            registry
                .register(Box::new(c.clone()))
                .expect("metric definitions are valid and unique");
            c
        }
        let counter_vec = |d: Def| reg(&registry, IntCounterVec::new(opts(d), d.labels).unwrap());
        let gauge_vec = |d: Def| reg(&registry, IntGaugeVec::new(opts(d), d.labels).unwrap());
        let histogram_vec = |d: Def, b: &[f64]| {
            reg(
                &registry,
                HistogramVec::new(histogram_opts(d, b), d.labels).unwrap(),
            )
        };
        let metrics = Metrics {
            transfers: counter_vec(TRANSFERS),
            transfer_duration: histogram_vec(TRANSFER_DURATION, TRANSFER_BUCKETS),
            request_wait: histogram_vec(REQUEST_WAIT, TRANSFER_BUCKETS),
            risk_decisions: counter_vec(RISK_DECISIONS),
            risk_score: reg(
                &registry,
                Histogram::with_opts(histogram_opts(RISK_SCORE, SCORE_BUCKETS)).unwrap(),
            ),
            accounts_negative_balance: gauge_vec(ACCOUNTS_NEGATIVE_BALANCE),
            accounts_balance: reg(
                &registry,
                prometheus::GaugeVec::new(opts(ACCOUNTS_BALANCE), ACCOUNTS_BALANCE.labels).unwrap(),
            ),
            reconciliation_discrepancies: gauge_vec(RECONCILIATION_DISCREPANCIES),
            reconciled_through: gauge_vec(RECONCILED_THROUGH),
            consumer_lag: gauge_vec(CONSUMER_LAG),
            dead_letters: counter_vec(DEAD_LETTERS),
            handler_retries: counter_vec(HANDLER_RETRIES),
            messages_handled: counter_vec(MESSAGES_HANDLED),
            message_handling: histogram_vec(MESSAGE_HANDLING, HANDLING_BUCKETS),
            sagas_in_flight: gauge_vec(SAGAS_IN_FLIGHT),
            sagas_stuck: gauge_vec(SAGAS_STUCK),
            commit_retries: reg(
                &registry,
                IntCounter::with_opts(opts(COMMIT_RETRIES)).unwrap(),
            ),
            commit_stuck: reg(
                &registry,
                IntCounter::with_opts(opts(COMMIT_STUCK)).unwrap(),
            ),
            registry,
        };
        metrics.initialise();
        metrics
    }

    /// Creates at zero the series that alerts divide by or take `increase()` of. A series born
    /// at its first event starts at 1, and `rate()` cannot see that first increment; a ratio
    /// whose numerator does not exist yet is empty rather than 0.
    fn initialise(&self) {
        let failures = [
            reasons::INSUFFICIENT_FUNDS,
            reasons::SOURCE_NOT_FOUND,
            reasons::SOURCE_INACTIVE,
            reasons::DESTINATION_NOT_FOUND,
            reasons::DESTINATION_INACTIVE,
            reasons::CURRENCY_MISMATCH,
            reasons::RISK_REJECTED,
            reasons::ABORTED,
            reasons::TIMEOUT,
        ];
        let rejections = [
            reasons::INVALID_TRANSFER_ID,
            reasons::INVALID_ACCOUNT_ID,
            reasons::SAME_ACCOUNT,
            reasons::INVALID_AMOUNT,
            reasons::UNKNOWN_CURRENCY,
            reasons::TOO_MANY_DECIMALS,
            reasons::AMOUNT_OVER_LIMIT,
            reasons::CONFLICT,
        ];
        self.transfers
            .with_label_values(&[status::COMPLETED, NO_REASON]);
        for reason in failures {
            self.transfers.with_label_values(&[status::FAILED, reason]);
        }
        for reason in rejections {
            self.transfers
                .with_label_values(&[status::REJECTED, reason]);
        }
        for s in [status::COMPLETED, status::FAILED, status::REJECTED] {
            self.transfer_duration.with_label_values(&[s]);
        }
        for decision in [Decision::Yes, Decision::No] {
            self.risk_decisions
                .with_label_values(&[decision_label(decision)]);
        }
    }
}

fn decision_label(decision: Decision) -> &'static str {
    match decision {
        Decision::Yes => "approved",
        Decision::No => "rejected",
    }
}

/// The registry holding every metric, for the `/metrics` endpoint.
pub fn registry() -> &'static Registry {
    &METRICS.registry
}

/// Every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&registry().gather())
        // Only fails on a metric family without samples or with an invalid name, which the
        // definitions above exclude.
        .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
}

/// Creates a consuming worker's per-topic series at zero; call once at start with the topics it
/// consumes, so that the first dead letter on a topic shows up in `increase()`.
pub fn init_worker(worker: &str, topics: &[String]) {
    let m = &*METRICS;
    m.message_handling.with_label_values(&[worker]);
    for topic in topics {
        for outcome in [outcome::OK, outcome::DEAD_LETTERED] {
            m.messages_handled
                .with_label_values(&[worker, topic.as_str(), outcome]);
        }
        for class in ERROR_CLASSES {
            m.dead_letters.with_label_values(&[topic.as_str(), class]);
        }
        m.handler_retries
            .with_label_values(&[worker, topic.as_str()]);
    }
}

/// A transfer reached its outcome. Call once per transfer, when its state changes to terminal,
/// not when an outcome is published again for a redelivered request. `reason` is one of
/// [`twophase_messages::reasons`] (none for a completed transfer); `seconds` runs from the
/// request to the outcome.
pub fn transfer_finished(status: &str, reason: Option<&str>, seconds: f64) {
    let m = &*METRICS;
    m.transfers
        .with_label_values(&[status, reason.unwrap_or(NO_REASON)])
        .inc();
    // `max` also turns a NaN from a clock oddity into 0 rather than poisoning the sum.
    m.transfer_duration
        .with_label_values(&[status])
        .observe(seconds.max(0.0));
}

/// The coordinator read a request that waited `seconds` since its own time; call once per
/// request stored, not for a redelivery.
pub fn request_waited(seconds: f64) {
    METRICS
        .request_wait
        .with_label_values::<&str>(&[])
        .observe(seconds.max(0.0));
}

/// The risk worker voted on a transfer with this score. Call once per evaluation, not for a
/// stored vote returned again.
pub fn risk_decision(decision: Decision, score: u8) {
    let m = &*METRICS;
    m.risk_decisions
        .with_label_values(&[decision_label(decision)])
        .inc();
    m.risk_score.observe(f64::from(score));
}

/// A message from `topic` (the original topic, not the `.dlq` one) was dead-lettered;
/// `error_class` is one of [`ERROR_CLASSES`].
pub fn dead_letter(topic: &str, error_class: &str) {
    METRICS
        .dead_letters
        .with_label_values(&[topic, error_class])
        .inc();
}

/// A worker is done with a message; `outcome` is one of [`outcome`]'s values and `seconds` runs
/// from receipt to done, retries included.
pub fn message_handled(worker: &str, topic: &str, outcome: &str, seconds: f64) {
    let m = &*METRICS;
    m.messages_handled
        .with_label_values(&[worker, topic, outcome])
        .inc();
    m.message_handling
        .with_label_values(&[worker])
        .observe(seconds.max(0.0));
}

/// An attempt at handling a message of `topic` failed, and the message is to be tried again.
pub fn handler_retry(worker: &str, topic: &str) {
    METRICS
        .handler_retries
        .with_label_values(&[worker, topic])
        .inc();
}

/// A commit command was sent again.
pub fn commit_retry() {
    METRICS.commit_retries.inc();
}

/// A commit past the stuck threshold was sent again (with its `commit_stuck` event).
pub fn commit_stuck() {
    METRICS.commit_stuck.inc();
}

/// Transfers in a non-terminal saga status. Set every such status on each count, 0 included,
/// so that a status that emptied does not keep its last value.
pub fn set_sagas_in_flight(status: &str, n: i64) {
    METRICS.sagas_in_flight.with_label_values(&[status]).set(n);
}

pub fn set_sagas_stuck(n: i64) {
    METRICS.sagas_stuck.with_label_values::<&str>(&[]).set(n);
}

pub fn set_negative_balance_accounts(n: i64) {
    METRICS
        .accounts_negative_balance
        .with_label_values::<&str>(&[])
        .set(n);
}

/// The sum of all balances in `currency`. Converted to a float here, at the last moment, so
/// that no worker code ever holds money as a float.
pub fn set_balance_total(currency: &str, total: Decimal) {
    METRICS
        .accounts_balance
        .with_label_values(&[currency])
        .set(total.to_f64().unwrap_or(f64::NAN));
}

/// The latest reconciliation run's discrepancies of one kind. Set every kind on each run, 0
/// included, so that a fixed discrepancy clears its alert.
pub fn set_reconciliation_discrepancies(kind: &str, n: i64) {
    METRICS
        .reconciliation_discrepancies
        .with_label_values(&[kind])
        .set(n);
}

/// The end of a day a reconciliation run gave a verdict on, unless a later one is already set.
pub fn set_reconciled_through(end: DateTime<Utc>) {
    let gauge = METRICS.reconciled_through.with_label_values::<&str>(&[]);
    gauge.set(gauge.get().max(end.timestamp()));
}

pub fn set_consumer_lag(group: &str, topic: &str, partition: i32, lag: i64) {
    METRICS
        .consumer_lag
        .with_label_values(&[group, topic, &partition.to_string()])
        .set(lag);
}

/// Updates the lag gauges from a consumer's statistics (the `ClientContext::stats` callback;
/// needs `statistics.interval.ms` set). A partition this process is not assigned, or whose lag
/// librdkafka does not know yet, loses its series: after a rebalance the new owner reports it,
/// and a stale value here would keep a lag alert firing forever.
///
/// Assumes one consumer per group per process, as every worker runs: two would remove each
/// other's series.
pub fn record_consumer_lag(group: &str, stats: &Statistics) {
    let lag = &METRICS.consumer_lag;
    for (topic, t) in &stats.topics {
        for (&partition, p) in &t.partitions {
            // -1 is librdkafka's internal partition for messages not yet partitioned.
            if partition < 0 {
                continue;
            }
            let labels = [group, topic.as_str(), &partition.to_string()];
            // `desired` is librdkafka's flag for a partition in the current assignment.
            if p.desired && p.consumer_lag >= 0 {
                lag.with_label_values(&labels).set(p.consumer_lag);
            } else {
                // Absent already is fine: the result only says whether it was there.
                let _ = lag.remove_label_values(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use prometheus::proto::MetricType;
    use rdkafka::statistics::{Partition, Topic};

    use super::*;

    /// The value of one series, or None if it does not exist. The registry is global and tests
    /// run in parallel, so each test uses label values of its own.
    fn sample(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = registry().gather().into_iter().find(|f| f.name() == name)?;
        let metric = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })?;
        Some(match family.get_field_type() {
            MetricType::COUNTER => metric.get_counter().get_value(),
            MetricType::GAUGE => metric.get_gauge().get_value(),
            MetricType::HISTOGRAM => metric.get_histogram().get_sample_count() as f64,
            other => panic!("unexpected metric type {other:?}"),
        })
    }

    #[test]
    fn the_reconciled_through_gauge_only_moves_forward() {
        let day = |d: u32| {
            chrono::NaiveDate::from_ymd_opt(2026, 11, d)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
        };
        let gauge = || {
            METRICS
                .reconciled_through
                .with_label_values::<&str>(&[])
                .get()
        };
        set_reconciled_through(day(24));
        set_reconciled_through(day(20));
        assert_eq!(gauge(), day(24).timestamp());
        set_reconciled_through(day(25));
        assert_eq!(gauge(), day(25).timestamp());
    }

    #[test]
    fn every_definition_is_registered_with_its_kind_and_names_follow_conventions() {
        // Touch each labelled metric so that its family is exported.
        init_worker("convention-test", &["convention.topic".to_owned()]);
        set_consumer_lag("convention-test", "convention.topic", 0, 0);
        set_sagas_in_flight("convention", 0);
        set_sagas_stuck(0);
        set_negative_balance_accounts(0);
        set_balance_total("XTS", Decimal::ZERO);
        set_reconciliation_discrepancies("convention", 0);
        set_reconciled_through(DateTime::UNIX_EPOCH);
        // A series without an observation: one would count in another test's histogram.
        METRICS.request_wait.with_label_values::<&str>(&[]);
        let families = registry().gather();
        let mut names = BTreeSet::new();
        for def in ALL {
            assert!(names.insert(def.name), "{} is defined twice", def.name);
            assert!(def.name.starts_with("twophase_"), "{}", def.name);
            assert!(!def.help.is_empty(), "{} has no help", def.name);
            let family = families
                .iter()
                .find(|f| f.name() == def.name)
                .unwrap_or_else(|| panic!("{} is not registered", def.name));
            let expected = match def.kind {
                Kind::Counter => MetricType::COUNTER,
                Kind::Gauge => MetricType::GAUGE,
                Kind::Histogram => MetricType::HISTOGRAM,
            };
            assert_eq!(family.get_field_type(), expected, "{}", def.name);
            // Prometheus naming: `_total` only and always on counters; the suffixes that
            // histograms generate never on a metric's own name.
            assert_eq!(
                def.name.ends_with("_total"),
                def.kind == Kind::Counter,
                "{}",
                def.name
            );
            for reserved in ["_sum", "_count", "_bucket"] {
                assert!(!def.name.ends_with(reserved), "{}", def.name);
            }
            for label in def.labels {
                assert!(*label != "le" && !label.starts_with("__"), "{}", def.name);
            }
        }
        assert_eq!(
            families.len(),
            ALL.len(),
            "a metric is registered but not in ALL"
        );
    }

    #[test]
    fn ratio_denominators_exist_from_the_start() {
        let text = render();
        for line in [
            "twophase_transfers_total{reason=\"none\",status=\"completed\"} 0",
            "twophase_transfers_total{reason=\"timeout\",status=\"failed\"} 0",
            "twophase_transfers_total{reason=\"conflict\",status=\"rejected\"} 0",
            "twophase_risk_decisions_total{decision=\"rejected\"} 0",
            "twophase_commit_stuck_total 0",
        ] {
            // Other tests may have counted by now; the series must exist either way.
            let series = line.rsplit_once(' ').unwrap().0;
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn accessors_count_and_observe() {
        transfer_finished(status::FAILED, Some("accessor_test_reason"), 0.2);
        transfer_finished(status::FAILED, Some("accessor_test_reason"), f64::NAN);
        let labels = [("status", "failed"), ("reason", "accessor_test_reason")];
        assert_eq!(sample(TRANSFERS.name, &labels), Some(2.0));

        init_worker("accessor-test", &["accessor.topic".to_owned()]);
        let dl = [("topic", "accessor.topic"), ("error_class", "decode")];
        assert_eq!(sample(DEAD_LETTERS.name, &dl), Some(0.0));
        dead_letter("accessor.topic", "decode");
        assert_eq!(sample(DEAD_LETTERS.name, &dl), Some(1.0));

        message_handled("accessor-test", "accessor.topic", outcome::OK, 0.01);
        let handled = [
            ("worker", "accessor-test"),
            ("topic", "accessor.topic"),
            ("outcome", "ok"),
        ];
        assert_eq!(sample(MESSAGES_HANDLED.name, &handled), Some(1.0));
        let worker = [("worker", "accessor-test")];
        assert_eq!(sample(MESSAGE_HANDLING.name, &worker), Some(1.0));

        set_balance_total("XAU", Decimal::new(123_456, 2));
        assert_eq!(
            sample(ACCOUNTS_BALANCE.name, &[("currency", "XAU")]),
            Some(1234.56)
        );
    }

    #[test]
    fn score_buckets_are_cumulative_from_zero() {
        let text = {
            risk_decision(Decision::No, 85);
            render()
        };
        // Every score lands in le="100" and none is above it.
        let count = |le: &str| -> f64 {
            let prefix = format!("twophase_risk_score_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no bucket le={le}"))
                .parse()
                .unwrap()
        };
        assert!(count("90") >= 1.0);
        assert_eq!(count("100"), count("+Inf"));
        assert!(count("0") <= count("10"));
    }

    fn partition(id: i32, desired: bool, consumer_lag: i64) -> (i32, Partition) {
        (
            id,
            Partition {
                partition: id,
                desired,
                consumer_lag,
                fetch_state: if desired { "active" } else { "none" }.to_owned(),
                ..Partition::default()
            },
        )
    }

    fn stats(topic: &str, partitions: Vec<(i32, Partition)>) -> Statistics {
        Statistics {
            client_type: "consumer".to_owned(),
            topics: HashMap::from([(
                topic.to_owned(),
                Topic {
                    topic: topic.to_owned(),
                    partitions: partitions.into_iter().collect(),
                    ..Topic::default()
                },
            )]),
            ..Statistics::default()
        }
    }

    #[test]
    fn lag_comes_from_assigned_partitions_and_leaves_with_them() {
        let group = "lag-test";
        let lag = |p: &str| {
            sample(
                CONSUMER_LAG.name,
                &[("group", group), ("topic", "t"), ("partition", p)],
            )
        };
        record_consumer_lag(
            group,
            &stats(
                "t",
                vec![
                    partition(0, true, 7),
                    partition(1, true, -1), // assigned, lag not known yet
                    partition(2, false, -1),
                    partition(-1, false, -1),
                ],
            ),
        );
        assert_eq!(lag("0"), Some(7.0));
        assert_eq!(lag("1"), None);
        assert_eq!(lag("2"), None);
        assert_eq!(lag("-1"), None);

        // Partition 0 moves to another process and 1 arrives; librdkafka keeps reporting 0's
        // last lag, but no longer as desired.
        record_consumer_lag(
            group,
            &stats("t", vec![partition(0, false, 7), partition(1, true, 0)]),
        );
        assert_eq!(lag("0"), None);
        assert_eq!(lag("1"), Some(0.0));
    }

    #[test]
    fn lag_is_read_from_librdkafka_statistics_json() {
        // The shape librdkafka emits, cut down to one partition: the rest of the fields come
        // from a default so the test stays readable.
        let mut json = serde_json::to_value(Statistics::default()).unwrap();
        let mut partition = serde_json::to_value(Partition::default()).unwrap();
        partition["partition"] = 3.into();
        partition["desired"] = true.into();
        partition["fetch_state"] = "active".into();
        partition["hi_offset"] = 120.into();
        partition["committed_offset"] = 100.into();
        partition["consumer_lag"] = 20.into();
        let mut topic = serde_json::to_value(Topic::default()).unwrap();
        topic["topic"] = "json.topic".into();
        topic["partitions"] = serde_json::json!({ "3": partition });
        json["topics"] = serde_json::json!({ "json.topic": topic });
        let stats: Statistics = serde_json::from_value(json).unwrap();

        record_consumer_lag("json-group", &stats);
        let labels = [
            ("group", "json-group"),
            ("topic", "json.topic"),
            ("partition", "3"),
        ];
        assert_eq!(sample(CONSUMER_LAG.name, &labels), Some(20.0));
    }

    /// Every `twophase_*` name in `text` with the label names of its `{…}` selector, if any.
    fn metric_references(text: &str) -> Vec<(String, Vec<String>)> {
        let is_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("twophase_") {
            // Part of a longer identifier (`my_twophase_x`) is not a reference.
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| is_name(c) || c.is_ascii_uppercase());
            let tail = &rest[at..];
            let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
            let name = &tail[..end];
            let mut labels = Vec::new();
            if let Some(selector) = tail[end..].strip_prefix('{') {
                let close = selector.find('}').expect("selector is closed");
                for matcher in selector[..close].split(',') {
                    let key = matcher.split(['=', '!']).next().unwrap_or_default().trim();
                    if !key.is_empty() {
                        labels.push(key.to_owned());
                    }
                }
            }
            if !preceded {
                found.push((name.to_owned(), labels));
            }
            rest = &tail[end..];
        }
        found
    }

    /// Every string in a JSON document, so that escaped quotes in expressions read as quotes.
    fn json_strings(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
            serde_json::Value::Object(map) => map.values().for_each(|v| json_strings(v, out)),
            _ => {}
        }
    }

    /// The definition a referenced series belongs to, and the labels it may carry.
    fn resolve(name: &str) -> Option<(Def, Vec<&'static str>)> {
        if let Some(def) = ALL.iter().find(|d| d.name == name) {
            return Some((*def, def.labels.to_vec()));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            let Some(base) = name.strip_suffix(suffix) else {
                continue;
            };
            if let Some(def) = ALL
                .iter()
                .find(|d| d.name == base && d.kind == Kind::Histogram)
            {
                let mut labels = def.labels.to_vec();
                if suffix == "_bucket" {
                    labels.push("le");
                }
                return Some((*def, labels));
            }
        }
        None
    }

    #[test]
    fn alert_rules_and_dashboard_use_only_defined_metrics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        let read = |path: &str| {
            let path = root.join(path);
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        };
        let mut texts = vec![
            ("alerts.yml", read("prometheus/alerts.yml")),
            ("alerts.test.yml", read("prometheus/alerts.test.yml")),
        ];
        let dashboard: serde_json::Value =
            serde_json::from_str(&read("grafana/dashboards/twophase.json")).unwrap();
        let mut strings = Vec::new();
        json_strings(&dashboard, &mut strings);
        texts.push(("twophase.json", strings.join("\n")));

        let mut used = BTreeSet::new();
        for (file, text) in &texts {
            let references = metric_references(text);
            assert!(!references.is_empty(), "{file} names no twophase_ metric");
            for (name, labels) in references {
                let Some((def, allowed)) = resolve(&name) else {
                    panic!("{file} uses {name}, which metrics.rs does not define");
                };
                for label in labels {
                    // `job` and `instance` are added by Prometheus when it scrapes.
                    assert!(
                        allowed.contains(&label.as_str()) || label == "job" || label == "instance",
                        "{file} selects {name} by label {label}, which it does not have"
                    );
                }
                used.insert(def.name);
            }
        }
        // The rules cover the seed's five plus commits, dead letters and lag.
        for def in [
            TRANSFERS,
            TRANSFER_DURATION,
            RISK_DECISIONS,
            ACCOUNTS_NEGATIVE_BALANCE,
            RECONCILIATION_DISCREPANCIES,
            COMMIT_STUCK,
            SAGAS_STUCK,
            DEAD_LETTERS,
            CONSUMER_LAG,
        ] {
            assert!(used.contains(def.name), "nothing uses {}", def.name);
        }
    }

    #[test]
    fn references_are_parsed_with_their_selector_labels() {
        let refs = metric_references(
            "sum(rate(twophase_a_bucket{status=\"x\", le!~\"1\"}[5m])) / twophase_b \
             x_twophase_c Mytwophase_d",
        );
        assert_eq!(
            refs,
            vec![
                (
                    "twophase_a_bucket".to_owned(),
                    vec!["status".to_owned(), "le".to_owned()]
                ),
                ("twophase_b".to_owned(), vec![]),
            ]
        );
    }
}
