//! Operations on accounts outside the saga: opening, deposits and withdrawals, status changes,
//! and reading balances and the ledger. Deposits and withdrawals are ledger entries, so every
//! balance can be replayed from the ledger.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use twophase_runtime::db::sqlx;
use twophase_runtime::db::{Amount, Db, Timestamp, Tx};
use twophase_runtime::{execute, for_each_row, query_as};
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
    #[error("account {0} is closed for good: it cannot be frozen or made active again")]
    Closed(Uuid),
    #[error(
        "account {account} cannot move {amount} exactly: from its balance of {balance}, the result \
         would pass the largest amount an account holds, or need more digits than it keeps"
    )]
    BalanceLimit {
        account: Uuid,
        balance: Decimal,
        amount: Decimal,
    },
    #[error(
        "reference {reference:?} was used on account {account} for a {kind} of {amount} (ledger \
         entry {entry_id}): a reference names one {kind} of an account"
    )]
    ReferenceUsed {
        account: Uuid,
        reference: String,
        kind: String,
        amount: Decimal,
        entry_id: i64,
    },
    #[error(
        "a reference is 1 to {MAX_REFERENCE} bytes of text without control characters, not {0}"
    )]
    BadReference(String),
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
    #[sqlx(try_from = "Amount")]
    pub balance: Decimal,
    #[sqlx(try_from = "Amount")]
    pub held: Decimal,
    #[sqlx(try_from = "Timestamp")]
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
    #[sqlx(try_from = "Amount")]
    pub amount: Decimal,
    pub currency: String,
    #[sqlx(try_from = "Amount")]
    pub balance_after: Decimal,
    pub reference: Option<String>,
    #[sqlx(try_from = "Timestamp")]
    pub created_at: DateTime<Utc>,
}

const ACCOUNT_COLUMNS: &str = "account_id, currency, status, balance, held, created_at";

/// Opens an empty, active account.
pub async fn open(db: &Db, currency: &str) -> Result<Account, AccountError> {
    // Validating a unit amount checks the currency code and nothing else.
    twophase_messages::validate_amount("1", currency)?;
    let now = Timestamp::now();
    let mut tx = db.begin().await?;
    let account = query_as!(
        &mut tx,
        Account,
        fetch_one,
        &format!(
            "INSERT INTO accounts (account_id, currency, status, balance, held, created_at, updated_at)
             VALUES ($1, $2, 'active', $3, $3, $4, $4) RETURNING {ACCOUNT_COLUMNS}"
        ),
        Uuid::new_v4(),
        currency,
        Amount(Decimal::ZERO),
        now,
    )?;
    tx.commit().await?;
    Ok(account)
}

pub async fn get(db: &Db, account_id: Uuid) -> Result<Account, AccountError> {
    let mut tx = db.begin().await?;
    let account = lock(&mut tx, account_id).await?;
    tx.commit().await?;
    Ok(account)
}

/// Reads and locks an account.
async fn lock(tx: &mut Tx, account_id: Uuid) -> Result<Account, AccountError> {
    query_as!(
        tx,
        Account,
        fetch_optional,
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE"),
        account_id,
    )?
    .ok_or(AccountError::NotFound(account_id))
}

pub async fn list(db: &Db) -> Result<Vec<Account>, AccountError> {
    let mut tx = db.begin().await?;
    let all = query_as!(
        &mut tx,
        Account,
        fetch_all,
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, account_id"),
    )?;
    tx.commit().await?;
    Ok(all)
}

/// What the balance gauges show: every account's balance summed per currency, and how many
/// accounts have less than nothing available.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub balance: std::collections::BTreeMap<String, Decimal>,
    pub overdrawn: usize,
}

