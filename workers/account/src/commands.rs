//! Applying one account command: the participant's side of the two-phase protocol.
//!
//! Prepare commands (`Hold`, `ReserveCredit`) vote; commit and abort commands (`Capture`,
//! `Credit`, `Release`, `CancelCredit`) acknowledge. An abort that arrives before its prepare
//! is recorded as `voided`, and the late prepare is then refused, so no hold is left hanging.

use rust_decimal::Decimal;
use twophase_messages::{
    reasons, AccountAction, AccountCommand, AccountCommandBody, Ack, Decision, Message,
    Participant, Vote,
};
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{Amount, Timestamp, Tx};
use twophase_runtime::HandlerError;
use twophase_runtime::{execute, query_as};
use uuid::Uuid;

/// Applies `command` once in `tx` and returns its reply; a command seen before gets its stored
/// reply.
pub async fn apply(
    tx: &mut Tx,
    command: &AccountCommand,
    message_id: Uuid,
) -> Result<Message, HandlerError> {
    let body = &command.body;
    let stored = query_as!(
        &mut *tx,
        (String, Json<serde_json::Value>),
        fetch_optional,
        "SELECT reply_type, reply FROM processed_commands WHERE transfer_id = $1 AND action = $2",
        body.transfer_id,
        command.action.as_str(),
    )?;
    if let Some((reply_type, Json(reply))) = stored {
        tracing::info!(
            action = command.action.as_str(),
            "command seen before: sending its stored reply"
        );
        let payload = serde_json::to_vec(&reply).map_err(|e| HandlerError::Permanent(e.into()))?;
        return Message::decode(&reply_type, twophase_messages::SCHEMA_VERSION, &payload)
            .map_err(|e| HandlerError::Permanent(e.into()));
    }

    let now = Timestamp::now();
    let reply = match command.action {
        AccountAction::Hold => hold(tx, body, now).await?,
        AccountAction::ReserveCredit => reserve_credit(tx, body, now).await?,
        AccountAction::Capture => capture(tx, body, now).await?,
        AccountAction::Credit => credit(tx, body, now).await?,
        AccountAction::Release => release(tx, body, now).await?,
        AccountAction::CancelCredit => cancel_credit(tx, body, now).await?,
    };

    let reply_json: serde_json::Value =
        serde_json::from_slice(&reply.to_json()).expect("replies are JSON");
    execute!(
        tx,
        "INSERT INTO processed_commands (transfer_id, action, account_id, message_id, reply_type, reply, processed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        body.transfer_id,
        command.action.as_str(),
        body.account_id,
        message_id,
        reply.message_type(),
        Json(reply_json),
        now,
    )?;
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
    tx: &mut Tx,
    account_id: Uuid,
) -> Result<Option<LockedAccount>, twophase_runtime::db::sqlx::Error> {
    let row = query_as!(
        tx,
        (String, String, Amount, Amount),
        fetch_optional,
        "SELECT currency, status, balance, held FROM accounts WHERE account_id = $1 FOR UPDATE",
        account_id,
    )?;
    Ok(row.map(|(currency, status, balance, held)| LockedAccount {
        currency,
        status,
        balance: balance.0,
        held: held.0,
    }))
}

/// Writes an account's new balance and held amount, computed in Rust from its locked row.
async fn set_money(
    tx: &mut Tx,
    account_id: Uuid,
    balance: Decimal,
    held: Decimal,
    now: Timestamp,
) -> Result<(), twophase_runtime::db::sqlx::Error> {
    execute!(
        tx,
        "UPDATE accounts SET balance = $2, held = $3, updated_at = $4 WHERE account_id = $1",
        account_id,
        Amount(balance),
        Amount(held),
        now,
    )?;
    Ok(())
}

/// A hold's or credit's recorded state: status, amount, account.
type EntryRow = (String, Decimal, Uuid);

/// The recorded state of a hold or credit, locked for this transaction.
async fn lock_entry(
    tx: &mut Tx,
    table: Entry,
    transfer_id: Uuid,
) -> Result<Option<EntryRow>, twophase_runtime::db::sqlx::Error> {
    let sql = format!(
        "SELECT status, amount, account_id FROM {} WHERE transfer_id = $1 FOR UPDATE",
        table.name()
    );
    let row = query_as!(
        tx,
        (String, Amount, Uuid),
        fetch_optional,
        &sql,
        transfer_id
    )?;
    Ok(row.map(|(status, amount, account)| (status, amount.0, account)))
}

async fn insert_entry(
    tx: &mut Tx,
    table: Entry,
    body: &AccountCommandBody,
    status: &str,
    now: Timestamp,
) -> Result<(), twophase_runtime::db::sqlx::Error> {
    let sql = format!(
        "INSERT INTO {} (transfer_id, account_id, amount, currency, status, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)",
        table.name()
    );
    execute!(
        tx,
        &sql,
        body.transfer_id,
        body.account_id,
        Amount(body.amount),
        &body.currency,
        status,
        now
    )?;
    Ok(())
}

