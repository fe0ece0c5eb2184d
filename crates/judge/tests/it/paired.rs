//! The dark launch's paired test: its false-rollback rate over whole A/A dark launches, and
//! how fast it catches a canary that fails a few per cent of the requests stable answers.

use coalmine_judge::{PairedBatch, PairedRejection, PairedTest};

use crate::common::{median, three_sigma_limit, Rng};

const TOLERANCE: u64 = 10_000;

/// One second of `n` mirrored pairs: each version fails a request with its own rate,
/// independently, and each pair both answered well is a latency difference beyond the
/// tolerance with probability `slower` (canary later) and `faster`.
fn second(
    rng: &mut Rng,
    n: u64,
    canary_fails: f64,
    stable_fails: f64,
    slower: f64,
    faster: f64,
) -> PairedBatch {
    let (pc, ps) = (canary_fails, stable_fails);
    // The four outcomes drawn one after the other, each conditional on the ones before.
    let canary_only = rng.binomial(n, pc * (1.0 - ps));
    let rest = n - canary_only;
    let stable_only = rng.binomial(rest, ps * (1.0 - pc) / (1.0 - pc * (1.0 - ps)));
    let rest = rest - stable_only;
    let both = pc * ps / (pc * ps + (1.0 - pc) * (1.0 - ps));
    let both_failed = rng.binomial(rest, both);
    let both_ok = rest - both_failed;
    let canary_slower = rng.binomial(both_ok, slower);
    let canary_faster = rng.binomial(both_ok - canary_slower, faster / (1.0 - slower));
    // As a router counts them: how many beyond 0 and beyond the tolerance (10 ms).
    PairedBatch {
        both_ok,
        canary_only_failed: canary_only,
        stable_only_failed: stable_only,
        both_failed,
        canary_slower_by: vec![(0, both_ok / 2), (TOLERANCE, canary_slower)],
        canary_faster_by: vec![(0, both_ok / 2), (TOLERANCE, canary_faster)],
    }
}

#[test]
fn aa_dark_launches_are_rolled_back_at_most_alpha_of_the_time() {
    // 2000 A/A dark launches of 10 minutes at 20 mirrored pairs a second, both versions
    // failing 2 % of requests, and 10 % of the pairs both answered well a latency difference
    // beyond the tolerance each way; the test read after every second. Ville's inequality
    // bounds P(ever rejected) by α (both tests at α/2), so the rejecting runs are at most
    // Binomial(2000, α): allowed α plus three standard deviations, 33 at α = 0.01, 129 at 0.05
    // (a correct test fails this with probability below 0.2 %; the mixture is conservative, so
    // far fewer are expected).
    const RUNS: u64 = 2000;
    let mut rng = Rng::new(0xDA_4C);
    for alpha in [0.01, 0.05] {
        let mut rejected = 0;
        for _ in 0..RUNS {
            let mut test = PairedTest::new(alpha, TOLERANCE).unwrap();
            for _ in 0..600 {
                test.observe(&second(&mut rng, 20, 0.02, 0.02, 0.1, 0.1));
                if test.rejected().is_some() {
                    rejected += 1;
                    break;
                }
            }
        }
        let limit = three_sigma_limit(RUNS, alpha);
        eprintln!("A/A paired: α = {alpha}: {rejected} of {RUNS} runs rejected (limit {limit})");
        assert!(
            rejected <= limit,
            "α = {alpha}: {rejected} of {RUNS} rejected, limit {limit}"
        );
    }
}

/// Seconds until the test rejects at α = 0.01, and on what.
fn seconds_to_reject(
    rng: &mut Rng,
    canary_fails: f64,
    slower: f64,
    limit: u32,
) -> Option<(u32, PairedRejection)> {
    let mut test = PairedTest::new(0.01, TOLERANCE).unwrap();
    for s in 1..=limit {
        test.observe(&second(rng, 20, canary_fails, 0.001, slower, 0.05));
        if let Some(why) = test.rejected() {
            return Some((s, why));
        }
    }
    None
}

#[test]
fn a_canary_failing_three_percent_of_stables_good_answers_is_caught_in_about_twenty_seconds() {
    // 20 pairs a second, the canary failing 3 %: 0.6 canary-only pairs a second against 0.02
    // stable-only. With c canary-only pairs and none of stable's the Bayes factor is
    // (2^(c+1) − 1)/(c + 1), which passes 2/α = 200 at c = 12: about 20 s. Every run must
    // reject within two minutes (c ~ Poisson(72) by then).
    let mut rng = Rng::new(3);
    let mut times: Vec<f64> = (0..200)
        .map(|_| {
            let (s, why) = seconds_to_reject(&mut rng, 0.03, 0.05, 120).expect("rejected in 2 min");
            assert_eq!(why, PairedRejection::Failures);
            f64::from(s)
        })
        .collect();
    let m = median(&mut times);
    eprintln!("paired, 3 % canary failures: median {m} s");
    assert!((12.0..=30.0).contains(&m), "median {m} s");
}

#[test]
fn a_canary_slower_on_a_quarter_of_the_requests_is_caught_on_latency() {
    // 20 % of the pairs the canary's copy beyond the tolerance slower, 5 % faster: a sign test
    // on 5 discordant pairs a second, 80 % of them the canary's.
    let mut rng = Rng::new(4);
    let (s, why) = seconds_to_reject(&mut rng, 0.0, 0.2, 120).expect("rejected in 2 min");
    assert_eq!(why, PairedRejection::Latency);
    assert!(s <= 30, "{s} s");
}
