//! The state machine driven tick by tick on a virtual clock, as Flagger's own scheduler tests do.

use std::future::{ready, Future};

use coalmine_judge::Reading;
use coalmine_rollout::{
    Action, Event, HookResult, Input, Machine, Outcome, Phase, Plan, Question, TrafficFault, World,
};
use coalmine_spec::rollout::{Analysis, HookKind};
use coalmine_spec::Weight;

const MINUTE: u64 = 60_000;

fn analysis(yaml: &str) -> Analysis {
    coalmine_spec::parse_yaml("analysis.yaml", yaml).unwrap()
}

/// Flagger's Istio tutorial: interval 1m, threshold 5, stepWeight 10, maxWeight 50.
const TUTORIAL: &str = "
interval: 1m
threshold: 5
stepWeight: 10
maxWeight: 50
metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 1m
  - name: request-duration
    thresholdRange: {max: 500}
    interval: 30s
";

/// Drives a machine like the runtime does: ticks at each due time, answering questions with
/// `answer`. Returns what each tick ended in.
struct Harness {
    machine: Machine,
    now: u64,
    events: Vec<String>,
    outcome: Option<Outcome>,
    hooks_called: Vec<(u64, HookKind)>,
}

impl Harness {
    fn new(yaml: &str) -> Harness {
        Harness::with_deadline(yaml, 600)
    }

    fn with_deadline(yaml: &str, progress_deadline_seconds: u64) -> Harness {
        let plan = Plan::new(&analysis(yaml), progress_deadline_seconds, false);
        Harness {
            machine: Machine::new(plan, 0),
            now: 0,
            events: Vec::new(),
            outcome: None,
            hooks_called: Vec::new(),
        }
    }

    /// Runs the tick due next, answering every question the machine asks.
    fn tick(&mut self, answer: &mut dyn FnMut(u64, Question) -> Input) {
        self.now = self.machine.next_tick_ms().expect("a tick is due");
        let mut world = Answering {
            now: self.now,
            events: &mut self.events,
            hooks_called: &mut self.hooks_called,
            answer,
        };
        if let Err(never) = self
            .machine
            .drive_now(Input::Tick { traffic: Ok(()) }, &mut world)
        {
            match never.error {}
        }
        self.outcome = self.machine.outcome();
    }

    fn phase(&self) -> Phase {
        self.machine.status().phase
    }
    fn weight(&self) -> u32 {
        self.machine.status().canary_weight.basis_points() / 100
    }
}

/// The tests' world: every answer from the test's function, every event and webhook call logged.
struct Answering<'a> {
    now: u64,
    events: &'a mut Vec<String>,
    hooks_called: &'a mut Vec<(u64, HookKind)>,
    answer: &'a mut dyn FnMut(u64, Question) -> Input,
}

impl World for Answering<'_> {
    type Unsaved = std::convert::Infallible;
    const SAVE_MAY_FAIL: bool = false;

    fn now(&self) -> u64 {
        self.now
    }

    fn answer(&mut self, _: &Machine, question: Question) -> impl Future<Output = Input> {
        if let Question::Hooks(kind) = question {
            self.hooks_called.push((self.now, kind));
        }
        ready((self.answer)(self.now, question))
    }

    fn notify(&mut self, kind: HookKind, _: Phase) -> impl Future<Output = ()> {
        self.hooks_called.push((self.now, kind));
        ready(())
    }

    fn event(&mut self, event: &Event) -> impl Future<Output = ()> {
        self.events.push(event.message.clone());
        ready(())
    }
}

/// Answers every question: webhooks pass, and the success rate reads `success_rate`.
fn answer_with(success_rate: f64, q: Question) -> Input {
    match q {
        Question::Analysis => Input::Analysis {
            readings: vec![
                Reading::Value {
                    value: success_rate,
                },
                Reading::Value { value: 120.0 },
            ],
        },
        Question::Hooks(kind) => Input::Hooks {
            kind,
            results: vec![],
        },
    }
}

fn healthy(_: u64, q: Question) -> Input {
    answer_with(99.9, q)
}

fn failing(_: u64, q: Question) -> Input {
    answer_with(90.0, q)
}