/// Sums every account's balance. It reads the three columns it needs, in no order, where
/// [`list`] reads every column and sorts every account by age.
pub async fn totals(db: &Db) -> Result<Totals, AccountError> {
    let mut tx = db.begin().await?;
    let all = query_as!(
        &mut tx,
        (String, Amount, Amount),
        fetch_all,
        "SELECT currency, balance, held FROM accounts"
    )?;
    tx.commit().await?;
    let mut totals = Totals::default();
    for (currency, balance, held) in all {
        // A gauge: past the largest decimal, it shows the largest.
        let total = totals.balance.entry(currency).or_default();
        *total = total.saturating_add(balance.0);
        if balance.0 < held.0 {
            totals.overdrawn += 1;
        }
    }
    Ok(totals)
}

/// The newest `limit` ledger entries of an account, newest first.
pub async fn ledger(
    db: &Db,
    account_id: Uuid,
    limit: i64,
) -> Result<Vec<LedgerEntry>, AccountError> {
    let mut tx = db.begin().await?;
    let entries = query_as!(
        &mut tx,
        LedgerEntry,
        fetch_all,
        "SELECT entry_id, account_id, transfer_id, kind, amount, currency, balance_after, reference, created_at
         FROM ledger WHERE account_id = $1 ORDER BY entry_id DESC LIMIT $2",
        account_id,
        limit,
    )?;
    tx.commit().await?;
    Ok(entries)
}

/// What a deposit or a withdrawal did: the account after it, and the ledger entry that made it
/// earlier if its reference names a movement already made (nothing changed this time).
#[derive(Debug, Clone)]
pub struct Moved {
    pub account: Account,
    pub earlier_entry: Option<i64>,
}

/// The longest reference of a deposit or withdrawal, in bytes.
pub const MAX_REFERENCE: usize = 256;

/// Adds money from outside the system (a deposit) or takes it out (a withdrawal). A
/// `reference` names one deposit, or one withdrawal, of the account: the same again (a retry
/// after a lost answer) changes nothing, and another amount under it is refused.
pub async fn deposit(
    db: &Db,
    account_id: Uuid,
    amount: &str,
    reference: Option<&str>,
) -> Result<Moved, AccountError> {
    move_external(db, account_id, amount, reference, "deposit").await
}

pub async fn withdraw(
    db: &Db,
    account_id: Uuid,
    amount: &str,
    reference: Option<&str>,
) -> Result<Moved, AccountError> {
    move_external(db, account_id, amount, reference, "withdrawal").await
}

async fn move_external(
    db: &Db,
    account_id: Uuid,
    amount: &str,
    reference: Option<&str>,
    kind: &str,
) -> Result<Moved, AccountError> {
    if let Some(reference) = reference {
        let text = !reference.is_empty() && !reference.chars().any(char::is_control);
        if !text || reference.len() > MAX_REFERENCE {
            return Err(AccountError::BadReference(twophase_messages::quoted(
                reference,
            )));
        }
    }
    let mut tx = db.begin().await?;
    let account = lock(&mut tx, account_id).await?;
    let amount = twophase_messages::validate_amount(amount, &account.currency)?;
    // Read under the account's lock, so that two movements under one reference cannot both
    // find none.
    if let Some(reference) = reference {
        let earlier = query_as!(
            &mut tx,
            (i64, Amount),
            fetch_optional,
            "SELECT entry_id, amount FROM ledger
             WHERE account_id = $1 AND reference = $2 AND kind = $3
             ORDER BY entry_id LIMIT 1",
            account_id,
            reference,
            kind,
        )?;
        match earlier {
            Some((entry_id, earlier)) if earlier.0 == amount => {
                tx.commit().await?;
                return Ok(Moved {
                    account,
                    earlier_entry: Some(entry_id),
                });
            }
            Some((entry_id, earlier)) => {
                return Err(AccountError::ReferenceUsed {
                    account: account_id,
                    reference: reference.to_owned(),
                    kind: kind.to_owned(),
                    amount: earlier.0,
                    entry_id,
                })
            }
            None => {}
        }
    }
    if account.status != "active" {
        return Err(AccountError::Inactive(account_id, account.status));
    }
    let balance = if kind == "withdrawal" {
        if account.available() < amount {
            return Err(AccountError::InsufficientFunds {
                account: account_id,
                available: account.available(),
                amount,
            });
        }
        twophase_messages::exact_sub(account.balance, amount)
    } else {
        twophase_messages::exact_add(account.balance, amount)
    }
    // A balance too large to keep the amount's decimals would be rounded: the ledger would
    // record money moved that the balance does not show.
    .ok_or(AccountError::BalanceLimit {
        account: account_id,
        balance: account.balance,
        amount,
    })?;
    let now = Timestamp::now();
    let updated = query_as!(
        &mut tx,
        Account,
        fetch_one,
        &format!(
            "UPDATE accounts SET balance = $2, updated_at = $3 WHERE account_id = $1
             RETURNING {ACCOUNT_COLUMNS}"
        ),
        account_id,
        Amount(balance),
        now,
    )?;
    execute!(
        &mut tx,
        "INSERT INTO ledger (account_id, kind, amount, currency, balance_after, reference, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        account_id,
        kind,
        Amount(amount),
        &account.currency,
        Amount(balance),
        reference,
        now,
    )?;
    tx.commit().await?;
    Ok(Moved {
        account: updated,
        earlier_entry: None,
    })
}

