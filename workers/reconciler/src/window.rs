//! Days as cut in a time zone, and when the daily run is due.

use std::collections::BTreeSet;

use chrono::{DateTime, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// One day in a time zone: `[start, end)` in UTC. Not always 24 hours: a day with a daylight
/// saving change has 23 or 25.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub date: NaiveDate,
    pub time_zone: Tz,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    pub fn of(date: NaiveDate, time_zone: Tz) -> Window {
        let next = date.checked_add_days(Days::new(1)).unwrap_or(date);
        Window {
            date,
            time_zone,
            start: local_instant(date.and_time(NaiveTime::MIN), time_zone),
            end: local_instant(next.and_time(NaiveTime::MIN), time_zone),
        }
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// The instant a local time names. A time that occurs twice (clocks going back) is its first
/// occurrence; one that does not occur (clocks going forward; in some zones midnight itself) is
/// the first local time after the gap.
fn local_instant(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let mut t = local;
    // Gaps are at most a few hours; minutes step through any of them.
    for _ in 0..(24 * 60) {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) | LocalResult::Ambiguous(x, _) => return x.with_timezone(&Utc),
            LocalResult::None => t += chrono::TimeDelta::minutes(1),
        }
    }
    // Not reached for any real zone; fall back to reading the time as UTC.
    local.and_utc()
}

/// The date it is at `now` in `tz`.
pub fn today(tz: Tz, now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&tz).date_naive()
}

/// When the daily run is next due after `now` (at `at`, local time in `tz`), and the day it
/// reconciles then: the day before.
pub fn next_run(now: DateTime<Utc>, tz: Tz, at: NaiveTime) -> (DateTime<Utc>, NaiveDate) {
    let mut date = today(tz, now);
    loop {
        let due = local_instant(date.and_time(at), tz);
        if due > now {
            let day = date.checked_sub_days(Days::new(1)).unwrap_or(date);
            return (due, day);
        }
        date = date.checked_add_days(Days::new(1)).unwrap_or(date);
    }
}

/// How many days back a reconciler looks for days to catch up on; earlier ones are left to
/// `twophase reconcile --date`.
pub const MAX_CATCH_UP: u64 = 31;

/// The day whose run was last due at `now`, if any: the one before [`next_run`]'s.
pub fn last_due(now: DateTime<Utc>, tz: Tz, at: NaiveTime) -> Option<NaiveDate> {
    let (_, next) = next_run(now, tz, at);
    next.checked_sub_days(Days::new(1))
}

/// The first day a reconciler starting at `now` looks at for days to catch up on.
pub fn catch_up_from(now: DateTime<Utc>, tz: Tz, at: NaiveTime) -> Option<NaiveDate> {
    last_due(now, tz, at)?.checked_sub_days(Days::new(MAX_CATCH_UP - 1))
}

