//! Reading and writing saga rows. Every read of a row that will change locks it, so two
//! coordinator copies (during a rebalance) or a handler and the timer never race.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use twophase_messages::{Decision, Participant, RiskAssessment};
use twophase_runtime::db::sqlx::{self, postgres::PgConnection, types::Json};
use twophase_runtime::db::{column, Amount, Timestamp, Tx};
use twophase_runtime::{execute_rows, query_as, query_rows, update_rows};
use uuid::Uuid;

use crate::saga::{Saga, Status, Terms};

/// A saga with what the coordinator keeps beside its state.
#[derive(Debug, Clone)]
pub struct Stored {
    pub saga: Saga,
    pub request_hash: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub request_message_id: Option<Uuid>,
    /// The request's `correlation-id`, which the timer's messages carry on.
    pub correlation_id: Option<String>,
    /// Commit or abort commands re-sent so far.
    pub resend_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    transfer_id: Uuid,
    request_hash: String,
    from_account: Option<Uuid>,
    to_account: Option<Uuid>,
    amount: Option<Amount>,
    currency: Option<String>,
    status: String,
    risk_vote: Option<String>,
    source_vote: Option<String>,
    destination_vote: Option<String>,
    risk_assessment: Option<Json<serde_json::Value>>,
    reason: Option<String>,
    reason_detail: Option<String>,
    failed_participant: Option<String>,
    captured: bool,
    credited: bool,
    released: bool,
    credit_cancelled: bool,
    traceparent: Option<String>,
    tracestate: Option<String>,
    request_message_id: Option<Uuid>,
    correlation_id: Option<String>,
    resend_attempts: i32,
    created_at: Timestamp,
    decided_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
}

fn decision(v: Option<String>) -> Option<Decision> {
    match v.as_deref() {
        Some("yes") => Some(Decision::Yes),
        Some("no") => Some(Decision::No),
        _ => None,
    }
}

fn decision_str(d: Option<Decision>) -> Option<&'static str> {
    d.map(|d| match d {
        Decision::Yes => "yes",
        Decision::No => "no",
    })
}

impl TryFrom<Row> for Stored {
    type Error = sqlx::Error;

    fn try_from(r: Row) -> Result<Stored, sqlx::Error> {
        let status = Status::parse(&r.status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown transfer status {:?}", r.status).into())
        })?;
        let terms = match (r.from_account, r.to_account, r.amount, r.currency) {
            (Some(from_account), Some(to_account), Some(amount), Some(currency)) => Some(Terms {
                from_account,
                to_account,
                amount: amount.0,
                currency,
            }),
            _ => None,
        };
        let risk: Option<RiskAssessment> = r
            .risk_assessment
            .map(|Json(v)| serde_json::from_value(v))
            .transpose()
            .map_err(|e| sqlx::Error::Decode(e.into()))?;
        let failed_participant = r.failed_participant.as_deref().and_then(|p| {
            [
                Participant::Risk,
                Participant::Source,
                Participant::Destination,
            ]
            .into_iter()
            .find(|x| x.as_str() == p)
        });
        Ok(Stored {
            saga: Saga {
                transfer_id: r.transfer_id,
                terms,
                status,
                risk_vote: decision(r.risk_vote),
                source_vote: decision(r.source_vote),
                destination_vote: decision(r.destination_vote),
                risk,
                reason: r.reason,
                reason_detail: r.reason_detail,
                failed_participant,
                captured: r.captured,
                credited: r.credited,
                released: r.released,
                credit_cancelled: r.credit_cancelled,
                finished_at: r.finished_at.map(Into::into),
            },
            request_hash: r.request_hash,
            traceparent: r.traceparent,
            tracestate: r.tracestate,
            request_message_id: r.request_message_id,
            correlation_id: r.correlation_id,
            resend_attempts: r.resend_attempts,
            created_at: r.created_at.into(),
            decided_at: r.decided_at.map(Into::into),
        })
    }
}

const COLUMNS: &str =
    "transfer_id, request_hash, from_account, to_account, amount, currency, status,
     risk_vote, source_vote, destination_vote, risk_assessment, reason, reason_detail,
     failed_participant, captured, credited, released, credit_cancelled, traceparent, tracestate,
     request_message_id, correlation_id, resend_attempts, created_at, decided_at, finished_at";

