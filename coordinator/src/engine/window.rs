//! Maintenance windows: the times of the week, in UTC, when a pool's upgrade may start a
//! domain (e.g. "Sat 01:00-05:00 UTC", "Mon-Fri 22:00-02:00 UTC", "daily 03:00-04:00 UTC").
//! Pure: the caller gives the time.

use serde::{Deserialize, Serialize};
use std::fmt;

const DAY_MIN: u32 = 24 * 60;
const WEEK_MIN: u32 = 7 * DAY_MIN;
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One weekly window: on each of `days` (bit 0 Monday .. bit 6 Sunday), from `start` to `end`
/// minutes after midnight UTC; an `end` not after `start` runs into the next day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub days: u8,
    pub start: u16,
    pub end: u16,
}

/// The minute of the week (0 = Monday 00:00 UTC) at unix time `ms`.
fn minute_of_week(ms: u64) -> u32 {
    let minutes = ms / 60_000;
    // 1970-01-01 was a Thursday: day 3 of a Monday-first week.
    let week = u64::from(WEEK_MIN);
    u32::try_from((minutes + 3 * u64::from(DAY_MIN)) % week).unwrap_or(0)
}

impl Window {
    /// The window's spans as [start, end) minutes of the week (an end past the week's end wraps).
    fn spans(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let (start, end) = (u32::from(self.start), u32::from(self.end));
        let len = if end > start {
            end - start
        } else {
            DAY_MIN - start + end
        };
        (0..7u32)
            .filter(move |d| self.days & (1 << d) != 0)
            .map(move |d| (d * DAY_MIN + start, d * DAY_MIN + start + len))
    }

    /// Minutes from minute-of-week `now` until this window is open (0: open now).
    fn minutes_until_open(&self, now: u32) -> u32 {
        let mut best = u32::MAX;
        for (s, e) in self.spans() {
            // A span that runs past the end of the week (Sunday night) also covers the first
            // minutes of the next one.
            if (s <= now && now < e) || (s <= now + WEEK_MIN && now + WEEK_MIN < e) {
                return 0;
            }
            best = best.min((s + WEEK_MIN - now) % WEEK_MIN);
        }
        best
    }
}

