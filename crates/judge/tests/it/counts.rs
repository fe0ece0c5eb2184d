//! The failure-origin test: its arithmetic by hand, its agreement with the exact beta-binomial
//! mixture, its false-alarm rate over whole A/A rollouts, and how fast it catches bad canaries.

use crate::common;

use coalmine_judge::sequential::counts::{Batch, BatchError, CountsConfig, CountsTest};
use common::{median, three_sigma_limit, Rng};

fn batch(cr: u64, cf: u64, sr: u64, sf: u64) -> Batch {
    Batch {
        canary_requests: cr,
        canary_failures: cf,
        stable_requests: sr,
        stable_failures: sf,
    }
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

#[test]
fn bayes_factor_after_a_few_batches_matches_the_hand_computation() {
    // Prior: r = 2 and r = 4, weight ½ each. Per batch, L(r) *= r^fc / (1 + ρ(r − 1))^(fc + fs).
    let mut test = CountsTest::with_prior(&[(2.0, 0.5), (4.0, 0.5)]).unwrap();

    // ρ = 100/200 = 0.5, one canary failure:
    //   L(2) = 2/1.5 = 4/3, L(4) = 4/2.5 = 1.6, BF = (4/3 + 1.6)/2 = 1.466667.
    test.observe(batch(100, 1, 100, 0)).unwrap();
    assert!(close(test.bayes_factor(), (4.0 / 3.0 + 1.6) / 2.0, 1e-12));
    assert!(close(test.p_value(), 1.0 / 1.466_666_666_666_667, 1e-12));

    // ρ = 50/200 = 0.25, one stable failure:
    //   L(2) = 4/3 · 1/1.25 = 16/15, L(4) = 1.6 · 1/1.75 = 0.914286, BF = 0.990476.
    test.observe(batch(50, 0, 150, 1)).unwrap();
    assert!(close(
        test.bayes_factor(),
        (16.0 / 15.0 + 1.6 / 1.75) / 2.0,
        1e-12
    ));
    // The p-value is the running minimum of 1/BF: it stays at 1/1.466667.
    assert!(close(test.p_value(), 1.0 / 1.466_666_666_666_667, 1e-12));

    // The canary got no requests: five stable failures say nothing about origin.
    test.observe(batch(0, 0, 100, 5)).unwrap();
    assert!(close(test.bayes_factor(), 0.990_476_190_476_190_5, 1e-12));

    // ρ = 20/100 = 0.2, three canary failures:
    //   L(2) = 16/15 · 8/1.2³ = 4.938272, L(4) = 0.914286 · 64/1.6³ = 14.285714,
    //   BF = 9.611993, p = 0.104037.
    test.observe(batch(20, 3, 80, 0)).unwrap();
    let want = (16.0 / 15.0 * 8.0 / 1.728 + 1.6 / 1.75 * 64.0 / 4.096) / 2.0;
    assert!(close(want, 9.611_992_945_326_28, 1e-9));
    assert!(close(test.bayes_factor(), want, 1e-9));
    let lrs = test.log_likelihood_ratios();
    assert!(close(lrs[0], (16.0f64 / 15.0 * 8.0 / 1.728).ln(), 1e-12));
    assert!(close(lrs[1], (1.6f64 / 1.75 * 64.0 / 4.096).ln(), 1e-12));
    assert!(close(test.p_value(), 1.0 / want, 1e-12));
    assert!(test.rejected(0.2), "BF 9.6 ≥ 1/0.2");
    assert!(!test.rejected(0.1), "BF 9.6 < 1/0.1");

    let totals = test.totals();
    assert_eq!((totals.canary_requests, totals.canary_failures), (170, 4));
    assert_eq!((totals.stable_requests, totals.stable_failures), (430, 6));
    assert_eq!((totals.batches, totals.uninformative_batches), (4, 1));
    let evidence = test.evidence(0.1);
    assert!(!evidence.rejected);
    assert!(close(
        evidence.failure_rate_ratio.unwrap(),
        (4.0 / 170.0) / (6.0 / 430.0),
        1e-12
    ));
}

#[test]
fn batches_without_information_or_impossible_counts_leave_the_state_alone() {
    let mut test = CountsTest::default();
    let before = test.clone();
    // Stable alone: any failure is stable's by construction.
    test.observe(batch(0, 0, 200, 3)).unwrap();
    // Canary alone.
    test.observe(batch(10, 4, 0, 0)).unwrap();
    // Both arms served, nobody failed.
    test.observe(batch(10, 0, 190, 0)).unwrap();
    assert_eq!(test.log_bayes_factor(), 0.0);
    assert_eq!(test.log_likelihood_ratios(), before.log_likelihood_ratios());
    assert_eq!(test.totals().uninformative_batches, 2);
    assert_eq!(test.p_value(), 1.0);

    let err = test.observe(batch(3, 4, 100, 0)).unwrap_err();
    assert_eq!(
        err,
        BatchError::MoreFailuresThanRequests {
            arm: coalmine_judge::sequential::counts::Arm::Canary,
            failures: 4,
            requests: 3
        }
    );
    assert_eq!(
        err.to_string(),
        "canary: 4 failures reported for 3 requests"
    );
    assert_eq!(test.totals().batches, 3);
}

#[test]
fn the_state_survives_serialization() {
    let mut test = CountsTest::default();
    test.observe(batch(10, 2, 190, 1)).unwrap();
    let json = serde_json::to_string(&test).unwrap();
    // serde_json parses floats to within an ulp (exactly only with its `float_roundtrip`
    // feature), which is all a persisted state needs.
    let mut back: CountsTest = serde_json::from_str(&json).unwrap();
    assert_eq!(back.totals(), test.totals());
    back.observe(batch(10, 1, 190, 0)).unwrap();
    test.observe(batch(10, 1, 190, 0)).unwrap();
    assert!(close(
        back.log_bayes_factor(),
        test.log_bayes_factor(),
        1e-12
    ));
    assert!(close(back.p_value(), test.p_value(), 1e-12));
    let evidence = serde_json::to_value(test.evidence(0.01)).unwrap();
    assert_eq!(evidence["canaryFailures"], 3);
    assert!(evidence["pValue"].as_f64().unwrap() < 1.0);
}

/// ln of the exact one-sided beta-binomial Bayes factor at a constant share ρ:
/// ∫_{θ>ρ} Beta(θ; kρ, k(1−ρ)) (θ/ρ)^fc ((1−θ)/(1−ρ))^fs dθ / P(θ > ρ),
/// by the trapezoid rule in u = logit θ − logit ρ ∈ [0, 40] with step 1e-3 (in u the integrand
/// θ^{a+fc}(1−θ)^{b+fs} already includes the Jacobian θ(1−θ), and it is smooth and decays, so the
/// rule is accurate far beyond the tolerance checked below).
fn exact_one_sided_log_bf(k: f64, rho: f64, fc: f64, fs: f64) -> f64 {
    let (a, b) = (k * rho, k * (1.0 - rho));
    let logit = (rho / (1.0 - rho)).ln();
    let log_integral = |fc: f64, fs: f64| {
        let h = 1e-3;
        let steps = 40_000;
        let f = |u: f64| {
            let x = u + logit;
            // ln θ = −ln(1 + e^{−x}), ln(1 − θ) = ln θ − x.
            let ln_theta = if x >= 0.0 {
                -(-x).exp().ln_1p()
            } else {
                x - x.exp().ln_1p()
            };
            let ln_one_minus = ln_theta - x;
            (a + fc) * ln_theta + (b + fs) * ln_one_minus - fc * rho.ln() - fs * (-rho).ln_1p()
        };
        let values: Vec<f64> = (0..=steps).map(|i| f(i as f64 * h)).collect();
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let w = if i == 0 || i == steps { 0.5 } else { 1.0 };
                w * (v - max).exp()
            })
            .sum();
        max + (sum * h).ln()
    };
    log_integral(fc, fs) - log_integral(0.0, 0.0)
}

