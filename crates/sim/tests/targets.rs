//! The judges' promises, checked by simulation with fixed seeds: how often an identical canary
//! is rolled back (type-I error) and how fast known regressions are caught (power).
//!
//! Bounds come from the math, not from runs: the sequential tests together keep the
//! probability of ever rolling back an identical canary below α = 0.01 (Ville's inequality, α/2
//! per test), so over n independent runs the count of false rollbacks is at most Binomial(n, α);
//! we allow its mean plus three standard deviations.

use coalmine_sim::{run_once, simulated_analysis, summarize, Decision, Rng, RunResult, Semantics};
use coalmine_spec::rollout::Analysis;
use coalmine_spec::scenario::{parse_scenario, Scenario};

const ALPHA: f64 = 0.01;

fn example(path: &str) -> String {
    let full = format!(
        "{}/../../examples/scenarios/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(full).unwrap()
}

/// The analysis of an example rollout, and its progress deadline.
fn rollout(file: &str) -> (Analysis, u64) {
    let set = coalmine_spec::documents::load(&[(file.into(), example(file))]).unwrap();
    match &set.documents[0].doc {
        coalmine_spec::documents::Document::Rollout(r) => {
            (r.spec.analysis.clone(), r.spec.progress_deadline_seconds)
        }
        _ => unreachable!(),
    }
}

fn scenario(name: &str) -> Scenario {
    parse_scenario(name, &example(name)).unwrap()
}

/// `n` runs of the example rollout (the seed's steps, Flagger's tutorial thresholds) judged as
/// `semantics` says, on the scenario `name`, from `seed`.
fn runs(name: &str, semantics: Semantics, n: usize, seed: u64) -> Vec<RunResult> {
    let (analysis, deadline) = rollout("rollout.yaml");
    let (analysis, _) = simulated_analysis(&analysis, semantics);
    simulate(&analysis, deadline, name, n, seed)
}

/// `n` runs of `analysis` on the scenario `name`, from `seed`.
fn simulate(analysis: &Analysis, deadline: u64, name: &str, n: usize, seed: u64) -> Vec<RunResult> {
    let scenario = scenario(name);
    (0..n)
        .map(|i| {
            run_once(
                analysis,
                deadline,
                &scenario,
                &mut Rng::for_run(seed, i as u64),
            )
        })
        .collect()
}

/// Mean plus three standard deviations of Binomial(n, p).
fn binomial_upper(n: usize, p: f64) -> f64 {
    let n = n as f64;
    n * p + 3.0 * (n * p * (1.0 - p)).sqrt()
}

#[test]
fn an_identical_canary_is_rarely_rolled_back() {
    let n = 400;
    let results = runs("identical.yaml", Semantics::Coalmine, n, 11);
    let s = summarize(&results);
    let bound = binomial_upper(n, ALPHA);
    assert!(
        (s.rolled_back as f64) <= bound,
        "{} of {n} A/A rollouts rolled back; the bound is {bound:.1}",
        s.rolled_back
    );
    assert_eq!(s.undecided, 0, "{s:?}");
}

#[test]
fn low_traffic_never_rolls_back_for_want_of_data() {
    // 2 req/s: the canary gets a request every 10 s at 5 %. A check without data holds the
    // weight rather than failing, and the sequential tests have nothing to reject on.
    let results = runs("low-traffic.yaml", Semantics::Coalmine, 200, 12);
    let s = summarize(&results);
    assert_eq!(s.rolled_back, 0, "{s:?}");
}

#[test]
fn a_canary_failing_10_percent_is_caught_in_seconds_flagger_needs_minutes() {
    let coalmine = summarize(&runs("errors-10pct.yaml", Semantics::Coalmine, 200, 13));
    assert_eq!(coalmine.rolled_back, 200, "{coalmine:?}");
    // Target: median ≤ 10 s after users first reach the canary.
    assert!(
        coalmine.detection_seconds.p50.unwrap() <= 10.0,
        "{coalmine:?}"
    );
    let flagger = summarize(&runs("errors-10pct.yaml", Semantics::Flagger, 50, 13));
    assert_eq!(flagger.rolled_back, 50, "{flagger:?}");
    // Flagger's rule with interval 1m, threshold 5: five failed checks, then the next tick.
    assert_eq!(flagger.detection_seconds.p50, Some(360.0), "{flagger:?}");
}

#[test]
fn a_canary_failing_1_percent_is_caught_where_a_99_percent_threshold_is_blind() {
    let results = runs("errors-1pct.yaml", Semantics::Coalmine, 200, 14);
    let s = summarize(&results);
    assert!(
        results.iter().all(|r| r.decision == Decision::RolledBack),
        "{s:?}"
    );
    // Target: median ≤ 3 min.
    assert!(s.detection_seconds.p50.unwrap() <= 180.0, "{s:?}");
}

#[test]
fn a_canary_50_percent_slower_at_the_median_is_caught_in_half_a_minute() {
    let s = summarize(&runs(
        "latency-plus-50pct.yaml",
        Semantics::Coalmine,
        200,
        15,
    ));
    assert_eq!(s.rolled_back, 200, "{s:?}");
    // Target: median ≤ 30 s. Flagger's p99 < 500 ms check never sees it (p99 ≈ 240 ms).
    assert!(s.detection_seconds.p50.unwrap() <= 30.0, "{s:?}");
    let flagger = summarize(&runs("latency-plus-50pct.yaml", Semantics::Flagger, 50, 15));
    assert_eq!(flagger.promoted, 50, "{flagger:?}");
}

#[test]
fn runs_are_reproducible_from_their_seed() {
    let a = runs("errors-1pct.yaml", Semantics::Coalmine, 5, 99);
    let b = runs("errors-1pct.yaml", Semantics::Coalmine, 5, 99);
    assert_eq!(a, b);
}

#[test]
fn the_kayenta_option_catches_what_thresholds_miss_and_spares_an_identical_canary() {
    let (analysis, deadline) = rollout("rollout-kayenta.yaml");
    let kayenta =
        |name: &str, n: usize, seed: u64| summarize(&simulate(&analysis, deadline, name, n, seed));
    // +50 % latency: Flagger's p99 < 500 ms never fails; Kayenta's rank test does, every window.
    let slow = kayenta("latency-plus-50pct.yaml", 30, 21);
    assert_eq!(slow.rolled_back, 30, "{slow:?}");
    // An identical canary: a window fails with probability at most 2 % (two metrics, each a
    // one-sided 1 % tail of a 98 % interval); five failures among the rollout's ≤ 6 windows have
    // probability ≤ C(6,5)·0.02⁵ ≈ 2·10⁻⁸ per run, so all 30 runs promote.
    let same = kayenta("identical.yaml", 30, 22);
    assert_eq!(same.promoted, 30, "{same:?}");
}
