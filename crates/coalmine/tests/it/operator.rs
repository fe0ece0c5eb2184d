//! `coalmine operator` end to end against an API server (the real one when `KUBEBUILDER_ASSETS`
//! names envtest's binaries, else the in-repo fake): the user's Deployment and a Rollout, an
//! image change, and the release goes 0 → 10 → 50 % by replicas, then through the primary to
//! `Succeeded`. No kubelet: the test marks workloads ready by writing their status.

use std::time::{Duration, Instant};

use coalmine_kube_fake::{install_crds, TestCluster};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::{upstream, Proc};

const CRDS: &str = include_str!("../../../../deploy/kubernetes/crds/coalmine.yaml");
const FLAGGER_CRDS: &str = include_str!("../../../../deploy/kubernetes/crds/flagger.yaml");

const DEPLOYMENT: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: payment-service, namespace: shop}
spec:
  replicas: 9
  selector: {matchLabels: {app: payment-service}}
  template:
    metadata:
      labels: {app: payment-service, coalmine.dev/service: payment-service}
    spec:
      containers:
        - name: payment-service
          image: 'registry.example/payment-service:1.0.0'
          volumeMounts: [{name: config, mountPath: /etc/payment}]
      volumes:
        - {name: config, configMap: {name: payment-config}}
";

/// The ConfigMap the Deployment mounts.
const CONFIG_MAP: &str = "
apiVersion: v1
kind: ConfigMap
metadata: {name: payment-config, namespace: shop}
data: {mode: v1}
";

/// The operator tests' Rollout (the seed's release), its analysis replaced by each test's.
const ROLLOUT: &str = include_str!("../../../operator/tests/fixtures/payment-service-rollout.yaml");

/// `kubectl set image deployment/payment-service payment-service=…:2.0.0`.
async fn set_new_image(deployments: &Api<Deployment>) {
    set_image(deployments, "2.0.0").await;
}

/// `kubectl set image deployment/payment-service payment-service=…:<version>`.
async fn set_image(deployments: &Api<Deployment>, version: &str) {
    let image = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "payment-service", "image": format!("registry.example/payment-service:{version}")}]}}}});
    deployments
        .patch(
            "payment-service",
            &PatchParams::default(),
            &Patch::Strategic(&image),
        )
        .await
        .unwrap();
}

