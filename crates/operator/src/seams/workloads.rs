//! Flagger's object model around a rollout, shared by the traffic backends that run on it: the
//! user's target stays theirs; Coalmine runs `<name>-primary` from its template (with copies of
//! its tracked ConfigMaps and Secrets, [`crate::configs`], and of its HorizontalPodAutoscaler,
//! `<hpa>-primary`), and the apex, `-primary` and `-canary` Services. The canary is the target
//! itself, scaled from 0 while it is analysed and back to 0 after. Promotion copies the target's
//! template to the primary and holds until the primary has rolled out. The primary's size stays
//! its own (or its autoscaler's): promotion never copies `replicas`.
//!
//! The apex Service selects the primary's pods, as Flagger's does. Under provider `kubernetes`
//! it selects both versions' while the canary has a share ([`crate::seams::replicas`]: the weight
//! is a replica ratio); under provider `coalmine` the routers weigh ([`crate::seams::routers`]).
//!
//! A rollout claims its target with the `coalmine.dev/owner` annotation (written against the
//! `resourceVersion` read, so of two controllers one wins); another owner's claim is refused.

use std::collections::BTreeMap;

use coalmine_rollout::TrafficFault;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::configs::TrackedConfigs;
use crate::seams::configs::ConfigTracker;
use crate::workload::{
    primary_autoscaler, primary_name, primary_workload, services, ApexTo, Readiness, SelectorLabel,
    ServicePortSpec, Workload,
};

/// The label the apex Service selects, on both versions' pods.
pub const SERVICE_LABEL: &str = "coalmine.dev/service";
/// Who drives a target: `<rollout> (<controller>)`.
pub const OWNER_ANNOTATION: &str = "coalmine.dev/owner";
/// The field manager of every object Coalmine writes.
pub const FIELD_MANAGER: &str = "coalmine";
/// On the primary: the pod template it ran before its last promotion, and that revision
/// (`lastPromotedSpec` then), as [`Remembered`] in JSON — written in the same apply as the
/// promotion, so a group's joint rollback can take the promoted member back.
pub const PREVIOUS_TEMPLATE_ANNOTATION: &str = "coalmine.dev/previous-template";

/// What a primary remembers of itself before its last promotion.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Remembered {
    /// The revision (spec hash) it ran.
    pub revision: String,
    pub template: serde_json::Value,
}

impl Remembered {
    /// What `primary` remembers, if anything readable.
    fn of<W: Workload>(primary: &W) -> Option<Remembered> {
        let text = primary
            .meta()
            .annotations
            .as_ref()?
            .get(PREVIOUS_TEMPLATE_ANNOTATION)?;
        serde_json::from_str(text).ok()
    }

    /// What a promotion makes `primary` remember, while it runs `revision`: its template now,
    /// unless it remembers that revision already (the promotion tried again, the primary
    /// changed by the first try).
    fn before_promotion<W: Workload>(primary: &W, revision: Option<&str>) -> Option<Remembered> {
        let revision = revision?;
        Remembered::of(primary)
            .filter(|r| r.revision == revision)
            .or_else(|| {
                Some(Remembered {
                    revision: revision.to_string(),
                    template: serde_json::to_value(primary.template()?).ok()?,
                })
            })
    }
}

/// Whether the apex Service ever selects both versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apex {
    /// At times both versions', by [`SERVICE_LABEL`] (provider `kubernetes`: the weight is the
    /// canary's share of replicas, and both versions' pods must carry the label).
    BothVersions,
    /// The primary's only (Flagger's apex): something in front of the Services weighs.
    Primary,
}

