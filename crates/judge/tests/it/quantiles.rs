//! The latency test: the band's constant, its bounds by hand, false alarms over A/A rollouts and
//! how fast a slower canary is caught.

use crate::common;

use coalmine_judge::sequential::dkw::{alpha_for_c, c_for_alpha, TimeUniformDkw};
use coalmine_judge::sequential::quantiles::{LatencyConfig, LatencyHistogram, LatencyTest};
use common::{median, three_sigma_limit, Rng};

#[test]
fn the_band_constant_solves_theorem_two() {
    // Reference: Theorem 2's bound minimised over η and solved for C with scipy 1.17.1
    // (scipy.optimize.brentq / minimize_scalar, mirroring confseq's find_optimal_C), A = 0.85.
    for (alpha, want) in [
        (0.05, 8.122_719_345_838_11),
        (0.01, 9.283_543_354_029_138),
        (0.005, 9.783_365_215_444_672),
    ] {
        let c = c_for_alpha(alpha, 0.85);
        assert!((c - want).abs() < 1e-6, "α = {alpha}: C = {c}, want {want}");
        let back = alpha_for_c(0.85, c);
        assert!((back / alpha - 1.0).abs() < 1e-6, "α({c}) = {back}");
    }
    // The paper's closed form 0.8·ln(1612/α) is a convenient, slightly wider simplification.
    for alpha in [0.1, 0.05, 0.01, 0.005, 0.001] {
        assert!(c_for_alpha(alpha, 0.85) <= 0.8 * (1612.0f64 / alpha).ln());
    }
}

#[test]
fn epsilon_for_given_sample_counts() {
    // ε_t = 0.85·sqrt((ln(1 + ln(t/20)) + 9.783365)/t) at α = 0.005 (each arm of α = 0.01):
    // t = 100: ln 5 = 1.609438, ln 2.609438 = 0.959135, (0.959135 + 9.783365)/100 = 0.107425,
    //          sqrt = 0.327757, × 0.85 = 0.278594.
    // t = 200: ln 10 = 2.302585, ln 3.302585 = 1.194705, (1.194705 + 9.783365)/200 = 0.054890,
    //          sqrt = 0.234287, × 0.85 = 0.199144.
    let band = TimeUniformDkw::for_alpha(0.005, 0.85, 20.0).unwrap();
    assert!((band.epsilon(100).unwrap() - 0.278_593_903).abs() < 1e-8);
    assert!((band.epsilon(200).unwrap() - 0.199_143_869).abs() < 1e-8);
    assert!((band.epsilon(20).unwrap() - 0.594_494_801).abs() < 1e-8);
    assert_eq!(band.epsilon(19), None);
    assert!(TimeUniformDkw::for_alpha(0.0, 0.85, 20.0).is_err());
    assert!(TimeUniformDkw::for_alpha(0.01, 0.7, 20.0).is_err());
}

#[test]
fn histograms_merge_and_answer_order_statistics() {
    let mut h =
        LatencyHistogram::from_buckets([(5.0, 2), (1.0, 1), (5.0, 1), (3.0, 0), (f64::NAN, 4)]);
    assert_eq!(h.buckets(), &[(1.0, 1), (5.0, 3)]);
    assert_eq!(h.count(), 4);
    h.merge(&LatencyHistogram::from_values([2.0, 5.0, 7.0]));
    assert_eq!(h.buckets(), &[(1.0, 1), (2.0, 1), (5.0, 4), (7.0, 1)]);
    h.record(0.5);
    h.record_n(-1.0, 3); // dropped: latencies are nonnegative
    assert_eq!(h.count(), 8);
    let order: Vec<f64> = (1..=8).map(|k| h.order_statistic(k).unwrap()).collect();
    assert_eq!(order, [0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 7.0]);
    assert_eq!(h.order_statistic(0), None);
    assert_eq!(h.order_statistic(9), None);
    // inf{x: F̂(x) ≥ p} = X₍⌈8p⌉₎
    assert_eq!(h.quantile(0.5), Some(5.0));
    assert_eq!(h.quantile(0.25), Some(1.0));
    assert_eq!(h.quantile(0.3), Some(2.0));
    assert_eq!(h.quantile(1.0), Some(7.0));
    let json = serde_json::to_string(&h).unwrap();
    assert_eq!(json, "[[0.5,1],[1.0,1],[2.0,1],[5.0,4],[7.0,1]]");
    let back: LatencyHistogram = serde_json::from_str("[[5,1],[1,2],[5,1]]").unwrap();
    assert_eq!(back.buckets(), &[(1.0, 2), (5.0, 2)]);
}

