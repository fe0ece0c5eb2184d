//! `coalmine serve`: many rollouts, their state in SQLite, an HTTP API for the `apply`,
//! `status`, `promote`, `abort`, `pause`, `resume` and `history` clients.
//!
//! Mutating calls need the daemon's bearer token; reads are open. A restart on the same state
//! file resumes every unfinished rollout from its persisted phase and weight. Alertmanager's
//! webhook (`POST /api/v1/alertmanager`, same token) rolls back the rollouts whose
//! `rollbackOnAlerts` match a firing alert; `/metrics` shows every rollout to Prometheus.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use coalmine_rollout::{Event, EventLevel, Input, Outcome, Phase, Status};
use coalmine_router::{RouterConfig, RouterHandle, RoutesDoc, UpstreamUrl};
use coalmine_spec::documents;
use coalmine_spec::rollout::{HttpUrl, Rollout, Target};

use crate::driver::{now_ms, Driver, Sink};
use crate::lock::{LockError, StateLock};
use crate::processes::ManagedProcess;
use crate::report::{event_json, status_json, Held};
use crate::routers::RouterSet;
use crate::store::{Opened, Store, StoreError};
use crate::telemetry::Telemetry;

pub struct DaemonConfig {
    pub api: SocketAddr,
    pub state: PathBuf,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Locked(#[from] LockError),
    /// The cause is in the message, not a `source`: shown once however it is printed.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A rollout's task: its driver while the run goes on, then the keeper of its routers.
struct Running {
    run: i64,
    /// When this run began: alerts that started firing before it are about an earlier run.
    started_ms: u64,
    /// The running spec (its `rollbackOnAlerts`, its routers).
    rollout: Arc<Rollout>,
    control: mpsc::Sender<Input>,
    task: tokio::task::JoinHandle<()>,
}

/// Rollouts holding because a step could not be saved, by name: shown in their status.
type HeldSteps = Arc<Mutex<HashMap<String, Held>>>;

/// A router `serve` runs itself for a rollout (`spec.router`).
struct HostedRouter {
    listen: String,
    handle: RouterHandle,
}

struct Daemon {
    store: Store,
    /// How this daemon names itself to the routers it drives (with each rollout's name).
    controller: String,
    held: HeldSteps,
    token: String,
    running: Mutex<HashMap<String, Running>>,
    routers: Mutex<HashMap<String, HostedRouter>>,
    /// Processes started for `command` targets, by rollout. Held across awaits (starting one
    /// waits for its readiness), hence tokio's mutex.
    processes: tokio::sync::Mutex<HashMap<String, Versions>>,
    telemetry: Arc<Telemetry>,
}

/// The processes serving one rollout's versions.
#[derive(Default)]
struct Versions {
    stable: Option<ManagedProcess>,
    canary: Option<ManagedProcess>,
}

/// Persists every step of one run.
struct StoreSink {
    store: Store,
    held: HeldSteps,
    name: String,
    run: i64,
    telemetry: Arc<Telemetry>,
    /// Whether this run's outcome has been counted (a resumed run may have ended before).
    counted: bool,
}

impl Sink for StoreSink {
    fn record(&mut self, status: &Status, events: &[Event]) -> Result<(), String> {
        if let Err(e) = self.store.record(&self.name, self.run, status, events) {
            let reason = e.to_string();
            let mut held = self.held.lock().expect("held");
            let since_ms = held.get(&self.name).map_or_else(now_ms, |h| h.since_ms);
            if held.get(&self.name).is_none_or(|h| h.reason != reason) {
                tracing::error!(rollout = %self.name, "cannot save the rollout's state: {reason}");
            }
            held.insert(
                self.name.clone(),
                Held {
                    since_ms,
                    reason: reason.clone(),
                },
            );
            self.telemetry.unsaved(&self.name, true);
            return Err(reason);
        }
        if self.held.lock().expect("held").remove(&self.name).is_some() {
            self.telemetry.unsaved(&self.name, false);
        }
        self.telemetry.observe(&self.name, status);
        if let (Some(outcome), false) = (status.outcome, self.counted) {
            let seconds = now_ms().saturating_sub(status.started_ms) as f64 / 1000.0;
            self.telemetry.finished(&self.name, outcome, seconds);
            self.counted = true;
        }
        for e in events {
            let weight = coalmine_spec::weight::basis_points_to_percent(e.weight);
            tracing::info!(rollout = %self.name, phase = e.phase.as_str(), weight_percent = weight, "{}", e.message);
        }
        Ok(())
    }
}

/// Runs the daemon until `shutdown` resolves. Unfinished rollouts keep their state on disk and
/// resume when the daemon starts again; shutting down does not roll anything back.
pub async fn serve(
    config: DaemonConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    // Before anything is read: a second daemon on this file must not even start.
    let since = crate::time::rfc3339(now_ms());
    let holder = |api: SocketAddr| format!("pid {}, api {api}, since {since}", std::process::id());
    let mut lock = StateLock::acquire(&config.state, &holder(config.api))?;
    let (store, opened) = Store::open(&config.state)?;
    if opened == Opened::Created {
        tracing::warn!(state = %config.state.display(), "created a new, empty state file");
    }
    let controller = format!(
        "coalmine serve {} on {}",
        store.controller_id()?,
        crate::routers::host_name()
    );
    let daemon = Arc::new(Daemon {
        store,
        controller,
        held: Arc::new(Mutex::new(HashMap::new())),
        token: config.token,
        running: Mutex::new(HashMap::new()),
        routers: Mutex::new(HashMap::new()),
        processes: tokio::sync::Mutex::new(HashMap::new()),
        telemetry: Arc::new(Telemetry::default()),
    });
    daemon.resume_all().await?;
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .map_err(|cause| DaemonError::Listen {
            addr: config.api,
            cause,
        })?;
    let addr = listener.local_addr().map_err(|cause| DaemonError::Listen {
        addr: config.api,
        cause,
    })?;
    // The address actually bound (the configured one may be port 0).
    let _ = lock.describe(&holder(addr));
    ready(addr);
    let mutating = Router::new()
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/rollouts/{name}/{command}", post(command))
        .route("/api/v1/rollouts/{name}", axum::routing::delete(delete))
        .route("/api/v1/alertmanager", post(alertmanager))
        .route_layer(middleware::from_fn_with_state(
            daemon.clone(),
            require_token,
        ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/rollouts", get(list))
        .route("/api/v1/rollouts/{name}", get(one))
        .route("/api/v1/rollouts/{name}/history", get(history))
        .merge(mutating)
        .with_state(daemon.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    for (_, running) in daemon.running.lock().expect("running").drain() {
        running.task.abort();
    }
    for (_, hosted) in daemon.routers.lock().expect("routers").drain() {
        hosted.handle.shutdown();
    }
    served.map_err(|cause| DaemonError::Listen {
        addr: config.api,
        cause,
    })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn require_token(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), d.token.as_bytes()) => {
            next.run(req).await
        }
        _ => {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "this call needs the daemon's token: Authorization: Bearer TOKEN",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
            resp
        }
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct ApplyRequest {
    /// The documents, a file each: Rollouts and the MetricTemplates they use.
    files: Vec<SourceFile>,
    /// Start a new run even if the document is unchanged (retry a failed release).
    #[serde(default)]
    restart: bool,
}

#[derive(Deserialize)]
struct SourceFile {
    file: String,
    text: String,
}

async fn apply(State(d): State<Arc<Daemon>>, Json(req): Json<ApplyRequest>) -> Response {
    let files: Vec<(String, String)> = req.files.into_iter().map(|f| (f.file, f.text)).collect();
    let names = files
        .iter()
        .map(|f| f.0.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let set = match documents::load(&files).and_then(|set| set.require_runnable().map(|()| set)) {
        Ok(set) => set,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Canaries are placed by the Placement documents among the files.
    let rollouts = match set.placed_rollouts(None) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if rollouts.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{names}: no Rollout to apply"),
        );
    }
    // Everything is checked before anything changes: a bad document leaves running rollouts be.
    for r in &rollouts {
        if let Err(e) = check_runnable(r) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{names}: {}: {e}", r.metadata.name),
            );
        }
    }
    if let Err(conflict) = d.router_conflicts(&rollouts) {
        return error(StatusCode::CONFLICT, conflict);
    }
    let mut applied = Vec::new();
    for rollout in rollouts {
        let name = rollout.metadata.name.clone();
        match d.apply_one(rollout, req.restart).await {
            Ok(action) => applied.push(json!({"name": name, "action": action})),
            Err(ApplyError::Refused(e)) => {
                return error(StatusCode::CONFLICT, format!("{name}: {e}"))
            }
            Err(ApplyError::Failed(e)) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}"))
            }
        }
    }
    Json(json!({"applied": applied, "warnings": set.warnings})).into_response()
}

/// Why an apply did not start a run; the running rollout is untouched either way.
enum ApplyError {
    /// The rollout cannot run as things stand (its routers are not Coalmine routers, or are
    /// driven by someone else): the user's to fix.
    Refused(String),
    /// Something failed on the daemon's side (a process did not start, the state file).
    Failed(String),
}

/// What `Driver::new` would refuse, found without starting anything.
fn check_runnable(r: &Rollout) -> Result<(), String> {
    for (field, target) in [("stable", &r.spec.stable), ("canary", &r.spec.canary)] {
        if target.is_none() {
            return Err(format!(
                "spec.{field}: give the version's url or command (only `coalmine simulate` runs without)"
            ));
        }
    }
    if r.spec.routers.is_empty() && r.spec.router.is_none() {
        return Err(
            "spec.routers: list at least one router admin address, or host one with spec.router"
                .into(),
        );
    }
    if let Some(hosted) = &r.spec.router {
        hosted
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("spec.router.listen: {e}"))?;
    }
    if let (Some(Target::Url(stable)), Some(Target::Url(canary))) = (&r.spec.stable, &r.spec.canary)
    {
        crate::routers::Upstreams::new(
            &r.metadata.name,
            stable.as_str(),
            canary.as_str(),
            &r.spec.analysis,
            &r.spec.preview,
        )?;
    }
    Ok(())
}

