//! Amounts: exact decimals, never floats, checked against their currency's minor units.

use iso_currency::Currency;
use rust_decimal::Decimal;

use crate::reasons;

/// Why an amount or currency in a request is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("currency {} is not an ISO 4217 code", crate::quoted(.0))]
    UnknownCurrency(String),
    /// A code ISO 4217 gives no minor unit: a precious metal, a unit of account or fund of a
    /// development bank, the code for testing (`XTS`) or for no currency at all (`XXX`).
    #[error(
        "currency {code} ({name}) has no minor unit in ISO 4217: it is not money an account holds"
    )]
    NotMoney { code: String, name: String },
    #[error("amount {} is not a decimal number", crate::quoted(.0))]
    NotANumber(String),
    #[error(
        "amount {} has more digits than an amount holds (28 significant digits, or 29 up to {})",
        crate::quoted(.0),
        Decimal::MAX
    )]
    TooLarge(String),
    #[error("amount {0} must be greater than zero")]
    NotPositive(Decimal),
    #[error(
        "amount {} has more decimals than {currency} allows ({allowed})",
        crate::excerpt(amount, 64)
    )]
    TooManyDecimals {
        amount: String,
        currency: String,
        allowed: u32,
    },
}

impl AmountError {
    /// The rejection reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            AmountError::UnknownCurrency(_) | AmountError::NotMoney { .. } => {
                reasons::UNKNOWN_CURRENCY
            }
            AmountError::NotANumber(_) | AmountError::TooLarge(_) | AmountError::NotPositive(_) => {
                reasons::INVALID_AMOUNT
            }
            AmountError::TooManyDecimals { .. } => reasons::TOO_MANY_DECIMALS,
        }
    }
}

/// An amount in plain notation, in parts: a minus or not, the digits before the point, and
/// those after it without trailing zeros.
struct Plain<'a> {
    negative: bool,
    whole: &'a str,
    fraction: &'a str,
}

impl<'a> Plain<'a> {
    /// `None` for anything but plain notation: scientific notation, a plus sign, separators,
    /// a bare point, spaces around it ("1e3", "+5", "1_000", ".5", " 5"), none of which is an
    /// amount a producer means by accident.
    fn parse(amount: &'a str) -> Option<Plain<'a>> {
        let text = amount;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let unsigned = text.strip_prefix('-');
        let (whole, fraction) = unsigned
            .unwrap_or(text)
            .split_once('.')
            .unwrap_or((unsigned.unwrap_or(text), "0"));
        (digits(whole) && digits(fraction)).then(|| Plain {
            negative: unsigned.is_some(),
            whole,
            fraction: fraction.trim_end_matches('0'),
        })
    }

    /// Its exact value; `None` if it has more digits than a decimal holds (it is never
    /// rounded).
    fn value(&self) -> Option<Decimal> {
        let sign = if self.negative { "-" } else { "" };
        let exact = match self.fraction {
            "" => format!("{sign}{}", self.whole),
            fraction => format!("{sign}{}.{fraction}", self.whole),
        };
        Decimal::from_str_exact(&exact).ok()
    }
}

/// The exact value of an amount in plain notation; `None` if it is not one, or has more
/// digits than a decimal holds (it is never rounded).
pub fn plain_decimal(amount: &str) -> Option<Decimal> {
    Plain::parse(amount)?.value()
}

/// `a + b`, exactly; `None` if the sum is past what a decimal holds, or would have to be
/// rounded to fit (a decimal has 96 bits for all its digits, so a large enough sum loses its
/// last decimals rather than overflowing). Money is never rounded: a balance that cannot take
/// an amount exactly does not take it.
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    // An exact sum can be written with as many decimals as `a` and `b` have, and gives `a`
    // back; a rounded one can be neither. (Its own scale is no test: 0.00 + 5 is 5, exactly.)
    let sum = a.checked_add(b)?;
    let decimals = a.scale().max(b.scale());
    let mut written = sum;
    written.rescale(decimals);
    (written.scale() == decimals && written == sum && sum.checked_sub(b)? == a).then_some(sum)
}

/// `a - b`, exactly, as [`exact_add`].
pub fn exact_sub(a: Decimal, b: Decimal) -> Option<Decimal> {
    exact_add(a, -b)
}

