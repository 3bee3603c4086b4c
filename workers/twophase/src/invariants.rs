//! The invariants of the design (§4, 1–4), checked against the stores: what the tests, the
//! benchmark and an operator after an incident all ask of the data. Sums are taken here in exact
//! decimals, the same on both backends.

use std::collections::{BTreeMap, HashMap};

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
/// sees every schema ([`Db::connect_all`]), as of one moment (so it may run while transfers
/// flow), and checks:
/// 1. conservation: in each currency, balances sum to deposits minus withdrawals;
/// 2. no overdraft; each balance replays from its ledger and each held amount from open holds;
/// 3. every transfer is terminal; completed ⇒ one debit of the amount on the source and one
///    credit on the destination, both accounts in the transfer's currency; failed or rejected
///    ⇒ no ledger entry;
/// 4. no ledger entry of an unknown transfer, and nothing left held or reserved.
pub async fn check(db: &Db) -> Result<Report, twophase_runtime::db::sqlx::Error> {
    let mut tx = db.begin_snapshot().await?;
    let accounts = query_as!(
        &mut tx,
        (Uuid, String, Amount, Amount),
        fetch_all,
        "SELECT account_id, currency, balance, held FROM account.accounts"
    )?;
    let ledger = query_as!(
        &mut tx,
        (Uuid, Option<Uuid>, String, Amount, String),
        fetch_all,
        "SELECT account_id, transfer_id, kind, amount, currency FROM account.ledger"
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
        (
            Uuid,
            String,
            Option<Uuid>,
            Option<Uuid>,
            Option<Amount>,
            Option<String>
        ),
        fetch_all,
        "SELECT transfer_id, status, from_account, to_account, amount, currency \
         FROM coordinator.transfers"
    )?;
    tx.commit().await?;

    let mut report = Report {
        accounts: accounts.len(),
        transfers: transfers.len(),
        violations: Vec::new(),
    };
    let v = &mut report.violations;

    // Currency → (balances, deposits less withdrawals).
    let mut sums: BTreeMap<&str, (Decimal, Decimal)> = BTreeMap::new();
    // Sums of many accounts can pass the largest decimal: they saturate rather than panic.
    for (_, currency, balance, _) in &accounts {
        let balances = &mut sums.entry(currency).or_default().0;
        *balances = balances.saturating_add(balance.0);
    }
    for (_, _, kind, amount, currency) in &ledger {
        let external = &mut sums.entry(currency).or_default().1;
        match kind.as_str() {
            "deposit" => *external = external.saturating_add(amount.0),
            "withdrawal" => *external = external.saturating_sub(amount.0),
            _ => {}
        }
    }
    for (currency, (total, external)) in &sums {
        if total != external {
            v.push(format!(
                "1 conservation: {currency} balances sum to {total}, deposits less withdrawals \
                 to {external}"
            ));
        }
    }
    let currency_of: HashMap<Uuid, &str> = accounts
        .iter()
        .map(|(id, currency, ..)| (*id, currency.as_str()))
        .collect();

    let mut replayed: HashMap<Uuid, Decimal> = HashMap::new();
    for (account, _, kind, amount, _) in &ledger {
        let sign = match kind.as_str() {
            "deposit" | "credit" => Decimal::ONE,
            _ => Decimal::NEGATIVE_ONE,
        };
        // Saturated, as the reconciler's replay is: a store altered past the largest decimal
        // shows as a broken invariant rather than a panic.
        let sum = replayed.entry(*account).or_default();
        *sum = sum.saturating_add(sign * amount.0);
    }
    let mut open_held: HashMap<Uuid, Decimal> = HashMap::new();
    for (_, account, amount) in &holds {
        let sum = open_held.entry(*account).or_default();
        *sum = sum.saturating_add(amount.0);
    }
    for (id, _, balance, held) in &accounts {
        let (balance, held) = (balance.0, held.0);
        if balance.saturating_sub(held) < Decimal::ZERO {
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
    for (account, transfer, kind, amount, _) in &ledger {
        if let Some(t) = transfer {
            by_transfer
                .entry(*t)
                .or_default()
                .push((*account, kind.clone(), amount.0));
        }
    }
    for (id, status, from, to, amount, currency) in &transfers {
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
                let [source, destination] =
                    [from, to].map(|a| currency_of.get(a).copied().unwrap_or("no currency"));
                let currency = currency.as_deref().unwrap_or("no currency");
                if source != currency || destination != currency {
                    v.push(format!(
                        "3 atomic outcome: completed transfer {id} in {currency} moved money \
                         from an account in {source} to one in {destination}"
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

#[cfg(test)]
mod tests {
    use twophase_runtime::db::{self, Timestamp};
    use twophase_runtime::execute;

    use super::*;

    /// A completed transfer that moved dollars out of a dollar account and into a euro account
    /// keeps the total of all balances and every account's ledger replay: only the sums by
    /// currency and the transfer's own currency show it.
    #[tokio::test]
    async fn money_moved_across_currencies_is_reported() {
        let dir = std::env::temp_dir().join(format!("twophase-inv-{}", Uuid::new_v4()));
        let url = format!("sqlite:{}", dir.display());
        db::migrate(&url).await.unwrap();
        let db = Db::connect_all(&url).await.unwrap();
        let (dollars, euros, transfer) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let now = Timestamp::now();
        let amount = |s: &str| Amount(s.parse().unwrap());
        let mut tx = db.begin().await.unwrap();
        for (account, currency, balance, deposit) in
            [(dollars, "USD", "90", "100"), (euros, "EUR", "60", "50")]
        {
            execute!(
                &mut tx,
                "INSERT INTO account.accounts (account_id, currency, balance, held, created_at, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $5)",
                account,
                currency,
                amount(balance),
                amount("0"),
                now
            )
            .unwrap();
            execute!(
                &mut tx,
                "INSERT INTO account.ledger (account_id, kind, amount, currency, balance_after, \
                 created_at) VALUES ($1, 'deposit', $2, $3, $2, $4)",
                account,
                amount(deposit),
                currency,
                now
            )
            .unwrap();
        }
        for (account, kind, currency, after) in [
            (dollars, "debit", "USD", "90"),
            (euros, "credit", "EUR", "60"),
        ] {
            execute!(
                &mut tx,
                "INSERT INTO account.ledger (account_id, transfer_id, kind, amount, currency, \
                 balance_after, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                account,
                transfer,
                kind,
                amount("10"),
                currency,
                amount(after),
                now
            )
            .unwrap();
        }
        execute!(
            &mut tx,
            "INSERT INTO coordinator.transfers (transfer_id, request_hash, request, from_account, \
             to_account, amount, currency, status, created_at, updated_at) \
             VALUES ($1, '', '{}', $2, $3, $4, 'USD', 'completed', $5, $5)",
            transfer,
            dollars,
            euros,
            amount("10"),
            now
        )
        .unwrap();
        tx.commit().await.unwrap();

        let report = check(&db).await.unwrap();
        let mut found: Vec<&str> = report
            .violations
            .iter()
            .map(|v| &v[..v.find(':').unwrap()])
            .collect();
        found.sort();
        assert_eq!(
            found,
            ["1 conservation", "1 conservation", "3 atomic outcome"],
            "{:#?}",
            report.violations
        );
        let all = report.violations.join("\n");
        for says in [
            "USD balances sum to 90, deposits less withdrawals to 100",
            "EUR balances sum to 60, deposits less withdrawals to 50",
            &format!("transfer {transfer} in USD moved money from an account in USD to one in EUR"),
        ] {
            assert!(all.contains(says), "{says:?} not in {all}");
        }
        db.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }
}
