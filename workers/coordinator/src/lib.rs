//! The coordinator: drives each transfer through prepare and commit-or-abort.
//!
//! It consumes `transfers.requests` and `saga.replies` and publishes commands on
//! `saga.commands.risk` and `saga.commands.account` and outcomes on `transfers.events`. Its
//! state is one row per transfer in the `coordinator` schema; every change is committed before
//! the messages it calls for are published, and a redelivered message (or the timer) re-sends
//! whatever the state still calls for, so a crash anywhere heals. It never touches another
//! worker's schema.

pub mod saga;
pub mod store;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use twophase_messages::{
    named, quoted, reasons, AccountCommand, AccountCommandBody, Ack, CommitStuck, Envelope,
    EvaluateRisk, Message, Participant, Topics, TransferCompleted, TransferFailed,
    TransferRejected, TransferRequested, Vote,
};
use twophase_runtime::db::{stored_json, stored_text, Db, Timestamp, Tx};
use twophase_runtime::http::Health;
use twophase_runtime::worker::{self, Incoming, WorkerSettings};
use twophase_runtime::{
    failpoint, metrics, telemetry, CancellationToken, Handled, Handler, HandlerError, Outgoing,
    Publisher,
};
use uuid::Uuid;

use saga::{Applied, Emit, Saga, Status};
use store::{Sagas, Stored};

/// The current time as the database stores it, so that an outcome published again from a
/// stored row is identical to the first.
fn now() -> DateTime<Utc> {
    Timestamp::now().0
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

/// Counts a rejection that stores no transfer (a malformed id, an id reused for another
/// request): it is decided as it is received, so it took no time.
fn record_unstored_rejection(reason: &'static str) {
    metrics::transfer_finished(metrics::status::REJECTED, Some(reason), 0.0);
}

/// Counts a transfer that just reached its outcome, with the time from its request's reading
/// to the outcome, on this coordinator's clock.
fn record_if_finished(stored: &Stored) {
    let saga = &stored.saga;
    if let (true, Some(finished)) = (saga.status.is_terminal(), saga.finished_at) {
        let seconds = seconds_between(stored.created_at, finished);
        metrics::transfer_finished(saga.status.as_str(), saga.reason.as_deref(), seconds);
    }
}

/// The database schema this worker owns.
pub const SCHEMA: &str = "coordinator";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// A transfer whose votes are not all in by then is aborted with reason `timeout`. A
    /// coordinator that has just started, or rejoined its group, aborts nothing until it has
    /// held its partitions this long, so that votes sent while it was away are read first.
    #[serde(with = "humantime_serde")]
    pub prepare_timeout: Duration,
    /// Commit and abort commands unanswered this long are sent again, with the wait doubling
    /// per attempt up to `resend_max_backoff`. They are never abandoned.
    #[serde(with = "humantime_serde")]
    pub resend_after: Duration,
    #[serde(with = "humantime_serde")]
    pub resend_max_backoff: Duration,
    /// After this many re-sends of a commit, a `commit_stuck` event is published; a commit or
    /// an abort re-sent this often counts in `twophase_sagas_stuck`.
    pub commit_stuck_after_attempts: i32,
    /// How often the timers are checked.
    #[serde(with = "humantime_serde")]
    pub timer_interval: Duration,
    /// The largest transfer accepted per currency; larger requests are rejected.
    pub max_amount: BTreeMap<String, Decimal>,
    /// The limit for currencies `max_amount` does not name.
    pub default_max_amount: Decimal,
}

impl Default for CoordinatorConfig {
    fn default() -> CoordinatorConfig {
        CoordinatorConfig {
            prepare_timeout: Duration::from_secs(30),
            resend_after: Duration::from_secs(5),
            resend_max_backoff: Duration::from_secs(60),
            commit_stuck_after_attempts: 5,
            timer_interval: Duration::from_secs(1),
            max_amount: BTreeMap::new(),
            default_max_amount: Decimal::from(1_000_000),
        }
    }
}

