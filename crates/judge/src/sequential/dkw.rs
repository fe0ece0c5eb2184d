//! The time-uniform Dvoretzky–Kiefer–Wolfowitz band of Howard & Ramdas, "Sequential estimation
//! of quantiles with applications to A/B-testing and best-arm identification", Bernoulli 28(3),
//! 2022 (arXiv:1906.09712), Theorem 2.
//!
//! For i.i.d. observations with distribution function F and empirical distribution function F̂ₜ
//! after t of them,
//!
//! ```text
//! P(∃ t ≥ t_min: sup_x |F̂ₜ(x) − F(x)| > εₜ) ≤ α,   εₜ = A·sqrt((ln(1 + ln(t / t_min)) + C) / t).
//! ```
//!
//! # The constant C
//!
//! Theorem 2 bounds the error probability, for A > 1/√2, C > 0 and any η > 1 with γ² > 1, by
//!
//! ```text
//! 4·exp(−γ²·C)·(1 + 1 / ((γ² − 1)·ln η)),   γ² = (2/η)·(A − sqrt(2(η − 1)/C))².
//! ```
//!
//! (η is the geometric spacing of the epochs the proof stitches together; it is a free parameter
//! of the proof, not of the data, so the smallest bound over η holds.) [`alpha_for_c`] minimises
//! this over η ∈ (1, η_max), where η_max solves sqrt(η/2) + sqrt(2(η − 1)/C) = A (γ² = 1 there),
//! and [`c_for_alpha`] inverts it by bisection (the bound decreases in C). This is the relation
//! the paper's first author implements in confseq (`EmpiricalProcessLILBound::find_optimal_C`).
//! At A = 0.85 it gives C = 8.1227 for α = 0.05, 9.2835 for α = 0.01 and 9.7834 for α = 0.005,
//! slightly below the closed form 0.8·ln(1612/α) = 8.30, 9.59, 10.15 that the paper states for
//! convenience (so the solved band is a little narrower and equally valid).
//!
//! t_min is the first sample count at which the band is used (below it the band is the whole
//! interval); it does not enter C. The price of time-uniformity is a band "only about twice as
//! wide" as the fixed-t DKW band (the paper's abstract).

use super::{check_alpha, ConfigError};

/// A = 0.85, the paper's and confseq's default.
pub const DEFAULT_A: f64 = 0.85;

/// The band εₜ for one arm at one level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeUniformDkw {
    pub a: f64,
    pub c: f64,
    pub t_min: f64,
}

impl TimeUniformDkw {
    /// The band whose probability of ever failing is at most `alpha`.
    pub fn for_alpha(alpha: f64, a: f64, t_min: f64) -> Result<Self, ConfigError> {
        check_alpha(alpha)?;
        check_a(a)?;
        if !(t_min.is_finite() && t_min >= 1.0) {
            return Err(ConfigError(format!(
                "minSamples: must be at least 1, got {t_min}"
            )));
        }
        Ok(TimeUniformDkw {
            a,
            c: c_for_alpha(alpha, a),
            t_min,
        })
    }

    /// εₜ, or `None` (the band is the whole interval) before t_min observations.
    pub fn epsilon(&self, t: u64) -> Option<f64> {
        epsilon(self.a, self.c, self.t_min, t)
    }
}

pub(crate) fn epsilon(a: f64, c: f64, t_min: f64, t: u64) -> Option<f64> {
    let t = t as f64;
    (t >= t_min && t > 0.0).then(|| a * (((t / t_min).ln().ln_1p() + c) / t).sqrt())
}

pub(crate) fn check_a(a: f64) -> Result<(), ConfigError> {
    if a.is_finite() && a > std::f64::consts::FRAC_1_SQRT_2 && a <= 10.0 {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "bandScale: A must be in (1/√2, 10], got {a}"
        )))
    }
}

/// ln of Theorem 2's bound at (C, η); +∞ where γ² ≤ 1.
fn ln_error_bound(a: f64, c: f64, eta: f64) -> f64 {
    let s = a - (2.0 * (eta - 1.0) / c).sqrt();
    if s <= 0.0 {
        return f64::INFINITY;
    }
    let gamma_sq = 2.0 / eta * s * s;
    if gamma_sq <= 1.0 {
        return f64::INFINITY;
    }
    4f64.ln() - gamma_sq * c + (1.0 / ((gamma_sq - 1.0) * eta.ln())).ln_1p()
}

/// ln of the smallest bound over η on the probability that the band with constant C ever fails.
pub fn ln_alpha_for_c(a: f64, c: f64) -> f64 {
    if c.is_nan() || c <= 0.0 {
        return f64::INFINITY;
    }
    // η_max: sqrt(η/2) + sqrt(2(η − 1)/C) = A; the left side grows with η, is 1/√2 < A at η = 1
    // and exceeds A at η = 2A².
    let g = |eta: f64| (eta / 2.0).sqrt() + (2.0 * (eta - 1.0) / c).sqrt() - a;
    let (mut lo, mut hi) = (1.0, 2.0 * a * a);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if g(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let eta_max = lo;
    if eta_max <= 1.0 {
        return f64::INFINITY;
    }
    // Search s = ln(η − 1): the optimum sits close to η = 1 (η ≈ 1.008 at A = 0.85), and the bound
    // is infinite at both ends. A coarse scan, then golden-section refinement around the best.
    let f = |s: f64| ln_error_bound(a, c, 1.0 + s.exp());
    let (s_lo, s_hi) = ((1e-12f64).ln(), (eta_max - 1.0).ln());
    if s_hi.is_nan() || s_hi <= s_lo {
        return f64::INFINITY;
    }
    const SCAN: usize = 256;
    let step = (s_hi - s_lo) / SCAN as f64;
    let (mut best_i, mut best) = (0, f64::INFINITY);
    for i in 1..SCAN {
        let v = f(s_lo + i as f64 * step);
        if v < best {
            best = v;
            best_i = i;
        }
    }
    if best == f64::INFINITY {
        return f64::INFINITY;
    }
    let (mut x0, mut x3) = (
        s_lo + (best_i - 1) as f64 * step,
        s_lo + (best_i + 1) as f64 * step,
    );
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let mut x1 = x3 - phi * (x3 - x0);
    let mut x2 = x0 + phi * (x3 - x0);
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..100 {
        if f1 <= f2 {
            x3 = x2;
            x2 = x1;
            f2 = f1;
            x1 = x3 - phi * (x3 - x0);
            f1 = f(x1);
        } else {
            x0 = x1;
            x1 = x2;
            f1 = f2;
            x2 = x0 + phi * (x3 - x0);
            f2 = f(x2);
        }
    }
    best.min(f1).min(f2)
}

/// The smallest bound over η on the probability that the band with constant C ever fails.
pub fn alpha_for_c(a: f64, c: f64) -> f64 {
    ln_alpha_for_c(a, c).exp()
}

/// The C whose band fails with probability at most α (bisection on C; the bound decreases in C).
pub fn c_for_alpha(alpha: f64, a: f64) -> f64 {
    let target = alpha.ln();
    let (mut lo, mut hi) = (1e-6, 1.0);
    while ln_alpha_for_c(a, hi) > target {
        hi *= 2.0;
        if hi > 1e6 {
            return f64::INFINITY;
        }
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if ln_alpha_for_c(a, mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // `hi` satisfies the bound (the conservative side).
    hi
}
