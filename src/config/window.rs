//! Maintenance windows for the automatic cutover: `Sun 02:00-04:00 UTC`,
//! `Sat,Sun 23:00-01:00 +02:00`, `Mon-Fri 03:00-03:30 UTC`, `daily 02:00-03:00 UTC`.
//! A window whose end is before its start runs past midnight into the next day.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};
use thiserror::Error;

/// A window's text that does not parse, with what is wrong and an example.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct WindowError(String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Monday = 0 … Sunday = 6: the day the window starts on.
    days: [bool; 7],
    start_min: u32,
    end_min: u32,
    /// Offset of the window's clock from UTC, in minutes.
    offset_min: i32,
    text: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<usize, WindowError> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let l = s.to_ascii_lowercase();
    DAYS.iter()
        .zip(FULL)
        .position(|(short, full)| l == *short || l == full)
        .ok_or_else(|| {
            WindowError(format!(
                "`{s}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun, daily)"
            ))
        })
}

fn hhmm(s: &str) -> Result<u32, WindowError> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| WindowError(format!("`{s}` is not a time (HH:MM)")))?;
    let h: u32 = h
        .parse()
        .map_err(|_| WindowError(format!("`{s}` is not a time (HH:MM)")))?;
    let m: u32 = m
        .parse()
        .map_err(|_| WindowError(format!("`{s}` is not a time (HH:MM)")))?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(WindowError(format!("`{s}` is not a time of day")));
    }
    Ok(h * 60 + m)
}

fn offset(s: &str) -> Result<i32, WindowError> {
    let u = s.to_ascii_uppercase();
    if u == "UTC" || u == "Z" || u == "GMT" {
        return Ok(0);
    }
    let sign = match u.chars().next() {
        Some('+') => 1,
        Some('-') => -1,
        _ => {
            return Err(WindowError(format!(
                "`{s}`: time zone must be UTC or a fixed offset like +02:00 (named zones are not supported)"
            )));
        }
    };
    let digits: String = u[1..].chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() != 4 && digits.len() != 2 {
        return Err(WindowError(format!("`{s}` is not an offset like +02:00")));
    }
    let h: i32 = digits[..2]
        .parse()
        .map_err(|_| WindowError(format!("`{s}` is not an offset")))?;
    let m: i32 = if digits.len() == 4 {
        digits[2..]
            .parse()
            .map_err(|_| WindowError(format!("`{s}` is not an offset")))?
    } else {
        0
    };
    if h > 14 || m > 59 {
        return Err(WindowError(format!("`{s}` is not a valid offset")));
    }
    Ok(sign * (h * 60 + m))
}

impl Window {
    pub fn parse(text: &str) -> Result<Window, WindowError> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_part, range, tz) = match parts.as_slice() {
            [d, r, tz] => (Some(*d), *r, *tz),
            [d, r] if r.contains('-') && d.contains(':') => (None, *d, *r),
            [d, r] => (Some(*d), *r, "UTC"),
            [r] => (None, *r, "UTC"),
            _ => {
                return Err(WindowError(format!(
                    "`{text}` is not a window (example: \"Sun 02:00-04:00 UTC\")"
                )));
            }
        };
        let mut days = [false; 7];
        match days_part.map(|d| d.to_ascii_lowercase()) {
            None => days = [true; 7],
            Some(d) if d == "daily" || d == "*" => days = [true; 7],
            Some(d) => {
                for item in d.split(',') {
                    if let Some((a, b)) = item.split_once('-') {
                        let (a, b) = (day(a)?, day(b)?);
                        let mut i = a;
                        loop {
                            days[i] = true;
                            if i == b {
                                break;
                            }
                            i = (i + 1) % 7;
                        }
                    } else {
                        days[day(item)?] = true;
                    }
                }
            }
        }
        let (s, e) = range
            .split_once('-')
            .ok_or_else(|| WindowError(format!("`{range}` is not a time range (HH:MM-HH:MM)")))?;
        let (start_min, end_min) = (hhmm(s)?, hhmm(e)?);
        if start_min == end_min {
            return Err(WindowError(format!(
                "`{range}`: a window must not be empty"
            )));
        }
        Ok(Window {
            days,
            start_min,
            end_min,
            offset_min: offset(tz)?,
            text: text.to_string(),
        })
    }

    /// Is `t` inside the window?
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let local = t + Duration::minutes(self.offset_min as i64);
        let wd = local.weekday().num_days_from_monday() as usize;
        let m = local.hour() * 60 + local.minute();
        if self.start_min < self.end_min {
            self.days[wd] && m >= self.start_min && m < self.end_min
        } else {
            // Past midnight: the evening part belongs to today's window, the
            // morning part to yesterday's.
            (self.days[wd] && m >= self.start_min) || (self.days[(wd + 6) % 7] && m < self.end_min)
        }
    }
}

/// Parses every configured window, naming the bad one.
pub(crate) fn parse_all(list: &[String]) -> Result<Vec<Window>, WindowError> {
    list.iter().map(|w| Window::parse(w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn sunday_window() {
        let w = Window::parse("Sun 02:00-04:00 UTC").unwrap();
        // 2026-11-22 is a Sunday.
        assert!(w.contains(at(2026, 11, 22, 2, 0)));
        assert!(w.contains(at(2026, 11, 22, 3, 59)));
        assert!(!w.contains(at(2026, 11, 22, 4, 0)));
        assert!(!w.contains(at(2026, 11, 21, 2, 30)));
    }

    #[test]
    fn past_midnight_and_offsets() {
        let w = Window::parse("Sat 23:00-01:00 +02:00").unwrap();
        // Sat 23:30 at +02:00 is Sat 21:30 UTC.
        assert!(w.contains(at(2026, 11, 21, 21, 30)));
        // Sun 00:30 at +02:00 is Sat 22:30 UTC.
        assert!(w.contains(at(2026, 11, 21, 22, 30)));
        assert!(!w.contains(at(2026, 11, 21, 23, 30)));
        let d = Window::parse("daily 00:00-24:00 UTC").unwrap();
        assert!(d.contains(at(2026, 1, 1, 12, 0)));
        let r = Window::parse("Mon-Fri 03:00-03:30").unwrap();
        assert!(Window::parse("Sunday 02:00-03:00 UTC").is_ok());
        assert!(r.contains(at(2026, 11, 20, 3, 10)));
        assert!(!r.contains(at(2026, 11, 21, 3, 10)));
    }

    #[test]
    fn bad_windows() {
        for bad in [
            "",
            "Sun",
            "Sun 02:00 UTC",
            "Xyz 02:00-03:00 UTC",
            "Sun 25:00-26:00 UTC",
            "Sun 02:00-02:00 UTC",
            "Sun 02:00-03:00 Europe/Berlin",
            "Sunxyz 02:00-03:00 UTC",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }
}
