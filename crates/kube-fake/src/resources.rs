//! The resource types the fake serves (built-ins and those CRDs define) and discovery over them.

use std::sync::Arc;

use coalmine_spec::schema::CrdSchema;
use serde_json::{json, Value};

/// One served resource, e.g. `apps/v1` `deployments`.
#[derive(Debug)]
pub struct ResourceType {
    pub group: String,
    /// Served versions, the preferred (storage) one first.
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    pub scale: bool,
    /// Whether writes that change more than metadata and status bump `metadata.generation`
    /// (the built-ins whose strategies do: workloads, PDBs, CRDs; and every custom resource).
    pub generation: bool,
    /// For custom resources: the schema of each served version.
    pub schemas: Vec<(String, Arc<CrdSchema>)>,
    /// The CRD that defines it (`canaries.flagger.app`), if any.
    pub crd: Option<String>,
}

impl ResourceType {
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn schema(&self, version: &str) -> Option<&CrdSchema> {
        self.schemas
            .iter()
            .find(|(v, _)| v == version)
            .map(|(_, s)| s.as_ref())
    }

    /// Same group and plural: the key objects are stored under, whatever the version.
    pub fn same_resource(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }
}

struct Builtin {
    group_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
    scale: bool,
    generation: bool,
}

const fn builtin(
    group_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
) -> Builtin {
    Builtin {
        group_version,
        plural,
        kind,
        namespaced,
        short_names,
        status: false,
        scale: false,
        generation: false,
    }
}

const fn with_status(b: Builtin) -> Builtin {
    Builtin { status: true, ..b }
}

const fn workload(b: Builtin) -> Builtin {
    Builtin {
        status: true,
        generation: true,
        ..b
    }
}

const fn scalable(b: Builtin) -> Builtin {
    Builtin { scale: true, ..b }
}

const BUILTINS: &[Builtin] = &[
    with_status(builtin("v1", "namespaces", "Namespace", false, &["ns"])),
    with_status(builtin("v1", "services", "Service", true, &["svc"])),
    builtin("v1", "configmaps", "ConfigMap", true, &["cm"]),
    builtin("v1", "secrets", "Secret", true, &[]),
    builtin("v1", "events", "Event", true, &["ev"]),
    with_status(builtin("v1", "pods", "Pod", true, &["po"])),
    builtin("v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
    builtin("v1", "endpoints", "Endpoints", true, &["ep"]),
    scalable(workload(builtin(
        "apps/v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
    ))),
    workload(builtin("apps/v1", "daemonsets", "DaemonSet", true, &["ds"])),
    scalable(workload(builtin(
        "apps/v1",
        "replicasets",
        "ReplicaSet",
        true,
        &["rs"],
    ))),
    scalable(workload(builtin(
        "apps/v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
    ))),
    with_status(builtin(
        "autoscaling/v2",
        "horizontalpodautoscalers",
        "HorizontalPodAutoscaler",
        true,
        &["hpa"],
    )),
    builtin("coordination.k8s.io/v1", "leases", "Lease", true, &[]),
    with_status(builtin(
        "networking.k8s.io/v1",
        "ingresses",
        "Ingress",
        true,
        &["ing"],
    )),
    builtin("events.k8s.io/v1", "events", "Event", true, &["ev"]),
    builtin(
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &[],
    ),
    workload(builtin(
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
    )),
    builtin("rbac.authorization.k8s.io/v1", "roles", "Role", true, &[]),
    builtin(
        "rbac.authorization.k8s.io/v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
    ),
    builtin(
        "rbac.authorization.k8s.io/v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
    ),
    builtin(
        "rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
    ),
    workload(builtin(
        "policy/v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
        &["pdb"],
    )),
];

pub fn builtins() -> Vec<Arc<ResourceType>> {
    BUILTINS
        .iter()
        .map(|b| {
            let (group, version) = b
                .group_version
                .rsplit_once('/')
                .unwrap_or(("", b.group_version));
            Arc::new(ResourceType {
                group: group.to_owned(),
                versions: vec![version.to_owned()],
                plural: b.plural.to_owned(),
                singular: b.kind.to_lowercase(),
                kind: b.kind.to_owned(),
                namespaced: b.namespaced,
                short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                categories: Vec::new(),
                status: b.status,
                scale: b.scale,
                generation: b.generation,
                schemas: Vec::new(),
                crd: None,
            })
        })
        .collect()
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/apis`: every group with its versions.
pub fn group_list(types: &[Arc<ResourceType>]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        let at = match groups.iter().position(|(g, _)| *g == t.group) {
            Some(at) => at,
            None => {
                groups.push((t.group.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        for v in &t.versions {
            if !groups[at].1.contains(v) {
                groups[at].1.push(v.clone());
            }
        }
    }
    let groups: Vec<Value> = groups
        .iter()
        .map(|(group, versions)| api_group(group, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions,
        "preferredVersion": versions[0],
    })
}

/// `/api/v1` or `/apis/{group}/{version}`; `None` when nothing is served there.
pub fn resource_list(types: &[Arc<ResourceType>], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for t in types
        .iter()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
    {
        resources.push(json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": VERBS,
            "shortNames": t.short_names,
            "categories": t.categories,
        }));
        let sub_verbs = ["get", "patch", "update"];
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": sub_verbs,
            }));
        }
        if t.scale {
            resources.push(json!({
                "name": format!("{}/scale", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": sub_verbs,
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}
