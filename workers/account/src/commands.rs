//! Applying one account command: the participant's side of the two-phase protocol.
//!
//! Prepare commands (`Hold`, `ReserveCredit`) vote; commit and abort commands (`Capture`,
//! `Credit`, `Release`, `CancelCredit`) acknowledge. An abort that arrives before its prepare
//! is recorded as `voided`, and the late prepare is then refused, so no hold is left hanging.

use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use twophase_messages::{
    reasons, AccountAction, AccountCommand, AccountCommandBody, Ack, Decision, Message,
    Participant, Vote,
};
use twophase_runtime::HandlerError;
use uuid::Uuid;

/// Applies `command` once and returns its reply; a command seen before gets its stored reply.
pub async fn apply(
    pool: &PgPool,
    command: &AccountCommand,
    message_id: Uuid,
) -> Result<Message, HandlerError> {
    let body = &command.body;
    let mut tx = pool.begin().await?;
    let stored: Option<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT reply_type, reply FROM processed_commands WHERE transfer_id = $1 AND action = $2",
    )
    .bind(body.transfer_id)
    .bind(command.action.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((reply_type, reply)) = stored {
        tracing::info!(
            action = command.action.as_str(),
            "command seen before: sending its stored reply"
        );
        let payload = serde_json::to_vec(&reply).map_err(|e| HandlerError::Permanent(e.into()))?;
        return Message::decode(&reply_type, twophase_messages::SCHEMA_VERSION, &payload)
            .map_err(|e| HandlerError::Permanent(e.into()));
    }

    let reply = match command.action {
        AccountAction::Hold => hold(&mut tx, body).await?,
        AccountAction::ReserveCredit => reserve_credit(&mut tx, body).await?,
        AccountAction::Capture => capture(&mut tx, body).await?,
        AccountAction::Credit => credit(&mut tx, body).await?,
        AccountAction::Release => release(&mut tx, body).await?,
        AccountAction::CancelCredit => cancel_credit(&mut tx, body).await?,
    };

    sqlx::query(
        "INSERT INTO processed_commands (transfer_id, action, account_id, message_id, reply_type, reply)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(body.transfer_id)
    .bind(command.action.as_str())
    .bind(body.account_id)
    .bind(message_id)
    .bind(reply.message_type())
    .bind(serde_json::from_slice::<serde_json::Value>(&reply.to_json()).expect("replies are JSON"))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(reply)
}

fn vote(body: &AccountCommandBody, participant: Participant, no: Option<&str>) -> Message {
    Message::Vote(Vote {
        transfer_id: body.transfer_id,
        participant,
        decision: if no.is_some() {
            Decision::No
        } else {
            Decision::Yes
        },
        reason: no.map(str::to_owned),
        risk: None,
    })
}

fn ack(body: &AccountCommandBody, action: AccountAction) -> Message {
    Message::Ack(Ack {
        transfer_id: body.transfer_id,
        action,
    })
}

/// A command that contradicts the recorded state: the coordinator never sends one, so it is
/// set aside for a person to look at rather than retried.
fn violation(
    body: &AccountCommandBody,
    action: AccountAction,
    state: Option<&str>,
) -> HandlerError {
    HandlerError::permanent(format!(
        "protocol violation: {} for transfer {} on account {} found it {}",
        action.as_str(),
        body.transfer_id,
        body.account_id,
        state.unwrap_or("absent")
    ))
}

struct LockedAccount {
    currency: String,
    status: String,
    balance: Decimal,
    held: Decimal,
}

async fn lock_account(
    tx: &mut PgConnection,
    account_id: Uuid,
) -> Result<Option<LockedAccount>, sqlx::Error> {
    let row: Option<(String, String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT currency, status, balance, held FROM accounts WHERE account_id = $1 FOR UPDATE",
    )
    .bind(account_id)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(|(currency, status, balance, held)| LockedAccount {
        currency,
        status,
        balance,
        held,
    }))
}

