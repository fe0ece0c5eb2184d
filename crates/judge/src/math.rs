//! Small numerical helpers shared by the judges. Written here rather than pulled from a crate:
//! the judge needs only these few functions, and keeping them local keeps the crate free of
//! runtime dependencies beyond serde.

/// `ln(Σ exp(x))` without overflow; `-inf` for an empty input.
pub(crate) fn log_sum_exp(xs: impl IntoIterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().into_iter().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY || max.is_nan() {
        return max;
    }
    if max == f64::INFINITY {
        return f64::INFINITY;
    }
    let sum: f64 = xs.into_iter().map(|x| (x - max).exp()).sum();
    max + sum.ln()
}

/// `ln(1 + e^x)`, accurate for every x.
pub(crate) fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// The complementary error function, to about 1e-14 relative accuracy: the positive-term series
/// `erf(x) = 2/√π · e^{-x²} · Σ 2ⁿ x^{2n+1} / (1·3·…·(2n+1))` below ½ and the continued fraction
/// `erfc(x) = e^{-x²}/√π · 1/(x + ½/(x + 1/(x + 3/2/(x + …))))` above (evaluated with Lentz's
/// method) above, where 1 − erf would cancel. Both converge without cancellation there.
pub(crate) fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    const FRAC_1_SQRT_PI: f64 = 0.564_189_583_547_756_3;
    if x < 0.5 {
        let x2 = x * x;
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term > sum * 1e-17 {
            n += 1.0;
            term *= 2.0 * x2 / (2.0 * n + 1.0);
            sum += term;
        }
        1.0 - 2.0 * FRAC_1_SQRT_PI * (-x2).exp() * sum
    } else {
        // Continued fraction K = x + a1/(x + a2/(x + ...)) with a_n = n/2.
        let tiny = 1e-300;
        let mut f = x;
        let mut c = x;
        let mut d = 0.0;
        for n in 1..20_000 {
            let a = n as f64 / 2.0;
            d = x + a * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = x + a / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        FRAC_1_SQRT_PI * (-x * x).exp() / f
    }
}

/// Φ(x), the standard normal distribution function.
pub(crate) fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Φ⁻¹(p): Acklam's rational approximation (relative error below 1.2e-9) refined by one Halley
/// step on `normal_cdf`, which brings it to the accuracy of `erfc`.
pub(crate) fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.02425;
    let x = if p < P_LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Halley step: e = Φ(x) − p, u = e·√(2π)·exp(x²/2).
    let e = normal_cdf(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// A key that orders finite f64 values like the values themselves and makes adjacent floats
/// adjacent integers, so that bisection on keys ends on two neighbouring floats in at most 64
/// steps.
pub(crate) fn order_key(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

pub(crate) fn from_order_key(k: u64) -> f64 {
    if k >> 63 == 1 {
        f64::from_bits(k & !(1 << 63))
    } else {
        f64::from_bits(!k)
    }
}

/// For a predicate that is true at `lo`, false at `hi` (`lo < hi`) and changes once in between,
/// the two neighbouring floats where it changes: `(last true, first false)`.
pub(crate) fn bisect_floats(mut lo: f64, mut hi: f64, pred: impl Fn(f64) -> bool) -> (f64, f64) {
    let (mut klo, mut khi) = (order_key(lo), order_key(hi));
    while khi - klo > 1 {
        let kmid = klo + (khi - klo) / 2;
        let mid = from_order_key(kmid);
        if pred(mid) {
            klo = kmid;
            lo = mid;
        } else {
            khi = kmid;
            hi = mid;
        }
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_and_normal_match_reference_values() {
        // Reference values: scipy.special.erfc / scipy.stats.norm (scipy 1.17.1).
        let cases = [
            (0.0, 1.0),
            (0.5, 0.479_500_122_186_953_5),
            (1.0, 0.157_299_207_050_285_16),
            (2.9, 4.109_787_809_945_884e-5),
            (3.1, 1.164_865_736_719_958_4e-5),
            (5.0, 1.537_459_794_428_034_8e-12),
            (-1.0, 1.842_700_792_949_714_8),
        ];
        for (x, want) in cases {
            let got = erfc(x);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "erfc({x}) = {got}, want {want}"
            );
        }
        let z = normal_quantile(0.99);
        assert!((z - 2.326_347_874_040_840_8).abs() < 1e-13, "{z}");
        let z = normal_quantile(1e-10);
        assert!((z + 6.361_340_902_404_056).abs() < 1e-9, "{z}");
        assert!((normal_cdf(1.959_963_984_540_054) - 0.975).abs() < 1e-15);
    }

    #[test]
    fn log_sum_exp_is_stable() {
        assert!((log_sum_exp([1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!(log_sum_exp(std::iter::empty::<f64>()), f64::NEG_INFINITY);
        assert!((softplus(-800.0)).abs() < 1e-300);
        assert!((softplus(800.0) - 800.0).abs() < 1e-12);
    }

    #[test]
    fn bisection_on_floats_ends_on_neighbours() {
        let (lo, hi) = bisect_floats(-10.0, 10.0, |x| x < 0.3);
        assert!(lo < 0.3 && hi >= 0.3);
        assert_eq!(order_key(hi) - order_key(lo), 1);
        assert!(order_key(-1.0) < order_key(-0.5));
        assert!(order_key(-0.0) < order_key(0.0) || order_key(-0.0) + 1 == order_key(0.0));
        assert_eq!(from_order_key(order_key(-3.5)), -3.5);
    }
}
