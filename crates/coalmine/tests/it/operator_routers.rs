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
use crate::common::who_answered;
use crate::common::{client, get_json, stats, users, Proc, Router};
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
pub(crate) async fn set_image(deployments: &Api<Deployment>, version: &str) {
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
        names.push(who_answered(&r));
    }
    names
}

/// A cluster with Coalmine's and Flagger's CRDs and namespace `shop`.
pub(crate) async fn cluster() -> TestCluster {
    let cluster = TestCluster::start().await.unwrap();
    cluster.create_namespace("shop").await.unwrap();
    let kube = cluster.client();
    install_crds(&kube, CRDS).await.unwrap();
    install_crds(&kube, FLAGGER_CRDS).await.unwrap();
    cluster
}

pub(crate) fn canaries(kube: &kube::Client) -> Api<DynamicObject> {
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
    let router = router_process("127.0.0.1:0", &format!("{}:0", pods.host_ip), primary);
    let admin_port = router.proc.addr("admin").port();
    routers_service(
        kube,
        "coalmine-router",
        admin_port,
        &[(pods.host_ip, Ready::Yes)],
    )
    .await;
    router
}

/// `coalmine proxy` as a router pod runs it: data on `listen`, its admin API on `admin` (the
/// pod's address), everything to `primary` until the operator says otherwise.
fn router_process(listen: &str, admin: &str, primary: Ipv4Addr) -> Router {
    let proc = Proc::spawn(&[
        "proxy",
        "--listen",
        listen,
        "--admin",
        admin,
        "--stable",
        &format!("http://{primary}:80"),
    ]);
    let base = format!("http://{}", proc.addr("listen"));
    let admin = format!("http://{}", proc.addr("admin"));
    Router { proc, base, admin }
}

/// The router's container restarted: its process again with its original command line, on
/// the same addresses (so it starts with everything on the primary, driven by nobody).
fn start_again(router: &mut Router, primary: Ipv4Addr) {
    let _ = router.proc.child.kill();
    let _ = router.proc.child.wait();
    let again = router_process(
        router.base.trim_start_matches("http://"),
        router.admin.trim_start_matches("http://"),
        primary,
    );
    router.proc = again.proc;
}

/// An EndpointSlice endpoint's `conditions.ready`.
#[derive(Clone, Copy)]
enum Ready {
    Yes,
    No,
}

/// Service `name` for router pods whose admin API listens on `admin_port`, and its
/// EndpointSlice listing `endpoints`, as the endpoint controller writes them.
async fn routers_service(
    kube: &kube::Client,
    name: &str,
    admin_port: u16,
    endpoints: &[(Ipv4Addr, Ready)],
) {
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9090, "targetPort": admin_port}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(address, ready)| {
            json!({"addresses": [address.to_string()],
                "conditions": {"ready": matches!(ready, Ready::Yes)}})
        })
        .collect();
    let slices: Api<EndpointSlice> = Api::namespaced(kube.clone(), "shop");
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "admin", "port": admin_port, "protocol": "TCP"}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
}

