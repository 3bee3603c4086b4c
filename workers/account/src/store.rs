//! Operations on accounts outside the saga: opening, deposits and withdrawals, status changes,
//! and reading balances and the ledger. Deposits and withdrawals are ledger entries, so every
//! balance can be replayed from the ledger.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account {0} does not exist")]
    NotFound(Uuid),
    #[error("account {0} is {1}, not active")]
    Inactive(Uuid, String),
    #[error("account {account} has {available} available, less than {amount}")]
    InsufficientFunds {
        account: Uuid,
        available: Decimal,
        amount: Decimal,
    },
    #[error("account {0} still has money, holds or pending credits and cannot be closed")]
    NotEmpty(Uuid),
    #[error(transparent)]
    Amount(#[from] twophase_messages::AmountError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    Frozen,
    Closed,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Frozen => "frozen",
            AccountStatus::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Account {
    pub account_id: Uuid,
    pub currency: String,
    pub status: String,
    pub balance: Decimal,
    pub held: Decimal,
    pub created_at: DateTime<Utc>,
}

impl Account {
    pub fn available(&self) -> Decimal {
        self.balance - self.held
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct LedgerEntry {
    pub entry_id: i64,
    pub account_id: Uuid,
    pub transfer_id: Option<Uuid>,
    pub kind: String,
    pub amount: Decimal,
    pub currency: String,
    pub balance_after: Decimal,
    pub reference: Option<String>,
    pub created_at: DateTime<Utc>,
}

const ACCOUNT_COLUMNS: &str = "account_id, currency, status, balance, held, created_at";

/// Opens an empty, active account.
pub async fn open(pool: &PgPool, currency: &str) -> Result<Account, AccountError> {
    // Validating a unit amount checks the currency code and nothing else.
    twophase_messages::validate_amount("1", currency)?;
    let account = sqlx::query_as(&format!(
        "INSERT INTO accounts (account_id, currency) VALUES ($1, $2) RETURNING {ACCOUNT_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(currency)
    .fetch_one(pool)
    .await?;
    Ok(account)
}

pub async fn get(pool: &PgPool, account_id: Uuid) -> Result<Account, AccountError> {
    sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"
    ))
    .bind(account_id)
    .fetch_optional(pool)
    .await?
    .ok_or(AccountError::NotFound(account_id))
}

pub async fn list(pool: &PgPool) -> Result<Vec<Account>, AccountError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, account_id"
    ))
    .fetch_all(pool)
    .await?)
}

/// The newest `limit` ledger entries of an account, newest first.
pub async fn ledger(
    pool: &PgPool,
    account_id: Uuid,
    limit: i64,
) -> Result<Vec<LedgerEntry>, AccountError> {
    Ok(sqlx::query_as(
        "SELECT entry_id, account_id, transfer_id, kind, amount, currency, balance_after, reference, created_at
         FROM ledger WHERE account_id = $1 ORDER BY entry_id DESC LIMIT $2",
    )
    .bind(account_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Adds money from outside the system (a deposit) or takes it out (a withdrawal).
pub async fn deposit(
    pool: &PgPool,
    account_id: Uuid,
    amount: &str,
    reference: Option<&str>,
) -> Result<Account, AccountError> {
    move_external(pool, account_id, amount, reference, "deposit").await
}

pub async fn withdraw(
    pool: &PgPool,
    account_id: Uuid,
    amount: &str,
    reference: Option<&str>,
) -> Result<Account, AccountError> {
    move_external(pool, account_id, amount, reference, "withdrawal").await
}

async fn move_external(
    pool: &PgPool,
    account_id: Uuid,
    amount: &str,
    reference: Option<&str>,
    kind: &str,
) -> Result<Account, AccountError> {
    let mut tx = pool.begin().await?;
    let account: Account = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE"
    ))
    .bind(account_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(AccountError::NotFound(account_id))?;
    if account.status != "active" {
        return Err(AccountError::Inactive(account_id, account.status));
    }
    let amount = twophase_messages::validate_amount(amount, &account.currency)?;
    let delta = if kind == "withdrawal" {
        if account.available() < amount {
            return Err(AccountError::InsufficientFunds {
                account: account_id,
                available: account.available(),
                amount,
            });
        }
        -amount
    } else {
        amount
    };
    let updated: Account = sqlx::query_as(&format!(
        "UPDATE accounts SET balance = balance + $2, updated_at = now() WHERE account_id = $1
         RETURNING {ACCOUNT_COLUMNS}"
    ))
    .bind(account_id)
    .bind(delta)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger (account_id, kind, amount, currency, balance_after, reference)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(account_id)
    .bind(kind)
    .bind(amount)
    .bind(&account.currency)
    .bind(updated.balance)
    .bind(reference)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated)
}

/// Freezes, reactivates or closes an account. A frozen or closed account votes no to new
/// transfers; credits already reserved on it still land. Closing needs an empty account.
pub async fn set_status(
    pool: &PgPool,
    account_id: Uuid,
    status: AccountStatus,
) -> Result<Account, AccountError> {
    let mut tx = pool.begin().await?;
    let account: Account = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE"
    ))
    .bind(account_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(AccountError::NotFound(account_id))?;
    if status == AccountStatus::Closed {
        let (pending,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM credits WHERE account_id = $1 AND status = 'reserved'",
        )
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        if !account.balance.is_zero() || !account.held.is_zero() || pending > 0 {
            return Err(AccountError::NotEmpty(account_id));
        }
    }
    let updated = sqlx::query_as(&format!(
        "UPDATE accounts SET status = $2, updated_at = now() WHERE account_id = $1 RETURNING {ACCOUNT_COLUMNS}"
    ))
    .bind(account_id)
    .bind(status.as_str())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated)
}
