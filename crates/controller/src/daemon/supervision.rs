//! Running and keeping rollouts: one task per rollout — its driver while the run goes on, then
//! the keeper of its routers — its steps saved to the state file, started on `apply` and resumed
//! when the daemon starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use coalmine_rollout::{Event, EventLevel, Input, Outcome, Phase, Status, TrafficFault};
use coalmine_spec::rollout::Rollout;
use coalmine_spec::Weight;

use super::hosted::StartError;
use super::Daemon;
use crate::dashboard::Live;
use crate::driver::{now_ms, Driver, Seams};
use crate::report::Held;
use crate::state::sqlite::{Store, StoreError};
use crate::state::{StateError, StateStore};
use crate::telemetry::Telemetry;
use crate::traffic::{owner, TrafficBackend};
use crate::{BoxFuture, Runner, Unrunnable};

/// A rollout's task: its driver while the run goes on, then the keeper of its routers.
pub(super) struct Running {
    pub(super) run: i64,
    /// When this run began: alerts that started firing before it are about an earlier run.
    pub(super) started_ms: u64,
    /// The running spec (its `rollbackOnAlerts`, its routers).
    pub(super) rollout: Arc<Rollout>,
    pub(super) control: mpsc::Sender<Input>,
    /// What carries its traffic (released when the rollout is deleted).
    pub(super) traffic: Arc<dyn TrafficBackend>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// Rollouts holding because a step could not be saved, by name: shown in their status.
pub(super) type HeldSteps = Arc<Mutex<HashMap<String, Held>>>;

/// Why an apply did not start a run; the running rollout is untouched either way.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApplyError {
    /// The rollout cannot run as things stand (its routers are not Coalmine routers, or are
    /// driven by someone else): the user's to fix.
    #[error(transparent)]
    Refused(#[from] TrafficFault),
    /// Its versions or hosted router did not start, or the driver refused it.
    #[error(transparent)]
    Start(#[from] SpawnError),
    #[error(transparent)]
    State(#[from] StoreError),
    #[error("the new run could not be saved, the old one goes on: {0}")]
    NotSaved(StoreError),
}

/// Why a rollout's driver could not be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Driver(#[from] Unrunnable),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the state file holds no step of run {0}")]
    NothingSaved(i64),
}

/// One run of one rollout in the state file: every step saved there, held (and shown so) while
/// saving fails.
struct RunState {
    store: Store,
    held: HeldSteps,
    name: String,
    /// The running document (the dashboard's row shows its service).
    rollout: Arc<Rollout>,
    run: i64,
    telemetry: Arc<Telemetry>,
    live: Arc<Live>,
    /// Whether this run's outcome has been counted (a resumed run may have ended before).
    counted: bool,
}

impl RunState {
    fn save_now(&mut self, status: &Status, events: &[Event]) -> Result<(), StateError> {
        if let Err(e) = self.store.record(&self.name, self.run, status, events) {
            let reason = e.to_string();
            let mut held = self.held.lock().expect("held");
            let since_ms = held.get(&self.name).map_or_else(now_ms, |h| h.since_ms);
            let news = held.get(&self.name).is_none_or(|h| h.reason != reason);
            if news {
                tracing::error!(rollout = %self.name, "cannot save the rollout's state: {reason}");
            }
            let now_held = Held { since_ms, reason };
            // The open pages show it: nothing else changes while it holds.
            if let (true, Ok(Some(stored))) = (news, self.store.get(&self.name)) {
                if stored.run == self.run {
                    self.live.held(
                        &self.name,
                        &self.rollout,
                        self.run,
                        &stored.status,
                        &now_held,
                    );
                }
            }
            held.insert(self.name.clone(), now_held);
            self.telemetry.unsaved(&self.name, true);
            return Err(StateError::new(e));
        }
        if self.held.lock().expect("held").remove(&self.name).is_some() {
            self.telemetry.unsaved(&self.name, false);
        }
        self.telemetry.observe(&self.name, status);
        self.live.saved(
            &self.name,
            &self.rollout,
            self.run,
            status,
            events,
            now_ms(),
        );
        if let (Some(outcome), false) = (status.outcome, self.counted) {
            let seconds = now_ms().saturating_sub(status.started_ms) as f64 / 1000.0;
            self.telemetry.finished(&self.name, outcome, seconds);
            self.counted = true;
        }
        for e in events {
            let weight = e.weight.percent();
            tracing::info!(rollout = %self.name, phase = e.phase.as_str(), weight_percent = weight, "{}", e.message);
        }
        Ok(())
    }
}

impl StateStore for RunState {
    fn save<'a>(
        &'a mut self,
        status: &'a Status,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(std::future::ready(self.save_now(status, events)))
    }

    /// The status of this run, unless a newer run replaced it.
    fn load(&self) -> BoxFuture<'_, Result<Option<Status>, StateError>> {
        let stored = self.store.get(&self.name).map_err(StateError::new);
        Box::pin(std::future::ready(stored.map(|stored| {
            stored.filter(|s| s.run == self.run).map(|s| s.status)
        })))
    }
}

