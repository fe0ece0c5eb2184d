//! Flagger's resources (`flagger.app/v1beta1` `Canary`, `MetricTemplate`, `AlertProvider`) as
//! the operator watches them.
//!
//! The spec is kept as the API server returned it and read into Coalmine's types per object, in
//! reconcile: a Canary Coalmine cannot run (the CRD allows it, Coalmine cannot act on it) then
//! gets a condition and an Event naming the field, while the watch — which every other Canary
//! shares — never fails to decode. The CRDs themselves are Flagger's (`deploy/kubernetes/crds/`).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

use crate::crd::{RolloutSpec, RoutersRef, ServicePort, TrafficProvider, WorkloadRef};
use crate::status::CanaryStatus;

pub const GROUP: &str = "flagger.app";
pub const VERSION: &str = "v1beta1";

/// Declares one Flagger kind: its metadata, the spec as written and (for a Canary) its status.
macro_rules! flagger_resource {
    ($name:ident, $kind:literal, $plural:literal, $status:ty) => {
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            pub metadata: ObjectMeta,
            #[serde(default)]
            pub spec: serde_json::Value,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        impl kube::Resource for $name {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

flagger_resource!(Canary, "Canary", "canaries", CanaryStatus);
flagger_resource!(
    MetricTemplate,
    "MetricTemplate",
    "metrictemplates",
    serde_json::Value
);
flagger_resource!(
    AlertProvider,
    "AlertProvider",
    "alertproviders",
    serde_json::Value
);

impl Canary {
    /// The spec read as Coalmine reads a Canary file, or the first field it cannot use: a
    /// value of the wrong shape, or fields that do not go together (`stepWeights` that fall).
    pub fn read_spec(&self) -> Result<coalmine_spec::flagger::CanarySpec, SpecFieldError> {
        let spec: coalmine_spec::flagger::CanarySpec = serde_path_to_error::deserialize(&self.spec)
            .map_err(|e| {
                let path = e.path().to_string();
                SpecFieldError {
                    field: if path == "." {
                        "spec".into()
                    } else {
                        format!("spec.{path}")
                    },
                    message: e.inner().to_string(),
                }
            })?;
        coalmine_spec::documents::check_analysis(&spec.analysis, "spec.analysis")
            .map_err(|(field, message)| SpecFieldError { field, message })?;
        Ok(spec)
    }
}

/// The Kubernetes side of a Canary's spec — what Coalmine's spec crate leaves alone because a
/// file run has no cluster: the workload, its autoscaler, the Services' port, the provider.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CanaryWorkload {
    target_ref: WorkloadRef,
    #[serde(default)]
    autoscaler_ref: Option<WorkloadRef>,
    #[serde(default)]
    service: Option<ServicePort>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    revert_on_deletion: bool,
    #[serde(default)]
    ingress_ref: Option<WorkloadRef>,
}

impl Canary {
    /// The Canary as the `Rollout` the operator runs for it: the same workload, Services and
    /// analysis. Without `spec.provider`: Coalmine's routers if the Canary names them
    /// (`coalmine.dev/routers`), else `default_provider` (the operator's `--provider`, as
    /// Flagger's `-mesh-provider`). A provider this operator does not drive is refused by
    /// field, never run on the wrong traffic.
    pub fn to_rollout_spec(
        &self,
        default_provider: TrafficProvider,
    ) -> Result<RolloutSpec, SpecFieldError> {
        let read = self.read_spec()?;
        let workload: CanaryWorkload =
            serde_path_to_error::deserialize(&self.spec).map_err(|e| SpecFieldError {
                field: format!("spec.{}", e.path()),
                message: e.inner().to_string(),
            })?;
        // Flagger's CRD has no `coalmine` among its providers: a Canary that names its routers
        // (the annotation) runs on them.
        let routers = self.routers()?;
        let provider = match workload.provider.as_deref() {
            None if routers.is_some() => TrafficProvider::Coalmine,
            None => default_provider,
            Some(name) => match TrafficProvider::from_name(name) {
                Some(provider) => provider,
                None => {
                    return Err(SpecFieldError {
                        field: "spec.provider".into(),
                        message: format!(
                            "provider {name:?} is not one this operator drives; it drives kubernetes (Services and replicas), istio, gatewayapi:v1, gatewayapi:v1beta1, nginx, and Coalmine's routers (leave spec.provider out and annotate the Canary {ROUTERS_ANNOTATION}: <their Service>, or run the operator with --provider coalmine)"
                        ),
                    })
                }
            },
        };
        if !["Deployment", "DaemonSet"].contains(&workload.target_ref.kind.as_str()) {
            return Err(SpecFieldError {
                field: "spec.targetRef.kind".into(),
                message: format!(
                    "{:?}: this operator rolls out Deployments and DaemonSets",
                    workload.target_ref.kind
                ),
            });
        }
        let service = workload.service.ok_or_else(|| SpecFieldError {
            field: "spec.service".into(),
            message: "the Services Coalmine creates need a port: add service.port".into(),
        })?;
        Ok(RolloutSpec {
            target_ref: workload.target_ref,
            autoscaler_ref: workload.autoscaler_ref,
            service,
            provider,
            routers,
            metrics_server: read.metrics_server,
            progress_deadline_seconds: read
                .progress_deadline_seconds
                .map(|s| u32::try_from(s).unwrap_or(u32::MAX)),
            skip_analysis: read.skip_analysis,
            suspend: read.suspend,
            revert_on_deletion: workload.revert_on_deletion,
            ingress_ref: workload.ingress_ref,
            analysis: read.analysis,
        })
    }
}

/// The fields of Flagger's `spec.service` this operator applies; the others are named by
/// [`Canary::ignored_service_fields`].
const APPLIED_SERVICE_FIELDS: &[&str] = &[
    "name",
    "port",
    "targetPort",
    "portName",
    "hosts",
    "gateways",
    "gatewayRefs",
    "timeout",
    "retries",
    "trafficPolicy",
];

impl Canary {
    /// The fields of `spec.service` the Canary sets that this operator does not apply (Istio's
    /// `rewrite`, `headers`, `corsPolicy`, a service-level `match`, …), by path: the routes are
    /// written without them, which the user must be told.
    pub fn ignored_service_fields(&self) -> Vec<String> {
        self.spec["service"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| !APPLIED_SERVICE_FIELDS.contains(&k.as_str()) && !v.is_null())
            .map(|(k, _)| format!("spec.service.{k}"))
            .collect()
    }
}

/// Where a Canary's routers are (provider `coalmine`): Flagger's Canary has no field for it.
pub const ROUTERS_ANNOTATION: &str = "coalmine.dev/routers";
/// Which service of the routers' route table a Canary drives (`/routes/{service}`).
pub const ROUTER_SERVICE_ANNOTATION: &str = "coalmine.dev/router-service";

impl Canary {
    /// The `coalmine.dev/routers` annotation: `<service>` or `<service>:<admin port>`.
    fn routers(&self) -> Result<Option<RoutersRef>, SpecFieldError> {
        let route_service = self.route_service()?;
        let Some(value) = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROUTERS_ANNOTATION))
        else {
            // A route table service alone: the default routers Service carries it.
            return Ok(route_service.map(|route_service| RoutersRef {
                route_service: Some(route_service),
                ..RoutersRef::default()
            }));
        };
        let (service, port) = match value.split_once(':') {
            Some((service, port)) => (service, Some(port)),
            None => (value.as_str(), None),
        };
        let admin_port = port
            .map(|p| p.parse::<u16>())
            .transpose()
            .ok()
            .flatten()
            .filter(|p| *p > 0);
        if coalmine_spec::names::check_name(service, coalmine_spec::names::NameRule::Rollout)
            .is_err()
            || (port.is_some() && admin_port.is_none())
        {
            return Err(SpecFieldError {
                field: format!("metadata.annotations.{ROUTERS_ANNOTATION}"),
                message: format!(
                    "{value:?}: write the routers' Service as <name> or <name>:<admin port>"
                ),
            });
        }
        Ok(Some(RoutersRef {
            service: service.to_string(),
            admin_port,
            route_service,
        }))
    }

    /// The `coalmine.dev/router-service` annotation: the route table service the Canary drives.
    fn route_service(&self) -> Result<Option<String>, SpecFieldError> {
        let Some(name) = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROUTER_SERVICE_ANNOTATION))
        else {
            return Ok(None);
        };
        coalmine_spec::names::check_name(name, coalmine_spec::names::NameRule::Rollout)
            .map_err(|_| SpecFieldError {
                field: format!("metadata.annotations.{ROUTER_SERVICE_ANNOTATION}"),
                message: format!(
                    "{name:?}: a route table service is a DNS-1123 label, as the routers' config names it"
                ),
            })?;
        Ok(Some(name.clone()))
    }
}

/// A field of a resource's spec that Coalmine cannot act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecFieldError {
    /// The field's path, `spec.analysis.metrics[0].templateRef`.
    pub field: String,
    pub message: String,
}
