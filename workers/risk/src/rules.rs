//! The risk rules: pure functions from a transfer and the source account's history to a score.
//!
//! Each rule that fires adds its weight to the score (capped at 100). The worker votes no when
//! the score is above `max_score`.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use twophase_messages::{EvaluateRisk, RiskAssessment, RiskLevel};
use uuid::Uuid;

/// Rule names, as stored and reported. Do not change: stored evaluations use them.
pub mod names {
    pub const BLOCKED_ACCOUNT: &str = "blocked_account";
    pub const SINGLE_LIMIT: &str = "single_transfer_limit";
    pub const LARGE_AMOUNT: &str = "large_amount";
    pub const VELOCITY: &str = "velocity";
    pub const DAILY_LIMIT: &str = "daily_limit";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiskConfig {
    /// Vote no when the score is above this (0–100).
    pub max_score: u8,
    /// The largest single transfer per currency, e.g. `USD = "10000.00"`. A currency without an
    /// entry has no single-transfer limit.
    pub single_limit: BTreeMap<String, Decimal>,
    /// At most this many transfers from one account within `velocity_window`.
    pub velocity_max_transfers: u32,
    #[serde(with = "humantime_serde")]
    pub velocity_window: Duration,
    /// The most one account may send per currency per UTC day (approved evaluations).
    pub daily_limit: BTreeMap<String, Decimal>,
    /// Accounts that may not send or receive.
    pub blocked_accounts: Vec<Uuid>,
    pub weights: Weights,
}

/// What each rule adds to the score when it fires.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub blocked_account: u8,
    pub single_limit: u8,
    /// Fires for an amount over half the single-transfer limit: raises the score without
    /// rejecting on its own.
    pub large_amount: u8,
    pub velocity: u8,
    pub daily_limit: u8,
}

impl Default for Weights {
    fn default() -> Weights {
        Weights {
            blocked_account: 100,
            single_limit: 80,
            large_amount: 20,
            velocity: 60,
            daily_limit: 60,
        }
    }
}

impl Default for RiskConfig {
    fn default() -> RiskConfig {
        let limits = |amount: i64| {
            ["USD", "EUR", "GBP", "CHF"]
                .into_iter()
                .map(|c| (c.to_owned(), Decimal::from(amount)))
                .collect()
        };
        RiskConfig {
            max_score: 50,
            single_limit: limits(10_000),
            velocity_max_transfers: 30,
            velocity_window: Duration::from_secs(60),
            daily_limit: limits(50_000),
            blocked_accounts: Vec::new(),
            weights: Weights::default(),
        }
    }
}

/// The source account's recent activity, read from stored evaluations.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Evaluations of transfers from the account within the velocity window, this one excluded.
    pub transfers_in_window: u32,
    /// The sum of approved amounts from the account today in this currency, this one excluded.
    pub approved_today: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub score: u8,
    pub level: RiskLevel,
    pub rules: Vec<&'static str>,
}

impl Assessment {
    pub fn to_message(&self) -> RiskAssessment {
        RiskAssessment {
            score: self.score,
            level: self.level,
            rules: self.rules.iter().map(|r| (*r).to_owned()).collect(),
        }
    }
}

impl RiskConfig {
    pub fn assess(&self, request: &EvaluateRisk, history: &History) -> Assessment {
        let w = &self.weights;
        let blocked = self.blocked_accounts.contains(&request.from_account)
            || self.blocked_accounts.contains(&request.to_account);
        let single = self.single_limit.get(&request.currency);
        let daily = self.daily_limit.get(&request.currency);
        let checks = [
            (names::BLOCKED_ACCOUNT, w.blocked_account, blocked),
            (
                names::SINGLE_LIMIT,
                w.single_limit,
                single.is_some_and(|limit| request.amount > *limit),
            ),
            (
                names::LARGE_AMOUNT,
                w.large_amount,
                single.is_some_and(|limit| request.amount > *limit / Decimal::TWO),
            ),
            (
                names::VELOCITY,
                w.velocity,
                history.transfers_in_window >= self.velocity_max_transfers,
            ),
            (
                names::DAILY_LIMIT,
                w.daily_limit,
                daily.is_some_and(|limit| {
                    history.approved_today.saturating_add(request.amount) > *limit
                }),
            ),
        ];
        let mut score: u32 = 0;
        let mut rules = Vec::new();
        for (name, weight, fired) in checks {
            if fired {
                score += u32::from(weight);
                rules.push(name);
            }
        }
        let score = score.min(100) as u8;
        let level = match score {
            0..=29 => RiskLevel::Low,
            30..=69 => RiskLevel::Medium,
            _ => RiskLevel::High,
        };
        Assessment {
            score,
            level,
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(amount: &str) -> EvaluateRisk {
        EvaluateRisk {
            transfer_id: Uuid::new_v4(),
            from_account: Uuid::new_v4(),
            to_account: Uuid::new_v4(),
            amount: amount.parse().unwrap(),
            currency: "USD".into(),
        }
    }

    fn approved(config: &RiskConfig, a: &Assessment) -> bool {
        a.score <= config.max_score
    }

    #[test]
    fn an_ordinary_transfer_scores_zero() {
        let c = RiskConfig::default();
        let a = c.assess(&request("12.34"), &History::default());
        assert_eq!(a.score, 0);
        assert_eq!(a.level, RiskLevel::Low);
        assert!(a.rules.is_empty());
    }

    #[test]
    fn a_large_amount_raises_the_score_but_passes() {
        let c = RiskConfig::default();
        let a = c.assess(&request("6000"), &History::default());
        assert_eq!(a.rules, vec![names::LARGE_AMOUNT]);
        assert!(approved(&c, &a));
    }

    #[test]
    fn each_rejecting_rule_rejects_on_its_own() {
        let c = RiskConfig {
            velocity_max_transfers: 3,
            ..RiskConfig::default()
        };
        let over_single = c.assess(&request("10000.01"), &History::default());
        assert!(over_single.rules.contains(&names::SINGLE_LIMIT));
        assert!(!approved(&c, &over_single));

        let busy = History {
            transfers_in_window: 3,
            ..History::default()
        };
        let fast = c.assess(&request("1"), &busy);
        assert_eq!(fast.rules, vec![names::VELOCITY]);
        assert!(!approved(&c, &fast));

        let spent = History {
            approved_today: "49999.50".parse().unwrap(),
            ..History::default()
        };
        let daily = c.assess(&request("1.00"), &spent);
        assert_eq!(daily.rules, vec![names::DAILY_LIMIT]);
        assert!(!approved(&c, &daily));

        let r = request("1");
        let blocked = RiskConfig {
            blocked_accounts: vec![r.to_account],
            ..c.clone()
        };
        let a = blocked.assess(&r, &History::default());
        assert_eq!((a.score, a.level), (100, RiskLevel::High));
        assert!(!approved(&blocked, &a));
    }

    #[test]
    fn the_score_is_capped_at_100() {
        let r = request("20000");
        let c = RiskConfig {
            blocked_accounts: vec![r.from_account],
            ..RiskConfig::default()
        };
        assert_eq!(c.assess(&r, &History::default()).score, 100);
    }
}
