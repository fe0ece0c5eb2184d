//! `coalmine simulate`: the rollout state machine and its judges, exactly as production runs
//! them, on a virtual clock over synthetic traffic.
//!
//! Each simulated second, the scenario's requests are split between stable and canary by the
//! machine's current weight, each request fails or not and gets a lognormal latency, and the
//! machine sees the same inputs the driver gives it in production: the second's counts
//! (for the sequential judges) and, at each tick, the built-in metrics over their windows.
//! Webhooks all pass. A run is a pure function of its seed.
//!
//! **Architecture invariant:** no IO, no clock, no threads here; the binary parallelises runs.

mod group;
mod rng;

pub use group::{run_group, GroupRun, MemberEnd, MemberSetup, Moment};
pub use rng::Rng;

use std::future::{ready, Future};

use serde::Serialize;

use coalmine_judge::{Counts, PairedBatch};
use coalmine_rollout::{
    Event, Input, Machine, Observation, Outcome, Plan, Question, Window, World,
};
use coalmine_spec::rollout::{Analysis, BUILTIN_KAYENTA_SCORE};
use coalmine_spec::scenario::{Behaviour, Scenario};

/// One simulated second: requests are generated and judged in steps of this length.
const STEP_MS: u64 = 1000;

/// Whose rules judge the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    /// The document as written: threshold checks and (unless turned off) the sequential judges.
    Coalmine,
    /// Flagger's: the threshold checks only, on the same traffic.
    Flagger,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Decision {
    RolledBack,
    Promoted,
    Undecided,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    pub decision: Decision,
    /// When the rollout ended (virtual ms since its start).
    pub decided_ms: Option<u64>,
    /// When users first reached the misbehaving canary: the later of its first request and
    /// the scenario's `startAfter`. Detection time counts from here.
    pub exposed_ms: Option<u64>,
    /// Requests the canary served, and how many failed, before the decision.
    pub canary_requests: u64,
    pub canary_failures: u64,
}

/// The analysis a simulation can run: built-in metrics only (template metrics ask systems that
/// do not exist in a simulation), and for Flagger's semantics no sequential judges.
pub fn simulated_analysis(analysis: &Analysis, semantics: Semantics) -> (Analysis, Vec<String>) {
    let mut out = analysis.clone();
    let mut dropped = Vec::new();
    out.metrics.retain(|m| {
        let builtin = m.is_builtin();
        if !builtin {
            dropped.push(m.name.clone());
        }
        builtin
    });
    if semantics == Semantics::Flagger {
        out.sequential.enabled = false;
    }
    out.webhooks.clear();
    (out, dropped)
}

/// Runs one rollout over the scenario with the generator `rng`.
pub fn run_once(
    analysis: &Analysis,
    progress_deadline_seconds: u64,
    scenario: &Scenario,
    rng: &mut Rng,
) -> RunResult {
    let mut sim = Simulated::new(analysis, progress_deadline_seconds, scenario, false);
    let duration_ms = scenario.duration.0.as_millis() as u64;
    let mut now = 0;
    while now < duration_ms {
        sim.tick_if_due(now);
        if let Some(result) = sim.decided(now) {
            return result;
        }
        sim.serve(now, rng);
        now += STEP_MS;
        if let Some(result) = sim.decided(now) {
            return result;
        }
    }
    sim.result(None)
}

/// One rollout on the virtual clock: its machine, the world answering it, and what users
/// met of its canary so far. A run is its steps: [`Simulated::tick_if_due`], then
/// [`Simulated::serve`] one simulated second.
struct Simulated<'s> {
    machine: Machine,
    world: Run,
    scenario: &'s Scenario,
    canary_start_ms: u64,
    tolerance_micros: u64,
    /// The fraction of a request the last second's rate left over.
    carry: f64,
    canary_requests: u64,
    canary_failures: u64,
    exposed_ms: Option<u64>,
}

