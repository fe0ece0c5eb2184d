//! The cluster's Gateway API objects as a route table, and the status each object earns. Pure:
//! objects in, the router's services and the statuses out; the watcher (`gateway/mod.rs`) does
//! the IO.
//!
//! - **Ours**: a `GatewayClass` whose `controllerName` is the router's, the `Gateway`s of those
//!   classes, and the `HTTPRoute`s attached to them (a `parentRef` to one of those Gateways and
//!   at least one of its listeners letting it in: `sectionName`/`port`, `allowedRoutes`
//!   namespaces `Same` or `All` and kinds, hostnames intersecting).
//! - **Services**: each rule's each match is one service of the router's table, named
//!   `<namespace>.<route>.<rule>.<match>` (shortened by a hash when longer than a label). Its
//!   hosts are the route's hostnames intersected with its listeners'; its path and header and
//!   query conditions the match's; its first backend is the `stable` version and its second the
//!   `canary`, weighed by their `weight`s (Flagger writes primary then canary), each as its
//!   Service's ready endpoint addresses from the EndpointSlices (the pods, never the cluster
//!   IP); `RequestHeaderModifier` becomes the service's `requestHeaders`; `RequestMirror` to
//!   the second backend mirrors that share, to a Service of its own it becomes a canary at
//!   weight 0 that gets the copies.
//! - **Precedence**: the router's table order breaks the last tie as Gateway API does: the
//!   oldest route first, then by namespace and name, then rule order.
//! - **Refused**: what the router cannot do makes the route `Accepted=False` with
//!   `UnsupportedValue` naming it (method matches, more than two backends per rule, filters
//!   other than the two above), so it is never half-applied. A backend that does not resolve
//!   (not a Service, another namespace, no such Service or port) makes `ResolvedRefs=False`
//!   with the spec's reason, and its rule takes no requests.

use std::collections::{BTreeMap, HashMap};

use coalmine_contract::{
    Condition as MatchCondition, EndpointGroup, Endpoints, HeaderChanges, HeaderName, HostPattern,
    MatchRule, PathMatch, PathPrefix, RoutesDoc, StrMatch, Subject, UpstreamUrl, Weight,
};
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom,
};
use gateway_api::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesBackendRefsFiltersType, HttpRouteRulesFilters, HttpRouteRulesFiltersType,
    HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

/// The `controllerName` a GatewayClass names to be Coalmine's.
pub const CONTROLLER_NAME: &str = "coalmine.dev/gateway";

const GROUP: &str = "gateway.networking.k8s.io";

/// What the router reads: the cluster's objects of the five kinds, as watched.
#[derive(Default, Clone)]
pub struct ClusterView {
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub routes: Vec<HttpRoute>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// ReferenceGrants (none when their CRD is not installed): what lets a route reach a
    /// Service in another namespace.
    pub grants: Vec<ReferenceGrant>,
    /// Namespaces, for listeners that take routes by a namespace selector.
    pub namespaces: Vec<Namespace>,
    /// Each route's last spec the router accepted (the watcher's memory, from
    /// [`Translation::accepted`]): an edit the router cannot do leaves that one serving rather
    /// than taking the route's traffic away.
    pub last_accepted: HashMap<(String, String), HttpRoute>,
}

/// One condition as Gateway API's status writes it (its time and generation are filled in
/// when written: [`conditions_json`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    fn yes(kind: &'static str, reason: &'static str, message: impl Into<String>) -> Cond {
        Cond {
            kind,
            status: true,
            reason,
            message: message.into(),
        }
    }
    fn no(kind: &'static str, reason: &'static str, message: impl Into<String>) -> Cond {
        Cond {
            kind,
            status: false,
            reason,
            message: message.into(),
        }
    }
}

/// A listener's status.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerState {
    pub name: String,
    pub attached_routes: i32,
    pub supported_kinds: Vec<&'static str>,
    pub conditions: Vec<Cond>,
}

/// An object's status as the router sees it: its namespace (empty for a class), name and
/// generation, and its conditions.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectState {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub conditions: Vec<Cond>,
    /// A Gateway's listeners.
    pub listeners: Vec<ListenerState>,
}

/// A route's status for one of its parents that is ours.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentState {
    pub parent_ref: HttpRouteParentRefs,
    pub conditions: Vec<Cond>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteState {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub parents: Vec<ParentState>,
}

/// The route table and every status, from one view of the cluster.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub table: Vec<RoutesDoc>,
    pub classes: Vec<ObjectState>,
    pub gateways: Vec<ObjectState>,
    pub routes: Vec<RouteState>,
    /// The routes serving now, by namespace and name, as accepted (see
    /// [`ClusterView::last_accepted`]).
    pub accepted: HashMap<(String, String), HttpRoute>,
}

/// The prefix of the router's service names for one HttpRoute: what the operator's counts
/// select (`service=~"<prefix>\..*"`) to read a route's versions.
pub fn route_service_prefix(namespace: &str, route: &str) -> String {
    let full = format!("{namespace}.{route}");
    // Room for `.<rule>.<match>` within a 63-character label.
    if full.len() <= 48 {
        full
    } else {
        let hash = xxhash_rust::xxh3::xxh3_64(full.as_bytes());
        format!("{}.{hash:016x}", &full[..31].trim_end_matches(['.', '-']))
    }
}

/// The annotation on an HTTPRoute keeping the last spec Coalmine's routers accepted (its
/// generation and spec, JSON), so a router started after an edit it cannot do serves what the
/// others serve rather than nothing.
pub const LAST_ACCEPTED_ANNOTATION: &str = "gateway.coalmine.dev/last-accepted";

/// The annotation's value for a route's spec as it is.
pub fn remember(route: &HttpRoute) -> String {
    serde_json::json!({"generation": generation(&route.metadata), "spec": route.spec}).to_string()
}

/// The route as its annotation remembers it (its spec and generation then), if it has one that
/// reads.
pub fn remembered(route: &HttpRoute) -> Option<HttpRoute> {
    let text = route.annotations().get(LAST_ACCEPTED_ANNOTATION)?;
    #[derive(serde::Deserialize)]
    struct Remembered {
        generation: i64,
        spec: gateway_api::httproutes::HttpRouteSpec,
    }
    let r: Remembered = serde_json::from_str(text).ok()?;
    let mut then = route.clone();
    then.spec = r.spec;
    then.metadata.generation = Some(r.generation);
    Some(then)
}

/// The Services a route names, as backends or mirror targets, with the namespace it gives.
pub fn backend_names(route: &HttpRoute) -> Vec<(String, Option<String>)> {
    let mut names = Vec::new();
    for rule in route.spec.rules.iter().flatten() {
        for b in rule.backend_refs.iter().flatten() {
            names.push((b.name.clone(), b.namespace.clone()));
        }
        for f in rule.filters.iter().flatten() {
            if let Some(m) = &f.request_mirror {
                names.push((m.backend_ref.name.clone(), m.backend_ref.namespace.clone()));
            }
        }
    }
    names
}

fn generation(meta: &kube::api::ObjectMeta) -> i64 {
    meta.generation.unwrap_or(0)
}

