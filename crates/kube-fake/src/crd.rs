//! CustomResourceDefinitions: checked on write, then their resources are served (with their
//! schemas) until the CRD is deleted, which deletes the custom resources too (the API server's
//! own cleanup, which envtest has as well).

use std::sync::Arc;

use coalmine_spec::schema::CrdSchema;
use serde_json::{json, Value};

use crate::clock;
use crate::error::{ApiError, Cause, Subject};
use crate::resources::ResourceType;
use crate::store::{ChangeKind, Store};

fn invalid(field: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: field.to_owned(),
        message,
    }
}

fn required(field: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        field: field.to_owned(),
        message: "Required value".into(),
    }
}

/// Checks a CRD as the API server does for what serving it needs, and sets the status its
/// controllers would (`NamesAccepted` and `Established` True, `acceptedNames`, `storedVersions`).
pub fn admit(crd: &mut Value, subject: &Subject) -> Result<(), ApiError> {
    let causes = check(crd);
    if !causes.is_empty() {
        return Err(ApiError::invalid(
            "CustomResourceDefinition",
            subject,
            causes,
        ));
    }
    let spec = &crd["spec"];
    let names = &spec["names"];
    let kind = names["kind"].as_str().unwrap_or_default();
    let accepted = json!({
        "plural": names["plural"],
        "singular": names["singular"].as_str().map_or_else(|| kind.to_lowercase(), str::to_owned),
        "kind": kind,
        "listKind": names["listKind"].as_str().map_or_else(|| format!("{kind}List"), str::to_owned),
        "shortNames": names.get("shortNames").cloned().unwrap_or(json!([])),
        "categories": names.get("categories").cloned().unwrap_or(json!([])),
    });
    let storage: Vec<Value> = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == true)
        .map(|v| v["name"].clone())
        .collect();
    let now = clock::now_rfc3339();
    let condition = |ty: &str, reason: &str, message: &str| json!({"type": ty, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    crd["status"] = json!({
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": accepted,
        "storedVersions": storage,
    });
    Ok(())
}

fn check(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    if group.is_empty() {
        causes.push(required("spec.group"));
    }
    if plural.is_empty() {
        causes.push(required("spec.names.plural"));
    }
    if spec["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        causes.push(required("spec.names.kind"));
    }
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if name != format!("{plural}.{group}") {
        causes.push(invalid(
            "metadata.name",
            format!(
                "Invalid value: {}: must be spec.names.plural+\".\"+spec.group",
                Value::from(name)
            ),
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: "spec.scope".into(),
            message: format!(
                "Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"",
                Value::from(other)
            ),
        }),
        None => causes.push(required("spec.scope")),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(invalid(
            "spec.versions",
            "Invalid value: null: must have exactly one version marked as storage version".into(),
        ));
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if !versions.is_empty() && storage != 1 {
        causes.push(invalid(
            "spec.versions",
            format!(
                "Invalid value: {}: must have exactly one version marked as storage version",
                Value::from(versions.len())
            ),
        ));
    }
    for (i, version) in versions.iter().enumerate() {
        let at = format!("spec.versions[{i}].schema.openAPIV3Schema");
        match version["schema"].get("openAPIV3Schema") {
            None => causes.push(Cause {
                reason: "FieldValueRequired",
                field: at,
                message: "Required value: schemas are required".into(),
            }),
            Some(schema) => {
                if let Err(e) = CrdSchema::from_openapi(schema) {
                    causes.push(invalid(&at, format!("Invalid value: \"object\": {e}")));
                }
            }
        }
    }
    causes
}

/// Serves (or re-serves, after an update) the resource a stored CRD defines.
pub fn register(store: &mut Store, crd: &Value) {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut versions = Vec::new();
    let mut schemas = Vec::new();
    let (mut status, mut scale) = (false, false);
    for version in spec["versions"].as_array().into_iter().flatten() {
        if version["served"] != true {
            continue;
        }
        let name = version["name"].as_str().unwrap_or_default().to_owned();
        if version["storage"] == true {
            versions.insert(0, name.clone());
        } else {
            versions.push(name.clone());
        }
        status |= version["subresources"].get("status").is_some();
        scale |= version["subresources"].get("scale").is_some();
        if let Ok(schema) = CrdSchema::from_openapi(&version["schema"]["openAPIV3Schema"]) {
            schemas.push((name, Arc::new(schema)));
        }
    }
    let kind = names["kind"].as_str().unwrap_or_default().to_owned();
    let rt = ResourceType {
        group: spec["group"].as_str().unwrap_or_default().to_owned(),
        versions,
        plural: names["plural"].as_str().unwrap_or_default().to_owned(),
        singular: names["singular"]
            .as_str()
            .map_or_else(|| kind.to_lowercase(), str::to_owned),
        kind,
        namespaced: spec["scope"] == "Namespaced",
        short_names: strings(&names["shortNames"]),
        categories: strings(&names["categories"]),
        status,
        scale,
        generation: true,
        schemas,
        crd: crd["metadata"]["name"].as_str().map(str::to_owned),
    };
    store
        .types
        .retain(|t| !t.same_resource(&rt.group, &rt.plural));
    if !rt.versions.is_empty() {
        store.types.push(Arc::new(rt));
    }
}

/// Stops serving a deleted CRD's resource and deletes its objects (with DELETED events).
pub fn unregister(store: &mut Store, crd: &Value) {
    let group = crd["spec"]["group"].as_str().unwrap_or_default();
    let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
    let Some(rt) = store
        .types
        .iter()
        .find(|t| t.same_resource(group, plural))
        .cloned()
    else {
        return;
    };
    let keys: Vec<_> = store.list(&rt, None).map(|(k, _)| k.clone()).collect();
    for key in keys {
        if let Some(old) = store.objects.remove(&key) {
            let rv = store.next_rv();
            let mut gone = old.clone();
            gone["metadata"]["resourceVersion"] = rv.to_string().into();
            store.record(&rt, ChangeKind::Deleted, gone, Some(old));
        }
    }
    store.types.retain(|t| !t.same_resource(group, plural));
}
