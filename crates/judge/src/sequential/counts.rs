//! Failure origin: given that a request failed (5xx, timeout, connection error), did it come
//! from the canary more often than the traffic split explains?
//!
//! # Model
//!
//! Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data", NeurIPS 2022
//! (arXiv:2011.03567), as used for Netflix's canaries in Lindon, Sanden & Shirikian, "Rapid
//! Regression Detection in Software Deployments through Sequential Testing", KDD 2022
//! (arXiv:2205.14762). Failures of each arm arrive with intensity share × failure rate × a trend
//! common to both arms (load, time of day, a shared dependency's outage). Given that a failure
//! happens while the canary receives the share ρ of the requests, it is the canary's with
//! probability
//!
//! ```text
//! θ(ρ, r) = ρ·r / (ρ·r + 1 − ρ),      r = canary failure rate / stable failure rate.
//! ```
//!
//! The common trend cancels. H0 is "the canary fails no more often than stable" (r ≤ 1, tested at
//! its boundary r = 1, where θ = ρ); the alternative is one-sided, r > 1.
//!
//! The controller samples the router's counters about once a second; a [`Batch`] is the change
//! over one such interval, and the realized share `canary_requests / (canary_requests +
//! stable_requests)` is the ρ of that batch. For a fixed r, a batch with `f_c` canary and `f_s`
//! stable failures multiplies the likelihood ratio of r against r = 1 by
//!
//! ```text
//! ℓ(r) = (θ/ρ)^f_c · ((1−θ)/(1−ρ))^f_s = r^f_c / (1 + ρ·(r − 1))^(f_c + f_s).
//! ```
//!
//! # Why it is valid whenever it is looked at
//!
//! Under H0, conditionally on everything before the batch and on the batch's request counts and
//! total failures n, E[ℓ(r)] ≤ 1:
//! - if failures are a Poisson process split by the router (Lindon & Malek's model), the canary's
//!   count is Binomial(n, ρ) and E[ℓ(r)] = (ρ·θ/ρ + (1−ρ)(1−θ)/(1−ρ))ⁿ = 1;
//! - if each request fails independently with one probability shared by both arms, which of the
//!   requests failed is uniform, so the canary's count is hypergeometric; k ↦ ℓ is convex, and
//!   Hoeffding (1963, Theorem 4) bounds a convex function's hypergeometric mean by its binomial
//!   mean, 1;
//! - if the canary fails *less* often (r₀ < 1, θ₀ < ρ), E[ℓ(r)] = (θ₀·θ/ρ + (1−θ₀)(1−θ)/(1−ρ))ⁿ,
//!   which grows with θ₀ and equals 1 at θ₀ = ρ, so it is below 1: the composite null r ≤ 1 is
//!   covered too.
//!
//! So the running product L_t(r) is a nonnegative supermartingale starting at 1, and so is any
//! mixture Σ w_j L_t(r_j) with fixed weights summing to 1. Ville's inequality gives
//! P(∃t: BF_t ≥ 1/α) ≤ α: the test may be evaluated after every batch, for ever, and the batches
//! may have any size and any share (the share is fixed before the batch's failures are seen).
//!
//! # The mixture: a fixed grid in r, weights from the Dirichlet / beta-binomial prior
//!
//! At a constant share ρ the natural test is the one-sided beta-binomial Bayes factor of savvi /
//! Lindon & Malek: θ ~ Beta(kρ, k(1−ρ)) truncated to θ > ρ, with k = 100 (savvi's default
//! Dirichlet concentration). That closed form is exact only while ρ stays put, and a rollout
//! steps its weights. So the prior is put on r, which means the same at every share, and
//! discretised:
//!
//! - the prior on r is the one that Beta(kρ₀, k(1−ρ₀)) on θ induces at the *reference share* ρ₀
//!   ([`CountsConfig::reference_share`], 5 %: the usual first step, where a bad canary must be
//!   caught fastest). In u = ln r its density is ∝ θ(u)^{kρ₀} (1 − θ(u))^{k(1−ρ₀)} with
//!   θ(u) = logistic(u + logit ρ₀), truncated to u > 0;
//! - the grid is 65 points evenly spaced in u on [0, ln 1000] (r from 1 to 1000), and each
//!   point's weight is its prior density times its composite-Simpson weight, normalised to sum
//!   to 1. The grid is thus a quadrature of the beta-binomial integral: at ρ = ρ₀ the test matches
//!   the exact one-sided beta-binomial Bayes factor to within 0.03 in ln BF wherever
//!   1 ≤ BF ≤ e²⁰ (the range where decisions are made; up to a hundred canary and thousands of
//!   stable failures), which `tests/counts.rs` checks against a numerical integration. At other
//!   shares it is the same prior on r, which is what keeps it one martingale across weight steps.
//!   At the defaults the prior's median ratio is 1.32, 90 % of its mass lies below r = 1.9, and
//!   the mass beyond r = 1000, cut off by the grid, is below 1e-150.
//! - the first grid point is r = 1 itself (LR ≡ 1, weight ≈ 0.07): the Bayes factor never falls
//!   below that weight, which is harmless (only large values matter) and is what Simpson's rule
//!   does at the interval's end.
//!
//! The prior expects small regressions; a large one is still caught quickly because the
//! likelihood outgrows the prior's tail within a few failures. Smaller k spreads the prior
//! towards large ratios: big regressions are caught sooner, small ones later. With k = 100,
//! ρ₀ = 5 %, 200 req/s and stable at 0.1 % errors, a canary with 10 % errors is rejected at
//! α = 0.01 after a median of about 9 one-second batches, one with 1 % errors after about 100
//! (see `tests/counts.rs`); k = 30 gives about 6 and 65 in the same setting.
//!
//! # No `min_ratio`
//!
//! A null "r ≤ r₀" with r₀ > 1 would be just as valid (the same argument with θ(ρ, r₀) in place
//! of ρ, and the grid on (r₀, max_ratio]) and would ignore practically irrelevant increases. It
//! is not offered: within a rollout the test has little power below r ≈ 1.5 anyway (a 30 %
//! increase over 0.1 % errors at 50 % of 200 req/s takes about an hour to detect: 0.0085 nats of
//! evidence per failure, 0.23 failures/s), so a margin would change few verdicts, and a second
//! knob next to α makes "rolled back because errors rose, with this Bayes factor" harder to
//! explain. If long, high-traffic rollouts make tiny increases detectable, r₀ is the knob to add.
//!
//! # Batches without information
//!
//! A batch in which one arm received no requests says nothing about where failures come from
//! (θ = ρ ∈ {0, 1} whatever r is): it is counted in the totals but leaves the Bayes factor
//! unchanged. A batch claiming more failures than requests is refused ([`BatchError`]).

