//! Provider `istio` writes the seed's routes: the seed's Canary (`tests/fixtures/seed/
//! flagger-web-app.yaml`) with `provider: istio` and the `analysis.match` of each of the seed's
//! hand-written VirtualServices gives the same routes, the same match and the same weights. The
//! seed routes to subsets `stable`/`canary` of one host; Coalmine (as Flagger) routes to the
//! hosts `web-app-primary`/`web-app-canary`, so destinations are compared mapped: subset stable
//! and host web-app-primary are the primary, subset canary and host web-app-canary the canary.

use coalmine_operator::crd::{Rollout, TrafficProvider};
use coalmine_operator::flagger::Canary;
use coalmine_operator::seams::istio::virtual_service;
use coalmine_operator::seams::routed::RouteSpec;
use coalmine_rollout::Traffic;
use coalmine_spec::Weight;
use serde_json::{json, Value};

const WEB_APP: &str = include_str!("../../../tests/fixtures/seed/flagger-web-app.yaml");
const HEADER: &str = include_str!("../../../tests/fixtures/seed/istio-header.yaml");
const USER: &str = include_str!("../../../tests/fixtures/seed/istio-user.yaml");
const WEIGHTED: &str = include_str!("../../../tests/fixtures/seed/istio-weighted.yaml");

/// The seed's Canary with `provider: istio` and `edit` to its analysis, as the operator runs it.
fn seed_routes(edit: impl FnOnce(&mut Value)) -> RouteSpec {
    let mut object: Value = serde_saphyr::from_str(WEB_APP).unwrap();
    object["spec"]["provider"] = "istio".into();
    edit(&mut object["spec"]["analysis"]);
    let canary: Canary = serde_json::from_value(object).unwrap();
    let spec = canary.to_rollout_spec(TrafficProvider::Kubernetes).unwrap();
    assert_eq!(spec.provider, TrafficProvider::Istio);
    let mut rollout = Rollout::new("web-app", spec);
    rollout.metadata.namespace = Some("shop".into());
    RouteSpec::of(&rollout, None)
}

/// A VirtualService's `http` routes as (match, destinations with a share), each destination
/// named `primary` or `canary`; a lone destination without a weight has all of it.
fn routes(service: &Value) -> Vec<(Value, Vec<(String, i64)>)> {
    let version = |d: &Value| -> String {
        let d = &d["destination"];
        match (d["host"].as_str().unwrap(), d["subset"].as_str()) {
            (_, Some("stable")) | ("web-app-primary", None) => "primary".into(),
            (_, Some("canary")) | ("web-app-canary", None) => "canary".into(),
            other => panic!("destination {other:?}"),
        }
    };
    service["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .map(|route| {
            let destinations = route["route"].as_array().unwrap();
            let shares = destinations
                .iter()
                .map(|d| {
                    let weight = d["weight"].as_i64().unwrap_or(if destinations.len() == 1 {
                        100
                    } else {
                        0
                    });
                    (version(d), weight)
                })
                .filter(|(_, w)| *w > 0)
                .collect();
            (route["match"].clone(), shares)
        })
        .collect()
}

fn seed(text: &str) -> Value {
    // istio-weighted.yaml holds the DestinationRule too: the VirtualService is the first.
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
}

/// The analysis of a run at `weight` %, its match applied (the rollout machine's `Traffic` while
/// it analyses a Canary with `match`).
fn analysing(weight: f64) -> Traffic {
    Traffic {
        promoted: false,
        canary: true,
        canary_weight: Weight::from_percent(weight).unwrap(),
        apply_match: true,
        mirror_weight: Weight::ZERO,
    }
}

#[test]
fn the_seeds_header_route_is_what_an_ab_canary_on_istio_writes() {
    // A/B testing: `iterations` with the header; the matched requests go to the canary.
    let spec = seed_routes(|a| {
        a["iterations"] = 10.into();
        a["match"] = json!([{"headers": {"x-canary": {"exact": "true"}}}]);
    });
    let written = virtual_service(&spec, &analysing(0.0), None);
    assert_eq!(routes(&written), routes(&seed(HEADER)), "{written:#}");
    assert_eq!(written["spec"]["hosts"], json!(["web-app"]));
    assert_eq!(written["spec"]["gateways"], json!(["mesh"]));
}

#[test]
fn the_seeds_user_route_is_what_an_ab_canary_matching_user_ids_writes() {
    let spec = seed_routes(|a| {
        a["iterations"] = 10.into();
        a["match"] = json!([{"headers": {"user-id": {"regex": "^(1|2|3|4|5)$"}}}]);
    });
    let written = virtual_service(&spec, &analysing(0.0), None);
    assert_eq!(routes(&written), routes(&seed(USER)), "{written:#}");
}

