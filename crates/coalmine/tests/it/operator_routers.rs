//! Provider `coalmine` end to end: the seed's `web-app` Canary (`tests/fixtures/seed/
//! flagger-web-app.yaml`, written for Flagger) run by `coalmine operator --provider coalmine`,
//! with real requests through a real router to real upstream processes standing in for the
//! pods. The router runs here (data on 127.0.0.1); the stand-ins run in a network namespace the
//! test makes, listening on the cluster IPs the API server gave the `-primary` and `-canary`
//! Services, which the test routes to them as kube-proxy would. The operator finds the router
//! through a Service and its EndpointSlice (an address on the test's veth: the API server
//! refuses loopback endpoints), like any router pod in a cluster.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use coalmine_kube_fake::{install_crds, TestCluster};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::netns::PodNetwork;
use crate::common::{client, get_json, users, Proc, Router};
use crate::operator::kubelet;

const CRDS: &str = include_str!("../../../../deploy/kubernetes/crds/coalmine.yaml");
const FLAGGER_CRDS: &str = include_str!("../../../../deploy/kubernetes/crds/flagger.yaml");
/// The seed's Canary, as the user wrote it for Flagger.
const WEB_APP_CANARY: &str = include_str!("../../../../tests/fixtures/seed/flagger-web-app.yaml");

const WEB_APP: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-app, namespace: shop}
spec:
  replicas: 4
  selector: {matchLabels: {app: web-app}}
  template:
    metadata: {labels: {app: web-app}}
    spec:
      containers: [{name: web-app, image: 'registry.example/web-app:1.0.0'}]
";

/// `kubectl set image deployment/web-app web-app=…:<version>`.
async fn set_image(deployments: &Api<Deployment>, version: &str) {
    let image = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "web-app", "image": format!("registry.example/web-app:{version}")}]}}}});
    deployments
        .patch(
            "web-app",
            &PatchParams::default(),
            &Patch::Strategic(&image),
        )
        .await
        .unwrap();
}

async fn cluster_ip(services: &Api<Service>, name: &str) -> Ipv4Addr {
    let service = services.get(name).await.unwrap();
    service.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}

/// The router's routes as its admin API serves them.
async fn routes(router: &Router) -> serde_json::Value {
    get_json(&format!("{}/routes", router.admin)).await
}

/// Which stand-in answered each of `n` requests through the router.
async fn answered_by(router: &Router, n: usize) -> Vec<String> {
    let c = client();
    let mut names = Vec::new();
    for _ in 0..n {
        let r = c.get(format!("{}/", router.base)).send().await.unwrap();
        names.push(
            r.headers()
                .get("x-upstream")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_else(|| format!("status {}", r.status())),
        );
    }
    names
}

/// A cluster with Coalmine's and Flagger's CRDs and namespace `shop`.
async fn cluster() -> TestCluster {
    let cluster = TestCluster::start().await.unwrap();
    cluster.create_namespace("shop").await.unwrap();
    let kube = cluster.client();
    install_crds(&kube, CRDS).await.unwrap();
    install_crds(&kube, FLAGGER_CRDS).await.unwrap();
    cluster
}

fn canaries(kube: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        kube.clone(),
        "shop",
        &ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("flagger.app", "v1beta1", "Canary"),
            "canaries",
        ),
    )
}

/// `coalmine operator` on the cluster, with `extra` flags.
fn operator(cluster: &TestCluster, extra: &[&str]) -> Proc {
    let kubeconfig = cluster.kubeconfig().to_str().unwrap().to_string();
    let mut args = vec![
        "operator",
        "--kubeconfig",
        &kubeconfig,
        "--identity",
        "operator-a",
        "--lease-namespace",
        "shop",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// A router pod for the service (its admin API on the pods' network), found through the
/// `coalmine-router` Service and its EndpointSlice, sending everything to `primary` until the
/// operator says otherwise.
async fn router_pod(kube: &kube::Client, pods: &PodNetwork, primary: Ipv4Addr) -> Router {
    let proc = Proc::spawn(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &format!("{}:0", pods.host_ip),
        "--stable",
        &format!("http://{primary}:80"),
    ]);
    let base = format!("http://{}", proc.addr("listen"));
    let admin = format!("http://{}", proc.addr("admin"));
    let admin_port = proc.addr("admin").port();
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "coalmine-router"},
                "spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9090, "targetPort": admin_port}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(kube.clone(), "shop");
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "coalmine-router-1", "labels": {"kubernetes.io/service-name": "coalmine-router"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [pods.host_ip.to_string()], "conditions": {"ready": true}}],
                "ports": [{"name": "admin", "port": admin_port, "protocol": "TCP"}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    Router { proc, base, admin }
}

