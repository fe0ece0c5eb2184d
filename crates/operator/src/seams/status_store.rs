//! The state store on Kubernetes: a `Rollout`'s own `status`. Each step is one write of the
//! whole status — Flagger's fields, each check's reading, the judges' evidence and the machine's
//! state — through the status subresource, before the step is carried out; an operator that
//! starts (a restart, a new leader) resumes from it. Then the step's events become Kubernetes
//! Events on the Rollout (on the Canary it was made for, whose status gets Flagger's fields in the
//! same step), as Flagger writes them (reason `Synced`; a failed Event never undoes a
//! saved step).

use coalmine_controller::report::status_json;
use coalmine_controller::state::{StateError, StateStore};
use coalmine_controller::BoxFuture;
use coalmine_rollout::{Event, EventLevel, Outcome, Status};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};

use coalmine_spec::Weight;
use k8s_openapi::api::apps::v1::Deployment;

use crate::crd::Rollout;
use crate::events::Recorder;
use crate::seams::workloads::FIELD_MANAGER;
use crate::status::RolloutStatus;
use crate::workload::replica_plan;

/// Why the status could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StatusStoreError {
    #[error("writing the status of Rollout {name}: {source}")]
    Write { name: String, source: kube::Error },
    #[error("writing the status of the Canary behind Rollout {name}: {source}")]
    Mirror { name: String, source: kube::Error },
    #[error("reading {name}: {source}")]
    Read { name: String, source: kube::Error },
    #[error("Rollout {name}'s status.state is not a state this operator reads: {source}")]
    Unreadable {
        name: String,
        source: serde_json::Error,
    },
}

/// One Rollout's status, read and written through the API server.
pub struct RolloutStatusStore {
    client: kube::Client,
    /// The Rollout as the run started (its name, and the Canary it may be made for).
    rollout: Rollout,
    api: Api<Rollout>,
    name: String,
    /// The rollout as the driver runs it (its status reads like `coalmine status`'s).
    document: coalmine_spec::rollout::Rollout,
    /// The `metadata.generation` the driver runs.
    generation: Option<i64>,
    recorder: Recorder,
    reference: ObjectReference,
    /// Flagger's `lastAppliedSpec` / `lastPromotedSpec`: the revision this run is for, and the
    /// last one promoted before it (the run's own in the step that promotes).
    last_applied_spec: Option<String>,
    last_promoted_spec: Option<String>,
    /// Provider `kubernetes`: the primary Deployment whose size the weight is split against,
    /// so the status says the share whole replicas give (`effectiveWeight`).
    split_against: Option<(Api<Deployment>, String)>,
}