/// The recorded state of a hold or credit, locked for this transaction.
async fn lock_entry(
    tx: &mut PgConnection,
    table: Entry,
    transfer_id: Uuid,
) -> Result<Option<(String, Decimal, Uuid)>, sqlx::Error> {
    let sql = format!(
        "SELECT status, amount, account_id FROM {} WHERE transfer_id = $1 FOR UPDATE",
        table.name()
    );
    sqlx::query_as(&sql)
        .bind(transfer_id)
        .fetch_optional(&mut *tx)
        .await
}

async fn insert_entry(
    tx: &mut PgConnection,
    table: Entry,
    body: &AccountCommandBody,
    status: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {} (transfer_id, account_id, amount, currency, status) VALUES ($1, $2, $3, $4, $5)",
        table.name()
    );
    sqlx::query(&sql)
        .bind(body.transfer_id)
        .bind(body.account_id)
        .bind(body.amount)
        .bind(&body.currency)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn set_entry_status(
    tx: &mut PgConnection,
    table: Entry,
    transfer_id: Uuid,
    status: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "UPDATE {} SET status = $2, updated_at = now() WHERE transfer_id = $1",
        table.name()
    );
    sqlx::query(&sql)
        .bind(transfer_id)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Entry {
    Hold,
    Credit,
}

impl Entry {
    fn name(self) -> &'static str {
        match self {
            Entry::Hold => "holds",
            Entry::Credit => "credits",
        }
    }
}

/// Checks the account a prepare acts on; `Err(reason)` is the no vote's reason.
fn check_account(
    account: Option<&LockedAccount>,
    body: &AccountCommandBody,
    participant: Participant,
) -> Result<(), &'static str> {
    let (not_found, inactive) = match participant {
        Participant::Destination => (
            reasons::DESTINATION_NOT_FOUND,
            reasons::DESTINATION_INACTIVE,
        ),
        _ => (reasons::SOURCE_NOT_FOUND, reasons::SOURCE_INACTIVE),
    };
    let account = account.ok_or(not_found)?;
    if account.status != "active" {
        return Err(inactive);
    }
    if account.currency != body.currency {
        return Err(reasons::CURRENCY_MISMATCH);
    }
    Ok(())
}

async fn hold(tx: &mut PgConnection, body: &AccountCommandBody) -> Result<Message, HandlerError> {
    let source = Participant::Source;
    match lock_entry(tx, Entry::Hold, body.transfer_id).await? {
        None => {}
        Some((status, ..)) if status == "voided" => {
            return Ok(vote(body, source, Some(reasons::ABORTED)))
        }
        Some((status, ..)) => return Err(violation(body, AccountAction::Hold, Some(&status))),
    }
    let account = lock_account(tx, body.account_id).await?;
    if let Err(reason) = check_account(account.as_ref(), body, source) {
        return Ok(vote(body, source, Some(reason)));
    }
    let account = account.expect("checked above");
    if account.balance - account.held < body.amount {
        return Ok(vote(body, source, Some(reasons::INSUFFICIENT_FUNDS)));
    }
    sqlx::query("UPDATE accounts SET held = held + $2, updated_at = now() WHERE account_id = $1")
        .bind(body.account_id)
        .bind(body.amount)
        .execute(&mut *tx)
        .await?;
    insert_entry(tx, Entry::Hold, body, "held").await?;
    Ok(vote(body, source, None))
}

async fn reserve_credit(
    tx: &mut PgConnection,
    body: &AccountCommandBody,
) -> Result<Message, HandlerError> {
    let destination = Participant::Destination;
    match lock_entry(tx, Entry::Credit, body.transfer_id).await? {
        None => {}
        Some((status, ..)) if status == "voided" => {
            return Ok(vote(body, destination, Some(reasons::ABORTED)))
        }
        Some((status, ..)) => {
            return Err(violation(body, AccountAction::ReserveCredit, Some(&status)))
        }
    }
    // Locked so that the account cannot be closed while the credit is pending.
    let account = lock_account(tx, body.account_id).await?;
    if let Err(reason) = check_account(account.as_ref(), body, destination) {
        return Ok(vote(body, destination, Some(reason)));
    }
    insert_entry(tx, Entry::Credit, body, "reserved").await?;
    Ok(vote(body, destination, None))
}

