//! Coalmine's router as a Gateway API implementation (`coalmine proxy --kubernetes`): it
//! watches GatewayClasses, Gateways, HTTPRoutes, Services and EndpointSlices, programs its route
//! table from them ([`translate`], pure) and writes each object's status conditions.
//!
//! The table is swapped whole at most every [`SETTLE`] after a change, so a burst of events
//! (a rollout's HttpRoute patch and its EndpointSlices) is one swap; nothing is programmed
//! before every watch has listed its kind once, so a starting router never serves a half-read
//! cluster. Every router replica programs its own table and writes the same statuses (a status
//! equal to the object's is not written again).

pub mod translate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use coalmine_contract::RoutesDoc;
use futures::StreamExt;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::HttpRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};

use translate::{conditions_json, translate, ClusterView, ObjectState, RouteState, Translation};

/// How long changes are gathered before the table is computed again.
pub const SETTLE: Duration = Duration::from_millis(50);
/// How often the table and statuses are computed without a change (a status write that
/// failed is retried then).
const RESYNC: Duration = Duration::from_secs(10);

/// Where a computed table goes: the router's own table (the binary swaps it in); answers the
/// table's generation, or why it was refused.
pub type TableSink = Arc<dyn Fn(Vec<RoutesDoc>) -> Result<u64, String> + Send + Sync>;

pub struct GatewaySettings {
    /// The `controllerName` this router answers to (default [`translate::CONTROLLER_NAME`]).
    pub controller_name: String,
    /// The address clients reach the Gateway at, written to each Gateway's `status.addresses`.
    pub address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("watching {kind}: {message}")]
    Watch { kind: &'static str, message: String },
}

struct Stores {
    classes: Store<GatewayClass>,
    gateways: Store<Gateway>,
    routes: Store<HttpRoute>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    /// `None` when the cluster has no ReferenceGrant CRD (then no cross-namespace reference is
    /// allowed).
    grants: Option<Store<ReferenceGrant>>,
}

impl Stores {
    /// What the translation reads. Of Services and EndpointSlices only those the routes name
    /// (as backends or mirrors) are copied: a cluster's thousands of others, and their endpoint
    /// churn, cost nothing but the event.
    fn view(&self, last_accepted: HashMap<(String, String), HttpRoute>) -> ClusterView {
        fn all<K: Clone + Resource>(s: &Store<K>) -> Vec<K>
        where
            K::DynamicType: std::hash::Hash + Eq + Clone,
        {
            s.state().iter().map(|k| (**k).clone()).collect()
        }
        let routes = all(&self.routes);
        let mut named = std::collections::HashSet::new();
        for route in routes.iter().chain(last_accepted.values()) {
            let namespace = route.namespace().unwrap_or_default();
            for (name, ns) in translate::backend_names(route) {
                named.insert((ns.unwrap_or_else(|| namespace.clone()), name));
            }
        }
        let key = |ns: Option<String>, name: String| (ns.unwrap_or_default(), name);
        let services = self
            .services
            .state()
            .iter()
            .filter(|s| named.contains(&key(s.namespace(), s.name_any())))
            .map(|s| (**s).clone())
            .collect();
        let slices = self
            .slices
            .state()
            .iter()
            .filter(|s| {
                s.labels()
                    .get("kubernetes.io/service-name")
                    .is_some_and(|service| named.contains(&key(s.namespace(), service.clone())))
            })
            .map(|s| (**s).clone())
            .collect();
        ClusterView {
            classes: all(&self.classes),
            gateways: all(&self.gateways),
            routes,
            services,
            slices,
            namespaces: all(&self.namespaces),
            grants: self.grants.as_ref().map(all).unwrap_or_default(),
            last_accepted,
        }
    }
}