/// An amount written with its currency's minor units (`5` USD as `5.00`), for people and
/// reports; more decimals than that are kept, since they are what is wrong.
pub fn in_minor_units(amount: Decimal, currency: &str) -> Decimal {
    let exponent = Currency::from_code(currency)
        .and_then(|c| c.exponent())
        .map(u32::from);
    let mut shown = amount;
    if let Some(exponent) = exponent {
        if shown.scale() < exponent {
            shown.rescale(exponent);
        }
    }
    shown
}

/// Serde for the amounts of the workers' own messages (a risk evaluation, an account command,
/// a completed transfer): written as a decimal string, read only as a positive one in plain
/// notation, exactly. The coordinator writes no other kind, so a JSON number (which would be
/// read through a float), scientific notation, zero or a negative amount makes the message
/// undecodable, and it is set aside as a dead letter rather than acted on.
///
/// Use as `#[serde(with = "crate::money::positive_amount")]`.
pub mod positive_amount {
    use std::fmt;

    use rust_decimal::Decimal;
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(amount: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        Serialize::serialize(amount, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        deserializer.deserialize_str(PositiveAmount)
    }

    struct PositiveAmount;

    impl Visitor<'_> for PositiveAmount {
        type Value = Decimal;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a positive amount as a decimal string in plain notation, e.g. \"12.34\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Decimal, E> {
            match super::plain_decimal(text) {
                // With the decimals it is written with, as the coordinator wrote it in its
                // currency's ("10.00" stays 10.00), unless that many digits do not fit.
                Some(amount) if amount > Decimal::ZERO => {
                    Ok(Decimal::from_str_exact(text).unwrap_or(amount))
                }
                _ => Err(E::invalid_value(de::Unexpected::Str(text), &self)),
            }
        }
    }
}

