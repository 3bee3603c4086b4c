//! Amounts: exact decimals, never floats, checked against their currency's minor units.

use iso_currency::Currency;
use rust_decimal::Decimal;

use crate::reasons;

/// Why an amount or currency in a request is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("currency {0:?} is not an ISO 4217 code")]
    UnknownCurrency(String),
    #[error("amount {0:?} is not a decimal number")]
    NotANumber(String),
    #[error("amount {0} must be greater than zero")]
    NotPositive(Decimal),
    #[error("amount {amount} has more decimals than {currency} allows ({allowed})")]
    TooManyDecimals {
        amount: Decimal,
        currency: String,
        allowed: u32,
    },
}

impl AmountError {
    /// The rejection reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            AmountError::UnknownCurrency(_) => reasons::UNKNOWN_CURRENCY,
            AmountError::NotANumber(_) | AmountError::NotPositive(_) => reasons::INVALID_AMOUNT,
            AmountError::TooManyDecimals { .. } => reasons::TOO_MANY_DECIMALS,
        }
    }
}

/// Parses a decimal string for a currency: positive, and with no more decimals than the
/// currency's minor unit (trailing zeros beyond it are accepted: "1.500" USD is 1.50).
pub fn validate_amount(amount: &str, currency: &str) -> Result<Decimal, AmountError> {
    let code = Currency::from_code(currency)
        .ok_or_else(|| AmountError::UnknownCurrency(currency.to_owned()))?;
    // Scientific notation and thousands separators are refused: "1e3" is not an amount a
    // producer means by accident.
    let value: Decimal = amount
        .trim()
        .parse()
        .map_err(|_| AmountError::NotANumber(amount.to_owned()))?;
    if value <= Decimal::ZERO {
        return Err(AmountError::NotPositive(value));
    }
    let allowed = u32::from(code.exponent().unwrap_or(0));
    let normalized = value.normalize();
    if normalized.scale() > allowed {
        return Err(AmountError::TooManyDecimals {
            amount: value,
            currency: currency.to_owned(),
            allowed,
        });
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_amounts_within_the_minor_unit() {
        assert_eq!(
            validate_amount("12.34", "USD").unwrap().to_string(),
            "12.34"
        );
        assert_eq!(validate_amount("1.500", "USD").unwrap().to_string(), "1.5");
        assert_eq!(validate_amount("100", "JPY").unwrap().to_string(), "100");
        assert_eq!(
            validate_amount("0.001", "BHD").unwrap().to_string(),
            "0.001"
        );
    }

    #[test]
    fn refuses_bad_amounts_with_their_reason() {
        let cases = [
            ("0", "USD", reasons::INVALID_AMOUNT),
            ("-5.00", "USD", reasons::INVALID_AMOUNT),
            ("ten", "USD", reasons::INVALID_AMOUNT),
            ("1.234", "USD", reasons::TOO_MANY_DECIMALS),
            ("1.5", "JPY", reasons::TOO_MANY_DECIMALS),
            ("1.00", "XYZ", reasons::UNKNOWN_CURRENCY),
            ("1.00", "usd", reasons::UNKNOWN_CURRENCY),
        ];
        for (amount, currency, reason) in cases {
            let err = validate_amount(amount, currency).unwrap_err();
            assert_eq!(err.reason(), reason, "{amount} {currency}: {err}");
        }
    }
}
