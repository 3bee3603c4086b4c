//! Topic names. Every name takes a configurable prefix so that several installations (or
//! tests) can share one cluster.

/// The base name of the topic that records each dead-letter replay run, for the audit trail.
/// Do not change: the audit consumer and ops tooling read it.
pub const REPLAYS: &str = "ops.replays";

/// The saga's topic names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }

    /// Producers publish `TransferRequested` here, keyed by transfer id.
    pub fn requests(&self) -> String {
        self.name("transfers.requests")
    }
    /// Coordinator → risk worker, keyed by transfer id.
    pub fn risk_commands(&self) -> String {
        self.name("saga.commands.risk")
    }
    /// Coordinator → account worker, keyed by account id.
    pub fn account_commands(&self) -> String {
        self.name("saga.commands.account")
    }
    /// Votes and acks from every participant, keyed by transfer id.
    pub fn replies(&self) -> String {
        self.name("saga.replies")
    }
    /// Outcomes for producers, keyed by transfer id.
    pub fn events(&self) -> String {
        self.name("transfers.events")
    }
    pub fn reconciliation_reports(&self) -> String {
        self.name("reconciliation.reports")
    }
    /// A record of each `twophase dlq replay` run.
    pub fn replays(&self) -> String {
        self.name(REPLAYS)
    }

    /// The dead-letter topic of a topic.
    pub fn dead_letters(topic: &str) -> String {
        format!("{topic}.dlq")
    }

    /// Every topic the saga and its ops tools use, dead-letter topics included.
    pub fn all(&self) -> Vec<String> {
        let main = [
            self.requests(),
            self.risk_commands(),
            self.account_commands(),
            self.replies(),
            self.events(),
            self.reconciliation_reports(),
        ];
        let dlq: Vec<String> = main[..5].iter().map(|t| Topics::dead_letters(t)).collect();
        main.into_iter()
            .chain(dlq)
            .chain([self.replays()])
            .collect()
    }
}
