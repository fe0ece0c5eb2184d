//! `RolloutGroup` under `coalmine operator`, against an API server (the real one when
//! `KUBEBUILDER_ASSETS` names envtest's binaries, else the in-repo fake): three Rollouts of one
//! namespace in lock-step, promoted together; rolled back together, last listed first, when one
//! fails, a member already promoted taken back to its previous version; an invalid group told
//! on its status and moving nothing. No kubelet: the test marks
//! workloads ready by writing their status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coalmine_kube_fake::{install_crds, TestCluster};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use crate::common::stub::{response, stub};
use crate::common::Proc;
use crate::operator::{kubelet, operator};

const CRDS: &str = include_str!("../../../../deploy/kubernetes/crds/coalmine.yaml");

const MEMBERS: [&str; 3] = ["ledger", "payments", "orders"];

/// A namespace with three Deployments and their Rollouts, a group over them, and an operator.
struct Shop {
    cluster: TestCluster,
    deployments: Api<Deployment>,
    rollouts: Api<DynamicObject>,
    groups: Api<DynamicObject>,
    operator: Proc,
}

fn api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        "shop",
        &ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("coalmine.dev", "v1alpha1", kind),
            plural,
        ),
    )
}

impl Shop {
    /// `analysis_of(member)` is each Rollout's analysis (YAML); `group` the group's spec.
    async fn start(group: Value, analysis_of: impl Fn(&str) -> String) -> Shop {
        let cluster = TestCluster::start().await.unwrap();
        cluster.create_namespace("shop").await.unwrap();
        let client = cluster.client();
        install_crds(&client, CRDS).await.unwrap();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");
        let rollouts = api(&client, "Rollout", "rollouts");
        let groups = api(&client, "RolloutGroup", "rolloutgroups");
        let group: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "coalmine.dev/v1alpha1", "kind": "RolloutGroup",
            "metadata": {"name": "release", "namespace": "shop"}, "spec": group,
        }))
        .unwrap();
        groups.create(&PostParams::default(), &group).await.unwrap();
        for name in MEMBERS {
            let deployment: Deployment = serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"replicas": 10, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name, "coalmine.dev/service": name}},
                        "spec": {"containers": [{"name": name, "image": format!("registry.example/{name}:1.0.0")}]}}},
            }))
            .unwrap();
            deployments
                .create(&PostParams::default(), &deployment)
                .await
                .unwrap();
            let analysis: Value = serde_saphyr::from_str(&analysis_of(name)).unwrap();
            let rollout: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "coalmine.dev/v1alpha1", "kind": "Rollout",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "service": {"port": 8080}, "analysis": analysis},
            }))
            .unwrap();
            rollouts
                .create(&PostParams::default(), &rollout)
                .await
                .unwrap();
        }
        let operator = operator(&cluster, "operator-a");
        Shop {
            cluster,
            deployments,
            rollouts,
            groups,
            operator,
        }
    }

    async fn status(&self, member: &str) -> Value {
        self.rollouts.get(member).await.unwrap().data["status"].clone()
    }

    async fn group(&self) -> Value {
        self.groups.get("release").await.unwrap().data["status"].clone()
    }

    /// Plays kubelet until every member is initialised.
    async fn until_initialized(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in MEMBERS {
            while self.status(name).await["phase"] != "Initialized" {
                assert!(
                    Instant::now() < deadline,
                    "{name} not initialised within 30 s: {:#}\n{}",
                    self.status(name).await,
                    self.operator.stderr()
                );
                kubelet(&self.deployments).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// `kubectl set image deployment/<member> <member>=…:2.0.0`.
    async fn new_image(&self, member: &str) {
        let image = json!({"spec": {"template": {"spec": {"containers": [
            {"name": member, "image": format!("registry.example/{member}:2.0.0")}]}}}});
        self.deployments
            .patch(member, &PatchParams::default(), &Patch::Strategic(&image))
            .await
            .unwrap();
    }

    /// Every member initialised, then given a new image.
    async fn new_images(&self) {
        self.until_initialized().await;
        for name in MEMBERS {
            self.new_image(name).await;
        }
    }

    /// Once every member has failed (at most 60 s): every reading, and when each member ended.
    async fn all_failed(&self) -> (Vec<Vec<Value>>, Vec<u64>) {
        let seen = self
            .watch_members(Duration::from_secs(60), |members| {
                members.iter().all(|s| s["phase"] == "Failed")
            })
            .await;
        let ended = seen
            .last()
            .unwrap()
            .iter()
            .map(|s| s["state"]["lastTransitionMs"].as_u64().unwrap())
            .collect();
        (seen, ended)
    }

    /// Plays kubelet, reading every member's status each 100 ms, until `done` says so of them
    /// (at most `within`); returns each reading.
    async fn watch_members(
        &self,
        within: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Vec<Value>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            kubelet(&self.deployments).await;
            let mut now = Vec::new();
            for name in MEMBERS {
                now.push(self.status(name).await);
            }
            let finished = done(&now);
            seen.push(now);
            if finished {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "not done within {within:?}: {:#}\ngroup: {:#}\n{}",
                Value::from(seen.last().unwrap().clone()),
                self.group().await,
                self.operator.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (at most `within`) for the group's status to satisfy `what`.
    async fn group_until(&self, within: Duration, what: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            kubelet(&self.deployments).await;
            let s = self.group().await;
            if what(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "group not there within {within:?}: {s:#}\n{}",
                self.operator.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Events regarding the group.
    async fn group_events(&self) -> Vec<k8s_openapi::api::events::v1::Event> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.cluster.client(), "shop");
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("RolloutGroup")
            })
            .collect()
    }

    async fn image(&self, deployment: &str) -> String {
        let d = self.deployments.get(deployment).await.unwrap();
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    }
}

fn together() -> Value {
    json!({"policy": "together", "members": MEMBERS.map(|n| json!({"name": n}))})
}

const STEPS: [f64; 3] = [10.0, 20.0, 30.0];

/// How many of the weight steps a member's status has taken (4 once promoting or promoted).
fn steps_taken(status: &Value) -> usize {
    let state = &status["state"];
    if state["promoted"] == true || state["outcome"] == "promoted" {
        return STEPS.len() + 1;
    }
    let weight = status["canaryWeight"].as_f64().unwrap_or(0.0);
    STEPS.iter().filter(|w| **w <= weight).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_moves_its_rollouts_in_lock_step_and_promotes_them_together() {
    let shop = Shop::start(together(), |_| {
        "interval: 1s\nthreshold: 2\nstepWeights: [10, 20, 30]\n".to_string()
    })
    .await;
    shop.until_initialized().await;
    // ledger's new image 3 s (three intervals) before the others': alone it would have taken
    // its three steps; in its group it waits at 0 % for the others to start.
    shop.new_image("ledger").await;
    let alone = Instant::now();
    let mut said = Value::Null;
    while alone.elapsed() < Duration::from_secs(3) {
        kubelet(&shop.deployments).await;
        let s = shop.status("ledger").await;
        assert_eq!(s["canaryWeight"].as_f64().unwrap_or(0.0), 0.0, "{s:#}");
        said = s["state"]["message"].clone();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        said,
        "Waiting for the group: payments, orders to pass their start (members move in lock-step)"
    );
    for name in ["payments", "orders"] {
        shop.new_image(name).await;
    }
    let seen = shop
        .watch_members(Duration::from_secs(90), |members| {
            members.iter().all(|s| s["phase"] == "Succeeded")
        })
        .await;
    // Never more than one step apart: a member takes a step only once every member has
    // passed the one before.
    let mut widest = 0;
    for reading in &seen {
        let taken: Vec<usize> = reading.iter().map(steps_taken).collect();
        let spread = taken.iter().max().unwrap() - taken.iter().min().unwrap();
        assert!(spread <= 1, "members apart by {spread} steps: {taken:?}");
        widest = widest.max(spread);
    }
    // Each member went through every step.
    for (i, name) in MEMBERS.iter().enumerate() {
        let weights: Vec<f64> = seen
            .iter()
            .filter_map(|r| r[i]["canaryWeight"].as_f64())
            .collect();
        for step in STEPS {
            assert!(
                weights.contains(&step),
                "{name} skipped {step} %: {weights:?}"
            );
        }
        assert_eq!(
            shop.image(&format!("{name}-primary")).await,
            format!("registry.example/{name}:2.0.0")
        );
    }
    let group = shop
        .group_until(Duration::from_secs(10), |g| g["phase"] == "Succeeded")
        .await;
    assert_eq!(group["conditions"][0]["type"], "Promoted", "{group:#}");
    assert_eq!(group["conditions"][0]["status"], "True", "{group:#}");
    let names: Vec<&str> = group["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, MEMBERS);
    assert!(
        group["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["phase"] == "Succeeded"),
        "{group:#}"
    );
    let told = shop.group_events().await;
    assert!(
        told.iter()
            .any(|e| e.reason.as_deref() == Some("Succeeded")),
        "{told:#?}"
    );
    eprintln!(
        "lock-step: {} readings, widest spread {widest} step(s)",
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_rolls_the_whole_group_back_last_listed_first() {
    // ledger's rollout webhook: passing until the test fails it.
    let failing = Arc::new(AtomicBool::new(false));
    let answers = failing.clone();
    let (gate, _requests) = stub(move |_| {
        let status = if answers.load(Ordering::SeqCst) {
            "500 Internal Server Error"
        } else {
            "200 OK"
        };
        (Duration::ZERO, response(status, "text/plain", "checked"))
    });
    let shop = Shop::start(together(), |name| {
        let mut analysis = "interval: 1s\nthreshold: 2\nstepWeights: [10, 20, 30]\n".to_string();
        if name == "ledger" {
            analysis.push_str(&format!(
                "webhooks:\n  - {{name: smoke, type: rollout, url: '{gate}/'}}\n"
            ));
        }
        analysis
    })
    .await;
    shop.new_images().await;
    // Every member takes its first step; then ledger's check fails.
    shop.watch_members(Duration::from_secs(60), |members| {
        members.iter().all(|s| steps_taken(s) >= 1)
    })
    .await;
    failing.store(true, Ordering::SeqCst);
    let (seen, ended) = shop.all_failed().await;
    let last = seen.last().unwrap();
    let failed_at = |i: usize| ended[i];
    // ledger first, then the others last listed first: orders, then payments.
    assert!(
        failed_at(0) <= failed_at(2) && failed_at(2) <= failed_at(1),
        "ledger {}, payments {}, orders {}",
        failed_at(0),
        failed_at(1),
        failed_at(2)
    );
    eprintln!(
        "rolled back: orders {} ms after ledger, payments {} ms after orders",
        failed_at(2) - failed_at(0),
        failed_at(1) - failed_at(2)
    );
    // No reading ever had payments rolled back while orders was not.
    assert!(
        !seen
            .iter()
            .any(|r| r[1]["phase"] == "Failed" && r[2]["phase"] != "Failed"),
        "payments rolled back before orders"
    );
    for i in [1, 2] {
        let message = last[i]["state"]["message"].as_str().unwrap();
        assert!(
            message.contains("group release: member ledger rolled back"),
            "{}: {message}",
            MEMBERS[i]
        );
    }
    for name in MEMBERS {
        assert_eq!(
            shop.image(&format!("{name}-primary")).await,
            format!("registry.example/{name}:1.0.0")
        );
    }
    let group = shop
        .group_until(Duration::from_secs(10), |g| g["phase"] == "RolledBack")
        .await;
    let reason = group["reason"].as_str().unwrap();
    assert!(reason.contains("member ledger rolled back"), "{reason}");
    assert_eq!(group["conditions"][0]["status"], "False", "{group:#}");
    let told = shop.group_events().await;
    let rolling_back = told
        .iter()
        .find(|e| e.reason.as_deref() == Some("RollingBack"))
        .unwrap_or_else(|| panic!("no RollingBack Event: {told:#?}"));
    assert_eq!(rolling_back.type_.as_deref(), Some("Warning"));
    let note = rolling_back.note.as_deref().unwrap();
    assert!(
        note.contains("member ledger rolled back (Canary failed 2 checks"),
        "{note}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_group_is_told_on_its_status_and_moves_nothing() {
    // payments steps differently; "inventory" is no Rollout.
    let group = json!({"policy": "together", "members": [
        {"name": "ledger"}, {"name": "payments"}, {"name": "inventory"}]});
    let shop = Shop::start(group, |name| {
        let steps = if name == "payments" {
            "[10, 50]"
        } else {
            "[10, 20, 30]"
        };
        format!("interval: 1s\nthreshold: 2\nstepWeights: {steps}\n")
    })
    .await;
    let group = shop
        .group_until(Duration::from_secs(30), |g| {
            g["conditions"][0]["reason"] == "InvalidSpec"
        })
        .await;
    let said = group["conditions"][0]["message"].as_str().unwrap();
    assert_eq!(group["conditions"][0]["status"], "Unknown", "{group:#}");
    assert!(
        said.contains("spec.members[1].name: member \"payments\" steps through [10, 50]"),
        "{said}"
    );
    assert!(
        said.contains("spec.members[2].name: member \"inventory\" is not a Rollout or Canary in namespace shop"),
        "{said}"
    );
    assert!(group["phase"].is_null(), "{group:#}");
    shop.new_images().await;
    // Its members hold at their start for 5 s (five intervals): no canary gets a pod.
    let held_since = Instant::now();
    let seen = shop
        .watch_members(Duration::from_secs(10), |_| {
            held_since.elapsed() > Duration::from_secs(5)
        })
        .await;
    // orders is in no group: only the group's members are held.
    for reading in &seen {
        for (i, s) in reading.iter().enumerate().take(2) {
            assert_eq!(
                s["canaryWeight"].as_f64().unwrap_or(0.0),
                0.0,
                "{} moved: {s:#}",
                MEMBERS[i]
            );
        }
    }
    for name in ["ledger", "payments"] {
        let s = shop.status(name).await;
        assert_eq!(
            s["state"]["message"], "Waiting for the group: group release to decide",
            "{s:#}"
        );
        let canary = shop.deployments.get(name).await.unwrap();
        assert_eq!(canary.spec.unwrap().replicas, Some(0), "{name}");
    }
    let told = shop.group_events().await;
    assert_eq!(told.len(), 1, "{told:#?}");
    assert_eq!(told[0].type_.as_deref(), Some("Warning"));
    assert_eq!(told[0].reason.as_deref(), Some("InvalidSpec"));
    // Deleted, the group holds them no more: both take their first step.
    shop.groups
        .delete("release", &Default::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    shop.watch_members(Duration::from_secs(15), |members| {
        members[..2]
            .iter()
            .all(|s| s["canaryWeight"].as_f64() >= Some(10.0))
    })
    .await;
    eprintln!(
        "members of the deleted group took their first step {} ms after the deletion",
        deleted.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joint_rollback_takes_a_promoted_member_back_to_its_previous_version() {
    // ledger first; payments once ledger is promoted, and its rollout webhook always fails.
    let (gate, _requests) = stub(|_| {
        (
            Duration::ZERO,
            response("500 Internal Server Error", "text/plain", "broken"),
        )
    });
    let group = json!({"policy": "order", "members": [
        {"name": "ledger"},
        {"name": "payments", "dependsOn": [{"name": "ledger", "reached": "promoted"}]},
        {"name": "orders", "dependsOn": [{"name": "payments", "reached": "promoted"}]},
    ]});
    let shop = Shop::start(group, |name| {
        let mut analysis = "interval: 1s\nthreshold: 2\nstepWeights: [10, 20, 30]\n".to_string();
        if name == "payments" {
            analysis.push_str(&format!(
                "webhooks:\n  - {{name: smoke, type: rollout, url: '{gate}/'}}\n"
            ));
        }
        analysis
    })
    .await;
    shop.until_initialized().await;
    let initial = shop.status("ledger").await["lastPromotedSpec"].clone();
    assert!(initial.is_string(), "{initial}");
    for name in MEMBERS {
        shop.new_image(name).await;
    }
    shop.watch_members(Duration::from_secs(60), |members| {
        members[0]["phase"] == "Succeeded"
    })
    .await;
    assert_eq!(
        shop.image("ledger-primary").await,
        "registry.example/ledger:2.0.0"
    );
    let (seen, ended) = shop.all_failed().await;
    let last = seen.last().unwrap();
    let ended_at = |i: usize| ended[i];
    // payments failed; orders (last listed) rolled back, then ledger taken back.
    assert!(
        ended_at(1) <= ended_at(2) && ended_at(2) <= ended_at(0),
        "ledger {}, payments {}, orders {}",
        ended_at(0),
        ended_at(1),
        ended_at(2)
    );
    let ledger = &last[0];
    assert_eq!(ledger["state"]["outcome"], "rolledBack", "{ledger:#}");
    let message = ledger["state"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rolling back the promoted version: group release: member payments rolled back"
        ),
        "{message}"
    );
    // Its previous revision is the promoted one again: a return to it is adopted, not run.
    assert_eq!(ledger["lastPromotedSpec"], initial, "{ledger:#}");
    assert_eq!(
        shop.image("ledger-primary").await,
        "registry.example/ledger:1.0.0"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(shop.cluster.client(), "shop");
    let on_ledger: Vec<_> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ledger")
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Rollout")
        })
        .collect();
    let reverted = on_ledger
        .iter()
        .find(|e| e.reason.as_deref() == Some("Reverted"))
        .unwrap_or_else(|| panic!("no Reverted Event on ledger: {on_ledger:#?}"));
    let note = reverted.note.as_deref().unwrap();
    assert!(
        note.contains("group release rolled back") && note.contains("member payments rolled back"),
        "{note}"
    );
    let group = shop
        .group_until(Duration::from_secs(10), |g| g["phase"] == "RolledBack")
        .await;
    assert!(
        !shop
            .group_events()
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("NotReverted")),
        "{group:#}"
    );
    // Its target still holds 2.0.0, yet ledger starts no new run: 5 s (five intervals) on.
    let started = ledger["state"]["startedMs"].clone();
    let reverted_at = Instant::now();
    let after = shop
        .watch_members(Duration::from_secs(10), |_| {
            reverted_at.elapsed() > Duration::from_secs(5)
        })
        .await;
    for reading in &after {
        let s = &reading[0];
        assert_eq!(s["phase"], "Failed", "{s:#}");
        assert_eq!(s["state"]["startedMs"], started, "{s:#}");
    }
    let canary = shop.deployments.get("ledger").await.unwrap();
    assert_eq!(canary.spec.unwrap().replicas, Some(0));
    assert_eq!(
        shop.image("ledger-primary").await,
        "registry.example/ledger:1.0.0"
    );
    eprintln!(
        "ledger taken back {} ms after payments failed; {} readings over 5 s without a new run",
        ended_at(0) - ended_at(1),
        after.len()
    );
}