use serde::{Deserialize, Serialize};
use std::fmt;

use super::{check_alpha, ConfigError};
use crate::math::{log_sum_exp, softplus};

/// Counter changes over one sampling interval, for both arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    pub canary_requests: u64,
    pub canary_failures: u64,
    pub stable_requests: u64,
    pub stable_failures: u64,
}

/// The arms of a rollout, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Arm {
    Canary,
    Stable,
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arm::Canary => "canary",
            Arm::Stable => "stable",
        })
    }
}

/// A batch that cannot come from real counters; the test's state is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    MoreFailuresThanRequests {
        arm: Arm,
        failures: u64,
        requests: u64,
    },
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::MoreFailuresThanRequests {
                arm,
                failures,
                requests,
            } => write!(
                f,
                "{arm}: {failures} failures reported for {requests} requests"
            ),
        }
    }
}

impl std::error::Error for BatchError {}

/// How the default prior is built (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CountsConfig {
    /// k of the Dirichlet(k·ρ) prior; savvi's default is 100.
    pub concentration: f64,
    /// ρ₀, the canary share at which the grid prior equals the beta-binomial prior.
    pub reference_share: f64,
    /// The largest failure-rate ratio on the grid.
    pub max_ratio: f64,
    /// Simpson intervals in ln r (even); the grid has one more point.
    pub grid_intervals: usize,
}

impl Default for CountsConfig {
    fn default() -> Self {
        CountsConfig {
            concentration: 100.0,
            reference_share: 0.05,
            max_ratio: 1000.0,
            grid_intervals: 64,
        }
    }
}

/// The sequential failure-origin test. Its state is one log-likelihood ratio per grid point plus
/// counters; it serializes whole (the controller persists it between ticks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CountsTest {
    /// Failure-rate ratios r_j of the grid (all ≥ 1).
    ratios: Vec<f64>,
    /// ln w_j, normalised so that Σ w_j = 1.
    log_weights: Vec<f64>,
    /// ln L_t(r_j).
    log_lrs: Vec<f64>,
    /// ln of the current Bayes factor Σ w_j L_t(r_j).
    log_bf: f64,
    /// The largest ln BF so far (0 at the start, where BF = 1).
    max_log_bf: f64,
    totals: Totals,
}