/// The routers a rollout drives, as comparable names: admin URLs, and hosted routers' traffic
/// addresses.
fn router_keys(r: &Rollout) -> Vec<String> {
    let mut keys: Vec<String> = r.spec.routers.iter().map(|u| u.to_string()).collect();
    if let Some(hosted) = &r.spec.router {
        keys.push(format!("hosted router on {}", hosted.listen));
    }
    keys
}

impl Daemon {
    /// One router carries one rollout: a rollout whose routers another rollout already drives
    /// (running or finished, whose routers it keeps) is refused, naming that rollout.
    fn router_conflicts(&self, incoming: &[Rollout]) -> Result<(), String> {
        let stored = self.store.all().map_err(|e| e.to_string())?;
        let mut owners: Vec<(String, String, String)> = stored
            .into_iter()
            .flatten()
            .flat_map(|s| {
                let name = s.rollout.metadata.name.clone();
                let phase = s.status.phase.as_str().to_string();
                router_keys(&s.rollout)
                    .into_iter()
                    .map(move |k| (k, name.clone(), phase.clone()))
            })
            .collect();
        for r in incoming {
            let name = &r.metadata.name;
            for key in router_keys(r) {
                if let Some((_, owner, phase)) = owners
                    .iter()
                    .find(|(k, owner, _)| *k == key && owner != name)
                {
                    return Err(format!(
                        "{name}: router {key} already carries rollout {owner:?} ({phase}); one router carries one rollout: give {name:?} its own router, or delete {owner:?} first (`coalmine delete {owner}`)"
                    ));
                }
            }
            owners.extend(
                router_keys(r)
                    .into_iter()
                    .map(|k| (k, name.clone(), "in this apply".to_string())),
            );
        }
        Ok(())
    }