/// What a rollout works on: the user's target (a Deployment or DaemonSet, `W`), the primary
/// Coalmine runs beside it, the Services.
pub struct Workloads<W: Workload> {
    workloads: Api<W>,
    services: Api<Service>,
    autoscalers: Api<HorizontalPodAutoscaler>,
    configs: ConfigTracker,
    target: String,
    /// The target's HorizontalPodAutoscaler (`autoscalerRef`), copied for the primary.
    autoscaler: Option<String>,
    apex: String,
    port: ServicePortSpec,
    owner: String,
    /// The rollout (Canary or Rollout) that owns the primary.
    owner_reference: OwnerReference,
    /// `canaryReadyThreshold` / `primaryReadyThreshold` (%), `progressDeadlineSeconds`.
    canary_ready_threshold: u32,
    primary_ready_threshold: u32,
    progress_deadline_seconds: u64,
    apex_selects: Apex,
    /// The revision the primary runs (`lastPromotedSpec` as the run started).
    promoted_revision: Option<String>,
}

/// How the workloads of one rollout are set up.
pub struct WorkloadsSpec {
    pub namespace: String,
    pub target: String,
    /// `autoscalerRef.name` (a HorizontalPodAutoscaler, autoscaling/v2).
    pub autoscaler: Option<String>,
    /// The Services' port (and the apex's name: `name`, else the target's).
    pub port: ServicePortSpec,
    pub owner: String,
    pub owner_reference: OwnerReference,
    pub canary_ready_threshold: u32,
    pub primary_ready_threshold: u32,
    pub progress_deadline_seconds: u64,
    /// `status.lastPromotedSpec`: the revision the primary runs, remembered with its template
    /// at promotion.
    pub promoted_revision: Option<String>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A kube error as the rollout sees it: the API server's own refusals (not found, forbidden,
/// invalid) will not heal by waiting; anything else (no answer, overload, a conflict with a
/// concurrent write) is held and tried again.
pub(crate) fn fault(what: &str, e: kube::Error) -> TrafficFault {
    match &e {
        kube::Error::Api(status)
            if (400..500).contains(&status.code) && ![408, 409, 429].contains(&status.code) =>
        {
            TrafficFault::Refused(format!("{what}: {}", status.message))
        }
        _ => TrafficFault::Unreachable(format!("{what}: {e}")),
    }
}

impl<W: Workload> Workloads<W> {
    pub fn new(client: kube::Client, spec: WorkloadsSpec, apex_selects: Apex) -> Workloads<W> {
        let apex = spec
            .port
            .name
            .clone()
            .unwrap_or_else(|| spec.target.clone());
        Workloads {
            workloads: Api::namespaced(client.clone(), &spec.namespace),
            services: Api::namespaced(client.clone(), &spec.namespace),
            autoscalers: Api::namespaced(client.clone(), &spec.namespace),
            configs: ConfigTracker::new(client, &spec.namespace),
            target: spec.target,
            autoscaler: spec.autoscaler,
            apex,
            port: spec.port,
            owner: spec.owner,
            owner_reference: spec.owner_reference,
            canary_ready_threshold: spec.canary_ready_threshold,
            primary_ready_threshold: spec.primary_ready_threshold,
            progress_deadline_seconds: spec.progress_deadline_seconds,
            apex_selects,
            promoted_revision: spec.promoted_revision,
        }
    }

    pub(crate) async fn target(&self) -> Result<W, TrafficFault> {
        self.workloads
            .get(&self.target)
            .await
            .map_err(|e| fault(&format!("{} {}", W::KIND, self.target), e))
    }

    /// The target's pods must carry the apex's label, or the apex would not reach them.
    pub(crate) fn check_label(&self, target: &W) -> Result<(), TrafficFault> {
        if self.apex_selects == Apex::Primary {
            return Ok(());
        }
        let labels = target
            .template()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.as_ref());
        match labels.and_then(|l| l.get(SERVICE_LABEL)) {
            Some(v) if *v == self.apex => Ok(()),
            found => Err(TrafficFault::Refused(format!(
                "{} {}: spec.template.metadata.labels needs {SERVICE_LABEL}: {} (found {}): provider kubernetes splits by replicas behind Service {}, which selects that label on both versions' pods",
                W::KIND,
                self.target,
                self.apex,
                found.map_or("none".into(), |v| format!("{v:?}")),
                self.apex
            ))),
        }
    }

