//! The Kubernetes objects a rollout runs on, as Flagger makes them, so existing manifests,
//! dashboards and queries keep working (`pkg/canary/deployment_controller.go`,
//! `pkg/router/kubernetes_default.go`, `pkg/canary/hpa_reconciler.go`):
//!
//! - the target (a Deployment or a DaemonSet, [`Workload`]) `<name>` stays the user's: its pods
//!   are the canary, and Coalmine only ever changes its size — a Deployment's `replicas`, a
//!   DaemonSet's parking node selector (Flagger's `flagger.app/scale-to-zero`, which matches no
//!   node);
//! - `<name>-primary` is a copy of its pod template with the selector label's value rewritten to
//!   `<value>-primary` (also in affinity and topology-spread selectors) and its tracked
//!   ConfigMaps and Secrets replaced by their `-primary` copies ([`crate::configs`]), owned by
//!   the rollout;
//! - Services `<svc>` and `<svc>-primary` select the primary, `<svc>-canary` the target;
//! - `<hpa>-primary` copies the target's autoscaler for the primary.
//!
//! Pure: objects in, objects out, the time as a value. Applying them is the caller's.

use std::collections::{BTreeMap, BTreeSet};

use coalmine_spec::Weight;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::NamespaceResourceScope;

use crate::configs::{point_at_primary_copies, ConfigRef};

/// The labels Flagger looks for, in order, to find the one that selects the target's pods
/// (its `-selector-labels` default).
pub const SELECTOR_LABELS: [&str; 3] = ["app", "name", "app.kubernetes.io/name"];

/// Flagger's default `primaryReadyThreshold` / `canaryReadyThreshold` (%).
pub const DEFAULT_READY_THRESHOLD: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("{kind} {name:?} has no selector label among {SELECTOR_LABELS:?} in spec.selector.matchLabels")]
    NoSelectorLabel { kind: &'static str, name: String },
    #[error("{kind} {name:?} has no pod template")]
    NoTemplate { kind: &'static str, name: String },
}

/// The node selector that parks a DaemonSet: no node has the label, so it runs no pod
/// (Flagger's, so a DaemonSet Flagger parked reads the same).
pub const PARKING_NODE_SELECTOR: (&str, &str) = ("flagger.app/scale-to-zero", "true");

/// What a rollout's target can be: Flagger's `targetRef` kinds. The canary is the target
/// itself; the primary is a copy of its kind.
pub trait Workload:
    kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn template(&self) -> Option<&PodTemplateSpec>;
    fn match_labels(&self) -> Option<&BTreeMap<String, String>>;
    /// The size it asks for (a DaemonSet: none).
    fn replicas(&self) -> Option<i32>;
    /// This kind's spec around `template`, selecting `selector`, with this one's settings.
    fn with_template(
        &self,
        metadata: ObjectMeta,
        selector: LabelSelector,
        template: PodTemplateSpec,
        replicas: Option<i32>,
    ) -> Self;
    /// How many pods the canary runs as Coalmine sized it: a Deployment's replicas; a
    /// DaemonSet's 0 when parked, else 1 (one on every node).
    fn canary_size(&self) -> i32;
    /// The patch that gives the canary `size`, and whether it goes to the `scale` subresource.
    fn size_patch(size: i32) -> (serde_json::Value, bool);
    /// The pods a canary needs to carry `weight` beside `primary` (never more than the primary
    /// has, at least one).
    fn canary_capacity(primary: &Self, weight: Weight) -> i32;
    /// The size that serves everything `like` serves (its replicas; a DaemonSet: unparked).
    fn serving_size(like: &Self) -> i32;
    /// The pod template as the user wrote it: what a revision is, and what the primary runs (a
    /// DaemonSet's parking selector is Coalmine's, not the user's).
    fn revision_template(&self) -> PodTemplateSpec {
        self.template().cloned().unwrap_or_default()
    }
    /// Whether it runs its pods (Flagger's rules for the kind).
    fn readiness(&self, threshold_pct: u32, deadline_seconds: u64, now: i64) -> Readiness;
    /// What [`Workload::readiness`] reads of the status, as numbers: when they change, it
    /// may have.
    fn rollout_progress(&self) -> [i64; 4];
}

