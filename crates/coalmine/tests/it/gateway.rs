//! `coalmine proxy --kubernetes`: the router as a Gateway API implementation, end to end. The
//! cluster (the real API server with `KUBEBUILDER_ASSETS`, else the in-repo fake) holds
//! Gateway API's CRDs (`tests/fixtures/crds/gateway-api/`, v1.6.1 standard channel), a
//! GatewayClass for `coalmine.dev/gateway`, a Gateway, an HTTPRoute in Flagger's shape, the
//! `-primary` and `-canary` Services and their EndpointSlices. The endpoints are real upstream
//! processes in a network namespace the test makes (the API server refuses loopback endpoint
//! addresses); the router runs here and reaches them over the namespace's veth, by pod address,
//! never by cluster IP.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use coalmine_kube_fake::{install_crds, TestCluster};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{json, Value};

use crate::common::netns::PodNetwork;
use crate::common::who_answered;
use crate::common::{client, get_json, Proc, Router};

const GATEWAY_CRDS: [&str; 3] = [
    include_str!("../../../../tests/fixtures/crds/gateway-api/gatewayclasses.yaml"),
    include_str!("../../../../tests/fixtures/crds/gateway-api/gateways.yaml"),
    include_str!("../../../../tests/fixtures/crds/gateway-api/httproutes.yaml"),
];

/// Second stand-in primary pod and the canary pod: addresses given to the pods' namespace.
const PRIMARY_2: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 11);
const CANARY: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 12);

pub(crate) fn gateway_api(kube: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind),
        plural,
    );
    if kind == "GatewayClass" {
        Api::all_with(kube.clone(), &resource)
    } else {
        Api::namespaced_with(kube.clone(), "shop", &resource)
    }
}

async fn create(api: &Api<DynamicObject>, object: Value) {
    api.create(
        &PostParams::default(),
        &serde_json::from_value(object).unwrap(),
    )
    .await
    .unwrap();
}

/// A Service with port 9898 (named `http`) in front of pods' port 8080, and its EndpointSlice
/// listing `pods` ready.
pub(crate) async fn service_with_pods(kube: &kube::Client, name: &str, pods: &[Ipv4Addr]) {
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"ports": [{"name": "http", "port": 9898, "targetPort": 8080}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    set_endpoints(kube, name, pods).await;
}

/// The Service's EndpointSlice now lists `pods` (made if missing).
pub(crate) async fn set_endpoints(kube: &kube::Client, name: &str, pods: &[Ipv4Addr]) {
    let slices: Api<EndpointSlice> = Api::namespaced(kube.clone(), "shop");
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abcde"), "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    });
    slices
        .patch(
            &format!("{name}-abcde"),
            &PatchParams::apply("test").force(),
            &Patch::Apply(slice),
        )
        .await
        .unwrap();
}

/// Flagger's HTTPRoute for `podinfo` (`pkg/router/gateway_api.go`): a header rule to the
/// canary, and the weighted rule at `canary` %.
fn flagger_route(canary: i64) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "podinfo", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "hostnames": ["app.example.com"],
            "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "insider"}]}],
                 "backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 0},
                                 {"name": "podinfo-canary", "port": 9898, "weight": 100}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                     "set": [{"name": "x-env", "value": "prod"}], "remove": ["x-debug"]}},
                             {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                     "set": [{"name": "x-served-by", "value": "coalmine-gateway"}]}}],
                 // Flagger's session affinity: its cookie on the canary's answers only.
                 "backendRefs": [{"name": "podinfo-primary", "port": 9898, "weight": 100 - canary},
                                 {"name": "podinfo-canary", "port": 9898, "weight": canary, "filters": [
                                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                                         "add": [{"name": "Set-Cookie", "value": "flagger-cookie=v2; Max-Age=60"}]}}]}]},
            ],
        },
    })
}

