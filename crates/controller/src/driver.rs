//! Drives one rollout's state machine on a clock: ticks at the times it asks for, answers its
//! questions (webhooks, metrics), keeps the traffic backend in line with its traffic, and saves
//! every step to a [`StateStore`] (the terminal for `run`, SQLite for `serve`) before acting on
//! it. What it touches outside, it touches through the seams it holds ([`Seams`]), never by
//! name.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use coalmine_judge::Reading;
use coalmine_rollout::{
    Event, EventLevel, Input, Machine, NotSaved, Observation, Outcome, Phase, Plan, Question,
    Status, Traffic, TrafficFault, Window, World,
};
use coalmine_spec::rollout::{HookKind, MetricCheck, Rollout};

use crate::notify::Notifier;
use crate::observations::{self, ObservationSource, ObserveError};
use crate::providers::Providers;
use crate::state::{StateError, StateStore};
use crate::time::Clock;
use crate::traffic::{self, TrafficBackend};
use crate::webhooks::Hooks;
use crate::{Runner, Unrunnable};

pub use crate::time::now_ms;

/// How often a driver that could not save a step tries again.
const SAVE_RETRY_MS: u64 = 1000;
/// How often a finished rollout's traffic is checked (a restarted router is put right).
const KEEP_EVERY_MS: u64 = 2000;

/// What a driver touches outside the machine, chosen for the rollout at run time.
pub struct Seams {
    /// Carries the traffic (shared: `serve` releases it when a rollout is deleted).
    pub traffic: Arc<dyn TrafficBackend>,
    /// Counts both versions' answers.
    pub observations: Box<dyn ObservationSource>,
    /// The wall clock, or tokio's in tests that run a rollout in virtual time.
    pub clock: Clock,
}

impl Seams {
    /// The registered traffic backend and observation source that take `rollout` (checked
    /// for `runner` first), driven on behalf of `owner` (see [`traffic::owner`]).
    pub fn open(rollout: &Rollout, runner: Runner, owner: &str) -> Result<Seams, Unrunnable> {
        crate::check(rollout, runner)?;
        Ok(Seams {
            traffic: traffic::open(rollout, runner, owner)?.into(),
            observations: observations::open(rollout)?,
            clock: Clock::Wall,
        })
    }
}

/// Steps that could not be saved, since when, and when to try again. Meanwhile the driver
/// does nothing.
struct Unsaved {
    since_ms: u64,
    reason: String,
    /// `None` once the wait is over: the next step tries to save again.
    retry_at_ms: Option<u64>,
}

pub struct Driver {
    machine: Machine,
    edge: Edge,
    sample_every_ms: u64,
    /// Set while the last step could not be saved.
    unsaved: Option<Unsaved>,
    /// Commands (abort, promote, an alert's rollback...) whose step could not be saved yet.
    unsaved_inputs: VecDeque<Input>,
}

/// What the machine's steps touch: the traffic backend, the counts, the webhooks and the
/// metric providers.
struct Edge {
    traffic: Arc<dyn TrafficBackend>,
    observations: Box<dyn ObservationSource>,
    clock: Clock,
    /// Both versions' counts per sample, for the built-in metrics.
    window: Window,
    /// When the last sample was taken: where the next step begins.
    last_sample_ms: Option<u64>,
    hooks: Hooks,
    checks: Vec<MetricCheck>,
    providers: Providers,
    /// The traffic the backend last accepted.
    applied: Option<Traffic>,
    /// Counts sampled since the sequential judges last saw them (samples taken to answer an
    /// analysis count too, so no request is left out).
    unobserved: Observation,
    /// Posts the rollout's alerts, off the driving path.
    notifier: Notifier,
    /// The phase of the last saved step: what a saved step is compared with to tell the news.
    saved_phase: Phase,
}

