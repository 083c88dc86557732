//! Per-agent tick history for the operator page: ticks, failures and tick durations counted per
//! second over the last few minutes, in memory only.
//!
//! Each agent has a fixed ring of [`WINDOW_SECS`] one-second slots indexed by `second % WINDOW`;
//! a slot remembers which second it counts, so a stale slot reads as zero without any sweeping.
//! Memory is bounded by the number of configured agents, whatever the tick rate. The history is
//! lost on restart on purpose: it is a view of "now", and the durable record is the task store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Context, Handler};
use serde::Serialize;
use tickgate_actors::agent::TickOutcome;
use tickgate_actors::model::{now_ms, AgentId};

/// Seconds of history kept (and shown) per agent.
pub const WINDOW_SECS: u64 = 180;

/// One second of one agent's ticks.
#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// The Unix second this slot counts; a slot of another second counts nothing now.
    second: u64,
    ticks: u32,
    failures: u32,
    total_ms: f64,
    max_ms: f64,
}

/// One agent's ring and its latest tick.
#[derive(Debug)]
struct Ring {
    slots: Vec<Slot>,
    last_tick_at: Option<u64>,
    last_tick_ms: Option<f64>,
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            slots: vec![Slot::default(); WINDOW_SECS as usize],
            last_tick_at: None,
            last_tick_ms: None,
        }
    }
}

/// An agent's history as the admin API shows it: arrays oldest first, one entry per second,
/// the last one being the current (still counting) second.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct History {
    /// The Unix second of the first entry.
    pub start: u64,
    /// Ticks finished in each second.
    pub ticks: Vec<u32>,
    /// Of those, ticks whose task did not end in SUCCESS.
    pub failures: Vec<u32>,
    /// Mean tick duration in that second, milliseconds (0 when nothing ticked).
    pub avg_ms: Vec<f64>,
    /// Longest tick in that second, milliseconds.
    pub max_ms: Vec<f64>,
    /// When the agent's latest tick finished (Unix milliseconds), since this process started.
    pub last_tick_at: Option<u64>,
    /// How long that tick took, milliseconds.
    pub last_tick_ms: Option<f64>,
}

/// Every agent's recent ticks. Shared by the recorder actor (writer) and the admin routes.
#[derive(Debug, Default)]
pub struct TickStats {
    agents: Mutex<HashMap<AgentId, Ring>>,
}

impl TickStats {
    /// Counts one finished tick at `at_ms` (Unix milliseconds).
    pub fn record(&self, agent: &AgentId, success: bool, duration: Duration, at_ms: u64) {
        let second = at_ms / 1000;
        let ms = duration.as_secs_f64() * 1000.0;
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let ring = agents.entry(agent.clone()).or_default();
        let slot = &mut ring.slots[(second % WINDOW_SECS) as usize];
        if slot.second != second {
            *slot = Slot {
                second,
                ..Slot::default()
            };
        }
        slot.ticks += 1;
        slot.failures += u32::from(!success);
        slot.total_ms += ms;
        slot.max_ms = slot.max_ms.max(ms);
        ring.last_tick_at = Some(ring.last_tick_at.map_or(at_ms, |t| t.max(at_ms)));
        ring.last_tick_ms = Some(ms);
    }

    /// `agent`'s last [`WINDOW_SECS`] seconds ending with the second of `now_ms`; all zeros for
    /// an agent that has not ticked since start.
    pub fn history(&self, agent: &AgentId, now_ms: u64) -> History {
        self.recent(agent, now_ms, WINDOW_SECS)
    }

    /// Like [`TickStats::history`] for the last `secs` seconds only (at most the window): what
    /// an open event stream sends after its first frame, since earlier seconds do not change.
    pub fn recent(&self, agent: &AgentId, now_ms: u64, secs: u64) -> History {
        let now = now_ms / 1000;
        let start = now.saturating_sub(secs.clamp(1, WINDOW_SECS) - 1);
        let n = (now - start + 1) as usize;
        let mut h = History {
            start,
            ticks: Vec::with_capacity(n),
            failures: Vec::with_capacity(n),
            avg_ms: Vec::with_capacity(n),
            max_ms: Vec::with_capacity(n),
            last_tick_at: None,
            last_tick_ms: None,
        };
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let ring = agents.get(agent);
        for second in start..=now {
            let slot = ring
                .map(|r| r.slots[(second % WINDOW_SECS) as usize])
                .filter(|s| s.second == second && s.ticks > 0)
                .unwrap_or_default();
            h.ticks.push(slot.ticks);
            h.failures.push(slot.failures);
            h.avg_ms.push(if slot.ticks == 0 {
                0.0
            } else {
                round(slot.total_ms / f64::from(slot.ticks))
            });
            h.max_ms.push(round(slot.max_ms));
        }
        if let Some(r) = ring {
            h.last_tick_at = r.last_tick_at;
            h.last_tick_ms = r.last_tick_ms.map(round);
        }
        h
    }
}