/// A transfer whose commit or abort has gone unacknowledged past the re-send threshold
/// (`commit_stuck_after_attempts`): what `twophase transfers stuck` lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckTransfer {
    pub transfer_id: Uuid,
    /// `committing` or `aborting`.
    pub status: &'static str,
    /// The commands sent and not yet acknowledged (`capture`, `credit`, `release`,
    /// `cancel_credit`): each names the account worker that owes the answer.
    pub awaiting: Vec<&'static str>,
    /// How often they have been re-sent.
    pub attempts: i32,
    pub decided_at: Option<DateTime<Utc>>,
    pub from_account: Option<Uuid>,
    pub to_account: Option<Uuid>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
}

/// The transfers stuck in commit or abort, the longest decided first.
pub async fn stuck_transfers(
    db: &Db,
    config: &CoordinatorConfig,
) -> Result<Vec<StuckTransfer>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let stuck = store::stuck(&mut tx, config.commit_stuck_after_attempts).await?;
    tx.commit().await?;
    Ok(stuck
        .into_iter()
        .map(|stored| {
            let saga = &stored.saga;
            let awaiting = saga
                .awaited_commands()
                .iter()
                .map(|action| action.as_str())
                .collect();
            let terms = saga.terms.as_ref();
            StuckTransfer {
                transfer_id: saga.transfer_id,
                status: saga.status.as_str(),
                awaiting,
                attempts: stored.resend_attempts,
                decided_at: stored.decided_at,
                from_account: terms.map(|t| t.from_account),
                to_account: terms.map(|t| t.to_account),
                amount: terms.map(|t| t.amount),
                currency: terms.map(|t| t.currency.clone()),
            }
        })
        .collect())
}

#[derive(Debug)]
pub struct Coordinator {
    db: Db,
    config: CoordinatorConfig,
    topics: Topics,
    source: String,
}

impl Coordinator {
    pub fn settings(
        kafka: twophase_runtime::KafkaConfig,
        retry: twophase_runtime::RetryConfig,
    ) -> WorkerSettings {
        let topics = Topics::new(&kafka.topic_prefix);
        WorkerSettings {
            name: "coordinator",
            kafka,
            retry,
            topics: vec![topics.requests(), topics.replies()],
            default_types: vec![(
                topics.requests(),
                twophase_messages::types::TRANSFER_REQUESTED,
            )],
            health: twophase_runtime::http::Health::new(),
        }
    }

    /// Runs the consume loop and the timers until `shutdown`.
    pub async fn run(
        db: Db,
        config: CoordinatorConfig,
        settings: WorkerSettings,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let coordinator = Arc::new(Coordinator {
            db,
            config,
            topics: Topics::new(&settings.kafka.topic_prefix),
            source: settings.source(),
        });
        let timers = tokio::spawn(Arc::clone(&coordinator).run_timers(
            publisher.clone(),
            settings.health.clone(),
            shutdown.clone(),
        ));
        let result = worker::run(coordinator, settings, publisher, shutdown.clone()).await;
        shutdown.cancel();
        timers.await?;
        result
    }

