//! Applying account commands: the participant's side of the two-phase protocol.
//!
//! Prepare commands (`Hold`, `ReserveCredit`) vote; commit and abort commands (`Capture`,
//! `Credit`, `Release`, `CancelCredit`) acknowledge. An abort that arrives before its prepare
//! is recorded as `voided`, and the late prepare is then refused, so no hold is left hanging.
//!
//! Commands that arrived together are applied together: the rows they touch are read and
//! locked (holds, credits, then accounts in id order), each command is applied in order to
//! those rows in memory, and what changed is written back. On PostgreSQL the reads are one
//! query and the writes one statement, their rows bound as arrays; on SQLite, where a statement
//! is a call into the library rather than a round trip, they take one statement per table and
//! kind of change.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use twophase_messages::{
    exact_add, exact_sub, reasons, AccountAction, AccountCommand, AccountCommandBody, Ack,
    Decision, Message, Participant, Vote,
};
use twophase_runtime::db::sqlx::postgres::PgConnection;
use twophase_runtime::db::sqlx::types::Json;
use twophase_runtime::db::{column, sqlx, Amount, Timestamp, Tx};
use twophase_runtime::HandlerError;
use twophase_runtime::{execute_rows, query_rows, update_rows};
use uuid::Uuid;

/// A command to apply, with the id of the message that carried it and that message's span.
pub struct Command<'a> {
    pub command: &'a AccountCommand,
    pub message_id: Uuid,
    pub span: &'a tracing::Span,
}

/// Applies each command once, in order, in `tx`, and returns their replies in the same order;
/// a command seen before gets its stored reply.
pub async fn apply(tx: &mut Tx, commands: &[Command<'_>]) -> Result<Vec<Message>, HandlerError> {
    let mut rows = Rows::load(tx, commands).await?;
    let mut replies = Vec::with_capacity(commands.len());
    for c in commands {
        let reply = c.span.in_scope(|| rows.apply(c))?;
        replies.push(reply);
    }
    rows.save(tx).await?;
    Ok(replies)
}

/// What a loaded row needs written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Nothing,
    Insert,
    Update,
}

struct AccountRow {
    currency: String,
    status: String,
    balance: Decimal,
    held: Decimal,
    changed: bool,
}

/// A hold's or a credit's recorded state.
struct EntryRow {
    status: &'static str,
    amount: Decimal,
    account_id: Uuid,
    currency: String,
    write: Write,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    Hold,
    Credit,
}

impl Entry {
    fn of(action: AccountAction) -> Entry {
        match action {
            AccountAction::Hold | AccountAction::Capture | AccountAction::Release => Entry::Hold,
            AccountAction::ReserveCredit | AccountAction::Credit | AccountAction::CancelCredit => {
                Entry::Credit
            }
        }
    }

    fn table(self) -> &'static str {
        match self {
            Entry::Hold => "holds",
            Entry::Credit => "credits",
        }
    }
}

/// Every status an entry can have, so that a status read back is one of ours.
const ENTRY_STATUSES: [&str; 7] = [
    "held",
    "captured",
    "released",
    "voided",
    "reserved",
    "credited",
    "cancelled",
];

struct LedgerRow {
    account_id: Uuid,
    transfer_id: Uuid,
    kind: &'static str,
    amount: Decimal,
    currency: String,
    balance_after: Decimal,
}

struct ProcessedRow {
    transfer_id: Uuid,
    action: &'static str,
    account_id: Uuid,
    message_id: Uuid,
    reply_type: &'static str,
    reply: serde_json::Value,
}

/// The rows a batch of commands reads, locked, and what applying the commands changed.
struct Rows {
    now: Timestamp,
    /// Replies of commands applied before, or earlier in this batch.
    replies: HashMap<(Uuid, AccountAction), Message>,
    /// Ordered by id, the order they are locked in.
    accounts: BTreeMap<Uuid, AccountRow>,
    holds: HashMap<Uuid, EntryRow>,
    credits: HashMap<Uuid, EntryRow>,
    ledger: Vec<LedgerRow>,
    processed: Vec<ProcessedRow>,
}

