//! The dark launch's judge: mirrored requests, each answered by stable (the user's answer) and
//! by the canary (a discarded copy), compared pair by pair.
//!
//! # Failures: a sequential McNemar test
//!
//! A pair in which both versions answered well, or both failed, says nothing about which is
//! worse (a bad request, a shared dependency down). Only the *discordant* pairs do: the canary
//! failed where stable answered well (`c`), or stable failed where the canary answered well
//! (`s`). Let θ be the chance that a discordant pair is the canary's failure. H0, "the canary
//! fails the same requests no more often than stable", is θ ≤ ½; the alternative θ > ½.
//!
//! Write θ = r / (1 + r), r the odds of canary-only against stable-only failures. For a fixed r,
//! each discordant pair multiplies the likelihood ratio against θ = ½ by 2θ (the canary's) or
//! 2(1 − θ) (stable's):
//!
//! ```text
//! ℓ(r) = r^c / ((1 + r) / 2)^(c + s)
//! ```
//!
//! which is the failure-origin test's ℓ of [`super::counts`] at the share ρ = ½: a discordant
//! pair is a failure from one of two arms that took equal shares of the same requests. Under
//! H0, conditionally on everything before and on the pair being discordant, E[per-pair factor]
//! = 2θ₀θ + 2(1 − θ₀)(1 − θ) = 1 − (1 − 2θ₀)(2θ − 1) ≤ 1 for θ₀ ≤ ½ ≤ θ: the product is a
//! nonnegative supermartingale, so is any mixture over r ≥ 1 with fixed weights, and Ville's
//! inequality bounds P(ever BF ≥ 1/α) by α: the test may be read after every sample, for ever.
//! Pairs that are not discordant do not move it, however many there are.
//!
//! So the test *is* [`CountsTest`] fed discordant pairs as equal-share batches. Its prior is set
//! for a dark launch: uniform on θ ∈ (½, 1) (Beta(1, 1) at the reference share ½, concentration
//! 2), since a broken build tends to fail many requests stable answers, not a few per cent
//! more. All `c` discordant pairs the canary's give BF = (2^(c+1) − 1)/(c + 1): 11 of them reach
//! 341, beyond 2/α = 200 for α = 0.01 (each test runs at α/2, below).
//!
//! # Latency: the same test on signs
//!
//! Of the pairs both answered well, those whose answer times differ by more than a tolerance
//! are discordant in the same way: the canary's copy slower (`c`) or faster (`s`). Under H0,
//! "for the same request the canary is no slower than stable", a difference beyond the
//! tolerance is no more often the canary's; the same supermartingale argument holds (a sign
//! test, anytime-valid). The tolerance keeps the jitter of two processes on one machine out.
//!
//! Both tests run at α/2 (Bonferroni): P(a healthy canary is ever rejected) ≤ α.

use serde::{Deserialize, Serialize};

use super::counts::{Batch, CountsConfig, CountsTest};
use super::{check_alpha, ConfigError};

/// Paired mirrored requests over one sampling step (not cumulative), as the routers count
/// them (their `/stats`' `mirror.pairs`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairedBatch {
    pub both_ok: u64,
    pub canary_only_failed: u64,
    pub stable_only_failed: u64,
    pub both_failed: u64,
    /// Of the pairs both answered well, `(microseconds, count)`: how many the canary's copy
    /// answered more than that much later than stable's answer, for rising bounds from 0.
    pub canary_slower_by: Vec<(u64, u64)>,
    /// Likewise, sooner.
    pub canary_faster_by: Vec<(u64, u64)>,
}

impl PairedBatch {
    /// Pairs both versions answered (well or not).
    pub fn pairs(&self) -> u64 {
        self.both_ok + self.canary_only_failed + self.stable_only_failed + self.both_failed
    }