/// The deployment controller and kubelet's part: every Deployment whose spec the status has
/// not caught up with reports all its replicas ready.
pub(crate) async fn kubelet(deployments: &Api<Deployment>) {
    for d in deployments.list(&Default::default()).await.unwrap().items {
        let generation = d.metadata.generation.unwrap_or(0);
        let n = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = d.status.clone().unwrap_or_default();
        if status.observed_generation == Some(generation) && status.available_replicas == Some(n) {
            continue;
        }
        let patch = json!({"status": {"observedGeneration": generation, "replicas": n,
            "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n}});
        deployments
            .patch_status(
                d.metadata.name.as_deref().unwrap(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
    }
}

async fn replicas(deployments: &Api<Deployment>, name: &str) -> Option<i32> {
    deployments.get_opt(name).await.unwrap()?.spec?.replicas
}

/// A cluster with Coalmine's CRD and Flagger's, the user's Deployment and a Rollout (or a
/// Flagger Canary) with `analysis`, and an operator watching it.
struct Release {
    cluster: TestCluster,
    deployments: Api<Deployment>,
    rollouts: Api<DynamicObject>,
    /// What the user wrote: the Rollout, or the Canary.
    written: Api<DynamicObject>,
    operator: Proc,
}

fn flagger_api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        "shop",
        &ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("flagger.app", "v1beta1", kind),
            plural,
        ),
    )
}

impl Release {
    async fn start(analysis: &str) -> Release {
        Release::start_as("Rollout", analysis).await
    }

    /// The same release written as Flagger's `Canary` (`kind` Rollout or Canary).
    async fn start_as(kind: &str, analysis: &str) -> Release {
        let cluster = TestCluster::start().await.unwrap();
        cluster.create_namespace("shop").await.unwrap();
        let client = cluster.client();
        install_crds(&client, CRDS).await.unwrap();
        install_crds(&client, FLAGGER_CRDS).await.unwrap();
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
        config_maps
            .create(
                &PostParams::default(),
                &serde_saphyr::from_str(CONFIG_MAP).unwrap(),
            )
            .await
            .unwrap();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");
        let target: Deployment = serde_saphyr::from_str(DEPLOYMENT).unwrap();
        deployments
            .create(&PostParams::default(), &target)
            .await
            .unwrap();
        let rollouts: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            "shop",
            &ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk("coalmine.dev", "v1alpha1", "Rollout"),
                "rollouts",
            ),
        );
        let mut rollout: serde_json::Value = serde_saphyr::from_str(ROLLOUT).unwrap();
        // A 1-second interval, two failed checks roll back, and the test's steps and checks.
        let analysis: String = analysis
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let analysis = format!("interval: 1s\nthreshold: 2\n{analysis}");
        rollout["spec"]["analysis"] = serde_saphyr::from_str(&analysis).unwrap();
        let written = if kind == "Canary" {
            rollout["apiVersion"] = "flagger.app/v1beta1".into();
            rollout["kind"] = "Canary".into();
            flagger_api(&client, "Canary", "canaries")
        } else {
            rollouts.clone()
        };
        let rollout: DynamicObject = serde_json::from_value(rollout).unwrap();
        written
            .create(&PostParams::default(), &rollout)
            .await
            .unwrap();
        let operator = operator(&cluster, "operator-a");
        Release {
            cluster,
            deployments,
            rollouts,
            written,
            operator,
        }
    }

    /// The leader Lease's holder.
    async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.cluster.client(), "shop");
        leases
            .get_opt("coalmine-operator")
            .await
            .unwrap()?
            .spec?
            .holder_identity
    }

    /// The status of what the user wrote.
    async fn status(&self) -> serde_json::Value {
        self.written.get("payment-service").await.unwrap().data["status"].clone()
    }

    /// Plays kubelet until the release is initialised; returns its status then.
    async fn until_initialized(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            kubelet(&self.deployments).await;
            let s = self.status().await;
            if s["phase"] == "Initialized" {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "not initialised within 30 s: {s:#}\n{}",
                self.operator.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Plays kubelet until the phase is `Succeeded` or `Failed` with `lastAppliedSpec` not
    /// `before` (a run for a new revision ended).
    async fn until_ended(&self, before: &serde_json::Value) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status().await;
            assert!(
                Instant::now() < deadline,
                "not done within 60 s: {s:#}\n{}",
                self.operator.stderr()
            );
            kubelet(&self.deployments).await;
            let ended = s["phase"] == "Succeeded" || s["phase"] == "Failed";
            if ended && s["lastAppliedSpec"] != *before {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Events regarding `name` (a Canary, a Rollout).
    async fn events(&self, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.cluster.client(), "shop");
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// Plays kubelet until the release ends (`Succeeded` or `Failed`) after a new image;
    /// returns the canary sizes it went through from the new image on.
    async fn new_image_until_done(&self) -> Vec<i32> {
        self.new_image_until_done_weighing().await.0
    }

    /// [`Self::new_image_until_done`], with the (`canaryWeight`, `effectiveWeight`) pairs the
    /// status went through.
    async fn new_image_until_done_weighing(&self) -> (Vec<i32>, Vec<(f64, Option<f64>)>) {
        let deployments = &self.deployments;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut canary_sizes = Vec::new();
        let mut weights = Vec::new();
        let mut changed_image = false;
        loop {
            let s = self.status().await;
            assert!(
                Instant::now() < deadline,
                "not done within 60 s: {s:#}\n{}",
                self.operator.stderr()
            );
            kubelet(deployments).await;
            let weight = (
                s["canaryWeight"].as_f64().unwrap_or(0.0),
                s["effectiveWeight"].as_f64(),
            );
            if changed_image && weights.last() != Some(&weight) {
                weights.push(weight);
            }
            if !changed_image && s["phase"] == "Initialized" {
                assert_eq!(
                    replicas(deployments, "payment-service-primary").await,
                    Some(9)
                );
                assert_eq!(replicas(deployments, "payment-service").await, Some(0));
                set_new_image(deployments).await;
                changed_image = true;
            }
            if let Some(n) = replicas(deployments, "payment-service")
                .await
                .filter(|_| changed_image)
            {
                if canary_sizes.last() != Some(&n) {
                    canary_sizes.push(n);
                }
            }
            if changed_image && (s["phase"] == "Succeeded" || s["phase"] == "Failed") {
                return (canary_sizes, weights);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The traffic follows the recorded step (recorded first, then carried out): waits up to
    /// 10 s for the canary to have `n` replicas.
    async fn canary_settles_at(&self, n: i32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while replicas(&self.deployments, "payment-service").await != Some(n) {
            assert!(
                Instant::now() < deadline,
                "the canary stayed at {:?} replicas",
                replicas(&self.deployments, "payment-service").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn primary_image(&self) -> Option<String> {
        let primary = self
            .deployments
            .get("payment-service-primary")
            .await
            .unwrap();
        primary.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_image_rolls_out_by_replicas_and_is_promoted_through_the_primary() {
    let release = Release::start("    stepWeights: [5, 50]\n").await;
    let (canary_sizes, weights) = release.new_image_until_done_weighing().await;
    // 5 % beside 9 pods takes 1 canary (10 % of the pods); 50 % is 9 beside 9; then the
    // canary goes. The status says the share whole replicas give.
    assert!(
        canary_sizes.contains(&1) && canary_sizes.contains(&9),
        "{canary_sizes:?}"
    );
    assert!(weights.contains(&(5.0, Some(10.0))), "{weights:?}");
    assert!(weights.contains(&(50.0, Some(50.0))), "{weights:?}");
    release.canary_settles_at(0).await;
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:2.0.0")
    );
    let s = release.status().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
    assert_eq!(s["conditions"][0]["status"], "True", "{s:#}");
    assert_eq!(s["lastAppliedSpec"], s["lastPromotedSpec"], "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_its_checks_is_rolled_back_to_the_primary() {
    // The rollout webhook is the failing check: a gate answering 500.
    let gate = upstream("gate", &["--error-rate", "1"]);
    let release = Release::start(&format!(
        "    stepWeights: [10, 50]\n    webhooks:\n      - {{name: smoke, type: rollout, url: '{}/'}}\n",
        gate.url
    ))
    .await;
    let canary_sizes = release.new_image_until_done().await;
    let s = release.status().await;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert_eq!(s["conditions"][0]["status"], "False", "{s:#}");
    // The canary got its first step and went; the primary never ran the new image.
    assert!(canary_sizes.contains(&1), "{canary_sizes:?}");
    assert!(
        !canary_sizes.contains(&9),
        "it never reached 50 %: {canary_sizes:?}"
    );
    release.canary_settles_at(0).await;
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:1.0.0")
    );
    assert_ne!(s["lastAppliedSpec"], s["lastPromotedSpec"], "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_config_map_is_a_new_revision_analysed_then_promoted_to_the_primarys_copy() {
    let release = Release::start("    stepWeights: [10, 50]\n").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(release.cluster.client(), "shop");
    let mode = |cm: ConfigMap| cm.data.unwrap_or_default().get("mode").cloned();
    let initialized = release.until_initialized().await;
    // The primary runs on a copy; the status tracks the original.
    assert_eq!(
        mode(config_maps.get("payment-config-primary").await.unwrap()).as_deref(),
        Some("v1")
    );
    let primary = release
        .deployments
        .get("payment-service-primary")
        .await
        .unwrap();
    let volumes = primary
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap();
    assert_eq!(
        volumes[0].config_map.as_ref().unwrap().name,
        "payment-config-primary"
    );
    let tracked_before = initialized["trackedConfigs"]["configmap/payment-config"].clone();
    assert!(tracked_before.is_string(), "{initialized:#}");

    // `kubectl edit configmap payment-config`: no new image, still a new revision.
    let mut edited = config_maps.get("payment-config").await.unwrap();
    edited.data = Some([("mode".to_string(), "v2".to_string())].into());
    config_maps
        .replace("payment-config", &PostParams::default(), &edited)
        .await
        .unwrap();
    let s = release.until_ended(&initialized["lastAppliedSpec"]).await;
    assert_eq!(
        s["phase"],
        "Succeeded",
        "{s:#}\n{}",
        release.operator.stderr()
    );
    assert_eq!(s["lastAppliedSpec"], s["lastPromotedSpec"], "{s:#}");
    assert_ne!(
        s["lastAppliedSpec"], initialized["lastAppliedSpec"],
        "{s:#}"
    );
    let tracked_after = &s["trackedConfigs"]["configmap/payment-config"];
    assert!(
        tracked_after.is_string() && *tracked_after != tracked_before,
        "{s:#}"
    );
    release.canary_settles_at(0).await;
    // Promoted: the primary's copy has the new data, and its image is as it was.
    assert_eq!(
        mode(config_maps.get("payment-config-primary").await.unwrap()).as_deref(),
        Some("v2")
    );
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:1.0.0")
    );
}

pub(crate) fn operator(cluster: &TestCluster, identity: &str) -> Proc {
    operator_with(cluster, identity, &[])
}

fn operator_with(cluster: &TestCluster, identity: &str, extra: &[&str]) -> Proc {
    let kubeconfig = cluster.kubeconfig().to_str().unwrap().to_string();
    let mut args = vec![
        "operator",
        "--kubeconfig",
        &kubeconfig,
        "--identity",
        identity,
        "--lease-namespace",
        "shop",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// The `coalmine_operator_leader` gauge an operator serves.
async fn leads(operator: &Proc) -> bool {
    let text = crate::common::metrics_text(&format!("http://{}", operator.addr("listen"))).await;
    text.lines().any(|l| l == "coalmine_operator_leader 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_mid_release_the_other_replica_resumes_it_where_it_was() {
    let mut release = Release::start("    stepWeights: [10, 20, 30, 40, 50, 60]\n").await;
    let standby = operator(&release.cluster, "operator-b");
    let deployments = release.deployments.clone();
    // Until the leader is known and the release is at 30 %.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut changed_image = false;
    loop {
        assert!(Instant::now() < deadline, "{:#}", release.status().await);
        kubelet(&deployments).await;
        let s = release.status().await;
        if !changed_image && s["phase"] == "Initialized" {
            set_new_image(&deployments).await;
            changed_image = true;
        }
        if changed_image && s["canaryWeight"].as_f64().unwrap_or(0.0) >= 30.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(release.leader().await.as_deref(), Some("operator-a"));
    assert!(leads(&release.operator).await && !leads(&standby).await);
    let ready = crate::common::client()
        .get(format!("http://{}/readyz", standby.addr("listen")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a standby is ready (it reaches the API server)"
    );
    let weight_at_death = release.status().await["canaryWeight"].as_f64().unwrap();
    release.operator.child.kill().unwrap();
    release.operator.child.wait().unwrap();
    let died = Instant::now();
    // The standby takes the lease once it expires, and goes on from the saved step.
    let mut took_over = None;
    let mut weights_after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = release.status().await;
        assert!(Instant::now() < deadline, "{s:#}\n{}", standby.stderr());
        kubelet(&deployments).await;
        if took_over.is_none() && release.leader().await.as_deref() == Some("operator-b") {
            took_over = Some(died.elapsed());
        }
        let w = s["canaryWeight"].as_f64().unwrap_or(0.0);
        if weights_after.last() != Some(&w) {
            weights_after.push(w);
        }
        if s["phase"] == "Succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took_over = took_over.expect("operator-b took the lease");
    assert!(leads(&standby).await);
    eprintln!(
        "failover: lease taken {:.1} s after the leader died; weights after: {weights_after:?}",
        took_over.as_secs_f64()
    );
    // By the lease's terms: 8 s after the last renewal, tried every 2 s.
    assert!(took_over <= Duration::from_secs(12), "{took_over:?}");
    // Resumed, not restarted: no step below the one it died at until promotion.
    let before_promotion: Vec<f64> = weights_after
        .iter()
        .copied()
        .take_while(|w| *w > 0.0)
        .collect();
    assert!(
        before_promotion
            .first()
            .is_some_and(|w| *w >= weight_at_death),
        "died at {weight_at_death} %, then {weights_after:?}"
    );
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:2.0.0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_coalmine_cannot_run_is_told_by_field_and_the_others_go_on() {
    let release = Release::start("    stepWeights: [10, 50]\n").await;
    // Valid for the CRD; not runnable here: provider kubernetes has no per-version counts.
    let mut bad: serde_json::Value = serde_saphyr::from_str(ROLLOUT).unwrap();
    bad["metadata"]["name"] = "checkout".into();
    bad["spec"]["targetRef"]["name"] = "checkout".into();
    let bad: DynamicObject = serde_json::from_value(bad).unwrap();
    release
        .rollouts
        .create(&PostParams::default(), &bad)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        kubelet(&release.deployments).await;
        let checkout = release.rollouts.get("checkout").await.unwrap().data["status"].clone();
        let said = checkout["conditions"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if said.starts_with("spec.analysis.metrics[0]")
            && release.status().await["phase"] == "Initialized"
        {
            assert_eq!(checkout["conditions"][0]["reason"], "InvalidSpec");
            assert!(said.contains("request-success-rate"), "{said}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{checkout:#}\n{}",
            release.operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let told = release.events("checkout").await;
    assert_eq!(told.len(), 1, "{told:#?}");
    assert_eq!(told[0].type_.as_deref(), Some("Warning"));
    assert!(told[0]
        .note
        .as_deref()
        .unwrap()
        .starts_with("spec.analysis.metrics[0]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_deleted_mid_release_takes_its_canary_off() {
    let release = Release::start("    stepWeights: [10, 20, 30, 40, 50, 60]\n").await;
    let deployments = &release.deployments;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut changed_image = false;
    loop {
        assert!(Instant::now() < deadline, "{:#}", release.status().await);
        kubelet(deployments).await;
        let s = release.status().await;
        if !changed_image && s["phase"] == "Initialized" {
            set_new_image(deployments).await;
            changed_image = true;
        }
        if changed_image && s["canaryWeight"].as_f64().unwrap_or(0.0) >= 20.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replicas(deployments, "payment-service").await > Some(0));
    release
        .rollouts
        .delete("payment-service", &Default::default())
        .await
        .unwrap();
    // Nobody watches the canary any more: it goes, and the primary serves as it did.
    release.canary_settles_at(0).await;
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:1.0.0")
    );
    release.operator.wait_for_stderr("deleted mid-run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_deleted_mid_release_with_revert_on_deletion_leaves_its_target_serving() {
    let release = Release::start_as("Canary", "    stepWeights: [10, 20, 30, 40, 50, 60]\n").await;
    release
        .written
        .patch(
            "payment-service",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revertOnDeletion": true}})),
        )
        .await
        .unwrap();
    let deployments = &release.deployments;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut changed_image = false;
    loop {
        assert!(Instant::now() < deadline, "{:#}", release.status().await);
        kubelet(deployments).await;
        let s = release.status().await;
        if !changed_image && s["phase"] == "Initialized" {
            set_new_image(deployments).await;
            changed_image = true;
        }
        if changed_image && s["canaryWeight"].as_f64().unwrap_or(0.0) >= 20.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let canary = release.written.get("payment-service").await.unwrap();
    assert_eq!(
        canary.metadata.finalizers,
        Some(vec!["coalmine.dev/revert-on-deletion".to_string()]),
        "the deletion will wait for the revert"
    );
    release
        .written
        .delete("payment-service", &Default::default())
        .await
        .unwrap();
    // The deletion waits until the target serves again, then completes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while release
        .written
        .get_opt("payment-service")
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the Canary was never let go:\n{}",
            release.operator.stderr()
        );
        kubelet(deployments).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // As before Coalmine: the target at full size (the primary's 9), the apex on its pods and
    // no longer owned by the release (the garbage collector takes the primary, not the apex).
    assert_eq!(replicas(deployments, "payment-service").await, Some(9));
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(release.cluster.client(), "shop");
    let apex = services.get("payment-service").await.unwrap();
    assert_eq!(apex.metadata.owner_references.unwrap_or_default(), vec![]);
    let selector = apex.spec.unwrap().selector.unwrap();
    assert_eq!(
        serde_json::to_value(&selector).unwrap(),
        json!({"app": "payment-service"})
    );
    let told: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(
        told.iter().any(|n| n.starts_with("Reverted on deletion")),
        "{told:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canarys_alerts_that_will_not_be_sent_are_said_and_hold_nothing() {
    let release = Release::start_as(
        "Canary",
        "    stepWeights: [50]\n    alerts:\n      - {name: on-call, severity: error, providerRef: {name: slack}}\n",
    )
    .await;
    release.new_image_until_done().await;
    let s = release.status().await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
    let warnings: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        warnings.iter().any(|n| n.starts_with(
            "spec.analysis.alerts[0].providerRef: AlertProvider shop/slack does not exist"
        )),
        "{warnings:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canarys_alerts_are_posted_through_its_alert_provider_with_the_address_from_its_secret() {
    let (base, received) = crate::common::stub::stub(|_| {
        (
            Duration::ZERO,
            crate::common::stub::response("200 OK", "text/plain", "ok"),
        )
    });
    let release = Release::start_as(
        "Canary",
        "    stepWeights: [50]\n    alerts:\n      - {name: releases, providerRef: {name: slack}}\n",
    )
    .await;
    let client = release.cluster.client();
    // Flagger's way: the address in a Secret the AlertProvider's secretRef names.
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("slack-url".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        data: Some(
            [
                (
                    "address".to_string(),
                    k8s_openapi::ByteString(format!("{base}/services/T0/SECRET").into_bytes()),
                ),
                (
                    "token".to_string(),
                    k8s_openapi::ByteString(b"xoxb-SECRET-TOKEN".to_vec()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let provider: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "flagger.app/v1beta1", "kind": "AlertProvider",
        "metadata": {"name": "slack", "namespace": "shop"},
        "spec": {"type": "slack", "channel": "releases", "secretRef": {"name": "slack-url"}},
    }))
    .unwrap();
    flagger_api(&client, "AlertProvider", "alertproviders")
        .create(&PostParams::default(), &provider)
        .await
        .unwrap();
    release.new_image_until_done().await;
    assert_eq!(release.status().await["phase"], "Succeeded");
    let mut posts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while posts.len() < 2 && Instant::now() < deadline {
        if let Ok(r) = received.recv_timeout(Duration::from_millis(200)) {
            posts.push(r);
        }
    }
    assert!(posts.len() >= 2, "{posts:#?}");
    let texts: Vec<String> = posts
        .iter()
        .map(|r| {
            assert_eq!(r.path, "/services/T0/SECRET");
            // Slack's token, as Flagger sends it.
            assert_eq!(r.header("authorization"), Some("Bearer xoxb-SECRET-TOKEN"));
            let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["channel"], "releases");
            assert_eq!(
                body["attachments"][0]["author_name"],
                "payment-service.shop"
            );
            body["attachments"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(texts[0].starts_with("New revision detected"), "{texts:#?}");
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("Canary analysis completed successfully")),
        "{texts:#?}"
    );
    let notes: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(
        !notes.iter().any(|n| n.contains("is not sent")),
        "{notes:#?}"
    );
    assert!(!notes.iter().any(|n| n.contains("SECRET")), "{notes:#?}");
}

/// Flagger's MetricTemplate `error-rate`, asking the test's Prometheus `query`.
fn error_rate_template(prometheus: &str, query: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
        "metadata": {"name": "error-rate", "namespace": "shop"},
        "spec": {"provider": {"type": "prometheus", "address": prometheus}, "query": query},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagger_canary_runs_as_under_flagger_and_its_metric_template_decides() {
    let prometheus = tokio::task::spawn_blocking(|| {
        crate::common::promstack::Prometheus::start(Default::default())
    })
    .await
    .unwrap();
    let address = format!("http://{}", prometheus.address());
    let release = Release::start_as(
        "Canary",
        "    stepWeights: [10, 50]\n    metrics:\n      - {name: error-rate, templateRef: {name: error-rate}, thresholdRange: {max: 1}, interval: 1m}\n",
    )
    .await;
    let templates = flagger_api(
        &release.cluster.client(),
        "MetricTemplate",
        "metrictemplates",
    );
    // The placeholders are filled in from the Canary: the query reads 0.5 only if they were.
    let healthy = r#"vector(0.5) and on() (label_replace(vector(1), "t", "{{ target }}/{{ namespace }}", "", "") == on(t) group_left() label_replace(vector(1), "t", "payment-service/shop", "", ""))"#;
    templates
        .create(
            &PostParams::default(),
            &error_rate_template(&address, healthy),
        )
        .await
        .unwrap();

    // A healthy release: promoted, and the Canary says so in Flagger's fields.
    release.new_image_until_done().await;
    let s = release.status().await;
    assert_eq!(
        s["phase"],
        "Succeeded",
        "{s:#}\n{}",
        release.operator.stderr()
    );
    assert_eq!(s["conditions"][0]["type"], "Promoted", "{s:#}");
    assert_eq!(s["conditions"][0]["status"], "True", "{s:#}");
    assert_eq!(s["lastAppliedSpec"], s["lastPromotedSpec"], "{s:#}");
    assert_eq!(s["canaryWeight"].as_f64(), Some(0.0), "{s:#}");
    // The Rollout Coalmine runs it as belongs to the Canary and carries the evidence.
    let rollout = release.rollouts.get("payment-service").await.unwrap();
    let owner = &rollout.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Canary", Some(true))
    );
    let check = &rollout.data["status"]["checks"][0];
    assert_eq!(
        (&check["name"], &check["value"]),
        (&json!("error-rate"), &json!(0.5)),
        "{check:#}"
    );
    // `kubectl describe canary` tells the story.
    let told: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(
        told.iter().any(|n| n.contains("Promotion completed")),
        "{told:#?}"
    );

    // The same template reading 5 % errors: the next release is rolled back.
    let mut template = templates.get("error-rate").await.unwrap();
    template.data["spec"]["query"] = "vector(5)".into();
    templates
        .replace("error-rate", &PostParams::default(), &template)
        .await
        .unwrap();
    set_image(&release.deployments, "3.0.0").await;
    let s = release.until_ended(&s["lastAppliedSpec"]).await;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert_eq!(s["conditions"][0]["status"], "False", "{s:#}");
    assert!(s["failedChecks"].as_u64() >= Some(2), "{s:#}");
    release.canary_settles_at(0).await;
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:2.0.0")
    );
    // `kubectl describe canary` says which check failed and why it went back.
    let warnings: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.note)
        .collect();
    eprintln!("the rolled-back Canary's Warning Events: {warnings:#?}");
    assert!(
        warnings.iter().any(|n| n.contains("error-rate"))
            && warnings.iter().any(|n| n.starts_with("Rolling back")),
        "{warnings:#?}"
    );

    // The Canary deleted: the Rollout made for it goes too.
    release
        .written
        .delete("payment-service", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while release
        .rollouts
        .get_opt("payment-service")
        .await
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "the Rollout outlived its Canary");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_coalmine_cannot_run_is_told_on_the_canary_and_changes_nothing() {
    // Valid for Flagger's CRD (provider linkerd): not one this operator drives.
    let release = Release::start_as("Canary", "    stepWeights: [10, 50]\n").await;
    let mut canary = release.written.get("payment-service").await.unwrap();
    release.until_initialized().await;
    let rollout_before = release.rollouts.get("payment-service").await.unwrap();
    canary = release
        .written
        .get("payment-service")
        .await
        .unwrap_or(canary);
    canary.data["spec"]["provider"] = "linkerd".into();
    release
        .written
        .replace("payment-service", &PostParams::default(), &canary)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = loop {
        let s = release.status().await;
        let said = s["conditions"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if said.starts_with("spec.provider") {
            assert_eq!(s["conditions"][0]["reason"], "InvalidSpec", "{s:#}");
            break said;
        }
        assert!(
            Instant::now() < deadline,
            "{s:#}\n{}",
            release.operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(said.contains("linkerd"), "{said}");
    let warned: Vec<_> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .collect();
    assert!(
        warned
            .iter()
            .any(|e| e.note.as_deref() == Some(said.as_str())),
        "{warned:#?}"
    );
    // The Rollout it runs as is as it was.
    let rollout_after = release.rollouts.get("payment-service").await.unwrap();
    assert_eq!(rollout_after.data["spec"], rollout_before.data["spec"]);
    assert_eq!(
        rollout_after.metadata.generation,
        rollout_before.metadata.generation
    );
}

/// `kubectl annotate canary/payment-service coalmine.dev/request=<value>`.
async fn request(release: &Release, value: &str) {
    let patch = json!({"metadata": {"annotations": {"coalmine.dev/request": value}}});
    let by_kubectl = PatchParams {
        field_manager: Some("kubectl-annotate".into()),
        ..PatchParams::default()
    };
    release
        .written
        .patch("payment-service", &by_kubectl, &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Waits up to 10 s for the request annotation to be carried out and removed.
async fn request_removed(release: &Release) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let canary = release.written.get("payment-service").await.unwrap();
        let annotations = canary.metadata.annotations.unwrap_or_default();
        if !annotations.contains_key("coalmine.dev/request") {
            return;
        }
        assert!(Instant::now() < deadline, "{}", release.operator.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Plays kubelet until the Canary's weight reaches `weight` %; returns its status.
async fn until_weight(release: &Release, weight: f64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        kubelet(&release.deployments).await;
        let s = release.status().await;
        if s["canaryWeight"].as_f64().unwrap_or(0.0) >= weight {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{s:#}\n{}",
            release.operator.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_is_suspended_aborted_and_promoted_from_kubectl() {
    let release = Release::start_as(
        "Canary",
        "    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80]\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while release.status().await["phase"] != "Initialized" {
        assert!(Instant::now() < deadline, "{:#}", release.status().await);
        kubelet(&release.deployments).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing to promote yet: told, and the annotation goes.
    request(&release, "promote").await;
    request_removed(&release).await;
    let told: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(
        told.iter()
            .any(|n| n.contains("no release of shop/payment-service is in progress")),
        "{told:#?}"
    );

    // `spec.suspend` holds the release where it is; clearing it goes on.
    set_new_image(&release.deployments).await;
    let at = until_weight(&release, 20.0).await["canaryWeight"].clone();
    let suspend = |on: bool| json!({"spec": {"suspend": on}});
    release
        .written
        .patch(
            "payment-service",
            &PatchParams::default(),
            &Patch::Merge(&suspend(true)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = release.status().await["canaryWeight"].clone();
    assert!(
        held.as_f64() <= Some(at.as_f64().unwrap() + 10.0),
        "{at} then {held}"
    );
    // Three intervals suspended: not a step more.
    for _ in 0..30 {
        kubelet(&release.deployments).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(release.status().await["canaryWeight"], held);
    release
        .written
        .patch(
            "payment-service",
            &PatchParams::default(),
            &Patch::Merge(&suspend(false)),
        )
        .await
        .unwrap();
    until_weight(&release, held.as_f64().unwrap() + 10.0).await;

    // Abort: rolled back at once, the reason naming who asked.
    request(&release, "abort").await;
    request_removed(&release).await;
    let s = release.until_ended(&json!(null)).await;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert!(s["canaryWeight"].as_f64() < Some(80.0), "{s:#}");
    release.canary_settles_at(0).await;
    let told: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(
        told.iter().any(|n| n.contains("coalmine.dev/request annotation on Canary shop/payment-service (written by kubectl-annotate)")),
        "{told:#?}"
    );

    // Promote: the next release skips its remaining steps.
    set_image(&release.deployments, "3.0.0").await;
    until_weight(&release, 10.0).await;
    request(&release, "promote").await;
    let s = release.until_ended(&s["lastAppliedSpec"]).await;
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
    assert_eq!(
        release.primary_image().await.as_deref(),
        Some("registry.example/payment-service:3.0.0")
    );
}

#[test]
fn an_unreadable_kubeconfig_is_bad_input_named_by_flag() {
    let out = std::process::Command::new(crate::common::BIN)
        .args([
            "operator",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--kubeconfig /nonexistent/kubeconfig"),
        "{stderr}"
    );
}

/// Reads Server-Sent Events from `resp` until one whose data satisfies `what`.
async fn until_sse(resp: &mut reqwest::Response, within: Duration, what: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    let mut buffer = String::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline.into(), resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no such event within {within:?}: {buffer}"))
            .unwrap()
            .expect("the stream goes on");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if what(&event) {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replicas_dashboard_follows_a_canary_and_a_signed_in_abort_rolls_it_back() {
    let release = Release::start_as(
        "Canary",
        "    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80]\n",
    )
    .await;
    let http = crate::common::client();
    // The leader was started without a token: its dashboard shows, and refuses actions.
    let leader = format!("http://{}", release.operator.addr("listen"));
    let page = http.get(format!("{leader}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    let session = crate::common::get_json(&format!("{leader}/api/v1/session")).await;
    assert_eq!(session["readOnly"], true, "{session}");
    let refused = http
        .post(format!(
            "{leader}/api/v1/rollouts/shop%2Fpayment-service/abort"
        ))
        .bearer_auth("anything-at-all-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("kubectl annotate"));

    // A standby replica with a token: not leading, its dashboard shows the same release.
    let dir = crate::common::TempDir::new("operator-dashboard");
    let token_file = dir.write("token", "dashboard-token-0123456789");
    let standby = operator_with(
        &release.cluster,
        "operator-b",
        &["--dashboard-token-file", token_file.to_str().unwrap()],
    );
    let standby_url = format!("http://{}", standby.addr("listen"));
    release.until_initialized().await;
    let mut watch = http
        .get(format!("{standby_url}/api/v1/watch"))
        .send()
        .await
        .unwrap();
    until_sse(&mut watch, Duration::from_secs(10), |e| {
        e.starts_with("event: snapshot") && e.contains("shop/payment-service")
    })
    .await;
    set_new_image(&release.deployments).await;
    let played = tokio::spawn({
        let deployments = release.deployments.clone();
        async move {
            for _ in 0..300 {
                kubelet(&deployments).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    // Pushed as the leader writes each step: the weight's change reaches the standby's page.
    until_sse(&mut watch, Duration::from_secs(20), |e| {
        e.starts_with("event: change") && e.contains("\"canaryWeight\":20.0")
    })
    .await;
    let detail: serde_json::Value = http
        .get(format!(
            "{standby_url}/api/v1/rollouts/shop%2Fpayment-service/live"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !detail["points"].as_array().unwrap().is_empty(),
        "{detail:#}"
    );
    assert!(
        detail["document"].as_str().unwrap().contains("stepWeights"),
        "{detail:#}"
    );

    // Signed in (cookie and CSRF token), alice aborts; the leader carries it out.
    let signed: reqwest::Response = http
        .post(format!("{standby_url}/api/v1/session"))
        .json(&json!({"name": "alice", "token": "dashboard-token-0123456789"}))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let csrf = signed.json::<serde_json::Value>().await.unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let act = |command: &str| {
        http.post(format!(
            "{standby_url}/api/v1/rollouts/shop%2Fpayment-service/{command}"
        ))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
    };
    // Pause and resume are spec.suspend, written as alice.
    assert_eq!(act("pause").await.unwrap().status(), 202);
    let paused = |n: &String| {
        n.starts_with("Paused by spec.suspend on Canary shop/payment-service (written by alice, signed in to the dashboard)")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .any(|n| paused(&n))
    {
        assert!(Instant::now() < deadline, "{}", release.operator.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(act("resume").await.unwrap().status(), 202);
    let abort = format!("{standby_url}/api/v1/rollouts/shop%2Fpayment-service/abort");
    let forged = http
        .post(&abort)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403, "no CSRF token, no action");
    let done = http
        .post(&abort)
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 202, "{}", done.text().await.unwrap());
    let s = release.until_ended(&json!(null)).await;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    played.abort();
    let told: Vec<String> = release
        .events("payment-service")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(
        told.iter().any(|n| n.contains(
            "coalmine.dev/request annotation on Canary shop/payment-service (written by alice, signed in to the dashboard)"
        )),
        "{told:#?}"
    );
    until_sse(&mut watch, Duration::from_secs(10), |e| {
        e.starts_with("event: change") && e.contains("\"phase\":\"Failed\"")
    })
    .await;
}
