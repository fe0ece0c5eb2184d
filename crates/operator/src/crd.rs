//! `coalmine.dev/v1alpha1` `Rollout`: what a Flagger `Canary` says (the workload, its service,
//! the provider, the analysis), with Coalmine's whole analysis — the sequential judges, `noData`,
//! `failureCounting`, `rollbackOnAlerts` — which a Canary cannot carry: Flagger's CRD prunes
//! fields it does not declare.

use coalmine_spec::rollout::Analysis;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::{RolloutGroupStatus, RolloutStatus};

// Each printcolumn repeats `type_ = ...`: clippy reads the columns as one attribute list.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "coalmine.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "cmro",
    category = "coalmine",
    doc = "A canary release of a Deployment or DaemonSet, judged by Coalmine: Flagger's Canary fields with Coalmine's analysis.",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Weight", type_ = "number", json_path = ".status.canaryWeight"),
    printcolumn(
        name = "FailedChecks",
        type_ = "integer",
        json_path = ".status.failedChecks",
        priority = "1"
    ),
    printcolumn(
        name = "Interval",
        type_ = "string",
        json_path = ".spec.analysis.interval",
        priority = "1"
    ),
    printcolumn(
        name = "LastTransitionTime",
        type_ = "string",
        json_path = ".status.lastTransitionTime"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The workload whose new versions are rolled out; it stays the user's (Coalmine runs a
    /// `<name>-primary` copy of it), as with Flagger's `targetRef`.
    pub target_ref: WorkloadRef,
    /// Its HorizontalPodAutoscaler (autoscaling/v2): the primary gets a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler_ref: Option<WorkloadRef>,
    /// The Services Coalmine creates: `<name>`, `<name>-primary`, `<name>-canary`.
    pub service: ServicePort,
    /// How traffic is split between the versions.
    #[serde(default)]
    pub provider: TrafficProvider,
    /// Provider `coalmine`: the Service in front of the Coalmine routers, and their admin port
    /// (default: Service `coalmine-router`, its port named `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routers: Option<RoutersRef>,
    /// Provider `nginx`: the user's Ingress (networking.k8s.io/v1) whose backend is the apex
    /// Service; Coalmine writes `<name>-canary` beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_ref: Option<WorkloadRef>,
    /// The Prometheus that inline `query` checks use (Flagger's `metricsServer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_server: Option<String>,
    /// How long a workload may take to become ready before the run fails (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline_seconds: Option<u32>,
    /// Promote as soon as the canary is ready, without analysis.
    #[serde(default)]
    pub skip_analysis: bool,
    /// Freeze the rollout where it is (no ticks, no changes).
    #[serde(default)]
    pub suspend: bool,
    /// On deletion, route everything back to the target and scale it up again.
    #[serde(default)]
    pub revert_on_deletion: bool,
    pub analysis: Analysis,
}

/// A workload or autoscaler in the Rollout's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `apps/v1` (Deployment, DaemonSet) or `autoscaling/v2` (HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub kind: String,
    pub name: String,
}

/// The port the Services expose, as in Flagger's `service`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The apex Service's name (default: the target's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The container port: a number or a named port (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// The Service port's name (default `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// Providers `istio` (the VirtualService's hosts, the apex added) and `gatewayapi` (the
    /// HTTPRoute's hostnames).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Provider `istio`: the VirtualService's gateways (default `mesh`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Provider `gatewayapi`: the Gateways the HTTPRoute attaches to (its parentRefs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_refs: Vec<GatewayRef>,
    /// Providers `istio` (each route's `timeout`) and `gatewayapi` (each rule's request timeout),
    /// as Flagger's `service.timeout`: `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Provider `istio`: each route's `retries` (Istio's HTTPRetry), as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub retries: Option<serde_json::Value>,
    /// Provider `istio`: the DestinationRules' `trafficPolicy` (Istio's TrafficPolicy: TLS mode,
    /// load balancer, connection pool), as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub traffic_policy: Option<serde_json::Value>,
}

/// A structural schema for an object kept as written (its own CRD validates it).
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}

/// A Gateway an HTTPRoute attaches to (Gateway API's ParentReference, as Flagger's
/// `service.gatewayRefs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// How traffic reaches the versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrafficProvider {
    /// The apex Service selects both versions; the weight is the canary's share of replicas.
    #[default]
    Kubernetes,
    /// Coalmine routers in the cluster, driven through their admin API.
    Coalmine,
    /// Istio: a VirtualService weighing `<apex>-primary` and `<apex>-canary`, and their
    /// DestinationRules, as Flagger writes them.
    Istio,
    /// Gateway API (`gateway.networking.k8s.io/v1`): an HTTPRoute's backendRefs' weights.
    #[serde(rename = "gatewayapi:v1")]
    GatewayApi,
    /// The same HTTPRoute at `gateway.networking.k8s.io/v1beta1`.
    #[serde(rename = "gatewayapi:v1beta1")]
    GatewayApiV1beta1,
    /// NGINX ingress: a canary Ingress copied from `ingressRef`, weighed by annotations.
    Nginx,
}

