//! The risk worker: evaluates each transfer against configurable rules and votes.
//!
//! It consumes `saga.commands.risk` (keyed by source account, so one account's evaluations run
//! in order and velocity and daily totals never race) and answers on `saga.replies`. Every
//! evaluation is stored with its score, level and the rules that fired; a redelivered command
//! gets the stored vote. It owns the `risk` schema and touches no other.

pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use twophase_messages::{reasons, Decision, EvaluateRisk, Message, Participant, Topics, Vote};
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{Amount, Db, Timestamp, Tx};
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{execute_rows, query_rows};
use twophase_runtime::{CancellationToken, Handled, Handler, HandlerError, Outgoing, Publisher};
use uuid::Uuid;

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

    /// Evaluates each request once, in order, in `tx`; returns each one's vote, and whether it
    /// is a new one (not a stored vote sent again). Requests evaluated together see each
    /// other in their accounts' history, in order.
    async fn evaluate(
        &self,
        tx: &mut Tx,
        requests: &[(&EvaluateRisk, &Incoming)],
    ) -> Result<Vec<(Vote, bool)>, HandlerError> {
        let transfers: Vec<Uuid> = requests.iter().map(|(r, _)| r.transfer_id).collect();
        let mut stored: HashMap<Uuid, Vote> = query_rows!(
            &mut *tx,
            (Uuid, Json<Vote>),
            "SELECT transfer_id, reply FROM evaluations WHERE transfer_id IN ({rows})",
            &transfers,
            |id| (*id),
        )?
        .into_iter()
        .map(|(id, Json(vote))| (id, vote))
        .collect();

        let now = Timestamp::now();
        let (window_start, day_start) = self.periods(now.0);
        let mut accounts: Vec<Uuid> = requests.iter().map(|(r, _)| r.from_account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        let mut history: HashMap<Uuid, Vec<Past>> = HashMap::new();
        for (account, at, amount, currency, decision) in query_rows!(
            &mut *tx,
            (Uuid, Timestamp, Amount, String, String),
            "SELECT from_account, evaluated_at, amount, currency, decision FROM evaluations
             WHERE evaluated_at >= $1 AND from_account IN ({rows})",
            [Timestamp::from(window_start.min(day_start))],
            &accounts,
            |id| (*id),
        )? {
            history.entry(account).or_default().push(Past {
                at: at.0,
                amount: amount.0,
                currency,
                approved: decision == "yes",
            });
        }

        let mut votes = Vec::with_capacity(requests.len());
        let mut new = Vec::new();
        for (request, incoming) in requests {
            if let Some(vote) = stored.get(&request.transfer_id) {
                votes.push((vote.clone(), false));
                continue;
            }
            let _in_span = incoming.span.enter();
            let past = history.entry(request.from_account).or_default();
            let assessment = self
                .config
                .assess(request, &summary(past, request, window_start, day_start));
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
            tracing::info!(
                score = assessment.score,
                rules = ?assessment.rules,
                approved,
                "risk evaluated"
            );
            past.push(Past {
                at: now.0,
                amount: request.amount,
                currency: request.currency.clone(),
                approved,
            });
            stored.insert(request.transfer_id, vote.clone());
            new.push((*request, incoming.envelope.id, assessment, vote.clone()));
            votes.push((vote, true));
        }
        execute_rows!(
            tx,
            "INSERT INTO evaluations (transfer_id, from_account, to_account, amount, currency, score,
                                      level, rules, decision, message_id, reply, evaluated_at)
             VALUES {rows}",
            &new,
            |(request, message_id, assessment, vote)| (
                request.transfer_id,
                request.from_account,
                request.to_account,
                Amount(request.amount),
                &request.currency,
                i16::from(assessment.score),
                assessment.level.as_str(),
                Json(&assessment.rules),
                if vote.decision == Decision::Yes {
                    "yes"
                } else {
                    "no"
                },
                *message_id,
                Json(vote),
                now,
            ),
        )?;
        Ok(votes)
    }

    /// Where the velocity window and the (UTC) day began, at `now`.
    fn periods(&self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let window_start = now
            - chrono::TimeDelta::from_std(self.config.velocity_window)
                .unwrap_or(chrono::TimeDelta::MAX);
        let day_start = now
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc();
        (window_start, day_start)
    }
}

/// An earlier evaluation from the same account.
struct Past {
    at: DateTime<Utc>,
    amount: rust_decimal::Decimal,
    currency: String,
    approved: bool,
}

/// What the rules need to know about the source account's recent transfers. Sums are taken
/// here, in exact decimals, not by the database.
fn summary(
    past: &[Past],
    request: &EvaluateRisk,
    window_start: DateTime<Utc>,
    day_start: DateTime<Utc>,
) -> rules::History {
    let mut history = rules::History::default();
    for p in past {
        if p.at > window_start {
            history.transfers_in_window += 1;
        }
        if p.at >= day_start && p.approved && p.currency == request.currency {
            history.approved_today += p.amount;
        }
    }
    history
}

impl Handler for RiskWorker {
    fn db(&self) -> &Db {
        &self.db
    }

    async fn apply(&self, tx: &mut Tx, batch: &[Incoming]) -> Result<Vec<Handled>, HandlerError> {
        let mut requests = Vec::with_capacity(batch.len());
        for incoming in batch {
            let Message::EvaluateRisk(request) = &incoming.message else {
                return Err(HandlerError::permanent(format!(
                    "{} is not a risk command",
                    incoming.envelope.message_type
                )));
            };
            requests.push((request, incoming));
        }
        let votes = self.evaluate(tx, &requests).await?;
        Ok(requests
            .iter()
            .zip(votes)
            .map(|((request, incoming), (vote, new))| {
                let _in_span = incoming.span.enter();
                let (decision, score) = (vote.decision, vote.risk.as_ref().map(|r| r.score));
                let handled = Handled::replies(vec![Outgoing::caused_by(
                    &incoming.envelope,
                    &self.source,
                    self.replies.clone(),
                    request.transfer_id,
                    &Message::Vote(vote),
                )]);
                match (new, score) {
                    (true, Some(score)) => handled
                        .then(move || twophase_runtime::metrics::risk_decision(decision, score)),
                    _ => handled,
                }
            })
            .collect())
    }
}
