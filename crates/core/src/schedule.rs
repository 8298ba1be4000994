//! Cron schedules in a time zone: when a scheduled scaling window is open, and
//! (for what follows) when a schedule next fires.
//!
//! Parsing is `croner` (POSIX/Vixie cron: five fields, `1` is Monday, names like
//! `MON-FRI`, plus an optional leading seconds field) and the zone database is
//! `chrono-tz` (IANA names such as `Asia/Seoul`), both compiled in: nothing
//! here reads the system's zone files or clock. Time is milliseconds since the
//! Unix epoch, as everywhere in Shoal.

use crate::objects::Millis;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Where the check that a schedule fires at all starts: 2000-01-01 UTC.
const NEVER_FROM: Millis = 946_684_800_000;

/// A parsed cron expression and the zone its fields are read in.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: Tz,
}

impl CronSchedule {
    /// `expr` has five fields (minute hour day-of-month month day-of-week) or
    /// six with seconds first; `timezone` is an IANA zone name.
    pub fn parse(expr: &str, timezone: &str) -> Result<CronSchedule, String> {
        let tz: Tz = timezone.parse().map_err(|_| {
            format!(
                "unknown time zone {timezone:?}: use an IANA name such as \"UTC\" or \"Asia/Seoul\""
            )
        })?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| {
                format!("invalid cron expression {expr:?}: {e} (five fields: minute hour day-of-month month day-of-week, e.g. \"0 9 * * MON-FRI\", or six with seconds first)")
            })?;
        let schedule = CronSchedule { cron, tz };
        // A day no month has (30 February, 31 April) parses, and would never fire; a
        // schedule that fires at all does so within any span of years that holds a leap year.
        if schedule.next_after(NEVER_FROM).is_none() {
            return Err(format!(
                "cron expression {expr:?} never fires: no month has the day it names"
            ));
        }
        Ok(schedule)
    }

    /// The latest time at or before `now` the schedule fired.
    pub fn previous(&self, now: Millis) -> Option<Millis> {
        let t = self.at(now)?;
        self.cron
            .find_previous_occurrence(&t, true)
            .ok()
            .map(|d| d.timestamp_millis() as Millis)
    }

    /// The first time strictly after `now` the schedule fires.
    pub fn next_after(&self, now: Millis) -> Option<Millis> {
        let t = self.at(now)?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|d| d.timestamp_millis() as Millis)
    }

    /// "At 09:00 on Monday through Friday": for `describe` and `get`.
    pub fn describe(&self) -> String {
        self.cron.describe()
    }

    fn at(&self, ms: Millis) -> Option<DateTime<Tz>> {
        let utc = Utc.timestamp_millis_opt(i64::try_from(ms).ok()?).single()?;
        Some(utc.with_timezone(&self.tz))
    }
}

/// How a window that a schedule opens closes.
#[derive(Debug, Clone)]
pub enum WindowEnd {
    /// This long after it opened.
    After(Millis),
    /// At the next firing of this schedule after it opened.
    At(Box<CronSchedule>),
}

