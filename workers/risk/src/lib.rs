//! The risk worker: evaluates each transfer against configurable rules and votes.
//!
//! It consumes `saga.commands.risk` (keyed by source account, so one account's evaluations run
//! in order and velocity and daily totals never race) and answers on `saga.replies`. Every
//! evaluation is stored with its score, level and the rules that fired; a redelivered command
//! gets the stored vote. It owns the `risk` schema and touches no other.

pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{NaiveDate, NaiveTime};
use rust_decimal::Decimal;
use twophase_messages::{reasons, Decision, EvaluateRisk, Message, Participant, Topics, Vote};
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{Amount, Db, Timestamp, Tx};
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{execute_rows, query_rows, update_rows};
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
        let mut history = History::load(tx, &self.config, requests, now).await?;
        let mut votes = Vec::with_capacity(requests.len());
        let mut new = Vec::new();
        for (request, incoming) in requests {
            if let Some(vote) = stored.get(&request.transfer_id) {
                votes.push((vote.clone(), false));
                continue;
            }
            let _in_span = incoming.span.enter();
            let assessment = self.config.assess(request, &history.of(request));
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
            history.add(request, approved);
            stored.insert(request.transfer_id, vote.clone());
            new.push((*request, incoming.envelope.id, assessment, vote.clone()));
            votes.push((vote, true));
        }
        execute_rows!(
            &mut *tx,
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
        history.save(tx).await?;
        Ok(votes)
    }
}

/// What the rules need to know about the source accounts of a batch: how many evaluations
/// each had within the velocity window (counted up to the limit), and its approved total
/// today per currency (read locked from `daily_totals`, and kept there as evaluations are
/// added).
struct History {
    day: NaiveDate,
    in_window: HashMap<Uuid, u32>,
    today: HashMap<(Uuid, String), DailyTotal>,
}

struct DailyTotal {
    approved: Decimal,
    /// Not stored yet: summed from today's evaluations (the first of the day in this
    /// currency, or the first since `daily_totals` was added).
    new: bool,
    changed: bool,
}

impl History {
    async fn load(
        tx: &mut Tx,
        config: &RiskConfig,
        requests: &[(&EvaluateRisk, &Incoming)],
        now: Timestamp,
    ) -> Result<History, twophase_runtime::db::sqlx::Error> {
        let window_start = now.0
            - chrono::TimeDelta::from_std(config.velocity_window).unwrap_or(chrono::TimeDelta::MAX);
        let day = now.0.date_naive();
        let mut accounts: Vec<Uuid> = requests.iter().map(|(r, _)| r.from_account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        // The rule asks only whether an account has reached the limit, so counting stops
        // there: an account that sends all day costs no more to check than one that does not.
        let in_window = query_rows!(
            &mut *tx,
            (Uuid, i64),
            "SELECT column1, (SELECT count(*) FROM (SELECT 1 FROM evaluations
                 WHERE from_account = v.column1 AND evaluated_at > $1 LIMIT $2) AS w)
             FROM (VALUES {rows}) AS v",
            [
                Timestamp::from(window_start),
                i64::from(config.velocity_max_transfers)
            ],
            &accounts,
            |id| (*id),
        )?
        .into_iter()
        .map(|(account, n)| (account, u32::try_from(n).unwrap_or(u32::MAX)))
        .collect();
        let mut today: HashMap<(Uuid, String), DailyTotal> = query_rows!(
            &mut *tx,
            (Uuid, String, Amount),
            "SELECT account_id, currency, approved FROM daily_totals
             WHERE day = $1 AND account_id IN ({rows})
             ORDER BY account_id, currency FOR UPDATE",
            [day],
            &accounts,
            |id| (*id),
        )?
        .into_iter()
        .map(|(account, currency, approved)| {
            let total = DailyTotal {
                approved: approved.0,
                new: false,
                changed: false,
            };
            ((account, currency), total)
        })
        .collect();

        let mut missing: Vec<Uuid> = requests
            .iter()
            .filter(|(r, _)| !today.contains_key(&(r.from_account, r.currency.clone())))
            .map(|(r, _)| r.from_account)
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let mut summed: HashMap<(Uuid, String), Decimal> = HashMap::new();
        for (account, currency, amount) in query_rows!(
            &mut *tx,
            (Uuid, String, Amount),
            "SELECT from_account, currency, amount FROM evaluations
             WHERE evaluated_at >= $1 AND decision = 'yes' AND from_account IN ({rows})",
            [Timestamp::from(day.and_time(NaiveTime::MIN).and_utc())],
            &missing,
            |id| (*id),
        )? {
            *summed.entry((account, currency)).or_default() += amount.0;
        }
        for (request, _) in requests {
            let key = (request.from_account, request.currency.clone());
            today.entry(key).or_insert_with_key(|key| DailyTotal {
                approved: summed.get(key).copied().unwrap_or_default(),
                new: true,
                changed: true,
            });
        }
        Ok(History {
            day,
            in_window,
            today,
        })
    }

    /// The history of `request`'s account, this request excluded.
    fn of(&self, request: &EvaluateRisk) -> rules::History {
        rules::History {
            transfers_in_window: self
                .in_window
                .get(&request.from_account)
                .copied()
                .unwrap_or(0),
            approved_today: self
                .today
                .get(&(request.from_account, request.currency.clone()))
                .map_or(Decimal::ZERO, |t| t.approved),
        }
    }

    /// Adds an evaluation of `request` to its account's history.
    fn add(&mut self, request: &EvaluateRisk, approved: bool) {
        *self.in_window.entry(request.from_account).or_default() += 1;
        if approved {
            let total = self
                .today
                .get_mut(&(request.from_account, request.currency.clone()))
                .expect("every request's total is loaded");
            total.approved += request.amount;
            total.changed = true;
        }
    }

    /// Writes the new and changed daily totals.
    async fn save(self, tx: &mut Tx) -> Result<(), twophase_runtime::db::sqlx::Error> {
        let mut written: Vec<(&(Uuid, String), &DailyTotal)> =
            self.today.iter().filter(|(_, t)| t.changed).collect();
        written.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let (new, changed): (Vec<_>, Vec<_>) = written.into_iter().partition(|(_, t)| t.new);
        let day = self.day;
        execute_rows!(
            &mut *tx,
            "INSERT INTO daily_totals (account_id, day, currency, approved) VALUES {rows}",
            &new,
            |((account, currency), total)| (*account, day, currency, Amount(total.approved)),
        )?;
        update_rows!(
            &mut *tx,
            "WITH v (account_id, day, currency, approved) AS (VALUES {rows})
             UPDATE daily_totals SET approved = v.approved
             FROM v WHERE daily_totals.account_id = v.account_id AND daily_totals.day = v.day
                      AND daily_totals.currency = v.currency",
            &changed,
            |((account, currency), total)| (*account, day, currency, Amount(total.approved)),
        )?;
        Ok(())
    }
}