/// Translates the cluster into a table and statuses. `controller` is the `controllerName` this
/// router answers to.
pub fn translate(view: &ClusterView, controller: &str) -> Translation {
    let mut out = Translation::default();
    let ours: Vec<&GatewayClass> = view
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == controller)
        .collect();
    for class in &ours {
        out.classes.push(ObjectState {
            namespace: String::new(),
            name: class.name_any(),
            generation: generation(&class.metadata),
            conditions: vec![Cond::yes(
                "Accepted",
                "Accepted",
                "Coalmine's router serves this class",
            )],
            listeners: Vec::new(),
        });
    }
    let gateways: Vec<&Gateway> = view
        .gateways
        .iter()
        .filter(|g| {
            ours.iter()
                .any(|c| c.name_any() == g.spec.gateway_class_name)
        })
        .collect();
    let endpoints = EndpointIndex::new(view);
    let mut attached: HashMap<(String, String, String), i32> = HashMap::new();
    // Each service name in the table, with the route (`namespace/name`) it is of.
    let mut service_owners: HashMap<String, String> = HashMap::new();
    let mut routes: Vec<&HttpRoute> = view.routes.iter().collect();
    // Gateway API's tie-break: the oldest route first, then namespace/name.
    routes.sort_by_key(|r| {
        (
            r.metadata.creation_timestamp.as_ref().map(|t| t.0),
            r.namespace().unwrap_or_default(),
            r.name_any(),
        )
    });
    for route in routes {
        let namespace = route.namespace().unwrap_or_default();
        let mut parents = Vec::new();
        // Each accepted listener's hosts for this route (`None`: any host).
        let mut host_sets: Vec<Option<HostPattern>> = Vec::new();
        for parent in route.spec.parent_refs.iter().flatten() {
            if parent.group.as_deref().unwrap_or(GROUP) != GROUP
                || parent.kind.as_deref().unwrap_or("Gateway") != "Gateway"
            {
                continue;
            }
            let parent_ns = parent
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.clone());
            let Some(gateway) = gateways.iter().find(|g| {
                g.namespace().as_deref() == Some(&parent_ns) && g.name_any() == parent.name
            }) else {
                continue; // not ours: another controller's to report on
            };
            let (accepted, listener_hosts) =
                attach(route, &namespace, parent, gateway, &view.namespaces);
            let mut counted = Vec::new();
            for (listener, host) in listener_hosts {
                if !counted.contains(&listener) {
                    *attached
                        .entry((parent_ns.clone(), parent.name.clone(), listener.clone()))
                        .or_default() += 1;
                    counted.push(listener);
                }
                host_sets.push(host);
            }
            parents.push((parent.clone(), accepted));
        }
        let hosts: Vec<HostPattern> = if host_sets.iter().any(Option::is_none) {
            Vec::new()
        } else {
            let mut unique = Vec::new();
            for h in host_sets.into_iter().flatten() {
                if !unique.contains(&h) {
                    unique.push(h);
                }
            }
            unique
        };
        if parents.is_empty() {
            // Not (or no longer) ours: our entries in its status, if any, are taken out.
            if has_our_status(route, controller) {
                out.routes.push(RouteState {
                    namespace,
                    name: route.name_any(),
                    generation: generation(&route.metadata),
                    parents: Vec::new(),
                });
            }
            continue;
        }
        let key = (namespace.clone(), route.name_any());
        let mut built = build_services(route, &namespace, &endpoints, &view.grants);
        let mut serving = Some(route);
        let mut services = Vec::new();
        // What a router that never saw the route accepted reads from the route itself.
        let from_annotation = match (&built, view.last_accepted.contains_key(&key)) {
            (Err(_), false) => remembered(route),
            _ => None,
        };
        if let Err(unsupported) = &built {
            // The last spec accepted keeps serving (with today's endpoints), said in the
            // condition's message.
            serving = view.last_accepted.get(&key).or(from_annotation.as_ref());
            if let Some(last) = serving {
                if let Ok(last_services) =
                    build_services(last, &namespace, &endpoints, &view.grants)
                {
                    services = last_services.0;
                }
                built = Err(format!(
                    "{unsupported}; generation {}, the last accepted, keeps serving",
                    generation(&last.metadata)
                ));
            }
        }
        if let Ok((built_services, _)) = &built {
            services = built_services.clone();
        }
        // A service name an earlier route's services hold (a name shortened by a hash, taken
        // by a route named that way) refuses this route alone: the router takes no table that
        // names a service twice, and would then follow no route's change at all.
        let accepted_somewhere = parents.iter().any(|(_, c)| c.status);
        if accepted_somewhere {
            if let Some(owner) = services.iter().find_map(|s| service_owners.get(&s.service)) {
                built = Err(format!(
                    "its service names (prefix {:?}) are already HTTPRoute {owner}'s; rename this route",
                    route_service_prefix(&namespace, &route.name_any())
                ));
                services.clear();
                serving = None;
            }
            for service in &services {
                service_owners.insert(service.service.clone(), format!("{}/{}", key.0, key.1));
            }
        }
        let resolved = match &built {
            Ok((_, resolved)) => resolved.clone(),
            Err(_) => Cond::yes("ResolvedRefs", "ResolvedRefs", ""),
        };
        out_table_push(&mut out.table, &services, &hosts, &parents);
        if let Some(route) = serving.filter(|_| parents.iter().any(|(_, c)| c.status)) {
            out.accepted.insert(key, route.clone());
        }
        let parents = parents
            .into_iter()
            .map(|(parent_ref, accepted)| {
                let accepted = match (&built, accepted.status) {
                    (Err(unsupported), true) => {
                        Cond::no("Accepted", "UnsupportedValue", unsupported.clone())
                    }
                    _ => accepted,
                };
                ParentState {
                    parent_ref,
                    conditions: vec![accepted, resolved.clone()],
                }
            })
            .collect();
        out.routes.push(RouteState {
            namespace,
            name: route.name_any(),
            generation: generation(&route.metadata),
            parents,
        });
    }
    for gateway in gateways {
        out.gateways.push(gateway_state(gateway, &attached));
    }
    out
}

/// Whether the route's status has an entry this router (`controller`) wrote.
fn has_our_status(route: &HttpRoute, controller: &str) -> bool {
    route
        .status
        .iter()
        .flat_map(|s| &s.parents)
        .any(|p| p.controller_name == controller)
}

/// A route's services into the table, when some parent accepted it, with its hosts.
fn out_table_push(
    table: &mut Vec<RoutesDoc>,
    services: &[RoutesDoc],
    hosts: &[HostPattern],
    parents: &[(HttpRouteParentRefs, Cond)],
) {
    if parents.iter().any(|(_, c)| c.status) {
        for service in services {
            let mut service = service.clone();
            service.hosts = hosts.to_vec();
            table.push(service);
        }
    }
}