    fn on_request(
        &self,
        sagas: &mut Sagas,
        envelope: &Envelope,
        request: &TransferRequested,
    ) -> Result<Handled, HandlerError> {
        let Ok(transfer_id) = Uuid::parse_str(&request.transfer_id) else {
            // Nothing can be stored under a malformed id; the rejection is re-sent on every
            // redelivery with the same message id, derived from the request's, so that two
            // requests under one malformed id are answered by two events. It names the transfer
            // as the producer did, up to a length that keeps it publishable.
            let echoed = named(&request.transfer_id);
            let rejected = TransferRejected {
                transfer_id: echoed.clone().into_owned(),
                reason: reasons::INVALID_TRANSFER_ID.to_owned(),
                detail: format!("transfer_id {} is not a UUID", quoted(&request.transfer_id)),
                rejected_at: envelope.time,
            };
            let id_seed = format!("rejected:{}:{}", request.transfer_id, envelope.id);
            let reply = self.outcome(
                envelope,
                &echoed,
                &id_seed,
                Message::TransferRejected(rejected),
            );
            return Ok(Handled::replies(vec![reply])
                .then(|| record_unstored_rejection(reasons::INVALID_TRANSFER_ID)));
        };
        let hash = validate::fingerprint(request);
        if let Some(existing) = sagas.get(transfer_id) {
            if existing.request_hash != hash {
                tracing::warn!(%transfer_id, "transfer id reused with a different request: rejected as a conflict");
                let rejected = TransferRejected {
                    transfer_id: transfer_id.to_string(),
                    reason: reasons::CONFLICT.to_owned(),
                    detail: "this transfer_id was already used for a different request".into(),
                    rejected_at: envelope.time,
                };
                // As for a malformed id: one event per conflicting request.
                let id_seed = format!("conflict:{transfer_id}:{hash}:{}", envelope.id);
                let reply = self.outcome(
                    envelope,
                    &transfer_id.to_string(),
                    &id_seed,
                    Message::TransferRejected(rejected),
                );
                return Ok(Handled::replies(vec![reply])
                    .then(|| record_unstored_rejection(reasons::CONFLICT)));
            }
            // The same request again: answer with what its state calls for (the outcome, once
            // there is one).
            return Ok(Handled::replies(self.emit(envelope, existing)));
        }
        let saga = match validate::validate(
            request,
            &self.config.max_amount,
            self.config.default_max_amount,
        ) {
            Ok(terms) => Saga::preparing(transfer_id, terms),
            Err(rejection) => {
                tracing::info!(%transfer_id, reason = rejection.reason, detail = %rejection.detail, "request rejected");
                Saga::rejected(transfer_id, rejection.reason, rejection.detail, now())
            }
        };
        // The saga's trace context: what the timer's later messages continue.
        let (traceparent, tracestate) =
            telemetry::trace_headers(Some(envelope), Some(&transfer_id.to_string()));
        let stored = Stored {
            saga,
            request_hash: hash,
            traceparent: Some(traceparent),
            tracestate,
            request_message_id: Some(envelope.id),
            // Carried on by the timer's messages, as stored.
            correlation_id: envelope
                .correlation_id
                .as_deref()
                .map(|c| stored_text(c).into_owned()),
            resend_attempts: 0,
            created_at: now(),
            decided_at: None,
        };
        let now = Timestamp::now();
        let deadline = Timestamp::from(
            now.0
                + chrono::TimeDelta::from_std(self.config.prepare_timeout)
                    .unwrap_or(chrono::TimeDelta::MAX),
        );
        // As stored: the fingerprint above is of the request as sent.
        let raw = stored_json(serde_json::to_value(request).expect("requests serialize"));
        let replies = saga_span(&stored).in_scope(|| self.emit(envelope, &stored));
        sagas.insert(stored.clone(), raw, deadline);
        // On the producer's clock, which may be off: a wait of its own, not part of the
        // transfer's duration, which alerts read.
        let waited = seconds_between(envelope.time, stored.created_at);
        Ok(Handled::replies(replies).then(move || {
            metrics::request_waited(waited);
            record_if_finished(&stored)
        }))
    }

    /// Applies a vote or an ack to its transfer and returns what to publish.
    fn on_reply(
        &self,
        sagas: &mut Sagas,
        envelope: &Envelope,
        transfer_id: Uuid,
        apply: impl FnOnce(&mut Saga) -> Result<Applied, saga::Contradiction>,
    ) -> Result<Handled, HandlerError> {
        let Some(stored) = sagas.get_mut(transfer_id) else {
            return Err(HandlerError::permanent(format!(
                "reply for transfer {transfer_id}, which this coordinator never started"
            )));
        };
        let applied = apply(&mut stored.saga).map_err(|e| HandlerError::Permanent(e.into()))?;
        if applied != Applied::Unchanged {
            let next_resend = self.first_resend(stored, Timestamp::now());
            sagas.changed(transfer_id, next_resend);
        }
        let stored = sagas.get(transfer_id).expect("found above");
        Ok(match applied {
            Applied::Recorded => Handled::replies(Vec::new()),
            Applied::Unchanged => Handled::replies(self.emit(envelope, stored)),
            // The decision, or the outcome: a span of its own, parent of what it sends.
            Applied::Advanced => {
                tracing::info!(%transfer_id, status = stored.saga.status.as_str(), reason = ?stored.saga.reason, "transfer advanced");
                let replies = saga_span(stored).in_scope(|| self.emit(envelope, stored));
                let stored = stored.clone();
                Handled::replies(replies).then(move || {
                    if stored.saga.status == Status::Committing {
                        failpoint::hit("coordinator.after_decision");
                    }
                    record_if_finished(&stored);
                })
            }
        })
    }