/// Milliseconds to a tenth, so that the frames stay short.
fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// Hears every tick's outcome (beside the breaker and the metrics) and counts it.
pub struct StatsRecorder(pub Arc<TickStats>);

impl Actor for StatsRecorder {
    type Context = Context<Self>;
}

impl Handler<TickOutcome> for StatsRecorder {
    type Result = ();
    fn handle(&mut self, outcome: TickOutcome, _: &mut Context<Self>) {
        self.0
            .record(&outcome.agent, outcome.success, outcome.duration, now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn agent() -> AgentId {
        "ns/a".parse().unwrap()
    }

    #[test]
    fn counts_per_second_and_forgets_seconds_out_of_the_window() {
        let stats = TickStats::default();
        let t0 = 1_000_000_000;
        stats.record(&agent(), true, Duration::from_millis(10), t0);
        stats.record(&agent(), false, Duration::from_millis(30), t0 + 500);
        stats.record(&agent(), true, Duration::from_millis(5), t0 + 2000);
        let h = stats.history(&agent(), t0 + 2000);
        assert_eq!(h.ticks.len(), WINDOW_SECS as usize);
        assert_eq!(h.start, (t0 + 2000) / 1000 - (WINDOW_SECS - 1));
        let n = h.ticks.len();
        assert_eq!(&h.ticks[n - 3..], &[2, 0, 1]);
        assert_eq!(&h.failures[n - 3..], &[1, 0, 0]);
        assert_eq!(&h.avg_ms[n - 3..], &[20.0, 0.0, 5.0]);
        assert_eq!(&h.max_ms[n - 3..], &[30.0, 0.0, 5.0]);
        assert_eq!(h.last_tick_at, Some(t0 + 2000));
        assert_eq!(h.last_tick_ms, Some(5.0));
        // The tail an event stream sends is the end of the full history.
        let tail = stats.recent(&agent(), t0 + 2000, 3);
        assert_eq!(tail.start, (t0 + 2000) / 1000 - 2);
        assert_eq!(tail.ticks, vec![2, 0, 1]);
        assert_eq!(tail.max_ms, vec![30.0, 0.0, 5.0]);
        assert_eq!(tail.last_tick_at, Some(t0 + 2000));
        // A full window later the same slots belong to other seconds and read as zero.
        let later = stats.history(&agent(), t0 + 2000 + WINDOW_SECS * 1000);
        assert!(later.ticks.iter().all(|&t| t == 0));
        assert_eq!(
            stats.history(&"ns/b".parse().unwrap(), t0).last_tick_at,
            None
        );
    }

    proptest! {
        /// Whatever the order and spread of ticks, the history counts exactly the ticks of its
        /// window, and never more entries than the window.
        #[test]
        fn history_counts_exactly_the_ticks_in_its_window(
            offsets in proptest::collection::vec(0u64..400_000, 0..200),
            now_offset in 0u64..400_000,
        ) {
            let stats = TickStats::default();
            let base = 1_700_000_000_000u64;
            let mut recorded = Vec::new();
            for (i, off) in offsets.iter().enumerate() {
                // Ticks are recorded as they finish: never before one already recorded.
                let at = base + off;
                let at = recorded.last().map_or(at, |&l: &u64| at.max(l));
                stats.record(&agent(), i % 3 != 0, Duration::from_millis(1), at);
                recorded.push(at);
            }
            let now = recorded.last().copied().unwrap_or(base).max(base + now_offset);
            let h = stats.history(&agent(), now);
            prop_assert_eq!(h.ticks.len(), WINDOW_SECS as usize);
            let start = now / 1000 - (WINDOW_SECS - 1);
            let expected = recorded.iter().filter(|&&t| t / 1000 >= start && t / 1000 <= now / 1000).count();
            prop_assert_eq!(h.ticks.iter().map(|&t| t as usize).sum::<usize>(), expected);
        }
    }
}
