//! Providers `istio`, `gatewayapi:v1` and `nginx` end to end: the seed's `web-app` Canary
//! (`tests/fixtures/seed/flagger-web-app.yaml`: stepWeight 5 up to 50, threshold 5) with each
//! provider and an `analysis.match`, its checks a `rollout` webhook (the seed's built-in checks
//! need Prometheus under these providers), run by `coalmine operator` on a test cluster with the
//! providers' real CRDs (`tests/fixtures/crds/`, which validate every object written). A good
//! release goes through every step to `Succeeded`; then the webhook answers 500 and the next
//! release goes to `Failed`. At every step the route object is what Flagger writes for the same
//! Canary, its weight the one the status says, and what the user wrote on it stays.

use std::time::{Duration, Instant};

use coalmine_kube_fake::install_crds;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{json, Value};

use crate::common::promstack::{Prometheus, PrometheusSetup, ScrapeTarget};
use crate::common::upstream;
use crate::mesh_metrics::{exporter, unix_now, Clocks, Kind, FAILING_CANARY};
use crate::operator::kubelet;
use crate::operator_routers::{
    canaries, cluster, seed_web_app, seed_web_app_with, set_image, until,
};

const ISTIO_CRDS: &str = include_str!("../../../../tests/fixtures/crds/istio/networking.yaml");
const HTTPROUTE_CRD: &str =
    include_str!("../../../../tests/fixtures/crds/gateway-api/httproutes.yaml");

/// One provider's side of the test.
struct Case {
    /// The operator's `--provider`.
    flag: &'static str,
    /// Its CRDs, installed before anything.
    crds: &'static [&'static str],
    /// The route object read at each step: its kind and name.
    object: (ApiResource, &'static str),
    /// What the user wrote before Coalmine: their own object (one Coalmine writes to, or reads).
    user_object: (ApiResource, Value),
    /// The Canary's `spec` for this provider (its provider, service fields, match).
    canary: fn(&mut Value),
    /// The canary's weight the object gives.
    weight: fn(&DynamicObject) -> i64,
    /// The object's routing at `weight`, analysing or not (the match applies only then), as
    /// Flagger writes it for the Canary — with the user's own fields where they stay.
    expected: fn(i64, bool) -> Value,
    /// The part of the object [`Case::expected`] describes.
    routing: fn(&DynamicObject) -> Value,
    /// What the user wrote that must stay: checked on the object and on the user's.
    kept: fn(&DynamicObject, &DynamicObject) -> Result<(), String>,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// A weighted destination of a VirtualService.
fn istio_destination(host: &str, weight: i64) -> Value {
    json!({"destination": {"host": host}, "weight": weight})
}

fn istio() -> Case {
    Case {
        flag: "kubernetes",
        crds: &[ISTIO_CRDS],
        object: (
            resource(
                "networking.istio.io",
                "v1",
                "VirtualService",
                "virtualservices",
            ),
            "web-app",
        ),
        // The user's VirtualService for the service, written before the Canary.
        user_object: (
            resource(
                "networking.istio.io",
                "v1",
                "VirtualService",
                "virtualservices",
            ),
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": "web-app", "namespace": "shop", "annotations": {"team": "web"}},
                "spec": {"hosts": ["web-app"], "exportTo": ["."], "http": [
                    {"match": [{"uri": {"prefix": "/admin"}}], "route": [{"destination": {"host": "admin"}}]},
                    {"timeout": "5s", "route": [{"destination": {"host": "web-app"}}]},
                ]},
            }),
        ),
        canary: |spec| {
            spec["provider"] = "istio".into();
            spec["analysis"]["match"] = json!([{"headers": {"x-canary": {"exact": "true"}}}]);
        },
        weight: |o| {
            let http = o.data["spec"]["http"].as_array().unwrap();
            http.last().unwrap()["route"][1]["weight"].as_i64().unwrap()
        },
        expected: |w, analysing| {
            // The user's own route stays, ahead of Coalmine's.
            let mut http = vec![json!({
                "match": [{"uri": {"prefix": "/admin"}}],
                "route": [{"destination": {"host": "admin"}}],
            })];
            if analysing {
                http.push(json!({
                    "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                    "route": [istio_destination("web-app-primary", 0), istio_destination("web-app-canary", 100)],
                    "timeout": "5s",
                }));
            }
            http.push(json!({
                "route": [istio_destination("web-app-primary", 100 - w), istio_destination("web-app-canary", w)],
                "timeout": "5s",
            }));
            json!({"hosts": ["web-app"], "gateways": ["mesh"], "http": http})
        },
        routing: |o| {
            let spec = &o.data["spec"];
            json!({"hosts": spec["hosts"], "gateways": spec["gateways"], "http": spec["http"]})
        },
        kept: |o, _| {
            if o.metadata.annotations.as_ref().and_then(|a| a.get("team")) != Some(&"web".into()) {
                return Err(format!("the user's annotation is gone: {:?}", o.metadata));
            }
            if o.data["spec"]["exportTo"] != json!(["."]) {
                return Err(format!("the user's exportTo is gone: {:#}", o.data));
            }
            Ok(())
        },
    }
}

