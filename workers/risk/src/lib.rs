//! The risk worker: evaluates each transfer against configurable rules and votes.
//!
//! It consumes `saga.commands.risk` (keyed by source account, so one account's evaluations run
//! in order and velocity and daily totals never race) and answers on `saga.replies`. Every
//! evaluation is stored with its score, level and the rules that fired; a redelivered command
//! gets the stored vote. It owns the `risk` schema and touches no other.

pub mod rules;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use twophase_messages::{reasons, Decision, EvaluateRisk, Message, Participant, Topics, Vote};
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{Amount, Db, Timestamp, Tx};
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{execute, query_as};
use twophase_runtime::{CancellationToken, Handled, Handler, HandlerError, Outgoing, Publisher};

pub use rules::{Assessment, RiskConfig};

/// The database schema this worker owns.
pub const SCHEMA: &str = "risk";

#[derive(Debug)]
pub struct RiskWorker {
    db: Db,
    config: RiskConfig,
    replies: String,
    source: String,
}

impl RiskWorker {
    pub fn settings(
        kafka: twophase_runtime::KafkaConfig,
        retry: twophase_runtime::RetryConfig,
    ) -> WorkerSettings {
        let topics = Topics::new(&kafka.topic_prefix);
        WorkerSettings {
            name: "risk",
            kafka,
            retry,
            topics: vec![topics.risk_commands()],
            default_types: Vec::new(),
            health: twophase_runtime::http::Health::new(),
        }
    }

    pub async fn run(
        db: Db,
        config: RiskConfig,
        settings: WorkerSettings,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let topics = Topics::new(&settings.kafka.topic_prefix);
        let handler = Arc::new(RiskWorker {
            db,
            config,
            replies: topics.replies(),
            source: settings.source(),
        });
        worker::run(handler, settings, publisher, shutdown).await
    }

    /// Evaluates `request` once in `tx`; returns the vote, and whether it is a new one (not a
    /// stored vote sent again).
    async fn evaluate(
        &self,
        tx: &mut Tx,
        request: &EvaluateRisk,
        message_id: uuid::Uuid,
    ) -> Result<(Vote, bool), HandlerError> {
        let stored = query_as!(
            &mut *tx,
            (Json<Vote>,),
            fetch_optional,
            "SELECT reply FROM evaluations WHERE transfer_id = $1",
            request.transfer_id,
        )?;
        if let Some((Json(vote),)) = stored {
            return Ok((vote, false));
        }

        let now = Timestamp::now();
        let history = self.history(tx, request, now.0).await?;
        let assessment = self.config.assess(request, &history);
        let approved = assessment.score <= self.config.max_score;
        let vote = Vote {
            transfer_id: request.transfer_id,
            participant: Participant::Risk,
            decision: if approved {
                Decision::Yes
            } else {
                Decision::No
            },
            reason: (!approved).then(|| reasons::RISK_REJECTED.to_owned()),
            risk: Some(assessment.to_message()),
        };
        execute!(
            tx,
            "INSERT INTO evaluations (transfer_id, from_account, to_account, amount, currency, score,
                                      level, rules, decision, message_id, reply, evaluated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            request.transfer_id,
            request.from_account,
            request.to_account,
            Amount(request.amount),
            &request.currency,
            i16::from(assessment.score),
            assessment.level.as_str(),
            Json(&assessment.rules),
            if approved { "yes" } else { "no" },
            message_id,
            Json(&vote),
            now,
        )?;
        tracing::info!(
            score = assessment.score,
            rules = ?assessment.rules,
            approved,
            "risk evaluated"
        );
        Ok((vote, true))
    }

    /// What the rules need to know about the source account's recent transfers. Sums are taken
    /// here, in exact decimals, not by the database.
    async fn history(
        &self,
        tx: &mut Tx,
        request: &EvaluateRisk,
        now: DateTime<Utc>,
    ) -> Result<rules::History, twophase_runtime::db::sqlx::Error> {
        let window_start = now
            - chrono::TimeDelta::from_std(self.config.velocity_window)
                .unwrap_or(chrono::TimeDelta::MAX);
        let day_start = now
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc();
        let rows = query_as!(
            tx,
            (Timestamp, Amount, String, String),
            fetch_all,
            "SELECT evaluated_at, amount, currency, decision FROM evaluations
             WHERE from_account = $1 AND evaluated_at >= $2",
            request.from_account,
            Timestamp::from(window_start.min(day_start)),
        )?;
        let mut history = rules::History::default();
        for (at, amount, currency, decision) in rows {
            if at.0 > window_start {
                history.transfers_in_window += 1;
            }
            if at.0 >= day_start && decision == "yes" && currency == request.currency {
                history.approved_today += amount.0;
            }
        }
        Ok(history)
    }
}

impl Handler for RiskWorker {
    fn db(&self) -> &Db {
        &self.db
    }

    async fn apply(&self, tx: &mut Tx, incoming: &Incoming) -> Result<Handled, HandlerError> {
        let Message::EvaluateRisk(request) = &incoming.message else {
            return Err(HandlerError::permanent(format!(
                "{} is not a risk command",
                incoming.envelope.message_type
            )));
        };
        let (vote, new) = self.evaluate(tx, request, incoming.envelope.id).await?;
        let (decision, score) = (vote.decision, vote.risk.as_ref().map(|r| r.score));
        let handled = Handled::replies(vec![Outgoing::caused_by(
            &incoming.envelope,
            &self.source,
            self.replies.clone(),
            request.transfer_id,
            &Message::Vote(vote),
        )]);
        Ok(match (new, score) {
            (true, Some(score)) => {
                handled.then(move || twophase_runtime::metrics::risk_decision(decision, score))
            }
            _ => handled,
        })
    }
}
