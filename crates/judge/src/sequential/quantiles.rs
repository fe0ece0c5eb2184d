//! Latency regression: is the canary's p50 / p95 / p99 worse than stable's by more than a
//! relative tolerance?
//!
//! # Method
//!
//! Howard & Ramdas, "Sequential estimation of quantiles with applications to A/B-testing and
//! best-arm identification", Bernoulli 28(3), 2022 (arXiv:1906.09712): each arm gets the
//! time-uniform DKW band of [`super::dkw`] at level α/2, which holds for all sample counts t ≥
//! t_min and *all* quantiles at once. Inverting the band gives, for every p,
//!
//! ```text
//! Q(p) ≥ X₍k₎, k = ⌈t·(p − εₜ)⌉      (no lower bound when k < 1)
//! Q(p) ≤ X₍k₎, k = ⌈t·(p + εₜ)⌉      (no upper bound when k > t)
//! ```
//!
//! (X₍k₎ is the k-th smallest observation: for x < X₍k₎ the empirical F̂(x) ≤ (k−1)/t < p − ε, so
//! F(x) < p; at X₍k₎ with the upper index F ≥ F̂ − ε ≥ p.) Because tolerances are relative
//! ("10 % slower"), the test bounds the *ratio* of the canary's quantile to stable's:
//!
//! ```text
//! Q_canary(p) / Q_stable(p) ≥ L_canary(p) / U_stable(p)
//! ```
//!
//! and declares a regression when this lower bound exceeds 1 + tolerance for some requested p.
//! With probability at least 1 − α both bands hold at every time, and then a regression is
//! declared only if one exists: the false-alarm probability over the whole rollout, however
//! often the test is evaluated, is at most α. This is the construction of Lindon, Sanden &
//! Shirikian (KDD 2022) and Netflix's "Sequential A/B Testing Keeps the World Streaming, Part 1"
//! (a band per arm, compared quantile by quantile), with a ratio in place of a difference.
//!
//! The always-valid p-value is the smallest α at which the test has rejected so far: the largest
//! band constant C at which it rejects is found by bisection (rejection only gets harder as C
//! grows), and p = min over time of 2·α(C) (two arms at α/2 each), at most 1. P(ever p ≤ α) ≤ α.
//!
//! # Assumptions and limits
//!
//! - Observations within an arm are treated as i.i.d. draws. A latency trend that hits both arms
//!   (a load spike) is not cancelled the way the counts test cancels a shared failure trend;
//!   the band stays valid only if such trends are mild relative to the band's width.
//! - Histograms are bucketed: the test compares the bucketed values (each latency rounded to its
//!   bucket's value), which is a monotone map, so quantiles commute with it and an A/A rollout
//!   stays an A/A rollout. The bucket resolution (about 0.1–1 % for hdrhistogram) is the
//!   finest tolerance that means anything.
//! - The band is uniform in p, hence loose in the tails: stable's p99 upper bound needs
//!   εₜ < 0.01, i.e. about 90,000 stable samples at α = 0.01. Shifts of the whole distribution are
//!   caught through p50 / p95 long before; a tail-only regression needs per-quantile confidence
//!   sequences (confseq's beta-binomial mixtures), which this module does not implement.
//! - Latencies are nonnegative; negative or non-finite values are dropped from histograms.

use serde::{Deserialize, Serialize};

use super::dkw::{alpha_for_c, c_for_alpha, check_a, epsilon, DEFAULT_A};
use super::{check_alpha, ConfigError};

/// A latency histogram: `(value_ms, count)` buckets sorted by value, one per distinct value.
/// Mergeable; the router's hdrhistogram maps to it bucket by bucket (each bucket's highest
/// equivalent value and its count). Serializes as `[[value_ms, count], …]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "Vec<(f64, u64)>", into = "Vec<(f64, u64)>")]
pub struct LatencyHistogram {
    buckets: Vec<(f64, u64)>,
    /// Running totals of `buckets`' counts (for order statistics by binary search).
    cumulative: Vec<u64>,
    total: u64,
}

impl From<Vec<(f64, u64)>> for LatencyHistogram {
    fn from(buckets: Vec<(f64, u64)>) -> Self {
        LatencyHistogram::from_buckets(buckets)
    }
}