    /// Adds another step's pairs (counts at the same bound add up).
    pub fn add(&mut self, other: &PairedBatch) {
        self.both_ok += other.both_ok;
        self.canary_only_failed += other.canary_only_failed;
        self.stable_only_failed += other.stable_only_failed;
        self.both_failed += other.both_failed;
        for (into, from) in [
            (&mut self.canary_slower_by, &other.canary_slower_by),
            (&mut self.canary_faster_by, &other.canary_faster_by),
        ] {
            for &(bound, n) in from {
                match into.binary_search_by_key(&bound, |(b, _)| *b) {
                    Ok(i) => into[i].1 += n,
                    Err(i) => into.insert(i, (bound, n)),
                }
            }
        }
    }

    /// Pairs beyond the tolerance the canary's copy was slower on, and faster on. Counted from
    /// the largest bound not above the tolerance: at least every pair beyond it, each way alike,
    /// so H0's symmetry holds whatever the bounds are.
    pub fn beyond(&self, tolerance_micros: u64) -> (u64, u64) {
        let beyond = |by: &[(u64, u64)]| {
            by.iter()
                .take_while(|(bound, _)| *bound <= tolerance_micros)
                .last()
                .map_or(0, |(_, n)| *n)
        };
        (
            beyond(&self.canary_slower_by),
            beyond(&self.canary_faster_by),
        )
    }
}

/// Everything the test has been shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairedTotals {
    pub pairs: u64,
    pub canary_only_failed: u64,
    pub stable_only_failed: u64,
    pub both_failed: u64,
    pub canary_slower: u64,
    pub canary_faster: u64,
}

/// What status shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairedEvidence {
    #[serde(flatten)]
    pub totals: PairedTotals,
    pub alpha: f64,
    pub latency_tolerance_micros: u64,
    /// ln BF of "the canary fails the requests stable answers", and of "is slower on them".
    pub failures_log_bayes_factor: f64,
    pub latency_log_bayes_factor: f64,
    /// Why the canary is worse, once a test has rejected.
    pub rejected: Option<PairedRejection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PairedRejection {
    Failures,
    Latency,
}

/// The two paired tests; serializes whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairedTest {
    alpha: f64,
    latency_tolerance_micros: u64,
    failures: CountsTest,
    latency: CountsTest,
    totals: PairedTotals,
}

/// The prior of both tests: uniform on θ ∈ (½, 1), see the module documentation.
fn paired_prior() -> CountsConfig {
    CountsConfig {
        concentration: 2.0,
        reference_share: 0.5,
        ..CountsConfig::default()
    }
}

/// A discordant count as the failure-origin test's batch at share ½.
fn equal_share(canary: u64, stable: u64) -> Batch {
    let n = canary + stable;
    Batch {
        canary_requests: n,
        canary_failures: canary,
        stable_requests: n,
        stable_failures: stable,
    }
}

impl PairedTest {
    /// Both tests together reject a healthy canary with probability at most `alpha`; a latency
    /// difference counts beyond `latency_tolerance_micros`.
    pub fn new(alpha: f64, latency_tolerance_micros: u64) -> Result<PairedTest, ConfigError> {
        check_alpha(alpha)?;
        let test = CountsTest::new(paired_prior())?;
        Ok(PairedTest {
            alpha,
            latency_tolerance_micros,
            failures: test.clone(),
            latency: test,
            totals: PairedTotals::default(),
        })
    }

    pub fn observe(&mut self, batch: &PairedBatch) {
        let (slower, faster) = batch.beyond(self.latency_tolerance_micros);
        let t = &mut self.totals;
        t.pairs += batch.pairs();
        t.canary_only_failed += batch.canary_only_failed;
        t.stable_only_failed += batch.stable_only_failed;
        t.both_failed += batch.both_failed;
        t.canary_slower += slower;
        t.canary_faster += faster;
        for (test, canary, stable) in [
            (
                &mut self.failures,
                batch.canary_only_failed,
                batch.stable_only_failed,
            ),
            (&mut self.latency, slower, faster),
        ] {
            if canary + stable > 0 {
                // Equal shares never hold more failures than requests.
                let _ = test.observe(equal_share(canary, stable));
            }
        }
    }

