//! The account worker: balances, holds and credits, and the ledger.
//!
//! It consumes `saga.commands.account` (keyed by account id, so one account's commands are
//! applied in order) and answers on `saga.replies`. Each command is applied in one database
//! transaction together with the record of its reply, so a redelivered command is answered
//! with the stored reply and never applied twice. It owns the `account` schema and touches no
//! other.

mod commands;
pub mod store;

use std::sync::Arc;

use twophase_messages::{Message, Topics};
use twophase_runtime::db::Db;
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{CancellationToken, Handler, HandlerError, Outgoing, Publisher};

pub use store::{Account, AccountError, AccountStatus, LedgerEntry};

/// The database schema this worker owns.
pub const SCHEMA: &str = "account";

#[derive(Debug)]
pub struct AccountWorker {
    db: Db,
    replies: String,
    source: String,
}

impl AccountWorker {
    pub fn new(db: Db, topics: &Topics, source: String) -> AccountWorker {
        AccountWorker {
            db,
            replies: topics.replies(),
            source,
        }
    }

    /// The consume-loop settings of this worker.
    pub fn settings(
        kafka: twophase_runtime::KafkaConfig,
        retry: twophase_runtime::RetryConfig,
    ) -> WorkerSettings {
        let topics = Topics::new(&kafka.topic_prefix);
        WorkerSettings {
            name: "account",
            kafka,
            retry,
            topics: vec![topics.account_commands()],
            default_types: Vec::new(),
        }
    }

    /// Runs the worker until `shutdown`.
    pub async fn run(
        db: Db,
        settings: WorkerSettings,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let topics = Topics::new(&settings.kafka.topic_prefix);
        let handler = Arc::new(AccountWorker::new(db, &topics, settings.source()));
        worker::run(handler, settings, publisher, shutdown).await
    }
}

impl Handler for AccountWorker {
    async fn handle(&self, incoming: &Incoming) -> Result<Vec<Outgoing>, HandlerError> {
        let Message::Account(command) = &incoming.message else {
            return Err(HandlerError::permanent(format!(
                "{} is not an account command",
                incoming.envelope.message_type
            )));
        };
        let reply = commands::apply(&self.db, command, incoming.envelope.id).await?;
        Ok(vec![Outgoing::caused_by(
            &incoming.envelope,
            &self.source,
            self.replies.clone(),
            command.body.transfer_id,
            &reply,
        )])
    }
}