/// A weighted backend of an HTTPRoute.
fn backend(name: &str, weight: i64) -> Value {
    json!({"group": "", "kind": "Service", "name": name, "port": 80, "weight": weight})
}

fn gateway_api() -> Case {
    let http_route = resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    Case {
        flag: "kubernetes",
        crds: &[HTTPROUTE_CRD],
        object: (http_route.clone(), "web-app"),
        // The user's HTTPRoute, named as Flagger's: its timeout and annotation stay theirs.
        user_object: (
            http_route,
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "web-app", "namespace": "shop", "annotations": {"team": "web"}},
                "spec": {"parentRefs": [{"name": "public", "namespace": "gateways"}], "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                     "backendRefs": [{"name": "admin", "port": 8080}]},
                    {"timeouts": {"request": "5s"}, "backendRefs": [{"name": "web-app", "port": 80}]},
                ]},
            }),
        ),
        canary: |spec| {
            spec["provider"] = "gatewayapi:v1".into();
            spec["service"]["hosts"] = json!(["web.example.com"]);
            spec["service"]["gatewayRefs"] = json!([{"name": "public", "namespace": "gateways"}]);
            spec["analysis"]["match"] = json!([
                {"headers": {"x-canary": {"exact": "true"}}},
                {"queryParams": {"canary": {"regex": "on|yes"}}},
            ]);
        },
        weight: |o| {
            let rules = o.data["spec"]["rules"].as_array().unwrap();
            rules.last().unwrap()["backendRefs"][1]["weight"]
                .as_i64()
                .unwrap()
        },
        expected: |w, analysing| {
            let any_path = json!({"type": "PathPrefix", "value": "/"});
            // The user's own rule stays, ahead of Coalmine's (as the API server defaulted it).
            let mut rules = vec![json!({
                "matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                "backendRefs": [{"group": "", "kind": "Service", "name": "admin", "port": 8080, "weight": 1}],
            })];
            if analysing {
                rules.push(json!({
                    "matches": [
                        {"path": any_path, "headers": [{"name": "x-canary", "type": "Exact", "value": "true"}]},
                        {"path": any_path, "queryParams": [{"name": "canary", "type": "RegularExpression", "value": "on|yes"}]},
                    ],
                    "backendRefs": [backend("web-app-primary", 0), backend("web-app-canary", 100)],
                    "timeouts": {"request": "5s"},
                }));
            }
            rules.push(json!({
                "matches": [{"path": any_path}],
                "backendRefs": [backend("web-app-primary", 100 - w), backend("web-app-canary", w)],
                "timeouts": {"request": "5s"},
            }));
            json!({
                "hostnames": ["web.example.com"],
                "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public", "namespace": "gateways"}],
                "rules": rules,
            })
        },
        routing: |o| o.data["spec"].clone(),
        kept: |o, _| {
            if o.metadata.annotations.as_ref().and_then(|a| a.get("team")) != Some(&"web".into()) {
                return Err(format!("the user's annotation is gone: {:?}", o.metadata));
            }
            Ok(())
        },
    }
}

const CANARY_ANNOTATION: &str = "nginx.ingress.kubernetes.io/canary";