/// Whether a route attaches to a Gateway through `parent`, and through which listeners with
/// which hosts (`None`: any host).
fn attach(
    route: &HttpRoute,
    namespace: &str,
    parent: &HttpRouteParentRefs,
    gateway: &Gateway,
    namespaces: &[Namespace],
) -> (Cond, Vec<(String, Option<HostPattern>)>) {
    let gateway_ns = gateway.namespace().unwrap_or_default();
    let listeners: Vec<&GatewayListeners> = gateway
        .spec
        .listeners
        .iter()
        .filter(|l| parent.section_name.as_ref().is_none_or(|s| *s == l.name))
        .filter(|l| parent.port.is_none_or(|p| p == l.port))
        .collect();
    if listeners.is_empty() {
        return (
            Cond::no(
                "Accepted",
                "NoMatchingParent",
                "no listener of the Gateway has this sectionName and port",
            ),
            Vec::new(),
        );
    }
    let allowed: Vec<&&GatewayListeners> = listeners
        .iter()
        .filter(|l| serves_http(l))
        .filter(|l| {
            let from = l
                .allowed_routes
                .as_ref()
                .and_then(|a| a.namespaces.as_ref())
                .and_then(|n| n.from.clone());
            match from {
                Some(GatewayListenersAllowedRoutesNamespacesFrom::All) => true,
                None | Some(GatewayListenersAllowedRoutesNamespacesFrom::Same) => {
                    gateway_ns == namespace
                }
                Some(GatewayListenersAllowedRoutesNamespacesFrom::Selector) => {
                    let selector = l
                        .allowed_routes
                        .as_ref()
                        .and_then(|a| a.namespaces.as_ref())
                        .and_then(|n| n.selector.as_ref());
                    let labels = namespaces
                        .iter()
                        .find(|n| n.name_any() == namespace)
                        .map(|n| n.labels().clone())
                        .unwrap_or_default();
                    selector.is_some_and(|sel| {
                        let expressions = sel.match_expressions.iter().flatten().map(|e| {
                            (
                                e.key.as_str(),
                                e.operator.as_str(),
                                e.values.as_deref().unwrap_or_default(),
                            )
                        });
                        selects(sel.match_labels.as_ref(), expressions, &labels)
                    })
                }
            }
        })
        .filter(|l| {
            l.allowed_routes
                .as_ref()
                .and_then(|a| a.kinds.as_ref())
                .is_none_or(|kinds| {
                    kinds.iter().any(|k| {
                        k.kind == "HTTPRoute" && k.group.as_deref().unwrap_or(GROUP) == GROUP
                    })
                })
        })
        .collect();
    if allowed.is_empty() {
        return (
            Cond::no(
                "Accepted",
                "NotAllowedByListeners",
                "no listener lets this route in (protocol, allowedRoutes namespaces or kinds)",
            ),
            Vec::new(),
        );
    }
    let route_hosts: Vec<&String> = route.spec.hostnames.iter().flatten().collect();
    let mut hosts = Vec::new();
    // Names the API takes but the router cannot match (a label longer than DNS's 63
    // characters): they take no host, never every host.
    let mut unmatchable: Vec<String> = Vec::new();
    let mut pattern = |name: &str| match HostPattern::parse(name) {
        Ok(p) => Some(p),
        Err(_) => {
            if !unmatchable.iter().any(|u| u == name) {
                unmatchable.push(name.to_string());
            }
            None
        }
    };
    for listener in allowed {
        let listener_host = listener.hostname.as_deref();
        if route_hosts.is_empty() {
            match listener_host {
                None => hosts.push((listener.name.clone(), None)),
                Some(h) => {
                    if let Some(p) = pattern(h) {
                        hosts.push((listener.name.clone(), Some(p)));
                    }
                }
            }
            continue;
        }
        for h in &route_hosts {
            if let Some(p) = intersect(listener_host, h).and_then(|both| pattern(&both)) {
                hosts.push((listener.name.clone(), Some(p)));
            }
        }
    }
    if hosts.is_empty() {
        let message = if unmatchable.is_empty() {
            "none of the route's hostnames is one its listeners take".to_string()
        } else {
            format!(
                "no hostname the router can match: {} (a DNS label has at most 63 characters)",
                unmatchable.join(", ")
            )
        };
        return (
            Cond::no("Accepted", "NoMatchingListenerHostname", message),
            Vec::new(),
        );
    }
    (Cond::yes("Accepted", "Accepted", ""), hosts)
}

/// A Kubernetes label selector (`matchLabels`, `matchExpressions` with `In`, `NotIn`, `Exists`,
/// `DoesNotExist`) against an object's labels. An unknown operator selects nothing.
fn selects<'e>(
    match_labels: Option<&BTreeMap<String, String>>,
    mut expressions: impl Iterator<Item = (&'e str, &'e str, &'e [String])>,
    labels: &BTreeMap<String, String>,
) -> bool {
    match_labels
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && expressions.all(|(key, operator, values)| match operator {
            "In" => labels.get(key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(key),
            "DoesNotExist" => !labels.contains_key(key),
            _ => false,
        })
}

/// Whether a ReferenceGrant in `to_namespace` lets HTTPRoutes of `from_namespace` reach the
/// Service `name` there.
fn granted(
    grants: &[ReferenceGrant],
    from_namespace: &str,
    to_namespace: &str,
    name: &str,
) -> bool {
    grants
        .iter()
        .filter(|g| g.namespace().as_deref() == Some(to_namespace))
        .any(|g| {
            g.spec
                .from
                .iter()
                .any(|f| f.group == GROUP && f.kind == "HTTPRoute" && f.namespace == from_namespace)
                && g.spec.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n == name)
                })
        })
}

fn serves_http(listener: &GatewayListeners) -> bool {
    listener.protocol == "HTTP"
}

/// The hosts both a listener (`None`: any) and a route name take, as one pattern (the more
/// specific of the two), or `None` when they share none.
fn intersect(listener: Option<&str>, route: &str) -> Option<String> {
    let Some(listener) = listener else {
        return Some(route.to_ascii_lowercase());
    };
    let (l, r) = (listener.to_ascii_lowercase(), route.to_ascii_lowercase());
    let covers = |wild: &str, name: &str| {
        wild.strip_prefix('*')
            .is_some_and(|suffix| name.ends_with(suffix) && name.len() > suffix.len())
    };
    match (l.starts_with("*."), r.starts_with("*.")) {
        (false, false) => (l == r).then_some(r),
        (true, false) => covers(&l, &r).then_some(r),
        (false, true) => covers(&r, &l).then_some(l),
        (true, true) => {
            if covers(&l, &r) || l == r {
                Some(r)
            } else if covers(&r, &l) {
                Some(l)
            } else {
                None
            }
        }
    }
}

