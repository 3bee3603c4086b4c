//! Failpoints: named places where a test can make a worker die abruptly, to prove that a crash
//! at the worst moment loses no money and no message.
//!
//! `TWOPHASE_FAILPOINTS=name[@n][,name[@n]…]` makes the process kill itself with SIGKILL the
//! `n`-th time it reaches `name` (the first time without `@n`): every thread stops where it is,
//! with nothing flushed, no destructor run and no offset committed, as when the kernel or an
//! operator kills a worker. The variable is read once; with it unset a failpoint costs one
//! atomic load.
//!
//! The names:
//! - `<worker>.after_commit`: the handler's transaction is committed, its replies are not yet
//!   published (`account.after_commit`, `risk.after_commit`, `coordinator.after_commit`);
//! - `<worker>.after_publish`: the replies are acknowledged by the broker, the offset is not yet
//!   stored;
//! - `coordinator.after_decision`: the commit decision is recorded, the commit commands are not
//!   yet sent;
//! - `coordinator.timer_after_commit`: a timer's aborts or re-sends are recorded, their commands
//!   are not yet sent.
//!
//! One failpoint does not kill: `<worker>.kafka_fatal` makes the worker's producer raise a fatal
//! error (see [`crate::kafka::fatal`]) when a handler's replies are about to be published.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use rustix::process::Signal;

/// The environment variable that arms failpoints.
pub const ENV: &str = "TWOPHASE_FAILPOINTS";

/// The signal a failpoint kills its process with.
pub const SIGNAL: Signal = Signal::KILL;

struct Armed {
    /// Failpoint name → (the hit that fires, hits so far).
    points: HashMap<String, (u64, AtomicU64)>,
}

static ARMED: LazyLock<Option<Armed>> = LazyLock::new(|| {
    let spec = std::env::var(ENV).ok()?;
    let points = parse(&spec)
        .into_iter()
        .map(|(name, nth)| (name, (nth, AtomicU64::new(0))))
        .collect();
    Some(Armed { points })
});

fn parse(spec: &str) -> Vec<(String, u64)> {
    spec.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('@') {
            Some((name, nth)) => (name.to_owned(), nth.parse().unwrap_or(1).max(1)),
            None => (p.to_owned(), 1),
        })
        .collect()
}

/// Whether the failpoint `name` is armed and this is the hit it fires on.
fn fires(name: &str) -> bool {
    let Some(armed) = ARMED.as_ref() else {
        return false;
    };
    let Some((nth, hits)) = armed.points.get(name) else {
        return false;
    };
    hits.fetch_add(1, Ordering::SeqCst) + 1 == *nth
}

/// Kills the process if the failpoint `name` is armed and this is the hit it fires on.
pub fn hit(name: &str) {
    if fires(name) {
        eprintln!("failpoint {name} reached: killing the process");
        let killed = rustix::process::kill_process(rustix::process::getpid(), SIGNAL);
        // A process may always signal itself; should it fail, it still must not go on.
        eprintln!("failpoint {name} could not kill the process ({killed:?}): aborting");
        std::process::abort();
    }
}

/// [`hit`] for the failpoint `<worker>.<point>`, with nothing formatted unless failpoints are
/// armed.
pub fn hit_at(worker: &str, point: &str) {
    if ARMED.is_some() {
        hit(&format!("{worker}.{point}"));
    }
}

/// Whether the failpoint `<worker>.<point>` fires at this hit, for one that does not kill.
pub fn fires_at(worker: &str, point: &str) -> bool {
    ARMED.is_some() && fires(&format!("{worker}.{point}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_points_and_their_hit() {
        assert_eq!(
            parse("account.after_commit, coordinator.after_decision@3,,x@0"),
            vec![
                ("account.after_commit".to_owned(), 1),
                ("coordinator.after_decision".to_owned(), 3),
                ("x".to_owned(), 1)
            ]
        );
    }
}