/// Parses a decimal string for a currency: positive, in plain notation ([`plain_decimal`]),
/// and with no more decimals than the currency's minor unit (trailing zeros beyond it are
/// accepted: "1.500" USD is 1.50). A leading minus is refused as not positive. The amount is
/// written with the currency's decimals, as money in it is: "1" and "1.5" USD are 1.00 and 1.50.
/// A code with no minor unit (gold, `XTS`, `XXX`) is no currency money is held in.
pub fn validate_amount(amount: &str, currency: &str) -> Result<Decimal, AmountError> {
    let code = Currency::from_code(currency)
        .ok_or_else(|| AmountError::UnknownCurrency(currency.to_owned()))?;
    let allowed = code.exponent().ok_or_else(|| AmountError::NotMoney {
        code: code.code().to_owned(),
        name: code.name().to_owned(),
    })?;
    let allowed = u32::from(allowed);
    let not_a_number = || AmountError::NotANumber(amount.to_owned());
    let plain = Plain::parse(amount).ok_or_else(not_a_number)?;
    // Counted in the text, before any parsing could round them away.
    if plain.fraction.len() > allowed as usize {
        return Err(AmountError::TooManyDecimals {
            amount: amount.to_owned(),
            currency: currency.to_owned(),
            allowed,
        });
    }
    let value = plain
        .value()
        .ok_or_else(|| AmountError::TooLarge(amount.to_owned()))?;
    if value <= Decimal::ZERO {
        return Err(AmountError::NotPositive(value));
    }
    let mut written = value;
    written.rescale(allowed);
    Ok(written)
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
        // Written with the currency's decimals.
        assert_eq!(validate_amount("1.500", "USD").unwrap().to_string(), "1.50");
        assert_eq!(validate_amount("1", "USD").unwrap().to_string(), "1.00");
        assert_eq!(validate_amount("100", "JPY").unwrap().to_string(), "100");
        assert_eq!(
            validate_amount("0.001", "BHD").unwrap().to_string(),
            "0.001"
        );
        assert_eq!(
            validate_amount("7.10000000000000000000000000000000", "USD")
                .unwrap()
                .to_string(),
            "7.10"
        );
        // Spaces are not part of an amount.
        for spaced in [" 1.00", "1.00 ", "1 .00", "\t1"] {
            assert_eq!(
                validate_amount(spaced, "USD"),
                Err(AmountError::NotANumber(spaced.to_owned()))
            );
        }
        assert_eq!(
            validate_amount("79228162514264337593543950335", "JPY")
                .unwrap()
                .to_string(),
            "79228162514264337593543950335"
        );
    }

    #[test]
    fn an_amount_past_what_a_decimal_holds_is_too_large_not_malformed() {
        let huge = "99999999999999999999999999999999";
        let refused = validate_amount(huge, "JPY").unwrap_err();
        assert_eq!(refused, AmountError::TooLarge(huge.to_owned()));
        assert_eq!(refused.reason(), reasons::INVALID_AMOUNT);
        assert!(refused.to_string().contains("more digits"), "{refused}");
    }

    #[test]
    fn amounts_are_shown_in_their_currency_minor_units() {
        let show = |a: &str, c: &str| in_minor_units(a.parse().unwrap(), c).to_string();
        assert_eq!(show("5", "USD"), "5.00");
        assert_eq!(show("-0.1", "EUR"), "-0.10");
        assert_eq!(show("100", "JPY"), "100");
        assert_eq!(show("1.005", "USD"), "1.005");
        assert_eq!(show("7", "XYZ"), "7");
    }

    #[test]
    fn sums_are_exact_or_none() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(exact_add(d("1.10"), d("2.205")), Some(d("3.305")));
        assert_eq!(exact_sub(d("100"), d("0.01")), Some(d("99.99")));
        // Past the largest decimal.
        assert_eq!(exact_add(Decimal::MAX, d("1")), None);
        // Fits only rounded: 792281625142643375935439503.36 has one digit too many.
        assert_eq!(
            exact_add(d("792281625142643375935439503.35"), d("0.01")),
            None
        );
        assert_eq!(exact_sub(Decimal::MAX, d("0.01")), None);
        assert_eq!(
            exact_sub(Decimal::MAX, d("1")),
            Some(Decimal::MAX - Decimal::ONE)
        );
        // Zeros of any scale, as a released hold leaves: exact, whatever the sum's scale.
        assert_eq!(exact_add(d("0.00"), d("100")), Some(d("100")));
        assert_eq!(exact_sub(d("12.34"), d("12.34")), Some(Decimal::ZERO));
        assert_eq!(exact_add(d("5"), d("0.00")), Some(d("5")));
        // Every sum of small amounts of any scale, either sign, is exact.
        for a in 0..2_000i64 {
            for (b, scale) in [(1, 0), (5, 1), (1234, 2), (7, 3)] {
                let (a, b) = (Decimal::new(a, (a % 4) as u32), Decimal::new(b, scale));
                assert_eq!(exact_add(a, b), Some(a + b), "{a} + {b}");
                assert_eq!(exact_sub(a, b), Some(a - b), "{a} - {b}");
            }
        }
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
            // Codes with no minor unit: no currency, testing, gold, special drawing rights.
            ("1", "XXX", reasons::UNKNOWN_CURRENCY),
            ("1", "XTS", reasons::UNKNOWN_CURRENCY),
            ("1", "XAU", reasons::UNKNOWN_CURRENCY),
            ("1", "XDR", reasons::UNKNOWN_CURRENCY),
            // Not plain notation.
            ("1e3", "USD", reasons::INVALID_AMOUNT),
            ("1.5E2", "USD", reasons::INVALID_AMOUNT),
            ("+5", "USD", reasons::INVALID_AMOUNT),
            ("1_000", "USD", reasons::INVALID_AMOUNT),
            ("1,000.00", "USD", reasons::INVALID_AMOUNT),
            (".5", "USD", reasons::INVALID_AMOUNT),
            ("5.", "USD", reasons::INVALID_AMOUNT),
            ("--5", "USD", reasons::INVALID_AMOUNT),
            ("", "USD", reasons::INVALID_AMOUNT),
            ("١٢", "USD", reasons::INVALID_AMOUNT),
            // More decimals than a decimal holds: refused, not rounded to 2 or to 0.01.
            (
                "1.99999999999999999999999999999",
                "USD",
                reasons::TOO_MANY_DECIMALS,
            ),
            (
                "0.01000000000000000000000000000001",
                "USD",
                reasons::TOO_MANY_DECIMALS,
            ),
            // More than a decimal holds.
            (
                "79228162514264337593543950336",
                "USD",
                reasons::INVALID_AMOUNT,
            ),
        ];
        for (amount, currency, reason) in cases {
            let err = validate_amount(amount, currency).unwrap_err();
            assert_eq!(err.reason(), reason, "{amount} {currency}: {err}");
        }
        assert_eq!(
            validate_amount("1", "XAU").unwrap_err().to_string(),
            "currency XAU (Gold (one troy ounce)) has no minor unit in ISO 4217: it is not money \
             an account holds"
        );
    }
}
