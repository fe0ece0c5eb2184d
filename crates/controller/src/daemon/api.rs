//! The daemon's HTTP API: reads open, mutations (and the Alertmanager receiver) behind the
//! bearer token. Every refusal is an [`ApiError`], answered the one way `{"error": message}`
//! with its status.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use coalmine_rollout::group::GroupPhase;
use coalmine_rollout::{Gate, Input, Phase, Status};
use coalmine_spec::documents;
use coalmine_spec::group::RolloutGroup;
use coalmine_spec::rollout::{Rollout, GROUP_RELEASE_ANNOTATION};
use coalmine_spec::{SpecError, Weight};

use super::supervision::{ApplyError, ConflictError};
use super::Daemon;
use crate::dashboard::gate::{self, Actor};
use crate::report::{event_json, status_json};
use crate::state::sqlite::{StoreError, StoredRollout};
use crate::traffic::{self, owner};
use crate::{Runner, Unrunnable};

/// Why the API refused a call, and with which status.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error(transparent)]
    Documents(#[from] SpecError),
    #[error("{0}: no Rollout to apply")]
    NoRollout(String),
    #[error("{files}: {name}: {source}")]
    Unrunnable {
        files: String,
        name: String,
        source: Unrunnable,
    },
    /// Also when the state file could not be read to find out (as the API always answered).
    #[error("{0}")]
    Conflict(ConflictError),
    #[error("{name}: {source}")]
    Apply { name: String, source: ApplyError },
    #[error("no rollout named {0:?}")]
    NoSuchRollout(String),
    #[error("no rollout group named {0:?}")]
    NoSuchGroup(String),
    #[error("unknown command {0:?}: promote, abort, pause or resume")]
    UnknownCommand(String),
    #[error("{name} is not running (phase {}): `coalmine apply --restart` starts a new run", .phase.as_str())]
    Finished { name: String, phase: Phase },
    #[error("{name} is not running (phase {})", .phase.as_str())]
    NotRunning { name: String, phase: Phase },
    #[error("{name} is {} at {}% canary: abort it first (`coalmine abort {name}`), then delete it", .phase.as_str(), .weight.percent())]
    Unfinished {
        name: String,
        phase: Phase,
        weight: Weight,
    },
    #[error("{name} is a member of rollout group {group}, which is still {phase:?}: the group may yet roll it back (or, once it rolled back, decides from it how the others follow); delete it once the group has ended")]
    GroupUnfinished {
        name: String,
        group: String,
        phase: GroupPhase,
    },
    #[error("rollout group {name} is still {phase:?}: abort a member (`coalmine abort NAME`) and the group rolls back, or let it end; then delete it")]
    GroupRunning { name: String, phase: GroupPhase },
    #[error(transparent)]
    State(#[from] StoreError),
    #[error("{name}: {source}")]
    RolloutState { name: String, source: StoreError },
    #[error("not an Alertmanager webhook payload: {0}")]
    NotAlertmanager(serde_json::Error),
    #[error("Alertmanager webhook payload version {0:?}: Coalmine reads version 4")]
    AlertmanagerVersion(String),
    #[error("not a flag counts document: {0}")]
    NotFlagCounts(serde_json::Error),
    #[error(transparent)]
    FlagCounts(#[from] crate::flags::CountsRefused),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Documents(_)
            | ApiError::NoRollout(_)
            | ApiError::Unrunnable { .. }
            | ApiError::NotAlertmanager(_)
            | ApiError::AlertmanagerVersion(_)
            | ApiError::NotFlagCounts(_)
            | ApiError::FlagCounts(
                crate::flags::CountsRefused::NoSuchVariant { .. }
                | crate::flags::CountsRefused::TooLarge { .. },
            ) => StatusCode::BAD_REQUEST,
            ApiError::FlagCounts(crate::flags::CountsRefused::NoSuchFlag(_)) => {
                StatusCode::NOT_FOUND
            }
            ApiError::NoSuchRollout(_) | ApiError::NoSuchGroup(_) | ApiError::UnknownCommand(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Conflict(_)
            | ApiError::Finished { .. }
            | ApiError::NotRunning { .. }
            | ApiError::Unfinished { .. }
            | ApiError::GroupUnfinished { .. }
            | ApiError::GroupRunning { .. } => StatusCode::CONFLICT,
            ApiError::Apply {
                source: ApplyError::Refused(_),
                ..
            } => StatusCode::CONFLICT,
            ApiError::Apply { .. } | ApiError::State(_) | ApiError::RolloutState { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A stored rollout could not be read.
    pub(super) fn state(name: &str) -> impl FnOnce(StoreError) -> ApiError + '_ {
        move |source| ApiError::RolloutState {
            name: name.to_string(),
            source,
        }
    }
}

impl Daemon {
    /// A stored rollout by name, or the API's refusal.
    pub(super) fn stored(&self, name: &str) -> Result<StoredRollout, ApiError> {
        self.store
            .get(name)
            .map_err(ApiError::state(name))?
            .ok_or_else(|| ApiError::NoSuchRollout(name.to_string()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

pub(super) fn routes(daemon: Arc<Daemon>) -> Router {
    let mutating = Router::new()
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/rollouts/{name}/{command}", post(command))
        .route("/api/v1/rollouts/{name}", axum::routing::delete(delete))
        .route(
            "/api/v1/groups/{name}",
            axum::routing::delete(super::groups::delete),
        )
        .route("/api/v1/alertmanager", post(super::alerts::alertmanager))
        .route(
            "/api/v1/flags/{key}/counts",
            post(super::ofrep::report_counts),
        )
        .route_layer(middleware::from_fn_with_state(
            daemon.gate.clone(),
            gate::require_signed,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/rollouts", get(list))
        .route("/api/v1/rollouts/{name}", get(one))
        .route("/api/v1/rollouts/{name}/history", get(history))
        .merge(super::groups::routes())
        .route("/api/v1/flags", get(super::ofrep::list))
        .merge(super::ofrep::routes(daemon.ofrep_origins.clone()))
        .merge(super::dashboard::routes())
        .merge(crate::dashboard::page_routes())
        .merge(gate::session_routes(daemon.gate.clone()))
        .merge(mutating)
        .with_state(daemon)
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

async fn apply(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<ApplyRequest>,
) -> Result<Response, ApiError> {
    let files: Vec<(String, String)> = req.files.into_iter().map(|f| (f.file, f.text)).collect();
    let names = files
        .iter()
        .map(|f| f.0.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let set = documents::load(&files)?;
    set.require_runnable()?;
    // Canaries are placed by the Placement documents among the files.
    let mut rollouts = set.placed_rollouts(None)?;
    // A member applied without its group stays its member (its cohort above all), in the
    // group's release its members run (one affinity cookie).
    let stored_groups = d.store.groups()?;
    for r in rollouts.iter_mut().filter(|r| r.group().is_none()) {
        if let Some(group) = stored_groups
            .iter()
            .find(|g| g.member(&r.metadata.name).is_some())
        {
            group.mark_member(r);
            let pins = r.spec.analysis.session_affinity.is_some();
            for m in group.spec.members.iter().filter(|_| pins) {
                let stored = d.store.get(&m.name)?;
                if let Some(release) = stored.as_ref().and_then(|s| s.rollout.group_release()) {
                    r.metadata
                        .annotations
                        .insert(GROUP_RELEASE_ANNOTATION.to_string(), release.to_string());
                    break;
                }
            }
        }
    }
    if rollouts.is_empty() {
        return Err(ApiError::NoRollout(names));
    }
    // Everything is checked before anything changes: a bad document leaves running rollouts be.
    for r in &rollouts {
        crate::check(r, Runner::Serve).map_err(|source| ApiError::Unrunnable {
            files: names.clone(),
            name: r.metadata.name.clone(),
            source,
        })?;
    }
    d.router_conflicts(&rollouts).map_err(ApiError::Conflict)?;
    let groups: Vec<RolloutGroup> = set.groups().cloned().collect();
    // Saved and decided before its members start: a member never runs without its group
    // deciding it (also when a later member fails to start: the others wait for it).
    for group in &groups {
        d.store.save_group(group)?;
        d.supervise_group(group.clone());
    }
    let mut applied = Vec::new();
    for rollout in rollouts {
        let name = rollout.metadata.name.clone();
        let gate = rollout.group().map(Gate::closed);
        let action = d
            .apply_one(rollout, req.restart, gate)
            .await
            .map_err(|source| ApiError::Apply {
                name: name.clone(),
                source,
            })?;
        applied.push(json!({"name": name, "action": action}));
    }
    for group in groups {
        applied.push(json!({
            "name": group.metadata.name,
            "kind": "RolloutGroup",
            "action": "applied (its members move as one)",
        }));
    }
    Ok(Json(json!({"applied": applied, "warnings": set.warnings})).into_response())
}

/// A rollout's status as the API shows it: the stored one, said to be held when its last
/// step could not be saved.
pub(super) fn shown_status(d: &Daemon, rollout: &Rollout, status: &Status) -> serde_json::Value {
    let held = d
        .held
        .lock()
        .expect("held")
        .get(&rollout.metadata.name)
        .cloned();
    status_json(rollout, status, held.as_ref())
}

async fn list(State(d): State<Arc<Daemon>>) -> Result<Response, ApiError> {
    let all = d.store.all()?;
    Ok(Json(
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
    .into_response())
}

async fn one(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let stored = d.stored(&name)?;
    Ok(Json(shown_status(&d, &stored.rollout, &stored.status)).into_response())
}

async fn history(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let events = d.store.history(&name).map_err(ApiError::state(&name))?;
    if events.is_empty() {
        return Err(ApiError::NoSuchRollout(name));
    }
    Ok(Json(
        events
            .iter()
            .map(|(run, e)| event_json(&name, Some(*run), e))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

async fn command(
    State(d): State<Arc<Daemon>>,
    Extension(Actor(by)): Extension<Actor>,
    Path((name, command)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let input = match command.as_str() {
        "promote" => Input::Promote { by },
        "abort" => Input::Abort {
            reason: format!("requested by {by}"),
        },
        "pause" => Input::Pause { by },
        "resume" => Input::Resume { by },
        other => return Err(ApiError::UnknownCommand(other.to_string())),
    };
    let stored = d.stored(&name)?;
    let phase = stored.status.phase;
    if phase.is_final() {
        return Err(ApiError::Finished { name, phase });
    }
    let control = d
        .running
        .lock()
        .expect("running")
        .get(&name)
        .map(|r| r.control.clone());
    match control {
        Some(control) if control.send(input).await.is_ok() => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"name": name, "command": command})),
        )
            .into_response()),
        _ => Err(ApiError::NotRunning { name, phase }),
    }
}

/// Forgets a finished rollout: its document, state and history; nothing keeps its routers
/// from then on (they stay as the rollout left them). A rollout still under way must be
/// aborted (or promoted) first: deleting it would leave its canary with nobody watching.
async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let stored = d.stored(&name)?;
    if !stored.status.phase.is_final() {
        return Err(ApiError::Unfinished {
            name,
            phase: stored.status.phase,
            weight: stored.status.canary_weight,
        });
    }
    // A finished member of a group still under way: the group may revert it, and the
    // statuses of its current run are what the group decides from (a deleted failed member
    // would let the others step on).
    if let Some((group, phase)) = d.unfinished_group_of(&name)? {
        return Err(ApiError::GroupUnfinished { name, group, phase });
    }
    let running = d.running.lock().expect("running").remove(&name);
    // Nothing keeps its traffic from now on: another rollout may take its routers. One that
    // is not running (its resume failed) is released as its document says.
    let traffic = match running {
        Some(r) => {
            r.task.abort();
            Ok(r.traffic)
        }
        None => traffic::open(&stored.rollout, Runner::Serve, &owner(&name, &d.controller))
            .map(Arc::from),
    };
    let released = match traffic {
        Ok(traffic) => traffic.release().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = released {
        tracing::warn!(rollout = %name, "deleted, but its routers were not all freed: {e}");
    }
    d.hosted.forget(&name).await;
    d.telemetry.forget(&name);
    d.store.delete(&name).map_err(ApiError::state(&name))?;
    d.live.deleted(&name);
    Ok(Json(json!({"deleted": name})).into_response())
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