/// The request of a risk command.
fn risk_command(message: &Message) -> Option<&EvaluateRisk> {
    match message {
        Message::EvaluateRisk(request) => Some(request),
        _ => None,
    }
}

impl Handler for RiskWorker {
    fn db(&self) -> &Db {
        &self.db
    }

    async fn apply(&self, tx: &mut Tx, batch: &[Incoming]) -> Result<Vec<Handled>, HandlerError> {
        let requests = worker::expect_each(batch, "a risk command", risk_command)?;
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

#[cfg(test)]
mod tests {
    use twophase_messages::Envelope;
    use twophase_runtime::execute;

    use super::*;

    fn request(from_account: Uuid, amount: &str) -> Incoming {
        let request = EvaluateRisk {
            transfer_id: Uuid::new_v4(),
            from_account,
            to_account: Uuid::new_v4(),
            amount: amount.parse().unwrap(),
            currency: "USD".into(),
        };
        Incoming {
            topic: "saga.commands.risk".into(),
            partition: 0,
            offset: 0,
            envelope: Envelope::new("twophase.risk.evaluate", "/test", "t"),
            message: Message::EvaluateRisk(request),
            span: tracing::Span::none(),
        }
    }

    async fn evaluate(worker: &RiskWorker, batch: &[Incoming]) -> Vec<Decision> {
        let requests = worker::expect_each(batch, "a risk command", risk_command).unwrap();
        let mut tx = worker.db.begin().await.unwrap();
        let votes = worker.evaluate(&mut tx, &requests).await.unwrap();
        tx.commit().await.unwrap();
        votes.into_iter().map(|(v, _)| v.decision).collect()
    }

    /// The daily limit counts what was approved earlier today: evaluations stored before the
    /// account had a daily total, those of the same batch, and those of earlier batches.
    #[tokio::test]
    async fn the_daily_limit_counts_every_approval_of_the_day() {
        let dir = std::env::temp_dir().join(format!("twophase-risk-{}", Uuid::new_v4()));
        let url = format!("sqlite:{}", dir.display());
        twophase_runtime::db::migrate(&url).await.unwrap();
        let db = Db::connect(&url, SCHEMA, 1).await.unwrap();
        let mut config = RiskConfig::default();
        config
            .daily_limit
            .insert("USD".into(), "500".parse().unwrap());
        let worker = RiskWorker {
            db,
            config,
            replies: "saga.replies".into(),
            source: "/test".into(),
        };
        let account = Uuid::new_v4();

        // Approved earlier today, before there was a daily total to keep it in.
        let mut tx = worker.db.begin().await.unwrap();
        execute!(
            &mut tx,
            "INSERT INTO evaluations (transfer_id, from_account, to_account, amount, currency, score,
                                      level, rules, decision, message_id, reply, evaluated_at)
             VALUES ($1, $2, $3, $4, 'USD', 0, 'low', '[]', 'yes', $5, '{}', $6)",
            Uuid::new_v4(),
            account,
            Uuid::new_v4(),
            Amount("400".parse().unwrap()),
            Uuid::new_v4(),
            Timestamp::now(),
        )
        .unwrap();
        tx.commit().await.unwrap();

        // 400 + 200 is over the limit, 400 + 50 is not; then 450 + 40 is not, but 490 + 20 is.
        let batch = [request(account, "200"), request(account, "50")];
        assert_eq!(
            evaluate(&worker, &batch).await,
            [Decision::No, Decision::Yes]
        );
        assert_eq!(
            evaluate(&worker, &[request(account, "40"), request(account, "20")]).await,
            [Decision::Yes, Decision::No]
        );
        let mut tx = worker.db.begin().await.unwrap();
        let (total,) = twophase_runtime::query_as!(
            &mut tx,
            (Amount,),
            fetch_one,
            "SELECT approved FROM daily_totals WHERE account_id = $1",
            account
        )
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(total.0, "490".parse::<Decimal>().unwrap());
        worker.db.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }
}