impl Workload for Deployment {
    const KIND: &'static str = "Deployment";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
    fn match_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.spec.as_ref()?.selector.match_labels.as_ref()
    }
    fn replicas(&self) -> Option<i32> {
        self.spec.as_ref()?.replicas
    }
    fn with_template(
        &self,
        metadata: ObjectMeta,
        selector: LabelSelector,
        template: PodTemplateSpec,
        replicas: Option<i32>,
    ) -> Deployment {
        let spec = self.spec.clone().unwrap_or_default();
        Deployment {
            metadata,
            spec: Some(DeploymentSpec {
                replicas,
                selector,
                template,
                progress_deadline_seconds: spec.progress_deadline_seconds,
                min_ready_seconds: spec.min_ready_seconds,
                revision_history_limit: spec.revision_history_limit,
                strategy: spec.strategy,
                paused: None,
            }),
            status: None,
        }
    }
    fn canary_size(&self) -> i32 {
        self.replicas().unwrap_or(1)
    }
    fn size_patch(size: i32) -> (serde_json::Value, bool) {
        (serde_json::json!({ "spec": { "replicas": size } }), true)
    }
    fn canary_capacity(primary: &Deployment, weight: Weight) -> i32 {
        let primary = primary.replicas().unwrap_or(1);
        replica_split(primary, weight).canary.min(primary).max(1)
    }
    fn serving_size(like: &Deployment) -> i32 {
        like.replicas().unwrap_or(1).max(1)
    }
    fn readiness(&self, threshold_pct: u32, deadline_seconds: u64, now: i64) -> Readiness {
        readiness(self, threshold_pct, deadline_seconds, now)
    }
    fn rollout_progress(&self) -> [i64; 4] {
        let s = self.status.clone().unwrap_or_default();
        [
            s.observed_generation.unwrap_or(0),
            i64::from(s.updated_replicas.unwrap_or(0)),
            i64::from(s.available_replicas.unwrap_or(0)),
            i64::from(s.replicas.unwrap_or(0)),
        ]
    }
}

impl Workload for DaemonSet {
    const KIND: &'static str = "DaemonSet";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
    fn match_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.spec.as_ref()?.selector.match_labels.as_ref()
    }
    fn replicas(&self) -> Option<i32> {
        None
    }
    fn with_template(
        &self,
        metadata: ObjectMeta,
        selector: LabelSelector,
        template: PodTemplateSpec,
        _replicas: Option<i32>,
    ) -> DaemonSet {
        let spec = self.spec.clone().unwrap_or_default();
        DaemonSet {
            metadata,
            spec: Some(DaemonSetSpec {
                selector,
                template,
                min_ready_seconds: spec.min_ready_seconds,
                revision_history_limit: spec.revision_history_limit,
                update_strategy: spec.update_strategy,
            }),
            status: None,
        }
    }
    fn canary_size(&self) -> i32 {
        let parked = self
            .template()
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.node_selector.as_ref())
            .is_some_and(|n| n.contains_key(PARKING_NODE_SELECTOR.0));
        i32::from(!parked)
    }
    fn size_patch(size: i32) -> (serde_json::Value, bool) {
        let value = (size == 0).then_some(PARKING_NODE_SELECTOR.1);
        let patch = serde_json::json!({ "spec": { "template": { "spec": { "nodeSelector": {
            PARKING_NODE_SELECTOR.0: value } } } } });
        (patch, false)
    }
    fn canary_capacity(_primary: &DaemonSet, _weight: Weight) -> i32 {
        1
    }
    fn serving_size(_like: &DaemonSet) -> i32 {
        1
    }
    fn revision_template(&self) -> PodTemplateSpec {
        let mut template = self.template().cloned().unwrap_or_default();
        if let Some(pod) = template.spec.as_mut() {
            if let Some(selector) = pod.node_selector.as_mut() {
                selector.remove(PARKING_NODE_SELECTOR.0);
                if selector.is_empty() {
                    pod.node_selector = None;
                }
            }
        }
        template
    }
    fn readiness(&self, threshold_pct: u32, _deadline_seconds: u64, _now: i64) -> Readiness {
        daemon_set_readiness(self, threshold_pct)
    }
    fn rollout_progress(&self) -> [i64; 4] {
        let s = self.status.clone().unwrap_or_default();
        [
            s.observed_generation.unwrap_or(0),
            i64::from(s.desired_number_scheduled),
            i64::from(s.updated_number_scheduled.unwrap_or(0)),
            i64::from(s.number_available.unwrap_or(0)),
        ]
    }
}

/// The label that selects a workload's pods and its value: `app=payment-service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorLabel {
    pub key: String,
    pub value: String,
}

