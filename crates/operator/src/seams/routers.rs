//! Provider `coalmine`: Coalmine routers running in the cluster weigh the traffic, as a mesh
//! does under Flagger. The operator finds them through a Service (its EndpointSlices: one admin
//! address per ready router pod) and drives each through its admin API with the controller's own
//! routers backend, pointing them at the `-primary` and `-canary` Services (by cluster IP, so
//! kube-proxy spreads each version's share over its pods); their `/stats` are the observation
//! source, so the built-in checks and the sequential judges work as off Kubernetes.
//!
//! The workloads are Flagger's ([`Workloads`], the apex selecting the primary): the canary is
//! scaled from 0 to carry its share — as many pods as its weight needs beside the primary's, at
//! least one — and is ready before the routers send it more; a rollback routes everything to the
//! primary, then scales the canary to 0. Promotion runs the new version on the primary, waits for
//! it, routes everything to it, then scales the canary to 0.

use std::sync::Arc;

use coalmine_controller::traffic::TrafficBackend;
use coalmine_controller::BoxFuture;
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::HttpUrl;
use coalmine_spec::Weight;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use crate::crd::RoutersRef;
use crate::seams::workloads::Workloads;
use crate::workload::Workload;

/// The label an EndpointSlice carries naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything on the primary: what the routers carry outside a canary's analysis.
const ALL_ON_PRIMARY: Traffic = Traffic {
    promoted: false,
    canary: false,
    canary_weight: Weight::ZERO,
    apply_match: false,
    mirror_weight: Weight::ZERO,
};

/// Where a rollout's routers and versions are.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    /// Each ready router pod's admin API.
    pub admins: Vec<HttpUrl>,
    /// The `-primary` and `-canary` Services, as the routers reach them.
    pub primary: HttpUrl,
    pub canary: HttpUrl,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// The rollout names something that is not there or not usable: the user's to fix.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Not yet (no router ready, the Services not made yet): held and looked at again.
    #[error("{0}")]
    Waiting(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Finds the routers behind `routers` (a Service in `namespace`) and the version Services of
/// `apex` on `port`.
pub async fn locate(
    client: &kube::Client,
    namespace: &str,
    routers: &RoutersRef,
    apex: &str,
    port: u16,
) -> Result<Located, LocateError> {
    Ok(Located {
        admins: find_routers(client, namespace, routers).await?,
        primary: service_url(client, namespace, &format!("{apex}-primary"), port).await?,
        canary: service_url(client, namespace, &format!("{apex}-canary"), port).await?,
    })
}

/// Each ready router pod's admin API behind `routers` (a Service in `namespace`).
pub async fn find_routers(
    client: &kube::Client,
    namespace: &str,
    routers: &RoutersRef,
) -> Result<Vec<HttpUrl>, LocateError> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let invalid = |field: &str, message: String| LocateError::Invalid {
        field: format!("spec.routers.{field}"),
        message,
    };
    let service = services.get_opt(&routers.service).await?.ok_or_else(|| {
        invalid(
            "service",
            format!(
                "Service {namespace}/{} does not exist: provider coalmine finds the Coalmine routers' admin API through it",
                routers.service
            ),
        )
    })?;
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let admin_port = match routers.admin_port {
        Some(wanted) => ports.iter().find(|p| p.port == i32::from(wanted)),
        None => ports
            .iter()
            .find(|p| p.name.as_deref() == Some("admin"))
            .or_else(|| (ports.len() == 1).then(|| &ports[0])),
    }
    .ok_or_else(|| {
        let listed: Vec<String> = ports
            .iter()
            .map(|p| format!("{} ({})", p.port, p.name.as_deref().unwrap_or("unnamed")))
            .collect();
        invalid(
            "adminPort",
            format!(
                "Service {namespace}/{} has no {} among its ports [{}]",
                routers.service,
                routers
                    .admin_port
                    .map_or("port named admin".to_string(), |p| format!("port {p}")),
                listed.join(", ")
            ),
        )
    })?;
    let port_name = admin_port.name.clone().unwrap_or_default();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{SERVICE_NAME_LABEL}={}", routers.service);
    let mut admins = Vec::new();
    for slice in slices
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        // An EndpointSlice's ports are the pods' ports, named as the Service's.
        let Some(pod_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.clone().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            // kube-proxy uses an endpoint's first address; so do the routers' clients.
            let Some(address) = endpoint.addresses.first().filter(|_| ready) else {
                continue;
            };
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            if let Ok(url) = HttpUrl::parse(&format!("http://{host}:{pod_port}")) {
                admins.push(url);
            }
        }
    }
    admins.sort_by_key(ToString::to_string);
    admins.dedup();
    if admins.is_empty() {
        return Err(LocateError::Waiting(format!(
            "no ready Coalmine router behind Service {namespace}/{} (EndpointSlices labelled {selector}, port {})",
            routers.service,
            if port_name.is_empty() { "unnamed" } else { &port_name }
        )));
    }
    Ok(admins)
}

