//! The saga state machine, free of I/O: what a vote or an ack does to a transfer, and which
//! messages a state calls for.
//!
//! `preparing → committing → completed`, `preparing → aborting → failed`, or `rejected` at once.
//! A yes vote is a promise, so once `committing` a transfer never aborts.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use twophase_messages::{AccountAction, Decision, Participant, RiskAssessment};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Preparing,
    Committing,
    Aborting,
    Completed,
    Failed,
    Rejected,
}

impl Status {
    /// Do not change: stored in `transfers.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Preparing => "preparing",
            Status::Committing => "committing",
            Status::Aborting => "aborting",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Preparing,
            Status::Committing,
            Status::Aborting,
            Status::Completed,
            Status::Failed,
            Status::Rejected,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Rejected)
    }
}

/// What a valid transfer moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Decimal,
    pub currency: String,
}

/// One transfer's saga state, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    pub transfer_id: Uuid,
    /// Absent only for a rejected request.
    pub terms: Option<Terms>,
    pub status: Status,
    pub risk_vote: Option<Decision>,
    pub source_vote: Option<Decision>,
    pub destination_vote: Option<Decision>,
    pub risk: Option<RiskAssessment>,
    pub reason: Option<String>,
    pub reason_detail: Option<String>,
    pub failed_participant: Option<Participant>,
    pub captured: bool,
    pub credited: bool,
    pub released: bool,
    pub credit_cancelled: bool,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A message the current state calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    Evaluate,
    Account(AccountAction),
    Outcome,
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing new: a duplicate, or news that no longer matters. The caller re-sends what the
    /// state calls for, which is how a crash between commit and publish heals.
    Unchanged,
    /// Recorded, same phase: nothing to send yet.
    Recorded,
    /// The phase moved: send what the new state calls for.
    Advanced,
}

/// A reply that contradicts the state: the participant acknowledged something never asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transfer {transfer_id}: {what} while {status}")]
pub struct Contradiction {
    pub transfer_id: Uuid,
    pub what: String,
    pub status: &'static str,
}

impl Saga {
    /// A new transfer in its prepare phase.
    pub fn preparing(transfer_id: Uuid, terms: Terms) -> Saga {
        Saga {
            transfer_id,
            terms: Some(terms),
            status: Status::Preparing,
            risk_vote: None,
            source_vote: None,
            destination_vote: None,
            risk: None,
            reason: None,
            reason_detail: None,
            failed_participant: None,
            captured: false,
            credited: false,
            released: false,
            credit_cancelled: false,
            finished_at: None,
        }
    }

    /// A request refused before anything was held.
    pub fn rejected(transfer_id: Uuid, reason: &str, detail: String, now: DateTime<Utc>) -> Saga {
        Saga {
            terms: None,
            status: Status::Rejected,
            reason: Some(reason.to_owned()),
            reason_detail: Some(detail),
            finished_at: Some(now),
            ..Saga::preparing(
                transfer_id,
                Terms {
                    from_account: Uuid::nil(),
                    to_account: Uuid::nil(),
                    amount: Decimal::ZERO,
                    currency: String::new(),
                },
            )
        }
    }

    pub fn vote_of(&self, participant: Participant) -> Option<Decision> {
        match participant {
            Participant::Risk => self.risk_vote,
            Participant::Source => self.source_vote,
            Participant::Destination => self.destination_vote,
        }
    }

    fn vote_slot(&mut self, participant: Participant) -> &mut Option<Decision> {
        match participant {
            Participant::Risk => &mut self.risk_vote,
            Participant::Source => &mut self.source_vote,
            Participant::Destination => &mut self.destination_vote,
        }
    }

    /// Records a vote. The first no decides the abort; all three yes decide the commit.
    pub fn on_vote(
        &mut self,
        participant: Participant,
        decision: Decision,
        reason: Option<&str>,
        risk: Option<&RiskAssessment>,
    ) -> Applied {
        if self.vote_of(participant).is_some() {
            return Applied::Unchanged;
        }
        *self.vote_slot(participant) = Some(decision);
        // Once the outcome is out, it does not change: an outcome published again (to a
        // request sent again, or on a redelivery) is the same message under the same id.
        if participant == Participant::Risk && !self.status.is_terminal() {
            self.risk = risk.cloned();
        }
        if self.status != Status::Preparing {
            // A late vote after the decision changes nothing: an abort already sent tells the
            // participant to undo whatever it prepared.
            return Applied::Recorded;
        }
        match decision {
            Decision::No => {
                self.status = Status::Aborting;
                self.reason = Some(reason.unwrap_or("refused").to_owned());
                self.failed_participant = Some(participant);
                Applied::Advanced
            }
            Decision::Yes => {
                let all_yes = [self.risk_vote, self.source_vote, self.destination_vote]
                    .iter()
                    .all(|v| *v == Some(Decision::Yes));
                if all_yes {
                    self.status = Status::Committing;
                    Applied::Advanced
                } else {
                    Applied::Recorded
                }
            }
        }
    }

