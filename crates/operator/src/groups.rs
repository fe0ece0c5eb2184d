//! `coalmine.dev/v1alpha1` `RolloutGroup` on Kubernetes: the group's members are Rollouts (or
//! Canaries, run as Rollouts) of its namespace. The leader decides each group with the rollout
//! crate's [`group::decide`] — the same pure decision `coalmine serve` takes — from its members'
//! statuses, read afresh whenever one of them writes a step, and hands each member its gate or
//! rollback through the member run's command channel, the path a user's abort takes: the run
//! saves the input in its status before any traffic moves. A member starts behind a closed gate
//! and in its group's cohort ([`member_of`]), so nothing moves before its group has decided. A
//! joint rollback reaching a member already promoted (its run has ended) is carried out here
//! ([`take_back`]): its primary runs its previous template again.
//!
//! The spec is read per object (as a Canary's): a group the operator cannot read or run gets a
//! `Promoted` condition `InvalidSpec` and a Warning Event naming the field, and nothing moves.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use coalmine_controller::state::StateStore;
use coalmine_rollout::group::{self, GroupPhase, GroupPlan};
use coalmine_rollout::{
    Action as MachineAction, Gate, Input, Machine, Outcome, Plan, Status, TrafficFault,
};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde::{Deserialize, Serialize};

use crate::crd::{Rollout, RolloutGroupSpec};
use crate::flagger::Canary;
use crate::run::{tell, Context, ReconcileError};
use crate::seams::status_store::RolloutStatusStore;
use crate::status::{Condition, GroupMemberStatus, RolloutGroupStatus};

/// A `RolloutGroup` as the operator watches it: its spec as the API server returned it, read
/// per object ([`GroupObject::read_spec`]), so one group it cannot read never stops the watch
/// the others share.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupObject {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl kube::Resource for GroupObject {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "RolloutGroup".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "coalmine.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "rolloutgroups".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl GroupObject {
    /// The spec in Coalmine's types, or the field it cannot read (`spec.members[1].dependsOn[0]
    /// .reached`) and why.
    pub fn read_spec(&self) -> Result<RolloutGroupSpec, (String, String)> {
        // Read as the spec crate's type itself: through the CRD type's `flatten` the path
        // would be lost.
        serde_path_to_error::deserialize(&self.spec)
            .map(|group| RolloutGroupSpec { group })
            .map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    "spec".to_string()
                } else {
                    format!("spec.{path}")
                };
                (field, e.inner().to_string())
            })
    }

    /// The group as the rollout crate decides it.
    fn document(&self, spec: RolloutGroupSpec) -> coalmine_spec::group::RolloutGroup {
        crate::crd::RolloutGroup {
            metadata: self.metadata.clone(),
            spec,
            status: None,
        }
        .to_document()
    }

    fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    fn lists(&self, member: &str) -> bool {
        self.spec["members"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == member)
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("coalmine.dev/v1alpha1".into()),
            kind: Some("RolloutGroup".into()),
            name: self.metadata.name.clone(),
            namespace: self.metadata.namespace.clone(),
            uid: self.metadata.uid.clone(),
            ..ObjectReference::default()
        }
    }
}

/// The groups of a namespace.
pub fn groups_api(client: &kube::Client, namespace: &str) -> Api<GroupObject> {
    Api::namespaced(client.clone(), namespace)
}

/// The group a rollout belongs to: the oldest group of its namespace listing it (a later one
/// listing it too is told it is invalid).
fn claiming<'a>(groups: &'a [GroupObject], member: &str) -> Option<&'a GroupObject> {
    groups
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none() && g.lists(member))
        .min_by_key(|g| (g.metadata.creation_timestamp.clone(), g.name().to_string()))
}

/// A rollout's group, when one lists it: the group's name, and the group as the rollout crate
/// reads it (none while its spec cannot be read).
pub struct MemberOf {
    pub group: String,
    pub document: Option<coalmine_spec::group::RolloutGroup>,
}

impl MemberOf {
    /// The gate a member starts behind.
    pub fn closed_gate(&self) -> Gate {
        Gate::closed(&self.group)
    }

    /// Marks the member's document: its group, and the cohort its members share (the same
    /// sticky salt as under `coalmine serve`).
    pub fn mark(&self, document: &mut coalmine_spec::rollout::Rollout) {
        if let Some(group) = &self.document {
            group.mark_member(document);
        }
    }
}

