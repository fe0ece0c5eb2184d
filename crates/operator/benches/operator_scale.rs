//! Many Flagger Canaries analysed at once by one `coalmine operator` process: is every tick on
//! time, how much memory does the operator take, how many API requests does each Canary cost?
//!
//!   scripts/bench/operator-scale        (CANARIES=1000 INTERVAL=10 MEASURE=120)
//!
//! Against the in-repo fake API server, or the real one when `KUBEBUILDER_ASSETS` names envtest's
//! binaries. The bench plays kubelet (it marks every Deployment ready as soon as its spec
//! changes) and counts its own requests; the operator's are the API server's
//! `apiserver_request_total` minus the bench's.
//!
//! Each Canary (provider `kubernetes`) steps 2 % per interval up to 50 %: one step per tick, so
//! the times its `canaryWeight` changes are its ticks. Lateness is how much longer than the
//! interval two consecutive steps were apart (as seen through a watch: an upper bound).

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coalmine_kube_fake::{install_crds, TestCluster};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;

const COALMINE_CRDS: &str = include_str!("../../../deploy/kubernetes/crds/coalmine.yaml");
const FLAGGER_CRDS: &str = include_str!("../../../deploy/kubernetes/crds/flagger.yaml");
const NAMESPACE: &str = "bench";

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn canaries_api(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("flagger.app", "v1beta1", "Canary"),
            "canaries",
        ),
    )
}

/// The bench's own requests (to subtract from the API server's count).
static OWN_REQUESTS: AtomicU64 = AtomicU64::new(0);

fn own() {
    OWN_REQUESTS.fetch_add(1, Relaxed);
}

/// `apiserver_request_total` by (verb, resource, subresource).
async fn api_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    own();
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    let mut totals = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let sub = label("subresource");
        let key = format!(
            "{} {}{}",
            label("verb"),
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        *totals.entry(key).or_default() += value;
    }
    totals
}