    /// No vote came in time: abort.
    pub fn on_timeout(&mut self) -> Applied {
        if self.status != Status::Preparing {
            return Applied::Unchanged;
        }
        self.status = Status::Aborting;
        self.reason = Some(twophase_messages::reasons::TIMEOUT.to_owned());
        Applied::Advanced
    }

    /// Records a participant's acknowledgement of a commit or abort command.
    pub fn on_ack(
        &mut self,
        action: AccountAction,
        now: DateTime<Utc>,
    ) -> Result<Applied, Contradiction> {
        let (expected, flag) = match action {
            AccountAction::Capture => (Status::Committing, &mut self.captured),
            AccountAction::Credit => (Status::Committing, &mut self.credited),
            AccountAction::Release => (Status::Aborting, &mut self.released),
            AccountAction::CancelCredit => (Status::Aborting, &mut self.credit_cancelled),
            AccountAction::Hold | AccountAction::ReserveCredit => {
                return Err(self.contradiction(format!("an ack of {}", action.as_str())))
            }
        };
        let terminal = match expected {
            Status::Committing => Status::Completed,
            _ => Status::Failed,
        };
        if self.status != expected && self.status != terminal {
            return Err(self.contradiction(format!("an ack of {}", action.as_str())));
        }
        if *flag {
            return Ok(Applied::Unchanged);
        }
        *flag = true;
        let done = match expected {
            Status::Committing => self.captured && self.credited,
            _ => self.released && self.credit_cancelled,
        };
        if done {
            self.status = terminal;
            self.finished_at = Some(now);
            Ok(Applied::Advanced)
        } else {
            Ok(Applied::Recorded)
        }
    }

    fn contradiction(&self, what: String) -> Contradiction {
        Contradiction {
            transfer_id: self.transfer_id,
            what,
            status: self.status.as_str(),
        }
    }

    /// The account commands among [`Saga::outstanding`]: those still unanswered.
    pub fn awaited_commands(&self) -> Vec<AccountAction> {
        self.outstanding()
            .into_iter()
            .filter_map(|e| match e {
                Emit::Account(action) => Some(action),
                _ => None,
            })
            .collect()
    }