impl SelectorLabel {
    pub fn of<W: Workload>(target: &W) -> Result<Self, WorkloadError> {
        let labels = target.match_labels();
        SELECTOR_LABELS
            .iter()
            .find_map(|key| {
                labels?.get(*key).map(|value| SelectorLabel {
                    key: (*key).to_string(),
                    value: value.clone(),
                })
            })
            .ok_or_else(|| WorkloadError::NoSelectorLabel {
                kind: W::KIND,
                name: name_of(target.meta()),
            })
    }

    fn primary_value(&self) -> String {
        primary_name(&self.value)
    }

    fn selecting(&self, value: String) -> BTreeMap<String, String> {
        BTreeMap::from([(self.key.clone(), value)])
    }
}

/// `<name>-primary`.
pub fn primary_name(name: &str) -> String {
    format!("{name}-primary")
}

fn name_of(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// `<name>-primary`, of the target's kind: the target's pod template (as the user wrote it),
/// selecting `<value>-primary` and reading the `-primary` copies of the `tracked` configs, owned
/// by `owner`. `replicas` is the primary's size (the target's, or what its autoscaler says; a
/// DaemonSet has none).
pub fn primary_workload<W: Workload>(
    target: &W,
    owner: &OwnerReference,
    replicas: Option<i32>,
    tracked: &BTreeSet<ConfigRef>,
) -> Result<W, WorkloadError> {
    let label = SelectorLabel::of(target)?;
    let name = name_of(target.meta());
    if target.template().is_none() {
        return Err(WorkloadError::NoTemplate {
            kind: W::KIND,
            name,
        });
    }
    let mut template = primary_template(&target.revision_template(), &label);
    point_at_primary_copies(&mut template, tracked);
    let metadata = ObjectMeta {
        name: Some(primary_name(&name)),
        namespace: target.meta().namespace.clone(),
        labels: Some(label.selecting(label.primary_value())),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let selector = LabelSelector {
        match_labels: Some(label.selecting(label.primary_value())),
        match_expressions: None,
    };
    Ok(target.with_template(metadata, selector, template, replicas))
}

/// The target's pod template for the primary: the selector label's value becomes
/// `<value>-primary` on the pods and wherever the pod's scheduling rules select its own kind
/// (anti-affinity, topology spread), so "one per node" keeps meaning the primary's pods.
fn primary_template(template: &PodTemplateSpec, label: &SelectorLabel) -> PodTemplateSpec {
    let mut template = template.clone();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(label.key.clone(), label.primary_value());
    let Some(pod) = template.spec.as_mut() else {
        return template;
    };
    let rewrite = |selector: &mut LabelSelector| {
        if let Some(v) = selector
            .match_labels
            .as_mut()
            .and_then(|m| m.get_mut(&label.key))
        {
            if *v == label.value {
                *v = label.primary_value();
            }
        }
        for expr in selector.match_expressions.iter_mut().flatten() {
            if expr.key == label.key {
                for v in expr.values.iter_mut().flatten() {
                    if *v == label.value {
                        *v = label.primary_value();
                    }
                }
            }
        }
    };
    if let Some(affinity) = pod.affinity.as_mut() {
        let pod_affinity_terms = affinity
            .pod_anti_affinity
            .iter_mut()
            .flat_map(|a| {
                let required = a
                    .required_during_scheduling_ignored_during_execution
                    .iter_mut()
                    .flatten();
                let preferred = a
                    .preferred_during_scheduling_ignored_during_execution
                    .iter_mut()
                    .flatten()
                    .map(|w| &mut w.pod_affinity_term);
                required.chain(preferred)
            })
            .filter_map(|term| term.label_selector.as_mut());
        for selector in pod_affinity_terms {
            rewrite(selector);
        }
    }
    for spread in pod.topology_spread_constraints.iter_mut().flatten() {
        if let Some(selector) = spread.label_selector.as_mut() {
            rewrite(selector);
        }
    }
    template
}

/// The port the Services expose (a rollout's `service`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePortSpec {
    /// The apex Service's name (default: the target's).
    pub name: Option<String>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub port_name: Option<String>,
}

/// `<svc>` and `<svc>-primary` select the primary's pods; `<svc>-canary` selects the target's.
pub fn services<W: Workload>(
    target: &W,
    owner: &OwnerReference,
    port: &ServicePortSpec,
) -> Result<[Service; 3], WorkloadError> {
    let label = SelectorLabel::of(target)?;
    let apex = port.name.clone().unwrap_or_else(|| name_of(target.meta()));
    let service = |name: String, selects: String| Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: target.meta().namespace.clone(),
            labels: Some(label.selecting(selects.clone())),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(label.selecting(selects)),
            ports: Some(vec![ServicePort {
                name: Some(port.port_name.clone().unwrap_or_else(|| "http".into())),
                port: port.port,
                protocol: Some("TCP".into()),
                target_port: Some(
                    port.target_port
                        .clone()
                        .unwrap_or(IntOrString::Int(port.port)),
                ),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    Ok([
        service(apex.clone(), label.primary_value()),
        service(primary_name(&apex), label.primary_value()),
        service(format!("{apex}-canary"), label.value.clone()),
    ])
}

/// `<hpa>-primary`: the target's autoscaler, scaling the primary.
pub fn primary_autoscaler(
    hpa: &HorizontalPodAutoscaler,
    owner: &OwnerReference,
    primary: &str,
) -> HorizontalPodAutoscaler {
    let mut spec = hpa.spec.clone().unwrap_or_default();
    spec.scale_target_ref.name = primary.to_string();
    HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(primary_name(&name_of(&hpa.metadata))),
            namespace: hpa.metadata.namespace.clone(),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// A short, stable digest of a pod template and the configs it reads: what `lastAppliedSpec`
/// and `lastPromotedSpec` hold, so a change of either starts a run and a return to the promoted
/// one does not.
pub fn spec_hash(template: &PodTemplateSpec, configs: &BTreeMap<String, String>) -> String {
    // serde_json's maps are sorted, so equal templates serialize equally.
    let text = serde_json::to_string(&(template, configs)).expect("a template serializes");
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// Provider `kubernetes`: the canary's replicas beside an unchanged primary, and the share of
/// pods (so of requests, through the apex Service) that gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaSplit {
    pub canary: i32,
    /// canary ÷ (primary + canary), in %.
    pub effective_percent: f64,
}

/// The fewest canary replicas whose share of all pods reaches `weight`: ⌈total × weight⌉ with
/// the canary counted in the total, so the primary keeps its size and a rollback only removes
/// canary pods (no capacity to win back mid-incident). Weight 0 is no canary; weight 100 would
/// need no primary, which is promotion's business: capped at one replica per primary replica
/// short of it.
pub fn replica_split(primary: i32, weight: Weight) -> ReplicaSplit {
    let primary = primary.max(0);
    let bp = i64::from(weight.basis_points());
    let full = i64::from(Weight::FULL.basis_points());
    let canary = if bp == 0 || primary == 0 {
        if bp == 0 {
            0
        } else {
            1
        }
    } else if bp >= full {
        // Everything on the canary cannot be had beside a running primary: as close as whole
        // replicas get without removing the primary.
        primary.saturating_mul(99)
    } else {
        // c / (p + c) ≥ w  ⇔  c ≥ p·w / (1 − w)
        let p = i64::from(primary);
        i32::try_from((p * bp + (full - bp) - 1) / (full - bp)).unwrap_or(i32::MAX)
    };
    let total = f64::from(primary) + f64::from(canary);
    ReplicaSplit {
        canary,
        effective_percent: if total > 0.0 {
            100.0 * f64::from(canary) / total
        } else {
            0.0
        },
    }
}

/// Which pods the apex Service selects under provider `kubernetes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApexTo {
    /// The primary's (by the selector label's `-primary` value): Flagger's apex, and where it
    /// points whenever the canary gets no share (before the first step, blue/green iterations,
    /// after the release).
    Primary,
    /// Both versions' (by `coalmine.dev/service`): the weight is the canary's share of pods.
    BothVersions,
    /// The canary's (by the selector label's own value): blue/green's switch, everything on the
    /// new version at full size.
    Canary,
}

/// Provider `kubernetes`: how many canary pods, and which pods the apex selects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaPlan {
    pub canary: i32,
    pub apex: ApexTo,
    /// The canary's share of the apex's requests, in %.
    pub effective_percent: f64,
}

/// Provider `kubernetes`: the canary at `weight` beside `primary` primary pods. No weight: one
/// canary pod (Flagger's scale from zero) for the webhooks and load tests, which reach it
/// through `-canary`, while the apex keeps to the primary. A share: [`replica_split`] behind an
/// apex selecting both. Everything: as many canary pods as the primary has, and the apex on
/// them alone.
pub fn replica_plan(primary: i32, weight: Weight) -> ReplicaPlan {
    if weight == Weight::ZERO {
        ReplicaPlan {
            canary: 1,
            apex: ApexTo::Primary,
            effective_percent: 0.0,
        }
    } else if weight >= Weight::FULL {
        ReplicaPlan {
            canary: primary.max(1),
            apex: ApexTo::Canary,
            effective_percent: 100.0,
        }
    } else {
        let split = replica_split(primary, weight);
        ReplicaPlan {
            canary: split.canary,
            apex: ApexTo::BothVersions,
            effective_percent: split.effective_percent,
        }
    }
}

/// Whether a Deployment is ready, after Flagger's rules (`pkg/canary/deployment_ready.go`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not yet, and why; retried.
    Waiting(String),
    /// It will not become ready: the run fails (rolls back).
    Failed(String),
}

/// `threshold_pct`: the share of updated replicas that must be available
/// (`primaryReadyThreshold` / `canaryReadyThreshold`, default 100). `deadline_seconds`: how long
/// it may stay short of available replicas (`progressDeadlineSeconds`). `now` is RFC 3339-free:
/// seconds since the epoch, as the conditions' times are compared with it.
pub fn readiness(
    deployment: &Deployment,
    threshold_pct: u32,
    deadline_seconds: u64,
    now_unix_seconds: i64,
) -> Readiness {
    let name = name_of(&deployment.metadata);
    let status = deployment.status.clone().unwrap_or_default();
    let generation = deployment.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return Readiness::Waiting(format!(
            "waiting for rollout of {name} to start (generation {generation} not observed yet)"
        ));
    }
    let conditions = status.conditions.clone().unwrap_or_default();
    let condition = |kind: &str| conditions.iter().find(|c| c.type_ == kind);
    if let Some(c) = condition("Progressing") {
        if c.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            return Readiness::Failed(format!(
                "{name} exceeded its progress deadline: {}",
                c.message.clone().unwrap_or_default()
            ));
        }
    }
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let needed = (i64::from(updated) * i64::from(threshold_pct) / 100) as i32;
    let short = if updated < wanted {
        Some(format!(
            "waiting for rollout of {name}: {updated} of {wanted} updated replicas are available"
        ))
    } else if total > updated {
        Some(format!(
            "waiting for rollout of {name}: {} old replicas are pending termination",
            total - updated
        ))
    } else if available < needed {
        Some(format!(
            "waiting for rollout of {name}: {available} of {needed} updated replicas are available"
        ))
    } else {
        None
    };
    let Some(why) = short else {
        return Readiness::Ready;
    };
    if let Some(c) = condition("Available") {
        let since = c
            .last_update_time
            .as_ref()
            .or(c.last_transition_time.as_ref())
            .map(|t| t.0.as_second());
        if c.status == "False"
            && c.reason.as_deref() == Some("MinimumReplicasUnavailable")
            && since.is_some_and(|t| now_unix_seconds - t > deadline_seconds as i64)
        {
            return Readiness::Failed(format!(
                "{name} has had too few available replicas for more than {deadline_seconds}s ({why})"
            ));
        }
    }
    Readiness::Waiting(why)
}

/// Whether a DaemonSet runs its pods, after Flagger's rules (`pkg/canary/daemonset_ready.go`):
/// every scheduled pod updated, and `threshold_pct` of them available. A parked DaemonSet
/// schedules none, and is ready.
pub fn daemon_set_readiness(daemon_set: &DaemonSet, threshold_pct: u32) -> Readiness {
    let name = name_of(&daemon_set.metadata);
    let status = daemon_set.status.clone().unwrap_or_default();
    let generation = daemon_set.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return Readiness::Waiting(format!(
            "waiting for rollout of {name} to start (generation {generation} not observed yet)"
        ));
    }
    let desired = status.desired_number_scheduled;
    let updated = status.updated_number_scheduled.unwrap_or(0);
    let available = status.number_available.unwrap_or(0);
    let needed = (i64::from(desired) * i64::from(threshold_pct) / 100) as i32;
    if updated < desired {
        Readiness::Waiting(format!(
            "waiting for rollout of {name}: {updated} of {desired} scheduled pods are updated"
        ))
    } else if available < needed {
        Readiness::Waiting(format!(
            "waiting for rollout of {name}: {available} of {needed} updated pods are available"
        ))
    } else {
        Readiness::Ready
    }
}