/// Healthy answers, except that the webhooks of `kind` (one, named `name`) answer `ok`.
fn with_hook(kind: HookKind, name: &str, ok: bool) -> impl FnMut(u64, Question) -> Input {
    let name = name.to_string();
    move |now, q| match q {
        Question::Hooks(k) if k == kind => Input::Hooks {
            kind,
            results: vec![HookResult {
                name: name.clone(),
                ok,
                message: if ok { "200" } else { "403" }.into(),
            }],
        },
        other => healthy(now, other),
    }
}

#[test]
fn flaggers_timing_table_for_a_healthy_canary() {
    let mut h = Harness::new(TUTORIAL);
    // (tick, phase after it, weight after it), from the table in flagger-semantics §2.3.
    let expected = [
        (0, Phase::Progressing, 0),
        (1, Phase::Progressing, 10),
        (2, Phase::Progressing, 20),
        (3, Phase::Progressing, 30),
        (4, Phase::Progressing, 40),
        (5, Phase::Progressing, 50),
        (6, Phase::Promoting, 50),
        (7, Phase::Finalising, 0),
        (8, Phase::Succeeded, 0),
    ];
    for (tick, phase, weight) in expected {
        h.tick(&mut healthy);
        assert_eq!(h.now, tick * MINUTE);
        assert_eq!((h.phase(), h.weight()), (phase, weight), "at T{tick}");
    }
    assert!(h.machine.traffic().promoted);
    assert_eq!(h.outcome, Some(Outcome::Promoted));
    assert_eq!(h.machine.status().next_tick_ms, None);
}

#[test]
fn flaggers_timing_table_for_a_failing_canary() {
    let mut h = Harness::new(TUTORIAL);
    for tick in 0..=6u32 {
        h.tick(&mut failing);
        let expected_failures = tick.saturating_sub(1);
        assert_eq!(
            h.machine.status().failed_checks,
            expected_failures,
            "at T{tick}"
        );
        assert_eq!(h.phase(), Phase::Progressing, "at T{tick}");
        assert_eq!(h.weight(), if tick == 0 { 0 } else { 10 }, "held at 10 %");
    }
    h.tick(&mut failing);
    assert_eq!(h.now, 7 * MINUTE);
    assert_eq!(h.phase(), Phase::Failed);
    assert_eq!(h.outcome, Some(Outcome::RolledBack));
    let traffic = h.machine.traffic();
    assert!(!traffic.canary && !traffic.promoted && traffic.canary_weight == Weight::ZERO);
    assert!(h.events.last().unwrap().contains("failed 5 checks"));
}

#[test]
fn failed_checks_add_up_over_the_run_unless_counting_is_consecutive() {
    // Fails on every other tick: with Flagger's total count it is rolled back; with consecutive
    // counting it never reaches two failures in a row and is promoted.
    let flaky_yaml = format!("{TUTORIAL}stepWeights: [10, 20, 30, 40, 50, 60, 70, 80]\n")
        .replace("stepWeight: 10\nmaxWeight: 50\n", "")
        .replace("threshold: 5", "threshold: 2");
    let flaky = |now: u64, q: Question| {
        if (now / MINUTE).is_multiple_of(2) {
            failing(now, q)
        } else {
            healthy(now, q)
        }
    };
    let mut total = Harness::new(&flaky_yaml);
    for _ in 0..30 {
        if total.outcome.is_some() {
            break;
        }
        total.tick(&mut { flaky });
    }
    assert_eq!(total.outcome, Some(Outcome::RolledBack));

    let mut consecutive = Harness::new(&format!("{flaky_yaml}failureCounting: consecutive\n"));
    for _ in 0..40 {
        if consecutive.outcome.is_some() {
            break;
        }
        consecutive.tick(&mut { flaky });
    }
    assert_eq!(consecutive.outcome, Some(Outcome::Promoted));
}