/// The Services' ready endpoints, by namespace, Service name and Service port.
struct EndpointIndex<'v> {
    services: HashMap<(String, String), &'v Service>,
    slices: HashMap<(String, String), Vec<&'v EndpointSlice>>,
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl<'v> EndpointIndex<'v> {
    fn new(view: &'v ClusterView) -> Self {
        let services = view
            .services
            .iter()
            .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
            .collect();
        let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &view.slices {
            if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
                slices
                    .entry((slice.namespace().unwrap_or_default(), service.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        EndpointIndex { services, slices }
    }

    /// The ready endpoints of a Service's port (by its `port`), as upstream URLs; an error is
    /// the `ResolvedRefs` reason and message.
    fn resolve(
        &self,
        namespace: &str,
        name: &str,
        port: Option<i32>,
    ) -> Result<Vec<UpstreamUrl>, (&'static str, String)> {
        let Some(service) = self
            .services
            .get(&(namespace.to_string(), name.to_string()))
        else {
            return Err((
                "BackendNotFound",
                format!("Service {namespace}/{name} not found"),
            ));
        };
        let Some(port) = port else {
            return Err(("UnsupportedValue", format!("backendRef {name} has no port")));
        };
        let ports = service.spec.iter().flat_map(|s| s.ports.iter().flatten());
        let Some(service_port) = ports.into_iter().find(|p| p.port == port) else {
            return Err((
                "BackendNotFound",
                format!("Service {namespace}/{name} has no port {port}"),
            ));
        };
        let port_name = service_port.name.clone().unwrap_or_default();
        let mut urls = Vec::new();
        let key = (namespace.to_string(), name.to_string());
        for slice in self.slices.get(&key).into_iter().flatten() {
            for authority in crate::seams::routers::ready_pods(slice, &port_name) {
                if let Ok(url) = UpstreamUrl::parse(&format!("http://{authority}")) {
                    if !urls.contains(&url) {
                        urls.push(url);
                    }
                }
            }
        }
        urls.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(urls)
    }
}

/// One version of a rule: a backend alone, as a group of weight 1 (a version's own weight is
/// the service's `canaryWeight`).
fn alone(mut group: EndpointGroup) -> Endpoints {
    group.weight = 1;
    Endpoints::weighted(vec![group])
}

/// Every request of the rule answered 500 (Gateway API's rule for a rule that cannot send
/// anywhere), counted as the router's.
fn invalid(why: &str) -> Endpoints {
    Endpoints::weighted(vec![EndpointGroup {
        weight: 1,
        endpoints: Vec::new(),
        invalid: Some(why.to_string()),
        response_headers: HeaderChanges::default(),
    }])
}

/// The route's services (one per rule and match), with its `ResolvedRefs`; `Err` names what
/// the router cannot do (the route is then not accepted).
///
/// A rule's first backend is the `stable` version, the others together the `canary` (weighed
/// among themselves by their weights), so Flagger's primary/canary pair is stable/canary and a
/// three-way split is still exact. A backend that does not resolve keeps its share, answered 500.
fn build_services(
    route: &HttpRoute,
    namespace: &str,
    endpoints: &EndpointIndex<'_>,
    grants: &[ReferenceGrant],
) -> Result<(Vec<RoutesDoc>, Cond), String> {
    let prefix = route_service_prefix(namespace, &route.name_any());
    let mut services = Vec::new();
    let mut unresolved: Option<(&'static str, String)> = None;
    let mut resolve = |name: &str,
                       ns: Option<&String>,
                       group: Option<&String>,
                       kind: Option<&String>,
                       port: Option<i32>|
     -> Result<Vec<UpstreamUrl>, String> {
        let outcome = if group.is_some_and(|g| !g.is_empty())
            || kind.is_some_and(|k| k != "Service")
        {
            Err((
                "InvalidKind",
                format!("backendRef {name}: only core Services are supported"),
            ))
        } else {
            let target = ns.map_or(namespace, String::as_str);
            if target != namespace && !granted(grants, namespace, target, name) {
                Err((
                    "RefNotPermitted",
                    format!("backendRef {target}/{name}: no ReferenceGrant in {target} lets HTTPRoutes of {namespace} reach it"),
                ))
            } else {
                endpoints.resolve(target, name, port)
            }
        };
        outcome.map_err(|why| {
            let message = why.1.clone();
            unresolved.get_or_insert(why);
            message
        })
    };
    for (i, rule) in route.spec.rules.iter().flatten().enumerate() {
        let backends: Vec<EndpointGroup> = rule
            .backend_refs
            .iter()
            .flatten()
            .map(|b: &HttpRouteRulesBackendRefs| {
                // A backend's own answer changes (how Flagger sets its affinity cookie on the
                // canary's answers); its other filters the router does not have.
                let mut answers = HeaderChanges::default();
                for f in b.filters.iter().flatten() {
                    match (&f.r#type, &f.response_header_modifier) {
                        (HttpRouteRulesBackendRefsFiltersType::ResponseHeaderModifier, Some(m)) => {
                            answers = header_modifier(&format!("rules[{i}].backendRefs"), m)?;
                        }
                        (other, _) => {
                            return Err(format!(
                                "rules[{i}]: filter {other:?} on backendRef {} is not supported by Coalmine's router",
                                b.name
                            ))
                        }
                    }
                }
                let resolved = resolve(
                    &b.name,
                    b.namespace.as_ref(),
                    b.group.as_ref(),
                    b.kind.as_ref(),
                    b.port,
                );
                let weight = u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
                Ok(match resolved {
                    Ok(urls) => EndpointGroup {
                        weight,
                        endpoints: urls,
                        invalid: None,
                        response_headers: answers,
                    },
                    Err(why) => EndpointGroup {
                        weight,
                        endpoints: Vec::new(),
                        invalid: Some(why),
                        response_headers: answers,
                    },
                })
            })
            .collect::<Result<_, _>>()?;
        let RuleFilters {
            requests,
            answers,
            mirror,
        } = filters(i, rule, &mut resolve)?;
        let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
        let (stable, canary, canary_weight) = match backends.as_slice() {
            [] => (invalid("the rule has no backendRefs"), None, Weight::ZERO),
            _ if total == 0 => (invalid("every backendRef weighs 0"), None, Weight::ZERO),
            [one] => (alone(one.clone()), None, Weight::ZERO),
            [first, rest @ ..] => {
                let rest_weight: u64 = rest.iter().map(|b| u64::from(b.weight)).sum();
                let bp = u32::try_from(rest_weight * 10_000 / total).unwrap_or(10_000);
                let canary = match rest {
                    [one] => alone(one.clone()),
                    many => Endpoints::weighted(many.to_vec()),
                };
                (
                    alone(first.clone()),
                    Some(canary),
                    Weight::from_basis_points(bp).unwrap_or(Weight::ZERO),
                )
            }
        };
        // A mirror: to a rule's only backend's twin (the canary at weight 0 getting the
        // copies), or to its second of two.
        let (canary, mirror_share) = match (canary, mirror) {
            (canary, None) => (canary, Weight::ZERO),
            (None, Some((target, share))) => (Some(target), share),
            (Some(canary), Some((target, share))) if backends.len() == 2 && target == canary => {
                (Some(canary), share)
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "rules[{i}]: a RequestMirror to a Service other than the rule's second of two backends is not supported"
                ))
            }
        };
        let matches: Vec<HttpRouteRulesMatches> = match &rule.matches {
            Some(m) if !m.is_empty() => m.clone(),
            _ => vec![HttpRouteRulesMatches::default()],
        };
        for (j, m) in matches.iter().enumerate() {
            let selectors = route_match(i, j, m)?;
            let mut doc = RoutesDoc::stable_only(stable.clone());
            doc.service = format!("{prefix}.{i}.{j}");
            doc.name = format!("{namespace}/{}", route.name_any());
            doc.paths = selectors.paths;
            doc.methods = selectors.methods;
            doc.headers = selectors.rules;
            doc.request_headers = requests.clone();
            doc.response_headers = answers.clone();
            doc.canary = canary.clone();
            doc.canary_weight = canary_weight;
            doc.mirror = mirror_share;
            services.push(doc);
        }
    }
    let resolved = match unresolved {
        None => Cond::yes("ResolvedRefs", "ResolvedRefs", ""),
        Some((reason, message)) => Cond::no("ResolvedRefs", reason, message),
    };
    Ok((services, resolved))
}

/// A header modifier filter (`RequestHeaderModifier`, `ResponseHeaderModifier`, at a rule or a
/// backendRef: all `{set, add, remove}`) as the router's changes, checked as the router checks
/// them.
fn header_modifier(at: &str, modifier: &impl serde::Serialize) -> Result<HeaderChanges, String> {
    let json = serde_json::to_value(modifier).map_err(|e| format!("{at}: {e}"))?;
    serde_json::from_value(json).map_err(|e| format!("{at}: {e}"))
}

/// A rule's filters: what it changes in requests and in answers, and its mirror (the target's
/// endpoints and share).
struct RuleFilters {
    requests: HeaderChanges,
    answers: HeaderChanges,
    mirror: Option<(Endpoints, Weight)>,
}

fn filters(
    i: usize,
    rule: &HttpRouteRules,
    resolve: &mut impl FnMut(
        &str,
        Option<&String>,
        Option<&String>,
        Option<&String>,
        Option<i32>,
    ) -> Result<Vec<UpstreamUrl>, String>,
) -> Result<RuleFilters, String> {
    let mut out = RuleFilters {
        requests: HeaderChanges::default(),
        answers: HeaderChanges::default(),
        mirror: None,
    };
    let at = format!("rules[{i}].filters");
    for filter in rule.filters.iter().flatten() {
        let f: &HttpRouteRulesFilters = filter;
        match f.r#type {
            HttpRouteRulesFiltersType::RequestHeaderModifier => {
                if let Some(m) = &f.request_header_modifier {
                    out.requests = header_modifier(&at, m)?;
                }
            }
            HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                if let Some(m) = &f.response_header_modifier {
                    out.answers = header_modifier(&at, m)?;
                }
            }
            HttpRouteRulesFiltersType::RequestMirror => {
                let Some(m) = &f.request_mirror else {
                    continue;
                };
                if out.mirror.is_some() {
                    return Err(format!("rules[{i}]: more than one RequestMirror"));
                }
                let b = &m.backend_ref;
                let share = match (&m.percent, &m.fraction) {
                    (Some(p), _) => i64::from(*p) * 100,
                    (None, Some(f)) => {
                        let denominator = i64::from(f.denominator.unwrap_or(100).max(1));
                        i64::from(f.numerator) * 10_000 / denominator
                    }
                    (None, None) => 10_000,
                };
                let share = Weight::from_basis_points(share.clamp(0, 10_000) as u32)
                    .unwrap_or(Weight::ZERO);
                // A mirror that does not resolve copies nothing (ResolvedRefs says why).
                if let Ok(urls) = resolve(
                    &b.name,
                    b.namespace.as_ref(),
                    b.group.as_ref(),
                    b.kind.as_ref(),
                    b.port,
                ) {
                    out.mirror = Some((Endpoints::new(urls), share));
                }
            }
            ref other => {
                return Err(format!(
                    "rules[{i}]: filter {other:?} is not supported by Coalmine's router"
                ))
            }
        }
    }
    Ok(out)
}