/// Marks every Deployment whose status lags its spec as fully ready (kubelet's and the
/// deployment controller's part), for as long as the bench runs.
async fn kubelet(deployments: Api<Deployment>) {
    // Relists after an expired watch (410) as any client does, and goes on.
    let stream = watcher(deployments.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    own();
    let mut stream = std::pin::pin!(stream);
    while let Some(d) = stream.next().await {
        let Ok(d) = d else { continue };
        let generation = d.metadata.generation.unwrap_or(0);
        let n = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = d.status.clone().unwrap_or_default();
        if status.observed_generation == Some(generation) && status.available_replicas == Some(n) {
            continue;
        }
        let patch = json!({"status": {"observedGeneration": generation, "replicas": n,
            "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n}});
        own();
        let _ = deployments
            .patch_status(
                d.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
    }
}

/// The operator's resident memory, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The operator's CPU time so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// When a Canary's weight changed, and to what.
type Steps = Vec<(Instant, f64)>;

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; the knobs are environment variables.
    let n = knob("CANARIES", 1000) as usize;
    let interval = knob("INTERVAL", 10);
    let measure = Duration::from_secs(knob("MEASURE", 120));
    let binary = std::env::var("COALMINE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/coalmine").to_string()
    });
    let cluster = TestCluster::start().await.unwrap();
    let server = if cluster.is_real() {
        "kube-apiserver (envtest)"
    } else {
        "in-repo fake"
    };
    eprintln!("API server: {server}; {n} Canaries, interval {interval}s, measuring {measure:?}");
    cluster.create_namespace(NAMESPACE).await.unwrap();
    let client = cluster.client();
    install_crds(&client, COALMINE_CRDS).await.unwrap();
    install_crds(&client, FLAGGER_CRDS).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let canaries = canaries_api(&client);
    let created = Instant::now();
    for i in 0..n {
        let name = format!("svc-{i}");
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name, "coalmine.dev/service": name}},
                    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}}},
        }))
        .unwrap();
        own();
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap();
        let canary: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "flagger.app/v1beta1", "kind": "Canary",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"provider": "kubernetes",
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "service": {"port": 8080},
                "analysis": {"interval": format!("{interval}s"), "threshold": 5,
                    "stepWeight": 2, "maxWeight": 50}},
        }))
        .unwrap();
        own();
        canaries
            .create(&PostParams::default(), &canary)
            .await
            .unwrap();
    }
    eprintln!(
        "created {n} Deployments and Canaries in {:.1} s",
        created.elapsed().as_secs_f64()
    );
    tokio::spawn(kubelet(deployments.clone()));

    // Each Canary's weight changes, with when they were seen.
    let steps: Arc<Mutex<HashMap<String, Steps>>> = Default::default();
    let phases: Arc<Mutex<HashMap<String, String>>> = Default::default();
    {
        let (steps, phases) = (steps.clone(), phases.clone());
        let canaries = canaries.clone();
        own();
        tokio::spawn(async move {
            let stream = watcher(canaries, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(c) = stream.next().await {
                let Ok(c) = c else { continue };
                let name = c.metadata.name.clone().unwrap_or_default();
                let status = &c.data["status"];
                phases.lock().unwrap().insert(
                    name.clone(),
                    status["phase"].as_str().unwrap_or_default().to_string(),
                );
                let weight = status["canaryWeight"].as_f64().unwrap_or(0.0);
                let mut steps = steps.lock().unwrap();
                let seen = steps.entry(name).or_default();
                if seen.last().map(|s| s.1) != Some(weight) {
                    seen.push((Instant::now(), weight));
                }
            }
        });
    }

    let kubeconfig = cluster.kubeconfig().to_str().unwrap().to_string();
    let operator = Operator(
        Command::new(&binary)
            .args([
                "operator",
                "--kubeconfig",
                &kubeconfig,
                "--identity",
                "bench",
            ])
            .args(["--lease-namespace", NAMESPACE, "--listen", "127.0.0.1:0"])
            .env("COALMINE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{binary}: {e} (build it: cargo build --release -p coalmine)")
            }),
    );
    let pid = operator.0.id();
    let started = Instant::now();
    let count = |phase: &str| {
        phases
            .lock()
            .unwrap()
            .values()
            .filter(|p| *p == phase)
            .count()
    };
    while count("Initialized") < n {
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "initialising took over 30 min"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "all {n} Initialized {:.1} s after the operator started; RSS {:.0} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib(pid).unwrap_or(f64::NAN)
    );

    // A new image for every Deployment: n analyses at once.
    for i in 0..n {
        let image = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "registry.example/app:2"}]}}}});
        own();
        deployments
            .patch(
                &format!("svc-{i}"),
                &PatchParams::default(),
                &Patch::Strategic(&image),
            )
            .await
            .unwrap();
    }
    // Measured once every analysis has taken its first step.
    let first_steps = Instant::now();
    while steps
        .lock()
        .unwrap()
        .values()
        .filter(|s| s.iter().any(|(_, w)| *w > 0.0))
        .count()
        < n
    {
        assert!(
            first_steps.elapsed() < Duration::from_secs(600),
            "not all started in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "all {n} analysing {:.1} s after the new images",
        first_steps.elapsed().as_secs_f64()
    );
    let own_before = OWN_REQUESTS.load(Relaxed);
    let before = api_requests(&client).await;
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let window = Instant::now();
    let mut rss_max: f64 = 0.0;
    while window.elapsed() < measure {
        rss_max = rss_max.max(rss_mib(pid).unwrap_or(0.0));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let after = api_requests(&client).await;
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let own_requests = (OWN_REQUESTS.load(Relaxed) - own_before) as f64;
    let window_end = window + measure;

    let mut lateness = Vec::new();
    for seen in steps.lock().unwrap().values() {
        for pair in seen.windows(2) {
            let (at, next) = (pair[0].0, pair[1].0);
            // Ticks inside the window, each after a step (the first step's start is not a tick).
            if at >= window && next <= window_end && pair[0].1 > 0.0 {
                let gap = next.duration_since(at).as_secs_f64();
                lateness.push((gap - interval as f64).max(0.0));
            }
        }
    }
    lateness.sort_by(f64::total_cmp);
    let ticks = n as f64 * measure.as_secs_f64() / interval as f64;
    let mut operator_requests = 0.0;
    let mut by_kind: Vec<(f64, String)> = Vec::new();
    for (key, total) in &after {
        let delta = total - before.get(key).copied().unwrap_or(0.0);
        operator_requests += delta;
        if delta > 0.0 {
            by_kind.push((delta, key.clone()));
        }
    }
    operator_requests -= own_requests;
    by_kind.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("operator-scale: {n} Canaries, interval {interval}s, {server}, window {measure:?}");
    println!(
        "  ticks observed: {} (expected about {ticks:.0})",
        lateness.len()
    );
    println!(
        "  lateness: p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        percentile(&lateness, 50.0),
        percentile(&lateness, 99.0),
        lateness.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  operator RSS max: {rss_max:.0} MiB; CPU {:.1} % of one core",
        100.0 * cpu / measure.as_secs_f64()
    );
    println!(
        "  API requests by the operator: {operator_requests:.0} ({:.2} per tick per Canary; the bench's own {own_requests:.0} subtracted)",
        operator_requests / ticks
    );
    for (delta, key) in by_kind.iter().take(8) {
        println!("    {key}: {delta:.0} (all clients)");
    }
    let done = phases
        .lock()
        .unwrap()
        .values()
        .filter(|p| *p == "Failed")
        .count();
    if done > 0 {
        println!("  WARNING: {done} Canaries Failed during the run");
    }
    drop(operator);
}