impl RolloutStatusStore {
    /// `instance` names this operator replica in the Events it writes.
    pub fn new(
        client: kube::Client,
        rollout: &Rollout,
        document: coalmine_spec::rollout::Rollout,
        instance: &str,
    ) -> RolloutStatusStore {
        let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
        RolloutStatusStore {
            client: client.clone(),
            rollout: rollout.clone(),
            api: Api::namespaced(client.clone(), &namespace),
            name: rollout.metadata.name.clone().unwrap_or_default(),
            document,
            generation: rollout.metadata.generation,
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "coalmine".into(),
                    instance: Some(instance.into()),
                },
            ),
            reference: crate::canaries::regarding(rollout),
            last_applied_spec: None,
            last_promoted_spec: None,
            split_against: None,
        }
    }

    /// The revisions every write reports: the one this run is for, the last promoted.
    pub fn with_specs(mut self, applied: &str, promoted: Option<&str>) -> Self {
        self.last_applied_spec = Some(applied.to_string());
        self.last_promoted_spec = promoted.map(str::to_string);
        self
    }

    /// Provider `kubernetes`: the weight is carried out in whole replicas beside the primary
    /// Deployment `primary`; each write says the share that gives.
    pub fn with_replica_split(mut self, primary: &str) -> Self {
        self.split_against = Some((
            Api::namespaced(
                self.client.clone(),
                self.rollout
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or_default(),
            ),
            primary.to_string(),
        ));
        self
    }

    /// The share of pods the canary gets for `status`'s weight, with the primary as it is now.
    async fn effective_weight(&self, status: &Status) -> Result<Option<f64>, StatusStoreError> {
        let Some((deployments, primary)) = &self.split_against else {
            return Ok(None);
        };
        if status.promoted || status.canary_weight == Weight::ZERO {
            return Ok(Some(0.0));
        }
        let size = deployments
            .get(primary)
            .await
            .map_err(|source| StatusStoreError::Read {
                name: primary.clone(),
                source,
            })?
            .spec
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        Ok(Some(
            replica_plan(size, status.canary_weight).effective_percent,
        ))
    }

    /// The status a step writes: what `coalmine status --output json` says, in the Rollout's
    /// status fields, with the machine's state to resume from.
    pub fn status_of(&self, status: &Status) -> Result<RolloutStatus, serde_json::Error> {
        let shown = status_json(&self.document, status, None);
        let mut canary: crate::status::CanaryStatus = serde_json::from_value(shown.clone())?;
        canary.last_applied_spec = self.last_applied_spec.clone();
        // In the same write as the promotion: a reader never sees `Succeeded` with the
        // previous revision still recorded as the promoted one.
        canary.last_promoted_spec = if status.outcome == Some(Outcome::Promoted) {
            self.last_applied_spec.clone()
        } else {
            self.last_promoted_spec.clone()
        };
        Ok(RolloutStatus {
            canary,
            observed_generation: self.generation,
            effective_weight: None,
            checks: serde_json::from_value(shown["metrics"].clone())?,
            sequential: Some(shown["sequential"].clone()).filter(|s| !s.is_null()),
            state: Some(serde_json::to_value(status)?),
        })
    }

    async fn write(&self, status: &Status) -> Result<(), StatusStoreError> {
        let name = self.name.clone();
        let mut object = self
            .status_of(status)
            .map_err(|source| StatusStoreError::Unreadable {
                name: name.clone(),
                source,
            })?;
        object.effective_weight = self.effective_weight(status).await?;
        let patch = serde_json::json!({
            "apiVersion": "coalmine.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": { "name": self.name },
            "status": object,
        });
        self.api
            .patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| StatusStoreError::Write {
                name: name.clone(),
                source,
            })?;
        // The Canary's view in the same step: a step is carried out only once both say it.
        crate::canaries::mirror_status(&self.client, &self.rollout, &patch["status"])
            .await
            .map_err(|source| StatusStoreError::Mirror { name, source })
    }

    async fn publish(&self, events: &[Event]) {
        for event in events {
            let event = KubeEvent {
                type_: match event.level {
                    EventLevel::Info => EventType::Normal,
                    EventLevel::Warning => EventType::Warning,
                },
                reason: "Synced".into(),
                note: Some(event.message.clone()),
                action: event.phase.as_str().into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &self.reference).await {
                tracing::warn!(rollout = %self.name, error = %e, "an Event was not written");
            }
        }
    }
}

impl StateStore for RolloutStatusStore {
    fn save<'a>(
        &'a mut self,
        status: &'a Status,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            self.write(status).await.map_err(StateError::new)?;
            self.publish(events).await;
            Ok(())
        })
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<Status>, StateError>> {
        Box::pin(async move {
            let rollout = self.api.get(&self.name).await.map_err(|source| {
                StateError::new(StatusStoreError::Read {
                    name: format!("Rollout {}", self.name),
                    source,
                })
            })?;
            let Some(state) = rollout.status.and_then(|s| s.state) else {
                return Ok(None);
            };
            serde_json::from_value(state).map(Some).map_err(|source| {
                StateError::new(StatusStoreError::Unreadable {
                    name: self.name.clone(),
                    source,
                })
            })
        })
    }
}