impl<'s> Simulated<'s> {
    /// `keep_events`: the machine's events are kept for [`Simulated::take_events`] (a group's
    /// timeline), not only counted out.
    fn new(
        analysis: &Analysis,
        progress_deadline_seconds: u64,
        scenario: &'s Scenario,
        keep_events: bool,
    ) -> Simulated<'s> {
        let plan = Plan::new(analysis, progress_deadline_seconds, false);
        let longest_window_ms = plan
            .checks
            .iter()
            .map(|c| c.window_ms)
            .max()
            .unwrap_or(STEP_MS);
        let tolerance_micros = plan
            .dark_launch
            .as_ref()
            .map_or(0, |d| d.latency_tolerance_micros);
        Simulated {
            machine: Machine::new(plan, 0),
            world: Run {
                now: 0,
                window: Window::new(longest_window_ms),
                keeps_stable: analysis
                    .metrics
                    .iter()
                    .any(|m| m.name == BUILTIN_KAYENTA_SCORE),
                events: keep_events.then(Vec::new),
            },
            scenario,
            canary_start_ms: scenario
                .canary
                .start_after
                .map_or(0, |d| d.0.as_millis() as u64),
            tolerance_micros,
            carry: 0.0,
            canary_requests: 0,
            canary_failures: 0,
            exposed_ms: None,
        }
    }

    /// Hands the machine an input and answers its questions, as the driver does.
    fn feed(&mut self, now: u64, input: Input) {
        self.world.now = now;
        match self.machine.drive_now(input, &mut self.world) {
            Ok(()) => {}
            Err(never) => match never.error {},
        }
    }

    fn tick_if_due(&mut self, now: u64) {
        if self.machine.next_tick_ms().is_some_and(|due| due <= now) {
            self.feed(now, Input::Tick { traffic: Ok(()) });
        }
    }

    /// The requests of `[now, now + 1 s)`, split by the machine's traffic, and what the
    /// machine observes of them at the second's end.
    fn serve(&mut self, now: u64, rng: &mut Rng) {
        let scenario = self.scenario;
        let traffic = self.machine.traffic();
        let canary_share = if traffic.promoted {
            1.0
        } else {
            f64::from(traffic.canary_weight.basis_points()) / 10_000.0
        };
        let expected = scenario.traffic.rps_at(now) * STEP_MS as f64 / 1000.0 + self.carry;
        let requests = expected.floor() as u64;
        self.carry = expected - requests as f64;
        let canary_behaviour = if now >= self.canary_start_ms {
            &scenario.canary
        } else {
            &scenario.stable
        };
        let (mut stable, mut canary) = (Counts::default(), Counts::default());
        // Copies of stable's requests the canary answers (never a user's), and their pairs.
        let mirror_share = f64::from(traffic.mirror_weight.basis_points()) / 10_000.0;
        let (mut copies, mut pairs) = (Counts::default(), Pairing::new(self.tolerance_micros));
        for _ in 0..requests {
            if canary_share > 0.0 && rng.chance(canary_share) {
                request(rng, canary_behaviour, &mut canary);
            } else {
                let answer = request(rng, &scenario.stable, &mut stable);
                if mirror_share > 0.0 && rng.chance(mirror_share) {
                    pairs.add(answer, request(rng, canary_behaviour, &mut copies));
                }
            }
        }
        if self.exposed_ms.is_none() && canary.requests > 0 && now >= self.canary_start_ms {
            self.exposed_ms = Some(now);
        }
        self.canary_requests += canary.requests;
        self.canary_failures += canary.server_errors;
        let end = now + STEP_MS;
        // The stable side of the window only serves the Kayenta judge.
        let stable_window = if self.world.keeps_stable {
            stable.clone()
        } else {
            Counts::default()
        };
        // The copies' answers are the canary's observations, as the routers' source has them.
        canary.add(&copies);
        self.world.window.push(
            now,
            end,
            Observation {
                canary: canary.clone(),
                stable: stable_window,
                ..Observation::default()
            },
        );
        if self.machine.plan().observes() {
            self.feed(
                end,
                Input::Observe(Observation {
                    canary,
                    stable,
                    pairs: Box::new(pairs.batch),
                }),
            );
        }
    }

    /// The run's result once the rollout has ended (at `now`).
    fn decided(&self, now: u64) -> Option<RunResult> {
        self.machine.outcome().map(|_| self.result(Some(now)))
    }

    fn result(&self, decided_ms: Option<u64>) -> RunResult {
        RunResult {
            decision: match self.machine.outcome() {
                Some(Outcome::Promoted) => Decision::Promoted,
                Some(Outcome::RolledBack) => Decision::RolledBack,
                None => Decision::Undecided,
            },
            decided_ms: decided_ms.filter(|_| self.machine.outcome().is_some()),
            exposed_ms: self.exposed_ms,
            canary_requests: self.canary_requests,
            canary_failures: self.canary_failures,
        }
    }

    /// The events of the steps since the last call (none unless kept).
    fn take_events(&mut self) -> Vec<Event> {
        self.world
            .events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Simulated latencies are kept on a grid of 1 % steps (log-spaced): fine enough for judges
/// that compare quantiles with a 10 % tolerance, and a few hundred distinct values instead of
/// the thousands the router's three significant digits give, which keeps 1,000 runs quick.
const LN_LATENCY_STEP: f64 = 0.00995033085; // ln 1.01

/// A step's mirrored requests paired as a router pairs them: by failure (5xx), and for pairs both
/// answered well whether the canary's copy was slower or faster, beyond 0 and beyond the dark
/// launch's tolerance.
struct Pairing {
    tolerance_micros: u64,
    batch: PairedBatch,
}

impl Pairing {
    fn new(tolerance_micros: u64) -> Pairing {
        let by = vec![(0, 0), (tolerance_micros, 0)];
        Pairing {
            tolerance_micros,
            batch: PairedBatch {
                canary_slower_by: by.clone(),
                canary_faster_by: by,
                ..PairedBatch::default()
            },
        }
    }

    /// Stable's answer and the canary's to the same request: (failed, microseconds).
    fn add(&mut self, (stable_failed, stable): (bool, u64), (canary_failed, canary): (bool, u64)) {
        let b = &mut self.batch;
        match (stable_failed, canary_failed) {
            (false, false) => b.both_ok += 1,
            (false, true) => b.canary_only_failed += 1,
            (true, false) => b.stable_only_failed += 1,
            (true, true) => b.both_failed += 1,
        }
        if stable_failed || canary_failed || stable == canary {
            return;
        }
        let (by, difference) = if canary > stable {
            (&mut b.canary_slower_by, canary - stable)
        } else {
            (&mut b.canary_faster_by, stable - canary)
        };
        by[0].1 += 1;
        if difference > self.tolerance_micros {
            by[1].1 += 1;
        }
    }
}

/// One request to a version: counted, and what it was answered (failed, microseconds).
fn request(rng: &mut Rng, behaviour: &Behaviour, counts: &mut Counts) -> (bool, u64) {
    let failed = rng.chance(behaviour.error_rate);
    let ln_median_micros = (behaviour.latency.median.0.as_secs_f64() * 1e6).ln();
    // Lognormal: ln(latency) = ln(median) + σ·z, rounded to the grid before the one exp.
    let ln_micros = ln_median_micros + behaviour.latency.sigma * rng.normal();
    let step = (ln_micros / LN_LATENCY_STEP).round();
    let micros = (step * LN_LATENCY_STEP).exp().round().max(1.0) as u64;
    counts.record(micros, failed);
    (failed, micros)
}

/// The simulation as the machine's world: webhooks all pass, built-in metrics come from the
/// simulated seconds, and every answer is ready at once.
struct Run {
    now: u64,
    /// Both versions' counts per simulated second, as long as the longest window needs.
    window: Window,
    /// Whether a check compares with stable over its window (`kayenta-score`).
    keeps_stable: bool,
    /// The machine's events, when someone reads them (a group's timeline).
    events: Option<Vec<Event>>,
}

impl World for Run {
    type Unsaved = std::convert::Infallible;
    const SAVE_MAY_FAIL: bool = false;

    fn now(&self) -> u64 {
        self.now
    }

    fn event(&mut self, event: &Event) -> impl Future<Output = ()> {
        if let Some(events) = &mut self.events {
            events.push(event.clone());
        }
        ready(())
    }

    fn answer(&mut self, machine: &Machine, question: Question) -> impl Future<Output = Input> {
        ready(match question {
            Question::Hooks(kind) => Input::Hooks {
                kind,
                results: Vec::new(),
            },
            Question::Analysis => Input::Analysis {
                readings: machine
                    .plan()
                    .checks
                    .iter()
                    .map(|check| self.window.reading(check))
                    .collect(),
            },
        })
    }
}

/// Percentiles of a sample (nearest rank); None when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The summary `simulate` prints for a set of runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub runs: usize,
    pub rolled_back: usize,
    pub promoted: usize,
    pub undecided: usize,
    pub detection_seconds: Quantiles,
    pub decided_seconds: Quantiles,
    pub canary_requests: Median,
    pub canary_failures: Median,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Median {
    pub p50: Option<f64>,
}

/// `detectionSeconds` counts from when users first reach the misbehaving canary (its first
/// request at or after `startAfter`) to its rollback, over the runs that were rolled back;
/// `decidedSeconds` from the rollout's start to its end, over all decided runs.
pub fn summarize(results: &[RunResult]) -> Summary {
    let count = |d: Decision| results.iter().filter(|r| r.decision == d).count();
    let mut detection: Vec<f64> = results
        .iter()
        .filter(|r| r.decision == Decision::RolledBack)
        .filter_map(|r| Some(r.decided_ms?.saturating_sub(r.exposed_ms.unwrap_or(0))))
        .map(|ms| ms as f64 / 1000.0)
        .collect();
    detection.sort_by(f64::total_cmp);
    let mut decided: Vec<f64> = results
        .iter()
        .filter_map(|r| r.decided_ms)
        .map(|ms| ms as f64 / 1000.0)
        .collect();
    decided.sort_by(f64::total_cmp);
    let sorted = |f: fn(&RunResult) -> u64| {
        let mut v: Vec<f64> = results.iter().map(|r| f(r) as f64).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    Summary {
        runs: results.len(),
        rolled_back: count(Decision::RolledBack),
        promoted: count(Decision::Promoted),
        undecided: count(Decision::Undecided),
        detection_seconds: Quantiles {
            p50: percentile(&detection, 0.5),
            p95: percentile(&detection, 0.95),
        },
        decided_seconds: Quantiles {
            p50: percentile(&decided, 0.5),
            p95: percentile(&decided, 0.95),
        },
        canary_requests: Median {
            p50: percentile(&sorted(|r| r.canary_requests), 0.5),
        },
        canary_failures: Median {
            p50: percentile(&sorted(|r| r.canary_failures), 0.5),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analysis(yaml: &str) -> Analysis {
        serde_json::from_value(
            serde_json::to_value(
                coalmine_spec::parse_yaml::<Analysis>("a.yaml", yaml).expect("analysis"),
            )
            .unwrap(),
        )
        .unwrap()
    }

    fn scenario(canary_error_rate: f64) -> Scenario {
        coalmine_spec::scenario::parse_scenario(
            "s.yaml",
            &format!(
                "traffic: {{rps: 200}}
duration: 45m
stable: {{errorRate: 0.001, latency: {{median: 50ms, sigma: 0.5}}}}
canary: {{errorRate: {canary_error_rate}, latency: {{median: 50ms, sigma: 0.5}}}}
"
            ),
        )
        .unwrap()
    }

    const FLAGGER_TUTORIAL: &str = "interval: 1m
threshold: 5
stepWeights: [5, 10, 25, 50]
metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 1m
";

    #[test]
    fn flagger_rolls_back_an_always_failing_canary_at_t7_and_promotes_a_healthy_one() {
        let (a, _) = simulated_analysis(&analysis(FLAGGER_TUTORIAL), Semantics::Flagger);
        let mut rng = Rng::seeded(1);
        let bad = run_once(&a, 600, &scenario(0.5), &mut rng);
        assert_eq!(bad.decision, Decision::RolledBack);
        // Ticks each minute: T1 initialise, T2 start at 5 %, T2..T6 five failed checks, T7 rolls back.
        assert_eq!(bad.decided_ms, Some(7 * 60_000), "{bad:?}");
        let good = run_once(&a, 600, &scenario(0.001), &mut rng);
        assert_eq!(good.decision, Decision::Promoted, "{good:?}");
    }

    #[test]
    fn a_dark_launch_rolls_back_a_three_percent_canary_before_any_user_reaches_it() {
        let yaml = "interval: 1m
stepWeights: [5, 10, 25, 50]
darkLaunch: {mirrorWeight: 20, duration: 5m, minRequests: 500}
";
        let (a, _) = simulated_analysis(&analysis(yaml), Semantics::Coalmine);
        let mut rng = Rng::seeded(3);
        // 200 req/s, 20 % copied: 40 pairs a second, the canary failing 1.2 a second alone.
        // 11 such pairs reject (Bayes factor 341 ≥ 200): some 10 s after the copies start at
        // T1 (60 s); the run may only end at a sampling step, so within 80 s.
        let bad = run_once(&a, 600, &scenario(0.03), &mut rng);
        assert_eq!(bad.decision, Decision::RolledBack, "{bad:?}");
        assert!(bad.decided_ms.unwrap() < 80_000, "{bad:?}");
        assert_eq!((bad.canary_requests, bad.exposed_ms), (0, None), "{bad:?}");
        // A healthy canary passes after 5 minutes and goes on to its weights.
        let good = run_once(&a, 600, &scenario(0.001), &mut rng);
        assert_eq!(good.decision, Decision::Promoted, "{good:?}");
        assert!(good.exposed_ms.unwrap() >= 6 * 60_000, "{good:?}");
    }
}
