//! Request counters of one version over a window: what the built-in metrics are computed from,
//! whether the counts came from routers (`coalmine run`, `serve`) or from a simulation.

use std::collections::BTreeMap;

use crate::threshold::Reading;

/// Counters of one version over a window, summed across routers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub server_errors: u64,
    /// Latency histogram: microseconds → count.
    pub latency: BTreeMap<u64, u64>,
}

impl Counts {
    pub fn success_rate(&self) -> Reading {
        if self.requests == 0 {
            return Reading::NoData {
                reason: "no canary requests in the window".into(),
            };
        }
        let ok = self.requests - self.server_errors.min(self.requests);
        Reading::Value {
            value: 100.0 * ok as f64 / self.requests as f64,
        }
    }

    /// The `q` quantile in milliseconds (nearest rank).
    pub fn latency_quantile_ms(&self, q: f64) -> Reading {
        let total: u64 = self.latency.values().sum();
        if total == 0 {
            return Reading::NoData {
                reason: "no canary requests in the window".into(),
            };
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (micros, n) in &self.latency {
            seen += n;
            if seen >= rank {
                return Reading::Value {
                    value: *micros as f64 / 1000.0,
                };
            }
        }
        unreachable!("rank ≤ total")
    }

    /// One request: its latency (microseconds) and whether it was a server error.
    pub fn record(&mut self, latency_micros: u64, server_error: bool) {
        self.requests += 1;
        self.server_errors += u64::from(server_error);
        *self.latency.entry(latency_micros).or_default() += 1;
    }

    /// Adds another window's counts (windows that follow each other, or several routers).
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.server_errors += other.server_errors;
        for (micros, n) in &other.latency {
            *self.latency.entry(*micros).or_default() += n;
        }
    }
}