/// The seed's `web-app` Deployment and Canary, as written but for its interval — 1 s, not 1 m
/// (ten steps of a minute would make a ten-minute test) — and `edit`; an operator with
/// `--provider coalmine`, played kubelet to until the Canary is initialised.
async fn seed_web_app(
    cluster: &TestCluster,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (Api<Deployment>, Api<DynamicObject>, Proc) {
    let kube = cluster.client();
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), "shop");
    deployments
        .create(
            &PostParams::default(),
            &serde_saphyr::from_str(WEB_APP).unwrap(),
        )
        .await
        .unwrap();
    let mut canary: serde_json::Value = serde_saphyr::from_str(WEB_APP_CANARY).unwrap();
    canary["metadata"]["namespace"] = "shop".into();
    canary["spec"]["analysis"]["interval"] = "1s".into();
    edit(&mut canary);
    let canaries = canaries(&kube);
    canaries
        .create(
            &PostParams::default(),
            &serde_json::from_value(canary).unwrap(),
        )
        .await
        .unwrap();
    let operator = operator(cluster, &["--provider", "coalmine"]);
    until(&canaries, &deployments, &operator, "initialised", |s| {
        s["phase"] == "Initialized"
    })
    .await;
    (deployments, canaries, operator)
}

/// Plays kubelet until the `web-app` Canary's status is `done` (30 s at most).
async fn until(
    canaries: &Api<DynamicObject>,
    deployments: &Api<Deployment>,
    operator: &Proc,
    what: &str,
    done: fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        kubelet(deployments).await;
        let s = canaries.get("web-app").await.unwrap().data["status"].clone();
        if done(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} within 30 s: {s:#}\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_canary_on_coalmine_routers_is_promoted_then_a_bad_release_rolls_back_on_real_errors(
) {
    let pods = PodNetwork::create();
    let cluster = cluster().await;
    let kube = cluster.client();
    // Its checks are the built-in ones, over the routers' counts. Initialised as under Flagger:
    // the primary, the Services (the apex on the primary).
    let (deployments, canaries, operator) = seed_web_app(&cluster, |_| {}).await;
    let status = || async { canaries.get("web-app").await.unwrap().data["status"].clone() };
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    let apex = services.get("web-app").await.unwrap();
    assert_eq!(
        apex.spec.unwrap().selector.unwrap()["app"],
        "web-app-primary",
        "the apex selects the primary; the routers weigh"
    );
    // kube-proxy's part: each version's cluster IP reaches its stand-in pod.
    let primary_ip = cluster_ip(&services, "web-app-primary").await;
    let canary_ip = cluster_ip(&services, "web-app-canary").await;
    pods.route_here(primary_ip);
    pods.route_here(canary_ip);
    let _primary = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{primary_ip}:80"),
        "--name",
        "primary",
    ]);
    let mut canary_pod = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{canary_ip}:80"),
        "--name",
        "canary-2.0.0",
    ]);
    // A router pod, started for the service, found through its Service's EndpointSlice.
    let router = router_pod(&kube, &pods, primary_ip).await;

    // A good release under real traffic: stepped 5 → 50 % by the routers, promoted.
    let traffic = users(&router, 4);
    set_image(&deployments, "2.0.0").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut weights = Vec::new();
    let s = loop {
        kubelet(&deployments).await;
        let s = status().await;
        let w = s["canaryWeight"].as_f64().unwrap_or(0.0);
        if weights.last() != Some(&w) {
            weights.push(w);
        }
        if s["phase"] == "Succeeded" || s["phase"] == "Failed" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "not done within 60 s: {s:#}\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ok, failed) = traffic.stop().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}\n{}", operator.stderr());
    assert!(
        weights.contains(&5.0) && weights.contains(&50.0),
        "the seed's steps: {weights:?}"
    );
    assert_eq!(
        failed, 0,
        "users saw failures during a good release ({ok} ok)"
    );
    let primary = deployments.get("web-app-primary").await.unwrap();
    assert_eq!(
        primary.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("registry.example/web-app:2.0.0")
    );
    // The router carried the canary's share, and everything is back on the primary.
    let stats = get_json(&format!("{}/stats", router.admin)).await;
    let canary_requests = stats["canary"]["requests"].as_u64().unwrap_or(0);
    assert!(
        canary_requests > 0,
        "no request reached the canary: {stats:#}"
    );
    let table = routes(&router).await;
    assert_eq!(table["canaryWeight"].as_f64(), Some(0.0), "{table:#}");
    assert_eq!(
        deployments
            .get("web-app")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(0),
        "the canary scaled to 0 after promotion"
    );

    // A bad release: its pods answer 500. Rolled back on the routers' real counts.
    drop(canary_pod);
    canary_pod = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{canary_ip}:80"),
        "--name",
        "canary-3.0.0",
        "--error-rate",
        "1",
    ]);
    let traffic = users(&router, 4);
    set_image(&deployments, "3.0.0").await;
    let started = Instant::now();
    let applied = s["lastAppliedSpec"].clone();
    let s = loop {
        kubelet(&deployments).await;
        let s = status().await;
        if s["lastAppliedSpec"] != applied && (s["phase"] == "Failed" || s["phase"] == "Succeeded")
        {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not done within 60 s: {s:#}\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rolled_back_in = started.elapsed();
    let (ok, failed) = traffic.stop().await;
    assert_eq!(s["phase"], "Failed", "{s:#}\n{}", operator.stderr());
    eprintln!(
        "bad release rolled back in {:.1} s; users saw {failed} failures of {}",
        rolled_back_in.as_secs_f64(),
        ok + failed
    );
    // Everything on the primary again: the routers' table, and every real request.
    let table = routes(&router).await;
    assert_eq!(table["canaryWeight"].as_f64(), Some(0.0), "{table:#}");
    let answered = answered_by(&router, 50).await;
    assert!(
        answered.iter().all(|n| n == "primary"),
        "after the rollback: {answered:?}"
    );
    let primary = deployments.get("web-app-primary").await.unwrap();
    assert_eq!(
        primary.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("registry.example/web-app:2.0.0"),
        "the bad image never reached the primary"
    );
    // `kubectl describe canary` says why: the sequential test on the routers' counts (it
    // rejects within a second or two of failures at 5 %), or the seed's success-rate check.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(kube.clone(), "shop");
    let warnings: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        warnings.iter().any(|n| n.starts_with("Rolling back")
            && (n.contains("fails more often than stable") || n.contains("request-success-rate"))),
        "{warnings:#?}"
    );
    drop(canary_pod);
}

/// A node agent, one pod per node.
const NODE_AGENT: &str = "
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-agent, namespace: shop}
spec:
  selector: {matchLabels: {app: node-agent}}
  template:
    metadata: {labels: {app: node-agent}}
    spec:
      containers: [{name: node-agent, image: 'registry.example/node-agent:1.0.0'}]