fn nginx() -> Case {
    let ingress = resource("networking.k8s.io", "v1", "Ingress", "ingresses");
    Case {
        // No spec.provider: the operator's --provider (Flagger's -mesh-provider).
        flag: "nginx",
        crds: &[],
        object: (ingress.clone(), "web-app-canary"),
        user_object: (
            ingress,
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": "web-app", "namespace": "shop", "labels": {"app": "web-app"},
                    "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "8m"}},
                "spec": {"ingressClassName": "nginx", "rules": [{"host": "web.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix",
                     "backend": {"service": {"name": "web-app", "port": {"number": 80}}}}]}}]},
            }),
        ),
        canary: |spec| {
            spec["ingressRef"] =
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "web-app"});
            spec["analysis"]["match"] = json!([{"headers": {"x-canary": {"exact": "true"}}}]);
        },
        weight: |o| {
            o.metadata.annotations.as_ref().unwrap()[&format!("{CANARY_ANNOTATION}-weight")]
                .parse()
                .unwrap()
        },
        expected: |w, analysing| {
            let mut annotations = json!({
                "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
                CANARY_ANNOTATION: "true",
                format!("{CANARY_ANNOTATION}-weight"): w.to_string(),
            });
            if analysing {
                annotations[format!("{CANARY_ANNOTATION}-by-header")] = "x-canary".into();
                annotations[format!("{CANARY_ANNOTATION}-by-header-value")] = "true".into();
            }
            json!({
                "labels": {"app": "web-app"},
                "annotations": annotations,
                "spec": {"ingressClassName": "nginx", "rules": [{"host": "web.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix",
                     "backend": {"service": {"name": "web-app-canary", "port": {"number": 80}}}}]}}]},
            })
        },
        routing: |o| json!({"labels": o.metadata.labels, "annotations": o.metadata.annotations, "spec": o.data["spec"]}),
        // The user's Ingress is only read: as they wrote it, every step.
        kept: |_, theirs| {
            let backend = &theirs.data["spec"]["rules"][0]["http"]["paths"][0]["backend"];
            let annotations = theirs.metadata.annotations.clone().unwrap_or_default();
            if backend["service"]["name"] != "web-app"
                || annotations.keys().any(|k| k.starts_with(CANARY_ANNOTATION))
            {
                return Err(format!("the user's Ingress changed: {theirs:?}"));
            }
            Ok(())
        },
    }
}

/// What one release showed: its final status, and the distinct canary weights the status and
/// the route object went through.
struct Seen {
    status: Value,
    status_weights: Vec<i64>,
    object_weights: Vec<i64>,
}