/// Milliseconds from unix time `now_ms` until one of `windows` is open: 0 when one is open now
/// (or there are none: no windows means always).
pub fn ms_until_open(windows: &[Window], now_ms: u64) -> u64 {
    if windows.is_empty() {
        return 0;
    }
    let now = minute_of_week(now_ms);
    let minutes = windows
        .iter()
        .map(|w| w.minutes_until_open(now))
        .min()
        .unwrap_or(0);
    if minutes == 0 {
        return 0;
    }
    // To the start of that minute.
    u64::from(minutes) * 60_000 - now_ms % 60_000
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = (0..7)
            .filter(|d| self.days & (1 << d) != 0)
            .filter_map(|d| DAYS.get(d).copied())
            .collect();
        let days = if self.days == 0x7f {
            "daily".to_owned()
        } else {
            days.join(",")
        };
        write!(
            f,
            "{days} {:02}:{:02}-{:02}:{:02} UTC",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

fn parse_day(s: &str) -> Option<u32> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .and_then(|i| u32::try_from(i).ok())
}

fn parse_time(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl std::str::FromStr for Window {
    type Err = String;

    /// `<days> HH:MM-HH:MM UTC`, days being `daily`, a day (`Sat`), a range (`Mon-Fri`) or a
    /// list (`Sat,Sun`). The time zone is spelled out so that nobody reads it as local time.
    fn from_str(text: &str) -> Result<Window, String> {
        let bad = |why: &str| {
            format!("maintenance window {text:?}: {why} (write e.g. \"Sat 01:00-05:00 UTC\", \"Mon-Fri 22:00-02:00 UTC\" or \"daily 03:00-04:00 UTC\")")
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [days, times, zone] = parts.as_slice() else {
            return Err(bad("three parts expected: days, times, UTC"));
        };
        if *zone != "UTC" {
            return Err(bad("times are UTC and must say so"));
        }
        let mut mask = 0u8;
        if days.eq_ignore_ascii_case("daily") {
            mask = 0x7f;
        } else {
            for part in days.split(',') {
                let (a, b) = match part.split_once('-') {
                    Some((a, b)) => (a, b),
                    None => (part, part),
                };
                let (a, b) = (
                    parse_day(a).ok_or_else(|| bad(&format!("unknown day {a:?}")))?,
                    parse_day(b).ok_or_else(|| bad(&format!("unknown day {b:?}")))?,
                );
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
        let (start, end) = times
            .split_once('-')
            .ok_or_else(|| bad("times are HH:MM-HH:MM"))?;
        let start = parse_time(start).ok_or_else(|| bad("times are HH:MM-HH:MM"))?;
        let end = parse_time(end).ok_or_else(|| bad("times are HH:MM-HH:MM"))?;
        if start == end {
            return Err(bad("the window is empty"));
        }
        Ok(Window {
            days: mask,
            start,
            end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a UTC day of the week and time in the week of Monday 2026-11-23.
    fn at(day: u32, h: u64, m: u64) -> u64 {
        // 2026-11-23 00:00 UTC, a Monday.
        let monday = 1_795_392_000_000u64;
        monday + u64::from(day) * 86_400_000 + h * 3_600_000 + m * 60_000
    }

    #[test]
    fn the_week_starts_on_monday_in_utc() {
        assert_eq!(minute_of_week(at(0, 0, 0)), 0);
        assert_eq!(minute_of_week(at(5, 1, 30)), 5 * DAY_MIN + 90);
        assert_eq!(minute_of_week(0), 3 * DAY_MIN, "1970-01-01 was a Thursday");
    }

    #[test]
    fn windows_parse_print_and_refuse_nonsense() {
        let w: Window = "Sat 01:00-05:00 UTC".parse().expect("valid");
        assert_eq!(w.to_string(), "Sat 01:00-05:00 UTC");
        let w: Window = "mon-fri 22:00-02:00 UTC".parse().expect("valid");
        assert_eq!(w.days, 0b0011111);
        let w: Window = "Sat-Mon 00:00-01:00 UTC".parse().expect("valid");
        assert_eq!(w.days, 0b1100001);
        assert_eq!(
            "daily 03:00-04:00 UTC".parse::<Window>().map(|w| w.days),
            Ok(0x7f)
        );
        for bad in [
            "Sat 01:00-05:00",
            "Sat 01:00-05:00 CET",
            "Caturday 01:00-05:00 UTC",
            "Sat 1:00-5:00 UTC",
            "Sat 24:00-05:00 UTC",
            "Sat 01:00-01:00 UTC",
            "Sat 01:00 UTC",
            "",
        ] {
            let e = bad.parse::<Window>().expect_err(bad);
            assert!(e.contains("maintenance window"), "{e}");
        }
    }

    #[test]
    fn open_now_or_how_long_until_it_opens() {
        let sat: Window = "Sat 01:00-05:00 UTC".parse().expect("valid");
        assert_eq!(ms_until_open(&[sat], at(5, 1, 0)), 0);
        assert_eq!(ms_until_open(&[sat], at(5, 4, 59)), 0);
        assert_eq!(
            ms_until_open(&[sat], at(5, 5, 0)),
            7 * 86_400_000 - 4 * 3_600_000
        );
        assert_eq!(ms_until_open(&[sat], at(5, 0, 30)), 30 * 60_000);
        assert_eq!(ms_until_open(&[sat], at(0, 1, 0)), 5 * 86_400_000);
        assert_eq!(
            ms_until_open(&[sat], at(5, 0, 30) + 15_000),
            30 * 60_000 - 15_000
        );
        // Across midnight, and across the end of the week (Sunday night into Monday).
        let night: Window = "Sun 22:00-02:00 UTC".parse().expect("valid");
        assert_eq!(ms_until_open(&[night], at(6, 23, 0)), 0);
        assert_eq!(
            ms_until_open(&[night], at(0, 1, 59)),
            0,
            "Monday 01:59 is still Sunday's"
        );
        assert_eq!(
            ms_until_open(&[night], at(0, 2, 0)),
            6 * 86_400_000 + 20 * 3_600_000
        );
        // The soonest of several; none means always.
        let daily: Window = "daily 03:00-04:00 UTC".parse().expect("valid");
        assert_eq!(ms_until_open(&[sat, daily], at(2, 2, 0)), 3_600_000);
        assert_eq!(ms_until_open(&[], at(2, 2, 0)), 0);
    }
}