#[test]
fn quantile_bounds_by_hand() {
    // Both arms saw 1, 2, …, 100 ms once each. At α = 0.01 (0.005 per arm), t = 100:
    // ε = 0.278594 (above). p = 0.5: lower index ⌈100·(0.5 − ε)⌉ = ⌈22.14⌉ = 23 → 23 ms,
    // upper index ⌈100·(0.5 + ε)⌉ = ⌈77.86⌉ = 78 → 78 ms. So the ratio canary/stable lies in
    // [23/78, 78/23] = [0.2949, 3.3913]. p = 0.95: lower ⌈67.14⌉ = 68 → 68 ms; upper index 123 >
    // 100: unbounded.
    let mut test = LatencyTest::default();
    let h = LatencyHistogram::from_values((1..=100).map(f64::from));
    test.observe(&h, &h);
    let e = test.evidence();
    assert!((e.canary_epsilon.unwrap() - 0.278_593_903).abs() < 1e-8);
    let p50 = &e.quantiles[0];
    assert_eq!(p50.quantile, 0.5);
    assert_eq!((p50.canary_ms, p50.stable_ms), (Some(50.0), Some(50.0)));
    assert_eq!(
        (p50.canary_lower_ms, p50.canary_upper_ms),
        (Some(23.0), Some(78.0))
    );
    assert_eq!(
        (p50.stable_lower_ms, p50.stable_upper_ms),
        (Some(23.0), Some(78.0))
    );
    assert!((p50.ratio_lower - 23.0 / 78.0).abs() < 1e-12);
    assert!((p50.ratio_upper.unwrap() - 78.0 / 23.0).abs() < 1e-12);
    assert_eq!(p50.ratio, Some(1.0));
    assert!(!p50.regression);
    let p95 = &e.quantiles[1];
    assert_eq!(
        (p95.canary_lower_ms, p95.canary_upper_ms),
        (Some(68.0), None)
    );
    assert_eq!(p95.ratio_lower, 68.0 / 100.0 * 0.0 + p95.ratio_lower);
    assert_eq!(p95.stable_upper_ms, None);
    assert_eq!(
        p95.ratio_lower, 0.0,
        "no upper bound on stable: no evidence"
    );
    assert!(!e.rejected);
    assert_eq!(e.p_value, 1.0);

    // A canary ten times slower over the same 100 samples: canary p50 ≥ 230 ms, stable p50 ≤ 78
    // ms, ratio ≥ 230/78 = 2.95 > 1.1: a regression.
    let mut test = LatencyTest::default();
    let slow = LatencyHistogram::from_values((1..=100).map(|v| f64::from(v) * 10.0));
    test.observe(&slow, &h);
    let e = test.evidence();
    assert!((e.quantiles[0].ratio_lower - 230.0 / 78.0).abs() < 1e-12);
    assert!(e.quantiles[0].regression);
    assert!(e.rejected && test.rejected());
    assert!(test.p_value() <= 0.01);

    // Below min_samples there is no band at all.
    let mut test = LatencyTest::default();
    let few = LatencyHistogram::from_values((1..=19).map(|v| f64::from(v) * 100.0));
    test.observe(&few, &h);
    assert_eq!(test.evidence().canary_epsilon, None);
    assert!(!test.rejected());
}

#[test]
fn configurations_are_checked() {
    let bad = |f: fn(&mut LatencyConfig)| {
        let mut c = LatencyConfig::default();
        f(&mut c);
        LatencyTest::new(c).unwrap_err().to_string()
    };
    assert!(bad(|c| c.alpha = 1.0).starts_with("alpha"));
    assert!(bad(|c| c.tolerance = -0.1).starts_with("tolerance"));
    assert!(bad(|c| c.min_difference_ms = f64::NAN).starts_with("minDifferenceMs"));
    assert!(bad(|c| c.min_difference_ms = -1.0).starts_with("minDifferenceMs"));
    assert!(bad(|c| c.quantiles = vec![0.5, 1.0]).starts_with("quantiles"));
    assert!(bad(|c| c.quantiles.clear()).starts_with("quantiles"));
    assert!(bad(|c| c.min_samples = 0).starts_with("minSamples"));
    assert!(bad(|c| c.band_scale = 0.5).starts_with("bandScale"));
}

