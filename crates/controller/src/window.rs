//! The built-in metrics over a sliding window of router counters: Flagger's
//! `request-success-rate` (% of canary requests that were not 5xx) and `request-duration` (the
//! canary's p99 in milliseconds), computed from `/stats` samples instead of Prometheus.

use std::collections::{BTreeMap, VecDeque};

pub use coalmine_judge::Counts;

use coalmine_contract::{StatsDoc, VersionStats};

trait AddDelta {
    fn add_delta(&mut self, now: &VersionStats, before: Option<&VersionStats>);
}

impl AddDelta for Counts {
    fn add_delta(&mut self, now: &VersionStats, before: Option<&VersionStats>) {
        let errors = |v: &VersionStats| -> u64 {
            v.statuses
                .iter()
                .filter(|(s, _)| **s >= 500)
                .map(|(_, n)| n)
                .sum()
        };
        let (base_requests, base_errors) = before.map_or((0, 0), |b| (b.requests, errors(b)));
        self.requests += now.requests.saturating_sub(base_requests);
        self.server_errors += errors(now).saturating_sub(base_errors);
        let base: BTreeMap<u64, u64> = before
            .map(|b| b.latency.counts.iter().copied().collect())
            .unwrap_or_default();
        for (micros, n) in &now.latency.counts {
            let d = n.saturating_sub(base.get(micros).copied().unwrap_or(0));
            if d > 0 {
                *self.latency.entry(*micros).or_default() += d;
            }
        }
    }
}

/// Samples of every router's counters, kept as long as the longest window needs.
#[derive(Debug, Default)]
pub struct StatsWindow {
    samples: VecDeque<(u64, Vec<StatsDoc>)>,
    horizon_ms: u64,
}

impl StatsWindow {
    pub fn new(horizon_ms: u64) -> StatsWindow {
        StatsWindow {
            samples: VecDeque::new(),
            horizon_ms,
        }
    }

    pub fn push(&mut self, at_ms: u64, stats: Vec<StatsDoc>) {
        self.samples.push_back((at_ms, stats));
        // Keep one sample at or before the horizon as the baseline of the longest window.
        while self.samples.len() > 2 && self.samples[1].0 + self.horizon_ms <= at_ms {
            self.samples.pop_front();
        }
    }

    /// The canary's counters over the last `window_ms`: newest sample minus the newest sample at
    /// least `window_ms` old (or the oldest one, early on). A router that restarted in between
    /// counts from zero.
    pub fn canary(&self, window_ms: u64) -> Counts {
        self.delta(window_ms, |s| &s.canary)
    }

    pub fn stable(&self, window_ms: u64) -> Counts {
        self.delta(window_ms, |s| &s.stable)
    }

    /// Both versions' counts per sampling step over the last `window_ms`, oldest first (the
    /// time series a Kayenta-style judge compares).
    pub fn steps(&self, window_ms: u64) -> (Vec<Counts>, Vec<Counts>) {
        let Some((now_ms, _)) = self.samples.back() else {
            return (Vec::new(), Vec::new());
        };
        let cutoff = now_ms.saturating_sub(window_ms);
        let (mut canary, mut stable) = (Vec::new(), Vec::new());
        let samples: Vec<_> = self.samples.iter().collect();
        for pair in samples.windows(2) {
            let ((before_at, before), (_, after)) = (pair[0], pair[1]);
            if *before_at < cutoff {
                continue;
            }
            canary.push(between(before, after, |s| &s.canary));
            stable.push(between(before, after, |s| &s.stable));
        }
        (canary, stable)
    }

    fn delta(&self, window_ms: u64, version: fn(&StatsDoc) -> &VersionStats) -> Counts {
        let out = Counts::default();
        let Some((now_ms, latest)) = self.samples.back() else {
            return out;
        };
        let cutoff = now_ms.saturating_sub(window_ms);
        // The baseline is an older sample: with one sample nothing is known about any window.
        let older = || self.samples.iter().rev().skip(1);
        let Some((_, base)) = older()
            .find(|(at, _)| *at <= cutoff)
            .or_else(|| older().last())
        else {
            return out;
        };
        between(base, latest, version)
    }
}