#[test]
fn the_seeds_weighted_routes_are_what_the_seeds_canary_writes_at_its_first_step() {
    // The seed's stepWeight 5 with its header: the header to the canary, the rest 95/5.
    let spec = seed_routes(|a| a["match"] = json!([{"headers": {"canary": {"exact": "true"}}}]));
    let written = virtual_service(&spec, &analysing(5.0), None);
    let expected = routes(&seed(WEIGHTED));
    assert_eq!(routes(&written), expected, "{written:#}");
    assert_eq!(
        expected[1].1,
        vec![("primary".into(), 95), ("canary".into(), 5)]
    );
    // Outside an analysis the match is gone and everything is on the primary (Flagger's
    // initial route: primary 100, canary 0).
    let idle = virtual_service(
        &spec,
        &coalmine_operator::seams::routed::ALL_ON_PRIMARY,
        None,
    );
    assert_eq!(
        routes(&idle),
        vec![(Value::Null, vec![("primary".into(), 100)])],
        "{idle:#}"
    );
}

#[test]
fn session_affinity_adds_flaggers_sticky_route_and_cookie_while_the_canary_has_a_share() {
    let spec = seed_routes(|a| a["sessionAffinity"] = json!({"cookieName": "flagger-cookie"}));
    let written = virtual_service(&spec, &analysing(10.0), None);
    let http = &written["spec"]["http"];
    assert_eq!(http[0]["name"], "sticky-route", "{written:#}");
    let regex = http[0]["match"][0]["headers"]["Cookie"]["regex"]
        .as_str()
        .unwrap();
    assert!(regex.starts_with(".*flagger-cookie.*"), "{regex}");
    let set_cookie = http[1]["route"][1]["headers"]["response"]["add"]["Set-Cookie"]
        .as_str()
        .unwrap();
    assert!(
        set_cookie.starts_with("flagger-cookie=") && set_cookie.ends_with("; Max-Age=86400"),
        "{set_cookie}"
    );
    // The cookie set is the one the sticky route matches.
    let value = set_cookie
        .trim_start_matches("flagger-cookie=")
        .split(';')
        .next()
        .unwrap();
    assert!(regex.contains(value), "{regex} / {set_cookie}");
    let idle = virtual_service(
        &spec,
        &coalmine_operator::seams::routed::ALL_ON_PRIMARY,
        None,
    );
    assert_eq!(
        idle["spec"]["http"].as_array().unwrap().len(),
        1,
        "{idle:#}"
    );
}