/// Moves money: the one place a balance changes because of a transfer.
async fn post(
    tx: &mut PgConnection,
    body: &AccountCommandBody,
    kind: &str,
    delta_balance: Decimal,
    delta_held: Decimal,
) -> Result<(), sqlx::Error> {
    let (balance_after,): (Decimal,) = sqlx::query_as(
        "UPDATE accounts SET balance = balance + $2, held = held + $3, updated_at = now()
         WHERE account_id = $1 RETURNING balance",
    )
    .bind(body.account_id)
    .bind(delta_balance)
    .bind(delta_held)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger (account_id, transfer_id, kind, amount, currency, balance_after)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(body.account_id)
    .bind(body.transfer_id)
    .bind(kind)
    .bind(body.amount)
    .bind(&body.currency)
    .bind(balance_after)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The recorded entry must match the command, or the command is not one we sent.
fn matching(
    entry: &(String, Decimal, Uuid),
    body: &AccountCommandBody,
    action: AccountAction,
) -> Result<(), HandlerError> {
    if entry.1 != body.amount || entry.2 != body.account_id {
        return Err(HandlerError::permanent(format!(
            "protocol violation: {} for transfer {} names {} on {}, but {} on {} was prepared",
            action.as_str(),
            body.transfer_id,
            body.amount,
            body.account_id,
            entry.1,
            entry.2
        )));
    }
    Ok(())
}

async fn capture(
    tx: &mut PgConnection,
    body: &AccountCommandBody,
) -> Result<Message, HandlerError> {
    let action = AccountAction::Capture;
    let entry = lock_entry(tx, Entry::Hold, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        Some("held") => {}
        Some("captured") => return Ok(ack(body, action)),
        other => return Err(violation(body, action, other)),
    }
    matching(entry.as_ref().expect("matched held"), body, action)?;
    lock_account(tx, body.account_id).await?;
    post(tx, body, "debit", -body.amount, -body.amount).await?;
    set_entry_status(tx, Entry::Hold, body.transfer_id, "captured").await?;
    Ok(ack(body, action))
}

async fn credit(tx: &mut PgConnection, body: &AccountCommandBody) -> Result<Message, HandlerError> {
    let action = AccountAction::Credit;
    let entry = lock_entry(tx, Entry::Credit, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        Some("reserved") => {}
        Some("credited") => return Ok(ack(body, action)),
        other => return Err(violation(body, action, other)),
    }
    matching(entry.as_ref().expect("matched reserved"), body, action)?;
    lock_account(tx, body.account_id).await?;
    post(tx, body, "credit", body.amount, Decimal::ZERO).await?;
    set_entry_status(tx, Entry::Credit, body.transfer_id, "credited").await?;
    Ok(ack(body, action))
}

async fn release(
    tx: &mut PgConnection,
    body: &AccountCommandBody,
) -> Result<Message, HandlerError> {
    let action = AccountAction::Release;
    let entry = lock_entry(tx, Entry::Hold, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        // The abort overtook the hold: remember it, so the late hold is refused.
        None => insert_entry(tx, Entry::Hold, body, "voided").await?,
        Some("held") => {
            let (_, amount, account_id) = entry.expect("matched held");
            sqlx::query(
                "UPDATE accounts SET held = held - $2, updated_at = now() WHERE account_id = $1",
            )
            .bind(account_id)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
            set_entry_status(tx, Entry::Hold, body.transfer_id, "released").await?;
        }
        Some("released" | "voided") => {}
        other => return Err(violation(body, action, other)),
    }
    Ok(ack(body, action))
}

async fn cancel_credit(
    tx: &mut PgConnection,
    body: &AccountCommandBody,
) -> Result<Message, HandlerError> {
    let action = AccountAction::CancelCredit;
    let entry = lock_entry(tx, Entry::Credit, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        None => insert_entry(tx, Entry::Credit, body, "voided").await?,
        Some("reserved") => {
            set_entry_status(tx, Entry::Credit, body.transfer_id, "cancelled").await?
        }
        Some("cancelled" | "voided") => {}
        other => return Err(violation(body, action, other)),
    }
    Ok(ack(body, action))
}