/// Everything the test has been shown, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub canary_requests: u64,
    pub canary_failures: u64,
    pub stable_requests: u64,
    pub stable_failures: u64,
    /// Batches observed, including those without information.
    pub batches: u64,
    /// Batches in which one arm received no requests (left out of the Bayes factor).
    pub uninformative_batches: u64,
}

/// What the status display shows for the counts test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CountsEvidence {
    #[serde(flatten)]
    pub totals: Totals,
    /// Failures / requests, `None` without requests.
    pub canary_failure_rate: Option<f64>,
    pub stable_failure_rate: Option<f64>,
    /// Canary failure rate / stable failure rate, `None` when either is unknown or stable's is 0.
    pub failure_rate_ratio: Option<f64>,
    pub log_bayes_factor: f64,
    /// The always-valid p-value: min over time of 1/BF, at most 1.
    pub p_value: f64,
    pub alpha: f64,
    /// Whether the Bayes factor has reached 1/α (the canary fails more often than stable).
    pub rejected: bool,
}

impl CountsTest {
    /// The test with the grid prior matched to the beta-binomial mixture at the reference share.
    pub fn new(config: CountsConfig) -> Result<Self, ConfigError> {
        let CountsConfig {
            concentration: k,
            reference_share: rho0,
            max_ratio,
            grid_intervals: n,
        } = config;
        if !(k.is_finite() && k > 0.0) {
            return Err(ConfigError(format!(
                "concentration: must be positive, got {k}"
            )));
        }
        if !(rho0 > 0.0 && rho0 < 1.0) {
            return Err(ConfigError(format!(
                "referenceShare: must be in (0, 1), got {rho0}"
            )));
        }
        if !(max_ratio.is_finite() && max_ratio > 1.0) {
            return Err(ConfigError(format!(
                "maxRatio: must be a finite number above 1, got {max_ratio}"
            )));
        }
        if n < 2 || n % 2 != 0 || n > 10_000 {
            return Err(ConfigError(format!(
                "gridIntervals: must be even and between 2 and 10000, got {n}"
            )));
        }
        let (a, b) = (k * rho0, k * (1.0 - rho0));
        let logit0 = (rho0 / (1.0 - rho0)).ln();
        let h = max_ratio.ln() / n as f64;
        let mut ratios = Vec::with_capacity(n + 1);
        let mut log_weights = Vec::with_capacity(n + 1);
        for i in 0..=n {
            let u = i as f64 * h;
            // ln θ = −softplus(−x), ln(1 − θ) = −softplus(x), x = u + logit ρ₀.
            let x = u + logit0;
            let log_density = -a * softplus(-x) - b * softplus(x);
            let simpson = if i == 0 || i == n {
                1.0
            } else if i % 2 == 1 {
                4.0
            } else {
                2.0
            };
            ratios.push(u.exp());
            log_weights.push(log_density + (simpson * h / 3.0).ln());
        }
        Ok(Self::from_log_weights(ratios, log_weights))
    }

    /// A test with an explicit discrete prior: `(ratio, weight)` pairs with ratio ≥ 1 and
    /// nonnegative weights (normalised here). Useful for a prior of one's own and for checking
    /// the arithmetic by hand.
    pub fn with_prior(points: &[(f64, f64)]) -> Result<Self, ConfigError> {
        if points.is_empty() {
            return Err(ConfigError("prior: needs at least one point".into()));
        }
        for &(r, w) in points {
            if !(r.is_finite() && r >= 1.0) {
                return Err(ConfigError(format!(
                    "prior: ratios must be finite and at least 1, got {r}"
                )));
            }
            if !(w.is_finite() && w >= 0.0) {
                return Err(ConfigError(format!(
                    "prior: weights must be finite and nonnegative, got {w}"
                )));
            }
        }
        if points.iter().all(|&(_, w)| w == 0.0) {
            return Err(ConfigError("prior: all weights are zero".into()));
        }
        let ratios = points.iter().map(|&(r, _)| r).collect();
        let log_weights = points.iter().map(|&(_, w)| w.ln()).collect();
        Ok(Self::from_log_weights(ratios, log_weights))
    }

