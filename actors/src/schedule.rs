//! Schedules, the pure part: parsing an agent's `schedule` entries (cron with an IANA zone, or a
//! fixed `every` period), finding slots, and deciding which slot (if any) is due given the
//! persisted cursor, the current time and the `catch_up` policy (SPEC section 7, Schedules).
//!
//! Like the breaker, nothing here reads a clock or touches the store: time is passed in as Unix
//! seconds, so the rules (slots strictly increase, `every` slots are multiples of the period,
//! catch-up fires at most one slot, nothing before first-seen fires) are property-tested directly.
//! The scheduler that sleeps and fires lives in the binary; the cursor lives in the store.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a schedule entry is unusable; shown to the operator prefixed with the agent and
/// `schedule[<index>]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression does not parse (or has the wrong number of fields).
    #[error("cron {expression:?} is not a valid five- or six-field cron expression: {reason}")]
    Cron {
        /// The expression as written.
        expression: String,
        /// What the parser said.
        reason: String,
    },
    /// The timezone is not an IANA zone name.
    #[error(
        "timezone {0:?} is not an IANA time zone name (for example \"Europe/Berlin\" or \"UTC\")"
    )]
    Zone(String),
    /// The `every` period does not parse or is not a whole, positive number of seconds.
    #[error("every {expression:?}: {reason}")]
    Every {
        /// The period as written.
        expression: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What to do with slots that passed while no server was running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Fire the most recent missed slot once.
    #[default]
    Latest,
    /// Skip every missed slot.
    None,
}

/// When an entry's slots fall.
#[derive(Debug, Clone)]
enum Rule {
    /// A cron expression evaluated in a time zone.
    Cron { cron: Box<Cron>, zone: Tz },
    /// Every `period` seconds, aligned to the Unix epoch.
    Every { period: u64 },
}

/// One parsed `schedule` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The expression as written (`"0 9 * * 1-5"`, `"5m"`): it is `source.schedule` of the tasks
    /// it creates and what `/admin/agents` shows.
    pub expression: String,
    /// The payload its tasks receive as `inputs`.
    pub inputs: Value,
    rule: Rule,
}

/// Earliest and latest slot this module deals in; far beyond any real schedule, and keeps every
/// conversion to `chrono` in range.
const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z