/// Every shape the route objects take — idle, weighted with a match of each kind, mirrored,
/// with session affinity — is accepted by the real CRDs (Istio 1.29, Gateway API v1.6.1
/// standard channel, `tests/fixtures/crds/`), which the test cluster validates against.
#[tokio::test]
async fn every_route_object_shape_is_accepted_by_the_providers_crds() {
    use coalmine_kube_fake::{install_crds, TestCluster};
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

    const ISTIO: &str = include_str!("../../../tests/fixtures/crds/istio/networking.yaml");
    const HTTPROUTES: &str =
        include_str!("../../../tests/fixtures/crds/gateway-api/httproutes.yaml");
    let cluster = TestCluster::start().await.unwrap();
    cluster.create_namespace("shop").await.unwrap();
    let client = cluster.client();
    install_crds(&client, ISTIO).await.unwrap();
    install_crds(&client, HTTPROUTES).await.unwrap();
    let mut spec = seed_routes(|a| {
        a["match"] = json!([
            {"headers": {"x-canary": {"exact": "true"}, "x-user": {"prefix": "beta-"}},
             "queryParams": {"canary": {"regex": "on|yes"}}},
            {"headers": {"x-region": {"suffix": ".eu"}}},
        ]);
        a["sessionAffinity"] = json!({"cookieName": "canary", "maxAge": 600});
    });
    spec.hosts = vec!["web.example.com".into()];
    spec.gateway_refs = vec![serde_json::from_value(
        json!({"name": "public", "namespace": "gateways", "sectionName": "https"}),
    )
    .unwrap()];
    // Flagger's service fields Istio and Gateway API carry.
    spec.timeout = Some("30s".into());
    spec.retries = Some(
        json!({"attempts": 3, "perTryTimeout": "5s", "retryOn": "gateway-error,connect-failure"}),
    );
    spec.traffic_policy = Some(json!({"tls": {"mode": "ISTIO_MUTUAL"}}));
    let mirrored = Traffic {
        mirror_weight: Weight::from_percent(50.0).unwrap(),
        ..analysing(0.0)
    };
    let shapes = [
        coalmine_operator::seams::routed::ALL_ON_PRIMARY,
        analysing(5.0),
        analysing(100.0),
        mirrored,
    ];
    let api = |group: &str, version: &str, kind: &str, plural: &str| -> Api<DynamicObject> {
        Api::namespaced_with(
            client.clone(),
            "shop",
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            ),
        )
    };
    let apply = |api: Api<DynamicObject>, object: Value| async move {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(
            &name,
            &PatchParams::apply("coalmine").force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {object:#}"))
    };
    for traffic in &shapes {
        let service = virtual_service(&spec, traffic, None);
        let read = apply(
            api(
                "networking.istio.io",
                "v1",
                "VirtualService",
                "virtualservices",
            ),
            service.clone(),
        )
        .await;
        assert_eq!(read.data["spec"]["http"], service["spec"]["http"]);
        for route in read.data["spec"]["http"].as_array().unwrap() {
            assert_eq!(route["timeout"], "30s", "{route:#}");
            assert_eq!(route["retries"]["attempts"], 3, "{route:#}");
        }
        for host in ["web-app-primary", "web-app-canary"] {
            let rule = apply(
                api(
                    "networking.istio.io",
                    "v1",
                    "DestinationRule",
                    "destinationrules",
                ),
                coalmine_operator::seams::istio::destination_rule(&spec, host, None),
            )
            .await;
            assert_eq!(
                rule.data["spec"]["trafficPolicy"]["tls"]["mode"],
                "ISTIO_MUTUAL"
            );
        }
        for version in ["v1", "v1beta1"] {
            let route =
                coalmine_operator::seams::gateway_api::http_route(&spec, version, traffic, None);
            let read = apply(
                api(
                    "gateway.networking.k8s.io",
                    version,
                    "HTTPRoute",
                    "httproutes",
                ),
                route.clone(),
            )
            .await;
            let rules = read.data["spec"]["rules"].as_array().unwrap();
            assert_eq!(
                rules.len(),
                route["spec"]["rules"].as_array().unwrap().len()
            );
            assert!(
                rules.iter().all(|r| r["timeouts"]["request"] == "30s"),
                "{rules:#?}"
            );
        }
    }
    // The mirror and the sticky cookie are there to be accepted.
    let route = coalmine_operator::seams::gateway_api::http_route(&spec, "v1", &mirrored, None);
    let rules = route["spec"]["rules"].as_array().unwrap();
    assert_eq!(
        rules.last().unwrap()["filters"][0]["requestMirror"]["percent"],
        50,
        "{route:#}"
    );
    let route =
        coalmine_operator::seams::gateway_api::http_route(&spec, "v1", &analysing(5.0), None);
    let sticky = &route["spec"]["rules"][0];
    assert_eq!(
        sticky["matches"][0]["headers"][0]["name"], "Cookie",
        "{route:#}"
    );
    assert_eq!(sticky["backendRefs"][1]["weight"], 100, "{route:#}");
}

/// Flagger's own Istio example (`tests/fixtures/flagger/istio-canary.yaml`): its gateways,
/// hosts, timeout and traffic policy are where Flagger puts them.
#[test]
fn flaggers_istio_example_keeps_its_gateways_hosts_timeout_and_traffic_policy() {
    const EXAMPLE: &str = include_str!("../../../tests/fixtures/flagger/istio-canary.yaml");
    let canary: Canary = serde_saphyr::from_str(EXAMPLE).unwrap();
    let mut rollout = Rollout::new(
        "podinfo",
        canary.to_rollout_spec(TrafficProvider::Kubernetes).unwrap(),
    );
    rollout.metadata.namespace = Some("test".into());
    let spec = RouteSpec::of(&rollout, None);
    let written = virtual_service(&spec, &analysing(5.0), None);
    assert_eq!(
        written["spec"]["gateways"],
        json!(["istio-system/public-gateway", "mesh"])
    );
    assert_eq!(
        written["spec"]["hosts"],
        json!(["app.example.com", "podinfo"])
    );
    let route = &written["spec"]["http"][0];
    assert_eq!(route["timeout"], "30s", "{written:#}");
    assert_eq!(
        route["route"],
        json!([
            {"destination": {"host": "podinfo-primary"}, "weight": 95},
            {"destination": {"host": "podinfo-canary"}, "weight": 5},
        ])
    );
    let rule = coalmine_operator::seams::istio::destination_rule(&spec, "podinfo-canary", None);
    assert_eq!(
        rule["spec"],
        json!({"host": "podinfo-canary", "trafficPolicy": {"tls": {"mode": "DISABLE"}}})
    );
}
