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
use twophase_runtime::db::sqlx::{self, postgres::PgConnection, types::Json};
use twophase_runtime::db::{column, Amount, Db, Timestamp, Tx};
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
        let now = Timestamp::now();
        let (mut history, mut stored) = History::load(tx, &self.config, requests, now).await?;
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
            new.push(Evaluation {
                request,
                message_id: incoming.envelope.id,
                assessment,
                vote: vote.clone(),
            });
            votes.push((vote, true));
        }
        match tx {
            Tx::Postgres(tx) => history.save_at_once(tx, &new, now).await?,
            Tx::Sqlite(_) => {
                insert_evaluations(tx, &new, now).await?;
                history.save(tx).await?;
            }
        }
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
    /// Reads the history of the batch's source accounts, and the votes already given for its
    /// transfers (a command seen before gets its stored vote).
    async fn load(
        tx: &mut Tx,
        config: &RiskConfig,
        requests: &[(&EvaluateRisk, &Incoming)],
        now: Timestamp,
    ) -> Result<(History, HashMap<Uuid, Vote>), sqlx::Error> {
        // A window reaching back past the Unix epoch reaches back to it: nothing was evaluated
        // before, and a window too long to subtract would otherwise panic.
        let window_start = chrono::TimeDelta::from_std(config.velocity_window)
            .ok()
            .and_then(|window| now.0.checked_sub_signed(window))
            .map_or(chrono::DateTime::UNIX_EPOCH, |start| {
                start.max(chrono::DateTime::UNIX_EPOCH)
            });
        let day = now.0.date_naive();
        let mut accounts: Vec<Uuid> = requests.iter().map(|(r, _)| r.from_account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        let wanted = Wanted {
            transfers: requests.iter().map(|(r, _)| r.transfer_id).collect(),
            accounts,
            window_start: Timestamp::from(window_start),
            limit: i64::from(config.velocity_max_transfers),
            day,
        };
        let found = match tx {
            Tx::Postgres(tx) => wanted.read_at_once(tx).await?,
            Tx::Sqlite(_) => wanted.read_each(tx).await?,
        };
        let stored = found
            .votes
            .into_iter()
            .map(|(id, Json(vote))| (id, vote))
            .collect();
        let in_window = found
            .in_window
            .into_iter()
            .map(|(account, n)| (account, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect();
        let mut today: HashMap<(Uuid, String), DailyTotal> = found
            .today
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
            // A limit check: past the largest decimal, the total is as large as it gets.
            let total = summed.entry((account, currency)).or_default();
            *total = total.saturating_add(amount.0);
        }
        for (request, _) in requests {
            let key = (request.from_account, request.currency.clone());
            today.entry(key).or_insert_with_key(|key| DailyTotal {
                approved: summed.get(key).copied().unwrap_or_default(),
                new: true,
                changed: true,
            });
        }
        let history = History {
            day,
            in_window,
            today,
        };
        Ok((history, stored))
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
            total.approved = total.approved.saturating_add(request.amount);
            total.changed = true;
        }
    }

    /// The daily totals to write: the new ones, then the changed ones, each in key order.
    fn written(&self) -> (Vec<TotalWritten<'_>>, Vec<TotalWritten<'_>>) {
        let mut written: Vec<TotalWritten<'_>> =
            self.today.iter().filter(|(_, t)| t.changed).collect();
        written.sort_unstable_by(|a, b| a.0.cmp(b.0));
        written.into_iter().partition(|(_, t)| t.new)
    }

    /// On PostgreSQL, the batch's evaluations and the new and changed daily totals in one
    /// statement ([`SAVE`]): one round trip rather than three, and one text whatever the batch
    /// holds.
    async fn save_at_once(
        self,
        tx: &mut PgConnection,
        evaluations: &[Evaluation<'_>],
        now: Timestamp,
    ) -> Result<(), sqlx::Error> {
        let (new, changed) = self.written();
        sqlx::query(SAVE)
            .bind(now)
            .bind(self.day)
            .bind(column(evaluations, |e| e.request.transfer_id))
            .bind(column(evaluations, |e| e.request.from_account))
            .bind(column(evaluations, |e| e.request.to_account))
            .bind(column(evaluations, |e| e.request.amount))
            .bind(column(evaluations, |e| e.request.currency.as_str()))
            .bind(column(evaluations, |e| i16::from(e.assessment.score)))
            .bind(column(evaluations, |e| e.assessment.level.as_str()))
            .bind(column(evaluations, |e| Json(&e.assessment.rules)))
            .bind(column(evaluations, Evaluation::decision))
            .bind(column(evaluations, |e| e.message_id))
            .bind(column(evaluations, |e| Json(&e.vote)))
            .bind(column(&new, |((account, _), _)| *account))
            .bind(column(&new, |((_, currency), _)| currency.as_str()))
            .bind(column(&new, |(_, total)| total.approved))
            .bind(column(&changed, |((account, _), _)| *account))
            .bind(column(&changed, |((_, currency), _)| currency.as_str()))
            .bind(column(&changed, |(_, total)| total.approved))
            .execute(tx)
            .await?;
        Ok(())
    }

    /// On SQLite, the new and changed daily totals, a statement each.
    async fn save(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        let (new, changed) = self.written();
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

/// A daily total to write: its account and currency, and the total.
type TotalWritten<'a> = (&'a (Uuid, String), &'a DailyTotal);

/// A new evaluation to store.
struct Evaluation<'a> {
    request: &'a EvaluateRisk,
    message_id: Uuid,
    assessment: Assessment,
    vote: Vote,
}

impl Evaluation<'_> {
    fn decision(&self) -> &'static str {
        match self.vote.decision {
            Decision::Yes => "yes",
            Decision::No => "no",
        }
    }
}

