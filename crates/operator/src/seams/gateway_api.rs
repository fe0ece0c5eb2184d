//! Provider `gatewayapi:v1` (and `gatewayapi:v1beta1`, the same object at that version): the
//! `HTTPRoute` Flagger's Gateway API router writes (`pkg/router/gateway_api.go`) — named after
//! the apex Service, attached to `service.gatewayRefs`, for `service.hosts`, its rule sending
//! the `<apex>-primary` and `<apex>-canary` Services their `backendRefs` weights.
//!
//! As under Coalmine's routers: requests matching `analysis.match` (headers and query
//! parameters, as `HTTPRouteMatch`es under the rule's path) go to the canary in a rule of their
//! own, the rest are weighed; mirroring is a `RequestMirror` filter on the weighted rule; session
//! affinity is Flagger's — a `Set-Cookie` response header on the canary's backend and a rule
//! before the others sending requests that carry the cookie to the canary. `rules` is one atomic
//! list for server-side apply: a user's rules to other backends stay ahead of Coalmine's, and
//! what they added to their rule to this service (a timeout, filters) is carried onto Coalmine's
//! ([`merge_routes`]).

use coalmine_controller::BoxFuture;
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::{HttpMatch, StringMatch};
use gateway_api::httproutes::{
    HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesBackendRefsFilters, HttpRouteRulesBackendRefsFiltersResponseHeaderModifier,
    HttpRouteRulesBackendRefsFiltersResponseHeaderModifierAdd,
    HttpRouteRulesBackendRefsFiltersType, HttpRouteRulesFilters,
    HttpRouteRulesFiltersRequestMirror, HttpRouteRulesFiltersRequestMirrorBackendRef,
    HttpRouteRulesFiltersType, HttpRouteRulesMatches, HttpRouteRulesMatchesHeaders,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPath, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParams, HttpRouteRulesMatchesQueryParamsType, HttpRouteSpec,
};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{json, Value};

use crate::seams::istio::regex_escape;
use crate::seams::routed::{
    apply_route_object, merge_routes, read_object, RouteObjects, RouteSpec,
};

const GROUP: &str = "gateway.networking.k8s.io";
/// The fields of an HTTPRoute rule that Coalmine sets (its `filters` are carried but for the
/// mirror, which is Coalmine's).
const OWNED_RULE_FIELDS: &[&str] = &["name", "matches", "backendRefs", "filters"];

/// The HTTPRoute of one rollout, at `version` (`v1` or `v1beta1`).
pub struct GatewayApiRoutes {
    routes: Api<DynamicObject>,
    version: &'static str,
    spec: RouteSpec,
}

impl GatewayApiRoutes {
    pub fn new(client: &kube::Client, version: &'static str, spec: RouteSpec) -> GatewayApiRoutes {
        GatewayApiRoutes {
            routes: Api::namespaced_with(
                client.clone(),
                &spec.namespace,
                &ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(GROUP, version, "HTTPRoute"),
                    "httproutes",
                ),
            ),
            version,
            spec,
        }
    }

    async fn write(&self, traffic: &Traffic) -> Result<Vec<String>, TrafficFault> {
        let before = read_object(&self.routes, "HTTPRoute", &self.spec.apex).await?;
        let route = http_route(&self.spec, self.version, traffic, before.as_ref());
        Ok(
            apply_route_object(&self.routes, "HTTPRoute", before.as_ref(), &route)
                .await?
                .into_iter()
                .collect(),
        )
    }
}

impl RouteObjects for GatewayApiRoutes {
    fn put<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(self.write(traffic))
    }
}

/// What Gateway API cannot say of a rollout's `analysis` (its header and query matches are
/// exact or regular expressions): the field and why.
pub fn unsupported(spec: &RouteSpec) -> Option<(String, String)> {
    if spec.gateway_refs.is_empty() {
        return Some((
            "spec.service.gatewayRefs".into(),
            "provider gatewayapi attaches the HTTPRoute to Gateways: name at least one".into(),
        ));
    }
    spec.matches.iter().enumerate().find_map(|(i, m)| {
        (!m.source_labels.is_empty()).then(|| {
            (
                format!("spec.analysis.match[{i}].sourceLabels"),
                "Gateway API cannot match on the client's labels".to_string(),
            )
        })
    })
}