async fn set_entry_status(
    tx: &mut Tx,
    table: Entry,
    transfer_id: Uuid,
    status: &str,
    now: Timestamp,
) -> Result<(), twophase_runtime::db::sqlx::Error> {
    let sql = format!(
        "UPDATE {} SET status = $2, updated_at = $3 WHERE transfer_id = $1",
        table.name()
    );
    execute!(tx, &sql, transfer_id, status, now)?;
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

async fn hold(
    tx: &mut Tx,
    body: &AccountCommandBody,
    now: Timestamp,
) -> Result<Message, HandlerError> {
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
    set_money(
        tx,
        body.account_id,
        account.balance,
        account.held + body.amount,
        now,
    )
    .await?;
    insert_entry(tx, Entry::Hold, body, "held", now).await?;
    Ok(vote(body, source, None))
}

async fn reserve_credit(
    tx: &mut Tx,
    body: &AccountCommandBody,
    now: Timestamp,
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
    insert_entry(tx, Entry::Credit, body, "reserved", now).await?;
    Ok(vote(body, destination, None))
}

/// Moves money: the one place a balance changes because of a transfer. `debit` also releases
/// the hold the amount was kept under.
async fn post(
    tx: &mut Tx,
    body: &AccountCommandBody,
    kind: &str,
    now: Timestamp,
) -> Result<(), HandlerError> {
    let account = lock_account(tx, body.account_id)
        .await?
        .ok_or_else(|| HandlerError::permanent(format!("account {} vanished", body.account_id)))?;
    let (balance, held) = match kind {
        "debit" => (account.balance - body.amount, account.held - body.amount),
        _ => (account.balance + body.amount, account.held),
    };
    set_money(tx, body.account_id, balance, held, now).await?;
    execute!(
        tx,
        "INSERT INTO ledger (account_id, transfer_id, kind, amount, currency, balance_after, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        body.account_id,
        body.transfer_id,
        kind,
        Amount(body.amount),
        &body.currency,
        Amount(balance),
        now,
    )?;
    Ok(())
}
/// The recorded entry must match the command, or the command is not one we sent.
fn matching(
    entry: &EntryRow,
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
    tx: &mut Tx,
    body: &AccountCommandBody,
    now: Timestamp,
) -> Result<Message, HandlerError> {
    let action = AccountAction::Capture;
    let entry = lock_entry(tx, Entry::Hold, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        Some("held") => {}
        Some("captured") => return Ok(ack(body, action)),
        other => return Err(violation(body, action, other)),
    }
    matching(entry.as_ref().expect("matched held"), body, action)?;
    post(tx, body, "debit", now).await?;
    set_entry_status(tx, Entry::Hold, body.transfer_id, "captured", now).await?;
    Ok(ack(body, action))
}

async fn credit(
    tx: &mut Tx,
    body: &AccountCommandBody,
    now: Timestamp,
) -> Result<Message, HandlerError> {
    let action = AccountAction::Credit;
    let entry = lock_entry(tx, Entry::Credit, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        Some("reserved") => {}
        Some("credited") => return Ok(ack(body, action)),
        other => return Err(violation(body, action, other)),
    }
    matching(entry.as_ref().expect("matched reserved"), body, action)?;
    post(tx, body, "credit", now).await?;
    set_entry_status(tx, Entry::Credit, body.transfer_id, "credited", now).await?;
    Ok(ack(body, action))
}

async fn release(
    tx: &mut Tx,
    body: &AccountCommandBody,
    now: Timestamp,
) -> Result<Message, HandlerError> {
    let action = AccountAction::Release;
    let entry = lock_entry(tx, Entry::Hold, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        // The abort overtook the hold: remember it, so the late hold is refused.
        None => insert_entry(tx, Entry::Hold, body, "voided", now).await?,
        Some("held") => {
            let (_, amount, account_id) = entry.expect("matched held");
            let account = lock_account(tx, account_id)
                .await?
                .ok_or_else(|| HandlerError::permanent(format!("account {account_id} vanished")))?;
            set_money(tx, account_id, account.balance, account.held - amount, now).await?;
            set_entry_status(tx, Entry::Hold, body.transfer_id, "released", now).await?;
        }
        Some("released" | "voided") => {}
        other => return Err(violation(body, action, other)),
    }
    Ok(ack(body, action))
}

async fn cancel_credit(
    tx: &mut Tx,
    body: &AccountCommandBody,
    now: Timestamp,
) -> Result<Message, HandlerError> {
    let action = AccountAction::CancelCredit;
    let entry = lock_entry(tx, Entry::Credit, body.transfer_id).await?;
    match entry.as_ref().map(|e| e.0.as_str()) {
        None => insert_entry(tx, Entry::Credit, body, "voided", now).await?,
        Some("reserved") => {
            set_entry_status(tx, Entry::Credit, body.transfer_id, "cancelled", now).await?
        }
        Some("cancelled" | "voided") => {}
        other => return Err(violation(body, action, other)),
    }
    Ok(ack(body, action))
}
