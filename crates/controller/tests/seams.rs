//! The controller's seams are real: whole rollouts driven in-process through fake backends — a
//! traffic backend, an observation source and a state store of a few lines each — on tokio's
//! paused clock. No socket, no sleep: minutes of a rollout pass in virtual time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use coalmine_controller::observations::{ObservationSource, ObserveError, Sample};
use coalmine_controller::time::Clock;
use coalmine_controller::traffic::TrafficBackend;
use coalmine_controller::{BoxFuture, Driver, Seams, StateError, StateStore};
use coalmine_judge::Counts;
use coalmine_rollout::{Event, Observation, Outcome, Phase, Status, Traffic, TrafficFault};
use coalmine_spec::rollout::Rollout;
use coalmine_spec::Weight;

const MINUTE: u64 = 60_000;
/// Where the virtual clock starts (any Unix time in milliseconds).
const ORIGIN_MS: u64 = 1_800_000_000_000;

/// A rollout with no routers and no targets at all: the seams given are all it needs.
fn rollout(sequential: bool) -> Rollout {
    coalmine_spec::parse_yaml(
        "checkout.yaml",
        &format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata: {{name: checkout}}
spec:
  analysis:
    interval: 1m
    threshold: 2
    stepWeights: [10, 20, 50]
    sequential: {{enabled: {sequential}}}
    metrics:
      - name: request-success-rate
        thresholdRange: {{min: 99}}
        interval: 1m
"
        ),
    )
    .expect("the rollout parses")
}

/// A traffic backend that remembers every traffic it was given.
#[derive(Default)]
struct FakeTraffic {
    applied: Mutex<Vec<Traffic>>,
}

impl FakeTraffic {
    fn current(&self) -> Option<Traffic> {
        self.applied.lock().unwrap().last().copied()
    }

    /// Each change of traffic once: re-applying the same traffic is not a new step.
    fn changes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.applied.lock().unwrap().iter() {
            let shown = if t.promoted {
                "promoted".to_string()
            } else if t.canary {
                format!("canary {}%", t.canary_weight.percent())
            } else {
                "stable only".to_string()
            };
            if out.last() != Some(&shown) {
                out.push(shown);
            }
        }
        out
    }
}

impl TrafficBackend for FakeTraffic {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async { Ok(()) })
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        self.applied.lock().unwrap().push(*traffic);
        Box::pin(async { Ok(()) })
    }

    fn reconcile<'a>(
        &'a self,
        _traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async { Ok(()) })
    }
}

/// Users at 20 requests a second, split as the backend's current traffic says; the canary
/// fails `canary_failures_per_mille` of its requests. Every answer takes 1 ms.
struct FakeUsers {
    traffic: Arc<FakeTraffic>,
    canary_failures_per_mille: u64,
    last: Option<tokio::time::Instant>,
}

impl ObservationSource for FakeUsers {
    fn sample(&mut self) -> BoxFuture<'_, Result<Sample, ObserveError>> {
        let now = tokio::time::Instant::now();
        let elapsed = self
            .last
            .replace(now)
            .map_or(0, |l| (now - l).as_millis() as u64);
        let requests = elapsed * 20 / 1000;
        let canary_share = match self.traffic.current() {
            Some(t) if t.promoted => 10_000,
            Some(t) if t.canary => u64::from(t.canary_weight.basis_points()),
            _ => 0,
        };
        let to_canary = requests * canary_share / 10_000;
        let failing = to_canary * self.canary_failures_per_mille / 1000;
        let (mut canary, mut stable) = (Counts::default(), Counts::default());
        for i in 0..to_canary {
            canary.record(1000, i < failing);
        }
        for _ in to_canary..requests {
            stable.record(1000, false);
        }
        Box::pin(async move {
            Ok(Sample {
                counts: Observation {
                    canary,
                    stable,
                    ..Observation::default()
                },
                restarted: false,
            })
        })
    }
}

/// One saved step: the status after it and its events.
type Step = (Status, Vec<Event>);

/// A state store keeping every saved step in memory.
#[derive(Clone, Default)]
struct FakeStore {
    steps: Arc<Mutex<Vec<Step>>>,
}

impl FakeStore {
    fn events(&self) -> Vec<String> {
        let steps = self.steps.lock().unwrap();
        steps
            .iter()
            .flat_map(|(_, events)| events.iter().map(|e| e.message.clone()))
            .collect()
    }

    fn saved(&self) -> usize {
        self.steps.lock().unwrap().len()
    }
}

impl StateStore for FakeStore {
    fn save<'a>(
        &'a mut self,
        status: &'a Status,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StateError>> {
        self.steps
            .lock()
            .unwrap()
            .push((status.clone(), events.to_vec()));
        Box::pin(async { Ok(()) })
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<Status>, StateError>> {
        let last = self.steps.lock().unwrap().last().map(|(s, _)| s.clone());
        Box::pin(async move { Ok(last) })
    }
}

fn seams(traffic: &Arc<FakeTraffic>, canary_failures_per_mille: u64) -> Seams {
    Seams {
        traffic: traffic.clone(),
        observations: Box::new(FakeUsers {
            traffic: traffic.clone(),
            canary_failures_per_mille,
            last: None,
        }),
        clock: Clock::tokio(ORIGIN_MS),
    }
}