/// The transfers a batch of messages names, read and locked, and what the batch changed in
/// them, written back with one statement per kind of change.
#[derive(Debug, Default)]
pub struct Sagas {
    rows: HashMap<Uuid, Pending>,
}

#[derive(Debug)]
struct Pending {
    stored: Stored,
    /// For a new transfer: its request as received, and when its prepare times out.
    insert: Option<(serde_json::Value, Timestamp)>,
    /// Changed since read or inserted: when its commands are next due again.
    update: Option<Option<Timestamp>>,
}

impl Sagas {
    /// Reads and locks the rows of `transfer_ids` (those that exist), in id order.
    ///
    /// On PostgreSQL the ids go as one array: one text whatever the batch holds, planned once
    /// per connection. A list of placeholders was a text per batch size, and PostgreSQL
    /// planned it again at every run.
    pub async fn lock(tx: &mut Tx, transfer_ids: &[Uuid]) -> Result<Sagas, sqlx::Error> {
        let mut ids = transfer_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Sagas::default());
        }
        // The stores differ only in how the ids are given.
        let select = |ids_given: &str| {
            format!(
                "SELECT {COLUMNS} FROM transfers WHERE transfer_id {ids_given}
                 ORDER BY transfer_id FOR UPDATE"
            )
        };
        let found: Vec<Row> = match tx {
            Tx::Postgres(tx) => {
                sqlx::query_as(&select("= ANY($1)"))
                    .bind(&ids)
                    .fetch_all(&mut **tx)
                    .await?
            }
            Tx::Sqlite(_) => query_rows!(tx, Row, &select("IN ({rows})"), &ids, |id| (*id))?,
        };
        let mut rows = HashMap::with_capacity(found.len());
        for row in found {
            let stored = Stored::try_from(row)?;
            let pending = Pending {
                stored,
                insert: None,
                update: None,
            };
            rows.insert(pending.stored.saga.transfer_id, pending);
        }
        Ok(Sagas { rows })
    }

    pub fn get(&self, transfer_id: Uuid) -> Option<&Stored> {
        self.rows.get(&transfer_id).map(|p| &p.stored)
    }

    /// A transfer to change; [`Sagas::changed`] must follow if it was.
    pub fn get_mut(&mut self, transfer_id: Uuid) -> Option<&mut Stored> {
        self.rows.get_mut(&transfer_id).map(|p| &mut p.stored)
    }

    /// Records that a transfer changed. `next_resend_at` is when unanswered commit or abort
    /// commands are next due (none while preparing or once terminal).
    pub fn changed(&mut self, transfer_id: Uuid, next_resend_at: Option<Timestamp>) {
        if let Some(pending) = self.rows.get_mut(&transfer_id) {
            pending.update = Some(next_resend_at);
        }
    }

    /// Adds a new transfer.
    pub fn insert(
        &mut self,
        stored: Stored,
        request: serde_json::Value,
        prepare_deadline: Timestamp,
    ) {
        let pending = Pending {
            stored,
            insert: Some((request, prepare_deadline)),
            update: None,
        };
        self.rows.insert(pending.stored.saga.transfer_id, pending);
    }

    /// Writes the new transfers and the changes.
    pub async fn save(self, tx: &mut Tx, now: Timestamp) -> Result<(), sqlx::Error> {
        let mut rows: Vec<&Pending> = self.rows.values().collect();
        rows.sort_unstable_by_key(|p| p.stored.saga.transfer_id);
        let inserts: Vec<(&Stored, &serde_json::Value, Timestamp)> = rows
            .iter()
            .filter_map(|p| {
                let (request, deadline) = p.insert.as_ref()?;
                Some((&p.stored, request, *deadline))
            })
            .collect();
        let updates: Vec<(&Stored, Option<Timestamp>)> = rows
            .iter()
            .filter_map(|p| Some((&p.stored, p.update?)))
            .collect();
        // A transfer inserted and then changed in the same batch (a reply that followed its
        // request in the batch) needs its update to see its insert: a statement each.
        let apart = rows
            .iter()
            .any(|p| p.insert.is_some() && p.update.is_some());
        match tx {
            Tx::Postgres(tx) if !apart => save_at_once(tx, &inserts, &updates, now).await,
            _ => {
                insert(tx, &inserts, now).await?;
                update(tx, &updates, now).await
            }
        }
    }
}

