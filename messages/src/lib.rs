//! The twophase message contract: every message the saga workers exchange, the envelope carried
//! in Kafka headers, and the topic names.
//!
//! This crate is what producer teams and every worker agree on. It owns no I/O: it never talks
//! to Kafka or a database, so a producer in another language can rely on the JSON Schemas it
//! exports (`twophase schema`) and nothing else.
//!
//! Evolution is additive: a new field gets `#[serde(default)]`, a field is never reused, and a
//! removed field leaves a comment saying when it went. A breaking change bumps
//! [`SCHEMA_VERSION`].

pub mod envelope;
pub mod money;
pub mod payloads;
pub mod topics;

pub use envelope::{Envelope, EnvelopeError};
pub use money::{exact_add, exact_sub, plain_decimal, validate_amount, AmountError};
pub use payloads::*;
pub use topics::Topics;

/// The schema version every message of this crate is written with. A consumer refuses a
/// message with a higher version (it cannot know what changed) and accepts lower ones.
pub const SCHEMA_VERSION: u32 = 1;

/// Every message type on the saga topics: a closed set, dispatched with `match`.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    TransferRequested(TransferRequested),
    EvaluateRisk(EvaluateRisk),
    Account(AccountCommand),
    Vote(Vote),
    Ack(Ack),
    TransferCompleted(TransferCompleted),
    TransferFailed(TransferFailed),
    TransferRejected(TransferRejected),
    CommitStuck(CommitStuck),
}

/// Why a message could not be decoded. Every variant is permanent: retrying the same bytes
/// gives the same answer, so such a message is set aside, never retried.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("schema version {found} of {message_type} is newer than the supported {supported}")]
    UnsupportedVersion {
        message_type: String,
        found: u32,
        supported: u32,
    },
    /// Says what serde found; the error is not also the source, or a chain printed in full
    /// would say it twice.
    #[error("payload of {message_type} is {}: {cause}", payload_fault(.cause))]
    Payload {
        message_type: String,
        cause: serde_json::Error,
    },
}

/// What is wrong with a payload serde refused: it is no JSON at all (bytes that are not JSON, or
/// JSON cut short), or JSON that is not the message (a field missing or of another type).
fn payload_fault(cause: &serde_json::Error) -> &'static str {
    if cause.is_syntax() || cause.is_eof() {
        "not JSON"
    } else {
        "not valid"
    }
}