/// The seed's `web-app` Deployment and Canary, as written but for its interval — 1 s, not 1 m
/// (ten steps of a minute would make a ten-minute test) — and `edit`; an operator with
/// `--provider <provider>`, played kubelet to until the Canary is initialised.
pub(crate) async fn seed_web_app(
    cluster: &TestCluster,
    provider: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (Api<Deployment>, Api<DynamicObject>, Proc) {
    seed_web_app_with(cluster, &["--provider", provider], edit).await
}

/// [`seed_web_app`] with the operator's `flags`.
pub(crate) async fn seed_web_app_with(
    cluster: &TestCluster,
    flags: &[&str],
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
    let operator = operator(cluster, flags);
    until(&canaries, &deployments, &operator, "initialised", |s| {
        s["phase"] == "Initialized"
    })
    .await;
    (deployments, canaries, operator)
}

/// Plays kubelet until the `web-app` Canary's status is `done` (30 s at most).
pub(crate) async fn until(
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
    let (deployments, canaries, operator) = seed_web_app(&cluster, "coalmine", |_| {}).await;
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

/// The seed's web-app as the fault tests start from it: the Deployment and its Canary (the
/// seed's with a 1 s interval, then `edit`ed) initialised by an operator run with
/// `operator_flags`, and the versions' stand-in pods on their cluster IPs. The routers are each
/// test's own.
struct WebApp {
    operator: Proc,
    operator_flags: Vec<String>,
    kube: kube::Client,
    deployments: Api<Deployment>,
    canaries: Api<DynamicObject>,
    primary_ip: Ipv4Addr,
    _stand_ins: Vec<Proc>,
    cluster: TestCluster,
    /// Dropped last: the stand-ins and routers live on it.
    pods: PodNetwork,
}

impl WebApp {
    async fn initialized(
        operator_flags: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> WebApp {
        let pods = PodNetwork::create();
        let cluster = cluster().await;
        let kube = cluster.client();
        let (deployments, canaries, operator) =
            seed_web_app_with(&cluster, operator_flags, edit).await;
        let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
        let mut app = WebApp {
            operator,
            operator_flags: operator_flags.iter().map(|f| f.to_string()).collect(),
            kube,
            deployments,
            canaries,
            primary_ip: Ipv4Addr::UNSPECIFIED,
            _stand_ins: Vec::new(),
            cluster,
            pods,
        };
        // kube-proxy's part: each version's cluster IP reaches its stand-in pod.
        let primary_ip = cluster_ip(&services, "web-app-primary").await;
        let canary_ip = cluster_ip(&services, "web-app-canary").await;
        app.pods.route_here(primary_ip);
        app.pods.route_here(canary_ip);
        let stand_in = |ip: Ipv4Addr, name: &str| {
            app.pods
                .spawn(&["upstream", "--listen", &format!("{ip}:80"), "--name", name])
        };
        app._stand_ins = vec![
            stand_in(primary_ip, "primary"),
            stand_in(canary_ip, "canary"),
        ];
        app.primary_ip = primary_ip;
        app
    }

    async fn status(&self) -> serde_json::Value {
        self.canaries.get("web-app").await.unwrap().data["status"].clone()
    }

    /// `kubectl set image` to `version`: a new revision.
    async fn release(&self, version: &str) {
        set_image(&self.deployments, version).await;
    }

    /// The Canary's status once `done` says so, the Deployments' readiness reported meanwhile
    /// as kubelet would; fails after `seconds`, saying `what` was awaited.
    async fn until(
        &self,
        what: &str,
        seconds: u64,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            kubelet(&self.deployments).await;
            let s = self.status().await;
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within {seconds} s: {s:#}\n{}",
                self.operator.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The notes of the Events of `type_` (`Normal`, `Warning`), as `kubectl describe` lists
    /// them.
    async fn said(&self, type_: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.kube.clone(), "shop");
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some(type_))
            .filter_map(|e| e.note)
            .collect()
    }

    /// Waits up to `seconds` for an Event of `type_` whose note holds every one of `words`.
    async fn until_said(&self, type_: &str, words: &[&str], seconds: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            kubelet(&self.deployments).await;
            let said = self.said(type_).await;
            if let Some(note) = said.iter().find(|n| words.iter().all(|w| n.contains(w))) {
                return note.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {type_} Event saying {words:?} within {seconds} s: {said:#?}\n{}",
                self.operator.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The canary Deployment's size (`web-app`: Flagger runs the canary on the target).
    async fn canary_replicas(&self) -> i32 {
        let target = self.deployments.get("web-app").await.unwrap();
        target.spec.unwrap().replicas.unwrap_or(1)
    }

    /// `coalmine operator` killed: SIGKILL, nothing of it runs on.
    fn kill_operator(&mut self) {
        self.operator.child.kill().unwrap();
        self.operator.child.wait().unwrap();
    }

    /// The operator's container started again, with the same flags (and identity).
    fn start_operator(&mut self) {
        let flags: Vec<&str> = self.operator_flags.iter().map(String::as_str).collect();
        self.operator = operator(&self.cluster, &flags);
    }
}

/// `host:port` of a router's admin API, as the operator's words name it.
fn admin_address(router: &Router) -> &str {
    router.admin.trim_start_matches("http://")
}

/// The share of `n` requests through `router` that the canary answered, and the canary weight
/// (percent) the router's table carried throughout: measured again (up to 10 times) while the
/// weight moves under it.
async fn canary_share(router: &Router, n: usize) -> (f64, f64) {
    for _ in 0..10 {
        let before = routes(router).await["canaryWeight"].as_f64().unwrap_or(0.0);
        let answered = answered_by(router, n).await;
        let after = routes(router).await["canaryWeight"].as_f64().unwrap_or(0.0);
        if before == after {
            let canary = answered.iter().filter(|a| *a == "canary").count();
            return (canary as f64 / n as f64, before);
        }
    }
    panic!("the canary weight moved under each of 10 measurements");
}

/// Until the router's table says `done`, at most `seconds`.
async fn until_routes(
    router: &Router,
    what: &str,
    seconds: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let table = routes(router).await;
        if done(&table) {
            return table;
        }
        assert!(
            Instant::now() < deadline,
            "the router's routes not {what} within {seconds} s: {table:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_analysis_and_started_again_gets_its_routes_back_and_the_release_goes_on(
) {
    let app = WebApp::initialized(&["--provider", "coalmine"], |canary| {
        // Steps of 10 % up to 50: long enough to kill the router at one and see it put back.
        canary["spec"]["analysis"]["stepWeight"] = 10.into();
    })
    .await;
    let mut router = router_pod(&app.kube, &app.pods, app.primary_ip).await;
    let traffic = users(&router, 2);
    app.release("2.0.0").await;
    app.until("at 20 %", 30, |s| {
        s["canaryWeight"].as_f64().unwrap_or(0.0) >= 20.0
    })
    .await;
    router.proc.child.kill().unwrap();
    router.proc.child.wait().unwrap();
    // Held where it was, and `kubectl describe` says which router.
    app.until_said(
        "Warning",
        &["Holding weight: traffic: ", admin_address(&router)],
        10,
    )
    .await;
    let held_at = app.status().await["canaryWeight"].as_f64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = app.status().await;
    assert_eq!(
        (s["phase"].as_str(), s["canaryWeight"].as_f64()),
        (Some("Progressing"), Some(held_at)),
        "held while the router is down"
    );

    start_again(&mut router, app.primary_ip);
    let restarted = Instant::now();
    let table = until_routes(&router, "put back", 10, |t| t["canary"].is_string()).await;
    let put_back_in = restarted.elapsed();
    assert!(
        table["canaryWeight"].as_f64() >= Some(held_at),
        "put back at the weight it held: {table:#}"
    );
    // Users' requests through it reach the canary at about its weight again.
    let (share, weight) = canary_share(&router, 300).await;
    assert!(
        (share - weight / 100.0).abs() < 0.1,
        "{share:.2} of requests on the canary at {weight} %"
    );

    // On from the step it held at, not from the start, to the promotion.
    let mut weights = Vec::new();
    let s = app
        .until("done", 40, |s| {
            let w = s["canaryWeight"].as_f64().unwrap_or(0.0);
            if weights.last() != Some(&w) {
                weights.push(w);
            }
            s["phase"] == "Succeeded" || s["phase"] == "Failed"
        })
        .await;
    traffic.stop().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}\n{}", app.operator.stderr());
    let before_promotion: Vec<f64> = weights.iter().copied().take_while(|w| *w > 0.0).collect();
    assert!(
        before_promotion.iter().all(|w| *w >= held_at),
        "held at {held_at} %, then {weights:?}"
    );
    eprintln!(
        "router restarted: routes put back {:.1} s after it came back, at {weight} % ({share:.2} of requests on the canary); then {weights:?}",
        put_back_in.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_stays_down_holds_the_release_until_the_deadline_then_the_rollback_lands_when_it_is_back(
) {
    let app = WebApp::initialized(&["--provider", "coalmine"], |canary| {
        canary["spec"]["progressDeadlineSeconds"] = 5.into();
    })
    .await;
    let mut router = router_pod(&app.kube, &app.pods, app.primary_ip).await;
    let traffic = users(&router, 2);
    app.release("2.0.0").await;
    app.until("at 10 %", 30, |s| {
        s["canaryWeight"].as_f64().unwrap_or(0.0) >= 10.0
    })
    .await;
    router.proc.child.kill().unwrap();
    router.proc.child.wait().unwrap();
    let killed = Instant::now();
    app.until_said(
        "Warning",
        &["Holding weight: traffic: ", admin_address(&router)],
        10,
    )
    .await;
    let held_from = killed.elapsed();
    let s = app
        .until("ended", 30, |s| {
            s["phase"] == "Failed" || s["phase"] == "Succeeded"
        })
        .await;
    let rolled_back_in = killed.elapsed();
    assert_eq!(s["phase"], "Failed", "{s:#}");
    app.until_said("Warning", &["Rolling back", "progressDeadlineSeconds"], 5)
        .await;
    // Down past the run's own retries of its last route change: said, and the canary keeps
    // its pods while a router that may still send it requests is out of reach.
    tokio::time::sleep(Duration::from_secs(8)).await;
    app.until_said(
        "Warning",
        &["Final traffic not in place yet", admin_address(&router)],
        1,
    )
    .await;
    assert!(app.canary_replicas().await > 0);

    start_again(&mut router, app.primary_ip);
    let restarted = Instant::now();
    // The rollback finishes: the router driven to the primary and let go, then the canary's
    // pods go.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let table = routes(&router).await;
        let replicas = app.canary_replicas().await;
        if table["canary"].is_null() && table["owner"].is_null() && replicas == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollback never finished: canary at {replicas} replicas, routes {table:#}\n{}",
            app.operator.stderr()
        );
        kubelet(&app.deployments).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished_in = restarted.elapsed();
    app.until_said("Normal", &["Final traffic in place"], 5)
        .await;
    let answered = answered_by(&router, 50).await;
    assert!(answered.iter().all(|n| n == "primary"), "{answered:?}");
    traffic.stop().await;
    eprintln!(
        "router down: held from {:.1} s, rolled back {:.1} s after the kill; finished {:.1} s after the router came back",
        held_from.as_secs_f64(),
        rolled_back_in.as_secs_f64(),
        finished_in.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_still_landing_when_the_operator_restarts_is_carried_by_the_next_one() {
    let mut app = WebApp::initialized(&["--provider", "coalmine"], |canary| {
        canary["spec"]["progressDeadlineSeconds"] = 3.into();
    })
    .await;
    let mut router = router_pod(&app.kube, &app.pods, app.primary_ip).await;
    let traffic = users(&router, 2);
    app.release("2.0.0").await;
    app.until("at 10 %", 30, |s| {
        s["canaryWeight"].as_f64().unwrap_or(0.0) >= 10.0
    })
    .await;
    router.proc.child.kill().unwrap();
    router.proc.child.wait().unwrap();
    traffic.stop().await;
    let failed = app
        .until("rolled back", 30, |s| s["phase"] == "Failed")
        .await;
    app.until_said("Warning", &["Final traffic not in place yet"], 15)
        .await;
    // The operator goes while its rollback is still landing, and a new one starts: the run is
    // over (Failed), but its final traffic is not in place.
    app.kill_operator();
    assert!(app.canary_replicas().await > 0);
    app.start_operator();
    tokio::time::sleep(Duration::from_secs(2)).await;
    start_again(&mut router, app.primary_ip);
    let restarted = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let table = routes(&router).await;
        let replicas = app.canary_replicas().await;
        if table["canary"].is_null() && table["owner"].is_null() && replicas == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new operator left the canary at {replicas} replicas, routes {table:#}\n{}",
            app.operator.stderr()
        );
        kubelet(&app.deployments).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered = answered_by(&router, 50).await;
    assert!(answered.iter().all(|n| n == "primary"), "{answered:?}");
    // The release stays what it was: rolled back, its revision recorded (not run again).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = app.status().await;
    assert_eq!(
        (&s["phase"], &s["lastAppliedSpec"], &s["lastPromotedSpec"]),
        (
            &failed["phase"],
            &failed["lastAppliedSpec"],
            &failed["lastPromotedSpec"]
        ),
        "{s:#}"
    );
    assert_eq!(app.canary_replicas().await, 0);
    eprintln!(
        "operator restarted mid-rollback: finished {:.1} s after the router came back",
        restarted.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cut_off_from_the_operator_gets_the_rollback_once_reachable_and_the_canary_keeps_its_pods_until_then(
) {
    let app = WebApp::initialized(&["--provider", "coalmine"], |canary| {
        canary["spec"]["progressDeadlineSeconds"] = 5.into();
    })
    .await;
    // Two router pods; one on a node the operator is about to lose (its own address).
    let steady = router_process(
        "127.0.0.1:0",
        &format!("{}:0", app.pods.host_ip),
        app.primary_ip,
    );
    let port = steady.proc.addr("admin").port();
    let node = app.pods.address_here(0);
    let cut_off = router_process("127.0.0.1:0", &format!("{node}:{port}"), app.primary_ip);
    routers_service(
        &app.kube,
        "coalmine-router",
        port,
        &[(app.pods.host_ip, Ready::Yes), (node, Ready::Yes)],
    )
    .await;
    let traffic = users(&cut_off, 2);
    app.release("2.0.0").await;
    app.until("at 10 %", 30, |s| {
        s["canaryWeight"].as_f64().unwrap_or(0.0) >= 10.0
    })
    .await;
    app.pods.cut_off(node);
    let cut = Instant::now();
    app.until_said(
        "Warning",
        &["Holding weight: traffic: ", admin_address(&cut_off)],
        20,
    )
    .await;
    let held_from = cut.elapsed();
    let s = app
        .until("ended", 30, |s| {
            s["phase"] == "Failed" || s["phase"] == "Succeeded"
        })
        .await;
    let rolled_back_in = cut.elapsed();
    assert_eq!(s["phase"], "Failed", "{s:#}");
    // The rollback reached the router it could; users still go through the other, which still
    // sends the canary its share: the canary keeps its pods.
    until_routes(&steady, "rolled back", 5, |t| t["canary"].is_null()).await;
    let answered = answered_by(&cut_off, 100).await;
    assert!(answered.iter().any(|n| n == "canary"), "{answered:?}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        app.canary_replicas().await > 0,
        "the canary lost its pods while a router still sends it requests"
    );

    app.pods.reconnect(node);
    let reconnected = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let table = routes(&cut_off).await;
        let replicas = app.canary_replicas().await;
        if table["canary"].is_null() && table["owner"].is_null() && replicas == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollback never reached the router: canary at {replicas} replicas, routes {table:#}\n{}",
            app.operator.stderr()
        );
        kubelet(&app.deployments).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished_in = reconnected.elapsed();
    let answered = answered_by(&cut_off, 50).await;
    assert!(answered.iter().all(|n| n == "primary"), "{answered:?}");
    traffic.stop().await;
    eprintln!(
        "router cut off: held from {:.1} s, rolled back {:.1} s after the cut; the rollback reached it {:.1} s after it was reachable again",
        held_from.as_secs_f64(),
        rolled_back_in.as_secs_f64(),
        finished_in.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_analysis_and_started_again_resumes_at_the_step_it_was_on() {
    let mut app = WebApp::initialized(&["--provider", "coalmine"], |_| {}).await;
    let router = router_pod(&app.kube, &app.pods, app.primary_ip).await;
    let traffic = users(&router, 2);
    app.release("2.0.0").await;
    app.until("at 20 %", 30, |s| {
        s["canaryWeight"].as_f64().unwrap_or(0.0) >= 20.0
    })
    .await;
    app.kill_operator();
    let weight_at_death = app.status().await["canaryWeight"].as_f64().unwrap();
    let canary_requests = stats(&router).await["canary"]["requests"]
        .as_u64()
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.status().await["canaryWeight"].as_f64(),
        Some(weight_at_death),
        "nothing drives the release meanwhile"
    );

    app.start_operator();
    let started = Instant::now();
    let mut weights = Vec::new();
    let mut resumed_in = None;
    let s = app
        .until("done", 40, |s| {
            let w = s["canaryWeight"].as_f64().unwrap_or(0.0);
            if weights.last() != Some(&w) {
                weights.push(w);
            }
            if w != weight_at_death && resumed_in.is_none() {
                resumed_in = Some(started.elapsed());
            }
            s["phase"] == "Succeeded" || s["phase"] == "Failed"
        })
        .await;
    let (ok, failed) = traffic.stop().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}\n{}", app.operator.stderr());
    let before_promotion: Vec<f64> = weights.iter().copied().take_while(|w| *w > 0.0).collect();
    assert!(
        before_promotion.first() == Some(&weight_at_death)
            && before_promotion.iter().all(|w| *w >= weight_at_death),
        "died at {weight_at_death} %, then {weights:?}"
    );
    // The new operator found the router and drove it: the canary kept getting requests, and
    // users saw nothing of the operator's death.
    let after = stats(&router).await["canary"]["requests"]
        .as_u64()
        .unwrap_or(0);
    assert!(after > canary_requests, "{canary_requests} → {after}");
    assert_eq!(failed, 0, "{ok} ok");
    assert_eq!(routes(&router).await["canaryWeight"].as_f64(), Some(0.0));
    eprintln!(
        "operator restarted at {weight_at_death} %: next step {:.1} s after it started; then {weights:?}",
        resumed_in.unwrap_or_default().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_listed_not_ready_are_left_alone_and_a_ready_one_that_does_not_answer_holds_the_release(
) {
    let app = WebApp::initialized(&["--provider", "coalmine"], |_| {}).await;
    // Three router pods behind one Service, their admin APIs on one port: one serving, one
    // not ready (a router that must not be touched), one listed ready that does not answer yet.
    let serving = router_process(
        "127.0.0.1:0",
        &format!("{}:0", app.pods.host_ip),
        app.primary_ip,
    );
    let port = serving.proc.addr("admin").port();
    let not_ready_ip = app.pods.address_here(0);
    let not_ready = router_process(
        "127.0.0.1:0",
        &format!("{not_ready_ip}:{port}"),
        app.primary_ip,
    );
    let not_ready_table = routes(&not_ready).await;
    let late_ip = app.pods.address_here(1);
    let late = format!("{late_ip}:{port}");
    routers_service(
        &app.kube,
        "coalmine-router",
        port,
        &[
            (app.pods.host_ip, Ready::Yes),
            (not_ready_ip, Ready::No),
            (late_ip, Ready::Yes),
        ],
    )
    .await;
    let traffic = users(&serving, 2);
    app.release("2.0.0").await;
    app.until_said("Warning", &["Holding weight: traffic: ", &late], 15)
        .await;
    // Held, not rolled back, and not moved on while one router has not taken the step.
    let mut weights = Vec::new();
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(3) {
        let s = app.status().await;
        weights.push(s["canaryWeight"].as_f64().unwrap_or(0.0));
        assert_eq!(s["phase"], "Progressing", "{s:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(weights.iter().all(|w| *w == 0.0), "{weights:?}");

    // The late router answers: the release goes on over both ready routers.
    let late_router = router_process("127.0.0.1:0", &late, app.primary_ip);
    let s = app
        .until("done", 40, |s| {
            s["phase"] == "Succeeded" || s["phase"] == "Failed"
        })
        .await;
    let (ok, failed) = traffic.stop().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}\n{}", app.operator.stderr());
    assert_eq!(failed, 0, "{ok} ok");
    // The final routes land after the run's end is saved (status first, then traffic): each
    // router is released soon after.
    for router in [&serving, &late_router] {
        until_routes(router, "released", 10, |t| {
            t["canary"].is_null() && t["owner"].is_null()
        })
        .await;
    }
    assert_eq!(
        routes(&not_ready).await,
        not_ready_table,
        "the router listed not ready was driven"
    );
    let not_ready_address = format!("{not_ready_ip}:{port}");
    for type_ in ["Normal", "Warning"] {
        let said = app.said(type_).await;
        assert!(
            !said.iter().any(|n| n.contains(&not_ready_address)),
            "{said:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_naming_a_routers_service_that_does_not_exist_is_told_so_and_runs_once_it_does() {
    // Provider coalmine chosen by the annotation, naming a Service nobody made.
    let app = WebApp::initialized(&[], |canary| {
        canary["metadata"]["annotations"] = json!({"coalmine.dev/routers": "nope"});
        canary["spec"]["analysis"]["stepWeight"] = 25.into();
    })
    .await;
    app.release("2.0.0").await;
    let s = app
        .until("told invalid", 15, |s| {
            s["conditions"][0]["reason"] == "InvalidSpec"
        })
        .await;
    let said = s["conditions"][0]["message"].as_str().unwrap().to_string();
    assert!(
        said.starts_with("spec.routers.service: ") && said.contains("nope"),
        "{said}"
    );
    app.until_said("Warning", &["spec.routers.service", "nope"], 5)
        .await;
    // Nothing moves: no canary pods, no weight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = app.status().await;
    assert_eq!(
        (s["phase"].as_str(), s["canaryWeight"].as_f64()),
        (Some("Initialized"), Some(0.0)),
        "{s:#}"
    );
    assert_eq!(app.canary_replicas().await, 0);

    // The routers are deployed: the release runs.
    let router = router_process(
        "127.0.0.1:0",
        &format!("{}:0", app.pods.host_ip),
        app.primary_ip,
    );
    let admin_port = router.proc.addr("admin").port();
    routers_service(
        &app.kube,
        "nope",
        admin_port,
        &[(app.pods.host_ip, Ready::Yes)],
    )
    .await;
    let created = Instant::now();
    let traffic = users(&router, 2);
    app.until("progressing", 40, |s| s["phase"] != "Initialized")
        .await;
    let started_in = created.elapsed();
    // The Service is watched: not left for the next look at an invalid rollout (30 s).
    assert!(
        started_in < Duration::from_secs(10),
        "started {:.1} s after the routers Service was made",
        started_in.as_secs_f64()
    );
    let s = app
        .until("done", 30, |s| {
            s["phase"] == "Succeeded" || s["phase"] == "Failed"
        })
        .await;
    traffic.stop().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}\n{}", app.operator.stderr());
    assert_ne!(s["conditions"][0]["reason"], "InvalidSpec", "{s:#}");
    assert!(stats(&router).await["canary"]["requests"].as_u64() > Some(0));
    eprintln!(
        "routers Service created: the release started {:.1} s later",
        started_in.as_secs_f64()
    );
}

/// One app of [`two_canaries_on_one_router_fleet_each_drive_their_own_service`]: its
/// Deployment and its Canary on the routers' service `service`.
async fn app_with_canary(kube: &kube::Client, app: &str, service: &str) {
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), "shop");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": app, "namespace": "shop"},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": app}},
                    "template": {"metadata": {"labels": {"app": app}},
                        "spec": {"containers": [{"name": app, "image": format!("registry.example/{app}:1.0.0")}]}}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    canaries(kube)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "flagger.app/v1beta1", "kind": "Canary",
                "metadata": {"name": app, "namespace": "shop", "annotations": {
                    "coalmine.dev/routers": "coalmine-router",
                    "coalmine.dev/router-service": service}},
                "spec": {
                    "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
                    "service": {"port": 80},
                    "analysis": {"interval": "1s", "threshold": 2, "stepWeights": [10, 50],
                        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "1m"}]},
                },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
}

/// Two Canaries on one router fleet, each on its own service of the routers' table (the
/// `coalmine.dev/router-service` annotation): released at the same time under real traffic, the
/// good one is promoted while the bad one is rolled back, each moving only its own service —
/// while both run, each service's owner is its own rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_canaries_on_one_router_fleet_each_drive_their_own_service() {
    use crate::gateway::traffic_for;

    let pods = PodNetwork::create();
    let cluster = cluster().await;
    let kube = cluster.client();
    app_with_canary(&kube, "web", "web").await;
    app_with_canary(&kube, "cart", "cart").await;
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), "shop");
    let canaries = canaries(&kube);
    let operator = operator(&cluster, &["--provider", "coalmine"]);
    let phase = |name: &'static str| {
        let canaries = canaries.clone();
        async move { canaries.get(name).await.unwrap().data["status"]["phase"].clone() }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while phase("web").await != "Initialized" || phase("cart").await != "Initialized" {
        kubelet(&deployments).await;
        assert!(
            Instant::now() < deadline,
            "not initialised:\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each version's stand-in on its cluster IP; the cart's new release answers 500.
    let services: Api<Service> = Api::namespaced(kube.clone(), "shop");
    let mut stand_ins = Vec::new();
    let mut primaries = Vec::new();
    for (app, error_rate) in [("web", "0"), ("cart", "1")] {
        for (version, name, errors) in [
            ("primary", "primary", "0"),
            ("canary", "canary", error_rate),
        ] {
            let ip = cluster_ip(&services, &format!("{app}-{version}")).await;
            pods.route_here(ip);
            stand_ins.push(pods.spawn(&[
                "upstream",
                "--listen",
                &format!("{ip}:80"),
                "--name",
                &format!("{app}-{name}"),
                "--error-rate",
                errors,
            ]));
            if version == "primary" {
                primaries.push(ip);
            }
        }
    }
    // The router fleet: one router with the two services, by host.
    let dir = crate::common::TempDir::new("two-canaries");
    let config = dir.write(
        "edge.yaml",
        &format!(
            "services:\n  - {{service: web, hosts: [web.example.com], stable: 'http://{}:80'}}\n  - {{service: cart, hosts: [cart.example.com], stable: 'http://{}:80'}}\n",
            primaries[0], primaries[1]
        ),
    );
    let proc = Proc::spawn(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &format!("{}:0", pods.host_ip),
        "--config",
        config.to_str().unwrap(),
    ]);
    let router = Router {
        base: format!("http://{}", proc.addr("listen")),
        admin: format!("http://{}", proc.addr("admin")),
        proc,
    };
    let admin_port = router.proc.addr("admin").port();
    routers_service(
        &kube,
        "coalmine-router",
        admin_port,
        &[(pods.host_ip, Ready::Yes)],
    )
    .await;

    let web_users = traffic_for(&router, "web.example.com");
    let cart_users = traffic_for(&router, "cart.example.com");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for app in ["web", "cart"] {
        let image = json!({"spec": {"template": {"spec": {"containers": [
            {"name": app, "image": format!("registry.example/{app}:2.0.0")}]}}}});
        deployments
            .patch(app, &PatchParams::default(), &Patch::Strategic(&image))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    // Each service's owner while its rollout progresses (and the other's, at that moment).
    let (mut web_owner, mut cart_owner) = (None, None);
    loop {
        kubelet(&deployments).await;
        let (web, cart) = (phase("web").await, phase("cart").await);
        let owner = |service: &'static str| {
            let admin = router.admin.clone();
            async move { get_json(&format!("{admin}/routes/{service}")).await["owner"].clone() }
        };
        if web == "Progressing" && web_owner.is_none() {
            web_owner = Some(owner("web").await);
        }
        if cart == "Progressing" && cart_owner.is_none() {
            cart_owner = Some(owner("cart").await);
        }
        let done = |p: &serde_json::Value| p == "Succeeded" || p == "Failed";
        if done(&web) && done(&cart) {
            assert_eq!(
                (web.as_str(), cart.as_str()),
                (Some("Succeeded"), Some("Failed")),
                "{}",
                operator.stderr()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web {web}, cart {cart} after 60 s:\n{}",
            operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let web_seen = web_users.stop().await;
    let cart_seen = cart_users.stop().await;
    // Each rollout drove its own service, signed as itself.
    let web_owner = web_owner
        .expect("web progressed")
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cart_owner = cart_owner
        .expect("cart progressed")
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        web_owner.contains("web") && cart_owner.contains("cart") && web_owner != cart_owner,
        "{web_owner} / {cart_owner}"
    );
    eprintln!("owners: {web_owner} / {cart_owner}");
    // The web canary had web's users only, the cart canary cart's only.
    assert!(
        web_seen.iter().any(|n| n == "web-canary"),
        "the web canary never got traffic"
    );
    assert!(
        web_seen.iter().all(|n| n.starts_with("web-")),
        "{:?}",
        web_seen.iter().find(|n| !n.starts_with("web-"))
    );
    assert!(
        cart_seen
            .iter()
            .all(|n| n.starts_with("cart-") || n == "status 500"),
        "{:?}",
        cart_seen.iter().find(|n| !n.starts_with("cart-"))
    );
    // Both back on their primaries: web's is the new release, cart's the old.
    for service in ["web", "cart"] {
        let doc = get_json(&format!("{}/routes/{service}", router.admin)).await;
        assert_eq!(doc["canaryWeight"].as_f64(), Some(0.0), "{doc:#}");
    }
    let image = |name: &'static str| {
        let deployments = deployments.clone();
        async move {
            deployments
                .get(name)
                .await
                .unwrap()
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .image
                .clone()
                .unwrap_or_default()
        }
    };
    assert_eq!(image("web-primary").await, "registry.example/web:2.0.0");
    assert_eq!(image("cart-primary").await, "registry.example/cart:1.0.0");
}