/// Latencies as the router's histogram would hold them: lognormal draws rounded up to buckets
/// 1 % wide (bucket i holds values in (1.01^(i−1), 1.01^i] and reports 1.01^i).
fn bucketed(rng: &mut Rng, n: u64, median: f64, sigma: f64) -> LatencyHistogram {
    const STEP: f64 = 0.009_950_330_853_168_083; // ln 1.01
    let ln_median = median.ln();
    let mut index: Vec<i64> = (0..n)
        .map(|_| ((ln_median + sigma * rng.normal()) / STEP).ceil() as i64)
        .collect();
    index.sort_unstable();
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut last = None;
    for i in index {
        if last == Some(i) {
            buckets.last_mut().unwrap().1 += 1;
        } else {
            buckets.push(((i as f64 * STEP).exp(), 1));
            last = Some(i);
        }
    }
    LatencyHistogram::from_buckets(buckets)
}

/// `runs` A/A rollouts at 200 req/s, 5 → 10 → 25 → 50 % for 150 s each, both arms lognormal
/// with median 50 ms and σ = 0.5, evaluated every second. Two tests watch each rollout: the
/// default (α = 0.01, tolerance 10 %) and the strictest setting (α = 0.2, tolerance 0, where any
/// lower bound above 1 counts). The bands hold at all times with probability ≥ 1 − α, so the
/// number of rejecting runs is at most Binomial(runs, α) in distribution; the limit is
/// runs·α + 3·√(runs·α(1−α)). DKW bands are conservative: expect about none.
fn aa_latency_rollouts(runs: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let strict = LatencyConfig {
        alpha: 0.2,
        tolerance: 0.0,
        ..LatencyConfig::default()
    };
    let (mut default_rejected, mut strict_rejected) = (0, 0);
    for _ in 0..runs {
        let mut default_test = LatencyTest::default();
        let mut strict_test = LatencyTest::new(strict.clone()).unwrap();
        for (weight, seconds) in [(0.05, 150), (0.10, 150), (0.25, 150), (0.50, 150)] {
            for _ in 0..seconds {
                let canary = rng.binomial(200, weight);
                let c = bucketed(&mut rng, canary, 50.0, 0.5);
                let s = bucketed(&mut rng, 200 - canary, 50.0, 0.5);
                default_test.observe(&c, &s);
                strict_test.observe(&c, &s);
            }
        }
        default_rejected += u64::from(default_test.rejected());
        strict_rejected += u64::from(strict_test.rejected());
        assert_eq!(strict_test.rejected(), strict_test.p_value() <= 0.2);
    }
    let (limit_default, limit_strict) =
        (three_sigma_limit(runs, 0.01), three_sigma_limit(runs, 0.2));
    eprintln!(
        "A/A latency: {default_rejected} of {runs} rejected at α = 0.01 (tolerance 0.1, limit \
         {limit_default}), {strict_rejected} at α = 0.2 (tolerance 0, limit {limit_strict})"
    );
    assert!(default_rejected <= limit_default);
    assert!(strict_rejected <= limit_strict);
}

#[test]
fn aa_rollouts_rarely_declare_a_latency_regression() {
    // Sized for debug builds: 100 runs, limits 1 + 3·√0.99 = 3.98 → 3 runs at α = 0.01 and
    // 20 + 3·√16 = 32 at α = 0.2.
    aa_latency_rollouts(100, 0xAA);
}

/// The same with 1000 runs (limits 19 and 237): `cargo test --release -p coalmine-judge --
/// --ignored`.
#[test]
#[ignore = "heavy: run in release"]
fn aa_rollouts_rarely_declare_a_latency_regression_many_runs() {
    aa_latency_rollouts(1000, 0xAAA);
}