impl Message {
    /// The `ce_type` of this message.
    pub fn message_type(&self) -> &'static str {
        match self {
            Message::TransferRequested(_) => types::TRANSFER_REQUESTED,
            Message::EvaluateRisk(_) => types::RISK_EVALUATE,
            Message::Account(c) => c.action.message_type(),
            Message::Vote(_) => types::VOTE,
            Message::Ack(_) => types::ACK,
            Message::TransferCompleted(_) => types::TRANSFER_COMPLETED,
            Message::TransferFailed(_) => types::TRANSFER_FAILED,
            Message::TransferRejected(_) => types::TRANSFER_REJECTED,
            Message::CommitStuck(_) => types::COMMIT_STUCK,
        }
    }

    /// The transfer this message belongs to, as the producer spelled it.
    pub fn transfer_id(&self) -> String {
        match self {
            Message::TransferRequested(m) => m.transfer_id.clone(),
            Message::EvaluateRisk(m) => m.transfer_id.to_string(),
            Message::Account(m) => m.body.transfer_id.to_string(),
            Message::Vote(m) => m.transfer_id.to_string(),
            Message::Ack(m) => m.transfer_id.to_string(),
            Message::TransferCompleted(m) => m.transfer_id.to_string(),
            Message::TransferFailed(m) => m.transfer_id.to_string(),
            Message::TransferRejected(m) => m.transfer_id.clone(),
            Message::CommitStuck(m) => m.transfer_id.to_string(),
        }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        let result = match self {
            Message::TransferRequested(m) => serde_json::to_vec(m),
            Message::EvaluateRisk(m) => serde_json::to_vec(m),
            Message::Account(m) => serde_json::to_vec(&m.body),
            Message::Vote(m) => serde_json::to_vec(m),
            Message::Ack(m) => serde_json::to_vec(m),
            Message::TransferCompleted(m) => serde_json::to_vec(m),
            Message::TransferFailed(m) => serde_json::to_vec(m),
            Message::TransferRejected(m) => serde_json::to_vec(m),
            Message::CommitStuck(m) => serde_json::to_vec(m),
        };
        // Serializing these plain structs to a Vec cannot fail: no maps with non-string keys,
        // no custom serializers that error.
        result.expect("message payloads always serialize")
    }

    /// Decodes a payload of the given type and schema version.
    pub fn decode(
        message_type: &str,
        schema_version: u32,
        payload: &[u8],
    ) -> Result<Message, DecodeError> {
        if schema_version > SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                message_type: message_type.to_owned(),
                found: schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        fn parse<T: serde::de::DeserializeOwned>(
            message_type: &str,
            payload: &[u8],
        ) -> Result<T, DecodeError> {
            serde_json::from_slice(payload).map_err(|cause| DecodeError::Payload {
                message_type: message_type.to_owned(),
                cause,
            })
        }
        let message = match message_type {
            types::TRANSFER_REQUESTED => Message::TransferRequested(parse(message_type, payload)?),
            types::RISK_EVALUATE => Message::EvaluateRisk(parse(message_type, payload)?),
            types::VOTE => Message::Vote(parse(message_type, payload)?),
            types::ACK => Message::Ack(parse(message_type, payload)?),
            types::TRANSFER_COMPLETED => Message::TransferCompleted(parse(message_type, payload)?),
            types::TRANSFER_FAILED => Message::TransferFailed(parse(message_type, payload)?),
            types::TRANSFER_REJECTED => Message::TransferRejected(parse(message_type, payload)?),
            types::COMMIT_STUCK => Message::CommitStuck(parse(message_type, payload)?),
            other => match AccountAction::from_message_type(other) {
                Some(action) => {
                    let body: AccountCommandBody = parse(message_type, payload)?;
                    Message::Account(AccountCommand::new(action, body))
                }
                None => return Err(DecodeError::UnknownType(other.to_owned())),
            },
        };
        Ok(message)
    }
}

/// As much of `text` as fits in `max` bytes, cut on a character boundary, and how many bytes
/// were cut.
fn cut(text: &str, max: usize) -> (&str, usize) {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], text.len() - end)
}

/// `text` whole if it has at most `max` bytes; otherwise as much of it as fits in `max` bytes
/// and a note of how many more there were. Whatever echoes a producer's text (a rejection, an
/// error, a correlation id) goes through it or [`quoted`], so that an oversized field cannot
/// make a message too large to publish.
pub fn excerpt(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match cut(text, max) {
        (_, 0) => text.into(),
        (kept, more) => format!("{kept}… ({more} more bytes)").into(),
    }
}

/// The most of a producer's identifier that [`named`] keeps, in bytes.
pub const MAX_NAMED: usize = 256;

/// A producer's identifier (a transfer id that is not a UUID, a message type) as the system
/// writes it again, in a rejection or an audit row: whole up to 293 bytes, the length of the
/// longest excerpt, else [`excerpt`]ed to its first [`MAX_NAMED`] bytes. Naming what was named
/// gives it back, so that a rejection names a transfer as the audit log stores its request.
pub fn named(text: &str) -> std::borrow::Cow<'_, str> {
    // The longest excerpt: its bytes, "… (", at most twenty digits, " more bytes)".
    const LONGEST: usize = MAX_NAMED + "… (".len() + 20 + " more bytes)".len();
    if text.len() <= LONGEST {
        text.into()
    } else {
        excerpt(text, MAX_NAMED)
    }
}

/// A producer's field as a rejection quotes it: Rust-quoted, at most 64 bytes of it.
pub fn quoted(text: &str) -> String {
    match cut(text, 64) {
        (_, 0) => format!("{text:?}"),
        (kept, more) => format!("{kept:?}… ({more} more bytes)"),
    }
}