impl Entry {
    /// A cron entry: five fields (minute precision) or six (leading seconds field), evaluated in
    /// `timezone` (an IANA name; UTC when absent).
    pub fn cron(
        expression: &str,
        timezone: Option<&str>,
        inputs: Value,
    ) -> Result<Self, ScheduleError> {
        let fields = expression.split_whitespace().count();
        let nickname = expression.trim_start().starts_with('@');
        if !nickname && !(5..=6).contains(&fields) {
            return Err(ScheduleError::Cron {
                expression: expression.to_string(),
                reason: format!("it has {fields} fields"),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|e| ScheduleError::Cron {
                expression: expression.to_string(),
                reason: e.to_string(),
            })?;
        let zone = match timezone {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| ScheduleError::Zone(name.to_string()))?,
        };
        let entry = Self {
            expression: expression.to_string(),
            inputs,
            rule: Rule::Cron {
                cron: Box::new(cron),
                zone,
            },
        };
        // An expression like "0 0 30 2 *" parses but names no real date; say so at start-up
        // rather than schedule nothing in silence.
        if entry.next_after(0).is_none() {
            return Err(ScheduleError::Cron {
                expression: expression.to_string(),
                reason: "it matches no date".into(),
            });
        }
        Ok(entry)
    }

    /// A fixed-period entry (`"30s"`, `"5m"`, `"1h"`): whole seconds, at least one.
    pub fn every(expression: &str, inputs: Value) -> Result<Self, ScheduleError> {
        let bad = |reason: String| ScheduleError::Every {
            expression: expression.to_string(),
            reason,
        };
        let period = humantime::parse_duration(expression).map_err(|e| bad(e.to_string()))?;
        if period.subsec_nanos() != 0 || period.as_secs() == 0 {
            return Err(bad(
                "the period must be a whole number of seconds, at least 1s".into(),
            ));
        }
        Ok(Self {
            expression: expression.to_string(),
            inputs,
            rule: Rule::Every {
                period: period.as_secs(),
            },
        })
    }

    /// What identifies this entry's slots: the expression plus, for cron, the zone. A cursor
    /// stored under another fingerprint belongs to an earlier version of the entry.
    pub fn fingerprint(&self) -> String {
        match &self.rule {
            Rule::Cron { zone, .. } => format!("cron {} @ {}", self.expression, zone.name()),
            Rule::Every { period } => format!("every {period}s"),
        }
    }

    /// The first slot strictly after `t` (Unix seconds), or `None` if the entry never fires again.
    pub fn next_after(&self, t: u64) -> Option<u64> {
        if t >= MAX_SECS {
            return None;
        }
        match &self.rule {
            Rule::Every { period } => {
                let next = (t / period + 1).checked_mul(*period)?;
                (next <= MAX_SECS).then_some(next)
            }
            Rule::Cron { cron, zone } => {
                let start = zone.from_utc_datetime(&utc(t)?.naive_utc());
                let next = cron.find_next_occurrence(&start, false).ok()?;
                let secs = u64::try_from(next.timestamp()).ok()?;
                // Guard against a parser answer that does not move forward.
                (secs > t && secs <= MAX_SECS).then_some(secs)
            }
        }
    }

    /// The latest slot at or before `t`, or `None` if there is none.
    pub fn latest_at_or_before(&self, t: u64) -> Option<u64> {
        let t = t.min(MAX_SECS);
        match &self.rule {
            Rule::Every { period } => Some(t / period * period),
            Rule::Cron { cron, zone } => {
                let start = zone.from_utc_datetime(&utc(t)?.naive_utc());
                let prev = cron.find_previous_occurrence(&start, true).ok()?;
                let secs = u64::try_from(prev.timestamp()).ok()?;
                (secs <= t).then_some(secs)
            }
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

fn utc(t: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(i64::try_from(t).ok()?, 0)
}

/// What the scheduler should do now for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The slot to fire now, if any.
    pub fire: Option<u64>,
    /// Whether due slots were passed over (missed during downtime or while the scheduler was
    /// late), not counting the one fired.
    pub passed_over: bool,
    /// The new cursor: every slot at or before it has been dealt with.
    pub considered: u64,
    /// The next slot to wake up for, if the entry fires again.
    pub next: Option<u64>,
}

/// Decides what is due for `entry` at `now`, given that every slot at or before `considered`
/// has already been dealt with (fired or skipped; `considered` starts at the time the entry was
/// first seen, so earlier slots never fire). Slots in `(considered, now]` are due: with
/// [`CatchUp::Latest`] the latest of them fires, once; with [`CatchUp::None`] none does. Either
/// way the cursor moves to that latest slot.
pub fn plan(entry: &Entry, considered: u64, now: u64, catch_up: CatchUp) -> Plan {
    let first_due = entry.next_after(considered).filter(|s| *s <= now);
    let Some(first_due) = first_due else {
        return Plan {
            fire: None,
            passed_over: false,
            considered,
            next: entry.next_after(considered.max(now)),
        };
    };
    let latest = entry
        .latest_at_or_before(now)
        .filter(|s| *s >= first_due)
        .unwrap_or(first_due);
    let fire = match catch_up {
        CatchUp::Latest => Some(latest),
        CatchUp::None => None,
    };
    Plan {
        fire,
        passed_over: latest != first_due || fire.is_none(),
        considered: latest,
        next: entry.next_after(latest.max(now)),
    }
}

/// The idempotency key of a slot (SPEC section 7): the same slot can never make two tasks, even
/// if its cursor advance was lost in a crash.
pub fn idempotency_key(index: usize, slot: u64) -> String {
    format!("schedule:{index}:{slot}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn every(s: &str) -> Entry {
        Entry::every(s, json!({})).unwrap()
    }

    fn cron(s: &str, tz: Option<&str>) -> Entry {
        Entry::cron(s, tz, json!({})).unwrap()
    }

    // 2026-01-05T00:00:00Z is a Monday.
    const MONDAY: u64 = 1_767_571_200;

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let e = every("5m");
        assert_eq!(e.next_after(0), Some(300));
        assert_eq!(e.next_after(299), Some(300));
        assert_eq!(e.next_after(300), Some(600));
        assert_eq!(e.latest_at_or_before(599), Some(300));
        assert_eq!(e.latest_at_or_before(600), Some(600));
    }

    #[test]
    fn five_and_six_field_cron_and_zones() {
        let weekdays = cron("0 9 * * 1-5", Some("Europe/Berlin"));
        // Monday 09:00 in Berlin (UTC+1 in January) is 08:00 UTC.
        assert_eq!(weekdays.next_after(MONDAY), Some(MONDAY + 8 * 3600));
        // Friday 09:00 is followed by Monday 09:00.
        let friday = MONDAY + 4 * 86_400 + 8 * 3600;
        assert_eq!(weekdays.next_after(friday), Some(friday + 3 * 86_400));
        let seconds = cron("*/10 * * * * *", None);
        assert_eq!(seconds.next_after(MONDAY + 1), Some(MONDAY + 10));
        assert_eq!(seconds.latest_at_or_before(MONDAY + 19), Some(MONDAY + 10));
        assert_eq!(seconds.fingerprint(), "cron */10 * * * * * @ UTC");
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        assert!(matches!(
            Entry::cron("61 * * * *", None, json!({})),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Entry::cron("0 0 30 2 *", None, json!({})),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(Entry::cron("0 0 29 2 *", None, json!({})).is_ok());
        assert!(matches!(
            Entry::cron("* * * *", None, json!({})),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Entry::cron("* * * * * * 2030", None, json!({})),
            Err(ScheduleError::Cron { .. })
        ));
        assert_eq!(
            Entry::cron("* * * * *", Some("Mars/Olympus"), json!({})).unwrap_err(),
            ScheduleError::Zone("Mars/Olympus".into())
        );
        assert!(Entry::every("soon", json!({})).is_err());
        assert!(Entry::every("0s", json!({})).is_err());
        assert!(Entry::every("1500ms", json!({})).is_err());
    }

    #[test]
    fn plan_fires_on_time_and_catches_up_once() {
        let e = every("10s");
        // Nothing due yet.
        let p = plan(&e, 100, 105, CatchUp::Latest);
        assert_eq!((p.fire, p.considered, p.next), (None, 100, Some(110)));
        // On time.
        let p = plan(&e, 100, 110, CatchUp::Latest);
        assert_eq!((p.fire, p.considered, p.next), (Some(110), 110, Some(120)));
        assert!(!p.passed_over);
        // After downtime: only the latest missed slot.
        let p = plan(&e, 100, 1_005, CatchUp::Latest);
        assert_eq!(
            (p.fire, p.considered, p.next),
            (Some(1_000), 1_000, Some(1_010))
        );
        assert!(p.passed_over);
        let p = plan(&e, 100, 1_005, CatchUp::None);
        assert_eq!((p.fire, p.considered, p.next), (None, 1_000, Some(1_010)));
    }

    proptest! {
        #[test]
        fn slots_strictly_increase(t in 0u64..4_000_000_000, period in 1u64..100_000) {
            let e = Entry::every(&format!("{period}s"), json!({})).unwrap();
            let a = e.next_after(t).unwrap();
            let b = e.next_after(a).unwrap();
            prop_assert!(t < a && a < b);
            prop_assert_eq!(a % period, 0);
            prop_assert_eq!(b - a, period);
            prop_assert!(e.latest_at_or_before(t).unwrap() <= t);
            prop_assert_eq!(e.latest_at_or_before(a), Some(a));
        }

        #[test]
        fn cron_slots_strictly_increase(t in 1_600_000_000u64..2_000_000_000, which in 0usize..4) {
            let (expr, tz) = [
                ("*/7 * * * * *", None),
                ("0 9 * * 1-5", Some("Europe/Berlin")),
                ("30 2 * * *", Some("America/New_York")),
                ("0 0 1 * *", Some("Asia/Kolkata")),
            ][which];
            let e = cron(expr, tz);
            let a = e.next_after(t).unwrap();
            let b = e.next_after(a).unwrap();
            prop_assert!(t < a && a < b);
            let prev = e.latest_at_or_before(a).unwrap();
            prop_assert_eq!(prev, a);
            prop_assert!(e.latest_at_or_before(a - 1).unwrap() < a);
        }

        #[test]
        fn catch_up_fires_at_most_one_slot_and_never_before_first_seen(
            first_seen in 0u64..1_000_000,
            steps in proptest::collection::vec(0u64..5_000, 1..20),
            period in 1u64..600,
            latest in any::<bool>(),
        ) {
            let e = Entry::every(&format!("{period}s"), json!({})).unwrap();
            let mode = if latest { CatchUp::Latest } else { CatchUp::None };
            let mut considered = first_seen;
            let mut now = first_seen;
            let mut fired = Vec::new();
            for step in steps {
                now += step;
                let p = plan(&e, considered, now, mode);
                prop_assert!(p.considered >= considered && p.considered <= now);
                if let Some(slot) = p.fire {
                    prop_assert!(slot > first_seen && slot > considered && slot <= now);
                    prop_assert_eq!(slot % period, 0);
                    fired.push(slot);
                }
                if let Some(next) = p.next {
                    prop_assert!(next > now);
                }
                considered = p.considered;
                // Calling again at the same time never fires a second slot.
                let again = plan(&e, considered, now, mode);
                prop_assert_eq!(again.fire, None);
            }
            prop_assert!(fired.windows(2).all(|w| w[0] < w[1]));
            if !latest {
                prop_assert!(fired.is_empty());
            }
        }
    }
}