/// A backend: the Service `name` on the rollout's port, at `weight`.
fn backend(spec: &RouteSpec, name: String, weight: i32) -> HttpRouteRulesBackendRefs {
    HttpRouteRulesBackendRefs {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name,
        port: Some(spec.port),
        weight: Some(weight),
        ..Default::default()
    }
}

/// Every path: the rule's match when the Canary gives none (Flagger's).
fn any_path() -> HttpRouteRulesMatches {
    HttpRouteRulesMatches {
        path: Some(HttpRouteRulesMatchesPath {
            r#type: Some(HttpRouteRulesMatchesPathType::PathPrefix),
            value: Some("/".into()),
        }),
        ..Default::default()
    }
}

/// The HTTPRoute carrying `traffic`; `existing` gives what a user added to its rules.
pub fn http_route(
    spec: &RouteSpec,
    version: &str,
    traffic: &Traffic,
    existing: Option<&DynamicObject>,
) -> Value {
    let (primary_weight, canary_weight) = RouteSpec::weights(traffic);
    let (primary, canary) = (spec.primary(), spec.canary());
    let all_to_canary = || {
        vec![
            backend(spec, primary.clone(), 0),
            backend(spec, canary.clone(), 100),
        ]
    };
    let mut rules = Vec::new();
    let sticky = spec.sticky(traffic);
    if let Some(affinity) = sticky {
        rules.push(HttpRouteRules {
            matches: Some(vec![HttpRouteRulesMatches {
                headers: Some(vec![HttpRouteRulesMatchesHeaders {
                    name: "Cookie".into(),
                    r#type: Some(HttpRouteRulesMatchesHeadersType::RegularExpression),
                    value: affinity.cookie_regex(),
                }]),
                ..any_path()
            }]),
            backend_refs: Some(all_to_canary()),
            ..Default::default()
        });
    }
    if traffic.apply_match && traffic.canary && !spec.matches.is_empty() {
        rules.push(HttpRouteRules {
            matches: Some(spec.matches.iter().map(route_match).collect()),
            backend_refs: Some(all_to_canary()),
            ..Default::default()
        });
    }
    let mut canary_backend = backend(spec, canary.clone(), canary_weight as i32);
    if let Some(affinity) = sticky {
        canary_backend.filters = Some(vec![HttpRouteRulesBackendRefsFilters {
            r#type: HttpRouteRulesBackendRefsFiltersType::ResponseHeaderModifier,
            response_header_modifier: Some(
                HttpRouteRulesBackendRefsFiltersResponseHeaderModifier {
                    add: Some(vec![
                        HttpRouteRulesBackendRefsFiltersResponseHeaderModifierAdd {
                            name: "Set-Cookie".into(),
                            value: affinity.set_cookie(),
                        },
                    ]),
                    ..Default::default()
                },
            ),
            ..Default::default()
        }]);
    }
    let mirror = RouteSpec::mirror_percent(traffic).map(|percent| HttpRouteRulesFilters {
        r#type: HttpRouteRulesFiltersType::RequestMirror,
        request_mirror: Some(HttpRouteRulesFiltersRequestMirror {
            backend_ref: HttpRouteRulesFiltersRequestMirrorBackendRef {
                group: Some(String::new()),
                kind: Some("Service".into()),
                name: canary.clone(),
                port: Some(spec.port),
                ..Default::default()
            },
            percent: (percent < 100.0).then_some(percent.round() as i32),
            ..Default::default()
        }),
        ..Default::default()
    });
    rules.push(HttpRouteRules {
        matches: Some(vec![any_path()]),
        backend_refs: Some(if spec.reverted {
            vec![backend(spec, primary.clone(), 100)]
        } else {
            vec![
                backend(spec, primary.clone(), primary_weight as i32),
                canary_backend,
            ]
        }),
        filters: mirror.map(|m| vec![m]),
        ..Default::default()
    });
    let route = HttpRouteSpec {
        parent_refs: Some(
            spec.gateway_refs
                .iter()
                .map(|g| HttpRouteParentRefs {
                    name: g.name.clone(),
                    namespace: g.namespace.clone(),
                    group: g.group.clone(),
                    kind: g.kind.clone(),
                    section_name: g.section_name.clone(),
                    port: g.port,
                })
                .collect(),
        ),
        hostnames: (!spec.hosts.is_empty()).then(|| spec.hosts.clone()),
        rules: None,
    };
    let rules: Vec<Value> = rules
        .into_iter()
        .map(|r| {
            let mut rule = serde_json::to_value(r).expect("an HTTPRoute rule serializes");
            // Flagger's `service.timeout`, on every rule.
            if let Some(timeout) = &spec.timeout {
                rule["timeouts"] = json!({"request": timeout});
            }
            rule
        })
        .collect();
    let mut rules = merge_routes(
        spec,
        existing,
        &["spec", "rules"],
        OWNED_RULE_FIELDS,
        |rule| {
            let backends = rule["backendRefs"].as_array().into_iter().flatten();
            backends
                .filter_map(|b| b["name"].as_str())
                .map(str::to_string)
                .collect()
        },
        rules,
    );
    carry_user_filters(spec, &mut rules, existing);
    let mut body = serde_json::to_value(route).expect("an HTTPRoute serializes");
    body["rules"] = rules.into();
    json!({
        "apiVersion": format!("{GROUP}/{version}"),
        "kind": "HTTPRoute",
        "metadata": spec.metadata(&spec.apex, existing),
        "spec": body,
    })
}