impl TrafficProvider {
    /// As Flagger's `provider` names it.
    pub fn name(self) -> &'static str {
        match self {
            TrafficProvider::Kubernetes => "kubernetes",
            TrafficProvider::Coalmine => "coalmine",
            TrafficProvider::Istio => "istio",
            TrafficProvider::GatewayApi => "gatewayapi:v1",
            TrafficProvider::GatewayApiV1beta1 => "gatewayapi:v1beta1",
            TrafficProvider::Nginx => "nginx",
        }
    }

    /// The provider Flagger's `provider` (or `-mesh-provider`) names, if this operator drives it.
    pub fn from_name(name: &str) -> Option<TrafficProvider> {
        [
            TrafficProvider::Kubernetes,
            TrafficProvider::Coalmine,
            TrafficProvider::Istio,
            TrafficProvider::GatewayApi,
            TrafficProvider::GatewayApiV1beta1,
            TrafficProvider::Nginx,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }

    /// Whether the operator has per-version counts for the built-in checks under this provider:
    /// Coalmine's routers count, a mesh's or ingress's series in Prometheus do; replicas behind
    /// one Service have no per-version series of their own.
    pub fn counts_versions(self) -> bool {
        self != TrafficProvider::Kubernetes
    }
}

/// Where the Coalmine routers' admin APIs are: a Service in the Rollout's namespace, whose
/// EndpointSlices list the router pods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutersRef {
    pub service: String,
    /// The Service's port for the routers' admin API (default: its port named `admin`, or its
    /// only port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_port: Option<u16>,
    /// The service of the routers' route table this rollout drives (their `/routes/{service}`,
    /// the `service` label): one router fleet carries many rollouts, each on its own service
    /// (default: `default`, the routers' single-service table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_service: Option<String>,
}

/// The routers' Service when a rollout names none.
pub const DEFAULT_ROUTERS_SERVICE: &str = "coalmine-router";

impl Default for RoutersRef {
    fn default() -> RoutersRef {
        RoutersRef {
            service: DEFAULT_ROUTERS_SERVICE.into(),
            admin_port: None,
            route_service: None,
        }
    }
}

// `coalmine.dev/v1alpha1` `RolloutGroup`: Rollouts (or Canaries) of one namespace released as
// one — in lock-step or in order — and rolled back together; the spec is the files' own
// (`coalmine_spec::group::GroupSpec`), so both are read and checked by one set of rules.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "coalmine.dev",
    version = "v1alpha1",
    kind = "RolloutGroup",
    namespaced,
    status = "RolloutGroupStatus",
    shortname = "cmrg",
    category = "coalmine",
    doc = "Rollouts or Canaries of one namespace released as one (in lock-step or in order), rolled back together, their users in one cohort.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Members",
        type_ = "string",
        json_path = ".spec.members[*].name"
    ),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason")
)]
pub struct RolloutGroupSpec {
    /// Which rollouts are released as one, and how (the same spec as a file's `RolloutGroup`).
    #[serde(flatten)]
    pub group: coalmine_spec::group::GroupSpec,
}

/// Coalmine's CRDs, as the API server takes them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Rollout::crd(), RolloutGroup::crd()]
}

/// [`crds`] as a YAML stream (what `coalmine crd` prints and `deploy/kubernetes/` holds).
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(|crd| {
            let text = serde_saphyr::to_string(crd).expect("a CRD serializes");
            format!("---\n{text}")
        })
        .collect()
}

impl RolloutGroup {
    /// The group as the rollout crate decides it (its members' names are the Rollouts').
    pub fn to_document(&self) -> coalmine_spec::group::RolloutGroup {
        coalmine_spec::group::RolloutGroup {
            api_version: coalmine_spec::group::RolloutGroup::API_VERSION.to_string(),
            kind: coalmine_spec::group::RolloutGroup::KIND.to_string(),
            metadata: coalmine_spec::rollout::Metadata {
                name: self.metadata.name.clone().unwrap_or_default(),
                namespace: self.metadata.namespace.clone(),
                labels: self.metadata.labels.clone().unwrap_or_default(),
                annotations: Default::default(),
            },
            spec: self.spec.group.clone(),
        }
    }
}

impl Rollout {
    /// The rollout as Coalmine's controller runs it: the analysis and its settings; where the
    /// traffic goes is the operator's business (its traffic backend), not the document's.
    pub fn to_document(&self) -> coalmine_spec::rollout::Rollout {
        let spec = &self.spec;
        coalmine_spec::rollout::Rollout {
            api_version: coalmine_spec::rollout::API_VERSION.to_string(),
            kind: "Rollout".to_string(),
            metadata: coalmine_spec::rollout::Metadata {
                name: self.metadata.name.clone().unwrap_or_default(),
                namespace: self.metadata.namespace.clone(),
                labels: self.metadata.labels.clone().unwrap_or_default(),
                annotations: Default::default(),
            },
            spec: coalmine_spec::rollout::RolloutSpec {
                routers: Vec::new(),
                router: None,
                router_service: spec.routers.as_ref().and_then(|r| r.route_service.clone()),
                cohort: None,
                service: Some(
                    spec.service
                        .name
                        .clone()
                        .unwrap_or_else(|| spec.target_ref.name.clone()),
                ),
                stable: None,
                canary: None,
                flag: None,
                progress_deadline_seconds: spec.progress_deadline_seconds.map_or(
                    coalmine_spec::rollout::DEFAULT_PROGRESS_DEADLINE_SECONDS,
                    u64::from,
                ),
                skip_analysis: spec.skip_analysis,
                suspend: spec.suspend,
                preview: Vec::new(),
                analysis: spec.analysis.clone(),
            },
        }
    }
}