/// On PostgreSQL, the new transfers and the changes in one statement ([`SAVE`]): one round
/// trip rather than two, and one text whatever the batch holds, so that each connection plans
/// it once.
async fn save_at_once(
    tx: &mut PgConnection,
    inserts: &[(&Stored, &serde_json::Value, Timestamp)],
    updates: &[(&Stored, Option<Timestamp>)],
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    let at = |t: Option<DateTime<Utc>>| t.map(|t| Timestamp::from(t).0);
    sqlx::query(SAVE)
        .bind(now)
        .bind(column(inserts, |(s, ..)| s.saga.transfer_id))
        .bind(column(inserts, |(s, ..)| s.request_hash.as_str()))
        .bind(column(inserts, |(_, request, _)| Json(*request)))
        .bind(column(inserts, |(s, ..)| {
            s.saga.terms.as_ref().map(|t| t.from_account)
        }))
        .bind(column(inserts, |(s, ..)| {
            s.saga.terms.as_ref().map(|t| t.to_account)
        }))
        .bind(column(inserts, |(s, ..)| {
            s.saga.terms.as_ref().map(|t| t.amount)
        }))
        .bind(column(inserts, |(s, ..)| {
            s.saga.terms.as_ref().map(|t| t.currency.as_str())
        }))
        .bind(column(inserts, |(s, ..)| s.saga.status.as_str()))
        .bind(column(inserts, |(s, ..)| s.saga.reason.as_deref()))
        .bind(column(inserts, |(s, ..)| s.saga.reason_detail.as_deref()))
        .bind(column(inserts, |(s, ..)| s.traceparent.as_deref()))
        .bind(column(inserts, |(s, ..)| s.tracestate.as_deref()))
        .bind(column(inserts, |(s, ..)| s.request_message_id))
        .bind(column(inserts, |(.., deadline)| deadline.0))
        .bind(column(inserts, |(s, ..)| at(s.saga.finished_at)))
        .bind(column(inserts, |(s, ..)| s.correlation_id.as_deref()))
        .bind(column(updates, |(s, _)| s.saga.transfer_id))
        .bind(column(updates, |(s, _)| s.saga.status.as_str()))
        .bind(column(updates, |(s, _)| decision_str(s.saga.risk_vote)))
        .bind(column(updates, |(s, _)| decision_str(s.saga.source_vote)))
        .bind(column(updates, |(s, _)| {
            decision_str(s.saga.destination_vote)
        }))
        .bind(column(updates, |(s, _)| assessment(&s.saga)))
        .bind(column(updates, |(s, _)| s.saga.reason.as_deref()))
        .bind(column(updates, |(s, _)| {
            s.saga.failed_participant.map(Participant::as_str)
        }))
        .bind(column(updates, |(s, _)| s.saga.captured))
        .bind(column(updates, |(s, _)| s.saga.credited))
        .bind(column(updates, |(s, _)| s.saga.released))
        .bind(column(updates, |(s, _)| s.saga.credit_cancelled))
        .bind(column(updates, |(s, _)| at(s.saga.finished_at)))
        .bind(column(updates, |(s, _)| s.resend_attempts))
        .bind(column(updates, |(s, _)| decided_at(s, now).map(|t| t.0)))
        .bind(column(updates, |(_, next_resend_at)| {
            next_resend_at.map(|t| t.0)
        }))
        .execute(tx)
        .await?;
    Ok(())
}