/// The filters a user put on their rule to this service (a header modifier) onto Coalmine's
/// rules, before Coalmine's mirror; their own rules keep theirs.
fn carry_user_filters(spec: &RouteSpec, rules: &mut [Value], existing: Option<&DynamicObject>) {
    let services = [spec.apex.clone(), spec.primary(), spec.canary()];
    let to_service = |rule: &Value| {
        rule["backendRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| services.iter().any(|s| b["name"] == s.as_str()))
    };
    let theirs: Vec<Value> = existing
        .and_then(|o| o.data["spec"]["rules"].as_array())
        .into_iter()
        .flatten()
        .filter(|r| to_service(r))
        .flat_map(|r| r["filters"].as_array().cloned().unwrap_or_default())
        .filter(|f| f["type"] != "RequestMirror")
        .fold(Vec::new(), |mut unique, f| {
            if !unique.contains(&f) {
                unique.push(f);
            }
            unique
        });
    if theirs.is_empty() {
        return;
    }
    for rule in rules.iter_mut().filter(|r| to_service(r)) {
        let mut filters = theirs.clone();
        for f in rule["filters"].as_array().cloned().unwrap_or_default() {
            if !filters.contains(&f) {
                filters.push(f);
            }
        }
        rule["filters"] = filters.into();
    }
}

/// Whether `t` is an exact match, and its value (else a regular expression).
fn pattern(t: &StringMatch) -> (bool, String) {
    match t {
        StringMatch::Exact(v) => (true, v.clone()),
        StringMatch::Prefix(v) => (false, format!("{}.*", regex_escape(v))),
        StringMatch::Suffix(v) => (false, format!(".*{}", regex_escape(v))),
        StringMatch::Regex(v) => (false, v.clone()),
    }
}

/// Flagger's `HTTPMatchRequest` as an `HTTPRouteMatch` under every path; a prefix or suffix
/// (which Gateway API lacks) as a regular expression.
fn route_match(m: &HttpMatch) -> HttpRouteRulesMatches {
    let headers: Vec<HttpRouteRulesMatchesHeaders> = m
        .headers
        .iter()
        .map(|(name, t)| {
            let (exact, value) = pattern(t);
            HttpRouteRulesMatchesHeaders {
                name: name.clone(),
                r#type: Some(if exact {
                    HttpRouteRulesMatchesHeadersType::Exact
                } else {
                    HttpRouteRulesMatchesHeadersType::RegularExpression
                }),
                value,
            }
        })
        .collect();
    let query_params: Vec<HttpRouteRulesMatchesQueryParams> = m
        .query_params
        .iter()
        .map(|(name, t)| {
            let (exact, value) = pattern(t);
            HttpRouteRulesMatchesQueryParams {
                name: name.clone(),
                r#type: Some(if exact {
                    HttpRouteRulesMatchesQueryParamsType::Exact
                } else {
                    HttpRouteRulesMatchesQueryParamsType::RegularExpression
                }),
                value,
            }
        })
        .collect();
    HttpRouteRulesMatches {
        headers: (!headers.is_empty()).then_some(headers),
        query_params: (!query_params.is_empty()).then_some(query_params),
        ..any_path()
    }
}