impl Rows {
    async fn load(tx: &mut Tx, commands: &[Command<'_>]) -> Result<Rows, HandlerError> {
        let mut named: Vec<(Uuid, &str)> = commands
            .iter()
            .map(|c| (c.command.body.transfer_id, c.command.action.as_str()))
            .collect();
        named.sort_unstable();
        named.dedup();
        let mut account_ids: Vec<Uuid> =
            commands.iter().map(|c| c.command.body.account_id).collect();
        account_ids.sort_unstable();
        account_ids.dedup();
        let wanted = Wanted {
            named,
            holds: transfers(commands, Entry::Hold),
            credits: transfers(commands, Entry::Credit),
            accounts: account_ids,
        };
        let found = match tx {
            Tx::Postgres(tx) => wanted.read_at_once(tx).await?,
            Tx::Sqlite(_) => wanted.read_each(tx).await?,
        };

        let mut replies = HashMap::with_capacity(found.replies.len());
        for (transfer_id, action, reply_type, Json(reply)) in found.replies {
            let Some(action) = AccountAction::ALL
                .into_iter()
                .find(|a| a.as_str() == action)
            else {
                return Err(HandlerError::permanent(format!(
                    "unknown stored action {action:?}"
                )));
            };
            let payload =
                serde_json::to_vec(&reply).map_err(|e| HandlerError::Permanent(e.into()))?;
            let reply = Message::decode(&reply_type, twophase_messages::SCHEMA_VERSION, &payload)
                .map_err(|e| HandlerError::Permanent(e.into()))?;
            replies.insert((transfer_id, action), reply);
        }
        let holds = entry_rows(found.holds)?;
        let credits = entry_rows(found.credits)?;
        let accounts = found
            .accounts
            .into_iter()
            .map(|(id, currency, status, balance, held)| {
                let row = AccountRow {
                    currency,
                    status,
                    balance: balance.0,
                    held: held.0,
                    changed: false,
                };
                (id, row)
            })
            .collect();

        Ok(Rows {
            now: Timestamp::now(),
            replies,
            accounts,
            holds,
            credits,
            ledger: Vec::new(),
            processed: Vec::new(),
        })
    }

    /// Applies one command to the rows and records its reply.
    fn apply(&mut self, c: &Command<'_>) -> Result<Message, HandlerError> {
        let (action, body) = (c.command.action, &c.command.body);
        if let Some(reply) = self.replies.get(&(body.transfer_id, action)) {
            tracing::info!(
                action = action.as_str(),
                "command seen before: sending its stored reply"
            );
            return Ok(reply.clone());
        }
        let reply = match action {
            AccountAction::Hold => self.hold(body)?,
            AccountAction::ReserveCredit => self.reserve_credit(body)?,
            AccountAction::Capture => self.capture(body)?,
            AccountAction::Credit => self.credit(body)?,
            AccountAction::Release => self.release(body)?,
            AccountAction::CancelCredit => self.cancel_credit(body)?,
        };
        self.processed.push(ProcessedRow {
            transfer_id: body.transfer_id,
            action: action.as_str(),
            account_id: body.account_id,
            message_id: c.message_id,
            reply_type: reply.message_type(),
            reply: serde_json::from_slice(&reply.to_json()).expect("replies are JSON"),
        });
        self.replies
            .insert((body.transfer_id, action), reply.clone());
        Ok(reply)
    }

    fn entries(&mut self, entry: Entry) -> &mut HashMap<Uuid, EntryRow> {
        match entry {
            Entry::Hold => &mut self.holds,
            Entry::Credit => &mut self.credits,
        }
    }

    fn entry(&mut self, entry: Entry, transfer_id: Uuid) -> Option<&mut EntryRow> {
        self.entries(entry).get_mut(&transfer_id)
    }

    fn insert_entry(&mut self, entry: Entry, body: &AccountCommandBody, status: &'static str) {
        let row = EntryRow {
            status,
            amount: body.amount,
            account_id: body.account_id,
            currency: body.currency.clone(),
            write: Write::Insert,
        };
        self.entries(entry).insert(body.transfer_id, row);
    }

    fn set_entry_status(&mut self, entry: Entry, transfer_id: Uuid, status: &'static str) {
        let row = self.entry(entry, transfer_id).expect("the entry was read");
        row.status = status;
        if row.write == Write::Nothing {
            row.write = Write::Update;
        }
    }

    /// The account a commit or abort acts on, which its prepare found.
    fn prepared_account(&mut self, account_id: Uuid) -> Result<&mut AccountRow, HandlerError> {
        self.accounts
            .get_mut(&account_id)
            .ok_or_else(|| HandlerError::permanent(format!("account {account_id} vanished")))
    }

    fn hold(&mut self, body: &AccountCommandBody) -> Result<Message, HandlerError> {
        let source = Participant::Source;
        match self.entry(Entry::Hold, body.transfer_id).map(|e| e.status) {
            None => {}
            Some("voided") => return Ok(vote(body, source, Some(reasons::ABORTED))),
            Some(status) => return Err(violation(body, AccountAction::Hold, Some(status))),
        }
        let account = self.accounts.get_mut(&body.account_id);
        if let Err(reason) = check_account(account.as_deref(), body, source) {
            return Ok(vote(body, source, Some(reason)));
        }
        let account = account.expect("checked above");
        if account.balance - account.held < body.amount {
            return Ok(vote(body, source, Some(reasons::INSUFFICIENT_FUNDS)));
        }
        // The capture must be able to debit the amount exactly, or it could not be applied.
        let (Some(held), Some(_)) = (
            exact_add(account.held, body.amount),
            exact_sub(account.balance, body.amount),
        ) else {
            return Ok(vote(body, source, Some(reasons::BALANCE_LIMIT)));
        };
        account.held = held;
        account.changed = true;
        self.insert_entry(Entry::Hold, body, "held");
        Ok(vote(body, source, None))
    }

    fn reserve_credit(&mut self, body: &AccountCommandBody) -> Result<Message, HandlerError> {
        let destination = Participant::Destination;
        match self
            .entry(Entry::Credit, body.transfer_id)
            .map(|e| e.status)
        {
            None => {}
            Some("voided") => return Ok(vote(body, destination, Some(reasons::ABORTED))),
            Some(status) => {
                return Err(violation(body, AccountAction::ReserveCredit, Some(status)))
            }
        }
        // Read locked, so that the account cannot be closed while the credit is pending.
        let account = self.accounts.get(&body.account_id);
        if let Err(reason) = check_account(account, body, destination) {
            return Ok(vote(body, destination, Some(reason)));
        }
        // The credit must be able to take the amount exactly, or it could not be applied.
        let balance = account.expect("checked above").balance;
        if exact_add(balance, body.amount).is_none() {
            return Ok(vote(body, destination, Some(reasons::BALANCE_LIMIT)));
        }
        self.insert_entry(Entry::Credit, body, "reserved");
        Ok(vote(body, destination, None))
    }

    /// Moves money: the one place a balance changes because of a transfer. A debit also
    /// releases the hold the amount was kept under.
    fn post(&mut self, body: &AccountCommandBody, kind: &'static str) -> Result<(), HandlerError> {
        let account = self.prepared_account(body.account_id)?;
        let (balance, held) = if kind == "debit" {
            (
                exact_sub(account.balance, body.amount),
                exact_sub(account.held, body.amount),
            )
        } else {
            (exact_add(account.balance, body.amount), Some(account.held))
        };
        // Its prepare checked this one alone; credits reserved together can still add up past
        // what a balance holds. Nothing is rounded: the command stays unapplied.
        let (Some(balance), Some(held)) = (balance, held) else {
            return Err(HandlerError::permanent(format!(
                "a {kind} of {} on account {} cannot be applied exactly: the balance would pass \
                 the largest amount a decimal holds",
                body.amount, body.account_id
            )));
        };
        (account.balance, account.held) = (balance, held);
        account.changed = true;
        let balance_after = account.balance;
        self.ledger.push(LedgerRow {
            account_id: body.account_id,
            transfer_id: body.transfer_id,
            kind,
            amount: body.amount,
            currency: body.currency.clone(),
            balance_after,
        });
        Ok(())
    }

    /// A commit: `from` → `to` on the prepared entry, with its money posted as `kind`.
    fn commit(
        &mut self,
        body: &AccountCommandBody,
        action: AccountAction,
        (from, to): (&'static str, &'static str),
        kind: &'static str,
    ) -> Result<Message, HandlerError> {
        let entry = Entry::of(action);
        let row = self.entry(entry, body.transfer_id);
        match row.as_ref().map(|e| e.status) {
            Some(status) if status == from => {}
            Some(status) if status == to => return Ok(ack(body, action)),
            other => return Err(violation(body, action, other)),
        }
        let row = row.expect("matched above");
        // The recorded entry must match the command, or the command is not one we sent.
        if row.amount != body.amount
            || row.account_id != body.account_id
            || row.currency != body.currency
        {
            return Err(HandlerError::permanent(format!(
                "protocol violation: {} for transfer {} names {} {} on {}, but {} {} on {} was \
                 prepared",
                action.as_str(),
                body.transfer_id,
                body.amount,
                body.currency,
                body.account_id,
                row.amount,
                row.currency,
                row.account_id
            )));
        }
        self.post(body, kind)?;
        self.set_entry_status(entry, body.transfer_id, to);
        Ok(ack(body, action))
    }

    fn capture(&mut self, body: &AccountCommandBody) -> Result<Message, HandlerError> {
        self.commit(body, AccountAction::Capture, ("held", "captured"), "debit")
    }

    fn credit(&mut self, body: &AccountCommandBody) -> Result<Message, HandlerError> {
        self.commit(
            body,
            AccountAction::Credit,
            ("reserved", "credited"),
            "credit",
        )
    }

    fn release(&mut self, body: &AccountCommandBody) -> Result<Message, HandlerError> {
        let action = AccountAction::Release;
        match self
            .entry(Entry::Hold, body.transfer_id)
            .map(|e| (e.status, e.amount, e.account_id))
        {
            // The abort overtook the hold: remember it, so the late hold is refused.
            None => self.insert_entry(Entry::Hold, body, "voided"),
            Some(("held", amount, account_id)) => {
                let account = self.prepared_account(account_id)?;
                account.held = exact_sub(account.held, amount).ok_or_else(|| {
                    HandlerError::permanent(format!(
                        "releasing {amount} held on account {account_id}: the account holds less"
                    ))
                })?;
                account.changed = true;
                self.set_entry_status(Entry::Hold, body.transfer_id, "released");
            }
            Some(("released" | "voided", ..)) => {}
            Some((other, ..)) => return Err(violation(body, action, Some(other))),
        }
        Ok(ack(body, action))
    }

    fn cancel_credit(&mut self, body: &AccountCommandBody) -> Result<Message, HandlerError> {
        let action = AccountAction::CancelCredit;
        match self
            .entry(Entry::Credit, body.transfer_id)
            .map(|e| e.status)
        {
            None => self.insert_entry(Entry::Credit, body, "voided"),
            Some("reserved") => self.set_entry_status(Entry::Credit, body.transfer_id, "cancelled"),
            Some("cancelled" | "voided") => {}
            other => return Err(violation(body, action, other)),
        }
        Ok(ack(body, action))
    }

    /// Writes back what the commands changed.
    async fn save(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        match tx {
            Tx::Postgres(tx) => self.save_at_once(tx).await,
            Tx::Sqlite(_) => self.save_each(tx).await,
        }
    }

    /// On PostgreSQL, every change in one statement ([`SAVE`]): one round trip, where a
    /// statement per table and kind of change took seven, and one text whatever the batch
    /// holds, so that each connection plans it once.
    async fn save_at_once(self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        let accounts: Vec<(&Uuid, &AccountRow)> =
            self.accounts.iter().filter(|(_, a)| a.changed).collect();
        let mut query = sqlx::query(SAVE)
            .bind(self.now)
            .bind(column(&accounts, |(id, _)| **id))
            .bind(column(&accounts, |(_, a)| a.balance))
            .bind(column(&accounts, |(_, a)| a.held));
        for rows in [&self.holds, &self.credits] {
            let inserted = written(rows, Write::Insert);
            let updated = written(rows, Write::Update);
            query = query
                .bind(column(&inserted, |(id, _)| **id))
                .bind(column(&inserted, |(_, e)| e.account_id))
                .bind(column(&inserted, |(_, e)| e.amount))
                .bind(column(&inserted, |(_, e)| e.currency.as_str()))
                .bind(column(&inserted, |(_, e)| e.status))
                .bind(column(&updated, |(id, _)| **id))
                .bind(column(&updated, |(_, e)| e.status));
        }
        query
            .bind(column(&self.ledger, |l| l.account_id))
            .bind(column(&self.ledger, |l| l.transfer_id))
            .bind(column(&self.ledger, |l| l.kind))
            .bind(column(&self.ledger, |l| l.amount))
            .bind(column(&self.ledger, |l| l.currency.as_str()))
            .bind(column(&self.ledger, |l| l.balance_after))
            .bind(column(&self.processed, |p| p.transfer_id))
            .bind(column(&self.processed, |p| p.action))
            .bind(column(&self.processed, |p| p.account_id))
            .bind(column(&self.processed, |p| p.message_id))
            .bind(column(&self.processed, |p| p.reply_type))
            .bind(column(&self.processed, |p| Json(&p.reply)))
            .execute(tx)
            .await?;
        Ok(())
    }

    /// On SQLite, where a statement is a call into the library rather than a round trip to a
    /// server, one statement per table and kind of change.
    async fn save_each(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        let now = self.now;
        let accounts: Vec<(&Uuid, &AccountRow)> =
            self.accounts.iter().filter(|(_, a)| a.changed).collect();
        update_rows!(
            &mut *tx,
            "WITH v (account_id, balance, held, updated_at) AS (VALUES {rows})
             UPDATE accounts SET balance = v.balance, held = v.held, updated_at = v.updated_at
             FROM v WHERE accounts.account_id = v.account_id",
            &accounts,
            |(id, a)| (**id, Amount(a.balance), Amount(a.held), now),
        )?;
        for (entry, rows) in [(Entry::Hold, &self.holds), (Entry::Credit, &self.credits)] {
            save_entries(tx, entry, rows, now).await?;
        }
        execute_rows!(
            &mut *tx,
            "INSERT INTO ledger (account_id, transfer_id, kind, amount, currency, balance_after, created_at)
             VALUES {rows}",
            &self.ledger,
            |l| (
                l.account_id,
                l.transfer_id,
                l.kind,
                Amount(l.amount),
                &l.currency,
                Amount(l.balance_after),
                now
            ),
        )?;
        execute_rows!(
            &mut *tx,
            "INSERT INTO processed_commands (transfer_id, action, account_id, message_id, reply_type, reply, processed_at)
             VALUES {rows}",
            &self.processed,
            |p| (
                p.transfer_id,
                p.action,
                p.account_id,
                p.message_id,
                p.reply_type,
                Json(&p.reply),
                now
            ),
        )?;
        Ok(())
    }
}

/// The transfers whose holds or credits the commands name, in id order.
fn transfers(commands: &[Command<'_>], entry: Entry) -> Vec<Uuid> {
    let mut transfers: Vec<Uuid> = commands
        .iter()
        .filter(|c| Entry::of(c.command.action) == entry)
        .map(|c| c.command.body.transfer_id)
        .collect();
    transfers.sort_unstable();
    transfers.dedup();
    transfers
}

/// A stored reply: transfer, action, reply type, reply.
type ReplyFound = (Uuid, String, String, Json<serde_json::Value>);
/// A hold or credit: transfer, status, amount, account, currency.
type EntryFound = (Uuid, String, Amount, Uuid, String);
/// An account: id, currency, status, balance, held.
type AccountFound = (Uuid, String, String, Amount, Amount);

/// What a batch of commands reads: the replies of the commands it names, if applied before;
/// their holds and credits; and the accounts they name or their holds were taken on.
struct Wanted<'a> {
    named: Vec<(Uuid, &'a str)>,
    holds: Vec<Uuid>,
    credits: Vec<Uuid>,
    accounts: Vec<Uuid>,
}

/// What was found, locked: holds, credits, then accounts in id order.
#[derive(Default)]
struct Found {
    replies: Vec<ReplyFound>,
    holds: Vec<EntryFound>,
    credits: Vec<EntryFound>,
    accounts: Vec<AccountFound>,
}

impl Wanted<'_> {
    /// On PostgreSQL, in one query ([`LOAD`]): one round trip rather than four, and one text
    /// whatever the batch holds.
    async fn read_at_once(&self, tx: &mut PgConnection) -> Result<Found, sqlx::Error> {
        let rows: Vec<LoadRow> = sqlx::query_as(LOAD)
            .bind(column(&self.named, |(id, _)| *id))
            .bind(column(&self.named, |(_, action)| *action))
            .bind(&self.holds)
            .bind(&self.credits)
            .bind(&self.accounts)
            .fetch_all(tx)
            .await?;
        let mut found = Found::default();
        for (kind, id, state, amount, held, account_id, text, reply) in rows {
            let missing = || sqlx::Error::Decode(format!("{kind} {id} is missing a column").into());
            let entry = || -> Result<EntryFound, sqlx::Error> {
                let amount = amount.ok_or_else(missing)?;
                Ok((
                    id,
                    state.clone(),
                    amount,
                    account_id.ok_or_else(missing)?,
                    text.clone(),
                ))
            };
            match kind.as_str() {
                "reply" => found
                    .replies
                    .push((id, state, text, reply.ok_or_else(missing)?)),
                "hold" => found.holds.push(entry()?),
                "credit" => found.credits.push(entry()?),
                "account" => {
                    let balance = amount.ok_or_else(missing)?;
                    found
                        .accounts
                        .push((id, text, state, balance, held.ok_or_else(missing)?));
                }
                _ => return Err(sqlx::Error::Decode(format!("unknown row {kind}").into())),
            }
        }
        Ok(found)
    }

    /// On SQLite, one query each.
    async fn read_each(&self, tx: &mut Tx) -> Result<Found, sqlx::Error> {
        let replies = query_rows!(
            &mut *tx,
            ReplyFound,
            "SELECT transfer_id, action, reply_type, reply FROM processed_commands
             WHERE (transfer_id, action) IN ({rows})",
            &self.named,
            |(id, action)| (*id, *action),
        )?;
        let holds = read_entries(tx, Entry::Hold, &self.holds).await?;
        let credits = read_entries(tx, Entry::Credit, &self.credits).await?;
        let mut account_ids = self.accounts.clone();
        account_ids.extend(holds.iter().map(|(_, _, _, account_id, _)| *account_id));
        account_ids.sort_unstable();
        account_ids.dedup();
        let accounts = query_rows!(
            &mut *tx,
            AccountFound,
            "SELECT account_id, currency, status, balance, held FROM accounts
             WHERE account_id IN ({rows}) ORDER BY account_id FOR UPDATE",
            &account_ids,
            |id| (*id),
        )?;
        Ok(Found {
            replies,
            holds,
            credits,
            accounts,
        })
    }
}

/// The holds or credits of `transfers`, locked, on SQLite.
async fn read_entries(
    tx: &mut Tx,
    entry: Entry,
    transfers: &[Uuid],
) -> Result<Vec<EntryFound>, sqlx::Error> {
    let sql = format!(
        "SELECT transfer_id, status, amount, account_id, currency FROM {}
         WHERE transfer_id IN ({{rows}}) ORDER BY transfer_id FOR UPDATE",
        entry.table()
    );
    query_rows!(tx, EntryFound, &sql, transfers, |id| (*id),)
}

/// A row of [`LOAD`]: what it is (`reply`, `hold`, `credit` or `account`), its id, then
/// - a reply: its action, -, -, -, its type, the reply;
/// - a hold or credit: its status, amount, -, account, currency, -;
/// - an account: its status, balance, held, -, currency, -.
type LoadRow = (
    String,
    Uuid,
    String,
    Option<Amount>,
    Option<Amount>,
    Option<Uuid>,
    String,
    Option<Json<serde_json::Value>>,
);

/// [`Wanted::read_at_once`]'s query: the replies of the commands named by `$1` and `$2`
/// (transfers and actions), the holds of the transfers in `$3` and the credits of those in `$4`,
/// then the accounts in `$5` and those the holds were taken on. The parts run in that order, so
/// rows are locked in the order the other statements lock them: holds, credits, accounts by id.
const LOAD: &str = "SELECT 'reply', transfer_id, action, NULL::numeric, NULL::numeric, NULL::uuid, reply_type, reply
    FROM processed_commands
    WHERE (transfer_id, action) IN (SELECT * FROM unnest($1::uuid[], $2::text[]))
    UNION ALL
    SELECT * FROM (
        SELECT 'hold', transfer_id, status, amount, NULL::numeric, account_id, currency, NULL::jsonb
        FROM holds WHERE transfer_id = ANY($3) ORDER BY transfer_id FOR UPDATE
    ) AS holds
    UNION ALL
    SELECT * FROM (
        SELECT 'credit', transfer_id, status, amount, NULL::numeric, account_id, currency, NULL::jsonb
        FROM credits WHERE transfer_id = ANY($4) ORDER BY transfer_id FOR UPDATE
    ) AS credits
    UNION ALL
    SELECT * FROM (
        SELECT 'account', account_id, status, balance, held, NULL::uuid, currency, NULL::jsonb
        FROM accounts
        WHERE account_id = ANY($5::uuid[] || ARRAY(SELECT account_id FROM holds WHERE transfer_id = ANY($3)))
        ORDER BY account_id FOR UPDATE
    ) AS accounts";

/// The holds or credits found, by transfer.
fn entry_rows(found: Vec<EntryFound>) -> Result<HashMap<Uuid, EntryRow>, HandlerError> {
    let mut rows = HashMap::with_capacity(found.len());
    for (transfer_id, status, amount, account_id, currency) in found {
        let status = ENTRY_STATUSES
            .into_iter()
            .find(|s| *s == status)
            .ok_or_else(|| HandlerError::permanent(format!("unknown entry status {status:?}")))?;
        let row = EntryRow {
            status,
            amount: amount.0,
            account_id,
            currency,
            write: Write::Nothing,
        };
        rows.insert(transfer_id, row);
    }
    Ok(rows)
}

/// Inserts the new holds or credits and writes the changed ones' statuses.
async fn save_entries(
    tx: &mut Tx,
    entry: Entry,
    rows: &HashMap<Uuid, EntryRow>,
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {} (transfer_id, account_id, amount, currency, status, created_at, updated_at)
         VALUES {{rows}}",
        entry.table()
    );
    execute_rows!(&mut *tx, &sql, &written(rows, Write::Insert), |(id, e)| (
        **id,
        e.account_id,
        Amount(e.amount),
        &e.currency,
        e.status,
        now,
        now
    ),)?;
    let sql = format!(
        "WITH v (transfer_id, status, updated_at) AS (VALUES {{rows}})
         UPDATE {table} SET status = v.status, updated_at = v.updated_at
         FROM v WHERE {table}.transfer_id = v.transfer_id",
        table = entry.table()
    );
    update_rows!(&mut *tx, &sql, &written(rows, Write::Update), |(id, e)| (
        **id, e.status, now
    ),)?;
    Ok(())
}