#[test]
fn no_data_holds_the_weight_until_the_deadline_unless_told_to_fail() {
    let silent = |_: u64, q: Question| match q {
        Question::Analysis => Input::Analysis {
            readings: vec![
                Reading::NoData {
                    reason: "no requests".into(),
                },
                Reading::NoData {
                    reason: "no requests".into(),
                },
            ],
        },
        Question::Hooks(kind) => Input::Hooks {
            kind,
            results: vec![],
        },
    };
    let mut hold = Harness::new(TUTORIAL);
    for _ in 0..12 {
        hold.tick(&mut { silent });
    }
    // T1 raised to 10 %, then ten ticks of no data (T2..T11): held, never counted as failures.
    assert_eq!((hold.phase(), hold.weight()), (Phase::Progressing, 10));
    assert_eq!(hold.machine.status().failed_checks, 0);
    assert!(hold.machine.status().message.contains("no data"));
    // The deadline (600 s) counts from the first held tick (T2): T12 rolls back.
    hold.tick(&mut { silent });
    assert_eq!(hold.now, 12 * MINUTE);
    assert_eq!(hold.phase(), Phase::Failed);
    assert!(hold
        .events
        .last()
        .unwrap()
        .contains("progressDeadlineSeconds"));

    let mut flagger = Harness::new(&format!("{TUTORIAL}noData: fail\n"));
    for _ in 0..8 {
        flagger.tick(&mut { silent });
    }
    assert_eq!(
        flagger.phase(),
        Phase::Failed,
        "Flagger's rule: T7 rollback"
    );
    assert_eq!(flagger.now, 7 * MINUTE);
}

#[test]
fn an_unreachable_router_holds_and_rolls_back_at_the_deadline() {
    let mut h = Harness::with_deadline(&TUTORIAL.replace("interval: 1m\n", "interval: 10s\n"), 30);
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    assert_eq!(h.weight(), 10);
    let mut now = h.now;
    let mut rolled_back_at = None;
    for _ in 0..10 {
        now += 10_000;
        let actions = h.machine.handle(
            now,
            Input::Tick {
                traffic: Err(TrafficFault::Unreachable("connection refused".into())),
            },
        );
        if actions.contains(&Action::Finished(Outcome::RolledBack)) {
            rolled_back_at = Some(now);
            break;
        }
        assert!(h.machine.status().message.contains("connection refused"));
        assert_eq!(h.weight(), 10, "held");
    }
    // Held from 20 s; 30 s later the deadline rolls it back.
    assert_eq!(rolled_back_at, Some(50_000));
}

#[test]
fn max_weight_is_never_overshot() {
    let plan = Plan::new(
        &analysis("interval: 1m\nstepWeight: 20\nmaxWeight: 50\n"),
        600,
        false,
    );
    let mut weights = Vec::new();
    let mut w = Weight::ZERO;
    while let Some(next) = plan.next_weight(w) {
        weights.push(next.basis_points() / 100);
        w = next;
    }
    assert_eq!(weights, vec![20, 40, 50], "Flagger would go to 60");
}

#[test]
fn confirm_promotion_holds_in_waiting_promotion_until_opened() {
    let yaml = format!(
        "{TUTORIAL}webhooks:\n  - name: gate\n    type: confirm-promotion\n    url: http://127.0.0.1:1/gate\n"
    );
    let mut h = Harness::new(&yaml);
    let mut closed = with_hook(HookKind::ConfirmPromotion, "gate", false);
    for _ in 0..=9 {
        h.tick(&mut closed);
    }
    assert_eq!((h.phase(), h.weight()), (Phase::WaitingPromotion, 50));
    assert_eq!(h.machine.status().failed_checks, 0);
    let mut open = with_hook(HookKind::ConfirmPromotion, "gate", true);
    h.tick(&mut open);
    assert_eq!(h.phase(), Phase::Promoting);
    h.tick(&mut open);
    h.tick(&mut open);
    assert_eq!(h.outcome, Some(Outcome::Promoted));
}

