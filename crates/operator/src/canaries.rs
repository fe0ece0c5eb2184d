//! Flagger's `Canary`, run as the `Rollout` it describes.
//!
//! For each Canary the operator keeps a `coalmine.dev` Rollout of the same name, owned by the
//! Canary (its controller owner reference) and written with Coalmine's field manager: the same
//! workload, Services and analysis ([`Canary::to_rollout_spec`]). The Rollout's run is the one
//! the operator runs for every Rollout; its status is the durable record (Flagger's CRD prunes
//! what a Canary's status does not declare: the judges' evidence, the state to resume from).
//! Every status write is mirrored onto the Canary in Flagger's fields, in the same step, and
//! the Events go to the Canary: `kubectl get canaries`, `kubectl wait
//! --for=condition=promoted` and `kubectl describe canary` read as they do under Flagger.
//!
//! A Canary Coalmine cannot run is told on the Canary (a condition, an Event) by field; a
//! Rollout already there that is not the Canary's is never taken over.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::Resource;

use crate::crd::Rollout;
use crate::flagger::{Canary, GROUP, VERSION};
use crate::run::{say_invalid, Context, ReconcileError};
use crate::seams::workloads::FIELD_MANAGER;

/// The status fields a Canary declares (Flagger's `CanaryStatus`); anything else would be pruned.
const FLAGGER_STATUS_FIELDS: [&str; 9] = [
    "phase",
    "canaryWeight",
    "failedChecks",
    "iterations",
    "lastAppliedSpec",
    "lastPromotedSpec",
    "lastTransitionTime",
    "conditions",
    "trackedConfigs",
];

/// The Canary a Rollout was made for: its controller owner reference, when that is a Canary.
pub fn owning_canary(rollout: &Rollout) -> Option<&OwnerReference> {
    rollout
        .metadata
        .owner_references
        .as_deref()?
        .iter()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == "Canary"
                && o.api_version.split('/').next() == Some(GROUP)
        })
}

/// What Events about a rollout regard: the Canary it was made for, else the Rollout.
pub fn regarding(rollout: &Rollout) -> ObjectReference {
    match owning_canary(rollout) {
        Some(owner) => ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: rollout.metadata.namespace.clone(),
            uid: Some(owner.uid.clone()),
            ..ObjectReference::default()
        },
        None => rollout.object_ref(&()),
    }
}

/// Writes Flagger's part of `status` (a Rollout's status fields, whole or some) onto the Canary
/// the Rollout was made for, if any.
pub async fn mirror_status(
    client: &kube::Client,
    rollout: &Rollout,
    status: &serde_json::Value,
) -> Result<(), kube::Error> {
    let Some(owner) = owning_canary(rollout) else {
        return Ok(());
    };
    let flagger: serde_json::Map<String, serde_json::Value> = status
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| FLAGGER_STATUS_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if flagger.is_empty() {
        return Ok(());
    }
    let canaries: Api<Canary> = Api::namespaced(
        client.clone(),
        rollout.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let patch = serde_json::json!({ "status": flagger });
    canaries
        .patch_status(&owner.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// What a Rollout was written from.
pub enum Origin {
    /// The user wrote the Rollout.
    Itself,
    /// A Canary, still there.
    Canary(Box<Canary>),
    /// A Canary now gone (deleted, or deleted and made again: another uid). Then the Rollout
    /// goes too — whether or not a garbage collector runs — and its run takes the canary off.
    Gone,
}

/// Where `rollout` comes from, read now.
pub async fn origin(client: &kube::Client, rollout: &Rollout) -> Result<Origin, kube::Error> {
    let Some(owner) = owning_canary(rollout) else {
        return Ok(Origin::Itself);
    };
    let canaries: Api<Canary> = Api::namespaced(
        client.clone(),
        rollout.metadata.namespace.as_deref().unwrap_or_default(),
    );
    Ok(match canaries.get_opt(&owner.name).await? {
        Some(c) if c.metadata.uid.as_deref() == Some(owner.uid.as_str()) => {
            Origin::Canary(Box::new(c))
        }
        _ => Origin::Gone,
    })
}

pub(crate) async fn reconcile(
    cached: Arc<Canary>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = cached.metadata.namespace.clone().unwrap_or_default();
    let name = cached.metadata.name.clone().unwrap_or_default();
    let canaries: Api<Canary> = Api::namespaced(context.client.clone(), &namespace);
    let Some(canary) = canaries.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if canary.metadata.deletion_timestamp.is_some() {
        // Being deleted: its Rollout stays as it is (a revert, if asked for, runs on it).
        return Ok(Action::await_change());
    }
    let owner = canary
        .controller_owner_ref(&())
        .expect("a Canary from the API server has a name and uid");
    let rollouts: Api<Rollout> = Api::namespaced(context.client.clone(), &namespace);
    let existing = rollouts.get_opt(&name).await?;
    if let Some(other) = &existing {
        if owning_canary(other).map(|o| &o.uid) != Some(&owner.uid) {
            let said = format!(
                "metadata.name: Rollout {namespace}/{name} exists and is not this Canary's; rename one of them"
            );
            say_invalid(&context, &canaries, &canary, canary.object_ref(&()), said).await?;
            return Ok(Action::await_change());
        }
    }
    let spec = match canary.to_rollout_spec(context.default_provider) {
        Ok(spec) => spec,
        Err(e) => {
            // The Rollout as it was (a run in progress goes on): a bad edit changes nothing.
            say_invalid(
                &context,
                &canaries,
                &canary,
                canary.object_ref(&()),
                e.to_string(),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    if let Some(rollout) = existing.as_ref().filter(|r| r.spec == spec) {
        // An edit Coalmine could not run, undone: the Canary says the Rollout's state again.
        let said_invalid = canary
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "InvalidSpec"));
        if let (true, Some(status)) = (said_invalid, &rollout.status) {
            mirror_status(&context.client, rollout, &serde_json::to_value(status)?).await?;
        }
        return Ok(Action::await_change());
    }
    let rollout = serde_json::json!({
        "apiVersion": "coalmine.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "ownerReferences": [owner],
            "labels": { "coalmine.dev/from": format!("canary.{GROUP}.{VERSION}") },
        },
        "spec": spec,
    });
    rollouts
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&rollout),
        )
        .await?;
    tracing::info!(canary = %format!("{namespace}/{name}"), "Rollout written from the Canary");
    let ignored = canary.ignored_service_fields();
    if !ignored.is_empty() {
        crate::run::tell(
            &context,
            &canary.object_ref(&()),
            kube::runtime::events::EventType::Warning,
            "FieldNotApplied",
            format!(
                "{}: not applied by this operator; the routes are written without {}",
                ignored.join(", "),
                if ignored.len() == 1 { "it" } else { "them" }
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}