    /// The messages a saga's state calls for, caused by `cause`.
    fn emit(&self, cause: &Envelope, stored: &Stored) -> Vec<Outgoing> {
        let saga = &stored.saga;
        saga.outstanding()
            .into_iter()
            .filter_map(|e| self.message_for(cause, saga, e))
            .collect()
    }

    fn message_for(&self, cause: &Envelope, saga: &Saga, emit: Emit) -> Option<Outgoing> {
        let id = saga.transfer_id;
        if emit == Emit::Outcome {
            let at = saga.finished_at.unwrap_or_else(Utc::now);
            let message = match (saga.status, saga.terms.as_ref()) {
                (Status::Completed, Some(t)) => Message::TransferCompleted(TransferCompleted {
                    transfer_id: id,
                    from_account: t.from_account,
                    to_account: t.to_account,
                    amount: t.amount,
                    currency: t.currency.clone(),
                    completed_at: at,
                }),
                (Status::Failed, _) => Message::TransferFailed(TransferFailed {
                    transfer_id: id,
                    reason: saga.reason.clone().unwrap_or_default(),
                    participant: saga.failed_participant,
                    risk: saga.risk.clone(),
                    failed_at: at,
                }),
                _ => Message::TransferRejected(TransferRejected {
                    transfer_id: id.to_string(),
                    reason: saga.reason.clone().unwrap_or_default(),
                    detail: saga.reason_detail.clone().unwrap_or_default(),
                    rejected_at: at,
                }),
            };
            return Some(self.outcome(cause, &id.to_string(), &format!("outcome:{id}"), message));
        }
        let terms = saga.terms.as_ref()?;
        let (topic, key, message) = match emit {
            Emit::Evaluate => (
                self.topics.risk_commands(),
                // Keyed by source account: one account's evaluations are serialized.
                terms.from_account,
                Message::EvaluateRisk(EvaluateRisk {
                    transfer_id: id,
                    from_account: terms.from_account,
                    to_account: terms.to_account,
                    amount: terms.amount,
                    currency: terms.currency.clone(),
                }),
            ),
            Emit::Account(action) => {
                let account_id = match action.participant() {
                    Participant::Destination => terms.to_account,
                    _ => terms.from_account,
                };
                let body = AccountCommandBody {
                    transfer_id: id,
                    account_id,
                    amount: terms.amount,
                    currency: terms.currency.clone(),
                };
                (
                    self.topics.account_commands(),
                    account_id,
                    Message::Account(AccountCommand::new(action, body)),
                )
            }
            Emit::Outcome => unreachable!("handled above"),
        };
        Some(Outgoing::caused_by(
            cause,
            &self.source,
            topic,
            key,
            &message,
        ))
    }