/// What a batch reads: the votes given before for `transfers`; for `accounts`, how many
/// evaluations each had since `window_start` (counted up to `limit`) and its approved totals
/// on `day`, locked.
struct Wanted {
    transfers: Vec<Uuid>,
    accounts: Vec<Uuid>,
    window_start: Timestamp,
    limit: i64,
    day: NaiveDate,
}

#[derive(Default)]
struct Found {
    votes: Vec<(Uuid, Json<Vote>)>,
    in_window: Vec<(Uuid, i64)>,
    today: Vec<(Uuid, String, Amount)>,
}

impl Wanted {
    /// On PostgreSQL, in one query ([`LOAD`]): one round trip rather than three, and one text
    /// whatever the batch holds.
    async fn read_at_once(&self, tx: &mut PgConnection) -> Result<Found, sqlx::Error> {
        let rows: Vec<LoadRow> = sqlx::query_as(LOAD)
            .bind(&self.transfers)
            .bind(&self.accounts)
            .bind(self.window_start)
            .bind(self.limit)
            .bind(self.day)
            .fetch_all(tx)
            .await?;
        let mut found = Found::default();
        for (kind, id, currency, amount, count, vote) in rows {
            let missing = || sqlx::Error::Decode(format!("{kind} {id} is missing a column").into());
            match kind.as_str() {
                "vote" => found.votes.push((id, vote.ok_or_else(missing)?)),
                "window" => found.in_window.push((id, count.ok_or_else(missing)?)),
                "today" => found.today.push((
                    id,
                    currency.ok_or_else(missing)?,
                    amount.ok_or_else(missing)?,
                )),
                _ => return Err(sqlx::Error::Decode(format!("unknown row {kind}").into())),
            }
        }
        Ok(found)
    }

    /// On SQLite, one query each.
    async fn read_each(&self, tx: &mut Tx) -> Result<Found, sqlx::Error> {
        let votes = query_rows!(
            &mut *tx,
            (Uuid, Json<Vote>),
            "SELECT transfer_id, reply FROM evaluations WHERE transfer_id IN ({rows})",
            &self.transfers,
            |id| (*id),
        )?;
        // Counted up to the limit, as in `LOAD`.
        let in_window = query_rows!(
            &mut *tx,
            (Uuid, i64),
            "SELECT column1, (SELECT count(*) FROM (SELECT 1 FROM evaluations
                 WHERE from_account = v.column1 AND evaluated_at > $1 LIMIT $2) AS w)
             FROM (VALUES {rows}) AS v",
            [self.window_start, self.limit],
            &self.accounts,
            |id| (*id),
        )?;
        let today = query_rows!(
            &mut *tx,
            (Uuid, String, Amount),
            "SELECT account_id, currency, approved FROM daily_totals
             WHERE day = $1 AND account_id IN ({rows})
             ORDER BY account_id, currency FOR UPDATE",
            [self.day],
            &self.accounts,
            |id| (*id),
        )?;
        Ok(Found {
            votes,
            in_window,
            today,
        })
    }
}

/// A row of [`LOAD`]: what it is (`vote`, `window` or `today`), the transfer or account, then
/// its currency and approved total (`today`), its count (`window`) or its vote (`vote`).
type LoadRow = (
    String,
    Uuid,
    Option<String>,
    Option<Amount>,
    Option<i64>,
    Option<Json<Vote>>,
);