/// What one `HTTPRouteMatch` selects, as a router service's selectors.
struct Selectors {
    paths: Vec<PathMatch>,
    methods: Vec<String>,
    rules: Vec<MatchRule>,
}

fn route_match(i: usize, j: usize, m: &HttpRouteRulesMatches) -> Result<Selectors, String> {
    let at = format!("rules[{i}].matches[{j}]");
    let path = match &m.path {
        None => PathMatch::Prefix(PathPrefix::parse("/").expect("/ is a prefix")),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p
                .r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
            {
                HttpRouteRulesMatchesPathType::PathPrefix => PathPrefix::parse(&value)
                    .map(PathMatch::Prefix)
                    .map_err(|e| format!("{at}.path: {e}"))?,
                HttpRouteRulesMatchesPathType::Exact => PathMatch::Exact(value),
                HttpRouteRulesMatchesPathType::RegularExpression => {
                    serde_json::from_value::<PathMatch>(serde_json::json!({ "regex": value }))
                        .map_err(|e| format!("{at}.path: {e}"))?
                }
            }
        }
    };
    let paths = if path == PathMatch::Prefix(PathPrefix::parse("/").expect("/ is a prefix")) {
        Vec::new()
    } else {
        vec![path]
    };
    let mut all = Vec::new();
    for h in m.headers.iter().flatten() {
        let name = HeaderName::parse(&h.name).map_err(|e| format!("{at}.headers: {e}"))?;
        let test = match h
            .r#type
            .clone()
            .unwrap_or(HttpRouteRulesMatchesHeadersType::Exact)
        {
            HttpRouteRulesMatchesHeadersType::Exact => StrMatch::Exact(h.value.clone()),
            HttpRouteRulesMatchesHeadersType::RegularExpression => {
                StrMatch::regex(&h.value).map_err(|e| format!("{at}.headers: {e}"))?
            }
        };
        all.push(MatchCondition {
            subject: Subject::Header(name),
            test,
        });
    }
    for q in m.query_params.iter().flatten() {
        let test = match q
            .r#type
            .clone()
            .unwrap_or(HttpRouteRulesMatchesQueryParamsType::Exact)
        {
            HttpRouteRulesMatchesQueryParamsType::Exact => StrMatch::Exact(q.value.clone()),
            HttpRouteRulesMatchesQueryParamsType::RegularExpression => {
                StrMatch::regex(&q.value).map_err(|e| format!("{at}.queryParams: {e}"))?
            }
        };
        all.push(MatchCondition {
            subject: Subject::Query(q.name.clone()),
            test,
        });
    }
    let selectors = if all.is_empty() {
        Vec::new()
    } else {
        vec![MatchRule { all }]
    };
    let methods = m
        .method
        .iter()
        .filter_map(|method| {
            serde_json::to_value(method)
                .ok()?
                .as_str()
                .map(str::to_string)
        })
        .collect();
    Ok(Selectors {
        paths,
        methods,
        rules: selectors,
    })
}

fn gateway_state(
    gateway: &Gateway,
    attached: &HashMap<(String, String, String), i32>,
) -> ObjectState {
    let namespace = gateway.namespace().unwrap_or_default();
    let name = gateway.name_any();
    let mut listeners = Vec::new();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &gateway.spec.listeners {
        *names.entry(l.name.as_str()).or_default() += 1;
    }
    let mut all_ok = true;
    for l in &gateway.spec.listeners {
        let routes = attached
            .get(&(namespace.clone(), name.clone(), l.name.clone()))
            .copied()
            .unwrap_or(0);
        let conditions = if serves_http(l) {
            vec![
                Cond::yes("Accepted", "Accepted", ""),
                Cond::yes("ResolvedRefs", "ResolvedRefs", ""),
                Cond::yes("Programmed", "Programmed", ""),
                Cond::no("Conflicted", "NoConflicts", ""),
            ]
        } else {
            all_ok = false;
            let why = format!(
                "protocol {} is not served by Coalmine's Gateway (HTTP only)",
                l.protocol
            );
            vec![
                Cond::no("Accepted", "UnsupportedProtocol", why.clone()),
                Cond::yes("ResolvedRefs", "ResolvedRefs", ""),
                Cond::no("Programmed", "Invalid", why),
                Cond::no("Conflicted", "NoConflicts", ""),
            ]
        };
        listeners.push(ListenerState {
            name: l.name.clone(),
            attached_routes: routes,
            supported_kinds: if serves_http(l) {
                vec!["HTTPRoute"]
            } else {
                Vec::new()
            },
            conditions,
        });
    }
    let conditions = if all_ok {
        vec![
            Cond::yes("Accepted", "Accepted", ""),
            Cond::yes(
                "Programmed",
                "Programmed",
                "the routers' tables carry this Gateway's routes",
            ),
        ]
    } else {
        vec![
            Cond::no(
                "Accepted",
                "ListenersNotValid",
                "a listener is not served (see its conditions)",
            ),
            Cond::yes(
                "Programmed",
                "Programmed",
                "the routers' tables carry this Gateway's valid listeners' routes",
            ),
        ]
    };
    ObjectState {
        namespace,
        name,
        generation: generation(&gateway.metadata),
        conditions,
        listeners,
    }
}