    /// An event on the outcome topic (an outcome, or `commit_stuck`). Its message id is derived
    /// from `id_seed`, so an event published again after a redelivery or a re-send is
    /// recognisably the same message. Do not change the derivation.
    fn outcome(&self, cause: &Envelope, key: &str, id_seed: &str, message: Message) -> Outgoing {
        let mut out = Outgoing::caused_by(cause, &self.source, self.topics.events(), key, &message);
        out.envelope.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, id_seed.as_bytes());
        out
    }

    /// Aborts transfers whose prepare timed out and re-sends unanswered commit and abort
    /// commands, until `shutdown`.
    ///
    /// Aborting starts only once this coordinator's consumer has held its partitions for one
    /// prepare timeout: votes that came while no coordinator was reading (it was down, or the
    /// group was rebalancing) are read first, and a transfer they all said yes to is not failed
    /// with `timeout` for the coordinator's own absence.
    async fn run_timers(
        self: Arc<Self>,
        publisher: Publisher,
        health: Health,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.config.timer_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reading_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            reading_since = match (reading_since, health.is_assigned()) {
                (_, false) => None,
                (None, true) => Some(Instant::now()),
                (since, true) => since,
            };
            let expire =
                reading_since.is_some_and(|since| since.elapsed() >= self.config.prepare_timeout);
            match self.fire_timers(expire).await {
                Ok(out) if !out.is_empty() => {
                    // The sagas' changes are committed: if publishing fails, their commands
                    // go out again at each saga's next resend, which is already set.
                    if let Err(e) = publisher.publish_all(&out).await {
                        tracing::warn!(error = %e, "timer messages not published; they are re-sent at the sagas' next resend");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "timer check failed; retrying next tick"),
            }
        }
    }

    /// When a saga's commit or abort commands are first due again, if it is waiting on any.
    fn first_resend(&self, stored: &Stored, now: Timestamp) -> Option<Timestamp> {
        matches!(stored.saga.status, Status::Committing | Status::Aborting).then(|| {
            store::next_resend(
                now,
                self.config.resend_after,
                self.config.resend_max_backoff,
                stored.resend_attempts,
            )
        })
    }

    /// One round of the timers; prepares past their deadline are aborted only if `expire`.
    async fn fire_timers(
        &self,
        expire: bool,
    ) -> Result<Vec<Outgoing>, twophase_runtime::db::sqlx::Error> {
        let now = Timestamp::now();
        let mut tx = self.db.begin().await?;
        let mut out = Vec::new();
        let mut expired = if expire {
            store::lock_expired(&mut tx, now, 100).await?
        } else {
            Vec::new()
        };
        for stored in &mut expired {
            stored.saga.on_timeout();
            out.extend(timer_span(stored, "prepare timeout").in_scope(|| {
                tracing::warn!(transfer_id = %stored.saga.transfer_id, "prepare timed out: aborting");
                self.emit(&self.timer_cause(stored), stored)
            }));
        }
        let mut due = store::lock_due(&mut tx, now, 100).await?;
        for stored in &mut due {
            stored.resend_attempts += 1;
            out.extend(timer_span(stored, "resend").in_scope(|| self.resend(stored)));
        }
        let changed: Vec<(&Stored, Option<Timestamp>)> = expired
            .iter()
            .chain(&due)
            .map(|stored| (stored, self.first_resend(stored, now)))
            .collect();
        store::update(&mut tx, &changed, now).await?;
        let (by_status, stuck) =
            store::in_flight(&mut tx, self.config.commit_stuck_after_attempts).await?;
        tx.commit().await?;
        for status in [Status::Preparing, Status::Committing, Status::Aborting] {
            let n = by_status
                .iter()
                .find(|(s, _)| s == status.as_str())
                .map_or(0, |(_, n)| *n);
            metrics::set_sagas_in_flight(status.as_str(), n);
        }
        metrics::set_sagas_stuck(stuck);
        if !out.is_empty() {
            failpoint::hit("coordinator.timer_after_commit");
        }
        Ok(out)
    }

    /// The commands a saga still waits on, sent again; with a `commit_stuck` event once its
    /// commit has been re-sent `commit_stuck_after_attempts` times, and again with every re-send
    /// after that. The event is the same message each time (one id) while the same commands are
    /// pending, so a consumer keeps one; sending it again makes good one lost to a failed
    /// publish or a crash before it.
    fn resend(&self, stored: &Stored) -> Vec<Outgoing> {
        let cause = self.timer_cause(stored);
        let saga = &stored.saga;
        tracing::warn!(transfer_id = %saga.transfer_id, status = saga.status.as_str(), attempt = stored.resend_attempts, "re-sending unanswered commands");
        let mut out = self.emit(&cause, stored);
        if saga.status != Status::Committing {
            return out;
        }
        metrics::commit_retry();
        let threshold = self.config.commit_stuck_after_attempts;
        if stored.resend_attempts < threshold {
            return out;
        }
        // Counted with every re-send, not once: the critical alert stays on while the commit
        // is stuck, and a count lost with a crashed coordinator is made good by the next one.
        metrics::commit_stuck();
        if stored.resend_attempts == threshold {
            tracing::error!(transfer_id = %saga.transfer_id, "commit stuck: a participant has not acknowledged the commit");
        }
        let pending = saga.awaited_commands();
        let names: Vec<&str> = pending.iter().map(|a| a.as_str()).collect();
        // Do not change: a consumer tells a repeated event by this id.
        let id_seed = format!(
            "commit_stuck:{}:{threshold}:{}",
            saga.transfer_id,
            names.join(",")
        );
        let stuck = Message::CommitStuck(CommitStuck {
            transfer_id: saga.transfer_id,
            pending,
            attempts: threshold as u32,
            decided_at: stored.decided_at.unwrap_or_else(Utc::now),
        });
        out.push(self.outcome(&cause, &saga.transfer_id.to_string(), &id_seed, stuck));
        out
    }

    /// The envelope timer-made messages continue: the transfer's own trace.
    fn timer_cause(&self, stored: &Stored) -> Envelope {
        let mut cause = Envelope::new("timer", &self.source, stored.saga.transfer_id.to_string());
        cause.id = stored.request_message_id.unwrap_or(cause.id);
        cause.correlation_id = stored.correlation_id.clone();
        cause.traceparent = stored.traceparent.clone();
        cause.tracestate = stored.tracestate.clone();
        cause
    }
}