/// The routers' services a rollout drives, as comparable names: the service on each admin URL,
/// and hosted routers' traffic addresses (a hosted router is the rollout's own).
pub(super) fn router_keys(r: &Rollout) -> Vec<String> {
    let service = r.spec.router_service();
    let mut keys: Vec<String> = r
        .spec
        .routers
        .iter()
        .map(|u| format!("service {service:?} of router {u}"))
        .collect();
    if let Some(hosted) = &r.spec.router {
        keys.push(format!("hosted router on {}", hosted.listen));
    }
    keys
}

/// What a rollout drives that no other rollout may: its routers' services ([`router_keys`])
/// and its feature flag, each with what to do about a clash.
fn exclusive_keys(r: &Rollout) -> Vec<(String, Clash)> {
    let mut keys: Vec<(String, Clash)> = router_keys(r)
        .into_iter()
        .map(|k| (k, Clash::Router))
        .collect();
    if let Some(flag) = &r.spec.flag {
        keys.push((format!("feature flag {:?}", flag.key), Clash::Flag));
    }
    keys
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clash {
    Router,
    Flag,
}

impl Clash {
    fn remedy(self, name: &str, owner: &str) -> String {
        match self {
            Clash::Router => format!("one service of a router carries one rollout: give {name:?} its own service (spec.routerService) or router, or delete {owner:?} first (`coalmine delete {owner}`)"),
            Clash::Flag => format!("one rollout steps a flag: give {name:?} its own flag key, or delete {owner:?} first (`coalmine delete {owner}`)"),
        }
    }
}

/// A router's service (or a feature flag) another rollout already carries.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {key} already carries rollout {owner:?} ({phase}); {remedy}")]
pub(super) struct RouterTaken {
    name: String,
    key: String,
    owner: String,
    phase: String,
    remedy: String,
}

impl Daemon {
    /// One service of a router carries one rollout: a rollout whose service another rollout
    /// already drives on one of its routers (running or finished, whose routers it keeps) is
    /// refused, naming the service and that rollout. Likewise a feature flag.
    pub(super) fn router_conflicts(&self, incoming: &[Rollout]) -> Result<(), ConflictError> {
        let stored = self.store.all()?;
        let mut owners: Vec<(String, String, String)> = stored
            .into_iter()
            .flatten()
            .flat_map(|s| {
                let name = s.rollout.metadata.name.clone();
                let phase = s.status.phase.as_str().to_string();
                exclusive_keys(&s.rollout)
                    .into_iter()
                    .map(move |(k, _)| (k, name.clone(), phase.clone()))
            })
            .collect();
        for r in incoming {
            let name = &r.metadata.name;
            for (key, clash) in exclusive_keys(r) {
                if let Some((_, owner, phase)) = owners
                    .iter()
                    .find(|(k, owner, _)| *k == key && owner != name)
                {
                    return Err(RouterTaken {
                        name: name.clone(),
                        remedy: clash.remedy(name, owner),
                        key,
                        owner: owner.clone(),
                        phase: phase.clone(),
                    }
                    .into());
                }
            }
            owners.extend(
                exclusive_keys(r)
                    .into_iter()
                    .map(|(k, _)| (k, name.clone(), "in this apply".to_string())),
            );
        }
        Ok(())
    }

    pub(super) async fn resume_all(self: &Arc<Self>) -> Result<(), StoreError> {
        // Groups first: a promoted member whose run ends at once keeps its previous version
        // for its group.
        for group in self.store.groups()? {
            self.supervise_group(group);
        }
        for stored in self.store.all()? {
            let stored = match stored {
                Ok(s) => s,
                Err(bad) => {
                    tracing::error!(rollout = %bad.name, "cannot read this rollout's stored state, so it is not resumed (the others are): {}", bad.error);
                    continue;
                }
            };
            self.telemetry
                .observe(&stored.rollout.metadata.name, &stored.status);
            let name = stored.rollout.metadata.name.clone();
            tracing::info!(rollout = %name, phase = stored.status.phase.as_str(), "resuming");
            // Finished rollouts too: their routers are kept as they left them.
            if let Err(e) = self.resume(stored.rollout, stored.run).await {
                tracing::error!(rollout = %name, "cannot resume: {e}");
            }
        }
        Ok(())
    }

    /// Starts a new run of `rollout` (or says why it is left as it is).
    pub(super) async fn apply_one(
        self: &Arc<Self>,
        rollout: Rollout,
        restart: bool,
        gate: Option<coalmine_rollout::Gate>,
    ) -> Result<&'static str, ApplyError> {
        let name = rollout.metadata.name.clone();
        let existing = self.store.get(&name)?;
        let action = match &existing {
            Some(old) if old.rollout == rollout && !restart => {
                return Ok(match old.status.phase {
                    Phase::Failed => "unchanged (its last run was rolled back: `coalmine apply --restart` runs it again)",
                    Phase::Succeeded => "unchanged (already promoted: `coalmine apply --restart` runs it again)",
                    _ => "unchanged",
                })
            }
            Some(old) if !old.status.phase.is_final() => "restarted",
            Some(_) => "started",
            None => "created",
        };
        // Started (processes ready) and saved before the old run stops: a failure leaves the
        // old run be.
        let mut driver = self.driver(&rollout, None).await?;
        driver.claim().await?;
        if let Some(gate) = gate {
            driver.gate_before_start(gate);
        }
        let message = match action {
            "restarted" => "New revision applied: analysis restarted from the beginning",
            _ => "Rollout applied",
        };
        let event = Event {
            time_ms: now_ms(),
            level: EventLevel::Info,
            phase: Phase::Initializing,
            weight: Weight::ZERO,
            message: message.into(),
        };
        let run = self
            .store
            .start_run(&rollout, driver.status(), std::slice::from_ref(&event))
            .map_err(ApplyError::NotSaved)?;
        if let Some(old) = self.running.lock().expect("running").remove(&name) {
            old.task.abort();
        }
        self.live
            .saved(&name, &rollout, run, driver.status(), &[event], now_ms());
        let state = self.run_state(&rollout, run, driver.status().outcome.is_some());
        self.launch(rollout, driver, state);
        Ok(action)
    }

    /// A driver for the rollout, with its versions ready and its hosted router (if any)
    /// started and added.
    async fn driver(
        &self,
        rollout: &Rollout,
        status: Option<Status>,
    ) -> Result<Driver, SpawnError> {
        let effective = self.hosted.start(rollout).await?;
        let owner = owner(&rollout.metadata.name, &self.controller);
        let seams = Seams::open(&effective, Runner::Serve, &owner)?;
        Ok(Driver::new(&effective, status, seams)?)
    }

    fn run_state(&self, rollout: &Rollout, run: i64, counted: bool) -> RunState {
        RunState {
            store: self.store.clone(),
            held: self.held.clone(),
            name: rollout.metadata.name.clone(),
            rollout: Arc::new(rollout.clone()),
            run,
            telemetry: self.telemetry.clone(),
            live: self.live.clone(),
            counted,
        }
    }

    /// Continues a stored run from the last step its state holds.
    async fn resume(self: &Arc<Self>, rollout: Rollout, run: i64) -> Result<(), SpawnError> {
        let mut state = self.run_state(&rollout, run, false);
        let status = state.load().await?.ok_or(SpawnError::NothingSaved(run))?;
        let driver = self.driver(&rollout, Some(status)).await?;
        state.counted = driver.status().outcome.is_some();
        self.launch(rollout, driver, state);
        Ok(())
    }

    fn launch(self: &Arc<Self>, rollout: Rollout, mut driver: Driver, mut state: RunState) {
        let name = rollout.metadata.name.clone();
        let run = state.run;
        let (control, mut inputs) = mpsc::channel(16);
        let daemon = self.clone();
        let task_name = name.clone();
        let started_ms = driver.status().started_ms;
        let traffic = driver.traffic();
        let in_group = rollout.group().is_some();
        let task = tokio::spawn(async move {
            let outcome = driver.run(&mut inputs, &mut state).await;
            if driver.settled() {
                if let Err(e) = daemon.store.mark_settled(&task_name, run) {
                    tracing::error!(rollout = %task_name, "{e}");
                }
            }
            tracing::info!(rollout = %task_name, ?outcome, "rollout ended");
            let current = daemon
                .running
                .lock()
                .expect("running")
                .get(&task_name)
                .is_some_and(|r| r.run == run);
            // A promoted member of a group keeps its previous version until the group ends:
            // the group may still roll it back to it.
            let kept_for_group = outcome == Outcome::Promoted && in_group;
            if current && !kept_for_group {
                daemon.hosted.retire(&task_name, outcome).await;
            }
            // From now on the task keeps the routers as the run left them.
            driver.keep(&mut state, &mut inputs).await;
        });
        self.running.lock().expect("running").insert(
            name,
            Running {
                run,
                started_ms,
                rollout: Arc::new(rollout),
                control,
                traffic,
                task,
            },
        );
    }
}

/// Why an apply conflicts with what the daemon already runs.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConflictError {
    #[error(transparent)]
    Taken(#[from] RouterTaken),
    #[error(transparent)]
    State(#[from] StoreError),
}