/// The group rollout `name` of `namespace` belongs to, read now (none when the group CRD is
/// not installed).
pub async fn member_of(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<MemberOf>, kube::Error> {
    let groups = match groups_api(client, namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(claiming(&groups, name).map(|g| MemberOf {
        group: g.name().to_string(),
        document: g.read_spec().ok().map(|spec| g.document(spec)),
    }))
}

/// How often a group is decided again while it moves, when none of its members writes a step
/// (a member's command channel may have been full, or its run not started yet).
const DECIDE_AT_LEAST_EVERY: Duration = Duration::from_secs(2);

pub(crate) async fn reconcile(
    cached: Arc<GroupObject>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = cached.metadata.namespace.clone().unwrap_or_default();
    let api = groups_api(&context.client, &namespace);
    // Decided on the group and its members as they are now, never on a cache.
    let Some(object) = api.get_opt(cached.name()).await? else {
        return Ok(Action::await_change());
    };
    if object.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let before: RolloutGroupStatus = object
        .status
        .clone()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default();
    let spec = match object.read_spec() {
        Ok(spec) => spec,
        Err((field, message)) => {
            return invalid(&context, &object, &before, &[(field, message)]).await;
        }
    };
    let rollouts: Api<Rollout> = Api::namespaced(context.client.clone(), &namespace);
    let mut members = Vec::new();
    for member in &spec.group.members {
        let rollout = rollouts.get_opt(&member.name).await?;
        // A Canary's Rollout is written by the operator a moment after the Canary.
        if rollout.is_none() && canary_exists(&context.client, &namespace, &member.name).await {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        members.push(rollout);
    }
    let groups = api.list(&ListParams::default()).await?.items;
    let errors = spec.group.errors(
        |name| {
            members
                .iter()
                .flatten()
                .find(|r| r.metadata.name.as_deref() == Some(name))
                .map(|r| (&r.spec.analysis, None))
        },
        |name| format!("member {name:?} is not a Rollout or Canary in namespace {namespace}"),
        |name| {
            claiming(&groups, name)
                .filter(|g| g.metadata.uid != object.metadata.uid)
                .map(|g| g.name().to_string())
        },
    );
    if !errors.is_empty() {
        return invalid(&context, &object, &before, &errors).await;
    }
    let documents: Vec<coalmine_spec::rollout::Rollout> =
        members.iter().flatten().map(Rollout::to_document).collect();
    let plan = GroupPlan::new(&object.document(spec), |name| {
        documents.iter().find(|d| d.metadata.name == name)
    });
    let statuses: Vec<Option<Status>> = members
        .iter()
        .map(|r| {
            r.as_ref()?
                .status
                .as_ref()?
                .state
                .clone()
                .and_then(|s| serde_json::from_value(s).ok())
        })
        .collect();
    let (decision, statuses, not_reverted) =
        decide_taking_back(&context, &plan, &members, statuses).await?;
    for (i, input) in decision.inputs {
        let member = &plan.members[i].name;
        let key = format!("{namespace}/{member}");
        // Never waits: an input not handed over now is decided again at the next step.
        match context.commands_of(&key) {
            Some(commands) => {
                if let Err(e) = commands.try_send(input) {
                    tracing::info!(group = %plan.name, %member, "not handed its group's decision yet: {e}");
                }
            }
            None => tracing::debug!(group = %plan.name, %member, "no run in progress"),
        }
    }
    let status = group_status(
        &plan,
        &statuses,
        decision.phase,
        decision.reason.clone(),
        &before,
        object.metadata.generation,
    );
    if status != before {
        write_status(&api, &object, &status).await?;
        let regarding = object.reference();
        if before.phase != status.phase {
            if let Some((type_, reason)) = phase_event(decision.phase) {
                let said = decision
                    .reason
                    .clone()
                    .unwrap_or_else(|| format!("group {}: every member promoted", plan.name));
                tell(&context, &regarding, type_, reason, said).await;
            }
        }
        for (i, why) in not_reverted {
            let said = format!(
                "member {} was promoted before the group rolled back and is not taken back: {why}; set its target back to the previous version to undo it",
                plan.members[i].name
            );
            tell(
                &context,
                &regarding,
                EventType::Warning,
                "NotReverted",
                said,
            )
            .await;
        }
    }
    Ok(match decision.phase {
        GroupPhase::Progressing | GroupPhase::RollingBack => Action::requeue(DECIDE_AT_LEAST_EVERY),
        GroupPhase::RolledBack | GroupPhase::Succeeded => Action::requeue(Duration::from_secs(60)),
    })
}

/// The group decided after its joint rollback took its promoted members back (each the moment
/// the rollback reaches it, last listed first): each primary runs its previous version again
/// ([`take_back`]). Returns the decision, the members' statuses then, and the promoted
/// members it passed over, and why (nothing remembered of their previous version).
async fn decide_taking_back(
    context: &Context,
    plan: &GroupPlan,
    members: &[Option<Rollout>],
    mut statuses: Vec<Option<Status>>,
) -> Result<(group::Decision, Vec<Option<Status>>, Vec<(usize, String)>), ReconcileError> {
    let mut not_reverted = Vec::new();
    let rollouts: Vec<&Rollout> = members.iter().flatten().collect();
    loop {
        let views: Vec<Option<&Status>> = statuses.iter().map(Option::as_ref).collect();
        let decision = group::decide(plan, &views);
        let reverts: Vec<(usize, String)> = decision
            .inputs
            .iter()
            .filter_map(|(i, input)| match input {
                Input::Revert { reason } => Some((*i, reason.clone())),
                _ => None,
            })
            .collect();
        if reverts.is_empty() {
            return Ok((decision, statuses, not_reverted));
        }
        for (i, reason) in reverts {
            let name = &plan.members[i].name;
            let rollout = rollouts
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(name.as_str()));
            let taken = match rollout {
                Some(rollout) => take_back(context, &plan.name, rollout, &reason).await?,
                None => TakenBack::Not("it is gone".into()),
            };
            match taken {
                TakenBack::Done(status) => statuses[i] = Some(*status),
                TakenBack::Not(why) => {
                    if let Some(s) = &mut statuses[i] {
                        s.outcome = Some(Outcome::RolledBack);
                    }
                    not_reverted.push((i, why));
                }
            }
        }
    }
}

/// What a group's joint rollback made of a promoted member.
enum TakenBack {
    /// Its primary runs its previous version again; its status (saved) says so.
    Done(Box<Status>),
    /// Passed over, for this reason.
    Not(String),
}

/// Takes a promoted member back, as `coalmine serve`'s keeper reverts one: its primary back on
/// the template it ran before ([`crate::run::take_primary_back`]; all traffic is on the primary
/// already), then its status `Failed`, rolled back for the group's reason, the previous revision
/// `lastPromotedSpec` again. `lastAppliedSpec` stays the target's revision: like a failed
/// canary, the member runs again only once its target changes (back to the previous version,
/// it is adopted). Said in a Warning Event `Reverted` on the member. A member whose primary is
/// taken back but whose status is not written yet is taken back again at the next decision.
async fn take_back(
    context: &Context,
    group: &str,
    rollout: &Rollout,
    reason: &str,
) -> Result<TakenBack, ReconcileError> {
    let recorded = rollout.status.clone().unwrap_or_default();
    let Some(saved) = recorded
        .state
        .clone()
        .and_then(|s| serde_json::from_value::<Status>(s).ok())
    else {
        return Ok(TakenBack::Not("its status has no saved state".into()));
    };
    let revision = match crate::run::take_primary_back(context, rollout).await {
        Ok(Some(revision)) => revision,
        Ok(None) => {
            return Ok(TakenBack::Not(
                "its primary remembers no previous version (promoted by a Coalmine that did not remember one)".into(),
            ))
        }
        Err(TrafficFault::Refused(why)) => return Ok(TakenBack::Not(why)),
        Err(e) => return Err(e.into()),
    };
    let document = rollout.to_document();
    let plan = Plan::new(
        &document.spec.analysis,
        document.spec.progress_deadline_seconds,
        document.spec.skip_analysis,
    );
    let mut machine = Machine::resume(plan, saved);
    let events: Vec<coalmine_rollout::Event> = machine
        .handle(
            coalmine_controller::driver::now_ms(),
            Input::Revert {
                reason: reason.to_string(),
            },
        )
        .into_iter()
        .filter_map(|action| match action {
            MachineAction::Event(event) => Some(event),
            _ => None,
        })
        .collect();
    let applied = recorded
        .canary
        .last_applied_spec
        .clone()
        .unwrap_or_default();
    let mut store =
        RolloutStatusStore::new(context.client.clone(), rollout, document, &context.identity)
            .with_specs(&applied, Some(&revision));
    store
        .save(machine.status(), &events)
        .await
        .map_err(|e| TrafficFault::Unreachable(e.to_string()))?;
    let name = rollout.metadata.name.as_deref().unwrap_or_default();
    let said = format!(
        "group {group} rolled back: {name}'s primary runs its previous version ({revision}) again: {reason}"
    );
    let regarding = crate::canaries::regarding(rollout);
    tell(context, &regarding, EventType::Warning, "Reverted", said).await;
    Ok(TakenBack::Done(Box::new(machine.status().clone())))
}

/// The Event a group's new phase is told in.
fn phase_event(phase: GroupPhase) -> Option<(EventType, &'static str)> {
    match phase {
        GroupPhase::Progressing => None,
        GroupPhase::RollingBack => Some((EventType::Warning, "RollingBack")),
        GroupPhase::RolledBack => Some((EventType::Warning, "RolledBack")),
        GroupPhase::Succeeded => Some((EventType::Normal, "Succeeded")),
    }
}

fn phase_name(phase: GroupPhase) -> &'static str {
    match phase {
        GroupPhase::Progressing => "Progressing",
        GroupPhase::RollingBack => "RollingBack",
        GroupPhase::RolledBack => "RolledBack",
        GroupPhase::Succeeded => "Succeeded",
    }
}

/// The status a decision writes: the phase, why it rolls back, each member's line, and the
/// `Promoted` condition (its transition time kept while it says the same).
fn group_status(
    plan: &GroupPlan,
    statuses: &[Option<Status>],
    phase: GroupPhase,
    reason: Option<String>,
    before: &RolloutGroupStatus,
    generation: Option<i64>,
) -> RolloutGroupStatus {
    let members = plan
        .members
        .iter()
        .zip(statuses)
        .map(|(m, s)| GroupMemberStatus {
            name: m.name.clone(),
            phase: s.as_ref().map(|s| s.phase),
            weight: s.as_ref().map(|s| s.canary_weight.percent()),
            gate: s.as_ref().and_then(gate_words),
        })
        .collect();
    let (state, message) = match phase {
        GroupPhase::Succeeded => ("True", "every member promoted".to_string()),
        GroupPhase::RolledBack => ("False", reason.clone().unwrap_or_default()),
        GroupPhase::RollingBack => ("Unknown", reason.clone().unwrap_or_default()),
        GroupPhase::Progressing => (
            "Unknown",
            format!("{} members in progress", plan.members.len()),
        ),
    };
    let condition = condition(before, state, phase_name(phase), message);
    RolloutGroupStatus {
        phase: Some(phase_name(phase).to_string()),
        reason,
        members,
        observed_generation: generation,
        conditions: vec![condition],
    }
}

/// The `Promoted` condition saying `state` for `reason`; its transition time moves only when
/// its status does.
fn condition(before: &RolloutGroupStatus, state: &str, reason: &str, message: String) -> Condition {
    let old = before.conditions.iter().find(|c| c.type_ == "Promoted");
    let last_transition_time = match old {
        Some(c) if c.status == state => c.last_transition_time.clone(),
        _ => Some(Timestamp::now().to_string()),
    };
    Condition {
        type_: "Promoted".into(),
        status: state.into(),
        reason: reason.into(),
        message: Some(message),
        last_update_time: None,
        last_transition_time,
    }
}

/// How far its group lets a member go, in words (`kubectl get -o yaml` shows it).
fn gate_words(status: &Status) -> Option<String> {
    let gate = status.gate.as_ref()?;
    if status.phase.is_final() {
        return None;
    }
    Some(if status.at_gate {
        format!("waiting for {}", gate.waiting_for)
    } else if gate.promote {
        "may promote".to_string()
    } else if !gate.start {
        format!("closed until {}", gate.waiting_for)
    } else {
        format!("up to {} %", gate.max_weight.percent())
    })
}

/// A group the operator cannot run: said in its `Promoted` condition (`InvalidSpec`, every
/// mistake by field) and a Warning Event when that changes; its members hold behind their
/// closed gates.
async fn invalid(
    context: &Context,
    object: &GroupObject,
    before: &RolloutGroupStatus,
    errors: &[(String, String)],
) -> Result<Action, ReconcileError> {
    let said = errors
        .iter()
        .map(|(field, message)| format!("{field}: {message}"))
        .collect::<Vec<_>>()
        .join("; ");
    let status = RolloutGroupStatus {
        phase: None,
        reason: None,
        members: Vec::new(),
        observed_generation: object.metadata.generation,
        conditions: vec![condition(before, "Unknown", "InvalidSpec", said.clone())],
    };
    if status != *before {
        let api = groups_api(
            &context.client,
            object.metadata.namespace.as_deref().unwrap_or_default(),
        );
        write_status(&api, object, &status).await?;
        tell(
            context,
            &object.reference(),
            EventType::Warning,
            "InvalidSpec",
            said,
        )
        .await;
    }
    // Looked at again when the group or one of its members changes.
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Writes the whole status (a field it no longer has is removed).
async fn write_status(
    api: &Api<GroupObject>,
    object: &GroupObject,
    status: &RolloutGroupStatus,
) -> Result<(), ReconcileError> {
    let mut written = serde_json::to_value(status)?;
    if let Some(fields) = written.as_object_mut() {
        for key in ["phase", "reason", "members", "conditions"] {
            fields.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({ "status": written });
    api.patch_status(
        object.name(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Whether a Canary of that name is there (false without Flagger's CRD).
async fn canary_exists(client: &kube::Client, namespace: &str, name: &str) -> bool {
    let canaries: Api<Canary> = Api::namespaced(client.clone(), namespace);
    matches!(canaries.get_opt(name).await, Ok(Some(_)))
}

/// A deleted group's members in progress go on as if in no group: their gates open.
pub(crate) fn let_members_go(context: &Context, group: &GroupObject) {
    let namespace = group.metadata.namespace.as_deref().unwrap_or_default();
    for member in group.spec["members"].as_array().into_iter().flatten() {
        let Some(name) = member["name"].as_str() else {
            continue;
        };
        if let Some(commands) = context.commands_of(&format!("{namespace}/{name}")) {
            if let Err(e) = commands.try_send(Input::Gate(Gate::open())) {
                tracing::warn!(group = %group.name(), member = %name, "not let go of its deleted group: {e}");
            }
        }
    }
}

/// The groups that list a member, among those `groups` holds: whom a member's step wakes.
pub(crate) fn groups_listing<'a>(
    groups: impl IntoIterator<Item = &'a GroupObject>,
    namespace: Option<&str>,
    member: &str,
) -> Vec<kube::runtime::reflector::ObjectRef<GroupObject>> {
    groups
        .into_iter()
        .filter(|g| g.metadata.namespace.as_deref() == namespace && g.lists(member))
        .map(kube::runtime::reflector::ObjectRef::from_obj)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_rollout::Phase;
    use coalmine_spec::Weight;

    fn status(phase: Phase, outcome: Option<Outcome>, message: &str) -> Status {
        Status {
            phase,
            canary_weight: Weight::ZERO,
            failed_checks: 0,
            iterations: 0,
            mirrored: false,
            promoted: false,
            paused: false,
            last_transition_ms: 0,
            started_ms: 0,
            stalled_since_ms: None,
            next_tick_ms: None,
            message: message.into(),
            metrics: Vec::new(),
            pending: None,
            outcome,
            sequential: None,
            gate: None,
            at_gate: false,
            dark_launch: None,
        }
    }

    #[test]
    fn a_members_gate_is_shown_in_words() {
        let mut s = status(Phase::Progressing, None, "");
        assert_eq!(gate_words(&s), None);
        s.gate = Some(Gate {
            start: true,
            max_weight: Weight::from_percent(10.0).unwrap(),
            promote: false,
            waiting_for: "payments to pass 10 %".into(),
        });
        assert_eq!(gate_words(&s).as_deref(), Some("up to 10 %"));
        s.at_gate = true;
        assert_eq!(
            gate_words(&s).as_deref(),
            Some("waiting for payments to pass 10 %")
        );
        s.gate = Some(Gate::closed("release"));
        s.at_gate = false;
        assert_eq!(
            gate_words(&s).as_deref(),
            Some("closed until group release to decide")
        );
    }

    #[test]
    fn a_member_runs_in_its_groups_cohort_behind_a_closed_gate() {
        let object = GroupObject {
            metadata: ObjectMeta {
                name: Some("release".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: serde_json::json!({"members": [{"name": "ledger"}]}),
            status: None,
        };
        let member_of = MemberOf {
            group: "release".into(),
            document: Some(object.document(object.read_spec().unwrap())),
        };
        let rollout: Rollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "coalmine.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "ledger", "namespace": "shop"},
            "spec": {"targetRef": {"kind": "Deployment", "name": "ledger"},
                "service": {"port": 8080}, "analysis": {"interval": "1m", "stepWeights": [10]}},
        }))
        .unwrap();
        let mut document = rollout.to_document();
        member_of.mark(&mut document);
        // The sticky salt `coalmine serve` gives the same group's members.
        assert_eq!(document.spec.cohort.as_deref(), Some("group/release"));
        assert_eq!(document.group(), Some("release"));
        assert!(!member_of.closed_gate().start);
    }

    #[test]
    fn an_unreadable_reached_is_named_by_field() {
        let object = GroupObject {
            spec: serde_json::json!({"policy": "order", "members": [
                {"name": "ledger"},
                {"name": "payments", "dependsOn": [{"name": "ledger", "reached": "soon"}]},
            ]}),
            ..GroupObject::default()
        };
        let (field, message) = object.read_spec().unwrap_err();
        assert_eq!(field, "spec.members[1].dependsOn[0].reached");
        assert!(message.contains("`promoted`"), "{message}");
    }
}