/// [`save_at_once`]'s statement: each list bound as arrays, one per column, and unnested; an
/// empty list writes nothing. `$1` is the time of the batch. No row is both inserted and
/// updated, so the order in which PostgreSQL runs the two parts does not matter.
const SAVE: &str = "WITH inserted AS (
        INSERT INTO transfers (transfer_id, request_hash, request, from_account, to_account, amount,
                               currency, status, reason, reason_detail, traceparent, tracestate,
                               request_message_id, prepare_deadline, finished_at, correlation_id,
                               created_at, updated_at)
        SELECT *, $1, $1
        FROM unnest($2::uuid[], $3::text[], $4::jsonb[], $5::uuid[], $6::uuid[], $7::numeric[],
                    $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                    $14::uuid[], $15::timestamptz[], $16::timestamptz[], $17::text[])
    ), updated AS (
        UPDATE transfers SET status = v.status, risk_vote = v.risk_vote,
               source_vote = v.source_vote, destination_vote = v.destination_vote,
               risk_assessment = v.risk_assessment, reason = v.reason,
               failed_participant = v.failed_participant, captured = v.captured,
               credited = v.credited, released = v.released,
               credit_cancelled = v.credit_cancelled, finished_at = v.finished_at,
               resend_attempts = v.resend_attempts, decided_at = v.decided_at,
               next_resend_at = v.next_resend_at, updated_at = $1
        FROM unnest($18::uuid[], $19::text[], $20::text[], $21::text[], $22::text[], $23::jsonb[],
                    $24::text[], $25::text[], $26::bool[], $27::bool[], $28::bool[], $29::bool[],
                    $30::timestamptz[], $31::int[], $32::timestamptz[], $33::timestamptz[])
            AS v (transfer_id, status, risk_vote, source_vote, destination_vote, risk_assessment,
                  reason, failed_participant, captured, credited, released, credit_cancelled,
                  finished_at, resend_attempts, decided_at, next_resend_at)
        WHERE transfers.transfer_id = v.transfer_id
    )
    SELECT 1";

/// When a transfer was decided: as recorded, or now if it was decided in this batch.
fn decided_at(stored: &Stored, now: Timestamp) -> Option<Timestamp> {
    match (stored.decided_at, stored.saga.status) {
        (Some(at), _) => Some(Timestamp::from(at)),
        (None, Status::Preparing) => None,
        (None, _) => Some(now),
    }
}

/// The risk worker's assessment as stored.
fn assessment(saga: &Saga) -> Option<Json<serde_json::Value>> {
    saga.risk
        .as_ref()
        .map(|r| Json(serde_json::to_value(r).expect("assessments serialize")))
}

/// Inserts new transfers: each with its request and prepare deadline.
async fn insert(
    tx: &mut Tx,
    rows: &[(&Stored, &serde_json::Value, Timestamp)],
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    execute_rows!(
        tx,
        "INSERT INTO transfers (transfer_id, request_hash, request, from_account, to_account, amount,
                                currency, status, reason, reason_detail, traceparent, tracestate,
                                request_message_id, prepare_deadline, finished_at, correlation_id,
                                created_at, updated_at)
         VALUES {rows}",
        rows,
        |(stored, request, deadline)| (
            stored.saga.transfer_id,
            &stored.request_hash,
            Json(*request),
            stored.saga.terms.as_ref().map(|t| t.from_account),
            stored.saga.terms.as_ref().map(|t| t.to_account),
            stored.saga.terms.as_ref().map(|t| Amount(t.amount)),
            stored.saga.terms.as_ref().map(|t| t.currency.as_str()),
            stored.saga.status.as_str(),
            &stored.saga.reason,
            &stored.saga.reason_detail,
            &stored.traceparent,
            &stored.tracestate,
            stored.request_message_id,
            *deadline,
            stored.saga.finished_at.map(Timestamp::from),
            &stored.correlation_id,
            now,
            now,
        ),
    )?;
    Ok(())
}