";

const NODE_AGENT_CANARY: &str = "
apiVersion: flagger.app/v1beta1
kind: Canary
metadata:
  name: node-agent
  namespace: shop
  # Flagger's CRD allows no `provider: coalmine`: naming the routers chooses them.
  annotations: {coalmine.dev/routers: coalmine-router}
spec:
  targetRef: {apiVersion: apps/v1, kind: DaemonSet, name: node-agent}
  service: {port: 80}
  analysis:
    interval: 1s
    threshold: 2
    stepWeights: [10, 50]
    metrics:
      - {name: request-success-rate, thresholdRange: {min: 99}, interval: 1m}
";

/// The DaemonSet controller and kubelet's part on a 3-node cluster: every DaemonSet runs its
/// pods on the 3 nodes, none where it is parked.
async fn daemon_kubelet(daemon_sets: &Api<DaemonSet>) {
    for ds in daemon_sets.list(&Default::default()).await.unwrap().items {
        let parked = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.node_selector.as_ref())
            .is_some_and(|n| n.contains_key("flagger.app/scale-to-zero"));
        let n = if parked { 0 } else { 3 };
        let generation = ds.metadata.generation.unwrap_or(0);
        let status = ds.status.clone().unwrap_or_default();
        if status.observed_generation == Some(generation) && status.desired_number_scheduled == n {
            continue;
        }
        let patch = json!({"status": {"observedGeneration": generation, "currentNumberScheduled": n,
            "desiredNumberScheduled": n, "numberMisscheduled": 0, "numberReady": n,
            "updatedNumberScheduled": n, "numberAvailable": n}});
        daemon_sets
            .patch_status(
                ds.metadata.name.as_deref().unwrap(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
    }
}

fn parked(ds: &DaemonSet) -> bool {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .node_selector
        .as_ref()
        .is_some_and(|n| n.get("flagger.app/scale-to-zero").map(String::as_str) == Some("true"))
}

fn image(ds: &DaemonSet) -> Option<String> {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_set_is_parked_analysed_on_every_node_and_promoted_through_its_primary() {
    let pods = PodNetwork::create();
    let cluster = cluster().await;
    let kube = cluster.client();
    let daemon_sets: Api<DaemonSet> = Api::namespaced(kube.clone(), "shop");
    daemon_sets
        .create(
            &PostParams::default(),
            &serde_saphyr::from_str(NODE_AGENT).unwrap(),
        )
        .await
        .unwrap();
    let canaries = canaries(&kube);
    canaries
        .create(
            &PostParams::default(),
            &serde_saphyr::from_str(NODE_AGENT_CANARY).unwrap(),
        )
        .await
        .unwrap();
    // The Canary names its routers: the operator's default provider (kubernetes) does not apply.
    let operator = operator(&cluster, &[]);
    let status = || async { canaries.get("node-agent").await.unwrap().data["status"].clone() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while status().await["phase"] != "Initialized" {
        assert!(
            Instant::now() < deadline,
            "not initialised: {:#}\n{}",
            status().await,
            operator.stderr()
        );
        daemon_kubelet(&daemon_sets).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As Flagger: the primary runs the template on every node; the target is parked.
    let primary = daemon_sets.get("node-agent-primary").await.unwrap();
    assert!(!parked(&primary), "the primary runs everywhere");
    assert_eq!(
        primary
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
            .as_ref()
            .unwrap()["app"],
        "node-agent-primary"
    );
    assert!(parked(&daemon_sets.get("node-agent").await.unwrap()));
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    let primary_ip = cluster_ip(&services, "node-agent-primary").await;
    let canary_ip = cluster_ip(&services, "node-agent-canary").await;
    pods.route_here(primary_ip);
    pods.route_here(canary_ip);
    let _primary_pod = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{primary_ip}:80"),
        "--name",
        "primary",
    ]);
    let _canary_pod = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{canary_ip}:80"),
        "--name",
        "canary",
    ]);
    let router = router_pod(&kube, &pods, primary_ip).await;

    // A new image: the canary runs on every node while the routers send it 10 %, then 50 %.
    let traffic = users(&router, 4);
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "node-agent", "image": "registry.example/node-agent:2.0.0"}]}}}});
    daemon_sets
        .patch(
            "node-agent",
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ran_unparked = false;
    let s = loop {
        daemon_kubelet(&daemon_sets).await;
        let s = status().await;
        ran_unparked |= !parked(&daemon_sets.get("node-agent").await.unwrap());
        if s["phase"] == "Succeeded" || s["phase"] == "Failed" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "not done within 60 s: {s:#}\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ok, failed) = traffic.stop().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}\n{}", operator.stderr());
    assert!(ran_unparked, "the canary never ran");
    assert_eq!(failed, 0, "{ok} ok");
    let stats = get_json(&format!("{}/stats", router.admin)).await;
    assert!(stats["canary"]["requests"].as_u64() > Some(0), "{stats:#}");
    assert_eq!(
        image(&daemon_sets.get("node-agent-primary").await.unwrap()).as_deref(),
        Some("registry.example/node-agent:2.0.0")
    );
    assert!(
        parked(&daemon_sets.get("node-agent").await.unwrap()),
        "parked again"
    );
    // Parking is Coalmine's own edit of the template: not a new revision to analyse.
    let applied = s["lastAppliedSpec"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status().await;
    assert_eq!(
        (&s["phase"], &s["lastAppliedSpec"]),
        (&json!("Succeeded"), &applied),
        "{s:#}"
    );

    // Deleted with revertOnDeletion: the target runs everywhere again, the apex selects it, and
    // the routers send everything there before the Canary goes.
    canaries
        .patch(
            "node-agent",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revertOnDeletion": true}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while canaries
        .get("node-agent")
        .await
        .unwrap()
        .metadata
        .finalizers
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "no finalizer\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let apex_ip = cluster_ip(&services, "node-agent").await;
    pods.route_here(apex_ip);
    let _target_pod = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{apex_ip}:80"),
        "--name",
        "target",
    ]);
    canaries
        .delete("node-agent", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while canaries.get_opt("node-agent").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the Canary was never let go\n{}",
            operator.stderr()
        );
        daemon_kubelet(&daemon_sets).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!parked(&daemon_sets.get("node-agent").await.unwrap()));
    let answered = answered_by(&router, 20).await;
    assert!(answered.iter().all(|n| n == "target"), "{answered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_the_router_missed_lands_when_it_is_back_and_the_canary_pods_go() {
    let pods = PodNetwork::create();
    let cluster = cluster().await;
    let kube = cluster.client();
    // A 2 s progress deadline: a router out of reach for longer rolls the release back.
    let (deployments, canaries, operator) = seed_web_app(&cluster, |canary| {
        canary["spec"]["progressDeadlineSeconds"] = 2.into();
    })
    .await;
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    let primary_ip = cluster_ip(&services, "web-app-primary").await;
    let canary_ip = cluster_ip(&services, "web-app-canary").await;
    pods.route_here(primary_ip);
    pods.route_here(canary_ip);
    let _primary = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{primary_ip}:80"),
        "--name",
        "primary",
    ]);
    let _canary = pods.spawn(&[
        "upstream",
        "--listen",
        &format!("{canary_ip}:80"),
        "--name",
        "canary",
    ]);
    let router = router_pod(&kube, &pods, primary_ip).await;
    let admin = router.proc.addr("admin");
    let traffic = users(&router, 2);
    set_image(&deployments, "2.0.0").await;
    until(&canaries, &deployments, &operator, "at 10 %", |s| {
        s["canaryWeight"].as_f64() >= Some(10.0)
    })
    .await;

    // The router goes away mid-analysis: held, then rolled back at the deadline — a rollback
    // no router can be told of yet.
    drop(router);
    traffic.stop().await;
    until(&canaries, &deployments, &operator, "rolled back", |s| {
        s["phase"] == "Failed"
    })
    .await;
    assert!(
        deployments
            .get("web-app")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas
            > Some(0),
        "the canary's pods stay until the routers are off them"
    );
    // Past the driver's own retries of the final routes (10 × 0.5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let back = Proc::spawn(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &admin.to_string(),
        "--stable",
        &format!("http://{primary_ip}:80"),
    ]);
    let back_admin = format!("http://{}", back.addr("admin"));
    // Once it is back, the rollback lands: everything on the primary, the canary's pods gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while deployments
        .get("web-app")
        .await
        .unwrap()
        .spec
        .unwrap()
        .replicas
        != Some(0)
    {
        assert!(
            Instant::now() < deadline,
            "the canary's pods were left running after a rollback the router missed\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let table = get_json(&format!("{back_admin}/routes")).await;
    assert_eq!(table["canaryWeight"].as_f64(), Some(0.0), "{table:#}");
}