/// The days a reconciler starting at `now` has to catch up on, oldest first: of the last
/// [`MAX_CATCH_UP`] up to the one whose run was last due, those without a verdict on the whole
/// day (`verdicts`), but none before the oldest stored report (`first`). With no report at all,
/// none: nothing says that a run was missed. The flag says that the oldest of the days looked
/// at is among them, and that stored reports go back further: earlier days may lack one too.
pub fn missed_days(
    now: DateTime<Utc>,
    tz: Tz,
    at: NaiveTime,
    first: Option<NaiveDate>,
    verdicts: &BTreeSet<NaiveDate>,
) -> (Vec<NaiveDate>, bool) {
    let (Some(first), Some(last_due), Some(from)) =
        (first, last_due(now, tz, at), catch_up_from(now, tz, at))
    else {
        return (Vec::new(), false);
    };
    let start = from.max(first);
    let days: Vec<NaiveDate> = start
        .iter_days()
        .take_while(|day| *day <= last_due)
        .filter(|day| !verdicts.contains(day))
        .collect();
    let earlier = first < from && days.first() == Some(&from);
    (days, earlier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn a_restart_catches_up_on_the_days_without_a_verdict() {
        let at = NaiveTime::from_hms_opt(2, 0, 0).unwrap();
        let after_the_run = utc("2026-11-25T03:00:00Z");
        let before_the_run = utc("2026-11-25T01:00:00Z");
        let days = |list: &[&str]| list.iter().map(|d| date(d)).collect::<Vec<_>>();
        let missed = |now, first: Option<&str>, verdicts: &[&str]| {
            let verdicts = days(verdicts).into_iter().collect();
            missed_days(now, Tz::UTC, at, first.map(date), &verdicts)
        };
        // The run for the 24th was due at 02:00 on the 25th.
        assert_eq!(
            missed(
                after_the_run,
                Some("2026-11-20"),
                &["2026-11-20", "2026-11-22"]
            ),
            (days(&["2026-11-21", "2026-11-23", "2026-11-24"]), false)
        );
        let all = [
            "2026-11-20",
            "2026-11-21",
            "2026-11-22",
            "2026-11-23",
            "2026-11-24",
        ];
        assert_eq!(
            missed(after_the_run, Some("2026-11-20"), &all),
            (vec![], false)
        );
        // Before 02:00 the 24th is not due yet.
        assert_eq!(
            missed(before_the_run, Some("2026-11-20"), &all[..3]),
            (days(&["2026-11-23"]), false)
        );
        // A report of a later day (a run by hand) leaves the days before it to catch up on.
        assert_eq!(
            missed(before_the_run, Some("2026-11-24"), &["2026-11-24"]),
            (vec![], false)
        );
        // With no report at all, nothing was missed.
        assert_eq!(missed(after_the_run, None, &[]), (vec![], false));
        // Down for a hundred days: the latest 31, and earlier days may lack a report too.
        let (caught_up, earlier) = missed(after_the_run, Some("2026-08-16"), &["2026-08-16"]);
        assert_eq!(caught_up.len() as u64, MAX_CATCH_UP);
        assert_eq!(caught_up.first(), Some(&date("2026-10-25")));
        assert_eq!(caught_up.last(), Some(&date("2026-11-24")));
        assert!(earlier);
        // Stored reports that go back further, with the days looked at all judged: nothing more.
        let (caught_up, earlier) = missed(after_the_run, Some("2026-08-16"), &["2026-10-25"]);
        assert_eq!(caught_up.first(), Some(&date("2026-10-26")));
        assert!(!earlier);
    }

    #[test]
    fn a_day_is_cut_at_local_midnight() {
        let w = Window::of(date("2026-11-23"), chrono_tz::Europe::Berlin);
        assert_eq!(w.start, utc("2026-11-22T23:00:00Z"));
        assert_eq!(w.end, utc("2026-11-23T23:00:00Z"));
        assert!(w.contains(utc("2026-11-23T22:59:59.999Z")));
        assert!(!w.contains(w.end));
        let w = Window::of(date("2026-11-23"), Tz::UTC);
        assert_eq!(
            (w.start, w.end),
            (utc("2026-11-23T00:00:00Z"), utc("2026-11-24T00:00:00Z"))
        );
    }

    #[test]
    fn daylight_saving_days_have_23_or_25_hours() {
        let spring = Window::of(date("2026-03-29"), chrono_tz::Europe::Berlin);
        assert_eq!((spring.end - spring.start).num_hours(), 23);
        let autumn = Window::of(date("2026-10-25"), chrono_tz::Europe::Berlin);
        assert_eq!((autumn.end - autumn.start).num_hours(), 25);
        // Santiago skips midnight itself in September: the day starts at 01:00 local.
        let skipped = Window::of(date("2026-09-06"), chrono_tz::America::Santiago);
        assert_eq!(skipped.start, utc("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn the_daily_run_reconciles_the_day_before() {
        let at = NaiveTime::from_hms_opt(2, 0, 0).unwrap();
        let (due, day) = next_run(utc("2026-11-23T01:59:00Z"), Tz::UTC, at);
        assert_eq!(
            (due, day),
            (utc("2026-11-23T02:00:00Z"), date("2026-11-22"))
        );
        let (due, day) = next_run(utc("2026-11-23T02:00:00Z"), Tz::UTC, at);
        assert_eq!(
            (due, day),
            (utc("2026-11-24T02:00:00Z"), date("2026-11-23"))
        );
        let (due, day) = next_run(utc("2026-11-23T12:00:00Z"), chrono_tz::Asia::Tokyo, at);
        assert_eq!(
            (due, day),
            (utc("2026-11-23T17:00:00Z"), date("2026-11-23"))
        );
        // 02:30 does not exist in Berlin on 29 March 2026: the run is at 03:00 local.
        let half_past = NaiveTime::from_hms_opt(2, 30, 0).unwrap();
        let (due, _) = next_run(
            utc("2026-03-28T12:00:00Z"),
            chrono_tz::Europe::Berlin,
            half_past,
        );
        assert_eq!(due, utc("2026-03-29T01:00:00Z"));
    }
}
