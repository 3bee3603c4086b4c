//! The invariants of the design (§4, 1–4), checked against the stores: what the tests, the
//! benchmark and an operator after an incident all ask of the data. Sums are taken here in exact
//! decimals, the same on both backends.

use std::collections::HashMap;

use rust_decimal::Decimal;
use twophase_runtime::db::{Amount, Db};
use twophase_runtime::query_as;
use uuid::Uuid;

/// What was checked, and every violation found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub accounts: usize,
    pub transfers: usize,
    pub violations: Vec<String>,
}

impl Report {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Reads every account, ledger entry, open hold or credit and transfer, through a pool that
/// sees every schema ([`Db::connect_all`]), and checks:
/// 1. conservation: balances sum to deposits minus withdrawals;
/// 2. no overdraft; each balance replays from its ledger and each held amount from open holds;
/// 3. every transfer is terminal; completed ⇒ one debit of the amount on the source and one
///    credit on the destination; failed or rejected ⇒ no ledger entry;
/// 4. no ledger entry of an unknown transfer, and nothing left held or reserved.
pub async fn check(db: &Db) -> Result<Report, twophase_runtime::db::sqlx::Error> {
    let mut tx = db.begin().await?;
    let accounts = query_as!(
        &mut tx,
        (Uuid, Amount, Amount),
        fetch_all,
        "SELECT account_id, balance, held FROM account.accounts"
    )?;
    let ledger = query_as!(
        &mut tx,
        (Uuid, Option<Uuid>, String, Amount),
        fetch_all,
        "SELECT account_id, transfer_id, kind, amount FROM account.ledger"
    )?;
    let holds = query_as!(
        &mut tx,
        (Uuid, Uuid, Amount),
        fetch_all,
        "SELECT transfer_id, account_id, amount FROM account.holds WHERE status = 'held'"
    )?;
    let credits = query_as!(
        &mut tx,
        (Uuid,),
        fetch_all,
        "SELECT transfer_id FROM account.credits WHERE status = 'reserved'"
    )?;
    let transfers = query_as!(
        &mut tx,
        (Uuid, String, Option<Uuid>, Option<Uuid>, Option<Amount>),
        fetch_all,
        "SELECT transfer_id, status, from_account, to_account, amount FROM coordinator.transfers"
    )?;
    tx.commit().await?;

    let mut report = Report {
        accounts: accounts.len(),
        transfers: transfers.len(),
        violations: Vec::new(),
    };
    let v = &mut report.violations;

    let total: Decimal = accounts.iter().map(|a| a.1 .0).sum();
    let external: Decimal = ledger
        .iter()
        .map(|(_, _, kind, amount)| match kind.as_str() {
            "deposit" => amount.0,
            "withdrawal" => -amount.0,
            _ => Decimal::ZERO,
        })
        .sum();
    if total != external {
        v.push(format!(
            "1 conservation: balances sum to {total}, deposits less withdrawals to {external}"
        ));
    }

    let mut replayed: HashMap<Uuid, Decimal> = HashMap::new();
    for (account, _, kind, amount) in &ledger {
        let sign = match kind.as_str() {
            "deposit" | "credit" => Decimal::ONE,
            _ => Decimal::NEGATIVE_ONE,
        };
        *replayed.entry(*account).or_default() += sign * amount.0;
    }
    let mut open_held: HashMap<Uuid, Decimal> = HashMap::new();
    for (_, account, amount) in &holds {
        *open_held.entry(*account).or_default() += amount.0;
    }
    for (id, balance, held) in &accounts {
        let (balance, held) = (balance.0, held.0);
        if balance - held < Decimal::ZERO {
            v.push(format!(
                "2 no overdraft: account {id} has {balance} with {held} held"
            ));
        }
        let expected = replayed.get(id).copied().unwrap_or_default();
        if balance != expected {
            v.push(format!(
                "2 ledger: account {id} holds {balance}, its ledger replays to {expected}"
            ));
        }
        let expected = open_held.get(id).copied().unwrap_or_default();
        if held != expected {
            v.push(format!(
                "2 holds: account {id} has {held} held, its open holds sum to {expected}"
            ));
        }
    }

    let mut by_transfer: HashMap<Uuid, Vec<(Uuid, String, Decimal)>> = HashMap::new();
    for (account, transfer, kind, amount) in ledger {
        if let Some(t) = transfer {
            by_transfer
                .entry(t)
                .or_default()
                .push((account, kind, amount.0));
        }
    }
    for (id, status, from, to, amount) in &transfers {
        let mut entries = by_transfer.remove(id).unwrap_or_default();
        match (status.as_str(), from, to, amount) {
            ("completed", Some(from), Some(to), Some(amount)) => {
                entries.sort_by(|a, b| a.1.cmp(&b.1));
                let expected = vec![
                    (*to, "credit".to_owned(), amount.0),
                    (*from, "debit".to_owned(), amount.0),
                ];
                if entries != expected {
                    v.push(format!(
                        "3 atomic outcome: completed transfer {id} has ledger entries {entries:?}"
                    ));
                }
            }
            ("failed" | "rejected", ..) => {
                if !entries.is_empty() {
                    v.push(format!(
                        "3 atomic outcome: {status} transfer {id} moved money: {entries:?}"
                    ));
                }
            }
            (other, ..) => v.push(format!(
                "3 atomic outcome: transfer {id} is not terminal: {other}"
            )),
        }
    }
    for (id, entries) in by_transfer {
        v.push(format!(
            "4 exactly once: ledger entries of unknown transfer {id}: {entries:?}"
        ));
    }
    for (id, ..) in &holds {
        v.push(format!("4 exactly once: transfer {id} left a hold open"));
    }
    for (id,) in &credits {
        v.push(format!(
            "4 exactly once: transfer {id} left a credit reserved"
        ));
    }
    Ok(report)
}