/// The holds or credits that need `write`, in id order.
fn written(rows: &HashMap<Uuid, EntryRow>, write: Write) -> Vec<(&Uuid, &EntryRow)> {
    let mut rows: Vec<(&Uuid, &EntryRow)> = rows.iter().filter(|(_, e)| e.write == write).collect();
    rows.sort_unstable_by_key(|(id, _)| **id);
    rows
}

/// [`Rows::save_at_once`]'s statement: each list bound as arrays, one per column, and
/// unnested; an empty list writes nothing. `$1` is the time of the batch. The rows it updates
/// were locked when the batch read them, and those it inserts are new, so the order in which
/// PostgreSQL runs the parts does not matter. The ledger's entries are numbered in the order
/// they were posted.
const SAVE: &str = "WITH accounts_set AS (
        UPDATE accounts SET balance = v.balance, held = v.held, updated_at = $1
        FROM unnest($2::uuid[], $3::numeric[], $4::numeric[]) AS v (account_id, balance, held)
        WHERE accounts.account_id = v.account_id
    ), holds_new AS (
        INSERT INTO holds (transfer_id, account_id, amount, currency, status, created_at, updated_at)
        SELECT *, $1, $1 FROM unnest($5::uuid[], $6::uuid[], $7::numeric[], $8::text[], $9::text[])
    ), holds_set AS (
        UPDATE holds SET status = v.status, updated_at = $1
        FROM unnest($10::uuid[], $11::text[]) AS v (transfer_id, status)
        WHERE holds.transfer_id = v.transfer_id
    ), credits_new AS (
        INSERT INTO credits (transfer_id, account_id, amount, currency, status, created_at, updated_at)
        SELECT *, $1, $1 FROM unnest($12::uuid[], $13::uuid[], $14::numeric[], $15::text[], $16::text[])
    ), credits_set AS (
        UPDATE credits SET status = v.status, updated_at = $1
        FROM unnest($17::uuid[], $18::text[]) AS v (transfer_id, status)
        WHERE credits.transfer_id = v.transfer_id
    ), ledger_new AS (
        INSERT INTO ledger (account_id, transfer_id, kind, amount, currency, balance_after, created_at)
        SELECT account_id, transfer_id, kind, amount, currency, balance_after, $1
        FROM unnest($19::uuid[], $20::uuid[], $21::text[], $22::numeric[], $23::text[], $24::numeric[])
            WITH ORDINALITY AS v (account_id, transfer_id, kind, amount, currency, balance_after, posted)
        ORDER BY posted
    ), processed_new AS (
        INSERT INTO processed_commands (transfer_id, action, account_id, message_id, reply_type, reply, processed_at)
        SELECT *, $1 FROM unnest($25::uuid[], $26::text[], $27::uuid[], $28::uuid[], $29::text[], $30::jsonb[])
    )
    SELECT 1";

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

/// Checks the account a prepare acts on; `Err(reason)` is the no vote's reason.
fn check_account(
    account: Option<&AccountRow>,
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