/// The `ce_type` values. Do not change a value: producers and stored audit rows depend on them.
pub mod types {
    pub const TRANSFER_REQUESTED: &str = "twophase.transfer.requested";
    pub const RISK_EVALUATE: &str = "twophase.risk.evaluate";
    pub const ACCOUNT_HOLD: &str = "twophase.account.hold";
    pub const ACCOUNT_RESERVE_CREDIT: &str = "twophase.account.reserve_credit";
    pub const ACCOUNT_CAPTURE: &str = "twophase.account.capture";
    pub const ACCOUNT_CREDIT: &str = "twophase.account.credit";
    pub const ACCOUNT_RELEASE: &str = "twophase.account.release";
    pub const ACCOUNT_CANCEL_CREDIT: &str = "twophase.account.cancel_credit";
    pub const VOTE: &str = "twophase.saga.vote";
    pub const ACK: &str = "twophase.saga.ack";
    pub const TRANSFER_COMPLETED: &str = "twophase.transfer.completed";
    pub const TRANSFER_FAILED: &str = "twophase.transfer.failed";
    pub const TRANSFER_REJECTED: &str = "twophase.transfer.rejected";
    pub const COMMIT_STUCK: &str = "twophase.transfer.commit_stuck";
    /// A record of a `twophase dlq replay` run, on `ops.replays` (not a saga message).
    pub const OPS_REPLAY: &str = "twophase.ops.replay";
}

