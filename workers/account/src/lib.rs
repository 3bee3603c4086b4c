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

use twophase_messages::{AccountCommand, Message, Topics};
use twophase_runtime::db::{Db, Tx};
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{CancellationToken, Handled, Handler, HandlerError, Outgoing, Publisher};

pub use store::{Account, AccountError, AccountStatus, LedgerEntry, Moved};

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
            health: twophase_runtime::http::Health::new(),
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
        let gauges = tokio::spawn(refresh_gauges(db.clone(), shutdown.clone()));
        let handler = Arc::new(AccountWorker::new(db, &topics, settings.source()));
        let result = worker::run(handler, settings, publisher, shutdown.clone()).await;
        shutdown.cancel();
        gauges.await?;
        result
    }
}

/// How often the balance gauges are recomputed.
const GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Keeps the balance gauges (total per currency, accounts below zero) current until `shutdown`.
async fn refresh_gauges(db: Db, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store::totals(&db).await {
            Ok(totals) => {
                for (currency, total) in totals.balance {
                    twophase_runtime::metrics::set_balance_total(&currency, total);
                }
                twophase_runtime::metrics::set_negative_balance_accounts(totals.overdrawn as i64);
            }
            Err(e) => tracing::warn!(error = %e, "balance gauges not refreshed"),
        }
    }
}

/// The command of an account command message.
fn account_command(message: &Message) -> Option<&AccountCommand> {
    match message {
        Message::Account(command) => Some(command),
        _ => None,
    }
}

impl Handler for AccountWorker {
    fn db(&self) -> &Db {
        &self.db
    }

    async fn apply(&self, tx: &mut Tx, batch: &[Incoming]) -> Result<Vec<Handled>, HandlerError> {
        let commands: Vec<commands::Command> =
            worker::expect_each(batch, "an account command", account_command)?
                .into_iter()
                .map(|(command, incoming)| commands::Command {
                    command,
                    message_id: incoming.envelope.id,
                    span: &incoming.span,
                })
                .collect();
        let replies = commands::apply(tx, &commands).await?;
        Ok(batch
            .iter()
            .zip(commands)
            .zip(replies)
            .map(|((incoming, c), reply)| {
                let _in_span = incoming.span.enter();
                Handled::replies(vec![Outgoing::caused_by(
                    &incoming.envelope,
                    &self.source,
                    self.replies.clone(),
                    c.command.body.transfer_id,
                    &reply,
                )])
            })
            .collect())
    }
}