impl From<LatencyHistogram> for Vec<(f64, u64)> {
    fn from(h: LatencyHistogram) -> Self {
        h.buckets
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    /// Buckets in any order; equal values are merged, empty buckets and negative or non-finite
    /// values dropped.
    pub fn from_buckets(buckets: impl IntoIterator<Item = (f64, u64)>) -> Self {
        let mut v: Vec<(f64, u64)> = buckets
            .into_iter()
            .filter(|&(x, n)| n > 0 && x.is_finite() && x >= 0.0)
            .map(|(x, n)| (x + 0.0, n)) // -0.0 → 0.0
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out: Vec<(f64, u64)> = Vec::with_capacity(v.len());
        for (x, n) in v {
            match out.last_mut() {
                Some(last) if last.0 == x => last.1 += n,
                _ => out.push((x, n)),
            }
        }
        Self::from_sorted(out)
    }

    fn from_sorted(buckets: Vec<(f64, u64)>) -> Self {
        let mut total = 0;
        let cumulative = buckets
            .iter()
            .map(|b| {
                total += b.1;
                total
            })
            .collect();
        LatencyHistogram {
            buckets,
            cumulative,
            total,
        }
    }

    /// Raw observations, one each.
    pub fn from_values(values: impl IntoIterator<Item = f64>) -> Self {
        Self::from_buckets(values.into_iter().map(|v| (v, 1)))
    }

    pub fn record(&mut self, value_ms: f64) {
        self.record_n(value_ms, 1);
    }

    pub fn record_n(&mut self, value_ms: f64, count: u64) {
        if count == 0 || !value_ms.is_finite() || value_ms < 0.0 {
            return;
        }
        let value_ms = value_ms + 0.0;
        let mut buckets = std::mem::take(&mut self.buckets);
        match buckets.binary_search_by(|b| b.0.total_cmp(&value_ms)) {
            Ok(i) => buckets[i].1 += count,
            Err(i) => buckets.insert(i, (value_ms, count)),
        }
        *self = Self::from_sorted(buckets);
    }

    /// Adds another histogram's counts (a sorted merge).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if other.total == 0 {
            return;
        }
        // Usually every value of `other` already has a bucket here: add in place.
        let mut at = Vec::with_capacity(other.buckets.len());
        let mut from = 0;
        for &(x, _) in &other.buckets {
            match self.buckets[from..].binary_search_by(|b| b.0.total_cmp(&x)) {
                Ok(i) => {
                    at.push(from + i);
                    from += i;
                }
                Err(_) => break,
            }
        }
        if at.len() == other.buckets.len() {
            for (&i, &(_, n)) in at.iter().zip(&other.buckets) {
                self.buckets[i].1 += n;
            }
            let mut total = 0;
            for (c, b) in self.cumulative.iter_mut().zip(&self.buckets) {
                total += b.1;
                *c = total;
            }
            self.total = total;
            return;
        }
        let mut out = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.buckets, &other.buckets);
        while i < a.len() || j < b.len() {
            if j == b.len() || (i < a.len() && a[i].0 < b[j].0) {
                out.push(a[i]);
                i += 1;
            } else if i == a.len() || b[j].0 < a[i].0 {
                out.push(b[j]);
                j += 1;
            } else {
                out.push((a[i].0, a[i].1 + b[j].1));
                i += 1;
                j += 1;
            }
        }
        *self = Self::from_sorted(out);
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn buckets(&self) -> &[(f64, u64)] {
        &self.buckets
    }

    /// X₍k₎, the k-th smallest observation (1-based); `None` outside 1..=count.
    pub fn order_statistic(&self, k: u64) -> Option<f64> {
        if k == 0 || k > self.total {
            return None;
        }
        let i = self.cumulative.partition_point(|&c| c < k);
        self.buckets.get(i).map(|b| b.0)
    }

    /// The empirical p-quantile inf{x: F̂(x) ≥ p} = X₍⌈t·p⌉₎ (X₍₁₎ for p = 0).
    pub fn quantile(&self, p: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&p) {
            return None;
        }
        let k = ((self.total as f64) * p).ceil().max(1.0) as u64;
        self.order_statistic(k)
    }

    /// The band's lower and upper bounds on Q(p) for a band half-width `eps` (`None`: no band).
    fn quantile_bounds(&self, p: f64, eps: Option<f64>) -> (Option<f64>, Option<f64>) {
        let Some(eps) = eps else {
            return (None, None);
        };
        let t = self.total as f64;
        // Nudged outwards so that rounding never makes an index less conservative.
        let lower = t * (p - eps);
        let upper = t * (p + eps);
        let lower = if lower > 0.0 {
            self.order_statistic((lower - 1e-9 * t.max(1.0)).ceil().max(1.0) as u64)
        } else {
            None
        };
        let upper = if upper <= t {
            self.order_statistic((upper + 1e-9 * t.max(1.0)).ceil() as u64)
        } else {
            None
        };
        (lower, upper)
    }
}

