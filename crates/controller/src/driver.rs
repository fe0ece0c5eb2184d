//! Drives one rollout's state machine on the wall clock: ticks at the times it asks for, answers
//! its questions (webhooks, metrics), keeps the routers in line with its traffic, and hands every
//! change to a [`Sink`] (the terminal for `run`, SQLite for `serve`).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use coalmine_judge::Reading;
use coalmine_rollout::{
    builtin_reading, Action, Event, Input, Machine, Observation, Outcome, Plan, Question, Status,
    Traffic,
};
use coalmine_spec::rollout::{MetricCheck, Rollout, Target};

use crate::providers::Providers;
use crate::routers::{RouterSet, Upstreams};
use crate::webhooks::Hooks;
use crate::window::StatsWindow;

/// Flagger's default window for a metric without `interval`.
const DEFAULT_METRIC_WINDOW_MS: u64 = 60_000;

/// Milliseconds since the Unix epoch: the only clock the runtime reads.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a driver reports. `record` is called after every input, before any action is carried
/// out, so what is persisted is never behind what the routers were told.
pub trait Sink: Send {
    fn record(&mut self, status: &Status, events: &[Event]);
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("spec.{field}: {message}")]
    Unsupported { field: String, message: String },
}

pub struct Driver {
    machine: Machine,
    upstreams: Upstreams,
    routers: RouterSet,
    window: StatsWindow,
    hooks: Hooks,
    checks: Vec<MetricCheck>,
    providers: Providers,
    /// The traffic the routers last accepted.
    applied: Option<Traffic>,
    sample_every_ms: u64,
    /// Counts sampled since the sequential judges last saw them (samples taken to answer an
    /// analysis count too, so no request is left out).
    unobserved: Observation,
}

