//! The payloads: JSON, amounts as decimal strings, currencies as ISO 4217 codes.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types;

/// A producer asks for money to move. Published to `transfers.requests`, keyed by
/// `transfer_id`. Every field is a string, so that a malformed one (an amount that is not
/// one, an id that is not a UUID) is answered with a `TransferRejected` naming it; a field
/// that is not a string at all makes the record undecodable, and it is set aside as a dead
/// letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferRequested {
    /// The producer's idempotency key, a UUID. The same id with the same body is one
    /// transfer; the same id with another body is rejected as a conflict.
    pub transfer_id: String,
    /// The account debited (a UUID).
    pub from_account: String,
    /// The account credited (a UUID).
    pub to_account: String,
    /// A positive decimal string in plain notation (digits, at most one point between them:
    /// "12.34", not "1.234e1", "+12.34" or ".5") with no more decimals than the currency
    /// allows, zeros at the end aside ("12.340" USD is 12.34).
    pub amount: String,
    /// An ISO 4217 code with a minor unit, e.g. "USD"; not "XXX", "XTS", a precious metal or a
    /// unit of account.
    pub currency: String,
    /// Free text for the producer's own bookkeeping; not interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// Coordinator → risk worker: evaluate a transfer and vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EvaluateRisk {
    pub transfer_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    #[schemars(with = "String")]
    #[serde(with = "crate::money::positive_amount")]
    pub amount: Decimal,
    pub currency: String,
}

/// What the coordinator asks the account worker to do. Prepare: `Hold` (source),
/// `ReserveCredit` (destination). Commit: `Capture` (source), `Credit` (destination).
/// Abort: `Release` (source), `CancelCredit` (destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountAction {
    Hold,
    ReserveCredit,
    Capture,
    Credit,
    Release,
    CancelCredit,
}

impl AccountAction {
    pub const ALL: [AccountAction; 6] = [
        AccountAction::Hold,
        AccountAction::ReserveCredit,
        AccountAction::Capture,
        AccountAction::Credit,
        AccountAction::Release,
        AccountAction::CancelCredit,
    ];

    pub fn message_type(self) -> &'static str {
        match self {
            AccountAction::Hold => types::ACCOUNT_HOLD,
            AccountAction::ReserveCredit => types::ACCOUNT_RESERVE_CREDIT,
            AccountAction::Capture => types::ACCOUNT_CAPTURE,
            AccountAction::Credit => types::ACCOUNT_CREDIT,
            AccountAction::Release => types::ACCOUNT_RELEASE,
            AccountAction::CancelCredit => types::ACCOUNT_CANCEL_CREDIT,
        }
    }

    pub fn from_message_type(message_type: &str) -> Option<AccountAction> {
        AccountAction::ALL
            .into_iter()
            .find(|a| a.message_type() == message_type)
    }

    /// The stable name used in database rows and logs. Do not change: stored dedupe keys use it.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountAction::Hold => "hold",
            AccountAction::ReserveCredit => "reserve_credit",
            AccountAction::Capture => "capture",
            AccountAction::Credit => "credit",
            AccountAction::Release => "release",
            AccountAction::CancelCredit => "cancel_credit",
        }
    }

    /// Which side of the transfer the command acts on.
    pub fn participant(self) -> Participant {
        match self {
            AccountAction::Hold | AccountAction::Capture | AccountAction::Release => {
                Participant::Source
            }
            AccountAction::ReserveCredit | AccountAction::Credit | AccountAction::CancelCredit => {
                Participant::Destination
            }
        }
    }
}

/// The payload of every account command; the action is the message type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AccountCommandBody {
    pub transfer_id: Uuid,
    /// The account acted on; also the Kafka key, so one account's commands stay in order.
    pub account_id: Uuid,
    #[schemars(with = "String")]
    #[serde(with = "crate::money::positive_amount")]
    pub amount: Decimal,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountCommand {
    pub action: AccountAction,
    pub body: AccountCommandBody,
}

impl AccountCommand {
    pub fn new(action: AccountAction, body: AccountCommandBody) -> AccountCommand {
        AccountCommand { action, body }
    }
}

/// Who votes in the prepare phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Participant {
    Risk,
    Source,
    Destination,
}