#[test]
fn webhook_kinds_run_where_flagger_runs_them() {
    let mut yaml = TUTORIAL.to_string();
    yaml += "webhooks:\n";
    for kind in [
        "confirm-rollout",
        "pre-rollout",
        "rollout",
        "confirm-traffic-increase",
        "confirm-promotion",
        "post-rollout",
        "rollback",
    ] {
        yaml += &format!("  - name: {kind}\n    type: {kind}\n    url: http://127.0.0.1:1/\n");
    }
    let mut h = Harness::new(&yaml);
    while h.outcome.is_none() {
        // A rollback hook answering with an error means "do not roll back".
        h.tick(&mut with_hook(HookKind::Rollback, "rollback", false));
    }
    let at = |kind| -> Vec<u64> {
        h.hooks_called
            .iter()
            .filter(|(_, k)| *k == kind)
            .map(|(t, _)| t / MINUTE)
            .collect()
    };
    assert_eq!(at(HookKind::ConfirmRollout), vec![0]);
    assert_eq!(at(HookKind::PreRollout), vec![1]);
    assert_eq!(at(HookKind::Rollout), vec![2, 3, 4, 5, 6]);
    assert_eq!(at(HookKind::ConfirmTrafficIncrease), vec![1, 2, 3, 4, 5]);
    assert_eq!(at(HookKind::ConfirmPromotion), vec![6]);
    assert_eq!(at(HookKind::Rollback), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(at(HookKind::PostRollout), vec![8]);
}

#[test]
fn a_rollback_webhook_that_answers_ok_rolls_back() {
    let yaml = format!(
        "{TUTORIAL}webhooks:\n  - name: stop\n    type: rollback\n    url: http://127.0.0.1:1/\n"
    );
    let mut h = Harness::new(&yaml);
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    h.tick(&mut with_hook(HookKind::Rollback, "stop", true));
    assert_eq!(h.phase(), Phase::Failed);
    assert!(h.events.last().unwrap().contains("rollback webhook stop"));
}

#[test]
fn a_failing_pre_rollout_hook_rolls_back_at_t6_without_traffic() {
    let yaml = format!("{TUTORIAL}webhooks:\n  - name: smoke\n    type: pre-rollout\n    url: http://127.0.0.1:1/\n");
    let mut h = Harness::new(&yaml);
    let mut refuse = with_hook(HookKind::PreRollout, "smoke", false);
    while h.outcome.is_none() {
        h.tick(&mut refuse);
        assert_eq!(h.weight(), 0);
    }
    assert_eq!(h.now, 6 * MINUTE);
    assert_eq!(h.phase(), Phase::Failed);
}

#[test]
fn ab_testing_and_blue_green_follow_flaggers_tick_counts() {
    let ab = "interval: 1m\nthreshold: 2\niterations: 3\nmatch:\n  - headers:\n      x-canary: {exact: insider}\n";
    let mut h = Harness::new(ab);
    let mut phases = Vec::new();
    while h.outcome.is_none() {
        h.tick(&mut healthy);
        phases.push(h.phase());
    }
    // A/B with N iterations: promotion at T(N+1), Succeeded at T(N+3).
    assert_eq!(phases.iter().position(|p| *p == Phase::Promoting), Some(4));
    assert_eq!(phases.len() - 1, 6);

    let bg = "interval: 1m\nthreshold: 2\niterations: 3\n";
    let mut h = Harness::new(bg);
    let mut phases = Vec::new();
    while h.outcome.is_none() {
        h.tick(&mut healthy);
        phases.push(h.phase());
        if h.machine.status().iterations <= 3 && h.phase() == Phase::Progressing {
            assert_eq!(
                h.machine.traffic().canary_weight,
                Weight::ZERO,
                "no user traffic yet"
            );
        }
    }
    // Blue-green: one tick more than A/B for routing all traffic to the canary.
    assert_eq!(phases.iter().position(|p| *p == Phase::Promoting), Some(5));
}

#[test]
fn abort_and_alerts_roll_back_between_ticks_and_final_states_ignore_input() {
    let mut h = Harness::new(TUTORIAL);
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    let actions = h.machine.handle(
        h.now + 5_000,
        Input::RollBack {
            reason: "alert CanaryHighErrorRate firing".into(),
        },
    );
    assert!(actions.contains(&Action::Finished(Outcome::RolledBack)));
    assert!(actions.contains(&Action::Notify(HookKind::PostRollout)));
    assert_eq!(h.machine.status().last_transition_ms, h.now + 5_000);
    let before = h.machine.status().clone();
    assert!(h
        .machine
        .handle(
            h.now + 6_000,
            Input::Promote {
                by: "a test".into()
            }
        )
        .is_empty());
    assert_eq!(
        *h.machine.status(),
        before,
        "a finished rollout does not move again"
    );
}

#[test]
fn pause_stops_ticks_and_resume_continues() {
    let mut h = Harness::new(TUTORIAL);
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    h.machine.handle(
        h.now,
        Input::Pause {
            by: "a test".into(),
        },
    );
    for _ in 0..20 {
        h.tick(&mut healthy);
    }
    assert_eq!((h.phase(), h.weight()), (Phase::Progressing, 10));
    h.machine.handle(
        h.now,
        Input::Resume {
            by: "a test".into(),
        },
    );
    h.tick(&mut healthy);
    assert_eq!(h.weight(), 20);
}

#[test]
fn the_persisted_status_continues_exactly_where_it_stopped() {
    let mut original = Harness::new(TUTORIAL);
    for _ in 0..4 {
        original.tick(&mut healthy);
    }
    let saved = serde_json::to_string(original.machine.status()).unwrap();
    let status = serde_json::from_str(&saved).unwrap();
    let mut restored = Harness::new(TUTORIAL);
    restored.machine = Machine::resume(original.machine.plan().clone(), status);
    while original.outcome.is_none() {
        original.tick(&mut healthy);
        restored.tick(&mut healthy);
        assert_eq!(original.machine.status(), restored.machine.status());
    }
    assert_eq!(restored.outcome, Some(Outcome::Promoted));
}

#[test]
fn step_weight_promotion_shifts_the_rest_step_by_step() {
    let mut h = Harness::new(&format!("{TUTORIAL}stepWeightPromotion: 25\n"));
    let mut promoting_weights = Vec::new();
    while h.outcome.is_none() {
        h.tick(&mut healthy);
        if h.phase() == Phase::Promoting {
            promoting_weights.push(h.weight());
        }
    }
    assert_eq!(promoting_weights, vec![50, 75]);
}

#[test]
fn a_refused_route_change_rolls_back_at_once_even_while_a_question_is_pending() {
    let yaml = format!(
        "{TUTORIAL}webhooks:\n  - name: gate\n    type: confirm-promotion\n    url: http://127.0.0.1:1/gate\n"
    );
    let mut h = Harness::new(&yaml);
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    assert_eq!(h.weight(), 10);
    let actions = h.machine.handle(
        h.now + MINUTE,
        Input::Tick {
            traffic: Err(TrafficFault::Refused("409 another owner".into())),
        },
    );
    assert!(actions.contains(&Action::Finished(Outcome::RolledBack)));
    assert_eq!(h.phase(), Phase::Failed);
    assert_eq!(
        h.machine.status().message,
        "Rolling back: the routers refuse the routes: 409 another owner"
    );
}

/// A world whose traffic backend refuses every change, counting how often it was asked.
struct Refusing {
    routed: u32,
}

impl World for Refusing {
    type Unsaved = std::convert::Infallible;
    const SAVE_MAY_FAIL: bool = false;

    fn now(&self) -> u64 {
        0
    }

    fn route(&mut self, _: &Machine) -> impl Future<Output = Result<(), TrafficFault>> {
        self.routed += 1;
        assert!(
            self.routed < 100,
            "the loop keeps rolling back a rollout that has ended"
        );
        ready(Err(TrafficFault::Refused("not a Coalmine router".into())))
    }

    fn answer(&mut self, _: &Machine, question: Question) -> impl Future<Output = Input> {
        ready(healthy(0, question))
    }
}

#[test]
fn the_driving_loop_rolls_back_once_when_the_traffic_is_refused_after_a_step() {
    let plan = Plan::new(&analysis(TUTORIAL), 600, false);
    let mut machine = Machine::new(plan, 0);
    let mut world = Refusing { routed: 0 };
    if let Err(never) = machine.drive_now(Input::Tick { traffic: Ok(()) }, &mut world) {
        match never.error {}
    }
    assert_eq!(machine.outcome(), Some(Outcome::RolledBack));
    assert_eq!(
        machine.status().message,
        "Rolling back: the routers refuse the routes: not a Coalmine router"
    );
    // The step that was refused, then the rollback, whose final traffic is refused too.
    assert_eq!(world.routed, 2);
}

/// A store that counts what it is asked to write (as the daemon's SQLite file and the
/// operator's status subresource are).
struct CountingStore {
    now: u64,
    saves: usize,
}

impl World for CountingStore {
    type Unsaved = String;

    fn now(&self) -> u64 {
        self.now
    }

    fn save(
        &mut self,
        _: &coalmine_rollout::Status,
        _: &[Event],
    ) -> impl Future<Output = Result<(), String>> {
        self.saves += 1;
        ready(Ok(()))
    }

    fn answer(&mut self, machine: &Machine, question: Question) -> impl Future<Output = Input> {
        ready(match question {
            Question::Hooks(kind) => Input::Hooks {
                kind,
                results: Vec::new(),
            },
            Question::Analysis => Input::Analysis {
                readings: vec![Reading::Value { value: 100.0 }; machine.plan().checks.len()],
            },
        })
    }
}

#[test]
fn a_step_that_changes_nothing_is_not_written_again() {
    let plan = Plan::new(
        &analysis("interval: 1m\nstepWeights: [10, 50]\n"),
        600,
        false,
    );
    let mut machine = Machine::new(plan, 0);
    let mut store = CountingStore { now: 0, saves: 0 };
    let drive = |machine: &mut Machine, store: &mut CountingStore, input: Input| {
        machine.drive_now(input, store).expect("saved");
    };
    drive(&mut machine, &mut store, Input::Tick { traffic: Ok(()) });
    assert_eq!(machine.status().phase, Phase::Progressing);
    let after_start = store.saves;
    assert!(after_start >= 1);
    // A second's sample with no requests in it, sixty times: nothing to record.
    for second in 1..=60 {
        store.now = second * 1000;
        drive(&mut machine, &mut store, Input::Observe(Default::default()));
    }
    assert_eq!(store.saves, after_start, "empty samples were written");
    // A resume of a rollout that is not paused changes nothing either.
    drive(
        &mut machine,
        &mut store,
        Input::Resume {
            by: "a test".into(),
        },
    );
    assert_eq!(store.saves, after_start);
    // The next step is written.
    store.now = MINUTE;
    drive(&mut machine, &mut store, Input::Tick { traffic: Ok(()) });
    assert!(store.saves > after_start);
}

/// Flagger's tutorial's ladder after a dark launch of 2 minutes and 500 paired requests.
const DARK: &str = "
interval: 1m
stepWeight: 10
maxWeight: 20
darkLaunch: {mirrorWeight: 20, duration: 2m, minRequests: 500}
metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 1m
  - name: request-duration
    thresholdRange: {max: 500}
    interval: 30s
";

/// One second's observation: `pairs` mirrored requests, `canary_only` of them failed by the
/// canary alone.
fn paired_second(pairs: u64, canary_only: u64) -> Input {
    let mut step = coalmine_rollout::Observation::default();
    step.stable.requests = 5 * pairs;
    // The copies' answers are the canary's counts too (the routers' observation source says
    // so); only the pairs are fed here, the dark launch's own evidence.
    step.pairs.both_ok = pairs - canary_only;
    step.pairs.canary_only_failed = canary_only;
    Input::Observe(step)
}

/// Feeds one observation a second from just after the last tick up to the next one.
fn observe_until_next_tick(h: &mut Harness, mut second: impl FnMut(u64) -> Input) {
    let due = h.machine.next_tick_ms().expect("a tick is due");
    let mut t = h.now + 1000;
    while t < due && h.outcome.is_none() {
        h.machine.handle(t, second(t));
        h.outcome = h.machine.outcome();
        t += 1000;
    }
}

#[test]
fn a_dark_launch_mirrors_at_weight_zero_and_passes_on_to_the_first_step() {
    let mut h = Harness::new(DARK);
    // T0 starts the analysis, T1 the dark launch (where the first weight step would be).
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    assert_eq!((h.phase(), h.weight()), (Phase::Progressing, 0));
    let traffic = h.machine.traffic();
    assert_eq!(traffic.canary_weight, Weight::ZERO);
    assert_eq!(traffic.mirror_weight, Weight::from_percent(20.0).unwrap());
    assert!(
        h.events
            .last()
            .unwrap()
            .starts_with("Dark launch: mirroring 20 % of stable's requests"),
        "{:?}",
        h.events
    );
    fn h_dark(h: &Harness) -> coalmine_rollout::DarkLaunchStatus {
        h.machine.status().dark_launch.clone().unwrap()
    }
    assert_eq!(h_dark(&h).stage, coalmine_rollout::DarkLaunchStage::Running);
    // 5 pairs a second, the canary answering as stable does, one observation a second
    // between the ticks: 2 minutes make 590 pairs.
    for _ in 0..2 {
        observe_until_next_tick(&mut h, |_| paired_second(5, 0));
        assert_eq!(h.outcome, None, "{}", h.machine.status().message);
        h.tick(&mut healthy);
    }
    assert_eq!(h.now, 3 * MINUTE);
    assert_eq!(h.weight(), 10, "{:?}", h.events);
    assert_eq!(h.machine.traffic().mirror_weight, Weight::ZERO);
    let passed = h
        .events
        .iter()
        .find(|e| e.starts_with("Dark launch passed"))
        .unwrap();
    assert!(passed.contains("590 paired requests over 120s"), "{passed}");
    assert_eq!(h_dark(&h).stage, coalmine_rollout::DarkLaunchStage::Passed);
    // Observations after it change nothing of it.
    observe_until_next_tick(&mut h, |_| paired_second(5, 5));
    assert_eq!(h_dark(&h).pairs(), 590);
    h.tick(&mut healthy);
    assert_eq!(h.weight(), 20);
}

#[test]
fn a_canary_failing_three_percent_of_mirrored_requests_is_rolled_back_before_any_weight() {
    let mut h = Harness::new(DARK);
    h.tick(&mut healthy);
    h.tick(&mut healthy);
    // 20 pairs a second; the canary fails 3 of each 100 that stable answers well.
    let mut weights = vec![];
    while h.outcome.is_none() && h.now < 10 * MINUTE {
        observe_until_next_tick(&mut h, |t| paired_second(20, u64::from((t / 1000) % 5 < 3)));
        weights.push(h.weight());
        if h.outcome.is_none() {
            h.tick(&mut healthy);
            weights.push(h.weight());
        }
    }
    assert_eq!(h.outcome, Some(Outcome::RolledBack));
    assert!(weights.iter().all(|w| *w == 0), "{weights:?}");
    let status = h.machine.status();
    let failed_at = status.last_transition_ms;
    // Started at T1 (60 s); 11 failures, all the canary's, give a Bayes factor of
    // (2^12 − 1)/12 = 341 ≥ 2/α = 200: some 18 s at 3 failures in 5 s.
    assert!(
        (70_000..90_000).contains(&failed_at),
        "rolled back {failed_at} ms in"
    );
    let dark = status.dark_launch.clone().unwrap();
    assert_eq!(dark.stage, coalmine_rollout::DarkLaunchStage::Failed);
    assert!(
        status.message.contains("Dark launch failed"),
        "{}",
        status.message
    );
    let traffic = h.machine.traffic();
    assert!(!traffic.canary && traffic.mirror_weight == Weight::ZERO);
}

#[test]
fn a_dark_launch_without_enough_pairs_holds_until_the_deadline() {
    let mut h = Harness::with_deadline(DARK, 120);
    for _ in 0..4 {
        observe_until_next_tick(&mut h, |_| paired_second(1, 0));
        h.tick(&mut healthy);
    }
    assert_eq!((h.phase(), h.weight()), (Phase::Progressing, 0));
    assert!(
        h.events
            .last()
            .unwrap()
            .contains("dark launch: 118 of 500 paired requests after 120s"),
        "{:?}",
        h.events
    );
    for _ in 0..2 {
        observe_until_next_tick(&mut h, |_| paired_second(1, 0));
        h.tick(&mut healthy);
    }
    assert_eq!(h.outcome, Some(Outcome::RolledBack));
    assert!(
        h.events.last().unwrap().contains("progressDeadlineSeconds"),
        "{:?}",
        h.events
    );
}