/// A stable identity of the rollout's spec, sent to webhooks as Flagger's `checksum`.
pub fn checksum(rollout: &Rollout) -> String {
    let text = serde_json::to_string(&rollout.spec).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

fn url_of(target: &Option<Target>, field: &str) -> Result<String, DriverError> {
    match target {
        Some(Target::Url(u)) => Ok(u.to_string()),
        None => Err(DriverError::Unsupported {
            field: field.to_string(),
            message: "the version's url is needed to run the rollout".into(),
        }),
        Some(Target::Command { .. }) => Err(DriverError::Unsupported {
            field: field.to_string(),
            message: "a command target needs `coalmine serve`, which keeps the process running after the rollout; give a url here".into(),
        }),
    }
}

impl Driver {
    /// A driver for a new rollout (`status` None) or one continuing from persisted state.
    pub fn new(rollout: &Rollout, status: Option<Status>) -> Result<Driver, DriverError> {
        let spec = &rollout.spec;
        if spec.routers.is_empty() {
            return Err(DriverError::Unsupported {
                field: "routers".into(),
                message: "list the admin address of at least one Coalmine router".into(),
            });
        }
        let plan = Plan::new(
            &spec.analysis,
            spec.progress_deadline_seconds,
            spec.skip_analysis,
        );
        let name = &rollout.metadata.name;
        let namespace = rollout.metadata.namespace.as_deref().unwrap_or("default");
        let upstreams = Upstreams::new(
            name,
            &url_of(&spec.stable, "stable")?,
            &url_of(&spec.canary, "canary")?,
            &spec.analysis,
        );
        if let Some(check) = spec
            .analysis
            .metrics
            .iter()
            .find(|c| !c.is_builtin() && (c.query.is_none() || c.provider.is_none()))
        {
            return Err(DriverError::Unsupported {
                field: "analysis.metrics".into(),
                message: format!(
                    "metric {:?} needs a provider and query (pass the file of its MetricTemplate)",
                    check.name
                ),
            });
        }
        let windows: Vec<u64> = spec.analysis.metrics.iter().map(window_ms).collect();
        let longest = windows.iter().copied().max().unwrap_or(0);
        let shortest = windows
            .iter()
            .copied()
            .chain([plan.interval_ms])
            .min()
            .unwrap_or(1000);
        let machine = match status {
            Some(status) => Machine::resume(plan, status),
            None => {
                let mut m = Machine::new(plan, now_ms());
                m.status.paused = spec.suspend;
                m
            }
        };
        Ok(Driver {
            machine,
            upstreams,
            routers: RouterSet::new(spec.routers.clone()),
            window: StatsWindow::new(longest.max(1000)),
            hooks: Hooks::new(
                spec.analysis.webhooks.clone(),
                name,
                namespace,
                &checksum(rollout),
            ),
            checks: spec.analysis.metrics.clone(),
            providers: Providers::new(&spec.analysis.metrics),
            applied: None,
            // The sequential judges decide between ticks: they see the routers every second.
            sample_every_ms: if spec.analysis.sequential.enabled {
                (shortest / 4).clamp(200, 1000)
            } else {
                (shortest / 4).clamp(200, 5000)
            },
            unobserved: Observation::default(),
        })
    }

    pub fn status(&self) -> &Status {
        &self.machine.status
    }

    /// Runs until the rollout ends; `control` carries promote/abort/pause/resume and rollbacks
    /// from outside (alerts). Returns the outcome once the routers carry the final traffic.
    pub async fn run(
        &mut self,
        mut control: mpsc::Receiver<Input>,
        sink: &mut dyn Sink,
    ) -> Outcome {
        // After a restart the machine may be waiting for an answer that died with the process.
        if let Some(question) = self.machine.pending() {
            let answer = self.answer(question).await;
            self.feed(answer, sink).await;
        }
        let mut next_sample = now_ms();
        let mut control_open = true;
        loop {
            if let Some(outcome) = self.machine.status.outcome {
                self.settle_final_traffic().await;
                return outcome;
            }
            let due = self.machine.status.next_tick_ms.unwrap_or(u64::MAX);
            let wake = due.min(next_sample);
            let sleep = Duration::from_millis(wake.saturating_sub(now_ms()));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {
                    let now = now_ms();
                    if now >= next_sample {
                        // A missed sample only widens the next window; the tick reports errors.
                        let _ = self.sample().await;
                        next_sample = now + self.sample_every_ms;
                        if self.machine.plan.sequential.is_some() {
                            let observation = std::mem::take(&mut self.unobserved);
                            self.feed(Input::Observe(observation), sink).await;
                        }
                    }
                    if now >= due {
                        let traffic = self.apply_traffic(true).await;
                        self.feed(Input::Tick { traffic }, sink).await;
                    }
                }
                input = control.recv(), if control_open => match input {
                    Some(input) => self.feed(input, sink).await,
                    None => control_open = false,
                },
            }
        }
    }

    /// Hands one input to the machine and carries out what it asks, answering its questions.
    async fn feed(&mut self, input: Input, sink: &mut dyn Sink) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let actions = self.machine.handle(now_ms(), input);
            let events: Vec<Event> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Event(e) => Some(e.clone()),
                    _ => None,
                })
                .collect();
            sink.record(&self.machine.status, &events);
            if self.applied != Some(self.machine.traffic()) {
                // A failure here shows at the next tick, which re-applies first.
                let _ = self.apply_traffic(false).await;
            }
            for action in actions {
                match action {
                    Action::Ask(question) => inputs.push_back(self.answer(question).await),
                    Action::Notify(kind) => {
                        self.hooks.call(kind, self.machine.status.phase).await;
                    }
                    Action::Event(event) => self.hooks.send_event(&event).await,
                    Action::Finished(_) => {}
                }
            }
        }
    }

    async fn answer(&mut self, question: Question) -> Input {
        match question {
            Question::Hooks(kind) => Input::Hooks {
                kind,
                results: self.hooks.call(kind, self.machine.status.phase).await,
            },
            Question::Analysis => {
                // Provider queries run side by side, while the routers are sampled.
                let mut queries = tokio::task::JoinSet::new();
                for (i, check) in self.checks.iter().enumerate() {
                    if !check.is_builtin() {
                        let (providers, check) = (self.providers.clone(), check.clone());
                        queries.spawn(async move { (i, providers.read(&check).await) });
                    }
                }
                let fresh = self.sample().await;
                let mut readings: Vec<Option<Reading>> = self
                    .checks
                    .iter()
                    .map(|check| {
                        check.is_builtin().then(|| match &fresh {
                            Err(reason) => Reading::NoData {
                                reason: format!("router stats unavailable: {reason}"),
                            },
                            Ok(()) => self.builtin(check),
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

    /// Flagger's built-in metrics, from the routers' own counts.
    fn builtin(&self, check: &MetricCheck) -> Reading {
        let window = window_ms(check);
        builtin_reading(
            &check.name,
            || self.window.canary(window),
            || self.window.steps(window),
        )
    }

    async fn sample(&mut self) -> Result<(), String> {
        let stats = self.routers.stats().await?;
        self.window.push(now_ms(), stats);
        // The step since the previous sample.
        self.unobserved.canary.add(&self.window.canary(0));
        self.unobserved.stable.add(&self.window.stable(0));
        Ok(())
    }

    /// Makes every router carry the machine's traffic. `always` re-sends even if unchanged, so a
    /// router that restarted (and lost its table) is put right at the next tick.
    async fn apply_traffic(&mut self, always: bool) -> Result<(), String> {
        let traffic = self.machine.traffic();
        if !always && self.applied == Some(traffic) {
            return Ok(());
        }
        let result = self.routers.apply(&self.upstreams.routes(&traffic)).await;
        self.applied = result.is_ok().then_some(traffic);
        result
    }

    /// The last route change matters most: retry it for a while if routers are unreachable.
    async fn settle_final_traffic(&mut self) {
        for attempt in 0..10 {
            match self.apply_traffic(true).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(attempt, "final routes not applied: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Whether the routers carry the final traffic (after `run` returns).
    pub fn settled(&self) -> bool {
        self.applied == Some(self.machine.traffic())
    }
}

fn window_ms(check: &MetricCheck) -> u64 {
    check
        .interval
        .map(|d| d.0.as_millis() as u64)
        .unwrap_or(DEFAULT_METRIC_WINDOW_MS)
}