    async fn scale_target(&self, size: i32) -> Result<(), TrafficFault> {
        let (patch, scale) = W::size_patch(size);
        let params = PatchParams::default();
        let patched = if scale {
            self.workloads
                .patch_scale(&self.target, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        } else {
            self.workloads
                .patch(&self.target, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        };
        patched.map_err(|e| fault(&format!("scaling {} {}", W::KIND, self.target), e))
    }

    /// Points the apex at the primary's pods, both versions' (by the shared label), or the
    /// canary's (the target, as read, gives the selector label).
    /// The whole apex Service is applied each time: an apply of the selector alone would drop
    /// the other fields this field manager set (its ports), as server-side apply does.
    pub(crate) async fn select(&self, target: &W, to: ApexTo) -> Result<(), TrafficFault> {
        let refused = |e: crate::workload::WorkloadError| TrafficFault::Refused(e.to_string());
        let label = SelectorLabel::of(target).map_err(refused)?;
        let selector = match to {
            ApexTo::Primary => BTreeMap::from([(label.key, primary_name(&label.value))]),
            ApexTo::BothVersions => {
                BTreeMap::from([(SERVICE_LABEL.to_string(), self.apex.clone())])
            }
            ApexTo::Canary => BTreeMap::from([(label.key, label.value)]),
        };
        let [mut apex, ..] =
            services(target, &self.owner_reference, &self.port).map_err(refused)?;
        if let Some(spec) = apex.spec.as_mut() {
            spec.selector = Some(selector);
        }
        self.apply_service(apex).await
    }

    async fn apply_service(&self, service: Service) -> Result<(), TrafficFault> {
        let name = service.metadata.name.clone().unwrap_or_default();
        let mut object = serde_json::to_value(&service).expect("a Service serializes");
        object["apiVersion"] = "v1".into();
        object["kind"] = "Service".into();
        self.services
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .map(|_| ())
            .map_err(|e| fault(&format!("Service {name}"), e))
    }

    /// The primary as it must be: the target's template with the apex's label, reading the
    /// copies of `tracked` (or, taken back, the template it `remembered`), and what it
    /// remembers of itself.
    async fn apply_primary(
        &self,
        target: &W,
        replicas: Option<i32>,
        tracked: &TrackedConfigs,
        remembered: Option<&Remembered>,
        taken_back: bool,
    ) -> Result<W, TrafficFault> {
        let primary = primary_workload(
            target,
            &self.owner_reference,
            replicas,
            &tracked.references(),
        )
        .map_err(|e| TrafficFault::Refused(e.to_string()))?;
        let mut object = serde_json::to_value(&primary).expect("a workload serializes");
        if let Some(remembered) = remembered {
            if taken_back {
                object["spec"]["template"] = remembered.template.clone();
            }
            let text = serde_json::to_string(remembered).expect("a template serializes");
            object["metadata"]["annotations"][PREVIOUS_TEMPLATE_ANNOTATION] = text.into();
        }
        if self.apex_selects == Apex::BothVersions {
            object["spec"]["template"]["metadata"]["labels"][SERVICE_LABEL] =
                self.apex.clone().into();
        }
        object["apiVersion"] = W::api_version(&()).into();
        object["kind"] = W::KIND.into();
        let name = primary_name(&self.target);
        self.workloads
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .map_err(|e| fault(&format!("{} {name}", W::KIND), e))
    }

    /// The tracked ConfigMaps and Secrets the target's pods read now.
    async fn tracked_configs(&self, target: &W) -> Result<TrackedConfigs, TrafficFault> {
        self.configs.read(&target.revision_template()).await
    }

    /// The target's autoscaler, if the rollout names one; one that does not exist holds,
    /// naming the field (it may yet be created).
    async fn target_autoscaler(&self) -> Result<Option<HorizontalPodAutoscaler>, TrafficFault> {
        let Some(name) = &self.autoscaler else {
            return Ok(None);
        };
        let found = self
            .autoscalers
            .get_opt(name)
            .await
            .map_err(|e| fault(&format!("HorizontalPodAutoscaler {name}"), e))?;
        match found {
            Some(hpa) => Ok(Some(hpa)),
            None => Err(TrafficFault::Unreachable(format!(
                "spec.autoscalerRef: HorizontalPodAutoscaler {name} does not exist"
            ))),
        }
    }

    /// `<hpa>-primary`: the target's autoscaler's bounds, metrics and behaviour, scaling the
    /// primary.
    async fn apply_primary_autoscaler(
        &self,
        hpa: &HorizontalPodAutoscaler,
    ) -> Result<(), TrafficFault> {
        let copy = primary_autoscaler(hpa, &self.owner_reference, &primary_name(&self.target));
        let name = copy.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(&copy).expect("an autoscaler serializes");
        body["apiVersion"] = "autoscaling/v2".into();
        body["kind"] = "HorizontalPodAutoscaler".into();
        self.autoscalers
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| fault(&format!("HorizontalPodAutoscaler {name}"), e))
    }

    /// Scales the canary (the target, as read) to `wanted` replicas; says so if it changed.
    pub(crate) async fn scale_canary(
        &self,
        target: &W,
        wanted: i32,
    ) -> Result<Option<String>, TrafficFault> {
        let current = target.canary_size();
        if current == wanted {
            return Ok(None);
        }
        self.scale_target(wanted).await?;
        Ok(Some(format!(
            "{} {} replicas {current} → {wanted}",
            W::KIND,
            self.target
        )))
    }

    /// Holds until the canary (the target) is ready, after a change of its size.
    pub(crate) async fn hold_until_canary_ready(&self) -> Result<(), TrafficFault> {
        self.hold_until_ready(&self.target().await?, self.canary_ready_threshold)
    }

    pub(crate) async fn primary(&self) -> Result<W, TrafficFault> {
        let name = primary_name(&self.target);
        self.workloads
            .get(&name)
            .await
            .map_err(|e| fault(&format!("{} {name}", W::KIND), e))
    }

    /// Flagger's initialisation: the primary (the target's template and size, reading copies
    /// of the tracked configs), its autoscaler, and the three Services, the apex selecting
    /// the primary; once the primary is ready, the target (the canary)
    /// is scaled to 0. Holds (`Unreachable`) until then, and, before making anything, while a
    /// required config or the autoscaler does not exist.
    pub async fn initialize(&self) -> Result<(), TrafficFault> {
        let target = self.target().await?;
        self.check_label(&target)?;
        let autoscaler = self.target_autoscaler().await?;
        let tracked = self.tracked_configs(&target).await?;
        let existing = self.workloads.get_opt(&primary_name(&self.target)).await;
        let existing = existing.map_err(|e| fault(&format!("{} primary", W::KIND), e))?;
        // The primary's size, once it exists, is its own (or its autoscaler's).
        let replicas = match &existing {
            Some(p) => p.replicas(),
            None => target.replicas(),
        };
        let primary = match existing {
            Some(p) => p,
            None => {
                // The copies first: the primary's pods read them. Made with the primary only,
                // as Flagger: after that they change at promotion, never unanalysed.
                self.configs
                    .copy_to_primary(&tracked, &self.owner_reference)
                    .await?;
                self.apply_primary(&target, replicas, &tracked, None, false)
                    .await?
            }
        };
        if let Some(hpa) = &autoscaler {
            // Made if missing; brought up to date at promotion only (Flagger's `init`).
            let name = primary_name(hpa.metadata.name.as_deref().unwrap_or_default());
            let existing = self.autoscalers.get_opt(&name).await;
            let existing =
                existing.map_err(|e| fault(&format!("HorizontalPodAutoscaler {name}"), e))?;
            if existing.is_none() {
                self.apply_primary_autoscaler(hpa).await?;
            }
        }
        for service in services(&target, &self.owner_reference, &self.port)
            .map_err(|e| TrafficFault::Refused(e.to_string()))?
        {
            self.apply_service(service).await?;
        }
        self.hold_until_ready(&primary, self.primary_ready_threshold)?;
        if target.canary_size() != 0 {
            self.scale_target(0).await?;
        }
        Ok(())
    }

    /// Ready, or hold (the tick waits, up to the progress deadline), or fail (roll back).
    pub(crate) fn hold_until_ready(
        &self,
        workload: &W,
        threshold: u32,
    ) -> Result<(), TrafficFault> {
        match workload.readiness(threshold, self.progress_deadline_seconds, unix_now()) {
            Readiness::Ready => Ok(()),
            Readiness::Waiting(why) => Err(TrafficFault::Unreachable(why)),
            Readiness::Failed(why) => Err(TrafficFault::Refused(why)),
        }
    }

    /// Promotion's first half: the primary runs the target's template and configs (and its
    /// autoscaler's settings); holds until it has rolled out. The canary is the caller's to
    /// take off then.
    pub(crate) async fn promote_primary(&self) -> Result<W, TrafficFault> {
        let target = self.target().await?;
        let autoscaler = self.target_autoscaler().await?;
        let tracked = self.tracked_configs(&target).await?;
        self.configs
            .copy_to_primary(&tracked, &self.owner_reference)
            .await?;
        // Its size stays: an apply without `replicas` would drop the field Coalmine owns.
        let before = self.primary().await?;
        let size = before.replicas();
        // Remembered in the same write that replaces it; a promotion tried again (the primary
        // already changed) keeps what the first try remembered.
        let remembered = Remembered::before_promotion(&before, self.promoted_revision.as_deref());
        let primary = self
            .apply_primary(&target, size, &tracked, remembered.as_ref(), false)
            .await?;
        if let Some(hpa) = &autoscaler {
            self.apply_primary_autoscaler(hpa).await?;
        }
        self.hold_until_ready(&primary, self.primary_ready_threshold)?;
        Ok(target)
    }

    /// A group's joint rollback of a promoted member: the primary runs the template it ran
    /// before its last promotion again (the configs it reads are not taken back). Returns the
    /// revision that was, or none when the primary remembers nothing (promoted by a Coalmine
    /// without this). Not waited on: all traffic is on the primary already.
    pub(crate) async fn take_primary_back(&self) -> Result<Option<String>, TrafficFault> {
        let primary = self.primary().await?;
        let Some(remembered) = Remembered::of(&primary) else {
            return Ok(None);
        };
        let target = self.target().await?;
        // The remembered template reads its own copies: the target's are not looked at.
        self.apply_primary(
            &target,
            primary.replicas(),
            &TrackedConfigs::default(),
            Some(&remembered),
            true,
        )
        .await?;
        Ok(Some(remembered.revision))
    }

    /// Claims the target for this rollout's owner; another owner's claim refuses it.
    pub(crate) async fn claim(&self) -> Result<(), TrafficFault> {
        self.check_label(&self.target().await?)?;
        self.set_owner(Some(&self.owner)).await
    }

    /// `revertOnDeletion`: the service as it was before Coalmine — the target at the primary's
    /// size (a DaemonSet unparked) and, once it is ready (`Unreachable` until then), the apex
    /// Service selecting it and no longer owned by the rollout, so that it outlives it (the
    /// primary and the other Services go with the rollout). The target is let go.
    pub async fn revert(&self) -> Result<(), TrafficFault> {
        let target = self.target().await?;
        let size = match self.workloads.get_opt(&primary_name(&self.target)).await {
            Ok(primary) => W::serving_size(primary.as_ref().unwrap_or(&target)),
            Err(e) => return Err(fault(&format!("{} primary", W::KIND), e)),
        };
        self.scale_canary(&target, size).await?;
        self.hold_until_ready(&self.target().await?, self.primary_ready_threshold)?;
        let refused = |e: crate::workload::WorkloadError| TrafficFault::Refused(e.to_string());
        let label = SelectorLabel::of(&target).map_err(refused)?;
        let [mut apex, ..] =
            services(&target, &self.owner_reference, &self.port).map_err(refused)?;
        apex.metadata.owner_references = None;
        if let Some(spec) = apex.spec.as_mut() {
            spec.selector = Some(BTreeMap::from([(label.key, label.value)]));
        }
        self.apply_service(apex).await?;
        self.release().await
    }

    /// Lets the target go.
    pub(crate) async fn release(&self) -> Result<(), TrafficFault> {
        self.set_owner(None).await
    }

    /// Claims the target (or lets it go). Written against the resourceVersion read; another
    /// write in between (a status update, an autoscaler) is a 409, and the claim is looked at
    /// again on what is there now — only another owner's annotation refuses it.
    async fn set_owner(&self, owner: Option<&str>) -> Result<(), TrafficFault> {
        for _ in 0..5 {
            if self.try_set_owner(owner).await? {
                return Ok(());
            }
        }
        Err(TrafficFault::Unreachable(format!(
            "{} {} kept changing while it was being claimed",
            W::KIND,
            self.target
        )))
    }

    /// `Ok(false)`: the target changed since it was read; try again.
    async fn try_set_owner(&self, owner: Option<&str>) -> Result<bool, TrafficFault> {
        let target = self.target().await?;
        let held = target
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(OWNER_ANNOTATION))
            .cloned();
        match (&held, owner) {
            (Some(other), Some(_)) if *other != self.owner => {
                return Err(TrafficFault::Refused(format!(
                    "{} {} is driven by {other}; one rollout at a time",
                    W::KIND,
                    self.target
                )))
            }
            (Some(_), Some(_)) | (None, None) => return Ok(true),
            (Some(other), None) if *other != self.owner => return Ok(true),
            _ => {}
        }
        let mut updated = target.clone();
        let annotations = updated
            .meta_mut()
            .annotations
            .get_or_insert_with(BTreeMap::new);
        match owner {
            Some(o) => annotations.insert(OWNER_ANNOTATION.into(), o.into()),
            None => annotations.remove(OWNER_ANNOTATION),
        };
        match self
            .workloads
            .replace(&self.target, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(fault(&format!("{} {}", W::KIND, self.target), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;

    fn primary(image: &str, remembers: Option<&Remembered>) -> Deployment {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ledger-primary"},
            "spec": {"selector": {}, "template": {"spec": {"containers": [
                {"name": "ledger", "image": image}]}}},
        }))
        .unwrap();
        if let Some(r) = remembers {
            d.metadata.annotations = Some(BTreeMap::from([(
                PREVIOUS_TEMPLATE_ANNOTATION.to_string(),
                serde_json::to_string(r).unwrap(),
            )]));
        }
        d
    }

    #[test]
    fn a_promotion_remembers_the_template_the_primary_ran_once() {
        let first = Remembered::before_promotion(&primary("ledger:1", None), Some("v1")).unwrap();
        assert_eq!(first.revision, "v1");
        assert_eq!(first.template["spec"]["containers"][0]["image"], "ledger:1");
        // Tried again after the first try changed the primary: still 1, not 2.
        let again = Remembered::before_promotion(&primary("ledger:2", Some(&first)), Some("v1"));
        assert_eq!(again.as_ref(), Some(&first));
        // The next promotion, from v2: the template of v2.
        let next =
            Remembered::before_promotion(&primary("ledger:2", Some(&first)), Some("v2")).unwrap();
        assert_eq!(next.template["spec"]["containers"][0]["image"], "ledger:2");
        assert_eq!(
            Remembered::before_promotion(&primary("ledger:1", None), None),
            None
        );
    }
}
