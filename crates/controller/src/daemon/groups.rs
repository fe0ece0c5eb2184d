//! Rollout groups under `serve`: one task per group decides it (the rollout crate's
//! [`group::decide`], pure) from its members' saved statuses whenever one of them saves a
//! step, and hands each member its gate — or, once a member has rolled back, the next member
//! its rollback, the last listed first — through the member's control channel. The group's
//! decisions follow from the statuses, so a restarted daemon decides the same.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use coalmine_rollout::group::{self, GroupPhase, GroupPlan};
use coalmine_rollout::{Outcome, Status};
use coalmine_spec::group::RolloutGroup;
use coalmine_spec::rollout::Rollout;

use super::api::{shown_status, ApiError};
use super::Daemon;
use crate::report::event_json;
use crate::state::sqlite::StoredRollout;

/// How often a group decides when none of its members saves a step (a member's control
/// channel may have been full).
const DECIDE_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/api/v1/groups", get(list))
        .route("/api/v1/groups/{name}", get(one))
        .route("/api/v1/groups/{name}/history", get(history))
}

impl Daemon {
    /// Starts deciding `group` (replacing a task deciding an earlier version of it).
    pub(super) fn supervise_group(self: &Arc<Self>, group: RolloutGroup) {
        let name = group.metadata.name.clone();
        let daemon = self.clone();
        let task = tokio::spawn(async move { daemon.decide_group(&group).await });
        let old = self
            .groups
            .lock()
            .expect("groups")
            .insert(name, SupervisedGroup { task });
        if let Some(old) = old {
            old.task.abort();
        }
    }

    async fn decide_group(self: Arc<Self>, group: &RolloutGroup) {
        let mut changes = self.live.subscribe();
        let mut last_phase = None;
        loop {
            match self.decide_group_once(group) {
                Ok(phase) => {
                    if last_phase != Some(phase) {
                        tracing::info!(group = %group.metadata.name, ?phase, "group");
                        last_phase = Some(phase);
                        self.group_ended(group, phase).await;
                    }
                }
                Err(e) => tracing::error!(group = %group.metadata.name, "cannot decide: {e}"),
            }
            tokio::select! {
                change = changes.recv() => {
                    if let Err(RecvError::Closed) = change {
                        // The server is shutting down: no step will be saved any more.
                        return;
                    }
                }
                _ = tokio::time::sleep(DECIDE_AT_LEAST_EVERY) => {}
            }
        }
    }

    /// A group that ended lets its members' versions go: the ones promoted members kept for it
    /// (their previous versions, which a joint rollback would have gone back to), or the new
    /// versions of members it rolled back.
    async fn group_ended(&self, group: &RolloutGroup, phase: GroupPhase) {
        let outcome = match phase {
            GroupPhase::Succeeded => Outcome::Promoted,
            GroupPhase::RolledBack => Outcome::RolledBack,
            GroupPhase::Progressing | GroupPhase::RollingBack => return,
        };
        for member in &group.spec.members {
            self.hosted.retire(&member.name, outcome).await;
        }
    }

    /// Decides once and hands each member what the decision says for it.
    fn decide_group_once(&self, group: &RolloutGroup) -> Result<GroupPhase, ApiError> {
        let (_, plan, decision) = self.decision(group)?;
        let running = self.running.lock().expect("running");
        for (i, input) in decision.inputs {
            let member = &plan.members[i].name;
            match running.get(member) {
                // Never waits: a full channel gets the (recomputed) input at the next decision.
                Some(r) => {
                    if let Err(e) = r.control.try_send(input) {
                        tracing::warn!(group = %plan.name, %member, "not handed its group's decision yet: {e}");
                    }
                }
                // Not started yet (its group decides before its members start).
                None => tracing::debug!(group = %plan.name, %member, "is not running"),
            }
        }
        Ok(decision.phase)
    }

    /// The group decided now: its members as stored (`None`: not applied), its plan, and the
    /// decision.
    fn decision(
        &self,
        group: &RolloutGroup,
    ) -> Result<(Vec<Option<StoredRollout>>, GroupPlan, group::Decision), ApiError> {
        let members: Vec<Option<StoredRollout>> = group
            .spec
            .members
            .iter()
            .map(|m| self.store.get(&m.name).map_err(ApiError::state(&m.name)))
            .collect::<Result<_, _>>()?;
        let rollouts: Vec<&Rollout> = members.iter().flatten().map(|s| &s.rollout).collect();
        let plan = GroupPlan::new(group, |name| {
            rollouts.iter().copied().find(|r| r.metadata.name == name)
        });
        let statuses: Vec<Option<&Status>> = members
            .iter()
            .map(|m| m.as_ref().map(|s| &s.status))
            .collect();
        let decision = group::decide(&plan, &statuses);
        Ok((members, plan, decision))
    }

    /// A group as the API shows it: its phase (and why it rolls back), and each member's status.
    fn group_json(&self, group: &RolloutGroup) -> Result<Value, ApiError> {
        let (members, _, decision) = self.decision(group)?;
        let shown: Vec<Value> = group
            .spec
            .members
            .iter()
            .zip(&members)
            .map(|(m, stored)| match stored {
                Some(s) => shown_status(self, &s.rollout, &s.status),
                None => json!({"name": m.name, "phase": "Unknown", "message": "not applied"}),
            })
            .collect();
        Ok(json!({
            "name": group.metadata.name,
            "policy": group.spec.policy,
            "cohort": group.cohort(),
            "phase": decision.phase,
            "reason": decision.reason,
            "members": shown,
        }))
    }

    fn stored_group(&self, name: &str) -> Result<RolloutGroup, ApiError> {
        self.store
            .groups()?
            .into_iter()
            .find(|g| g.metadata.name == name)
            .ok_or_else(|| ApiError::NoSuchGroup(name.to_string()))
    }
}

/// A group's task: stopped when dropped.
pub(super) struct SupervisedGroup {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SupervisedGroup {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn list(State(d): State<Arc<Daemon>>) -> Result<Response, ApiError> {
    let groups = d.store.groups()?;
    let shown = groups
        .iter()
        .map(|g| d.group_json(g))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(shown).into_response())
}

async fn one(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let group = d.stored_group(&name)?;
    Ok(Json(d.group_json(&group)?).into_response())
}

/// Every member's events, one timeline (oldest first), each naming its member.
async fn history(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let group = d.stored_group(&name)?;
    let mut events = Vec::new();
    for member in &group.spec.members {
        let history = d
            .store
            .history(&member.name)
            .map_err(ApiError::state(&member.name))?;
        events.extend(
            history
                .into_iter()
                .map(|(run, e)| (e.time_ms, event_json(&member.name, Some(run), &e))),
        );
    }
    // Stable: a member's events of one moment keep their order.
    events.sort_by_key(|(time, _)| *time);
    Ok(Json(events.into_iter().map(|(_, e)| e).collect::<Vec<_>>()).into_response())
}