/// The span of a saga's step to a new state (prepare, the decision, the outcome), in the
/// current message's span.
fn saga_span(stored: &Stored) -> tracing::Span {
    let saga = &stored.saga;
    tracing::info_span!(
        "saga",
        otel.name = format!("saga {}", saga.status.as_str()),
        transfer.id = %saga.transfer_id,
        saga.status = saga.status.as_str(),
        saga.reason = saga.reason.as_deref(),
    )
}

/// The span of the timer's work on one saga, in the saga's trace.
fn timer_span(stored: &Stored, what: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "timer",
        otel.name = what,
        transfer.id = %stored.saga.transfer_id,
    );
    telemetry::continue_trace(
        &span,
        stored.traceparent.as_deref(),
        stored.tracestate.as_deref(),
    );
    span
}

impl Handler for Coordinator {
    fn db(&self) -> &Db {
        &self.db
    }

    async fn apply(&self, tx: &mut Tx, batch: &[Incoming]) -> Result<Vec<Handled>, HandlerError> {
        let named: Vec<Uuid> = batch
            .iter()
            .filter_map(|incoming| match &incoming.message {
                Message::TransferRequested(request) => Uuid::parse_str(&request.transfer_id).ok(),
                Message::Vote(Vote { transfer_id, .. }) | Message::Ack(Ack { transfer_id, .. }) => {
                    Some(*transfer_id)
                }
                _ => None,
            })
            .collect();
        let mut sagas = Sagas::lock(tx, &named).await?;
        let mut handled = Vec::with_capacity(batch.len());
        for incoming in batch {
            let _in_span = incoming.span.enter();
            handled.push(self.on_message(&mut sagas, incoming)?);
        }
        sagas.save(tx, Timestamp::now()).await?;
        Ok(handled)
    }
}

impl Coordinator {
    /// Applies one message to the sagas of its batch.
    fn on_message(&self, sagas: &mut Sagas, incoming: &Incoming) -> Result<Handled, HandlerError> {
        let envelope = &incoming.envelope;
        match &incoming.message {
            Message::TransferRequested(request) => self.on_request(sagas, envelope, request),
            Message::Vote(Vote {
                transfer_id,
                participant,
                decision,
                reason,
                risk,
            }) => self.on_reply(sagas, envelope, *transfer_id, |s| {
                Ok(s.on_vote(*participant, *decision, reason.as_deref(), risk.as_ref()))
            }),
            Message::Ack(Ack {
                transfer_id,
                action,
            }) => self.on_reply(sagas, envelope, *transfer_id, |s| s.on_ack(*action, now())),
            other => Err(HandlerError::permanent(format!(
                "the coordinator does not take {} messages",
                other.message_type()
            ))),
        }
    }
}
