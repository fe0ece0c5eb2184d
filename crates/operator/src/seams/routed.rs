//! What the providers that weigh in front of the Services share (`coalmine`, `istio`,
//! `gatewayapi`, `nginx`): Flagger's workloads ([`Workloads`], the apex selecting the primary)
//! and something that sends each version its share — Coalmine's routers, or objects a mesh or
//! an ingress controller reads (a VirtualService, an HTTPRoute, a canary Ingress), each one
//! `TrafficBackend` of its own. [`Routed`] puts the two together in the order that never sends
//! requests to pods that are not there: the canary is scaled and ready before it gets its share;
//! a rollback takes its share first, then its pods; a promotion runs the new version on the
//! primary, waits for it, sends everything there, then scales the canary to 0.
//!
//! The route objects are written with server-side apply as field manager `coalmine`: the fields
//! Coalmine sets are its own, and whatever else a user wrote on the same object stays theirs
//! ([`apply_route_object`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use coalmine_controller::traffic::TrafficBackend;
use coalmine_controller::BoxFuture;
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::HttpMatch;
use coalmine_spec::Weight;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::Resource;

use crate::crd::Rollout;
use crate::seams::workloads::{fault, Workloads, FIELD_MANAGER};
use crate::workload::Workload;

/// Everything on the primary: what is carried outside a canary's analysis.
pub const ALL_ON_PRIMARY: Traffic = Traffic {
    promoted: false,
    canary: false,
    canary_weight: Weight::ZERO,
    apply_match: false,
    mirror_weight: Weight::ZERO,
};

/// A provider's route objects (a VirtualService and its DestinationRules, an HTTPRoute, a canary
/// Ingress), written whole from the traffic; `put` answers what it changed.
pub trait RouteObjects: Send + Sync + 'static {
    fn put<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>>;
}

/// Route objects as a traffic backend. Nothing to claim (the target's claim,
/// [`Workloads::claim`], is the rollout's) and nothing to let go (the objects keep the final
/// traffic).
pub struct ObjectsBackend<R: RouteObjects>(pub R);

impl<R: RouteObjects> TrafficBackend for ObjectsBackend<R> {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async { Ok(()) })
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        Box::pin(async move { self.0.put(traffic).await.map(|_| ()) })
    }

    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        self.0.put(traffic)
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async { Ok(()) })
    }
}

/// The workloads (Deployments or DaemonSets) run the versions; `routes` weighs.
pub struct Routed<W: Workload> {
    workloads: Workloads<W>,
    /// What sends each version its share: its stable side the `-primary` Service, its canary
    /// the `-canary` one. It only ever sees unpromoted traffic: promotion is the workloads'.
    routes: Arc<dyn TrafficBackend>,
}

impl<W: Workload> Routed<W> {
    pub fn new(workloads: Workloads<W>, routes: Arc<dyn TrafficBackend>) -> Routed<W> {
        Routed { workloads, routes }
    }

    /// Capacity first, then traffic: the canary runs enough pods for its share before it is
    /// sent that share.
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
        changed.extend(self.routes.reconcile(traffic).await?);
        Ok(changed)
    }

    /// Everything back on the primary, then the canary's pods go.
    async fn all_on_primary(&self) -> Result<Vec<String>, TrafficFault> {
        let mut changed = self.routes.reconcile(&ALL_ON_PRIMARY).await?;
        let target = self.workloads.target().await?;
        changed.extend(self.workloads.scale_canary(&target, 0).await?);
        Ok(changed)
    }
}

impl<W: Workload> TrafficBackend for Routed<W> {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async move {
            self.workloads.claim().await?;
            self.routes.claim().await
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
            let routes = self.routes.release().await;
            self.workloads.release().await?;
            routes
        })
    }
}

