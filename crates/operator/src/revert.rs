//! `revertOnDeletion` (Flagger's field): a rollout deleted with it set leaves the service as it
//! was before Coalmine — the target serving at the primary's size, the apex Service selecting
//! it and kept (no longer owned by the rollout, so the garbage collector leaves it), Coalmine's
//! routers sending everything to it. A finalizer on what the user wrote (the Canary, or the
//! Rollout) holds the deletion until that is done; the primary and the other Services then go
//! with the rollout. Without the field, deleting a rollout deletes its primary (as under
//! Flagger): the README says so.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The finalizer that holds a deletion until the service is reverted.
pub const REVERT_FINALIZER: &str = "coalmine.dev/revert-on-deletion";

/// Whether `meta` holds the revert finalizer.
pub fn holds(meta: &ObjectMeta) -> bool {
    meta.finalizers
        .iter()
        .flatten()
        .any(|f| f == REVERT_FINALIZER)
}

/// The finalizers `meta` must have for a rollout that does (`wanted`) or does not revert on
/// deletion, when they are not what it has.
pub fn finalizers_for(meta: &ObjectMeta, wanted: bool) -> Option<Vec<String>> {
    if holds(meta) == wanted {
        return None;
    }
    let mut finalizers: Vec<String> = meta
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != REVERT_FINALIZER)
        .cloned()
        .collect();
    if wanted {
        finalizers.push(REVERT_FINALIZER.into());
    }
    Some(finalizers)
}

/// A merge patch setting `finalizers`, refused (409) if the object changed since `meta` was
/// read: another writer's finalizer is never dropped.
pub fn finalizers_patch(meta: &ObjectMeta, finalizers: Vec<String>) -> serde_json::Value {
    serde_json::json!({ "metadata": {
        "finalizers": finalizers,
        "resourceVersion": meta.resource_version,
    } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_is_added_and_removed_beside_others() {
        let meta = |f: &[&str]| ObjectMeta {
            finalizers: Some(f.iter().map(|s| s.to_string()).collect()),
            ..ObjectMeta::default()
        };
        assert_eq!(
            finalizers_for(&meta(&["other"]), true),
            Some(vec!["other".to_string(), REVERT_FINALIZER.to_string()])
        );
        assert_eq!(
            finalizers_for(&meta(&["other", REVERT_FINALIZER]), true),
            None
        );
        assert_eq!(
            finalizers_for(&meta(&[REVERT_FINALIZER, "other"]), false),
            Some(vec!["other".to_string()])
        );
        assert_eq!(finalizers_for(&ObjectMeta::default(), false), None);
    }
}