/// Freezes, reactivates or closes an account. A frozen or closed account votes no to new
/// transfers; credits already reserved on it still land. Closing needs an empty account.
pub async fn set_status(
    db: &Db,
    account_id: Uuid,
    status: AccountStatus,
) -> Result<Account, AccountError> {
    let mut tx = db.begin().await?;
    let account = lock(&mut tx, account_id).await?;
    if account.status == AccountStatus::Closed.as_str() {
        // Closing it again changes nothing; anything else would reopen it.
        return match status {
            AccountStatus::Closed => Ok(account),
            _ => Err(AccountError::Closed(account_id)),
        };
    }
    if status == AccountStatus::Closed {
        let (pending,) = query_as!(
            &mut tx,
            (i64,),
            fetch_one,
            "SELECT count(*) FROM credits WHERE account_id = $1 AND status = 'reserved'",
            account_id,
        )?;
        if !account.balance.is_zero() || !account.held.is_zero() || pending > 0 {
            return Err(AccountError::NotEmpty(account_id));
        }
    }
    let updated = query_as!(
        &mut tx,
        Account,
        fetch_one,
        &format!(
            "UPDATE accounts SET status = $2, updated_at = $3 WHERE account_id = $1 RETURNING {ACCOUNT_COLUMNS}"
        ),
        account_id,
        status.as_str(),
        Timestamp::now(),
    )?;
    tx.commit().await?;
    Ok(updated)
}

/// An account whose stored figure differs from what its records say it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub account_id: Uuid,
    /// `balance` (against the replay of its ledger), `held` (against its open holds) or
    /// `balance_after` (of a ledger entry, against the entries up to it).
    pub field: &'static str,
    /// The ledger entry, for `balance_after`.
    pub entry_id: Option<i64>,
    pub expected: Decimal,
    pub actual: Decimal,
}