/// Gateway API's CRDs, the GatewayClass `coalmine` for Coalmine's routers and its Gateway
/// `shop/edge` with `listeners`.
async fn install_gateway(kube: &kube::Client, listeners: Value) {
    for crd in GATEWAY_CRDS {
        install_crds(kube, crd).await.unwrap();
    }
    create(
        &gateway_api(kube, "GatewayClass", "gatewayclasses"),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "coalmine"}, "spec": {"controllerName": "coalmine.dev/gateway"}}),
    )
    .await;
    create(
        &gateway_api(kube, "Gateway", "gateways"),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "shop"},
               "spec": {"gatewayClassName": "coalmine", "listeners": listeners}}),
    )
    .await;
}

/// A cluster with Gateway API's CRDs, namespace `shop`, the GatewayClass and the Gateway.
pub(crate) async fn gateway_cluster() -> TestCluster {
    let cluster = TestCluster::start().await.unwrap();
    cluster.create_namespace("shop").await.unwrap();
    let kube = cluster.client();
    install_gateway(
        &kube,
        json!([
            {"name": "web", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
            {"name": "tls", "port": 443, "protocol": "TLS", "hostname": "*.example.com"}]),
    )
    .await;
    cluster
}

/// `coalmine proxy --kubernetes` on the cluster.
pub(crate) fn gateway_router(cluster: &TestCluster) -> Router {
    let kubeconfig = cluster.kubeconfig().to_str().unwrap().to_string();
    let proc = Proc::spawn(&[
        "proxy",
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--gateway-address",
        "10.96.0.80",
    ]);
    let base = format!("http://{}", proc.addr("listen"));
    let admin = format!("http://{}", proc.addr("admin"));
    Router { proc, base, admin }
}

/// A stand-in pod: `coalmine upstream` answering as `name` on `address`:8080 in the pods'
/// network, with `extra` flags.
fn pod(pods: &PodNetwork, address: Ipv4Addr, name: &str, extra: &[&str]) -> Proc {
    let listen = format!("{address}:8080");
    let mut args = vec!["upstream", "--listen", &listen, "--name", name];
    args.extend_from_slice(extra);
    pods.spawn(&args)
}

/// The router's `/readyz` status.
async fn readiness(router: &Router) -> reqwest::StatusCode {
    client()
        .get(format!("{}/readyz", router.admin))
        .send()
        .await
        .unwrap()
        .status()
}

/// Waits up to `within` for the router to say it is ready.
async fn until_ready(router: &Router, within: Duration) {
    let deadline = Instant::now() + within;
    while readiness(router).await != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready:\n{}",
            router.proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to 10 s for `ok` on the object's status; answers it.
async fn until_status(api: &Api<DynamicObject>, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = api.get(name).await.unwrap().data["status"].clone();
        if ok(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: status never became right: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition<'v>(conditions: &'v Value, kind: &str) -> &'v Value {
    conditions
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

fn is_true(conditions: &Value, kind: &str) -> bool {
    condition(conditions, kind)["status"] == "True"
}

/// Which pod answered each of `n` requests for `app.example.com` (with `headers`).
async fn answered_by(router: &Router, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let c = client();
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let mut request = c
            .get(format!("{}/", router.base))
            .header("host", "app.example.com");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let r = request.send().await.unwrap();
        names.push(who_answered(&r));
    }
    names
}

/// Pearson's chi-square of a two-way split against `canary_share`: 1 degree of freedom, so
/// above 10.83 happens by chance with probability 0.001.
fn chi_square(canary: usize, total: usize, canary_share: f64) -> f64 {
    let expected_canary = total as f64 * canary_share;
    let expected_stable = total as f64 - expected_canary;
    let stable = (total - canary) as f64;
    (canary as f64 - expected_canary).powi(2) / expected_canary
        + (stable - expected_stable).powi(2) / expected_stable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_programs_itself_from_an_httproute_and_follows_a_weight_change_within_a_second()
{
    let pods = PodNetwork::create();
    pods.route_here(PRIMARY_2);
    pods.route_here(CANARY);
    let _primary_1 = pod(&pods, pods.pod_ip, "primary-1", &[]);
    let _primary_2 = pod(&pods, PRIMARY_2, "primary-2", &[]);
    let _canary = pod(&pods, CANARY, "canary", &[]);
    let cluster = gateway_cluster().await;
    let kube = cluster.client();
    service_with_pods(&kube, "podinfo-primary", &[pods.pod_ip, PRIMARY_2]).await;
    service_with_pods(&kube, "podinfo-canary", &[CANARY]).await;
    let routes = gateway_api(&kube, "HTTPRoute", "httproutes");
    create(&routes, flagger_route(0)).await;
    let router = gateway_router(&cluster);
    // Ready only once the table is the cluster's: a new router pod gets no user before.
    until_ready(&router, Duration::from_secs(10)).await;

    // Statuses, as the spec defines them.
    let classes = gateway_api(&kube, "GatewayClass", "gatewayclasses");
    until_status(&classes, "coalmine", |s| {
        is_true(&s["conditions"], "Accepted")
    })
    .await;
    let gateways = gateway_api(&kube, "Gateway", "gateways");
    let gateway = until_status(&gateways, "edge", |s| {
        is_true(&s["conditions"], "Programmed")
    })
    .await;
    assert_eq!(
        gateway["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.80"}])
    );
    let listeners = gateway["listeners"].as_array().unwrap();
    assert_eq!(listeners[0]["attachedRoutes"], 1);
    assert_eq!(
        listeners[0]["supportedKinds"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}])
    );
    assert!(is_true(&listeners[0]["conditions"], "Programmed"));
    assert_eq!(
        condition(&listeners[1]["conditions"], "Accepted")["reason"],
        "UnsupportedProtocol"
    );
    assert_eq!(
        condition(&gateway["conditions"], "Accepted")["reason"],
        "ListenersNotValid"
    );
    let route = until_status(&routes, "podinfo", |s| !s["parents"].is_null()).await;
    let parent = &route["parents"][0];
    assert_eq!(parent["controllerName"], "coalmine.dev/gateway");
    assert_eq!(parent["parentRef"]["name"], "edge");
    assert!(is_true(&parent["conditions"], "Accepted"), "{parent:#}");
    assert!(is_true(&parent["conditions"], "ResolvedRefs"), "{parent:#}");
    assert!(condition(&parent["conditions"], "Accepted")["observedGeneration"].is_i64());

    // Weight 0: both primary pods answer, by their own addresses; the canary never.
    let first = answered_by(&router, 200, &[]).await;
    let count = |names: &[String], who: &str| names.iter().filter(|n| *n == who).count();
    assert_eq!(count(&first, "canary"), 0, "{first:?}");
    assert!(
        count(&first, "primary-1") > 60 && count(&first, "primary-2") > 60,
        "{first:?}"
    );
    let table = get_json(&format!("{}/routes", router.admin)).await;
    let served = serde_json::to_string(&table).unwrap();
    assert!(
        served.contains(&format!("http://{}:8080", pods.pod_ip)),
        "{table:#}"
    );
    // The header rule takes its users to the canary at any weight.
    let insiders = answered_by(&router, 20, &[("x-canary", "insider")]).await;
    assert_eq!(count(&insiders, "canary"), 20, "{insiders:?}");
    // Another host is no service's: the router's 404.
    let other = client()
        .get(format!("{}/", router.base))
        .header("host", "other.test")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    // The rule's RequestHeaderModifier reaches the pod.
    let echoed: Value = client()
        .get(format!("{}/echo", router.base))
        .header("host", "app.example.com")
        .header("x-env", "dev")
        .header("x-debug", "1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echoed["headers"]["x-env"], "prod", "{echoed:#}");
    assert!(echoed["headers"].get("x-debug").is_none(), "{echoed:#}");
    // The table is the cluster's: the admin API refuses to change it.
    let refused = client()
        .put(format!("{}/routes", router.admin))
        .json(&json!({"canaryWeight": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);

    // The operator's step: 20 % to the canary. Seen in the router's table within a second,
    // and the split that follows is 20 % by chi-square.
    let changed = Instant::now();
    routes
        .patch(
            "podinfo",
            &PatchParams::apply("flagger").force(),
            &Patch::Apply(flagger_route(20)),
        )
        .await
        .unwrap();
    let weighed = "shop.podinfo.1.0";
    loop {
        let doc = get_json(&format!("{}/routes/{weighed}", router.admin)).await;
        if doc["canaryWeight"] == json!(20.0) {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "not programmed within 1 s: {doc:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let programmed_in = changed.elapsed();
    // Every answer says which gateway served it; the canary's carry Flagger's cookie, the
    // primary's never.
    let c = client();
    let (mut canary_cookies, mut primary_cookies) = (0, 0);
    for _ in 0..100 {
        let r = c
            .get(format!("{}/", router.base))
            .header("host", "app.example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-served-by"], "coalmine-gateway");
        let cookie = r.headers().get("set-cookie").is_some();
        match r.headers()["x-upstream"].to_str().unwrap() {
            "canary" => canary_cookies += usize::from(cookie),
            _ => primary_cookies += usize::from(cookie),
        }
    }
    assert!(
        canary_cookies > 0 && primary_cookies == 0,
        "{canary_cookies} / {primary_cookies}"
    );
    let split = answered_by(&router, 2_000, &[]).await;
    let canary = count(&split, "canary");
    let chi2 = chi_square(canary, split.len(), 0.2);
    assert!(
        chi2 < 10.83,
        "{canary} of 2000 on the canary at 20 %: chi-square {chi2:.2}"
    );
    eprintln!("weight change programmed in {programmed_in:?}; {canary} of 2000 on the canary (chi-square {chi2:.2})");

    // A pod gone from the EndpointSlice gets no more requests.
    set_endpoints(&kube, "podinfo-primary", &[PRIMARY_2]).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let doc = get_json(&format!("{}/routes/{weighed}", router.admin)).await;
        if doc["stable"] == json!(format!("http://{PRIMARY_2}:8080")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "endpoint removal not programmed within 1 s: {doc:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = answered_by(&router, 200, &[]).await;
    assert_eq!(count(&after, "primary-1"), 0, "{after:?}");

    // A backend that does not exist: the route says so, and the rest keeps serving.
    let mut broken = flagger_route(20);
    broken["spec"]["rules"][0]["backendRefs"][1]["name"] = "podinfo-missing".into();
    routes
        .patch(
            "podinfo",
            &PatchParams::apply("flagger").force(),
            &Patch::Apply(broken),
        )
        .await
        .unwrap();
    let route = until_status(&routes, "podinfo", |s| {
        condition(&s["parents"][0]["conditions"], "ResolvedRefs")["reason"] == "BackendNotFound"
    })
    .await;
    assert!(is_true(&route["parents"][0]["conditions"], "Accepted"));
    let still = answered_by(&router, 50, &[]).await;
    assert!(
        still.iter().all(|n| n == "primary-2" || n == "canary"),
        "{still:?}"
    );

    // The header rule's canary is the missing Service now: its requests get Gateway API's 500,
    // counted as the router's (the configuration's), never as a version's.
    let insiders = answered_by(&router, 10, &[("x-canary", "insider")]).await;
    assert!(
        insiders.iter().all(|n| n.starts_with("status 500")),
        "{insiders:?}"
    );
    let metrics = crate::common::metrics_text(&router.admin).await;
    assert!(
        metrics.contains(r#"coalmine_router_local_failures_total{reason="invalid_backend"} 10"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("local_failures"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // An edit the router cannot do: the last accepted spec keeps serving, here and on a router
    // started after the edit (it reads that spec from the route's annotation).
    let accepted = routes.get("podinfo").await.unwrap();
    assert!(
        accepted
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("gateway.coalmine.dev/last-accepted")),
        "{:?}",
        accepted.metadata.annotations
    );
    let mut unsupported = flagger_route(20);
    unsupported["spec"]["rules"][1]["filters"] =
        json!([{"type": "URLRewrite", "urlRewrite": {"hostname": "x.test"}}]);
    routes
        .patch(
            "podinfo",
            &PatchParams::apply("flagger").force(),
            &Patch::Apply(unsupported),
        )
        .await
        .unwrap();
    until_status(&routes, "podinfo", |s| {
        condition(&s["parents"][0]["conditions"], "Accepted")["reason"] == "UnsupportedValue"
    })
    .await;
    let later = gateway_router(&cluster);
    until_ready(&later, Duration::from_secs(10)).await;
    for r in [&router, &later] {
        let served = answered_by(r, 50, &[]).await;
        assert!(
            served.iter().all(|n| n == "primary-2" || n == "canary"),
            "{served:?}\n{}",
            r.proc.stderr()
        );
    }
    drop(later);

    // The API server gone (a control-plane outage): the router keeps the last table it had and
    // stays ready; users never see the outage.
    drop(routes);
    drop(kube);
    drop(cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outage = answered_by(&router, 100, &[]).await;
    assert!(
        outage.iter().all(|n| n == "primary-2" || n == "canary"),
        "{outage:?}\n{}",
        router.proc.stderr()
    );
    assert_eq!(readiness(&router).await, 200);
}

/// Requests for `app.example.com` through the router until stopped: which pod answered each.
pub(crate) struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

fn traffic(router: &Router) -> Traffic {
    traffic_for(router, "app.example.com")
}

/// Requests for `host` through the router until stopped: which pod answered each.
pub(crate) fn traffic_for(router: &Router, host: &str) -> Traffic {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (base, flag, host) = (router.base.clone(), stop.clone(), host.to_string());
    let task = tokio::spawn(async move {
        let c = client();
        let mut seen = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let r = c.get(format!("{base}/")).header("host", &host).send().await;
            if let Ok(r) = r {
                seen.push(who_answered(&r));
            }
        }
        seen
    });
    Traffic { stop, task }
}

impl Traffic {
    pub(crate) async fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The seed's story without a mesh: Flagger's Canary with provider `gatewayapi:v1` on
/// Coalmine's Gateway, run by `coalmine operator`, judged on the routers' own series in a real
/// Prometheus that scrapes them. The canary pod fails 20 % of its requests: the release is
/// rolled back on the sequential judge's evidence and the router, following the HTTPRoute,
/// sends everything to the primary pods again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_behind_coalmines_gateway_is_rolled_back_by_the_operator() {
    use crate::common::promstack::{Prometheus, PrometheusSetup, ScrapeTarget};
    use crate::operator_routers::{cluster, seed_web_app_with, set_image, until};

    let pods = PodNetwork::create();
    pods.route_here(CANARY);
    let _primary = pod(&pods, pods.pod_ip, "primary", &[]);
    let _canary = pod(&pods, CANARY, "canary", &["--error-rate", "0.2"]);
    let cluster = cluster().await;
    let kube = cluster.client();
    install_gateway(
        &kube,
        json!([{"name": "web", "port": 80, "protocol": "HTTP"}]),
    )
    .await;
    let router = gateway_router(&cluster);
    let prometheus = Prometheus::start_scraping(PrometheusSetup {
        scrape: vec![ScrapeTarget::new("coalmine-gateway", &router.admin)],
        ..PrometheusSetup::default()
    })
    .await;
    let flags = [
        "--provider",
        "gatewayapi:v1",
        "--metrics-server",
        prometheus.url.as_str(),
    ];
    let (deployments, canaries, operator) = seed_web_app_with(&cluster, &flags, |canary| {
        let spec = &mut canary["spec"];
        spec["provider"] = "gatewayapi:v1".into();
        spec["service"]["hosts"] = json!(["app.example.com"]);
        spec["service"]["gatewayRefs"] = json!([{"name": "edge"}]);
    })
    .await;
    // The endpoints controller's part: the versions' Services list their pods.
    set_endpoints(&kube, "web-app-primary", &[pods.pod_ip]).await;
    set_endpoints(&kube, "web-app-canary", &[CANARY]).await;
    let routes = gateway_api(&kube, "HTTPRoute", "httproutes");
    let route = until_status(&routes, "web-app", |s| !s["parents"].is_null()).await;
    assert!(
        is_true(&route["parents"][0]["conditions"], "Accepted"),
        "{route:#}"
    );
    // Users only once the router has the pods (before, the versions' requests are 503s: no
    // endpoint, counted as theirs).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table =
            serde_json::to_string(&get_json(&format!("{}/routes", router.admin)).await).unwrap();
        if table.contains(&format!("http://{}:8080", pods.pod_ip))
            && table.contains(&format!("http://{CANARY}:8080"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pods never reached the table: {table}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let users = traffic(&router);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let released = Instant::now();
    set_image(&deployments, "2.0.0").await;
    until(&canaries, &deployments, &operator, "rolled back", |s| {
        s["phase"] == "Failed"
    })
    .await;
    let took = released.elapsed();
    let rollouts: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        "shop",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("coalmine.dev", "v1alpha1", "Rollout"),
            "rollouts",
        ),
    );
    let status = rollouts.get("web-app").await.unwrap().data["status"].clone();
    let said = status["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        said.contains("Bayes factor") || said.contains("request-success-rate"),
        "rolled back for another reason: {status:#}\n{}",
        operator.stderr()
    );
    // The HTTPRoute is back on the primary, and so is the router within a second.
    let weighed = routes.get("web-app").await.unwrap().data["spec"]["rules"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["backendRefs"]
        .clone();
    assert_eq!(weighed[0]["weight"], 100, "{weighed:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = users.stop().await;
    let after = answered_by(&router, 200, &[]).await;
    assert!(after.iter().all(|n| n == "primary"), "{after:?}");
    let canary_seen = during
        .iter()
        .filter(|n| *n == "canary" || n.starts_with("status"))
        .count();
    assert!(
        canary_seen > 0,
        "the canary never got traffic: {} requests",
        during.len()
    );
    eprintln!("{said}");
    eprintln!(
        "Coalmine's gateway, counted from Prometheus: rolled back {:.1} s after the release; {} requests, {canary_seen} to the canary",
        took.as_secs_f64(),
        during.len()
    );
}

/// A cluster without Gateway API's CRDs: the router says so by name and stays unready (no
/// Service sends it users it cannot route), then follows the CRDs once they are installed,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gateway_apis_crds_the_router_says_so_stays_unready_and_recovers_once_installed() {
    let cluster = TestCluster::start().await.unwrap();
    let router = gateway_router(&cluster);
    router
        .proc
        .wait_for_stderr("the cluster serves no GatewayClass");
    assert_ne!(
        readiness(&router).await,
        200,
        "ready without a table from the cluster"
    );
    let kube = cluster.client();
    for crd in GATEWAY_CRDS {
        install_crds(&kube, crd).await.unwrap();
    }
    // The watches retry with backoff (at most 30 s apart).
    until_ready(&router, Duration::from_secs(45)).await;
}

/// A route moved from Coalmine's Gateway to another: the router takes its entry out of the
/// route's `status.parents` (an `Accepted=True` left behind would say it still routes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_moved_to_another_gateway_loses_the_routers_status_entry() {
    let cluster = gateway_cluster().await;
    let kube = cluster.client();
    let routes = gateway_api(&kube, "HTTPRoute", "httproutes");
    create(&routes, flagger_route(0)).await;
    let _router = gateway_router(&cluster);
    let ours = |s: &Value| {
        s["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["controllerName"] == "coalmine.dev/gateway")
    };
    let status = until_status(&routes, "podinfo", ours).await;
    assert!(is_true(&status["parents"][0]["conditions"], "Accepted"));
    routes
        .patch(
            "podinfo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"parentRefs": [{"name": "elsewhere"}]}})),
        )
        .await
        .unwrap();
    until_status(&routes, "podinfo", |s| !ours(s)).await;
}

/// `--kubernetes` takes its routes from the cluster: routes given too, or the Gateway flags
/// without it, are bad input (exit 2) named by flag, before anything listens.
#[test]
fn routes_beside_kubernetes_and_gateway_flags_without_it_are_refused() {
    let run = |args: &[&str]| {
        crate::common::code_and_printed(
            &std::process::Command::new(crate::common::BIN)
                .arg("proxy")
                .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let (code, said) = run(&["--kubernetes", "--stable", "http://127.0.0.1:1"]);
    assert_eq!(code, 2, "{said}");
    assert!(
        said.contains("--kubernetes takes its routes from the cluster"),
        "{said}"
    );
    let (code, said) = run(&[
        "--stable",
        "http://127.0.0.1:1",
        "--gateway-address",
        "10.0.0.1",
    ]);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("--kubernetes"), "{said}");
}
