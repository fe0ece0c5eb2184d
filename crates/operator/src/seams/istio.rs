//! Provider `istio`: the objects Flagger's Istio router writes (`pkg/router/istio.go`), so
//! Istio's dashboards and a user's policies keep working — a `VirtualService` named after the
//! apex Service, its hosts `service.hosts` and the apex, its gateways `service.gateways` (else
//! `mesh`), weighing the `<apex>-primary` and `<apex>-canary` hosts, and a `DestinationRule` for
//! each of those two hosts.
//!
//! The routes say what Coalmine's own routers do with the same `Traffic`: requests matching
//! `analysis.match` go to the canary, the rest are weighed (`primary 100 − w`, `canary w`) —
//! Flagger's A/B shape at weight 0, and the seed's header route beside a 95/5 split at 5 %.
//! Mirroring is the weighted route's `mirror`/`mirrorPercentage`; session affinity is Flagger's:
//! a canary response sets the cookie, and a `sticky-route` sends a request carrying it to the
//! canary.
//!
//! The VirtualService may be the user's own: Coalmine applies only its fields; since Istio's CRD
//! makes `http` one atomic list, the user's routes to other services stay ahead of Coalmine's,
//! and what they wrote on their route to this service (a timeout, retries) is carried onto
//! Coalmine's ([`merge_routes`]).

use coalmine_controller::BoxFuture;
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::{HttpMatch, StringMatch};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{json, Value};

use crate::seams::routed::{
    apply_route_object, merge_routes, read_object, RouteObjects, RouteSpec,
};

const GROUP: &str = "networking.istio.io";
const VERSION: &str = "v1";
/// The route that carries session affinity (Flagger's name).
pub const STICKY_ROUTE: &str = "sticky-route";
/// The fields of a VirtualService's HTTP route that Coalmine sets.
const OWNED_ROUTE_FIELDS: &[&str] = &["name", "match", "route", "mirror", "mirrorPercentage"];

/// The VirtualService and DestinationRules of one rollout.
pub struct IstioRoutes {
    virtual_services: Api<DynamicObject>,
    destination_rules: Api<DynamicObject>,
    spec: RouteSpec,
}

fn api(client: &kube::Client, namespace: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural),
    )
}

impl IstioRoutes {
    pub fn new(client: &kube::Client, spec: RouteSpec) -> IstioRoutes {
        IstioRoutes {
            virtual_services: api(client, &spec.namespace, "VirtualService", "virtualservices"),
            destination_rules: api(
                client,
                &spec.namespace,
                "DestinationRule",
                "destinationrules",
            ),
            spec,
        }
    }

    async fn write(&self, traffic: &Traffic) -> Result<Vec<String>, TrafficFault> {
        let mut changed = Vec::new();
        let hosts = [format!("{}-primary", self.spec.apex), self.spec.canary()];
        for host in hosts.into_iter().filter(|_| !self.spec.reverted) {
            let before = read_object(&self.destination_rules, "DestinationRule", &host).await?;
            let rule = destination_rule(&self.spec, &host, before.as_ref());
            changed.extend(
                apply_route_object(
                    &self.destination_rules,
                    "DestinationRule",
                    before.as_ref(),
                    &rule,
                )
                .await?,
            );
        }
        let before = read_object(&self.virtual_services, "VirtualService", &self.spec.apex).await?;
        let service = virtual_service(&self.spec, traffic, before.as_ref());
        changed.extend(
            apply_route_object(
                &self.virtual_services,
                "VirtualService",
                before.as_ref(),
                &service,
            )
            .await?,
        );
        Ok(changed)
    }
}

impl RouteObjects for IstioRoutes {
    fn put<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(self.write(traffic))
    }
}

/// The DestinationRule for `host` (`<apex>-primary` or `<apex>-canary`), as Flagger's.
pub fn destination_rule(spec: &RouteSpec, host: &str, existing: Option<&DynamicObject>) -> Value {
    let mut rule = json!({"host": host});
    if let Some(policy) = &spec.traffic_policy {
        rule["trafficPolicy"] = policy.clone();
    }
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "DestinationRule",
        "metadata": spec.metadata(host, existing),
        "spec": rule,
    })
}

