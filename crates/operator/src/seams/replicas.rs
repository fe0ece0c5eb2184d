//! Provider `kubernetes` with weights: the traffic backend that splits by replicas, as the seed
//! does by hand (19 stable pods and 1 canary pod behind one Service are 5 %). Flagger offers no
//! weights for this provider (fluxcd/flagger#508).
//!
//! While the canary has a share, the apex Service selects `coalmine.dev/service: <apex>`, a label
//! the primary's pods get from Coalmine and the target's pods from the user's template (the
//! template stays the user's: one label, added once, in Git). The canary's share is its replicas
//! among all: the primary keeps its size and the target (the canary) gets the fewest replicas
//! that reach the weight ([`crate::workload::replica_split`]), so a rollback only removes canary
//! pods. With no share (before the first step, blue/green's iterations) the canary runs one pod
//! for the webhooks and the apex keeps to the primary; blue/green's switch puts the apex on a
//! full-size canary alone ([`replica_plan`]). Promotion copies the target's template to the
//! primary, holds until the primary has rolled out, points the apex at it, then scales the
//! canary to 0 ([`Workloads`] does what both providers share).

use coalmine_controller::traffic::TrafficBackend;
use coalmine_controller::BoxFuture;
use coalmine_rollout::{Traffic, TrafficFault};

use k8s_openapi::api::apps::v1::Deployment;

use crate::seams::workloads::{Apex, Workloads, WorkloadsSpec};
use crate::workload::{replica_plan, ApexTo, ReplicaPlan, Workload};

/// The canary's weight as its share of replicas behind the apex.
pub struct ReplicaRatio {
    workloads: Workloads<Deployment>,
}

impl ReplicaRatio {
    pub fn new(client: kube::Client, spec: WorkloadsSpec) -> ReplicaRatio {
        ReplicaRatio {
            workloads: Workloads::new(client, spec, Apex::BothVersions),
        }
    }

    /// Flagger's initialisation: the primary, the Services, the canary at 0.
    pub async fn initialize(&self) -> Result<(), TrafficFault> {
        self.workloads.initialize().await
    }

    /// The weight carried out ([`replica_plan`]): more canary pods start and are ready before
    /// the apex sends them requests; fewer go only once the apex no longer does.
    async fn split(&self, traffic: &Traffic) -> Result<Vec<String>, TrafficFault> {
        let workloads = &self.workloads;
        let target = workloads.target().await?;
        workloads.check_label(&target)?;
        let primary = workloads.primary().await?;
        let primary_replicas = primary.replicas().unwrap_or(1);
        let plan = if traffic.canary {
            replica_plan(primary_replicas, traffic.canary_weight)
        } else {
            ReplicaPlan {
                canary: 0,
                apex: ApexTo::Primary,
                effective_percent: 0.0,
            }
        };
        let current = target.canary_size();
        let mut changed = Vec::new();
        if plan.canary > current {
            changed.extend(workloads.scale_canary(&target, plan.canary).await?);
        }
        if plan.canary > 0 {
            // A canary that does not run is not analysed: the checks would judge the primary
            // alone and promote a version no request reached (Flagger checks each tick too).
            workloads.hold_until_canary_ready().await?;
        }
        workloads.select(&target, plan.apex).await?;
        if plan.canary < current {
            changed.extend(workloads.scale_canary(&target, plan.canary).await?);
        }
        Ok(changed)
    }

    /// Promotion: the primary runs the target's template and configs, the apex goes back to
    /// it, then the canary goes.
    async fn promote(&self) -> Result<Vec<String>, TrafficFault> {
        let target = self.workloads.promote_primary().await?;
        self.workloads.select(&target, ApexTo::Primary).await?;
        let changed = self.workloads.scale_canary(&target, 0).await?;
        Ok(changed.into_iter().collect())
    }
}

impl TrafficBackend for ReplicaRatio {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(self.workloads.claim())
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        Box::pin(async move { self.reconcile(traffic).await.map(|_| ()) })
    }

    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(async move {
            if traffic.apply_match || traffic.mirror_weight.basis_points() > 0 {
                return Err(TrafficFault::Refused(
                    "provider kubernetes splits by replicas: it cannot match headers or mirror requests (use provider coalmine)".into(),
                ));
            }
            if traffic.promoted {
                self.promote().await
            } else {
                self.split(traffic).await
            }
        })
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(self.workloads.release())
    }
}