/// [`Wanted::read_at_once`]'s query: the votes of the transfers in `$1`; for each account in
/// `$2`, its evaluations since `$3` counted up to `$4` (the rule asks only whether an account
/// has reached the limit, so counting stops there: an account that sends all day costs no
/// more to check than one that does not), and its totals on `$5`, locked.
const LOAD: &str = "SELECT 'vote', transfer_id, NULL::text, NULL::numeric, NULL::bigint, reply
    FROM evaluations WHERE transfer_id = ANY($1)
    UNION ALL
    SELECT 'window', a.account_id, NULL::text, NULL::numeric,
           (SELECT count(*) FROM (SELECT 1 FROM evaluations
                WHERE from_account = a.account_id AND evaluated_at > $3 LIMIT $4) AS w),
           NULL::jsonb
    FROM unnest($2::uuid[]) AS a (account_id)
    UNION ALL
    SELECT * FROM (
        SELECT 'today', account_id, currency, approved, NULL::bigint, NULL::jsonb
        FROM daily_totals WHERE day = $5 AND account_id = ANY($2)
        ORDER BY account_id, currency FOR UPDATE
    ) AS today";

/// [`History::save_at_once`]'s statement: the new evaluations, the new daily totals and the
/// changed ones, each list bound as arrays, one per column, and unnested; `$1` is the time of
/// the batch and `$2` its day. No total is both new and changed.
const SAVE: &str = "WITH evaluated AS (
        INSERT INTO evaluations (transfer_id, from_account, to_account, amount, currency, score,
                                 level, rules, decision, message_id, reply, evaluated_at)
        SELECT *, $1 FROM unnest($3::uuid[], $4::uuid[], $5::uuid[], $6::numeric[], $7::text[],
                                 $8::smallint[], $9::text[], $10::jsonb[], $11::text[],
                                 $12::uuid[], $13::jsonb[])
    ), totals_new AS (
        INSERT INTO daily_totals (account_id, day, currency, approved)
        SELECT account_id, $2, currency, approved
        FROM unnest($14::uuid[], $15::text[], $16::numeric[]) AS v (account_id, currency, approved)
    ), totals_set AS (
        UPDATE daily_totals SET approved = v.approved
        FROM unnest($17::uuid[], $18::text[], $19::numeric[]) AS v (account_id, currency, approved)
        WHERE daily_totals.account_id = v.account_id AND daily_totals.day = $2
              AND daily_totals.currency = v.currency
    )
    SELECT 1";

/// On SQLite, the new evaluations in one statement.
async fn insert_evaluations(
    tx: &mut Tx,
    evaluations: &[Evaluation<'_>],
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    execute_rows!(
        &mut *tx,
        "INSERT INTO evaluations (transfer_id, from_account, to_account, amount, currency, score,
                                  level, rules, decision, message_id, reply, evaluated_at)
         VALUES {rows}",
        evaluations,
        |e| (
            e.request.transfer_id,
            e.request.from_account,
            e.request.to_account,
            Amount(e.request.amount),
            &e.request.currency,
            i16::from(e.assessment.score),
            e.assessment.level.as_str(),
            Json(&e.assessment.rules),
            e.decision(),
            e.message_id,
            Json(&e.vote),
            now,
        ),
    )?;
    Ok(())
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
    /// account had a daily total, those of the same batch, and those of earlier batches. On a
    /// new SQLite database, and on a new PostgreSQL one where `scripts/test.sh` provides the
    /// server: each has its own statements.
    #[tokio::test]
    async fn the_daily_limit_counts_every_approval_of_the_day() {
        let dir = std::env::temp_dir().join(format!("twophase-risk-{}", Uuid::new_v4()));
        let mut urls = vec![format!("sqlite:{}", dir.display())];
        if let Ok(admin_url) = std::env::var("TWOPHASE_TEST_DATABASE_URL") {
            let name = format!("t_risk_daily_{}", Uuid::new_v4().simple());
            urls.push(
                twophase_runtime::db::create_database(&admin_url, &name)
                    .await
                    .unwrap(),
            );
        }
        for url in urls {
            daily_limit_counts_every_approval_of_the_day(&url).await;
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    async fn daily_limit_counts_every_approval_of_the_day(url: &str) {
        twophase_runtime::db::migrate(url).await.unwrap();
        let db = Db::connect(url, SCHEMA, 1).await.unwrap();
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
    }
}