/// A `route` entry: `host` at `weight`.
fn destination(host: &str, weight: i64) -> Value {
    json!({"destination": {"host": host}, "weight": weight})
}

/// The VirtualService carrying `traffic`; `existing` gives the fields a user added to its routes.
pub fn virtual_service(
    spec: &RouteSpec,
    traffic: &Traffic,
    existing: Option<&DynamicObject>,
) -> Value {
    let (primary_weight, canary_weight) = RouteSpec::weights(traffic);
    let (primary, canary) = (spec.primary(), spec.canary());
    let mut hosts = spec.hosts.clone();
    if !hosts.iter().any(|h| *h == spec.apex || h == "*") {
        hosts.push(spec.apex.clone());
    }
    let gateways = if spec.gateways.is_empty() {
        vec!["mesh".to_string()]
    } else {
        spec.gateways.clone()
    };
    let all_to_canary = json!([destination(&primary, 0), destination(&canary, 100)]);
    let mut routes = Vec::new();
    let sticky = spec.sticky(traffic);
    if let Some(affinity) = sticky {
        routes.push(json!({
            "name": STICKY_ROUTE,
            "match": [{"headers": {"Cookie": {"regex": affinity.cookie_regex()}}}],
            "route": all_to_canary,
        }));
    }
    if traffic.apply_match && traffic.canary && !spec.matches.is_empty() {
        routes.push(json!({
            "match": spec.matches.iter().map(match_request).collect::<Vec<_>>(),
            "route": all_to_canary,
        }));
    }
    let mut canary_destination = destination(&canary, canary_weight);
    if let Some(affinity) = sticky {
        canary_destination["headers"] =
            json!({"response": {"add": {"Set-Cookie": affinity.set_cookie()}}});
    }
    let mut weighted = json!({
        "route": if spec.reverted {
            json!([destination(&primary, 100)])
        } else {
            json!([destination(&primary, primary_weight), canary_destination])
        },
    });
    if let Some(percent) = RouteSpec::mirror_percent(traffic) {
        weighted["mirror"] = json!({"host": canary});
        weighted["mirrorPercentage"] = json!({"value": percent});
    }
    routes.push(weighted);
    // Flagger's `service.timeout` and `service.retries`, on every route.
    for route in &mut routes {
        if let Some(timeout) = &spec.timeout {
            route["timeout"] = timeout.clone().into();
        }
        if let Some(retries) = &spec.retries {
            route["retries"] = retries.clone();
        }
    }
    let routes = merge_routes(
        spec,
        existing,
        &["spec", "http"],
        OWNED_ROUTE_FIELDS,
        |route| {
            let hosts = route["route"].as_array().into_iter().flatten();
            hosts
                .chain(std::iter::once(&route["mirror"]))
                .filter_map(|d| d["destination"]["host"].as_str().or(d["host"].as_str()))
                .map(str::to_string)
                .collect()
        },
        routes,
    );
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "VirtualService",
        "metadata": spec.metadata(&spec.apex, existing),
        "spec": {"hosts": hosts, "gateways": gateways, "http": routes},
    })
}

/// Flagger's `HTTPMatchRequest` as Istio reads it; a suffix (which Istio lacks) as a regex.
fn match_request(m: &HttpMatch) -> Value {
    let test = |t: &StringMatch| match t {
        StringMatch::Exact(v) => json!({"exact": v}),
        StringMatch::Prefix(v) => json!({"prefix": v}),
        StringMatch::Suffix(v) => json!({"regex": format!(".*{}", regex_escape(v))}),
        StringMatch::Regex(v) => json!({"regex": v}),
    };
    let mut request = json!({});
    if !m.headers.is_empty() {
        request["headers"] = m
            .headers
            .iter()
            .map(|(k, t)| (k.clone(), test(t)))
            .collect();
    }
    if !m.query_params.is_empty() {
        request["queryParams"] = m
            .query_params
            .iter()
            .map(|(k, t)| (k.clone(), test(t)))
            .collect();
    }
    if !m.source_labels.is_empty() {
        request["sourceLabels"] = json!(m.source_labels);
    }
    request
}

/// `text` matched literally in an RE2 regex.
pub(crate) fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
