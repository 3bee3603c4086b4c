//! Days as cut in a time zone, and when the daily run is due.

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