/// A rollout (see [`rollout`]) before its start: its fake traffic backend and its store, both
/// empty.
fn start(sequential: bool) -> (Rollout, Arc<FakeTraffic>, FakeStore) {
    (
        rollout(sequential),
        Arc::new(FakeTraffic::default()),
        FakeStore::default(),
    )
}

/// How often `message` was said.
fn count(events: &[String], message: &str) -> usize {
    events.iter().filter(|e| *e == message).count()
}

/// The traffic changes of a promotion of [`rollout`], each made once.
const PROMOTION_TRAFFIC: [&str; 6] = [
    "stable only",
    "canary 0%",
    "canary 10%",
    "canary 20%",
    "canary 50%",
    "promoted",
];

#[tokio::test(start_paused = true)]
async fn a_healthy_canary_is_promoted_through_the_seams_on_flaggers_timeline() {
    let (rollout, traffic, mut store) = start(true);
    let mut driver = Driver::new(&rollout, None, seams(&traffic, 0)).expect("no routers needed");
    driver.claim().await.unwrap();
    let (_control, mut inputs) = mpsc::channel(1);

    let outcome = driver.run(&mut inputs, &mut store).await;

    assert_eq!(outcome, Outcome::Promoted);
    assert!(driver.settled());
    assert_eq!(traffic.changes(), PROMOTION_TRAFFIC);
    let status = driver.status();
    assert_eq!(status.phase, Phase::Succeeded);
    // T0 initialise, T1..T3 10, 20 and 50 %, T4 promoting, T5 finalising, T6 succeeded.
    assert_eq!(status.last_transition_ms - status.started_ms, 6 * MINUTE);
    let events = store.events();
    assert_eq!(count(&events, "Promotion completed"), 1, "{events:#?}");
    assert_eq!(store.load().await.unwrap().as_ref(), Some(status));
}

#[tokio::test(start_paused = true)]
async fn a_failing_canary_is_rolled_back_by_its_threshold_checks() {
    let (rollout, traffic, mut store) = start(false);
    let mut driver = Driver::new(&rollout, None, seams(&traffic, 200)).unwrap();
    let (_control, mut inputs) = mpsc::channel(1);

    let outcome = driver.run(&mut inputs, &mut store).await;

    assert_eq!(outcome, Outcome::RolledBack);
    // T0 puts the canary in at 0 %, T1 routes 10 % to it, T2 and T3 fail its checks, T4 rolls
    // it back.
    assert_eq!(
        traffic.changes(),
        ["stable only", "canary 0%", "canary 10%", "stable only"]
    );
    let status = driver.status();
    assert_eq!(status.phase, Phase::Failed);
    assert_eq!(status.last_transition_ms - status.started_ms, 4 * MINUTE);
    let events = store.events();
    assert!(
        events
            .last()
            .is_some_and(|e| e.starts_with("Rolling back: Canary failed 2 checks")),
        "{events:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_driver_dropped_mid_rollout_resumes_from_its_store_at_the_same_step() {
    let (rollout, traffic, mut store) = start(true);

    // The controller dies two and a half minutes in: at 20 %, between two ticks.
    let mut first = Driver::new(&rollout, None, seams(&traffic, 0)).unwrap();
    let (_control, mut inputs) = mpsc::channel(1);
    let cut = Duration::from_millis(2 * MINUTE + MINUTE / 2);
    let ran = tokio::time::timeout(cut, first.run(&mut inputs, &mut store)).await;
    assert!(ran.is_err(), "the rollout ended before the crash");
    drop(first);
    let saved = store.load().await.unwrap().expect("steps were saved");
    assert_eq!(
        (saved.phase, saved.canary_weight),
        (Phase::Progressing, Weight::from_percent(20.0).unwrap())
    );
    let before = store.saved();

    // A new controller, from the store alone.
    let mut second = Driver::new(&rollout, Some(saved.clone()), seams(&traffic, 0)).unwrap();
    let (_control, mut inputs) = mpsc::channel(1);
    let outcome = second.run(&mut inputs, &mut store).await;

    assert_eq!(outcome, Outcome::Promoted);
    // It went on from 20 %: the first step it saved is the next one, not a new start.
    let steps = store.steps.lock().unwrap().clone();
    let resumed = &steps[before].0;
    assert_eq!(resumed.started_ms, saved.started_ms);
    assert!(resumed.canary_weight >= saved.canary_weight, "{resumed:?}");
    // Nothing was done twice: every traffic change and every event happened once.
    assert_eq!(traffic.changes(), PROMOTION_TRAFFIC);
    let events = store.events();
    for message in [
        "Initialization done",
        "New revision detected, progressing canary analysis",
        "Starting canary analysis",
        "Advance canary weight 10",
        "Advance canary weight 20",
        "Advance canary weight 50",
        "Analysis passed, promoting the canary",
        "Promotion completed",
    ] {
        assert_eq!(count(&events, message), 1, "{message}: {events:#?}");
    }
    // And on Flagger's timeline, as if it had never stopped.
    let status = second.status();
    assert_eq!(status.last_transition_ms - status.started_ms, 6 * MINUTE);
}