/// The driver as the machine's world for one input: the edge, and the store every step is
/// saved to first.
struct Stepping<'a> {
    edge: &'a mut Edge,
    store: &'a mut dyn StateStore,
    unsaved: &'a mut Option<Unsaved>,
}

/// A stable identity of the rollout's spec, sent to webhooks as Flagger's `checksum`.
pub fn checksum(rollout: &Rollout) -> String {
    let text = serde_json::to_string(&rollout.spec).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

impl Driver {
    /// What the driver itself needs of a rollout: every metric that is not built in has its
    /// provider and query.
    pub fn check(rollout: &Rollout) -> Result<(), Unrunnable> {
        match rollout
            .spec
            .analysis
            .metrics
            .iter()
            .find(|c| !c.is_builtin() && (c.query.is_none() || c.provider.is_none()))
        {
            Some(check) => Err(Unrunnable {
                field: "analysis.metrics".into(),
                message: format!(
                    "metric {:?} needs a provider and query (pass the file of its MetricTemplate)",
                    check.name
                ),
            }),
            None => Ok(()),
        }
    }

    /// A driver for a new rollout (`status` None) or one continuing from persisted state,
    /// through `seams`.
    pub fn new(
        rollout: &Rollout,
        status: Option<Status>,
        seams: Seams,
    ) -> Result<Driver, Unrunnable> {
        Self::check(rollout)?;
        let spec = &rollout.spec;
        let plan = Plan::new(
            &spec.analysis,
            spec.progress_deadline_seconds,
            spec.skip_analysis,
        );
        let name = &rollout.metadata.name;
        let namespace = rollout.metadata.namespace.as_deref().unwrap_or("default");
        let windows: Vec<u64> = plan.checks.iter().map(|c| c.window_ms).collect();
        let longest = windows.iter().copied().max().unwrap_or(0);
        let shortest = windows
            .iter()
            .copied()
            .chain([plan.interval_ms])
            .min()
            .unwrap_or(1000);
        let machine = match status {
            Some(status) => Machine::resume(plan, status),
            None => Machine::new(plan, seams.clock.now_ms()).paused(spec.suspend),
        };
        let saved_phase = machine.status().phase;
        Ok(Driver {
            machine,
            edge: Edge {
                traffic: seams.traffic,
                observations: seams.observations,
                clock: seams.clock,
                window: Window::new(longest.max(1000)),
                last_sample_ms: None,
                hooks: Hooks::new(
                    spec.analysis.webhooks.clone(),
                    name,
                    namespace,
                    &checksum(rollout),
                ),
                checks: spec.analysis.metrics.clone(),
                providers: Providers::new(&spec.analysis.metrics),
                applied: None,
                unobserved: Observation::default(),
                notifier: Notifier::new(rollout),
                saved_phase,
            },
            // The sequential judges decide between ticks: they see the counts every second.
            sample_every_ms: if spec.analysis.sequential.enabled
                || spec.analysis.dark_launch.is_some()
            {
                (shortest / 4).clamp(200, 1000)
            } else {
                (shortest / 4).clamp(200, 5000)
            },
            unsaved: None,
            unsaved_inputs: VecDeque::new(),
        })
    }

    pub fn status(&self) -> &Status {
        self.machine.status()
    }

    /// The traffic backend this driver drives.
    pub fn traffic(&self) -> Arc<dyn TrafficBackend> {
        self.edge.traffic.clone()
    }

    /// Checks, before the rollout moves anything, that its traffic backend is free for it (for
    /// routers: Coalmine routers that no other rollout is driving).
    pub fn claim(&self) -> impl Future<Output = Result<(), TrafficFault>> + Send + 'static {
        let traffic = self.traffic();
        async move { traffic.claim().await }
    }

    /// Lets the traffic backend go after the rollout, when nothing will keep it (`run` ends):
    /// it keeps the final traffic, and another rollout may take it.
    pub fn release(&self) -> impl Future<Output = Result<(), TrafficFault>> + Send + 'static {
        let traffic = self.traffic();
        async move { traffic.release().await }
    }

    /// Runs until the rollout ends; `control` carries promote/abort/pause/resume and rollbacks
    /// from outside (alerts). Returns the outcome once the backend carries the final traffic.
    pub async fn run(
        &mut self,
        control: &mut mpsc::Receiver<Input>,
        store: &mut dyn StateStore,
    ) -> Outcome {
        // After a restart the machine may be waiting for an answer that died with the process.
        self.answer_pending(store).await;
        let mut next_sample = self.edge.clock.now_ms();
        let mut control_open = true;
        loop {
            if let Some(outcome) = self.machine.outcome() {
                // An outcome is only ever in the status once it was saved.
                self.settle_final_traffic().await;
                return outcome;
            }
            let waiting = self.unsaved.as_ref().and_then(|u| u.retry_at_ms);
            let wake = match waiting {
                Some(retry_at) => retry_at,
                None => {
                    let due = self.machine.next_tick_ms().unwrap_or(u64::MAX);
                    due.min(next_sample)
                }
            };
            let sleep = Duration::from_millis(wake.saturating_sub(self.edge.clock.now_ms()));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {
                    if waiting.is_some() {
                        self.try_saving_again(store).await;
                        continue;
                    }
                    let now = self.edge.clock.now_ms();
                    if now >= next_sample {
                        // A missed sample only widens the next step; the tick reports errors.
                        let _ = self.edge.sample(&self.machine.traffic()).await;
                        next_sample = now + self.sample_every_ms;
                        if self.machine.plan().observes() {
                            let observation = std::mem::take(&mut self.edge.unobserved);
                            self.feed(Input::Observe(observation), store).await;
                        }
                    }
                    let due = self.machine.next_tick_ms().unwrap_or(u64::MAX);
                    if !self.waiting_to_save() && now >= due {
                        let traffic = self.edge.apply_traffic(&self.machine.traffic(), true).await;
                        self.feed(Input::Tick { traffic }, store).await;
                    }
                }
                input = control.recv(), if control_open => match input {
                    // Held while a step is unsaved: carried out once it can be saved.
                    Some(input) if self.waiting_to_save() => self.unsaved_inputs.push_back(input),
                    Some(input) => self.feed(input, store).await,
                    None => control_open = false,
                },
            }
        }
    }

    /// A finished rollout's traffic stays as it left it: every few seconds the backend is
    /// checked and, where it lost the final traffic (a router restarted with its old command
    /// line), put right and said so. A promoted rollout's group may still revert it
    /// (`Input::Revert` on `control`). Runs until the task is dropped.
    pub async fn keep(&mut self, store: &mut dyn StateStore, control: &mut mpsc::Receiver<Input>) {
        let mut control_open = true;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(KEEP_EVERY_MS)) => {}
                input = control.recv(), if control_open => {
                    match input {
                        Some(revert @ Input::Revert { .. }) => {
                            self.feed(revert, store).await;
                            self.settle_final_traffic().await;
                        }
                        Some(_) => {}
                        None => control_open = false,
                    }
                    continue;
                }
            }
            let traffic = self.machine.traffic();
            let Ok(corrected) = self.edge.traffic.reconcile(&traffic).await else {
                continue;
            };
            if corrected.is_empty() {
                continue;
            }
            let status = self.machine.status();
            let event = Event {
                time_ms: self.edge.clock.now_ms(),
                level: EventLevel::Warning,
                phase: status.phase,
                weight: status.canary_weight,
                message: format!(
                    "Router {} had lost this rollout's final routes (restarted?): put back",
                    corrected.join(", ")
                ),
            };
            let _ = store.save(status, &[event]).await;
        }
    }

    /// Asks again a question the machine is waiting on (after a restart, or after a step that
    /// answered it could not be saved).
    async fn answer_pending(&mut self, store: &mut dyn StateStore) {
        if let Some(question) = self.machine.pending() {
            let answer = self.edge.answer(&self.machine, question).await;
            self.feed(answer, store).await;
        }
    }

    /// Whether a step could not be saved and the driver is waiting before trying again.
    fn waiting_to_save(&self) -> bool {
        self.unsaved
            .as_ref()
            .is_some_and(|u| u.retry_at_ms.is_some())
    }

    /// After a wait, tries again what could not be saved: a question to answer again, the
    /// commands held, then the ticks and samples of the loop.
    async fn try_saving_again(&mut self, store: &mut dyn StateStore) {
        if let Some(unsaved) = &mut self.unsaved {
            unsaved.retry_at_ms = None;
        }
        self.answer_pending(store).await;
        while !self.waiting_to_save() {
            let Some(input) = self.unsaved_inputs.pop_front() else {
                break;
            };
            self.feed(input, store).await;
        }
    }

    /// Hands one input to the machine and carries out what it asks, answering its questions.
    /// A step is carried out only once it is saved; one that cannot be saved is undone and the
    /// driver holds.
    async fn feed(&mut self, input: Input, store: &mut dyn StateStore) {
        let mut world = Stepping {
            edge: &mut self.edge,
            store,
            unsaved: &mut self.unsaved,
        };
        if let Err(NotSaved { input, error }) = self.machine.drive(input, &mut world).await {
            self.hold_unsaved(input, error);
        }
    }

    /// The step of `input` was not saved: nothing of it happens. What it carried is kept for
    /// when saving works again: commands are queued, observed counts go back to be observed;
    /// ticks come again by themselves and answers are asked for again.
    fn hold_unsaved(&mut self, input: Input, error: StateError) {
        let reason = error.to_string();
        match input {
            Input::Observe(observation) => self.edge.unobserved.add(&observation),
            Input::Tick { .. } | Input::Hooks { .. } | Input::Analysis { .. } => {}
            command => self.unsaved_inputs.push_back(command),
        }
        let now = self.edge.clock.now_ms();
        if self.unsaved.is_none() {
            tracing::error!("could not save a step ({reason}): holding until it can be saved");
        }
        let since_ms = self.unsaved.as_ref().map_or(now, |u| u.since_ms);
        self.unsaved = Some(Unsaved {
            since_ms,
            reason,
            retry_at_ms: Some(now + SAVE_RETRY_MS),
        });
    }

    /// The last traffic change matters most: retry it for a while if the backend is
    /// unreachable.
    async fn settle_final_traffic(&mut self) {
        for attempt in 0..10 {
            match self.edge.apply_traffic(&self.machine.traffic(), true).await {
                Ok(()) => return,
                Err(TrafficFault::Refused(e)) => {
                    tracing::error!("final routes refused: {e}");
                    return;
                }
                Err(e) => tracing::warn!(attempt, "final routes not applied: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits, at most `within`, for the rollout's notifications still queued to be posted or
    /// given up (`run`, before its process exits).
    pub async fn flush_notifications(&self, within: Duration) {
        self.edge.notifier.flush(within).await;
    }

    /// Its group's gate before the run starts (saved with its first step): a member of a group
    /// takes no step the group has not allowed.
    pub fn gate_before_start(&mut self, gate: coalmine_rollout::Gate) {
        let now = self.edge.clock.now_ms();
        self.machine.handle(now, Input::Gate(gate));
    }

    /// Whether the backend carries the final traffic (after `run` returns).
    pub fn settled(&self) -> bool {
        self.edge.applied == Some(self.machine.traffic())
    }

    /// The traffic the machine wants carried: after `run` returns, the rollout's final traffic.
    pub fn wanted_traffic(&self) -> Traffic {
        self.machine.traffic()
    }
}

impl Edge {
    async fn answer(&mut self, machine: &Machine, question: Question) -> Input {
        match question {
            Question::Hooks(kind) => Input::Hooks {
                kind,
                results: self.hooks.call(kind, machine.status().phase).await,
            },
            Question::Analysis => {
                // Provider queries run side by side, while the counts are sampled.
                let mut queries = tokio::task::JoinSet::new();
                for (i, check) in self.checks.iter().enumerate() {
                    if !check.is_builtin() {
                        let (providers, check) = (self.providers.clone(), check.clone());
                        queries.spawn(async move { (i, providers.read(&check).await) });
                    }
                }
                let fresh = self.sample(&machine.traffic()).await;
                let mut readings: Vec<Option<Reading>> = self
                    .checks
                    .iter()
                    .zip(&machine.plan().checks)
                    .map(|(check, planned)| {
                        check.is_builtin().then(|| match &fresh {
                            Err(reason) => Reading::NoData {
                                reason: format!("counts unavailable: {reason}"),
                            },
                            Ok(()) => self.window.reading(planned),
                        })
                    })
                    .collect();
                while let Some(joined) = queries.join_next().await {
                    if let Ok((i, reading)) = joined {
                        readings[i] = Some(reading);
                    }
                }
                let readings = readings
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| Reading::Error {
                            reason: "the metric query stopped unexpectedly".into(),
                        })
                    })
                    .collect();
                Input::Analysis { readings }
            }
        }
    }

    /// Takes a sample: its step goes into the window and to the sequential judges. A backend
    /// that restarted serves what it was started with, not this rollout's traffic: that is put
    /// back now rather than at the next tick.
    async fn sample(&mut self, traffic: &Traffic) -> Result<(), ObserveError> {
        let sample = self.observations.sample().await?;
        let now = self.clock.now_ms();
        self.unobserved.add(&sample.counts);
        if let Some(start) = self.last_sample_ms.replace(now) {
            self.window.push(start, now, sample.counts);
        }
        if sample.restarted {
            tracing::warn!("a router restarted: re-applying the routes");
            let _ = self.apply_traffic(traffic, true).await;
        }
        Ok(())
    }

    /// Makes the backend carry `traffic`. `always` re-sends even if unchanged, so a backend
    /// that lost it (a router restarted) is put right at the next tick.
    async fn apply_traffic(&mut self, traffic: &Traffic, always: bool) -> Result<(), TrafficFault> {
        if !always && self.applied == Some(*traffic) {
            return Ok(());
        }
        let result = self.traffic.apply(traffic).await;
        self.applied = result.is_ok().then_some(*traffic);
        result
    }
}

