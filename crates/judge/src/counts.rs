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
        let total = self
            .latency
            .values()
            .fold(0u64, |t, n| t.saturating_add(*n));
        if total == 0 {
            return Reading::NoData {
                reason: "no canary requests in the window".into(),
            };
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (micros, n) in &self.latency {
            seen = seen.saturating_add(*n);
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
    /// Saturating: counts an app reported absurdly large stay at the most there can be rather
    /// than wrap to a few (which would hide a canary's failures) or stop the controller.
    pub fn add(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.server_errors = self.server_errors.saturating_add(other.server_errors);
        for (micros, n) in &other.latency {
            let sum = self.latency.entry(*micros).or_default();
            *sum = sum.saturating_add(*n);
        }
    }

    /// `self` plus `other`, if every count fits in a `u64`.
    pub fn checked_sum(&self, other: &Counts) -> Option<Counts> {
        let mut latency = self.latency.clone();
        for (micros, n) in &other.latency {
            let sum = latency.entry(*micros).or_default();
            *sum = sum.checked_add(*n)?;
        }
        Some(Counts {
            requests: self.requests.checked_add(other.requests)?,
            server_errors: self.server_errors.checked_add(other.server_errors)?,
            latency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, server_errors: u64, latency: &[(u64, u64)]) -> Counts {
        Counts {
            requests,
            server_errors,
            latency: latency.iter().copied().collect(),
        }
    }

    #[test]
    fn counts_too_large_to_add_stay_at_the_most_there_can_be() {
        let half = 1 << 63;
        let mut sum = counts(half, 0, &[(1_000, half)]);
        sum.add(&counts(half, half, &[(1_000, half), (9_000, half)]));
        // Wrapped, these would be 0 requests and 0 at 1 ms: the failures hidden.
        assert_eq!(
            sum,
            counts(u64::MAX, half, &[(1_000, u64::MAX), (9_000, half)])
        );
        assert_eq!(sum.success_rate(), Reading::Value { value: 50.0 });
        assert_eq!(sum.latency_quantile_ms(0.5), Reading::Value { value: 1.0 });
        assert_eq!(sum.checked_sum(&counts(1, 0, &[])), None);
        assert_eq!(
            counts(1, 0, &[(5, 1)]).checked_sum(&counts(2, 1, &[(5, 2)])),
            Some(counts(3, 1, &[(5, 3)]))
        );
    }
}