/// Settings of the latency test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LatencyConfig {
    /// The probability of ever declaring a regression of an A/A rollout (split α/2 per arm).
    pub alpha: f64,
    /// Relative: 0.1 means "worse by more than 10 %".
    pub tolerance: f64,
    /// Absolute, in milliseconds: a regression must also be slower by more than this. Below a
    /// millisecond, the two versions' latencies differ by how they were measured (a mirrored
    /// copy goes through another client than a user's request) as much as by the versions, and
    /// no user notices; 0 compares ratios alone.
    pub min_difference_ms: f64,
    /// The quantiles compared, each in (0, 1).
    pub quantiles: Vec<f64>,
    /// t_min: samples an arm needs before its band is used. At α = 0.01 the band is wider than
    /// ±0.5 until about 30 samples, so starting it at 20 costs nothing.
    pub min_samples: u64,
    /// A of the band (> 1/√2); 0.85 as in the paper.
    pub band_scale: f64,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            alpha: 0.01,
            tolerance: 0.1,
            min_difference_ms: 0.0,
            quantiles: vec![0.5, 0.95, 0.99],
            min_samples: 20,
            band_scale: DEFAULT_A,
        }
    }
}

/// The evidence for one quantile at the configured α. Bounds are `None` where the band does not
/// reach (too few samples for that quantile yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuantileEvidence {
    pub quantile: f64,
    /// Empirical quantiles.
    pub canary_ms: Option<f64>,
    pub stable_ms: Option<f64>,
    pub canary_lower_ms: Option<f64>,
    pub canary_upper_ms: Option<f64>,
    pub stable_lower_ms: Option<f64>,
    pub stable_upper_ms: Option<f64>,
    /// canary_ms / stable_ms.
    pub ratio: Option<f64>,
    /// canary_lower / stable_upper: 0 when either bound is missing.
    pub ratio_lower: f64,
    /// canary_upper / stable_lower: `None` when unbounded.
    pub ratio_upper: Option<f64>,
    /// canary_lower − stable_upper: how much slower, at least, with confidence (`None` when
    /// either bound is missing).
    pub difference_lower_ms: Option<f64>,
    /// ratio_lower > 1 + tolerance and difference_lower_ms > min_difference_ms.
    pub regression: bool,
}

/// What the status display shows for the latency test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencyEvidence {
    pub alpha: f64,
    pub tolerance: f64,
    pub min_difference_ms: f64,
    pub canary_samples: u64,
    pub stable_samples: u64,
    /// Band half-widths εₜ at α/2 (`None` below min_samples).
    pub canary_epsilon: Option<f64>,
    pub stable_epsilon: Option<f64>,
    pub quantiles: Vec<QuantileEvidence>,
    /// The always-valid p-value so far.
    pub p_value: f64,
    /// Whether a regression has been declared at α (once true, it stays true).
    pub rejected: bool,
}

/// The band constant above which the p-value search stops (α(C) ≈ e^{-560} there).
const C_MAX: f64 = 400.0;

/// The sequential latency test: cumulative histograms of both arms plus the running p-value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencyTest {
    config: LatencyConfig,
    /// C of each arm's band at α/2.
    c_alpha: f64,
    /// The largest C at which the test has rejected so far (initially the C of p = 1).
    best_c: f64,
    p_value: f64,
    rejected: bool,
    canary: LatencyHistogram,
    stable: LatencyHistogram,
}

impl LatencyTest {
    pub fn new(config: LatencyConfig) -> Result<Self, ConfigError> {
        check_alpha(config.alpha)?;
        check_a(config.band_scale)?;
        if !(config.tolerance.is_finite() && config.tolerance >= 0.0) {
            return Err(ConfigError(format!(
                "tolerance: must be a nonnegative number, got {}",
                config.tolerance
            )));
        }
        if !(config.min_difference_ms.is_finite() && config.min_difference_ms >= 0.0) {
            return Err(ConfigError(format!(
                "minDifferenceMs: must be a nonnegative number, got {}",
                config.min_difference_ms
            )));
        }
        if config.quantiles.is_empty() {
            return Err(ConfigError("quantiles: at least one is needed".into()));
        }
        if let Some(p) = config.quantiles.iter().find(|p| !(**p > 0.0 && **p < 1.0)) {
            return Err(ConfigError(format!("quantiles: {p} is not in (0, 1)")));
        }
        if config.min_samples == 0 {
            return Err(ConfigError("minSamples: must be at least 1".into()));
        }
        let c_alpha = c_for_alpha(config.alpha / 2.0, config.band_scale);
        let c_one = c_for_alpha(0.5, config.band_scale);
        Ok(LatencyTest {
            config,
            c_alpha,
            best_c: c_one,
            p_value: 1.0,
            rejected: false,
            canary: LatencyHistogram::new(),
            stable: LatencyHistogram::new(),
        })
    }

    pub fn config(&self) -> &LatencyConfig {
        &self.config
    }

