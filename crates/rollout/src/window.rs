//! Both versions' counts step by step over the last while: what the built-in metrics are
//! computed from, in the driver (one step per sample of the traffic) and in the simulator (one
//! per simulated second) alike.

use std::collections::VecDeque;

use coalmine_judge::{Counts, Reading};

use crate::builtin::builtin_reading;
use crate::plan::Check;
use crate::sequential::Observation;

/// One step's counts, from `start_ms` to `end_ms`.
#[derive(Debug, Clone)]
struct Step {
    start_ms: u64,
    end_ms: u64,
    counts: Observation,
}

/// Steps kept as long as the longest window needs. Time is the end of the newest step.
#[derive(Debug, Clone, Default)]
pub struct Window {
    steps: VecDeque<Step>,
    horizon_ms: u64,
}

impl Window {
    /// A window that answers for any span up to `horizon_ms`.
    pub fn new(horizon_ms: u64) -> Window {
        Window {
            steps: VecDeque::new(),
            horizon_ms,
        }
    }

    /// Adds the counts of the step from `start_ms` to `end_ms` (the end of the one before).
    pub fn push(&mut self, start_ms: u64, end_ms: u64, counts: Observation) {
        self.steps.push_back(Step {
            start_ms,
            end_ms,
            counts,
        });
        while self
            .steps
            .front()
            .is_some_and(|s| s.end_ms + self.horizon_ms <= end_ms)
        {
            self.steps.pop_front();
        }
    }

    /// Where a span of `window_ms` ending with the newest step begins.
    fn cutoff(&self, window_ms: u64) -> Option<u64> {
        let newest = self.steps.back()?;
        Some(newest.end_ms.saturating_sub(window_ms))
    }

    /// The canary's counts over the last `window_ms`: every step that ended inside it (the
    /// oldest of them may have begun a little before).
    pub fn canary(&self, window_ms: u64) -> Counts {
        let mut out = Counts::default();
        if let Some(cutoff) = self.cutoff(window_ms) {
            for step in self.steps.iter().filter(|s| s.end_ms > cutoff) {
                out.add(&step.counts.canary);
            }
        }
        out
    }

    /// Both versions' counts per step over the last `window_ms` (the steps wholly inside it),
    /// oldest first: the time series a Kayenta-style judge compares.
    pub fn steps(&self, window_ms: u64) -> (Vec<Counts>, Vec<Counts>) {
        let Some(cutoff) = self.cutoff(window_ms) else {
            return (Vec::new(), Vec::new());
        };
        self.steps
            .iter()
            .filter(|s| s.start_ms >= cutoff)
            .map(|s| (s.counts.canary.clone(), s.counts.stable.clone()))
            .unzip()
    }

    /// The reading of a built-in check over its window.
    pub fn reading(&self, check: &Check) -> Reading {
        builtin_reading(
            &check.name,
            || self.canary(check.window_ms),
            || self.steps(check.window_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(canary_requests: u64, canary_errors: u64) -> Observation {
        let mut canary = Counts::default();
        for i in 0..canary_requests {
            canary.record(1000, i < canary_errors);
        }
        Observation {
            canary,
            ..Observation::default()
        }
    }

    #[test]
    fn a_window_sums_the_steps_that_ended_inside_it() {
        let mut w = Window::new(60_000);
        assert_eq!(w.canary(60_000).requests, 0, "nothing is known yet");
        w.push(0, 30_000, step(150, 5));
        w.push(30_000, 60_000, step(150, 5));
        let last_30s = w.canary(30_000);
        assert_eq!((last_30s.requests, last_30s.server_errors), (150, 5));
        // A span that begins inside a step takes that step whole.
        assert_eq!(w.canary(20_000).requests, 150);
        assert_eq!(w.canary(40_000).requests, 300);
        // The Kayenta series takes only the steps wholly inside the span.
        assert_eq!(w.steps(40_000).0.len(), 1);
        assert_eq!(w.steps(60_000).0.len(), 2);
    }

    #[test]
    fn steps_past_the_horizon_are_dropped() {
        let mut w = Window::new(20_000);
        for i in 0..10 {
            w.push(i * 10_000, (i + 1) * 10_000, step(10, 0));
        }
        assert!(w.steps.len() <= 2, "{}", w.steps.len());
        assert_eq!(w.canary(20_000).requests, 20);
    }
}
