//! Provider `coalmine`: Coalmine routers running in the cluster weigh the traffic, as a mesh
//! does under Flagger. The operator finds them through a Service (its EndpointSlices: one admin
//! address per ready router pod) and drives each through its admin API with the controller's own
//! routers backend, pointing them at the `-primary` and `-canary` Services (by cluster IP, so
//! kube-proxy spreads each version's share over its pods); their `/stats` are the observation
//! source, so the built-in checks and the sequential judges work as off Kubernetes.
//!
//! The workloads are Flagger's, and the routers weigh in front of them as any provider's objects
//! do ([`crate::seams::routed::Routed`]: the canary scaled and ready before it gets its share).

use coalmine_spec::rollout::HttpUrl;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use crate::crd::RoutersRef;

/// The label an EndpointSlice carries naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
        for authority in ready_pods(&slice, &port_name) {
            if let Ok(url) = HttpUrl::parse(&format!("http://{authority}")) {
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

/// The ready pods of an EndpointSlice as `host:port` (IPv6 bracketed), on the pods' port for the
/// Service port named `port_name` (an EndpointSlice's ports are the pods', named as the
/// Service's). An endpoint whose `ready` is unset is ready (the API's documented default for
/// consumers); its first address is the one kube-proxy uses, so the one used here. A slice of
/// FQDNs gives none.
pub(crate) fn ready_pods<'s>(
    slice: &'s EndpointSlice,
    port_name: &str,
) -> impl Iterator<Item = String> + 's {
    let pod_port = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or_default() == port_name)
        .and_then(|p| p.port)
        .filter(|_| matches!(slice.address_type.as_str(), "IPv4" | "IPv6"));
    slice
        .endpoints
        .iter()
        .filter(move |_| pod_port.is_some())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.addresses.first())
        .map(move |address| {
            let port = pod_port.unwrap_or_default();
            if address.contains(':') {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            }
        })
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