    async fn resume_all(self: &Arc<Self>) -> Result<(), StoreError> {
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
            if let Err(e) = self
                .spawn(stored.rollout, Some(stored.status), stored.run)
                .await
            {
                tracing::error!(rollout = %name, "cannot resume: {e}");
            }
        }
        Ok(())
    }

    async fn apply_one(
        self: &Arc<Self>,
        rollout: Rollout,
        restart: bool,
    ) -> Result<&'static str, ApplyError> {
        let name = rollout.metadata.name.clone();
        let existing = self
            .store
            .get(&name)
            .map_err(|e| ApplyError::Failed(e.to_string()))?;
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
        let driver = self
            .driver(&rollout, None)
            .await
            .map_err(ApplyError::Failed)?;
        driver
            .claim_routers()
            .await
            .map_err(|e| ApplyError::Refused(e.to_string()))?;
        let message = match action {
            "restarted" => "New revision applied: analysis restarted from the beginning",
            _ => "Rollout applied",
        };
        let event = Event {
            time_ms: now_ms(),
            level: EventLevel::Info,
            phase: Phase::Initializing,
            weight: 0,
            message: message.into(),
        };
        let run = self
            .store
            .start_run(&rollout, driver.status(), &[event])
            .map_err(|e| {
                ApplyError::Failed(format!(
                    "the new run could not be saved, the old one goes on: {e}"
                ))
            })?;
        if let Some(old) = self.running.lock().expect("running").remove(&name) {
            old.task.abort();
        }
        self.launch(rollout, driver, run);
        Ok(action)
    }
    /// A driver for the rollout, with its processes ready and its hosted router (if any)
    /// started and added.
    async fn driver(&self, rollout: &Rollout, status: Option<Status>) -> Result<Driver, String> {
        let mut effective = rollout.clone();
        let name = &rollout.metadata.name;
        {
            let mut processes = self.processes.lock().await;
            let versions = processes.entry(name.clone()).or_default();
            if let Some(Target::Command {
                command,
                readiness,
                env,
            }) = &rollout.spec.stable
            {
                // The stable process is kept across runs (after a promotion it is the canary
                // process of the run before).
                if versions
                    .stable
                    .as_ref()
                    .is_none_or(|p| &p.command != command)
                {
                    let started = ManagedProcess::start(command, env, readiness)
                        .await
                        .map_err(|e| format!("spec.stable: {e}"))?;
                    versions.stable = Some(started);
                }
            }
            if let Some(Target::Command {
                command,
                readiness,
                env,
            }) = &rollout.spec.canary
            {
                let started = ManagedProcess::start(command, env, readiness)
                    .await
                    .map_err(|e| format!("spec.canary: {e}"))?;
                versions.canary = Some(started);
            }
            for (process, target) in [
                (&versions.stable, &mut effective.spec.stable),
                (&versions.canary, &mut effective.spec.canary),
            ] {
                if let (Some(p), Some(Target::Command { .. })) = (process, &*target) {
                    *target = Some(Target::Url(HttpUrl::parse(&p.url)?));
                }
            }
        }
        if let Some(hosted) = &rollout.spec.router {
            let admin = self.hosted_router(&effective, &hosted.listen, hosted.admin.as_deref())?;
            effective.spec.routers.push(admin);
        }
        Driver::new(&effective, status, &self.controller).map_err(|e| e.to_string())
    }

    /// The run ended: the version that lost stops serving.
    async fn retire_processes(&self, name: &str, outcome: Outcome) {
        let mut processes = self.processes.lock().await;
        if let Some(versions) = processes.get_mut(name) {
            match outcome {
                Outcome::Promoted => versions.stable = versions.canary.take(),
                Outcome::RolledBack => versions.canary = None,
            }
        }
    }

    fn hosted_router(
        &self,
        rollout: &Rollout,
        listen: &str,
        admin: Option<&str>,
    ) -> Result<HttpUrl, String> {
        let name = &rollout.metadata.name;
        let mut routers = self.routers.lock().expect("routers");
        if let Some(r) = routers.get(name).filter(|r| r.listen == listen) {
            return HttpUrl::parse(&format!("http://{}", r.handle.admin));
        }
        if let Some(old) = routers.remove(name) {
            // Shutting down joins its threads after a drain: not on an async worker.
            tokio::task::spawn_blocking(move || old.handle.shutdown());
        }
        let Some(Target::Url(stable)) = &rollout.spec.stable else {
            return Err("spec.stable: a hosted router needs a url".into());
        };
        let stable = UpstreamUrl::parse(stable.as_str())?;
        let mut routes = RoutesDoc::stable_only(stable);
        routes.name = name.clone();
        let handle = coalmine_router::start(RouterConfig::embedded(
            listen
                .parse()
                .map_err(|e| format!("spec.router.listen: {e}"))?,
            admin
                .unwrap_or("127.0.0.1:0")
                .parse()
                .map_err(|e| format!("spec.router.admin: {e}"))?,
            routes,
        ))
        .map_err(|e| format!("spec.router: {e}"))?;
        let admin = HttpUrl::parse(&format!("http://{}", handle.admin))?;
        routers.insert(
            name.clone(),
            HostedRouter {
                listen: listen.to_string(),
                handle,
            },
        );
        Ok(admin)
    }

    async fn spawn(
        self: &Arc<Self>,
        rollout: Rollout,
        status: Option<Status>,
        run: i64,
    ) -> Result<(), String> {
        let driver = self.driver(&rollout, status).await?;
        self.launch(rollout, driver, run);
        Ok(())
    }

    fn launch(self: &Arc<Self>, rollout: Rollout, mut driver: Driver, run: i64) {
        let name = rollout.metadata.name.clone();
        let (control, inputs) = mpsc::channel(16);
        let daemon = self.clone();
        let task_name = name.clone();
        let counted = driver.status().outcome.is_some();
        let started_ms = driver.status().started_ms;
        let task = tokio::spawn(async move {
            let mut sink = StoreSink {
                store: daemon.store.clone(),
                held: daemon.held.clone(),
                name: task_name.clone(),
                run,
                telemetry: daemon.telemetry.clone(),
                counted,
            };
            let outcome = driver.run(inputs, &mut sink).await;
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
            if current {
                daemon.retire_processes(&task_name, outcome).await;
            }
            // From now on the task keeps the routers as the run left them.
            driver.keep(&mut sink).await;
        });
        self.running.lock().expect("running").insert(
            name,
            Running {
                run,
                started_ms,
                rollout: Arc::new(rollout),
                control,
                task,
            },
        );
    }
}