/// Service `name` as the routers reach it: its cluster IP on `port`.
pub async fn service_url(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    port: u16,
) -> Result<HttpUrl, LocateError> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = services.get_opt(name).await?.ok_or_else(|| {
        LocateError::Waiting(format!("Service {namespace}/{name} is not made yet"))
    })?;
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or_else(|| {
            LocateError::Waiting(format!("Service {namespace}/{name} has no cluster IP"))
        })?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    HttpUrl::parse(&format!("http://{host}:{port}"))
        .map_err(|e| LocateError::Waiting(format!("Service {namespace}/{name}: {e}")))
}

/// The routers weigh; the workloads (Deployments or DaemonSets) run the versions.
pub struct CoalmineRouters<W: Workload> {
    workloads: Workloads<W>,
    /// The controller's routers backend, its stable upstream the primary's Service and its
    /// canary the canary's.
    routers: Arc<dyn TrafficBackend>,
}

impl<W: Workload> CoalmineRouters<W> {
    pub fn new(workloads: Workloads<W>, routers: Arc<dyn TrafficBackend>) -> CoalmineRouters<W> {
        CoalmineRouters { workloads, routers }
    }

    /// Capacity first, then traffic: the canary runs enough pods for its share before the
    /// routers send it that share.
    async fn analyse(&self, traffic: &Traffic) -> Result<Vec<String>, TrafficFault> {
        let target = self.workloads.target().await?;
        let primary = self.workloads.primary().await?;
        // Pods in proportion to the weight, as many per request as the primary's; never more
        // than the primary has (100 % on the canary needs the primary's capacity, not more),
        // and one at least (a header match or a mirror at weight 0 still reaches it). A
        // DaemonSet's canary runs on every node.
        let wanted = W::canary_capacity(&primary, traffic.canary_weight);
        let mut changed: Vec<String> = self
            .workloads
            .scale_canary(&target, wanted)
            .await?
            .into_iter()
            .collect();
        self.workloads.hold_until_canary_ready().await?;
        changed.extend(self.routers.reconcile(traffic).await?);
        Ok(changed)
    }

    /// Everything back on the primary, then the canary's pods go.
    async fn all_on_primary(&self) -> Result<Vec<String>, TrafficFault> {
        let mut changed = self.routers.reconcile(&ALL_ON_PRIMARY).await?;
        let target = self.workloads.target().await?;
        changed.extend(self.workloads.scale_canary(&target, 0).await?);
        Ok(changed)
    }
}

impl<W: Workload> TrafficBackend for CoalmineRouters<W> {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async move {
            self.workloads.claim().await?;
            self.routers.claim().await
        })
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        Box::pin(async move { self.reconcile(traffic).await.map(|_| ()) })
    }

    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(async move {
            if traffic.promoted {
                // The canary keeps its share until the primary runs the new version.
                self.workloads.promote_primary().await?;
                self.all_on_primary().await
            } else if traffic.canary {
                self.analyse(traffic).await
            } else {
                self.all_on_primary().await
            }
        })
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async move {
            let routers = self.routers.release().await;
            self.workloads.release().await?;
            routers
        })
    }
}