/// Replays every account's ledger and open holds and reports each account whose balance or
/// held amount differs, and the first entry of each account's ledger whose `balance_after` is
/// not the sum of the entries up to it (an entry altered along with the balance, which the
/// replay alone would miss), all read in one snapshot. Returns the number of accounts checked
/// with the mismatches.
pub async fn check_balances(db: &Db) -> Result<(usize, Vec<Mismatch>), AccountError> {
    let mut tx = db.begin_snapshot().await?;
    let accounts = query_as!(
        &mut tx,
        (Uuid, Amount, Amount),
        fetch_all,
        "SELECT account_id, balance, held FROM accounts"
    )?;
    let mut replayed: std::collections::HashMap<Uuid, (Decimal, Decimal)> = Default::default();
    let mut mismatches = Vec::new();
    let mut misstated = std::collections::HashSet::new();
    // In the order they were written, each sum is a balance the account had, and the one its
    // entry recorded. One that was altered can go past the largest decimal: it saturates, and
    // shows as a mismatch. Read as it comes: a ledger of any length takes memory by account,
    // not by entry.
    for_each_row!(
        &mut tx,
        (i64, Uuid, String, Amount, Amount),
        "SELECT entry_id, account_id, kind, amount, balance_after FROM ledger ORDER BY entry_id",
        |(entry_id, account, kind, amount, balance_after): (i64, Uuid, String, Amount, Amount)| {
            let entry = replayed.entry(account).or_default();
            entry.0 = match kind.as_str() {
                "deposit" | "credit" => entry.0.saturating_add(amount.0),
                _ => entry.0.saturating_sub(amount.0),
            };
            // Past the first, every entry of the account is off by as much: one says it all.
            if entry.0 != balance_after.0 && misstated.insert(account) {
                mismatches.push(Mismatch {
                    account_id: account,
                    field: "balance_after",
                    entry_id: Some(entry_id),
                    expected: entry.0,
                    actual: balance_after.0,
                });
            }
        },
    )?;
    let holds = query_as!(
        &mut tx,
        (Uuid, Amount),
        fetch_all,
        "SELECT account_id, amount FROM holds WHERE status = 'held'"
    )?;
    tx.commit().await?;
    for (account, amount) in holds {
        let held = &mut replayed.entry(account).or_default().1;
        *held = held.saturating_add(amount.0);
    }
    for (account_id, balance, held) in &accounts {
        let (expected_balance, expected_held) =
            replayed.get(account_id).copied().unwrap_or_default();
        for (field, expected, actual) in [
            ("balance", expected_balance, balance.0),
            ("held", expected_held, held.0),
        ] {
            if expected != actual {
                mismatches.push(Mismatch {
                    account_id: *account_id,
                    field,
                    entry_id: None,
                    expected,
                    actual,
                });
            }
        }
    }
    Ok((accounts.len(), mismatches))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The account schema on SQLite, in a new directory the test removes.
    async fn scratch_db() -> (Db, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("twophase-account-{}", Uuid::new_v4()));
        let url = format!("sqlite:{}", dir.display());
        twophase_runtime::db::migrate(&url).await.unwrap();
        (Db::connect(&url, crate::SCHEMA, 1).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn totals_sum_balances_per_currency_and_count_the_overdrawn() {
        let (db, dir) = scratch_db().await;
        assert_eq!(totals(&db).await.unwrap(), Totals::default());
        let (a, b, c) = (
            open(&db, "USD").await.unwrap(),
            open(&db, "USD").await.unwrap(),
            open(&db, "EUR").await.unwrap(),
        );
        for (account, amount) in [(&a, "10.25"), (&b, "0.75"), (&c, "3")] {
            deposit(&db, account.account_id, amount, None)
                .await
                .unwrap();
        }
        // Invariant 2 keeps this from happening; the gauge is there to say if it ever does.
        let mut tx = db.begin().await.unwrap();
        execute!(
            &mut tx,
            "UPDATE accounts SET held = $1 WHERE account_id = $2",
            Amount("1".parse().unwrap()),
            b.account_id,
        )
        .unwrap();
        tx.commit().await.unwrap();
        let expected = Totals {
            balance: [("EUR", "3"), ("USD", "11.00")]
                .into_iter()
                .map(|(c, a)| (c.to_owned(), a.parse().unwrap()))
                .collect(),
            overdrawn: 1,
        };
        assert_eq!(totals(&db).await.unwrap(), expected);
        db.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_closed_account_is_never_reopened() {
        let (db, dir) = scratch_db().await;
        let id = open(&db, "EUR").await.unwrap().account_id;
        let closed = set_status(&db, id, AccountStatus::Closed).await.unwrap();
        assert_eq!(closed.status, "closed");
        for status in [AccountStatus::Active, AccountStatus::Frozen] {
            let refused = set_status(&db, id, status).await;
            assert!(
                matches!(refused, Err(AccountError::Closed(refused)) if refused == id),
                "{status:?}: {refused:?}"
            );
        }
        let again = set_status(&db, id, AccountStatus::Closed).await.unwrap();
        assert_eq!(again.status, "closed");
        assert_eq!(get(&db, id).await.unwrap().status, "closed");
        db.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }
}