/// Writes back sagas' states, each with when its commands are next due again.
pub async fn update(
    tx: &mut Tx,
    rows: &[(&Stored, Option<Timestamp>)],
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    update_rows!(
        tx,
        "WITH v (transfer_id, status, risk_vote, source_vote, destination_vote, risk_assessment,
                 reason, failed_participant, captured, credited, released, credit_cancelled,
                 finished_at, resend_attempts, decided_at, next_resend_at, updated_at)
              AS (VALUES {rows})
         UPDATE transfers SET status = v.status, risk_vote = v.risk_vote,
                source_vote = v.source_vote, destination_vote = v.destination_vote,
                risk_assessment = v.risk_assessment, reason = v.reason,
                failed_participant = v.failed_participant, captured = v.captured,
                credited = v.credited, released = v.released,
                credit_cancelled = v.credit_cancelled, finished_at = v.finished_at,
                resend_attempts = v.resend_attempts, decided_at = v.decided_at,
                next_resend_at = v.next_resend_at, updated_at = v.updated_at
         FROM v WHERE transfers.transfer_id = v.transfer_id",
        rows,
        |(stored, next_resend_at)| (
            stored.saga.transfer_id,
            stored.saga.status.as_str(),
            decision_str(stored.saga.risk_vote),
            decision_str(stored.saga.source_vote),
            decision_str(stored.saga.destination_vote),
            assessment(&stored.saga),
            &stored.saga.reason,
            stored.saga.failed_participant.map(Participant::as_str),
            stored.saga.captured,
            stored.saga.credited,
            stored.saga.released,
            stored.saga.credit_cancelled,
            stored.saga.finished_at.map(Timestamp::from),
            stored.resend_attempts,
            decided_at(stored, now),
            *next_resend_at,
            now,
        ),
    )?;
    Ok(())
}

/// Transfers still preparing past their deadline, locked; others' locked rows are skipped.
pub async fn lock_expired(
    tx: &mut Tx,
    now: Timestamp,
    limit: i64,
) -> Result<Vec<Stored>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM transfers WHERE status = 'preparing' AND prepare_deadline < $1
         ORDER BY prepare_deadline LIMIT $2 FOR UPDATE SKIP LOCKED"
    );
    let rows = query_as!(tx, Row, fetch_all, &sql, now, limit)?;
    rows.into_iter().map(Stored::try_from).collect()
}

/// Decided transfers whose commit or abort commands are due to be sent again, locked.
pub async fn lock_due(tx: &mut Tx, now: Timestamp, limit: i64) -> Result<Vec<Stored>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM transfers
         WHERE status IN ('committing', 'aborting') AND next_resend_at < $1
         ORDER BY next_resend_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    );
    let rows = query_as!(tx, Row, fetch_all, &sql, now, limit)?;
    rows.into_iter().map(Stored::try_from).collect()
}

/// Decided transfers whose commit or abort commands have been re-sent at least `stuck_after`
/// times (those `twophase_sagas_stuck` counts), the longest decided first.
pub async fn stuck(tx: &mut Tx, stuck_after: i32) -> Result<Vec<Stored>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM transfers
         WHERE status IN ('committing', 'aborting') AND resend_attempts >= $1
         ORDER BY decided_at, transfer_id"
    );
    let rows = query_as!(tx, Row, fetch_all, &sql, stuck_after)?;
    rows.into_iter().map(Stored::try_from).collect()
}

/// How many transfers are in flight per status, and how many of those committing or aborting
/// have had their commands re-sent at least `stuck_after` times.
pub async fn in_flight(
    tx: &mut Tx,
    stuck_after: i32,
) -> Result<(Vec<(String, i64)>, i64), sqlx::Error> {
    // Each count names exactly the statuses of one timer's partial index, so that it reads the
    // transfers in flight rather than every transfer there ever was.
    let by_status = query_as!(
        tx,
        (String, i64),
        fetch_all,
        "SELECT 'preparing', count(*) FROM transfers WHERE status = 'preparing'
         UNION ALL
         SELECT status, count(*) FROM transfers WHERE status IN ('committing', 'aborting')
         GROUP BY status",
    )?;
    let (stuck,) = query_as!(
        tx,
        (i64,),
        fetch_one,
        "SELECT count(*) FROM transfers
         WHERE status IN ('committing', 'aborting') AND resend_attempts >= $1",
        stuck_after,
    )?;
    Ok((by_status, stuck))
}

/// When commands re-sent for the `attempts`-th time are next due: `first` doubled per attempt,
/// capped at `max`.
pub fn next_resend(now: Timestamp, first: Duration, max: Duration, attempts: i32) -> Timestamp {
    let wait = first.saturating_mul(1u32 << attempts.clamp(0, 16)).min(max);
    Timestamp::from(now.0 + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX))
}