    /// The messages this state calls for: the commands still unanswered in the current phase,
    /// or the outcome once terminal.
    pub fn outstanding(&self) -> Vec<Emit> {
        let mut out = Vec::new();
        match self.status {
            Status::Preparing => {
                if self.risk_vote.is_none() {
                    out.push(Emit::Evaluate);
                }
                if self.source_vote.is_none() {
                    out.push(Emit::Account(AccountAction::Hold));
                }
                if self.destination_vote.is_none() {
                    out.push(Emit::Account(AccountAction::ReserveCredit));
                }
            }
            Status::Committing => {
                if !self.captured {
                    out.push(Emit::Account(AccountAction::Capture));
                }
                if !self.credited {
                    out.push(Emit::Account(AccountAction::Credit));
                }
            }
            Status::Aborting => {
                if !self.released {
                    out.push(Emit::Account(AccountAction::Release));
                }
                if !self.credit_cancelled {
                    out.push(Emit::Account(AccountAction::CancelCredit));
                }
            }
            Status::Completed | Status::Failed | Status::Rejected => out.push(Emit::Outcome),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twophase_messages::reasons;

    fn saga() -> Saga {
        Saga::preparing(
            Uuid::new_v4(),
            Terms {
                from_account: Uuid::new_v4(),
                to_account: Uuid::new_v4(),
                amount: Decimal::ONE_HUNDRED,
                currency: "USD".into(),
            },
        )
    }

    const ALL: [Participant; 3] = [
        Participant::Risk,
        Participant::Source,
        Participant::Destination,
    ];

    #[test]
    fn three_yes_votes_commit_then_two_acks_complete() {
        let mut s = saga();
        assert_eq!(s.outstanding().len(), 3);
        assert_eq!(
            s.on_vote(Participant::Source, Decision::Yes, None, None),
            Applied::Recorded
        );
        assert_eq!(
            s.on_vote(Participant::Risk, Decision::Yes, None, None),
            Applied::Recorded
        );
        assert_eq!(
            s.outstanding(),
            vec![Emit::Account(AccountAction::ReserveCredit)]
        );
        assert_eq!(
            s.on_vote(Participant::Destination, Decision::Yes, None, None),
            Applied::Advanced
        );
        assert_eq!(s.status, Status::Committing);
        assert_eq!(
            s.outstanding(),
            vec![
                Emit::Account(AccountAction::Capture),
                Emit::Account(AccountAction::Credit)
            ]
        );
        let now = Utc::now();
        assert_eq!(s.on_ack(AccountAction::Credit, now), Ok(Applied::Recorded));
        assert_eq!(s.on_ack(AccountAction::Credit, now), Ok(Applied::Unchanged));
        assert_eq!(s.on_ack(AccountAction::Capture, now), Ok(Applied::Advanced));
        assert_eq!(s.status, Status::Completed);
        assert_eq!(s.outstanding(), vec![Emit::Outcome]);
    }

    #[test]
    fn the_first_no_aborts_and_names_its_reason() {
        for no in ALL {
            let mut s = saga();
            for p in ALL.into_iter().filter(|p| *p != no) {
                s.on_vote(p, Decision::Yes, None, None);
            }
            assert_eq!(
                s.on_vote(no, Decision::No, Some(reasons::INSUFFICIENT_FUNDS), None),
                Applied::Advanced
            );
            assert_eq!(s.status, Status::Aborting);
            assert_eq!(s.failed_participant, Some(no));
            assert_eq!(s.reason.as_deref(), Some(reasons::INSUFFICIENT_FUNDS));
            assert_eq!(
                s.outstanding(),
                vec![
                    Emit::Account(AccountAction::Release),
                    Emit::Account(AccountAction::CancelCredit)
                ]
            );
            acknowledge_the_abort(&mut s);
        }
    }

    /// Acknowledges an abort's release and credit cancellation: the saga has failed.
    fn acknowledge_the_abort(s: &mut Saga) {
        let now = Utc::now();
        s.on_ack(AccountAction::Release, now).unwrap();
        assert_eq!(
            s.on_ack(AccountAction::CancelCredit, now),
            Ok(Applied::Advanced)
        );
        assert_eq!(s.status, Status::Failed);
    }

    /// A saga `participant` voted no on, for `reason`.
    fn refused_by(participant: Participant, reason: &str) -> Saga {
        let mut s = saga();
        s.on_vote(participant, Decision::No, Some(reason), None);
        s
    }

    #[test]
    fn a_late_vote_after_the_abort_changes_nothing() {
        let mut s = refused_by(Participant::Risk, reasons::RISK_REJECTED);
        assert_eq!(
            s.on_vote(Participant::Source, Decision::Yes, None, None),
            Applied::Recorded
        );
        assert_eq!(s.status, Status::Aborting);
        assert_eq!(s.reason.as_deref(), Some(reasons::RISK_REJECTED));
    }

    #[test]
    fn a_risk_vote_after_the_outcome_leaves_the_outcome_as_it_was() {
        let mut s = refused_by(Participant::Source, reasons::INSUFFICIENT_FUNDS);
        acknowledge_the_abort(&mut s);
        let assessment = RiskAssessment {
            score: 10,
            level: twophase_messages::RiskLevel::Low,
            rules: Vec::new(),
        };
        assert_eq!(
            s.on_vote(Participant::Risk, Decision::Yes, None, Some(&assessment)),
            Applied::Recorded
        );
        assert_eq!(s.risk_vote, Some(Decision::Yes));
        assert_eq!(s.risk, None);
    }

    #[test]
    fn a_duplicate_vote_is_unchanged() {
        let mut s = saga();
        s.on_vote(Participant::Risk, Decision::Yes, None, None);
        assert_eq!(
            s.on_vote(Participant::Risk, Decision::No, None, None),
            Applied::Unchanged
        );
        assert_eq!(s.risk_vote, Some(Decision::Yes));
    }

    #[test]
    fn a_timeout_aborts_only_while_preparing() {
        let mut s = saga();
        assert_eq!(s.on_timeout(), Applied::Advanced);
        assert_eq!(s.reason.as_deref(), Some(reasons::TIMEOUT));
        let mut committing = saga();
        for p in ALL {
            committing.on_vote(p, Decision::Yes, None, None);
        }
        assert_eq!(committing.on_timeout(), Applied::Unchanged);
        assert_eq!(committing.status, Status::Committing);
    }

    #[test]
    fn an_ack_from_the_wrong_phase_is_a_contradiction() {
        let mut s = saga();
        assert!(s.on_ack(AccountAction::Capture, Utc::now()).is_err());
        s.on_vote(Participant::Risk, Decision::No, None, None);
        assert!(s.on_ack(AccountAction::Credit, Utc::now()).is_err());
        assert!(s.on_ack(AccountAction::Release, Utc::now()).is_ok());
    }
}