/// What the route objects of one rollout say, whatever the provider: Flagger's names (the
/// apex, `<apex>-primary`, `<apex>-canary`), the Canary's `service` fields the provider reads,
/// and the analysis's `match`, `mirror` and `sessionAffinity`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub namespace: String,
    /// The apex Service's name: the route objects are named after it.
    pub apex: String,
    pub port: i32,
    /// `service.hosts`: the VirtualService's hosts (the apex added), the HTTPRoute's hostnames.
    pub hosts: Vec<String>,
    /// `service.gateways` (Istio; none: `mesh`).
    pub gateways: Vec<String>,
    /// `service.timeout`, `service.retries` (Istio) and `service.trafficPolicy` (Istio's
    /// DestinationRules), as Flagger puts them on every route.
    pub timeout: Option<String>,
    pub retries: Option<serde_json::Value>,
    pub traffic_policy: Option<serde_json::Value>,
    /// `service.gatewayRefs` (Gateway API): the HTTPRoute's parentRefs.
    pub gateway_refs: Vec<crate::crd::GatewayRef>,
    /// `ingressRef.name` (NGINX): the user's Ingress the canary Ingress is copied from.
    pub ingress: Option<String>,
    pub owner_reference: OwnerReference,
    /// `analysis.match`: requests that go to the canary while it is analysed.
    pub matches: Vec<HttpMatch>,
    /// `analysis.sessionAffinity`, with this run's cookie.
    pub affinity: Option<Affinity>,
    /// `revertOnDeletion`: the rollout is going and its target serves again behind the apex;
    /// the routes send everything to the apex Service alone (the `-primary` and `-canary` ones
    /// go with the rollout).
    pub reverted: bool,
}

/// Flagger's session affinity: a response from the canary sets a cookie, and a request
/// carrying it goes to the canary again.
#[derive(Debug, Clone, PartialEq)]
pub struct Affinity {
    pub cookie_name: String,
    /// This run's value (Flagger's `status.sessionAffinityCookie` is `<name>=<value>`).
    pub value: String,
    pub max_age: u64,
}

impl Affinity {
    /// The `Set-Cookie` value a canary response carries.
    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Max-Age={}",
            self.cookie_name, self.value, self.max_age
        )
    }

    /// The `Cookie` header regex that finds it in a request (Flagger's).
    pub fn cookie_regex(&self) -> String {
        format!(".*{}.*{}.*", self.cookie_name, self.value)
    }
}

/// Flagger's session cookie lifetime when `sessionAffinity.maxAge` is not given (a day).
const DEFAULT_AFFINITY_MAX_AGE: u64 = 86_400;

impl RouteSpec {
    /// What `rollout`'s route objects say. The session cookie's value is the run's (of
    /// `revision`): the same for a run another replica resumes, another for the next revision.
    pub fn of(rollout: &Rollout, revision: Option<&str>) -> RouteSpec {
        let spec = &rollout.spec;
        let analysis = &spec.analysis;
        let uid = rollout.metadata.uid.clone().unwrap_or_default();
        let run =
            xxhash_rust::xxh3::xxh3_64(format!("{uid}/{}", revision.unwrap_or("")).as_bytes());
        RouteSpec {
            namespace: rollout.metadata.namespace.clone().unwrap_or_default(),
            apex: spec
                .service
                .name
                .clone()
                .unwrap_or_else(|| spec.target_ref.name.clone()),
            port: i32::from(spec.service.port),
            hosts: spec.service.hosts.clone(),
            gateways: spec.service.gateways.clone(),
            timeout: spec.service.timeout.clone(),
            retries: spec.service.retries.clone(),
            traffic_policy: spec.service.traffic_policy.clone(),
            gateway_refs: spec.service.gateway_refs.clone(),
            ingress: spec.ingress_ref.as_ref().map(|r| r.name.clone()),
            owner_reference: rollout.controller_owner_ref(&()).unwrap_or_default(),
            matches: analysis.match_.clone(),
            affinity: analysis.session_affinity.as_ref().map(|a| Affinity {
                cookie_name: a.cookie_name.clone(),
                value: format!("{run:016x}"),
                max_age: a.max_age.unwrap_or(DEFAULT_AFFINITY_MAX_AGE),
            }),
            reverted: false,
        }
    }

    /// Where the stable share goes: the primary's Service (the apex's, once reverted).
    pub fn primary(&self) -> String {
        if self.reverted {
            self.apex.clone()
        } else {
            format!("{}-primary", self.apex)
        }
    }