    /// Adds the latencies recorded since the last call (deltas, not cumulative histograms).
    pub fn observe(&mut self, canary: &LatencyHistogram, stable: &LatencyHistogram) {
        self.canary.merge(canary);
        self.stable.merge(stable);
        // The p-value can only improve if the test now rejects at a larger C than before.
        let probe = self.best_c * (1.0 + 1e-9);
        let improves = self.rejects_at(probe);
        // Rejection only gets harder as C grows: no rejection at `probe` ≤ C_α means none at C_α.
        if !self.rejected && (improves || probe > self.c_alpha) && self.rejects_at(self.c_alpha) {
            self.rejected = true;
        }
        if improves {
            let mut lo = probe;
            if self.rejects_at(C_MAX) {
                lo = C_MAX;
            } else {
                let mut hi = C_MAX;
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if self.rejects_at(mid) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
            }
            self.best_c = lo;
            let p = (2.0 * alpha_for_c(self.config.band_scale, lo)).min(1.0);
            self.p_value = self.p_value.min(p);
        }
    }

    /// Whether a regression has been declared at the configured α.
    pub fn rejected(&self) -> bool {
        self.rejected
    }

    /// The always-valid p-value: the smallest α at which the test has rejected so far (≤ 1).
    pub fn p_value(&self) -> f64 {
        self.p_value
    }

    pub fn canary(&self) -> &LatencyHistogram {
        &self.canary
    }

    pub fn stable(&self) -> &LatencyHistogram {
        &self.stable
    }

    fn epsilons(&self, c: f64) -> (Option<f64>, Option<f64>) {
        let (a, t_min) = (self.config.band_scale, self.config.min_samples as f64);
        (
            epsilon(a, c, t_min, self.canary.count()),
            epsilon(a, c, t_min, self.stable.count()),
        )
    }

    fn rejects_at(&self, c: f64) -> bool {
        let (ec, es) = self.epsilons(c);
        if ec.is_none() || es.is_none() {
            return false;
        }
        self.config.quantiles.iter().any(|&p| {
            let (lower, _) = self.canary.quantile_bounds(p, ec);
            let (_, upper) = self.stable.quantile_bounds(p, es);
            self.regression(lower, upper)
        })
    }

    /// Both bounds clear: slower by more than the relative tolerance and the absolute floor.
    /// (Each only gets harder as the bands widen, so rejection stays monotone in C.)
    fn regression(&self, canary_lower: Option<f64>, stable_upper: Option<f64>) -> bool {
        ratio_lower(canary_lower, stable_upper) > 1.0 + self.config.tolerance
            && difference_lower(canary_lower, stable_upper)
                .is_some_and(|d| d > self.config.min_difference_ms)
    }

    /// Per-quantile bounds and the verdict at the configured α.
    pub fn evidence(&self) -> LatencyEvidence {
        let (ec, es) = self.epsilons(self.c_alpha);
        let quantiles = self
            .config
            .quantiles
            .iter()
            .map(|&p| {
                let (cl, cu) = self.canary.quantile_bounds(p, ec);
                let (sl, su) = self.stable.quantile_bounds(p, es);
                let (c, s) = (self.canary.quantile(p), self.stable.quantile(p));
                let lower = ratio_lower(cl, su);
                QuantileEvidence {
                    quantile: p,
                    canary_ms: c,
                    stable_ms: s,
                    canary_lower_ms: cl,
                    canary_upper_ms: cu,
                    stable_lower_ms: sl,
                    stable_upper_ms: su,
                    ratio: match (c, s) {
                        (Some(c), Some(s)) if s > 0.0 => Some(c / s),
                        _ => None,
                    },
                    ratio_lower: lower,
                    difference_lower_ms: difference_lower(cl, su),
                    ratio_upper: match (cu, sl) {
                        (Some(u), Some(l)) if l > 0.0 => Some(u / l),
                        _ => None,
                    },
                    regression: self.regression(cl, su),
                }
            })
            .collect();
        LatencyEvidence {
            alpha: self.config.alpha,
            tolerance: self.config.tolerance,
            min_difference_ms: self.config.min_difference_ms,
            canary_samples: self.canary.count(),
            stable_samples: self.stable.count(),
            canary_epsilon: ec,
            stable_epsilon: es,
            quantiles,
            p_value: self.p_value,
            rejected: self.rejected,
        }
    }
}

/// A lower bound on Q_canary / Q_stable from the canary's lower and stable's upper bound; 0 (no
/// evidence) when either is missing or stable's bound is 0 ms.
fn ratio_lower(canary_lower: Option<f64>, stable_upper: Option<f64>) -> f64 {
    match (canary_lower, stable_upper) {
        (Some(l), Some(u)) if u > 0.0 => l / u,
        _ => 0.0,
    }
}

fn difference_lower(canary_lower: Option<f64>, stable_upper: Option<f64>) -> Option<f64> {
    Some(canary_lower? - stable_upper?)
}

impl Default for LatencyTest {
    fn default() -> Self {
        LatencyTest::new(LatencyConfig::default()).expect("the default configuration is valid")
    }
}