#[test]
fn a_canary_fifty_percent_slower_is_caught_within_half_a_minute() {
    // Canary at 5 % of 200 req/s (10 req/s), every latency 1.5× stable's (median 75 vs 50 ms,
    // σ = 0.5), tolerance 10 %, α = 0.01. Back of the envelope with the empirical quantiles at
    // their true values: after t seconds ε_canary = ε(10t), ε_stable = ε(190t) with C = 9.7834,
    // and the p50 lower bound on the ratio is 1.5·exp(0.5·(z(0.5 − ε_c) − z(0.5 + ε_s))), which
    // first exceeds 1.1 at t = 22 s (ε_c = 0.190, ε_s = 0.045; z is the normal quantile). p95 and
    // p99 come later (p95 at about 190 s). Sampling noise spreads runs around that: M = 27 s for
    // the median of 100 runs (the target is 30 s).
    let mut rng = Rng::new(50);
    let mut times = Vec::new();
    for _ in 0..100 {
        let mut test = LatencyTest::default();
        let mut when = None;
        for second in 1..=120 {
            let canary = rng.binomial(200, 0.05);
            let before = test.p_value();
            test.observe(
                &bucketed(&mut rng, canary, 75.0, 0.5),
                &bucketed(&mut rng, 200 - canary, 50.0, 0.5),
            );
            assert!(test.p_value() <= before, "the p-value never rises");
            if test.rejected() {
                assert!(test.p_value() <= 0.01 * (1.0 + 1e-9));
                assert!(test.evidence().quantiles[0].regression);
                when = Some(second);
                break;
            }
            assert!(
                test.p_value() > 0.01 * (1.0 - 1e-6),
                "p ≤ α without rejecting"
            );
        }
        times.push(when.expect("caught within two minutes") as f64);
    }
    let m = median(&mut times);
    eprintln!("+50 % latency: median {m} s to reject");
    assert!(m <= 27.0, "median {m} s");
}

/// A rollout of a sub-millisecond service at 400 req/s, canary at 50 %, for 10 minutes, whose
/// canary is 25 % "slower" by how it is measured: the shift the router's mirrored copies show
/// against users' requests (release build, 127.0.0.1: p50 0.194 vs 0.158 ms, p95 0.531 vs 0.437
/// ms). With ratios alone the test rolls the healthy canary back; with the 1 ms floor a
/// difference no user notices never counts, while a real 3 ms regression of the same service
/// is still caught.
fn sub_millisecond_rollout(canary_median_ms: f64, min_difference_ms: f64, seed: u64) -> bool {
    let mut rng = Rng::new(seed);
    let mut test = LatencyTest::new(LatencyConfig {
        min_difference_ms,
        ..LatencyConfig::default()
    })
    .unwrap();
    for _ in 0..600 {
        test.observe(
            &bucketed(&mut rng, 200, canary_median_ms, 0.5),
            &bucketed(&mut rng, 200, 0.158, 0.5),
        );
        if test.rejected() {
            let worst = &test.evidence().quantiles[0];
            assert!(worst.difference_lower_ms.unwrap() > min_difference_ms);
            return true;
        }
    }
    false
}

#[test]
fn a_sub_millisecond_shift_is_not_a_regression_but_a_real_slowdown_is() {
    assert!(
        sub_millisecond_rollout(0.198, 0.0, 11),
        "without a floor, a 25 % shift of 0.04 ms is caught (the test is sensitive enough)"
    );
    assert!(!sub_millisecond_rollout(0.198, 1.0, 11));
    assert!(sub_millisecond_rollout(3.2, 1.0, 11));
}

#[test]
fn the_test_survives_serialization() {
    let mut rng = Rng::new(7);
    let mut test = LatencyTest::default();
    for _ in 0..30 {
        test.observe(
            &bucketed(&mut rng, 10, 75.0, 0.5),
            &bucketed(&mut rng, 190, 50.0, 0.5),
        );
    }
    let json = serde_json::to_string(&test).unwrap();
    let back: LatencyTest = serde_json::from_str(&json).unwrap();
    assert_eq!(back.canary().count(), 300);
    assert_eq!(back.stable().count(), 5700);
    assert_eq!(back.rejected(), test.rejected());
    let evidence = serde_json::to_value(test.evidence()).unwrap();
    assert_eq!(evidence["quantiles"][0]["quantile"], 0.5);
    assert!(
        evidence["quantiles"][2]["stableUpperMs"].is_null(),
        "p99 unbounded after 5700 samples"
    );
}