    /// Which test has rejected (failures first), if any; once rejected, always.
    pub fn rejected(&self) -> Option<PairedRejection> {
        let half = self.alpha / 2.0;
        if self.failures.rejected(half) {
            Some(PairedRejection::Failures)
        } else if self.latency.rejected(half) {
            Some(PairedRejection::Latency)
        } else {
            None
        }
    }

    pub fn totals(&self) -> PairedTotals {
        self.totals
    }

    pub fn evidence(&self) -> PairedEvidence {
        PairedEvidence {
            totals: self.totals,
            alpha: self.alpha,
            latency_tolerance_micros: self.latency_tolerance_micros,
            failures_log_bayes_factor: self.failures.log_bayes_factor(),
            latency_log_bayes_factor: self.latency.log_bayes_factor(),
            rejected: self.rejected(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(canary_only: u64, stable_only: u64) -> PairedBatch {
        PairedBatch {
            both_ok: 100,
            canary_only_failed: canary_only,
            stable_only_failed: stable_only,
            ..PairedBatch::default()
        }
    }

    #[test]
    fn only_discordant_pairs_move_the_test() {
        let mut t = PairedTest::new(0.01, 10_000).unwrap();
        t.observe(&PairedBatch {
            both_ok: 10_000,
            both_failed: 500,
            ..PairedBatch::default()
        });
        assert_eq!(t.evidence().failures_log_bayes_factor, 0.0);
        assert_eq!(t.totals().pairs, 10_500);
        assert_eq!(t.rejected(), None);
    }

    #[test]
    fn the_bayes_factor_is_the_uniform_mixture_over_theta_above_a_half() {
        // All c discordant pairs the canary's: BF = ∫_{½}^{1} 2·(2θ)^c dθ = (2^(c+1) − 1)/(c+1)
        // (the grid stops at r = 1000, θ = 0.999, which the quadrature barely feels).
        let mut t = PairedTest::new(0.01, 10_000).unwrap();
        for c in 1..=12u32 {
            t.observe(&batch(1, 0));
            let exact = ((2f64.powi(c as i32 + 1) - 1.0) / f64::from(c + 1)).ln();
            let got = t.evidence().failures_log_bayes_factor;
            assert!((got - exact).abs() < 0.02, "c = {c}: {got} vs {exact}");
        }
        // 12 pairs: BF 630 ≥ 2/α = 200.
        assert_eq!(t.rejected(), Some(PairedRejection::Failures));
        // Balanced discordance keeps it below 1.
        let mut t = PairedTest::new(0.01, 10_000).unwrap();
        t.observe(&batch(20, 20));
        assert!(t.evidence().failures_log_bayes_factor < 0.0);
        assert_eq!(t.rejected(), None);
    }

    #[test]
    fn a_slower_canary_is_rejected_on_latency_and_the_state_serializes() {
        let mut t = PairedTest::new(0.01, 10_000).unwrap();
        // Bounds 0, 5 ms, 10 ms, 25 ms: with a 12 ms tolerance the 10 ms bound's counts are
        // read (a few pairs between 10 and 12 ms counted too, both ways alike).
        let by = |n: [u64; 4]| vec![(0, n[0]), (5_000, n[1]), (10_000, n[2]), (25_000, n[3])];
        let batch = PairedBatch {
            both_ok: 50,
            canary_slower_by: by([30, 20, 14, 3]),
            canary_faster_by: by([20, 5, 1, 0]),
            ..PairedBatch::default()
        };
        assert_eq!(batch.beyond(12_000), (14, 1));
        assert_eq!(batch.beyond(0), (30, 20));
        let mut twice = batch.clone();
        twice.add(&batch);
        assert_eq!((twice.both_ok, twice.beyond(12_000)), (100, (28, 2)));
        t.observe(&batch);
        assert_eq!(t.rejected(), Some(PairedRejection::Latency));
        let back: PairedTest = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        assert!(PairedTest::new(1.5, 0).is_err());
    }
}