/// The JSON Schema of every message, by `ce_type`, for producer teams to validate against.
pub fn json_schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(T)).expect("schemas serialize")
    }
    let mut out = vec![
        (types::TRANSFER_REQUESTED, schema::<TransferRequested>()),
        (types::RISK_EVALUATE, schema::<EvaluateRisk>()),
    ];
    for action in AccountAction::ALL {
        out.push((action.message_type(), schema::<AccountCommandBody>()));
    }
    out.extend([
        (types::VOTE, schema::<Vote>()),
        (types::ACK, schema::<Ack>()),
        (types::TRANSFER_COMPLETED, schema::<TransferCompleted>()),
        (types::TRANSFER_FAILED, schema::<TransferFailed>()),
        (types::TRANSFER_REJECTED, schema::<TransferRejected>()),
        (types::COMMIT_STUCK, schema::<CommitStuck>()),
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_names_its_required_fields() {
        let schemas = json_schemas();
        let (_, request) = schemas
            .iter()
            .find(|(t, _)| *t == types::TRANSFER_REQUESTED)
            .unwrap();
        let required = request["required"].as_array().unwrap();
        for field in [
            "transfer_id",
            "from_account",
            "to_account",
            "amount",
            "currency",
        ] {
            assert!(required.iter().any(|f| f == field), "{field} not required");
        }
    }

    #[test]
    fn a_newer_schema_version_is_refused() {
        let err = Message::decode(types::VOTE, SCHEMA_VERSION + 1, b"{}").unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedVersion { found, .. } if found == SCHEMA_VERSION + 1)
        );
    }

    #[test]
    fn a_payload_error_says_what_serde_found_once() {
        let err = Message::decode(types::VOTE, SCHEMA_VERSION, b"not json").unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload of twophase.saga.vote is not JSON: expected ident at line 1 column 2"
        );
        let err = Message::decode(types::VOTE, SCHEMA_VERSION, b"{}").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("payload of twophase.saga.vote is not valid: missing field"),
            "{err}"
        );
        // Printing the chain of causes (anyhow's `{:#}`) adds nothing to that.
        assert!(std::error::Error::source(&err).is_none());
    }

    #[test]
    fn an_unknown_type_is_refused() {
        let err = Message::decode("twophase.nope", 1, b"{}").unwrap_err();
        assert!(matches!(err, DecodeError::UnknownType(t) if t == "twophase.nope"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_refused() {
        let ok = br#"{"transfer_id":"t","from_account":"a","to_account":"b","amount":"1.00","currency":"USD","future":1}"#;
        assert!(Message::decode(types::TRANSFER_REQUESTED, 1, ok).is_ok());
        let missing =
            br#"{"transfer_id":"t","from_account":"a","to_account":"b","currency":"USD"}"#;
        let err = Message::decode(types::TRANSFER_REQUESTED, 1, missing).unwrap_err();
        assert!(err.to_string().contains("amount"), "{err}");
    }

    #[test]
    fn account_commands_round_trip() {
        let body = AccountCommandBody {
            transfer_id: uuid::Uuid::new_v4(),
            account_id: uuid::Uuid::new_v4(),
            amount: "12.34".parse().unwrap(),
            currency: "USD".into(),
        };
        for action in AccountAction::ALL {
            let m = Message::Account(AccountCommand::new(action, body.clone()));
            let back = Message::decode(m.message_type(), 1, &m.to_json()).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn an_excerpt_is_cut_on_a_character_boundary_and_says_how_much_was_cut() {
        assert_eq!(excerpt("short", 5), "short");
        // "é" is two bytes: a cut at 5 would split the third one.
        assert_eq!(excerpt("éééééé", 5), "éé… (8 more bytes)");
        let long = "x".repeat(1_000_000);
        assert_eq!(excerpt(&long, 4), "xxxx… (999996 more bytes)");
        assert_eq!(
            quoted(&long),
            format!("\"{}\"… (999936 more bytes)", "x".repeat(64))
        );
        assert_eq!(quoted("a\"b"), r#""a\"b""#);
    }

    #[test]
    fn a_name_is_cut_only_past_what_its_excerpt_would_take_and_naming_it_again_keeps_it() {
        for len in [0, MAX_NAMED, 293, 294, 300_000] {
            let id = "x".repeat(len);
            let once = named(&id);
            assert!(once.len() <= 293, "{len}: {}", once.len());
            assert_eq!(once == id, len <= 293, "{len}");
            assert_eq!(named(&once), once, "{len}");
        }
        let longest = "x".repeat(usize::MAX.to_string().len() + MAX_NAMED + 17);
        assert_eq!(named(&longest), longest);
        assert_eq!(
            named(&"é".repeat(200)),
            format!("{}… (144 more bytes)", "é".repeat(128))
        );
    }

    /// The amounts of the workers' own messages are read as exactly as requests' are, and a
    /// message whose amount no coordinator would write is not a message to act on.
    #[test]
    fn internal_amounts_are_positive_decimal_strings_in_plain_notation() {
        let ids = r#""transfer_id":"6f0c2c8e-3b1a-4c55-9a51-0d6f9e1b2a10""#;
        let accounts = r#""from_account":"0a3e4f6c-51d2-4b8e-8c1d-2f9a7b6e5d40","to_account":"7b2d1c0e-9f8a-4e7d-a6c5-b4a3928170f6""#;
        let bodies = [
            (
                types::ACCOUNT_HOLD,
                format!(r#"{ids},"account_id":"0a3e4f6c-51d2-4b8e-8c1d-2f9a7b6e5d40""#),
            ),
            (types::RISK_EVALUATE, format!("{ids},{accounts}")),
            (
                types::TRANSFER_COMPLETED,
                format!(r#"{ids},{accounts},"completed_at":"2026-12-06T00:00:00Z""#),
            ),
        ];
        let amount_of = |m: Message| match m {
            Message::Account(c) => c.body.amount,
            Message::EvaluateRisk(e) => e.amount,
            Message::TransferCompleted(c) => c.amount,
            other => panic!("unexpected {other:?}"),
        };
        for (message_type, fields) in &bodies {
            let decode = |amount: &str| {
                let payload = format!(r#"{{{fields},"amount":{amount},"currency":"USD"}}"#);
                Message::decode(message_type, 1, payload.as_bytes())
            };
            // Exactly as written, its decimals included, as the coordinator writes amounts
            // in their currency's; zeros past what a decimal holds are only dropped.
            let exact = amount_of(decode(r#""0.10""#).unwrap());
            assert_eq!(exact.to_string(), "0.10", "{message_type}");
            let long = amount_of(decode(r#""7.10000000000000000000000000000000""#).unwrap());
            assert_eq!(long.to_string(), "7.1", "{message_type}");
            for refused in [
                "0.1",
                r#""1e3""#,
                r#""+5""#,
                r#"".5""#,
                r#""0""#,
                r#""-5.00""#,
                r#""ten""#,
                r#""1.99999999999999999999999999999""#,
            ] {
                let err = decode(refused).unwrap_err();
                assert!(
                    matches!(&err, DecodeError::Payload { .. })
                        && err.to_string().contains("decimal string in plain notation"),
                    "{message_type} with amount {refused}: {err}"
                );
            }
        }
    }
}