/// Runs until the process stops: watches, programs the table through `sink`, writes statuses.
pub async fn run(
    client: Client,
    settings: GatewaySettings,
    sink: TableSink,
) -> Result<(), GatewayError> {
    let (classes, classes_w) = reflector::store();
    let (gateways, gateways_w) = reflector::store();
    let (routes, routes_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (slices, slices_w) = reflector::store();
    let (namespaces, namespaces_w) = reflector::store();
    let grants_api = Api::<ReferenceGrant>::all(client.clone());
    let has_grants = match grants_api.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::info!("no ReferenceGrant CRD: cross-namespace backendRefs are refused");
            false
        }
        _ => true,
    };
    let (grants, grants_w) = reflector::store();
    // Every watch's events wake the loop; what they carry is read from the stores.
    let mut watches = vec![
        watcher(Api::<GatewayClass>::all(client.clone()), Default::default())
            .default_backoff()
            .reflect(classes_w)
            .map(|event| watch_event("GatewayClass", event))
            .boxed(),
        watcher(Api::<Gateway>::all(client.clone()), Default::default())
            .default_backoff()
            .reflect(gateways_w)
            .map(|event| watch_event("Gateway", event))
            .boxed(),
        watcher(Api::<HttpRoute>::all(client.clone()), Default::default())
            .default_backoff()
            .reflect(routes_w)
            .map(|event| watch_event("HTTPRoute", event))
            .boxed(),
        watcher(Api::<Service>::all(client.clone()), Default::default())
            .default_backoff()
            .modify(|s| s.metadata.managed_fields = None)
            .reflect(services_w)
            .map(|event| watch_event("Service", event))
            .boxed(),
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            Default::default(),
        )
        .default_backoff()
        .modify(|s| s.metadata.managed_fields = None)
        .reflect(slices_w)
        .map(|event| watch_event("EndpointSlice", event))
        .boxed(),
        watcher(Api::<Namespace>::all(client.clone()), Default::default())
            .default_backoff()
            .modify(|n| n.metadata.managed_fields = None)
            .reflect(namespaces_w)
            .map(|event| watch_event("Namespace", event))
            .boxed(),
    ];
    if has_grants {
        watches.push(
            watcher(grants_api, Default::default())
                .default_backoff()
                .reflect(grants_w)
                .map(|event| watch_event("ReferenceGrant", event))
                .boxed(),
        );
    }
    let changes = futures::stream::select_all(watches);
    let stores = Stores {
        classes,
        gateways,
        routes,
        services,
        slices,
        namespaces,
        grants: has_grants.then_some(grants),
    };
    let (wake, mut woken) = tokio::sync::mpsc::channel::<()>(1);
    let pump = tokio::spawn(async move {
        let mut changes = changes;
        while changes.next().await.is_some() {
            let _ = wake.try_send(());
        }
    });
    let ready = async {
        let _ = stores.classes.wait_until_ready().await;
        let _ = stores.gateways.wait_until_ready().await;
        let _ = stores.routes.wait_until_ready().await;
        let _ = stores.services.wait_until_ready().await;
        let _ = stores.slices.wait_until_ready().await;
        let _ = stores.namespaces.wait_until_ready().await;
        if let Some(grants) = &stores.grants {
            let _ = grants.wait_until_ready().await;
        }
    };
    ready.await;
    tracing::info!(controller = %settings.controller_name, "Gateway API objects listed; programming the route table");
    let mut last_table: Option<Vec<RoutesDoc>> = None;
    let mut last_accepted = HashMap::new();
    loop {
        let view = stores.view(std::mem::take(&mut last_accepted));
        let mut translation = translate(&view, &settings.controller_name);
        last_accepted = translation.accepted.clone();
        if last_table.as_ref() != Some(&translation.table) {
            match sink(translation.table.clone()) {
                Ok(generation) => {
                    tracing::info!(
                        generation,
                        services = translation.table.len(),
                        "route table programmed from the cluster's HTTPRoutes"
                    );
                    last_table = Some(translation.table.clone());
                }
                Err(why) => {
                    tracing::error!(%why, "the route table was refused; the old one stays");
                    not_programmed(&mut translation, &why);
                }
            }
        }
        write_statuses(&client, &view, &translation, &settings).await;
        remember_accepted(&client, &view, &translation).await;
        tokio::select! {
            got = woken.recv() => {
                if got.is_none() {
                    break;
                }
                tokio::time::sleep(SETTLE).await;
                while woken.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
    pump.abort();
    Err(GatewayError::Watch {
        kind: "Gateway API objects",
        message: "the watches ended".into(),
    })
}

/// The Gateways' `Programmed` when the router refused the table: false, saying why, since the
/// routes' changes are not served (the router keeps the last table it took).
fn not_programmed(translation: &mut Translation, why: &str) {
    for gateway in &mut translation.gateways {
        for condition in &mut gateway.conditions {
            if condition.kind == "Programmed" {
                *condition = translate::Cond {
                    kind: "Programmed",
                    status: false,
                    reason: "Invalid",
                    message: format!(
                        "this router refused the route table ({why}); it serves the last one it took"
                    ),
                };
            }
        }
    }
}

/// Says why a watch failed (it retries with backoff): a kind the cluster does not serve is
/// named as such, since then the router stays unready until its CRD is installed.
fn watch_event<K>(kind: &'static str, event: Result<watcher::Event<K>, watcher::Error>) {
    match event {
        Ok(_) => {}
        Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
            tracing::error!(
                kind,
                "the cluster serves no {kind}: are Gateway API's CRDs (gateway.networking.k8s.io/v1) installed? \
                 The route table is not programmed, and the router not ready, until it is listed"
            );
        }
        Err(e) => {
            tracing::warn!(kind, error = %e, "watching {kind} failed; retrying with backoff");
        }
    }
}

fn now() -> String {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .ok()
    .and_then(|v| v.as_str().map(str::to_string))
    .unwrap_or_default()
}

/// Writes every status that differs from what the object has.
async fn write_statuses(
    client: &Client,
    view: &ClusterView,
    translation: &Translation,
    settings: &GatewaySettings,
) {
    let now = now();
    for class in &translation.classes {
        let current = view.classes.iter().find(|c| c.name_any() == class.name);
        let previous = current
            .and_then(|c| serde_json::to_value(&c.status).ok())
            .unwrap_or(Value::Null);
        let status = json!({
            "conditions": conditions_json(&class.conditions, Some(&previous["conditions"]), class.generation, &now),
        });
        if !same_status(&previous, &status) {
            let api: Api<GatewayClass> = Api::all(client.clone());
            patch_status(&api, &class.name, status, "GatewayClass").await;
        }
    }
    for gateway in &translation.gateways {
        let current = view.gateways.iter().find(|g| {
            g.namespace().as_deref() == Some(&gateway.namespace) && g.name_any() == gateway.name
        });
        let previous = current
            .and_then(|g| serde_json::to_value(&g.status).ok())
            .unwrap_or(Value::Null);
        let status = gateway_status(gateway, &previous, settings, &now);
        if !same_status(&previous, &status) {
            let api: Api<Gateway> = Api::namespaced(client.clone(), &gateway.namespace);
            patch_status(&api, &gateway.name, status, "Gateway").await;
        }
    }
    for route in &translation.routes {
        let current = view.routes.iter().find(|r| {
            r.namespace().as_deref() == Some(&route.namespace) && r.name_any() == route.name
        });
        let previous = current
            .and_then(|r| serde_json::to_value(&r.status).ok())
            .unwrap_or(Value::Null);
        let status = route_status(route, &previous, &settings.controller_name, &now);
        if !same_status(&previous, &status) {
            let api: Api<HttpRoute> = Api::namespaced(client.clone(), &route.namespace);
            patch_status(&api, &route.name, status, "HTTPRoute").await;
        }
    }
}

/// Writes each route's annotation of its last accepted spec when the route's current spec is
/// the one accepted and the annotation does not say so yet.
async fn remember_accepted(client: &Client, view: &ClusterView, translation: &Translation) {
    for route in &view.routes {
        let key = (route.namespace().unwrap_or_default(), route.name_any());
        let Some(accepted) = translation.accepted.get(&key) else {
            continue;
        };
        let value = translate::remember(route);
        let current = route.annotations().get(translate::LAST_ACCEPTED_ANNOTATION);
        if accepted.spec != route.spec || current == Some(&value) {
            continue;
        }
        let api: Api<HttpRoute> = Api::namespaced(client.clone(), &key.0);
        let patch = Patch::Merge(json!({"metadata": {"annotations": {
            translate::LAST_ACCEPTED_ANNOTATION: value}}}));
        let params = PatchParams {
            field_manager: Some("coalmine-gateway".into()),
            ..PatchParams::default()
        };
        if let Err(e) = api.patch(&key.1, &params, &patch).await {
            tracing::warn!(route = %key.1, error = %e, "could not remember the accepted spec on the route; retried at the next resync");
        }
    }
}

/// Whether the object already has this status (the fields written here).
fn same_status(previous: &Value, status: &Value) -> bool {
    status
        .as_object()
        .is_some_and(|fields| fields.iter().all(|(k, v)| previous.get(k) == Some(v)))
}

fn gateway_status(
    gateway: &ObjectState,
    previous: &Value,
    settings: &GatewaySettings,
    now: &str,
) -> Value {
    let old_listener = |name: &str| {
        previous["listeners"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == name))
            .map(|l| l["conditions"].clone())
    };
    let listeners: Vec<Value> = gateway
        .listeners
        .iter()
        .map(|l| {
            let old = old_listener(&l.name);
            json!({
                "name": l.name,
                "attachedRoutes": l.attached_routes,
                "supportedKinds": l.supported_kinds.iter()
                    .map(|k| json!({"group": "gateway.networking.k8s.io", "kind": k}))
                    .collect::<Vec<_>>(),
                "conditions": conditions_json(&l.conditions, old.as_ref(), gateway.generation, now),
            })
        })
        .collect();
    let mut status = json!({
        "conditions": conditions_json(&gateway.conditions, Some(&previous["conditions"]), gateway.generation, now),
        "listeners": listeners,
    });
    if let Some(address) = &settings.address {
        let kind = if address.parse::<std::net::IpAddr>().is_ok() {
            "IPAddress"
        } else {
            "Hostname"
        };
        status["addresses"] = json!([{"type": kind, "value": address}]);
    }
    status
}

/// A route's `status.parents`: the entries of other controllers kept, ours replaced.
fn route_status(route: &RouteState, previous: &Value, controller: &str, now: &str) -> Value {
    let theirs = previous["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] != controller)
        .cloned();
    let ours = route.parents.iter().map(|p| {
        let parent_ref = serde_json::to_value(&p.parent_ref).unwrap_or(Value::Null);
        let old = previous["parents"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|o| o["controllerName"] == controller && o["parentRef"] == parent_ref)
            })
            .map(|o| o["conditions"].clone());
        json!({
            "parentRef": parent_ref,
            "controllerName": controller,
            "conditions": conditions_json(&p.conditions, old.as_ref(), route.generation, now),
        })
    });
    json!({ "parents": theirs.chain(ours).collect::<Vec<_>>() })
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value, kind: &str)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = Patch::Merge(json!({ "status": status }));
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &patch)
        .await
    {
        tracing::warn!(kind, name, error = %e, "could not write status; retried at the next resync");
    }
}
