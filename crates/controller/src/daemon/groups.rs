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
use crate::dashboard::live::Change;
use crate::report::event_json;
use crate::state::sqlite::StoredRollout;

/// How often a group decides when none of its members saves a step (a member's control
/// channel may have been full).
const DECIDE_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

/// `DELETE /api/v1/groups/{name}` (behind the token): forgets a group that has ended; its
/// members stay (finished rollouts, deleted one by one). A group still under way is refused: it
/// may yet roll its members back, and only it opens their gates.
pub(super) async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let group = d
        .store
        .groups()?
        .into_iter()
        .find(|g| g.metadata.name == name)
        .ok_or_else(|| ApiError::NoSuchGroup(name.clone()))?;
    let (_, _, decision) = d.decision(&group)?;
    if matches!(
        decision.phase,
        GroupPhase::Progressing | GroupPhase::RollingBack
    ) {
        return Err(ApiError::GroupRunning {
            name,
            phase: decision.phase,
        });
    }
    // Forgotten in the state file first: a refused write (a full disk) leaves the group
    // stored and still decided, not stored with nobody deciding it.
    d.store.delete_group(&name)?;
    if let Some(supervised) = d.groups.lock().expect("groups").remove(&name) {
        supervised.task.abort();
    }
    d.live.group_deleted(&name);
    Ok(Json(json!({"deleted": name})).into_response())
}

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
        let mut last_row = None;
        loop {
            match self.decide_group_once(group) {
                Ok((phase, in_run, row)) => {
                    // The pages hear of the group as they hear of a rollout: when it changed.
                    if last_row.as_ref() != Some(&row) {
                        self.live.group(&group.metadata.name, row.clone());
                        last_row = Some(row);
                    }
                    if last_phase != Some(phase) {
                        tracing::info!(group = %group.metadata.name, ?phase, "group");
                        last_phase = Some(phase);
                        self.group_ended(group, phase, &in_run).await;
                    }
                }
                Err(e) => tracing::error!(group = %group.metadata.name, "cannot decide: {e}"),
            }
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        // The server is shutting down: no step will be saved any more.
                        Err(RecvError::Closed) => return,
                        // A group's own news: no member saved a step.
                        Ok(change) if matches!(*change, Change::Group { .. }) => continue,
                        _ => break,
                    },
                    _ = tokio::time::sleep(DECIDE_AT_LEAST_EVERY) => break,
                }
            }
        }
    }

    /// A group that ended lets its members' versions go: the ones promoted members kept for it
    /// (their previous versions, which a joint rollback would have gone back to), or the new
    /// versions of members it rolled back. A member that ended in an earlier run keeps what it
    /// has (`in_run`: the group's decision says which members are in this run).
    async fn group_ended(&self, group: &RolloutGroup, phase: GroupPhase, in_run: &[bool]) {
        let outcome = match phase {
            GroupPhase::Succeeded => Outcome::Promoted,
            GroupPhase::RolledBack => Outcome::RolledBack,
            GroupPhase::Progressing | GroupPhase::RollingBack => return,
        };
        for (member, _) in group
            .spec
            .members
            .iter()
            .zip(in_run)
            .filter(|(_, in_run)| **in_run)
        {
            self.hosted.retire(&member.name, outcome).await;
        }
    }

    /// Decides once and hands each member what the decision says for it; the group's phase,
    /// which members are in its current run, and its row as the dashboard shows it.
    fn decide_group_once(
        &self,
        group: &RolloutGroup,
    ) -> Result<(GroupPhase, Vec<bool>, Value), ApiError> {
        let (members, plan, decision) = self.decision(group)?;
        let row = group_row(group, &members, &decision);
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
        Ok((decision.phase, decision.in_run, row))
    }

    /// The group, still progressing or rolling back, in whose current run `member` is, with
    /// its phase.
    pub(super) fn unfinished_group_of(
        &self,
        member: &str,
    ) -> Result<Option<(String, GroupPhase)>, ApiError> {
        for group in self.store.groups()? {
            let Some(i) = group.spec.members.iter().position(|m| m.name == member) else {
                continue;
            };
            let (_, _, decision) = self.decision(&group)?;
            let unfinished = matches!(
                decision.phase,
                GroupPhase::Progressing | GroupPhase::RollingBack
            );
            if unfinished && decision.in_run[i] {
                return Ok(Some((group.metadata.name.clone(), decision.phase)));
            }
        }
        Ok(None)
    }

    /// Every group's row, as the dashboard's list shows it.
    pub(super) fn group_rows(&self) -> Result<Vec<Value>, ApiError> {
        self.store
            .groups()?
            .iter()
            .map(|g| {
                let (members, _, decision) = self.decision(g)?;
                Ok(group_row(g, &members, &decision))
            })
            .collect()
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

/// A group as the dashboard shows it: one release — its phase, why it rolls back, and each
/// member in order with its weight and how far its gate lets it go.
fn group_row(
    group: &RolloutGroup,
    members: &[Option<StoredRollout>],
    decision: &group::Decision,
) -> Value {
    let shown: Vec<Value> = group
        .spec
        .members
        .iter()
        .zip(members)
        .map(|(m, stored)| match stored {
            Some(s) => json!({
                "name": m.name,
                "phase": s.status.phase.as_str(),
                "canaryWeight": s.status.canary_weight.percent(),
                "paused": s.status.paused,
                "gate": s.status.gate.as_ref().map(|g| json!({
                    "start": g.start,
                    "maxWeight": g.max_weight.percent(),
                    "promote": g.promote,
                    "waitingFor": g.waiting_for,
                })),
                "message": s.status.message,
            }),
            None => json!({"name": m.name, "phase": "Unknown", "message": "not applied"}),
        })
        .collect();
    json!({
        "key": group.metadata.name,
        "name": group.metadata.name,
        "policy": group.spec.policy,
        "phase": decision.phase,
        "reason": decision.reason,
        "members": shown,
    })
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