#[test]
fn at_the_reference_share_the_grid_matches_the_exact_beta_binomial_mixture() {
    // The grid is a Simpson quadrature of the beta-binomial integral. Where decisions are made
    // (1 ≤ BF ≤ e²⁰) it must agree with the exact Bayes factor to 0.03 in ln BF (3 %). Checked
    // over up to 120 canary and 3000 stable failures at ρ = ρ₀ = 5 %.
    let config = CountsConfig::default();
    let mut compared = 0;
    for fc in [1u64, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120] {
        for fs in [0u64, 3, 10, 30, 100, 300, 1000, 3000] {
            let exact = exact_one_sided_log_bf(100.0, 0.05, fc as f64, fs as f64);
            if !(0.0..=20.0).contains(&exact) {
                continue;
            }
            let mut test = CountsTest::new(config).unwrap();
            test.observe(batch(50_000, fc, 950_000, fs)).unwrap();
            let got = test.log_bayes_factor();
            assert!(
                (got - exact).abs() <= 0.03,
                "fc={fc} fs={fs}: grid ln BF {got}, exact {exact}"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 20,
        "only {compared} cases in the decision range"
    );

    // At a constant share, how the failures are cut into batches does not matter.
    let mut one = CountsTest::default();
    one.observe(batch(1000, 7, 19_000, 9)).unwrap();
    let mut many = CountsTest::default();
    for (cf, sf) in [(2, 0), (0, 4), (3, 3), (2, 2)] {
        many.observe(batch(250, cf, 4750, sf)).unwrap();
    }
    assert!(close(one.log_bayes_factor(), many.log_bayes_factor(), 1e-9));
}

#[test]
fn the_prior_is_the_documented_grid() {
    let prior = CountsTest::default().prior();
    assert_eq!(prior.len(), 65);
    assert_eq!(prior[0].0, 1.0);
    assert!(close(prior[64].0, 1000.0, 1e-9));
    let total: f64 = prior.iter().map(|p| p.1).sum();
    assert!(close(total, 1.0, 1e-12));
    assert!(prior.iter().all(|p| p.1 >= 0.0));
    // Prior median of r (where the cumulative weight crosses ½): 1.32 for Beta(5, 95) truncated
    // at 5 % (scipy.stats.beta); the grid steps by a factor of 1.11.
    let mut cumulative = 0.0;
    let median = prior
        .iter()
        .find(|p| {
            cumulative += p.1;
            cumulative >= 0.5
        })
        .unwrap()
        .0;
    assert!((1.2..1.5).contains(&median), "prior median {median}");
}

/// One A/A rollout at 200 req/s with both arms failing 0.1 % of requests: 5 % for 300 s, 10 % for
/// 300 s, 25 % for 600 s, 50 % for 1200 s (40 minutes). Returns the final p-value, which is the
/// smallest 1/BF seen during the rollout.
fn aa_rollout(rng: &mut Rng) -> f64 {
    let mut test = CountsTest::default();
    for (weight, seconds) in [(0.05, 300), (0.10, 300), (0.25, 600), (0.50, 1200)] {
        for _ in 0..seconds {
            let canary = rng.binomial(200, weight);
            let stable = 200 - canary;
            let b = batch(
                canary,
                rng.binomial(canary, 0.001),
                stable,
                rng.binomial(stable, 0.001),
            );
            test.observe(b).unwrap();
        }
    }
    test.p_value()
}

#[test]
fn aa_rollouts_are_rolled_back_at_most_alpha_of_the_time() {
    // 2000 A/A rollouts, the test looked at after every one-second batch. Ville's inequality
    // bounds the probability of ever reaching BF ≥ 1/α by α, so the number of rejecting runs is
    // at most Binomial(2000, α) in distribution. We allow α plus three binomial standard
    // deviations: at α = 0.01 that is 20 + 3·√(2000·0.01·0.99) = 33.3 → 33 runs; at α = 0.05,
    // 100 + 29.2 → 129; at α = 0.1, 200 + 40.2 → 240. A correct test fails this with probability
    // below 0.2 % per level; the mixture is also conservative, so far fewer are expected.
    const RUNS: u64 = 2000;
    let mut rng = Rng::new(0x00C0_A1A1);
    let p_values: Vec<f64> = (0..RUNS).map(|_| aa_rollout(&mut rng)).collect();
    for alpha in [0.01, 0.05, 0.1] {
        let rejected = p_values.iter().filter(|&&p| p <= alpha).count() as u64;
        let limit = three_sigma_limit(RUNS, alpha);
        eprintln!("A/A counts: α = {alpha}: {rejected} of {RUNS} runs rejected (limit {limit})");
        assert!(
            rejected <= limit,
            "α = {alpha}: {rejected} of {RUNS} A/A rollouts rejected, limit {limit}"
        );
    }
}

/// Seconds until the test rejects at α = 0.01 for a canary with the given error rate at 5 % of
/// 200 req/s, stable at 0.1 %; `None` if not within `limit` seconds.
fn seconds_to_reject(rng: &mut Rng, canary_error_rate: f64, limit: u32) -> Option<u32> {
    let mut test = CountsTest::default();
    for second in 1..=limit {
        let canary = rng.binomial(200, 0.05);
        let stable = 200 - canary;
        test.observe(batch(
            canary,
            rng.binomial(canary, canary_error_rate),
            stable,
            rng.binomial(stable, 0.001),
        ))
        .unwrap();
        if test.rejected(0.01) {
            return Some(second);
        }
    }
    None
}

#[test]
fn a_canary_with_ten_percent_errors_is_caught_within_ten_seconds() {
    // Back of the envelope: at 5 % of 200 req/s the canary fails 1/s and stable 0.19/s. With the
    // expected counts after t seconds (t canary, 0.19·t stable failures), the one-sided
    // beta-binomial Bayes factor (Beta(5, 95), truncated at ρ = 0.05) is
    // ln BF(t) = ln B(5 + t, 95 + 0.19t) − ln B(5, 95) − t·ln 0.05 − 0.19t·ln 0.95 + ln(1/0.445),
    // which crosses ln(1/0.01) = 4.61 at t ≈ 8.3 s. So the median over runs should be about 9
    // one-second batches: N = 10 (the target). Every run must reject within a minute.
    let mut rng = Rng::new(10);
    let mut times: Vec<f64> = (0..200)
        .map(|_| seconds_to_reject(&mut rng, 0.10, 60).expect("rejected within 60 s") as f64)
        .collect();
    let m = median(&mut times);
    eprintln!("10 % errors: median {m} s to reject");
    assert!(m <= 10.0, "median {m} s");
}

#[test]
fn a_canary_with_one_percent_errors_is_caught_within_two_minutes() {
    // Same calculation with the canary failing 0.1/s: ln BF(t) = ln B(5 + 0.1t, 95 + 0.19t) −
    // ln B(5, 95) − 0.1t·ln 0.05 − 0.19t·ln 0.95 + ln(1/0.445) crosses 4.61 at t ≈ 99 s, at a
    // constant 5 % share (a real rollout steps the share up and is faster). N = 115 allows for
    // the median's sampling error over 200 runs (≈ 4 s); the target is 180 s.
    let mut rng = Rng::new(1);
    let mut times: Vec<f64> = (0..200)
        .map(|_| seconds_to_reject(&mut rng, 0.01, 1200).expect("rejected within 20 min") as f64)
        .collect();
    let m = median(&mut times);
    eprintln!("1 % errors: median {m} s to reject");
    assert!(m <= 115.0, "median {m} s");
}