/// One version's counts from the `before` sample to the `after` one, summed over routers. A
/// router that restarted in between (another start time) counts from zero.
fn between(
    before: &[StatsDoc],
    after: &[StatsDoc],
    version: fn(&StatsDoc) -> &VersionStats,
) -> Counts {
    let mut out = Counts::default();
    for (i, router) in after.iter().enumerate() {
        let base = before
            .get(i)
            .filter(|b| b.started_unix_ms == router.started_unix_ms)
            .map(version);
        out.add_delta(version(router), base);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_contract::Latency;
    use coalmine_judge::Reading;

    fn stats(started: u64, requests: u64, errors: u64, latency: &[(u64, u64)]) -> StatsDoc {
        let mut statuses = BTreeMap::new();
        statuses.insert(200, requests - errors);
        if errors > 0 {
            statuses.insert(503, errors);
        }
        StatsDoc {
            instance: "r".into(),
            started_unix_ms: started,
            stable: VersionStats::default(),
            canary: VersionStats {
                requests,
                statuses,
                latency: Latency {
                    counts: latency.to_vec(),
                    ..Latency::default()
                },
                ..VersionStats::default()
            },
            ..StatsDoc::default()
        }
    }

    #[test]
    fn window_subtracts_the_sample_at_its_start_and_sums_routers() {
        let mut w = StatsWindow::new(60_000);
        w.push(
            0,
            vec![stats(1, 100, 0, &[(1000, 100)]), stats(1, 0, 0, &[])],
        );
        w.push(
            30_000,
            vec![
                stats(1, 200, 5, &[(1000, 195), (9000, 5)]),
                stats(1, 50, 0, &[(2000, 50)]),
            ],
        );
        w.push(
            60_000,
            vec![
                stats(1, 300, 10, &[(1000, 290), (9000, 10)]),
                stats(1, 100, 0, &[(2000, 100)]),
            ],
        );
        let last_30s = w.canary(30_000);
        assert_eq!(last_30s.requests, 100 + 50);
        assert_eq!(last_30s.server_errors, 5);
        assert_eq!(
            last_30s.success_rate(),
            Reading::Value {
                value: 100.0 * 145.0 / 150.0
            }
        );
        // 95 at 1 ms, 50 at 2 ms, 5 at 9 ms: p99 is rank 149 → 9 ms; p50 rank 75 → 1 ms.
        assert_eq!(
            last_30s.latency_quantile_ms(0.99),
            Reading::Value { value: 9.0 }
        );
        assert_eq!(
            last_30s.latency_quantile_ms(0.5),
            Reading::Value { value: 1.0 }
        );
        assert_eq!(w.canary(60_000).requests, 300);
    }

    #[test]
    fn a_restarted_router_counts_from_zero_and_one_sample_is_no_data() {
        let mut w = StatsWindow::new(60_000);
        w.push(0, vec![stats(1, 1000, 0, &[])]);
        assert!(matches!(
            w.canary(10_000).success_rate(),
            Reading::NoData { .. }
        ));
        w.push(10_000, vec![stats(2, 40, 4, &[])]);
        let c = w.canary(10_000);
        assert_eq!((c.requests, c.server_errors), (40, 4));
    }

    #[test]
    fn old_samples_are_dropped_past_the_horizon() {
        let mut w = StatsWindow::new(20_000);
        for i in 0..10 {
            w.push(i * 10_000, vec![stats(1, i * 10, 0, &[])]);
        }
        assert!(w.samples.len() <= 4, "{}", w.samples.len());
        assert_eq!(w.canary(20_000).requests, 20);
    }
}