    pub fn canary(&self) -> String {
        format!("{}-canary", self.apex)
    }

    /// The (primary, canary) weights in whole percent, as Flagger writes them.
    pub fn weights(traffic: &Traffic) -> (i64, i64) {
        let canary = if traffic.canary {
            (f64::from(traffic.canary_weight.basis_points()) / 100.0).round() as i64
        } else {
            0
        };
        (100 - canary, canary)
    }

    /// The mirrored share in percent, if requests are mirrored to the canary.
    pub fn mirror_percent(traffic: &Traffic) -> Option<f64> {
        let bp = traffic.mirror_weight.basis_points();
        (traffic.canary && bp > 0).then(|| f64::from(bp) / 100.0)
    }

    /// The session cookie, while the canary has a share (Flagger's rule).
    pub fn sticky(&self, traffic: &Traffic) -> Option<&Affinity> {
        self.affinity
            .as_ref()
            .filter(|_| Self::weights(traffic).1 > 0)
    }

    /// `metadata` for an object Coalmine writes: its name and namespace, owned by the rollout
    /// only when Coalmine made it (`existing` is none) or already owns it — a user's own
    /// VirtualService must not be garbage-collected with the Canary.
    pub fn metadata(&self, name: &str, existing: Option<&DynamicObject>) -> serde_json::Value {
        let ours = existing.is_none_or(|o| {
            o.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.uid == self.owner_reference.uid)
        });
        let mut metadata = serde_json::json!({"name": name, "namespace": self.namespace});
        if ours {
            metadata["ownerReferences"] = serde_json::json!([self.owner_reference]);
        }
        metadata
    }
}

/// Coalmine's `routes` (the list at `path`: a VirtualService's `http`, an HTTPRoute's `rules`)
/// merged with what a user wrote in the same list of `existing`. These lists are atomic for
/// server-side apply — whoever applies one owns all of it — so what is the user's is carried:
/// their own routes (none of whose destinations, `destinations` of a route, is one of the
/// rollout's Services) stay as they are, ahead of Coalmine's (which match everything else); and
/// the fields they added to routes to the rollout's Services that Coalmine does not set (not
/// `owned`: a timeout, retries) go onto Coalmine's routes.
pub fn merge_routes(
    spec: &RouteSpec,
    existing: Option<&DynamicObject>,
    path: &[&str],
    owned: &[&str],
    destinations: fn(&serde_json::Value) -> Vec<String>,
    mut routes: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let services = [spec.apex.clone(), spec.primary(), spec.canary()];
    let mut theirs = Vec::new();
    let mut carried = BTreeMap::new();
    if let Some(mut at) = existing.map(|o| &o.data) {
        for key in path {
            at = &at[*key];
        }
        for route in at.as_array().into_iter().flatten() {
            if !destinations(route).iter().any(|d| services.contains(d)) {
                theirs.push(route.clone());
                continue;
            }
            for (key, value) in route.as_object().into_iter().flatten() {
                if !owned.contains(&key.as_str()) {
                    carried.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
        }
    }
    for route in &mut routes {
        if let Some(map) = route.as_object_mut() {
            for (key, value) in &carried {
                map.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    theirs.extend(routes);
    theirs
}

/// Reads `name` (none if it does not exist yet).
pub async fn read_object(
    api: &Api<DynamicObject>,
    what: &str,
    name: &str,
) -> Result<Option<DynamicObject>, TrafficFault> {
    api.get_opt(name)
        .await
        .map_err(|e| fault(&format!("{what} {name}"), e))
}

/// Applies `object` (server-side, field manager `coalmine`, forced: the fields it sets are
/// Coalmine's); says so if that changed it.
pub async fn apply_route_object(
    api: &Api<DynamicObject>,
    what: &str,
    before: Option<&DynamicObject>,
    object: &serde_json::Value,
) -> Result<Option<String>, TrafficFault> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|e| fault(&format!("{what} {name}"), e))?;
    let version = |o: Option<&DynamicObject>| o.and_then(|o| o.metadata.resource_version.clone());
    Ok((version(before) != version(Some(&applied))).then(|| format!("{what} {name} set")))
}