impl Participant {
    pub fn as_str(self) -> &'static str {
        match self {
            Participant::Risk => "risk",
            Participant::Source => "source",
            Participant::Destination => "destination",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Yes,
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    Low,
    Medium,
    High,
}

impl RiskLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
        }
    }
}

/// The risk worker's assessment, carried on its vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RiskAssessment {
    /// 0 (no risk seen) to 100.
    pub score: u8,
    pub level: RiskLevel,
    /// The names of the rules that fired.
    pub rules: Vec<String>,
}

/// A participant's answer to a prepare command, on `saga.replies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Vote {
    pub transfer_id: Uuid,
    pub participant: Participant,
    pub decision: Decision,
    /// Why the vote is no: one of the codes in [`reasons`](crate::reasons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskAssessment>,
}

/// A participant confirms a commit or abort command was applied, on `saga.replies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ack {
    pub transfer_id: Uuid,
    pub action: AccountAction,
}

/// Outcome: the money moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferCompleted {
    pub transfer_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    #[schemars(with = "String")]
    #[serde(with = "crate::money::positive_amount")]
    pub amount: Decimal,
    pub currency: String,
    pub completed_at: DateTime<Utc>,
}

/// Outcome: the transfer was valid but did not happen; nothing was debited, credited or left held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferFailed {
    pub transfer_id: Uuid,
    /// One of the codes in [`reasons`](crate::reasons).
    pub reason: String,
    /// Who said no (absent for a timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<Participant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskAssessment>,
    pub failed_at: DateTime<Utc>,
}

/// Outcome: the request itself was invalid; nothing was held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferRejected {
    /// A UUID in lower-case hyphenated form, however the request spelled it; a malformed id as
    /// the producer sent it (one over 293 bytes cut to its first 256 and a note of how many
    /// more there were, which together are never longer).
    pub transfer_id: String,
    /// One of the codes in [`reasons`](crate::reasons).
    pub reason: String,
    /// A sentence for people.
    pub detail: String,
    pub rejected_at: DateTime<Utc>,
}

/// A critical event: the commit was decided but a participant has not acknowledged it after
/// the configured threshold. The coordinator keeps retrying; ops should look. It is published
/// again with every later re-send of the commit, with the same `ce_id` while the same commands
/// are pending, so that one lost to an outage is not lost for good: keep one per `ce_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommitStuck {
    pub transfer_id: Uuid,
    /// The commit commands not yet acknowledged.
    pub pending: Vec<AccountAction>,
    /// The re-sends after which a commit counts as stuck (`commit_stuck_after_attempts`).
    pub attempts: u32,
    pub decided_at: DateTime<Utc>,
}

/// Reason codes carried by votes and outcomes. Do not change a value: producers match on them.
pub mod reasons {
    // Rejections (the request is invalid).
    pub const INVALID_TRANSFER_ID: &str = "invalid_transfer_id";
    pub const INVALID_ACCOUNT_ID: &str = "invalid_account_id";
    pub const SAME_ACCOUNT: &str = "same_account";
    pub const INVALID_AMOUNT: &str = "invalid_amount";
    pub const UNKNOWN_CURRENCY: &str = "unknown_currency";
    pub const TOO_MANY_DECIMALS: &str = "too_many_decimals";
    pub const AMOUNT_OVER_LIMIT: &str = "amount_over_limit";
    pub const CONFLICT: &str = "conflict";
    // Failures (a participant voted no, or no vote came).
    pub const INSUFFICIENT_FUNDS: &str = "insufficient_funds";
    pub const SOURCE_NOT_FOUND: &str = "source_not_found";
    pub const SOURCE_INACTIVE: &str = "source_inactive";
    pub const DESTINATION_NOT_FOUND: &str = "destination_not_found";
    pub const DESTINATION_INACTIVE: &str = "destination_inactive";
    pub const CURRENCY_MISMATCH: &str = "currency_mismatch";
    /// The account's balance cannot take the amount exactly: it would pass the largest amount
    /// an account holds (79,228,162,514,264,337,593,543,950,335 in all its digits).
    pub const BALANCE_LIMIT: &str = "balance_limit";
    pub const RISK_REJECTED: &str = "risk_rejected";
    /// The abort reached the participant before the prepare; the late prepare is refused.
    pub const ABORTED: &str = "aborted";
    pub const TIMEOUT: &str = "timeout";
}
