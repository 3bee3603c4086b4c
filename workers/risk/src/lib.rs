//! The risk worker: evaluates each transfer against configurable rules and votes.
//!
//! It consumes `saga.commands.risk` (keyed by source account, so one account's evaluations run
//! in order and velocity and daily totals never race) and answers on `saga.replies`. Every
//! evaluation is stored with its score, level and the rules that fired; a redelivered command
//! gets the stored vote. It owns the `risk` schema and touches no other.

pub mod rules;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use twophase_messages::{reasons, Decision, EvaluateRisk, Message, Participant, Topics, Vote};
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{CancellationToken, Handler, HandlerError, Outgoing, Publisher};

pub use rules::{Assessment, RiskConfig};

/// The database schema this worker owns.
pub const SCHEMA: &str = "risk";

#[derive(Debug)]
pub struct RiskWorker {
    pool: PgPool,
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
        }
    }

    pub async fn run(
        pool: PgPool,
        config: RiskConfig,
        settings: WorkerSettings,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let topics = Topics::new(&settings.kafka.topic_prefix);
        let handler = Arc::new(RiskWorker {
            pool,
            config,
            replies: topics.replies(),
            source: settings.source(),
        });
        worker::run(handler, settings, publisher, shutdown).await
    }

    async fn evaluate(
        &self,
        request: &EvaluateRisk,
        message_id: uuid::Uuid,
    ) -> Result<Message, HandlerError> {
        let mut tx = self.pool.begin().await?;
        let stored: Option<(serde_json::Value,)> =
            sqlx::query_as("SELECT reply FROM evaluations WHERE transfer_id = $1")
                .bind(request.transfer_id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((reply,)) = stored {
            let vote: Vote =
                serde_json::from_value(reply).map_err(|e| HandlerError::Permanent(e.into()))?;
            return Ok(Message::Vote(vote));
        }

        let now = Utc::now();
        let history = self.history(&mut tx, request, now).await?;
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
        sqlx::query(
            "INSERT INTO evaluations (transfer_id, from_account, to_account, amount, currency, score,
                                      level, rules, decision, message_id, reply, evaluated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(request.transfer_id)
        .bind(request.from_account)
        .bind(request.to_account)
        .bind(request.amount)
        .bind(&request.currency)
        .bind(i16::from(assessment.score))
        .bind(assessment.level.as_str())
        .bind(serde_json::to_value(&assessment.rules).expect("rule names serialize"))
        .bind(if approved { "yes" } else { "no" })
        .bind(message_id)
        .bind(serde_json::to_value(&vote).expect("votes serialize"))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            score = assessment.score,
            rules = ?assessment.rules,
            approved,
            "risk evaluated"
        );
        Ok(Message::Vote(vote))
    }

    /// What the rules need to know about the source account's recent transfers.
    async fn history(
        &self,
        tx: &mut sqlx::PgConnection,
        request: &EvaluateRisk,
        now: DateTime<Utc>,
    ) -> Result<rules::History, sqlx::Error> {
        let window_start = now
            - chrono::TimeDelta::from_std(self.config.velocity_window)
                .unwrap_or(chrono::TimeDelta::MAX);
        let day_start = now
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc();
        let (recent, approved_today): (i64, Option<Decimal>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE evaluated_at > $2),
                    sum(amount) FILTER (WHERE evaluated_at >= $3 AND decision = 'yes' AND currency = $4)
             FROM evaluations WHERE from_account = $1 AND evaluated_at >= LEAST($2, $3)",
        )
        .bind(request.from_account)
        .bind(window_start)
        .bind(day_start)
        .bind(&request.currency)
        .fetch_one(&mut *tx)
        .await?;
        Ok(rules::History {
            transfers_in_window: u32::try_from(recent).unwrap_or(u32::MAX),
            approved_today: approved_today.unwrap_or_default(),
        })
    }
}

impl Handler for RiskWorker {
    async fn handle(&self, incoming: &Incoming) -> Result<Vec<Outgoing>, HandlerError> {
        let Message::EvaluateRisk(request) = &incoming.message else {
            return Err(HandlerError::permanent(format!(
                "{} is not a risk command",
                incoming.envelope.message_type
            )));
        };
        let vote = self.evaluate(request, incoming.envelope.id).await?;
        Ok(vec![Outgoing::caused_by(
            &incoming.envelope,
            &self.source,
            self.replies.clone(),
            request.transfer_id,
            &vote,
        )])
    }
}