/// Conditions as status JSON: the time of a condition whose status did not change is kept from
/// `previous`, a changed one gets `now` (RFC 3339).
pub fn conditions_json(
    conditions: &[Cond],
    previous: Option<&serde_json::Value>,
    generation: i64,
    now: &str,
) -> serde_json::Value {
    let old = |kind: &str| {
        previous
            .and_then(|p| p.as_array())
            .and_then(|list| list.iter().find(|c| c["type"] == kind))
    };
    conditions
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = old(c.kind)
                .filter(|o| o["status"] == status)
                .and_then(|o| o["lastTransitionTime"].as_str())
                .unwrap_or(now);
            serde_json::json!({
                "type": c.kind,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation,
                "lastTransitionTime": since,
            })
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class() -> GatewayClass {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": "coalmine", "generation": 1},
            "spec": {"controllerName": CONTROLLER_NAME},
        }))
        .unwrap()
    }

    fn gateway(listeners: serde_json::Value) -> Gateway {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "shop", "generation": 2},
            "spec": {"gatewayClassName": "coalmine", "listeners": listeners},
        }))
        .unwrap()
    }

    fn http_listener() -> serde_json::Value {
        json!([{"name": "web", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"}])
    }

    fn route(name: &str, namespace: &str, spec: serde_json::Value) -> HttpRoute {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace, "generation": 3},
            "spec": spec,
        }))
        .unwrap()
    }

    fn service(name: &str) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 9898, "targetPort": 8080}]},
        }))
        .unwrap()
    }

    fn slice(service: &str, addresses: &[(&str, Option<bool>)]) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-abc"), "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": addresses.iter().map(|(a, ready)| json!({
                "addresses": [a], "conditions": {"ready": ready}
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    /// Flagger's HTTPRoute for `podinfo` at 10 %, with a header match rule.
    fn flagger_route() -> HttpRoute {
        route(
            "podinfo",
            "shop",
            json!({
                "parentRefs": [{"name": "edge"}],
                "hostnames": ["app.example.com"],
                "rules": [
                    {"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                     "backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 0},
                                     {"name": "podinfo-canary", "port": 9898, "weight": 100}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "filters": [{"type": "RequestHeaderModifier",
                                  "requestHeaderModifier": {"set": [{"name": "x-via", "value": "coalmine"}]}}],
                     "backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 90},
                                     {"name": "podinfo-canary", "port": 9898, "weight": 10}]},
                ],
            }),
        )
    }

    fn cluster(routes: Vec<HttpRoute>) -> ClusterView {
        ClusterView {
            classes: vec![class()],
            gateways: vec![gateway(http_listener())],
            routes,
            grants: Vec::new(),
            namespaces: Vec::new(),
            last_accepted: HashMap::new(),
            services: vec![service("podinfo-primary"), service("podinfo-canary")],
            slices: vec![
                slice(
                    "podinfo-primary",
                    &[
                        ("10.231.0.2", Some(true)),
                        ("10.231.0.3", None),
                        ("10.231.0.4", Some(false)),
                    ],
                ),
                slice("podinfo-canary", &[("10.231.0.5", Some(true))]),
            ],
        }
    }

    fn urls(e: &Endpoints) -> Vec<&str> {
        e.urls().map(|u| u.as_str()).collect()
    }

    #[test]
    fn flaggers_httproute_becomes_services_weighed_over_ready_pod_addresses() {
        let mut with_method = flagger_route();
        with_method.spec.rules.as_mut().unwrap()[0]
            .matches
            .as_mut()
            .unwrap()[0]
            .method = Some(gateway_api::httproutes::HttpRouteRulesMatchesMethod::Post);
        let t = translate(&cluster(vec![with_method]), CONTROLLER_NAME);
        assert_eq!(t.table.len(), 2);
        assert_eq!(t.table[0].methods, ["POST"]);
        let (matched, weighed) = (&t.table[0], &t.table[1]);
        assert_eq!(matched.service, "shop.podinfo.0.0");
        assert_eq!(weighed.service, "shop.podinfo.1.0");
        // Ready (or unset) endpoints on the target port; never the cluster IP.
        assert_eq!(
            urls(&weighed.stable),
            ["http://10.231.0.2:8080", "http://10.231.0.3:8080"]
        );
        assert_eq!(
            urls(weighed.canary.as_ref().unwrap()),
            ["http://10.231.0.5:8080"]
        );
        assert_eq!(weighed.canary_weight.basis_points(), 1_000);
        assert_eq!(matched.canary_weight.basis_points(), 10_000);
        assert_eq!(matched.headers.len(), 1);
        assert_eq!(weighed.hosts[0].as_str(), "app.example.com");
        assert_eq!(weighed.request_headers.set[0].value, "coalmine");
        assert!(weighed.paths.is_empty(), "PathPrefix / is every path");
        // Statuses: class, gateway (one route attached), route accepted and resolved.
        assert_eq!(
            t.classes[0].conditions[0],
            Cond::yes(
                "Accepted",
                "Accepted",
                "Coalmine's router serves this class"
            )
        );
        assert_eq!(t.gateways[0].listeners[0].attached_routes, 1);
        assert!(t.gateways[0].conditions.iter().all(|c| c.status));
        let parent = &t.routes[0].parents[0];
        assert!(
            parent.conditions.iter().all(|c| c.status),
            "{:?}",
            parent.conditions
        );
    }

    #[test]
    fn a_route_the_listeners_do_not_take_is_not_accepted_and_routes_nothing() {
        // Another namespace (listeners take their own by default), and a host outside
        // `*.example.com`.
        let elsewhere = route(
            "other",
            "web",
            json!({"parentRefs": [{"name": "edge", "namespace": "shop"}],
            "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
        );
        let wrong_host = route(
            "wrong",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "hostnames": ["shop.test"],
            "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
        );
        let wrong_section = route(
            "section",
            "shop",
            json!({"parentRefs": [{"name": "edge", "sectionName": "tls"}],
            "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
        );
        let t = translate(
            &cluster(vec![elsewhere, wrong_host, wrong_section]),
            CONTROLLER_NAME,
        );
        assert!(t.table.is_empty(), "{:?}", t.table);
        let reasons: Vec<_> = t
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.parents[0].conditions[0].reason))
            .collect();
        // In Gateway API's order: by namespace and name when no route is older.
        assert_eq!(
            reasons,
            [
                ("section", "NoMatchingParent"),
                ("wrong", "NoMatchingListenerHostname"),
                ("other", "NotAllowedByListeners")
            ]
        );
        assert_eq!(t.gateways[0].listeners[0].attached_routes, 0);
    }

    #[test]
    fn what_the_router_cannot_do_refuses_the_route_and_a_missing_backend_keeps_its_share_as_500s() {
        let method = route(
            "method",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "x.test"}}],
                       "backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
        );
        let missing = route(
            "missing",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 3},
                                       {"name": "nope", "port": 9898, "weight": 1}]},
                      {"matches": [{"path": {"type": "Exact", "value": "/ok"}}],
                       "backendRefs": [{"group": "example.com", "kind": "Thing", "name": "x"}]}]}),
        );
        let t = translate(&cluster(vec![method, missing]), CONTROLLER_NAME);
        let accepted = |name: &str| {
            t.routes.iter().find(|r| r.name == name).unwrap().parents[0]
                .conditions
                .clone()
        };
        assert_eq!(accepted("method")[0].reason, "UnsupportedValue");
        assert!(
            accepted("method")[0].message.contains("UrlRewrite"),
            "{:?}",
            accepted("method")
        );
        let missing = accepted("missing");
        assert!(missing[0].status, "accepted");
        assert_eq!(
            (missing[1].status, missing[1].reason),
            (false, "BackendNotFound")
        );
        // The missing Service keeps its quarter, answered 500; a rule of only an unknown kind
        // answers everything 500.
        let services: Vec<_> = t.table.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(services, ["shop.missing.0.0", "shop.missing.1.0"]);
        assert_eq!(t.table[0].canary_weight.basis_points(), 2_500);
        let invalid = |e: &Endpoints| e.groups().iter().all(|g| g.invalid.is_some());
        assert!(invalid(t.table[0].canary.as_ref().unwrap()));
        assert!(!invalid(&t.table[0].stable));
        assert_eq!(t.table[1].paths, [PathMatch::Exact("/ok".into())]);
        assert!(invalid(&t.table[1].stable), "{:?}", t.table[1].stable);
    }

    #[test]
    fn three_backends_split_exactly_by_weight_the_first_stable_the_others_the_canary() {
        let three = route(
            "three",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 70},
                                       {"name": "podinfo-canary", "port": 9898, "weight": 30},
                                       {"name": "podinfo-primary", "port": 9898, "weight": 0}]}]}),
        );
        let t = translate(&cluster(vec![three]), CONTROLLER_NAME);
        let s = &t.table[0];
        assert_eq!(s.canary_weight.basis_points(), 3_000);
        let groups = s.canary.as_ref().unwrap().groups();
        assert_eq!(groups.iter().map(|g| g.weight).collect::<Vec<_>>(), [30, 0]);
    }

    #[test]
    fn a_mirror_to_another_service_is_a_canary_at_weight_zero_that_gets_the_copies() {
        let r = route(
            "mirror",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {
                          "backendRef": {"name": "podinfo-canary", "port": 9898}, "percent": 25}}],
                       "backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
        );
        let t = translate(&cluster(vec![r]), CONTROLLER_NAME);
        let s = &t.table[0];
        assert_eq!(s.canary_weight, Weight::ZERO);
        assert_eq!(s.mirror.basis_points(), 2_500);
        assert_eq!(urls(s.canary.as_ref().unwrap()), ["http://10.231.0.5:8080"]);
    }

    #[test]
    fn hostnames_intersect_as_gateway_api_says() {
        assert_eq!(
            intersect(None, "a.example.com").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            intersect(Some("*.example.com"), "a.example.com").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(intersect(Some("*.example.com"), "example.com"), None);
        assert_eq!(
            intersect(Some("a.example.com"), "*.example.com").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            intersect(Some("*.example.com"), "*.b.example.com").as_deref(),
            Some("*.b.example.com")
        );
        assert_eq!(
            intersect(Some("*.b.example.com"), "*.example.com").as_deref(),
            Some("*.b.example.com")
        );
        assert_eq!(intersect(Some("a.test"), "b.test"), None);
    }

    #[test]
    fn a_condition_keeps_its_time_until_its_status_changes() {
        let old = json!([{"type": "Accepted", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        let kept = conditions_json(
            &[Cond::yes("Accepted", "Accepted", "")],
            Some(&old),
            4,
            "2026-12-04T00:00:00Z",
        );
        assert_eq!(kept[0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(kept[0]["observedGeneration"], 4);
        let moved = conditions_json(
            &[Cond::no("Accepted", "NoMatchingParent", "x")],
            Some(&old),
            4,
            "2026-12-04T00:00:00Z",
        );
        assert_eq!(moved[0]["lastTransitionTime"], "2026-12-04T00:00:00Z");
    }

    #[test]
    fn long_names_stay_within_a_label() {
        let p = route_service_prefix(&"n".repeat(63), &"r".repeat(253));
        assert!(format!("{p}.12.3").len() <= 63, "{p}");
        assert_eq!(route_service_prefix("shop", "podinfo"), "shop.podinfo");
    }

    #[test]
    fn an_edit_the_router_cannot_do_leaves_the_last_accepted_spec_serving() {
        let mut view = cluster(vec![flagger_route()]);
        let first = translate(&view, CONTROLLER_NAME);
        assert_eq!(first.table.len(), 2);
        view.last_accepted = first.accepted.clone();
        // An edit with a filter the router does not have: not accepted, and the previous
        // routes stay — with the endpoints as they are now.
        let mut edited = flagger_route();
        edited.metadata.generation = Some(4);
        edited.spec.rules.as_mut().unwrap()[1].filters = Some(vec![serde_json::from_value(
            json!({"type": "URLRewrite", "urlRewrite": {"hostname": "x.test"}}),
        )
        .unwrap()]);
        view.routes = vec![edited];
        view.slices[1] = slice("podinfo-canary", &[("10.231.0.6", Some(true))]);
        let second = translate(&view, CONTROLLER_NAME);
        assert_eq!(second.table.len(), 2, "still serving");
        assert_eq!(
            urls(second.table[1].canary.as_ref().unwrap()),
            ["http://10.231.0.6:8080"]
        );
        let accepted = &second.routes[0].parents[0].conditions[0];
        assert_eq!(
            (accepted.status, accepted.reason),
            (false, "UnsupportedValue")
        );
        assert!(
            accepted
                .message
                .contains("generation 3, the last accepted, keeps serving"),
            "{accepted:?}"
        );
        // Without a last accepted spec (a router started after the edit), nothing serves it.
        view.last_accepted.clear();
        assert!(translate(&view, CONTROLLER_NAME).table.is_empty());
    }

    #[test]
    fn a_service_in_another_namespace_needs_a_reference_grant_there() {
        let cross = route(
            "cross",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
                   "rules": [{"backendRefs": [{"name": "payments", "namespace": "pay", "port": 9898}]}]}),
        );
        let mut view = cluster(vec![cross]);
        let mut payments = service("payments");
        payments.metadata.namespace = Some("pay".into());
        view.services.push(payments);
        let mut slice = slice("payments", &[("10.231.0.9", Some(true))]);
        slice.metadata.namespace = Some("pay".into());
        view.slices.push(slice);
        let refused = translate(&view, CONTROLLER_NAME);
        let resolved = &refused.routes[0].parents[0].conditions[1];
        assert_eq!(
            (resolved.status, resolved.reason),
            (false, "RefNotPermitted")
        );
        assert!(
            refused.table[0].stable.groups()[0].invalid.is_some(),
            "500s, not the Service"
        );
        // A grant for another Service, or from another namespace, is not this one.
        let grant = |from_ns: &str, to_name: Option<&str>| -> ReferenceGrant {
            serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "ReferenceGrant",
                "metadata": {"name": "let-shop-in", "namespace": "pay"},
                "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": from_ns}],
                         "to": [{"group": "", "kind": "Service", "name": to_name}]},
            }))
            .unwrap()
        };
        view.grants = vec![grant("web", None), grant("shop", Some("ledger"))];
        let still = translate(&view, CONTROLLER_NAME);
        assert_eq!(
            still.routes[0].parents[0].conditions[1].reason,
            "RefNotPermitted"
        );
        view.grants = vec![grant("shop", Some("payments"))];
        let granted = translate(&view, CONTROLLER_NAME);
        assert!(granted.routes[0].parents[0].conditions[1].status);
        assert_eq!(urls(&granted.table[0].stable), ["http://10.231.0.9:8080"]);
    }

    #[test]
    fn a_listener_selecting_namespaces_by_label_takes_routes_of_those_only() {
        let listeners = json!([{"name": "web", "port": 80, "protocol": "HTTP",
            "allowedRoutes": {"namespaces": {"from": "Selector", "selector": {
                "matchLabels": {"shared-gateway": "true"},
                "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}}}}]);
        let routed = |namespace: &str| {
            route(
                namespace,
                namespace,
                json!({"parentRefs": [{"name": "edge", "namespace": "shop"}],
                       "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
            )
        };
        let namespace = |name: &str, labels: serde_json::Value| -> Namespace {
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels}}))
            .unwrap()
        };
        let mut view = cluster(vec![routed("team-a"), routed("team-b"), routed("team-c")]);
        view.gateways = vec![gateway(listeners)];
        view.namespaces = vec![
            namespace("team-a", json!({"shared-gateway": "true"})),
            namespace("team-b", json!({"shared-gateway": "true", "env": "dev"})),
            namespace("team-c", json!({})),
        ];
        let t = translate(&view, CONTROLLER_NAME);
        let accepted: Vec<_> = t
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.parents[0].conditions[0].status))
            .collect();
        assert_eq!(
            accepted,
            [("team-a", true), ("team-b", false), ("team-c", false)]
        );
        assert_eq!(t.gateways[0].listeners[0].attached_routes, 1);
    }

    #[test]
    fn flaggers_session_affinity_sets_its_cookie_on_the_canarys_answers_only() {
        // What provider gatewayapi writes for sessionAffinity (Flagger's gateway_api.go): a
        // rule for requests carrying the cookie, and the Set-Cookie on the canary's backend.
        let sticky = route(
            "podinfo",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [
                {"matches": [{"headers": [{"name": "Cookie", "type": "RegularExpression", "value": ".*flagger-cookie=abc.*"}]}],
                 "backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 0},
                                 {"name": "podinfo-canary", "port": 9898, "weight": 100}]},
                {"filters": [{"type": "ResponseHeaderModifier",
                              "responseHeaderModifier": {"set": [{"name": "x-route", "value": "podinfo"}]}}],
                 "backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 90},
                                 {"name": "podinfo-canary", "port": 9898, "weight": 10, "filters": [
                                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                                         "add": [{"name": "Set-Cookie", "value": "flagger-cookie=abc; Max-Age=86400"}]}}]}]},
            ]}),
        );
        let t = translate(&cluster(vec![sticky]), CONTROLLER_NAME);
        assert!(
            t.routes[0].parents[0].conditions[0].status,
            "{:?}",
            t.routes[0].parents[0]
        );
        let weighed = &t.table[1];
        assert_eq!(weighed.response_headers.set[0].value, "podinfo");
        let canary = &weighed.canary.as_ref().unwrap().groups()[0];
        assert_eq!(canary.response_headers.add[0].name.as_str(), "set-cookie");
        assert!(weighed.stable.groups()[0].response_headers.is_empty());
        // Another backend filter is still refused by name.
        let rewrite = route(
            "rewrite",
            "shop",
            json!({"parentRefs": [{"name": "edge"}], "rules": [{"backendRefs": [
                {"name": "podinfo-primary", "port": 9898, "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "x.test"}}]}]}]}),
        );
        let t = translate(&cluster(vec![rewrite]), CONTROLLER_NAME);
        let accepted = &t.routes[0].parents[0].conditions[0];
        assert_eq!(accepted.reason, "UnsupportedValue");
        assert!(accepted.message.contains("UrlRewrite"), "{accepted:?}");
    }

    #[test]
    fn a_route_whose_service_names_an_older_route_holds_is_refused_alone_and_the_table_stays_whole()
    {
        // A long route name is shortened to 31 characters and a hash; a route of the same
        // namespace may be named exactly that shortened form. The table must not carry one
        // service name twice (the router refuses such a table whole, freezing every route).
        let long = "checkout-frontend-production-europe-west-canary";
        let taken = route_service_prefix("shop", long);
        assert_ne!(taken, format!("shop.{long}"), "the name is shortened");
        let twin_name = taken.strip_prefix("shop.").unwrap();
        let mut older = route(
            long,
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
        );
        older.metadata.creation_timestamp =
            Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
        let mut twin = route(
            twin_name,
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"backendRefs": [{"name": "podinfo-canary", "port": 9898}]}]}),
        );
        twin.metadata.creation_timestamp =
            Some(serde_json::from_value(json!("2026-02-01T00:00:00Z")).unwrap());
        assert_eq!(route_service_prefix("shop", twin_name), taken);
        let t = translate(&cluster(vec![twin, older]), CONTROLLER_NAME);
        coalmine_contract::check_services(&t.table).expect("a table the router takes");
        assert_eq!(t.table.len(), 1, "{:?}", t.table);
        assert_eq!(t.table[0].name, format!("shop/{long}"));
        assert_eq!(
            urls(&t.table[0].stable),
            ["http://10.231.0.2:8080", "http://10.231.0.3:8080"]
        );
        let state = |name: &str| {
            t.routes
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.parents[0].conditions[0].clone())
                .unwrap()
        };
        assert!(state(long).status, "{:?}", state(long));
        let refused = state(twin_name);
        assert!(!refused.status);
        assert_eq!(refused.reason, "UnsupportedValue");
        assert!(refused.message.contains(long), "{refused:?}");
    }

    #[test]
    fn a_hostname_the_router_cannot_match_is_never_widened_to_every_host() {
        // Gateway API's hostname pattern takes a label of any length; a DNS label (and the
        // router's host match) has at most 63 characters.
        let too_long = format!("{}.example.com", "a".repeat(64));
        let bad_route_host = route(
            "long-host",
            "shop",
            json!({"parentRefs": [{"name": "edge"}], "hostnames": [too_long],
            "rules": [{"backendRefs": [{"name": "podinfo-canary", "port": 9898}]}]}),
        );
        let t = translate(&cluster(vec![bad_route_host]), CONTROLLER_NAME);
        assert!(
            t.table.iter().all(|s| !s.hosts.is_empty()),
            "a route for one host must not take every host: {:?}",
            t.table
        );
        let accepted = &t.routes[0].parents[0].conditions[0];
        assert!(!accepted.status, "{accepted:?}");
        assert!(accepted.message.contains(&too_long), "{accepted:?}");
        // A listener's own hostname alike: its routes take none of it, not every host.
        let mut view = cluster(vec![route(
            "any",
            "shop",
            json!({"parentRefs": [{"name": "edge"}],
            "rules": [{"backendRefs": [{"name": "podinfo-canary", "port": 9898}]}]}),
        )]);
        view.gateways = vec![gateway(
            json!([{"name": "web", "port": 80, "protocol": "HTTP", "hostname": too_long}]),
        )];
        let t = translate(&view, CONTROLLER_NAME);
        assert!(
            t.table.iter().all(|s| !s.hosts.is_empty()),
            "a listener for one host must not take every host: {:?}",
            t.table
        );
    }

    #[test]
    fn a_route_that_left_our_gateways_loses_our_status_entries_and_keeps_the_others() {
        // Moved to another implementation's Gateway: our `Accepted=True` would stay behind
        // and say the router carries a route it no longer routes.
        let with_status = |name: &str, parents: serde_json::Value| -> HttpRoute {
            let mut r = route(
                name,
                "shop",
                json!({"parentRefs": [{"name": "theirs"}],
                "rules": [{"backendRefs": [{"name": "podinfo-primary", "port": 9898}]}]}),
            );
            r.status = serde_json::from_value(json!({ "parents": parents })).unwrap();
            r
        };
        let ours = json!({"parentRef": {"name": "edge"}, "controllerName": CONTROLLER_NAME,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let theirs = json!({"parentRef": {"name": "theirs"}, "controllerName": "example.net/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let moved = with_status("moved", json!([ours, theirs]));
        let never_ours = with_status("never", json!([theirs]));
        let t = translate(&cluster(vec![moved, never_ours]), CONTROLLER_NAME);
        assert!(t.table.is_empty());
        let names: Vec<_> = t.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["moved"],
            "only a route with our entries gets a status write"
        );
        assert!(t.routes[0].parents.is_empty());
    }

    #[test]
    fn a_router_that_never_saw_the_accepted_spec_reads_it_from_the_route() {
        let accepted = flagger_route();
        let mut edited = flagger_route();
        edited.metadata.generation = Some(4);
        edited.spec.rules.as_mut().unwrap()[1].filters = Some(vec![serde_json::from_value(
            json!({"type": "URLRewrite", "urlRewrite": {"hostname": "x.test"}}),
        )
        .unwrap()]);
        // No memory and no annotation: nothing serves the route.
        assert!(translate(&cluster(vec![edited.clone()]), CONTROLLER_NAME)
            .table
            .is_empty());
        // The annotation another router wrote when it accepted generation 3.
        edited
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(LAST_ACCEPTED_ANNOTATION.into(), remember(&accepted));
        let t = translate(&cluster(vec![edited]), CONTROLLER_NAME);
        assert_eq!(t.table.len(), 2, "served as generation 3");
        let message = &t.routes[0].parents[0].conditions[0].message;
        assert!(
            message.contains("generation 3, the last accepted, keeps serving"),
            "{message}"
        );
        // A garbled annotation is no memory.
        let mut garbled = flagger_route();
        garbled.spec.rules.as_mut().unwrap()[1].filters = Some(vec![serde_json::from_value(
            json!({"type": "URLRewrite", "urlRewrite": {"hostname": "x.test"}}),
        )
        .unwrap()]);
        garbled
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(LAST_ACCEPTED_ANNOTATION.into(), "{not json".into());
        assert!(translate(&cluster(vec![garbled]), CONTROLLER_NAME)
            .table
            .is_empty());
    }
}