/// A rollout's status as the API shows it: the stored one, said to be held when its last
/// step could not be saved.
fn shown_status(d: &Daemon, rollout: &Rollout, status: &Status) -> serde_json::Value {
    let held = d
        .held
        .lock()
        .expect("held")
        .get(&rollout.metadata.name)
        .cloned();
    status_json(rollout, status, held.as_ref())
}

async fn list(State(d): State<Arc<Daemon>>) -> Response {
    match d.store.all() {
        Ok(all) => Json(
            all.iter()
                .map(|s| match s {
                    Ok(s) => shown_status(&d, &s.rollout, &s.status),
                    Err(bad) => json!({
                        "name": bad.name,
                        "phase": "Unknown",
                        "message": format!("its stored state cannot be read: {}", bad.error),
                    }),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn one(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    match d.store.get(&name) {
        Ok(Some(s)) => Json(shown_status(&d, &s.rollout, &s.status)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    }
}

async fn history(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    match d.store.history(&name) {
        Ok(events) if events.is_empty() => {
            error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}"))
        }
        Ok(events) => Json(
            events
                .iter()
                .map(|(run, e)| event_json(&name, Some(*run), e))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    }
}

async fn command(
    State(d): State<Arc<Daemon>>,
    Path((name, command)): Path<(String, String)>,
) -> Response {
    let input = match command.as_str() {
        "promote" => Input::Promote,
        "abort" => Input::Abort {
            reason: "requested through the API".into(),
        },
        "pause" => Input::Pause,
        "resume" => Input::Resume,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown command {other:?}: promote, abort, pause or resume"),
            )
        }
    };
    let stored = match d.store.get(&name) {
        Ok(Some(s)) => s,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    };
    if stored.status.phase.is_final() {
        return error(
            StatusCode::CONFLICT,
            format!(
                "{name} is not running (phase {}): `coalmine apply --restart` starts a new run",
                stored.status.phase.as_str()
            ),
        );
    }
    let control = d
        .running
        .lock()
        .expect("running")
        .get(&name)
        .map(|r| r.control.clone());
    match control {
        Some(control) if control.send(input).await.is_ok() => (
            StatusCode::ACCEPTED,
            Json(json!({"name": name, "command": command})),
        )
            .into_response(),
        _ => error(
            StatusCode::CONFLICT,
            format!(
                "{name} is not running (phase {})",
                stored.status.phase.as_str()
            ),
        ),
    }
}

/// Forgets a finished rollout: its document, state and history; nothing keeps its routers
/// from then on (they stay as the rollout left them). A rollout still under way must be
/// aborted (or promoted) first: deleting it would leave its canary with nobody watching.
async fn delete(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    let stored = match d.store.get(&name) {
        Ok(Some(s)) => s,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    };
    if !stored.status.phase.is_final() {
        return error(
            StatusCode::CONFLICT,
            format!(
                "{name} is {} at {}% canary: abort it first (`coalmine abort {name}`), then delete it",
                stored.status.phase.as_str(),
                coalmine_spec::weight::basis_points_to_percent(stored.status.canary_weight)
            ),
        );
    }
    if let Some(r) = d.running.lock().expect("running").remove(&name) {
        r.task.abort();
    }
    if let Some(hosted) = d.routers.lock().expect("routers").remove(&name) {
        tokio::task::spawn_blocking(move || hosted.handle.shutdown());
    }
    // Nothing keeps its routers from now on: another rollout may take them.
    let routers = RouterSet::new(
        stored.rollout.spec.routers.clone(),
        crate::routers::owner(&name, &d.controller),
    );
    if let Err(e) = routers.release().await {
        tracing::warn!(rollout = %name, "deleted, but its routers were not all freed: {e}");
    }
    d.processes.lock().await.remove(&name);
    d.telemetry.forget(&name);
    match d.store.delete(&name) {
        Ok(_) => Json(json!({"deleted": name})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    }
}

async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        d.telemetry.encode(),
    )
        .into_response()
}

/// Alertmanager's webhook body (version 4); only what the receiver acts on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AlertmanagerPayload {
    version: String,
    #[serde(default)]
    alerts: Vec<Alert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// RFC 3339; an alert that began before a run is about an earlier one.
    #[serde(default)]
    starts_at: Option<String>,
}

impl Alert {
    /// How the alert reads in a rollout's events: name, labels and summary.
    fn describe(&self) -> String {
        let name = self
            .labels
            .get("alertname")
            .map_or("(unnamed)", String::as_str);
        let labels: Vec<String> = self
            .labels
            .iter()
            .filter(|(k, _)| *k != "alertname")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut text = format!("alert {name} firing [{}]", labels.join(", "));
        if let Some(summary) = self.annotations.get("summary") {
            text.push_str(": ");
            text.push_str(summary);
        }
        text
    }

    /// Whether the alert began during a run that started at `run_started_ms`. One without a
    /// readable start time is taken as current.
    fn began_during_run(&self, run_started_ms: u64) -> bool {
        self.starts_at
            .as_deref()
            .and_then(crate::time::parse_rfc3339)
            .is_none_or(|starts| starts >= run_started_ms)
    }
}

/// Rolls back every running rollout that a firing alert matches. Answers 200 with what it did
/// (Alertmanager retries on anything else, so a payload it cannot use is still a 400, not a 5xx).
/// An alert that began firing before a rollout's current run started is about an earlier run
/// (Alertmanager repeats firing alerts) and leaves this one be.
async fn alertmanager(State(d): State<Arc<Daemon>>, body: axum::body::Bytes) -> Response {
    let payload: AlertmanagerPayload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("not an Alertmanager webhook payload: {e}"),
            )
        }
    };
    if payload.version != "4" {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "Alertmanager webhook payload version {:?}: Coalmine reads version 4",
                payload.version
            ),
        );
    }
    let mut ignored = Vec::new();
    let targets: Vec<(String, mpsc::Sender<Input>, String)> = {
        let running = d.running.lock().expect("running");
        let mut targets = Vec::new();
        for alert in payload.alerts.iter().filter(|a| a.status == "firing") {
            for (name, r) in running.iter() {
                let already = targets.iter().any(|(n, _, _)| n == name);
                if already || !r.rollout.spec.analysis.rolled_back_by_alert(&alert.labels) {
                    continue;
                }
                if alert.began_during_run(r.started_ms) {
                    targets.push((name.clone(), r.control.clone(), alert.describe()));
                } else {
                    ignored.push(json!({
                        "rollout": name,
                        "alert": alert.describe(),
                        "why": "it began firing before this run started",
                    }));
                }
            }
        }
        targets
    };
    let mut rolled_back = Vec::new();
    for (name, control, reason) in targets {
        tracing::warn!(rollout = %name, "{reason}: rolling back");
        if control.send(Input::RollBack { reason }).await.is_ok() {
            rolled_back.push(name);
        }
    }
    Json(json!({"alerts": payload.alerts.len(), "rolledBack": rolled_back, "ignored": ignored}))
        .into_response()
}