/// When the window `start` opens and `end` closes is open at `now`: the time
/// it opened and the time it closes, else `None`. Only the latest opening
/// counts, so a window that reopens before it would have closed simply runs on.
pub fn open_window(start: &CronSchedule, end: &WindowEnd, now: Millis) -> Option<(Millis, Millis)> {
    let opened = start.previous(now)?;
    let closes = match end {
        WindowEnd::After(d) => opened.saturating_add(*d),
        WindowEnd::At(e) => e.next_after(opened)?,
    };
    (now < closes).then_some((opened, closes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds of a UTC wall-clock time.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Millis {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis() as Millis
    }

    #[test]
    fn reads_fields_in_the_given_zone() {
        // 09:00 in Seoul (UTC+9, no DST) is 00:00 UTC.
        let s = CronSchedule::parse("0 9 * * MON-FRI", "Asia/Seoul").unwrap();
        // Monday 2026-11-30 10:00 Seoul = 01:00 UTC.
        let now = utc(2026, 11, 30, 1, 0, 0);
        assert_eq!(s.previous(now), Some(utc(2026, 11, 30, 0, 0, 0)));
        assert_eq!(s.next_after(now), Some(utc(2026, 12, 1, 0, 0, 0)));
        // Saturday: the last firing was Friday's.
        let sat = utc(2026, 12, 5, 3, 0, 0);
        assert_eq!(s.previous(sat), Some(utc(2026, 12, 4, 0, 0, 0)));
    }

    #[test]
    fn weekdays_are_posix_numbered() {
        // 1 is Monday, as in crontab(5).
        let s = CronSchedule::parse("0 0 * * 1", "UTC").unwrap();
        assert_eq!(
            s.next_after(utc(2026, 11, 28, 0, 0, 0)),
            Some(utc(2026, 11, 30, 0, 0, 0))
        );
    }

    /// Five fields, or six with seconds: a seventh (a year, which croner would take) is
    /// refused, and so is a day no month has, which would never fire. 29 February fires.
    #[test]
    fn a_year_field_or_a_day_that_never_comes_is_refused() {
        let e = CronSchedule::parse("0 0 0 * * * 2030", "UTC").unwrap_err();
        assert!(e.contains("5 or 6 fields"), "{e}");
        for never in ["0 0 30 2 *", "0 0 31 4,6 *"] {
            let e = CronSchedule::parse(never, "Europe/Berlin").unwrap_err();
            assert!(e.contains("never fires"), "{never}: {e}");
        }
        let leap = CronSchedule::parse("0 0 29 2 *", "UTC").unwrap();
        assert_eq!(
            leap.next_after(utc(2026, 12, 6, 0, 0, 0)),
            Some(utc(2028, 2, 29, 0, 0, 0))
        );
    }

    #[test]
    fn six_fields_take_seconds() {
        let s = CronSchedule::parse("*/10 * * * * *", "UTC").unwrap();
        let now = utc(2026, 11, 30, 12, 0, 3);
        assert_eq!(s.previous(now), Some(utc(2026, 11, 30, 12, 0, 0)));
        assert_eq!(s.next_after(now), Some(utc(2026, 11, 30, 12, 0, 10)));
    }

    #[test]
    fn daylight_saving_moves_the_utc_time() {
        // 09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer.
        let s = CronSchedule::parse("0 9 * * *", "America/New_York").unwrap();
        assert_eq!(
            s.next_after(utc(2026, 12, 1, 0, 0, 0)),
            Some(utc(2026, 12, 1, 14, 0, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 7, 1, 0, 0, 0)),
            Some(utc(2026, 7, 1, 13, 0, 0))
        );
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        let e = CronSchedule::parse("0 9 * *", "UTC").unwrap_err();
        assert!(e.contains("invalid cron expression"), "{e}");
        let e = CronSchedule::parse("61 * * * *", "UTC").unwrap_err();
        assert!(e.contains("invalid cron expression"), "{e}");
        let e = CronSchedule::parse("0 9 * * *", "Mars/Olympus").unwrap_err();
        assert!(e.contains("unknown time zone \"Mars/Olympus\""), "{e}");
    }

    #[test]
    fn windows_open_for_a_duration_or_until_an_end() {
        let start = CronSchedule::parse("0 9 * * *", "UTC").unwrap();
        let nine_hours = WindowEnd::After(9 * 3_600_000);
        let at = |h, m| utc(2026, 11, 30, h, m, 0);
        assert_eq!(open_window(&start, &nine_hours, at(8, 59)), None);
        assert_eq!(
            open_window(&start, &nine_hours, at(9, 0)),
            Some((at(9, 0), at(18, 0)))
        );
        assert_eq!(
            open_window(&start, &nine_hours, at(17, 59)),
            Some((at(9, 0), at(18, 0)))
        );
        assert_eq!(open_window(&start, &nine_hours, at(18, 0)), None);

        let end = WindowEnd::At(Box::new(CronSchedule::parse("30 12 * * *", "UTC").unwrap()));
        assert_eq!(
            open_window(&start, &end, at(12, 0)),
            Some((at(9, 0), at(12, 30)))
        );
        assert_eq!(open_window(&start, &end, at(13, 0)), None);
    }
}