    fn from_log_weights(ratios: Vec<f64>, mut log_weights: Vec<f64>) -> Self {
        let norm = log_sum_exp(log_weights.iter().copied());
        for w in &mut log_weights {
            *w -= norm;
        }
        let n = ratios.len();
        CountsTest {
            ratios,
            log_weights,
            log_lrs: vec![0.0; n],
            log_bf: 0.0,
            max_log_bf: 0.0,
            totals: Totals::default(),
        }
    }

    /// Adds one batch. A batch where one arm got no requests only updates the totals.
    pub fn observe(&mut self, batch: Batch) -> Result<(), BatchError> {
        for (arm, failures, requests) in [
            (Arm::Canary, batch.canary_failures, batch.canary_requests),
            (Arm::Stable, batch.stable_failures, batch.stable_requests),
        ] {
            if failures > requests {
                return Err(BatchError::MoreFailuresThanRequests {
                    arm,
                    failures,
                    requests,
                });
            }
        }
        let t = &mut self.totals;
        t.canary_requests += batch.canary_requests;
        t.canary_failures += batch.canary_failures;
        t.stable_requests += batch.stable_requests;
        t.stable_failures += batch.stable_failures;
        t.batches += 1;
        if batch.canary_requests == 0 || batch.stable_requests == 0 {
            t.uninformative_batches += 1;
            return Ok(());
        }
        let failures = batch.canary_failures + batch.stable_failures;
        if failures == 0 {
            return Ok(());
        }
        let share = batch.canary_requests as f64
            / (batch.canary_requests as f64 + batch.stable_requests as f64);
        let (fc, n) = (batch.canary_failures as f64, failures as f64);
        for (lr, &r) in self.log_lrs.iter_mut().zip(&self.ratios) {
            *lr += fc * r.ln() - n * (share * (r - 1.0)).ln_1p();
        }
        self.log_bf = log_sum_exp(
            self.log_weights
                .iter()
                .zip(&self.log_lrs)
                .map(|(w, lr)| w + lr),
        );
        self.max_log_bf = self.max_log_bf.max(self.log_bf);
        Ok(())
    }

    /// ln of the current Bayes factor (mixture likelihood ratio against r = 1).
    pub fn log_bayes_factor(&self) -> f64 {
        self.log_bf
    }

    pub fn bayes_factor(&self) -> f64 {
        self.log_bf.exp()
    }

    /// The always-valid p-value: the running minimum of 1/BF, at most 1. P(ever ≤ α) ≤ α under H0.
    pub fn p_value(&self) -> f64 {
        (-self.max_log_bf).exp().min(1.0)
    }

    /// Whether the Bayes factor has reached 1/α at some point (once true, it stays true).
    pub fn rejected(&self, alpha: f64) -> bool {
        check_alpha(alpha).is_ok() && self.max_log_bf >= (1.0 / alpha).ln()
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The grid: `(ratio, weight)` pairs, weights summing to 1.
    pub fn prior(&self) -> Vec<(f64, f64)> {
        self.ratios
            .iter()
            .zip(&self.log_weights)
            .map(|(&r, &w)| (r, w.exp()))
            .collect()
    }

    /// ln L_t(r_j) for each grid point, in the order of [`CountsTest::prior`].
    pub fn log_likelihood_ratios(&self) -> &[f64] {
        &self.log_lrs
    }

    pub fn evidence(&self, alpha: f64) -> CountsEvidence {
        let t = self.totals;
        let rate = |f: u64, n: u64| (n > 0).then(|| f as f64 / n as f64);
        let canary = rate(t.canary_failures, t.canary_requests);
        let stable = rate(t.stable_failures, t.stable_requests);
        let ratio = match (canary, stable) {
            (Some(c), Some(s)) if s > 0.0 => Some(c / s),
            _ => None,
        };
        CountsEvidence {
            totals: t,
            canary_failure_rate: canary,
            stable_failure_rate: stable,
            failure_rate_ratio: ratio,
            log_bayes_factor: self.log_bf,
            p_value: self.p_value(),
            alpha,
            rejected: self.rejected(alpha),
        }
    }
}

impl Default for CountsTest {
    fn default() -> Self {
        CountsTest::new(CountsConfig::default()).expect("the default configuration is valid")
    }
}