impl World for Stepping<'_> {
    type Unsaved = StateError;

    fn now(&self) -> u64 {
        self.edge.clock.now_ms()
    }

    async fn save(&mut self, status: &Status, events: &[Event]) -> Result<(), StateError> {
        self.store.save(status, events).await?;
        // Only a saved step is news; telling it only queues.
        let before = std::mem::replace(&mut self.edge.saved_phase, status.phase);
        self.edge.notifier.saved(before, status, events);
        if let Some(unsaved) = self.unsaved.take() {
            tracing::warn!(
                "steps are saved again after {:.1}s ({}); continuing",
                self.edge.clock.now_ms().saturating_sub(unsaved.since_ms) as f64 / 1000.0,
                unsaved.reason
            );
        }
        Ok(())
    }

    async fn route(&mut self, machine: &Machine) -> Result<(), TrafficFault> {
        // An unreachable backend shows at the next tick, which re-applies first.
        self.edge.apply_traffic(&machine.traffic(), false).await
    }

    async fn answer(&mut self, machine: &Machine, question: Question) -> Input {
        self.edge.answer(machine, question).await
    }

    async fn notify(&mut self, kind: HookKind, phase: Phase) {
        self.edge.hooks.call(kind, phase).await;
    }

    async fn event(&mut self, event: &Event) {
        self.edge.hooks.send_event(event).await;
    }
}
