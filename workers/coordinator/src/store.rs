//! Reading and writing saga rows. Every read of a row that will change locks it, so two
//! coordinator copies (during a rebalance) or a handler and the timer never race.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use twophase_messages::{Decision, Participant, RiskAssessment};
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
    pub commit_attempts: i32,
    pub decided_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    transfer_id: Uuid,
    request_hash: String,
    from_account: Option<Uuid>,
    to_account: Option<Uuid>,
    amount: Option<Decimal>,
    currency: Option<String>,
    status: String,
    risk_vote: Option<String>,
    source_vote: Option<String>,
    destination_vote: Option<String>,
    risk_assessment: Option<serde_json::Value>,
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
    commit_attempts: i32,
    decided_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
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
                amount,
                currency,
            }),
            _ => None,
        };
        let risk: Option<RiskAssessment> = r
            .risk_assessment
            .map(serde_json::from_value)
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
                finished_at: r.finished_at,
            },
            request_hash: r.request_hash,
            traceparent: r.traceparent,
            tracestate: r.tracestate,
            request_message_id: r.request_message_id,
            commit_attempts: r.commit_attempts,
            decided_at: r.decided_at,
        })
    }
}

/// Reads and locks a transfer's row.
pub async fn lock(tx: &mut PgConnection, transfer_id: Uuid) -> Result<Option<Stored>, sqlx::Error> {
    let row: Option<Row> =
        sqlx::query_as("SELECT * FROM transfers WHERE transfer_id = $1 FOR UPDATE")
            .bind(transfer_id)
            .fetch_optional(&mut *tx)
            .await?;
    row.map(Stored::try_from).transpose()
}

/// Inserts a new transfer.
pub async fn insert(
    tx: &mut PgConnection,
    stored: &Stored,
    request: &serde_json::Value,
    prepare_deadline: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let s = &stored.saga;
    let terms = s.terms.as_ref();
    sqlx::query(
        "INSERT INTO transfers (transfer_id, request_hash, request, from_account, to_account, amount,
                                currency, status, reason, reason_detail, traceparent, tracestate,
                                request_message_id, prepare_deadline, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(s.transfer_id)
    .bind(&stored.request_hash)
    .bind(request)
    .bind(terms.map(|t| t.from_account))
    .bind(terms.map(|t| t.to_account))
    .bind(terms.map(|t| t.amount))
    .bind(terms.map(|t| t.currency.as_str()))
    .bind(s.status.as_str())
    .bind(&s.reason)
    .bind(&s.reason_detail)
    .bind(&stored.traceparent)
    .bind(&stored.tracestate)
    .bind(stored.request_message_id)
    .bind(prepare_deadline)
    .bind(s.finished_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Writes back a saga's state. `decided_at` is set when the saga leaves `preparing`.
pub async fn update(tx: &mut PgConnection, stored: &Stored) -> Result<(), sqlx::Error> {
    let s = &stored.saga;
    sqlx::query(
        "UPDATE transfers SET status = $2, risk_vote = $3, source_vote = $4, destination_vote = $5,
                risk_assessment = $6, reason = $7, failed_participant = $8, captured = $9,
                credited = $10, released = $11, credit_cancelled = $12, finished_at = $13,
                commit_attempts = $14,
                decided_at = CASE WHEN $2 <> 'preparing' THEN coalesce(decided_at, now()) END,
                updated_at = now()
         WHERE transfer_id = $1",
    )
    .bind(s.transfer_id)
    .bind(s.status.as_str())
    .bind(decision_str(s.risk_vote))
    .bind(decision_str(s.source_vote))
    .bind(decision_str(s.destination_vote))
    .bind(
        s.risk
            .as_ref()
            .map(|r| serde_json::to_value(r).expect("assessments serialize")),
    )
    .bind(&s.reason)
    .bind(s.failed_participant.map(Participant::as_str))
    .bind(s.captured)
    .bind(s.credited)
    .bind(s.released)
    .bind(s.credit_cancelled)
    .bind(s.finished_at)
    .bind(stored.commit_attempts)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Transfers still preparing past their deadline, locked; others' locked rows are skipped.
pub async fn lock_expired(tx: &mut PgConnection, limit: i64) -> Result<Vec<Stored>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT * FROM transfers WHERE status = 'preparing' AND prepare_deadline < now()
         ORDER BY prepare_deadline LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter().map(Stored::try_from).collect()
}

/// Decided transfers whose commands have gone unanswered for longer than their backoff:
/// `resend_after` doubled per attempt, capped at `max_backoff`.
pub async fn lock_stalled(
    tx: &mut PgConnection,
    resend_after: std::time::Duration,
    max_backoff: std::time::Duration,
    limit: i64,
) -> Result<Vec<Stored>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT * FROM transfers
         WHERE status IN ('committing', 'aborting')
           AND updated_at < now() - least(
                 make_interval(secs => $1 * power(2, least(commit_attempts, 16))),
                 make_interval(secs => $2))
         ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(resend_after.as_secs_f64())
    .bind(max_backoff.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter().map(Stored::try_from).collect()
}