/// Plays kubelet until the release after `image` ends (60 s at most), checking the route object
/// against Flagger's shape and the user's fields at every look.
async fn release(
    case: &Case,
    kube: &kube::Client,
    operator: &crate::common::Proc,
    image: &str,
) -> Seen {
    let deployments = Api::namespaced(kube.clone(), "shop");
    let canaries = canaries(kube);
    let objects: Api<DynamicObject> = Api::namespaced_with(kube.clone(), "shop", &case.object.0);
    let theirs: Api<DynamicObject> =
        Api::namespaced_with(kube.clone(), "shop", &case.user_object.0);
    let user_name = case.user_object.1["metadata"]["name"].as_str().unwrap();
    let before = canaries.get("web-app").await.unwrap().data["status"]["lastAppliedSpec"].clone();
    set_image(&deployments, image).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut status_weights, mut object_weights) = (Vec::new(), Vec::new());
    loop {
        kubelet(&deployments).await;
        let status = canaries.get("web-app").await.unwrap().data["status"].clone();
        let object = objects.get(case.object.1).await.unwrap();
        let weight = (case.weight)(&object);
        let routing = (case.routing)(&object);
        let expected = (case.expected)(weight, weight > 0);
        assert_eq!(
            routing, expected,
            "not Flagger's at {weight} %:\n{routing:#}\nexpected\n{expected:#}"
        );
        let user_object = theirs.get(user_name).await.unwrap();
        if let Err(e) = (case.kept)(&object, &user_object) {
            panic!("{e}");
        }
        if object_weights.last() != Some(&weight) {
            object_weights.push(weight);
        }
        let status_weight = status["canaryWeight"].as_f64().unwrap_or(0.0) as i64;
        // Progressing at 0 % is the run's start, before its first step.
        if status["phase"] == "Progressing"
            && status_weight > 0
            && status_weights.last() != Some(&status_weight)
        {
            status_weights.push(status_weight);
        }
        let ended = status["phase"] == "Succeeded" || status["phase"] == "Failed";
        if ended && status["lastAppliedSpec"] != before && weight == 0 {
            return Seen {
                status,
                status_weights,
                object_weights,
            };
        }
        assert!(
            Instant::now() < deadline,
            "not done within 60 s: {status:#}\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The seed's release on `case`'s provider: promoted at the end of its steps, then a release
/// whose checks fail rolled back.
async fn the_seeds_canary_steps_to_succeeded_then_fails_on(case: Case) {
    let started = Instant::now();
    let cluster = cluster().await;
    let kube = cluster.client();
    for crds in case.crds {
        install_crds(&kube, crds).await.unwrap();
    }
    let theirs: Api<DynamicObject> =
        Api::namespaced_with(kube.clone(), "shop", &case.user_object.0);
    theirs
        .create(
            &PostParams::default(),
            &serde_json::from_value(case.user_object.1.clone()).unwrap(),
        )
        .await
        .unwrap();
    let gate = upstream("gate", &[]);
    let failing_gate = upstream("failing-gate", &["--error-rate", "1"]);
    let (_, canaries, operator) = seed_web_app(&cluster, case.flag, |canary| {
        (case.canary)(&mut canary["spec"]);
        canary["spec"]["analysis"]["metrics"] = json!([]);
        canary["spec"]["analysis"]["webhooks"] =
            json!([{"name": "smoke", "type": "rollout", "url": format!("{}/", gate.url)}]);
    })
    .await;
    // Initialised: the route object is Flagger's, everything on the primary.
    let objects: Api<DynamicObject> = Api::namespaced_with(kube.clone(), "shop", &case.object.0);
    let initial = objects.get(case.object.1).await.unwrap();
    assert_eq!((case.routing)(&initial), (case.expected)(0, false));

    let good = release(&case, &kube, &operator, "2.0.0").await;
    assert_eq!(
        good.status["phase"],
        "Succeeded",
        "{:#}\n{}",
        good.status,
        operator.stderr()
    );
    let steps: Vec<i64> = (1..=10).map(|i| i * 5).collect();
    assert_eq!(good.status_weights, steps, "the seed's steps");
    // The object carried each step the status recorded, and only those.
    let mut carried = good.object_weights.clone();
    carried.retain(|w| *w > 0);
    assert_eq!(carried, steps, "{:?}", good.object_weights);

    // The webhook now answers 500: the next release fails its checks and goes back.
    let mut canary = canaries.get("web-app").await.unwrap();
    canary.data["spec"]["analysis"]["webhooks"][0]["url"] = format!("{}/", failing_gate.url).into();
    canaries
        .replace("web-app", &PostParams::default(), &canary)
        .await
        .unwrap();
    // The Rollout the Canary runs as carries the change before the next release starts.
    let rollouts: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        "shop",
        &resource("coalmine.dev", "v1alpha1", "Rollout", "rollouts"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rollouts.get("web-app").await.unwrap().data["spec"]["analysis"]["webhooks"][0]["url"]
        != failing_gate.url.as_str()
    {
        assert!(
            Instant::now() < deadline,
            "the Canary's edit never reached its Rollout: {:#}",
            rollouts.get("web-app").await.unwrap().data["spec"]["analysis"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = release(&case, &kube, &operator, "3.0.0").await;
    assert_eq!(
        bad.status["phase"],
        "Failed",
        "{:#}\n{}",
        bad.status,
        operator.stderr()
    );
    assert_eq!(
        bad.status_weights,
        vec![5],
        "it never got past its first step"
    );
    assert!(
        bad.object_weights.iter().all(|w| [0, 5].contains(w)),
        "{:?}",
        bad.object_weights
    );
    eprintln!(
        "{}: two releases in {:.1} s",
        case.object.0.kind,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_virtual_service_steps_as_flaggers_then_rolls_back() {
    the_seeds_canary_steps_to_succeeded_then_fails_on(istio()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_http_route_steps_as_flaggers_then_rolls_back() {
    the_seeds_canary_steps_to_succeeded_then_fails_on(gateway_api()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_canary_ingress_steps_as_flaggers_then_rolls_back() {
    the_seeds_canary_steps_to_succeeded_then_fails_on(nginx()).await;
}

/// `revertOnDeletion` on Istio: the Canary deleted mid-release leaves its target serving behind
/// the apex, and the user's VirtualService sending everything there (the `-primary` and
/// `-canary` Services it routed to go with the release), their own route and timeout kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_canary_deleted_mid_release_with_revert_on_deletion_routes_everything_to_its_target(
) {
    let case = istio();
    let cluster = cluster().await;
    let kube = cluster.client();
    for crds in case.crds {
        install_crds(&kube, crds).await.unwrap();
    }
    let services: Api<DynamicObject> =
        Api::namespaced_with(kube.clone(), "shop", &case.user_object.0);
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(case.user_object.1.clone()).unwrap(),
        )
        .await
        .unwrap();
    let (deployments, canaries, operator) = seed_web_app(&cluster, case.flag, |canary| {
        (case.canary)(&mut canary["spec"]);
        canary["spec"]["analysis"]["metrics"] = json!([]);
        canary["spec"]["revertOnDeletion"] = true.into();
        // Flagger's URI rewrite, which this operator does not apply: the user is told.
        canary["spec"]["service"]["rewrite"] = json!({"uri": "/"});
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(kube.clone(), "shop");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let notes: Vec<String> = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter_map(|e| e.note)
            .collect();
        if notes
            .iter()
            .any(|n| n.starts_with("spec.service.rewrite: not applied"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not told: {notes:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_image(&deployments, "2.0.0").await;
    until(&canaries, &deployments, &operator, "at 10 %", |s| {
        s["canaryWeight"].as_f64() >= Some(10.0)
    })
    .await;
    canaries
        .delete("web-app", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while canaries.get_opt("web-app").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the Canary was never let go:\n{}",
            operator.stderr()
        );
        kubelet(&deployments).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let service = services.get("web-app").await.unwrap();
    assert_eq!(
        service.data["spec"]["http"],
        json!([
            {"match": [{"uri": {"prefix": "/admin"}}], "route": [{"destination": {"host": "admin"}}]},
            {"route": [{"destination": {"host": "web-app"}, "weight": 100}], "timeout": "5s"},
        ]),
        "{:#}",
        service.data
    );
    let target: k8s_openapi::api::apps::v1::Deployment = Api::namespaced(kube.clone(), "shop")
        .get("web-app")
        .await
        .unwrap();
    assert_eq!(
        target.spec.unwrap().replicas,
        Some(4),
        "the target serves at full size"
    );
}

/// The seed's own checks (request-success-rate ≥ 99 %, request-duration ≤ 500 ms) and the
/// sequential judges under provider istio, counted from Istio's own series in a real Prometheus
/// (an exporter writes them as the sidecars do: `web-app-primary` answering 503 to 0.1 % of
/// 4,000 requests a second, the canary `web-app` to 5 % of 1,000): the release is rolled back,
/// and the reason is the evidence from those series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_canary_failing_5_percent_is_rolled_back_on_istios_own_series() {
    let cluster = cluster().await;
    let kube = cluster.client();
    install_crds(&kube, ISTIO_CRDS).await.unwrap();
    let since = unix_now();
    let clocks = Clocks {
        primary_since: since,
        canary_since: std::sync::Arc::new(std::sync::Mutex::new(since)),
    };
    let sidecars = exporter(Kind::Istio, "web-app", FAILING_CANARY, clocks);
    let prometheus = Prometheus::start_scraping(PrometheusSetup {
        scrape: vec![ScrapeTarget::new("istio-sidecars", &sidecars)],
        ..PrometheusSetup::default()
    })
    .await;
    let flags = [
        "--provider",
        "istio",
        "--metrics-server",
        prometheus.url.as_str(),
    ];
    let (deployments, canaries, operator) = seed_web_app_with(&cluster, &flags, |canary| {
        (istio().canary)(&mut canary["spec"]);
    })
    .await;
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
        &resource("coalmine.dev", "v1alpha1", "Rollout", "rollouts"),
    );
    let status = rollouts.get("web-app").await.unwrap().data["status"].clone();
    // The judge's words: the failures it counted from Istio's series, canary against primary.
    let said = status["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        said.contains("Bayes factor") && said.contains(" vs "),
        "rolled back for another reason: {status:#}\n{}",
        operator.stderr()
    );
    eprintln!("{said}");
    eprintln!(
        "istio, counted from Prometheus: rolled back {:.1} s after the release",
        took.as_secs_f64()
    );
}
