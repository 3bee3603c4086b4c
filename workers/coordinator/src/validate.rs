//! Validating a transfer request: a bad request is rejected with a reason, never dropped.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use twophase_messages::{plain_decimal, quoted, reasons, validate_amount, TransferRequested};
use uuid::Uuid;

use crate::saga::Terms;

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

fn reject(reason: &'static str, detail: String) -> Rejection {
    Rejection { reason, detail }
}

/// Checks a request against the contract and the configured limits.
pub fn validate(
    request: &TransferRequested,
    max_amount: &BTreeMap<String, Decimal>,
    default_max_amount: Decimal,
) -> Result<Terms, Rejection> {
    let account = |field: &str, value: &str| {
        Uuid::parse_str(value).map_err(|_| {
            reject(
                reasons::INVALID_ACCOUNT_ID,
                format!("{field} {} is not a UUID", quoted(value)),
            )
        })
    };
    let from_account = account("from_account", &request.from_account)?;
    let to_account = account("to_account", &request.to_account)?;
    if from_account == to_account {
        return Err(reject(
            reasons::SAME_ACCOUNT,
            "from_account and to_account are the same account".into(),
        ));
    }
    let amount = validate_amount(&request.amount, &request.currency)
        .map_err(|e| reject(e.reason(), e.to_string()))?;
    let limit = max_amount
        .get(&request.currency)
        .copied()
        .unwrap_or(default_max_amount);
    if amount > limit {
        return Err(reject(
            reasons::AMOUNT_OVER_LIMIT,
            format!(
                "amount {amount} is over the limit of {limit} {}",
                request.currency
            ),
        ));
    }
    Ok(Terms {
        from_account,
        to_account,
        amount,
        currency: request.currency.clone(),
    })
}

/// The fingerprint of a request's body: the same transfer id with another fingerprint is a
/// conflict. Do not change the encoding: stored fingerprints are compared with new ones.
pub fn fingerprint(request: &TransferRequested) -> String {
    // "12.3" and "12.30" are the same amount, so an amount is compared by value (one that is
    // not in plain notation, by its text).
    let amount = plain_decimal(&request.amount)
        .map(|d| d.normalize().to_string())
        .unwrap_or_else(|| request.amount.clone());
    // So is a UUID however it is spelled (upper case, braces, no hyphens): by its
    // lower-case hyphenated form, which is what most producers send and fingerprints hold.
    let uuid = |value: &str| {
        Uuid::parse_str(value)
            .map(|id| id.to_string())
            .unwrap_or_else(|_| value.to_owned())
    };
    let (transfer_id, from_account, to_account) = (
        uuid(&request.transfer_id),
        uuid(&request.from_account),
        uuid(&request.to_account),
    );
    let fields = [
        transfer_id.as_str(),
        from_account.as_str(),
        to_account.as_str(),
        amount.as_str(),
        request.currency.as_str(),
        request.reference.as_deref().unwrap_or(""),
    ];
    let mut hasher = Sha256::new();
    for field in fields {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(amount: &str, currency: &str) -> TransferRequested {
        TransferRequested {
            transfer_id: Uuid::new_v4().to_string(),
            from_account: Uuid::new_v4().to_string(),
            to_account: Uuid::new_v4().to_string(),
            amount: amount.into(),
            currency: currency.into(),
            reference: None,
        }
    }

    fn check(r: &TransferRequested) -> Result<Terms, Rejection> {
        let limits = BTreeMap::from([("USD".to_owned(), Decimal::from(1000))]);
        validate(r, &limits, Decimal::from(5000))
    }

    #[test]
    fn each_bad_request_has_its_reason() {
        let mut same = request("1", "USD");
        same.to_account = same.from_account.clone();
        let mut bad_id = request("1", "USD");
        bad_id.to_account = "acct-7".into();
        let cases = [
            (request("0", "USD"), reasons::INVALID_AMOUNT),
            (request("-1", "USD"), reasons::INVALID_AMOUNT),
            (request("1.001", "USD"), reasons::TOO_MANY_DECIMALS),
            (request("1", "QQQ"), reasons::UNKNOWN_CURRENCY),
            (request("1000.01", "USD"), reasons::AMOUNT_OVER_LIMIT),
            (request("5000.01", "EUR"), reasons::AMOUNT_OVER_LIMIT),
            (same, reasons::SAME_ACCOUNT),
            (bad_id, reasons::INVALID_ACCOUNT_ID),
        ];
        for (r, reason) in cases {
            assert_eq!(check(&r).unwrap_err().reason, reason, "{r:?}");
        }
        assert_eq!(
            check(&request("1000", "USD")).unwrap().amount,
            Decimal::from(1000)
        );
    }

    #[test]
    fn fingerprints_compare_amounts_by_value_and_see_every_field() {
        let a = request("12.30", "USD");
        let mut b = a.clone();
        b.amount = "12.3".into();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.reference = Some("x".into());
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.to_account = Uuid::new_v4().to_string();
        assert_ne!(fingerprint(&a), fingerprint(&c));
        // Not an amount: compared by its text, not by what a laxer parser would make of it.
        let mut thousand = a.clone();
        thousand.amount = "1000".into();
        let mut exponent = a.clone();
        exponent.amount = "1e3".into();
        assert_ne!(fingerprint(&thousand), fingerprint(&exponent));
    }

    #[test]
    fn fingerprints_compare_uuids_by_value() {
        let a = request("12.30", "USD");
        let mut b = a.clone();
        b.transfer_id = a.transfer_id.to_uppercase();
        b.from_account = Uuid::parse_str(&a.from_account)
            .unwrap()
            .simple()
            .to_string();
        b.to_account = format!("{{{}}}", a.to_account);
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.transfer_id = "not-a-uuid".into();
        let mut d = a.clone();
        d.transfer_id = "NOT-A-UUID".into();
        assert_ne!(fingerprint(&c), fingerprint(&d));
    }
}
