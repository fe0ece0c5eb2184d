//! What a user asks of a release in progress, the Kubernetes way: an annotation on what they
//! wrote (the Canary or the Rollout), which the operator carries out once and then removes.
//!
//! ```text
//! kubectl annotate canary/payment-service coalmine.dev/request=abort
//! kubectl annotate canary/payment-service coalmine.dev/request=promote
//! ```
//!
//! Pausing is `spec.suspend` (Flagger's field), not a request: it is state, kept in the spec.
//! Pure: metadata in, a request out.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The annotation a request is written in.
pub const REQUEST_ANNOTATION: &str = "coalmine.dev/request";

/// What the annotation asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Skip the remaining steps: promote now.
    Promote,
    /// Roll back now.
    Abort,
    /// A value that is neither: told, then removed.
    Unknown(String),
}

/// The request in `meta`, and who wrote it (the field manager that owns the annotation, such
/// as `kubectl-annotate`), if any.
pub fn request_of(meta: &ObjectMeta) -> Option<(Request, Option<String>)> {
    let value = meta.annotations.as_ref()?.get(REQUEST_ANNOTATION)?;
    let request = match value.trim() {
        "promote" => Request::Promote,
        "abort" => Request::Abort,
        other => Request::Unknown(other.to_string()),
    };
    let by = writer_of(meta, &["metadata", "annotations", REQUEST_ANNOTATION]);
    Some((request, by))
}

/// Who last wrote the field at `path` (`["spec", "suspend"]`): the field manager that owns it
/// (`kubectl-annotate`, `kubectl-edit`, a person signed in to the dashboard), if any.
pub fn writer_of(meta: &ObjectMeta, path: &[&str]) -> Option<String> {
    meta.managed_fields.iter().flatten().find_map(|entry| {
        let mut fields = &entry.fields_v1.as_ref()?.0;
        for part in path {
            fields = fields.get(format!("f:{part}"))?;
        }
        entry.manager.clone()
    })
}

/// The merge patch that removes the request once carried out.
pub fn removal() -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {REQUEST_ANNOTATION: null}}})
}
