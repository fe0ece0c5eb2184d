//! Provider `kubernetes` with weights against an API server (real with `KUBEBUILDER_ASSETS`, else
//! the fake): the seed's 19:1, promotion through the primary, claims, and what it refuses.
//! There is no kubelet: the test marks workloads ready by writing their status, as envtest
//! users do.

mod common;

use coalmine_controller::traffic::TrafficBackend;
use coalmine_kube_fake::TestCluster;
use coalmine_operator::configs::TRACKING_ANNOTATION;
use coalmine_operator::seams::replicas::ReplicaRatio;
use coalmine_operator::seams::workloads::{WorkloadsSpec, SERVICE_LABEL};
use coalmine_operator::workload::ServicePortSpec;
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::Weight;
use common::{canary_owner, shop, DEPLOYMENT};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

struct Setup {
    _cluster: TestCluster,
    client: kube::Client,
    deployments: Api<Deployment>,
}

/// The seed's Deployment (with the apex's label on its pods, or not) and the ConfigMap it mounts.
async fn setup(with_label: bool) -> Setup {
    let mut target: Deployment = serde_saphyr::from_str(DEPLOYMENT).unwrap();
    if with_label {
        let labels = target
            .spec
            .as_mut()
            .unwrap()
            .template
            .metadata
            .as_mut()
            .unwrap();
        labels
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_LABEL.into(), "payment-service".into());
    }
    setup_with(target).await
}

async fn setup_with(target: Deployment) -> Setup {
    let cluster = shop().await;
    let client = cluster.client();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    config_maps
        .create(
            &PostParams::default(),
            &config_map("payment-config", json!({"mode": "v1"})),
        )
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");
    deployments
        .create(&PostParams::default(), &target)
        .await
        .unwrap();
    Setup {
        _cluster: cluster,
        client,
        deployments,
    }
}

fn config_map(name: &str, data: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop"}, "data": data}))
        .unwrap()
}

fn backend(setup: &Setup, controller: &str) -> ReplicaRatio {
    ReplicaRatio::new(setup.client.clone(), backend_spec(controller))
}

fn backend_spec(controller: &str) -> WorkloadsSpec {
    WorkloadsSpec {
        namespace: "shop".into(),
        target: "payment-service".into(),
        autoscaler: None,
        port: port(),
        owner: format!("payment-service ({controller})"),
        owner_reference: canary_owner(),
        canary_ready_threshold: 100,
        primary_ready_threshold: 100,
        progress_deadline_seconds: 600,
        promoted_revision: None,
    }
}

/// What the deployment controller and kubelet would report once every replica runs.
async fn mark_ready(deployments: &Api<Deployment>, name: &str) {
    let d = deployments.get(name).await.unwrap();
    let n = d.spec.as_ref().unwrap().replicas.unwrap_or(1);
    let status = json!({"status": {
        "observedGeneration": d.metadata.generation.unwrap(),
        "replicas": n, "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n,
    }});
    deployments
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn replicas(deployments: &Api<Deployment>, name: &str) -> i32 {
    deployments
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .replicas
        .unwrap()
}

fn weighted(percent: f64) -> Traffic {
    Traffic {
        promoted: false,
        canary: percent > 0.0,
        canary_weight: Weight::from_percent(percent).unwrap(),
        apply_match: false,
        mirror_weight: Weight::ZERO,
    }
}

fn port() -> ServicePortSpec {
    ServicePortSpec {
        name: None,
        port: 80,
        target_port: None,
        port_name: None,
    }
}

#[tokio::test]
async fn the_seeds_nineteen_to_one_then_promotion_through_the_primary() {
    let setup = setup(true).await;
    let d = &setup.deployments;
    let backend = backend(&setup, "operator-a");
    // Initialisation waits for the primary, then leaves the canary at 0.
    let held = backend.initialize().await.unwrap_err();
    assert!(
        matches!(&held, TrafficFault::Unreachable(w) if w.contains("payment-service-primary")),
        "{held:?}"
    );
    assert_eq!(
        replicas(d, "payment-service").await,
        19,
        "the target serves until the primary does"
    );
    mark_ready(d, "payment-service-primary").await;
    backend.initialize().await.unwrap();
    assert_eq!(replicas(d, "payment-service-primary").await, 19);
    assert_eq!(replicas(d, "payment-service").await, 0);
    let services: Api<Service> = Api::namespaced(setup.client.clone(), "shop");
    let selector = |s: Service| serde_json::to_value(s.spec.unwrap().selector).unwrap();
    assert_eq!(
        selector(services.get("payment-service").await.unwrap()),
        json!({"app": "payment-service-primary"}),
        "the apex on the primary, as Flagger's, until the canary has a share"
    );
    assert_eq!(
        selector(services.get("payment-service-canary").await.unwrap()),
        json!({"app": "payment-service"})
    );
    // The weights as replicas beside the 19 primary pods.
    backend.claim().await.unwrap();
    for (weight, canary) in [(5.0, 1), (25.0, 7), (50.0, 19), (0.0, 0)] {
        let applied = backend.apply(&weighted(weight)).await;
        assert_eq!(
            replicas(d, "payment-service").await,
            canary,
            "at {weight} %"
        );
        if canary > 0 {
            // Held until the canary's pods run: no analysis of a canary nobody reaches.
            assert!(
                matches!(&applied, Err(TrafficFault::Unreachable(w)) if w.contains("payment-service")),
                "{applied:?}"
            );
            mark_ready(d, "payment-service").await;
            backend.apply(&weighted(weight)).await.unwrap();
        } else {
            applied.unwrap();
        }
        assert_eq!(
            replicas(d, "payment-service-primary").await,
            19,
            "the primary keeps its size"
        );
        let apex = services.get("payment-service").await.unwrap();
        assert_eq!(
            serde_json::to_value(&apex.spec.as_ref().unwrap().selector).unwrap(),
            if canary > 0 {
                json!({SERVICE_LABEL: "payment-service"})
            } else {
                json!({"app": "payment-service-primary"})
            },
            "at {weight} %"
        );
        assert_eq!(
            apex.spec.unwrap().ports.unwrap()[0].port,
            80,
            "the apex keeps its port when its selector changes"
        );
    }
    // Someone scales the canary up by hand after a rollback: put right, and said.
    d.patch_scale(
        "payment-service",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    let corrected = backend.reconcile(&weighted(0.0)).await.unwrap();
    assert_eq!(corrected, ["Deployment payment-service replicas 5 → 0"]);
    assert_eq!(replicas(d, "payment-service").await, 0);
    assert!(
        backend.reconcile(&weighted(0.0)).await.unwrap().is_empty(),
        "idempotent"
    );
    // A canary whose rollout the deployment controller gave up on is rolled back.
    let _ = backend.apply(&weighted(5.0)).await;
    let generation = d.get("payment-service").await.unwrap().metadata.generation;
    let stuck = json!({"status": {"observedGeneration": generation, "conditions": [{"type": "Progressing", "status": "False",
        "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet has timed out progressing."}]}});
    d.patch_status(
        "payment-service",
        &PatchParams::default(),
        &Patch::Merge(&stuck),
    )
    .await
    .unwrap();
    let refused = backend.apply(&weighted(5.0)).await.unwrap_err();
    assert!(
        matches!(&refused, TrafficFault::Refused(w) if w.contains("timed out")),
        "{refused:?}"
    );
    mark_ready(d, "payment-service").await;
    d.patch_status(
        "payment-service",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"conditions": []}})),
    )
    .await
    .unwrap();
    // A new image (kubectl set image), then promotion: the primary rolls out first.
    let image = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "payment-service", "image": "registry.example/payment-service:2.0.0"}]}}}});
    d.patch(
        "payment-service",
        &PatchParams::default(),
        &Patch::Strategic(&image),
    )
    .await
    .unwrap();
    let promoted = Traffic {
        promoted: true,
        ..weighted(5.0)
    };
    let held = backend.apply(&promoted).await.unwrap_err();
    assert!(matches!(held, TrafficFault::Unreachable(_)), "{held:?}");
    assert_eq!(
        replicas(d, "payment-service").await,
        1,
        "the canary serves until the primary does"
    );
    let primary = d.get("payment-service-primary").await.unwrap();
    let containers = &primary
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers;
    assert_eq!(
        containers[0].image.as_deref(),
        Some("registry.example/payment-service:2.0.0")
    );
    assert_eq!(
        primary.spec.unwrap().replicas,
        Some(19),
        "promotion keeps the primary's size"
    );
    mark_ready(d, "payment-service-primary").await;
    backend.apply(&promoted).await.unwrap();
    assert_eq!(replicas(d, "payment-service").await, 0);
    backend.release().await.unwrap();
}

#[tokio::test]
async fn one_rollout_at_a_time_and_what_replicas_cannot_do() {
    let setup = setup(true).await;
    let first = backend(&setup, "operator-a");
    first.claim().await.unwrap();
    first.claim().await.unwrap();
    let second = backend(&setup, "operator-b");
    let refused = second.claim().await.unwrap_err();
    assert!(
        matches!(&refused, TrafficFault::Refused(w) if w.contains("payment-service (operator-a)")),
        "{refused:?}"
    );
    // Releasing frees it for the next.
    first.release().await.unwrap();
    second.claim().await.unwrap();
    let matched = Traffic {
        apply_match: true,
        ..weighted(10.0)
    };
    let refused = second.apply(&matched).await.unwrap_err();
    assert!(
        matches!(&refused, TrafficFault::Refused(w) if w.contains("provider coalmine")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_target_whose_pods_lack_the_apex_label_is_refused_naming_the_field() {
    let setup = setup(false).await;
    let refused = backend(&setup, "operator-a").claim().await.unwrap_err();
    let TrafficFault::Refused(why) = refused else {
        panic!("{refused:?}")
    };
    assert!(why.contains("spec.template.metadata.labels"), "{why}");
    assert!(why.contains(SERVICE_LABEL), "{why}");
}

/// The seed's Deployment reading, besides its mounted ConfigMap, a Secret (`env`, in an init
/// container) and a ConfigMap whose tracking is switched off (`envFrom`).
fn target_reading_configs() -> Deployment {
    let mut target: serde_json::Value = serde_saphyr::from_str(DEPLOYMENT).unwrap();
    let pod = &mut target["spec"]["template"];
    pod["metadata"]["labels"][SERVICE_LABEL] = "payment-service".into();
    pod["spec"]["initContainers"] = json!([{
        "name": "migrate", "image": "registry.example/payment-migrate:1.0.0",
        "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "payment-db", "key": "password"}}}],
    }]);
    pod["spec"]["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "cluster-info"}}]);
    serde_json::from_value(target).unwrap()
}

fn primary_pod(primary: &Deployment) -> serde_json::Value {
    serde_json::to_value(&primary.spec.as_ref().unwrap().template.spec).unwrap()
}

#[tokio::test]
async fn tracked_configs_are_copied_for_the_primary_at_initialisation_and_refreshed_at_promotion() {
    let setup = setup_with(target_reading_configs()).await;
    let d = &setup.deployments;
    let config_maps: Api<ConfigMap> = Api::namespaced(setup.client.clone(), "shop");
    let secrets: Api<Secret> = Api::namespaced(setup.client.clone(), "shop");
    let mut untracked = config_map("cluster-info", json!({"region": "eu-west-1"}));
    untracked.metadata.annotations = Some([(TRACKING_ANNOTATION.into(), "disabled".into())].into());
    config_maps
        .create(&PostParams::default(), &untracked)
        .await
        .unwrap();
    let backend = backend(&setup, "operator-a");

    // The Secret the init container needs does not exist yet: nothing is made, and it is named
    // (not its data: there is none to show yet, and there never will be).
    let held = backend.initialize().await.unwrap_err();
    assert!(
        matches!(&held, TrafficFault::Unreachable(w) if w.contains("Secret payment-db")),
        "{held:?}"
    );
    assert!(d
        .get_opt("payment-service-primary")
        .await
        .unwrap()
        .is_none());

    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "payment-db", "namespace": "shop"},
        "type": "Opaque", "data": {"password": "aHVudGVyMg=="},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let _ = backend.initialize().await;
    mark_ready(d, "payment-service-primary").await;
    backend.initialize().await.unwrap();

    // The copies, owned like the primary.
    let config_copy = config_maps.get("payment-config-primary").await.unwrap();
    assert_eq!(
        config_copy.data,
        config_map("payment-config", json!({"mode": "v1"})).data
    );
    assert_eq!(
        config_copy.metadata.owner_references,
        Some(vec![canary_owner()])
    );
    let secret_copy = secrets.get("payment-db-primary").await.unwrap();
    assert_eq!(secret_copy.data, secret.data);
    assert_eq!(secret_copy.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        secret_copy.metadata.owner_references,
        Some(vec![canary_owner()])
    );
    assert!(
        config_maps
            .get_opt("cluster-info-primary")
            .await
            .unwrap()
            .is_none(),
        "tracking switched off: not copied"
    );
    // The primary reads the copies; the target (the canary) the originals.
    let pod = primary_pod(&d.get("payment-service-primary").await.unwrap());
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        "payment-config-primary"
    );
    assert_eq!(
        pod["initContainers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        "payment-db-primary"
    );
    assert_eq!(
        pod["containers"][0]["envFrom"][0]["configMapRef"]["name"],
        "cluster-info"
    );
    let canary_pod = primary_pod(&d.get("payment-service").await.unwrap());
    assert_eq!(
        canary_pod["volumes"][0]["configMap"]["name"],
        "payment-config"
    );

    // An edit reaches the canary's pods only, until promotion.
    let mut edited = config_maps.get("payment-config").await.unwrap();
    edited.data = config_map("payment-config", json!({"mode": "v2", "retries": "3"})).data;
    config_maps
        .replace("payment-config", &PostParams::default(), &edited)
        .await
        .unwrap();
    backend.claim().await.unwrap();
    let _ = backend.apply(&weighted(5.0)).await;
    mark_ready(d, "payment-service").await;
    backend.apply(&weighted(5.0)).await.unwrap();
    let data = |cm: ConfigMap| serde_json::to_value(cm.data).unwrap();
    assert_eq!(
        data(config_maps.get("payment-config-primary").await.unwrap()),
        json!({"mode": "v1"})
    );
    let promoted = Traffic {
        promoted: true,
        ..weighted(5.0)
    };
    let _ = backend.apply(&promoted).await;
    assert_eq!(
        data(config_maps.get("payment-config-primary").await.unwrap()),
        json!({"mode": "v2", "retries": "3"})
    );
    // A key the original drops goes from the copy at the next promotion.
    let mut edited = config_maps.get("payment-config").await.unwrap();
    edited.data = config_map("payment-config", json!({"mode": "v3"})).data;
    config_maps
        .replace("payment-config", &PostParams::default(), &edited)
        .await
        .unwrap();
    let _ = backend.apply(&promoted).await;
    assert_eq!(
        data(config_maps.get("payment-config-primary").await.unwrap()),
        json!({"mode": "v3"})
    );
    mark_ready(d, "payment-service-primary").await;
    backend.apply(&promoted).await.unwrap();
    let pod = primary_pod(&d.get("payment-service-primary").await.unwrap());
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"], "payment-config-primary",
        "promotion keeps the primary on the copies"
    );
}

fn autoscaler(max: i32) -> HorizontalPodAutoscaler {
    serde_json::from_value(json!({
        "metadata": {"name": "payment-service", "namespace": "shop"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "payment-service"},
            "minReplicas": 2, "maxReplicas": max,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn the_primary_gets_a_copy_of_the_autoscaler_made_at_initialisation_updated_at_promotion() {
    let setup = setup(true).await;
    let d = &setup.deployments;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(setup.client.clone(), "shop");
    let backend = ReplicaRatio::new(
        setup.client.clone(),
        WorkloadsSpec {
            autoscaler: Some("payment-service".into()),
            ..backend_spec("operator-a")
        },
    );
    // The autoscaler it names does not exist: held, by field, before anything is made.
    let held = backend.initialize().await.unwrap_err();
    assert!(
        matches!(&held, TrafficFault::Unreachable(w) if w.starts_with("spec.autoscalerRef") && w.contains("payment-service")),
        "{held:?}"
    );
    assert!(d
        .get_opt("payment-service-primary")
        .await
        .unwrap()
        .is_none());

    hpas.create(&PostParams::default(), &autoscaler(10))
        .await
        .unwrap();
    let _ = backend.initialize().await;
    let copy = hpas.get("payment-service-primary").await.unwrap();
    let spec = copy.spec.as_ref().unwrap();
    assert_eq!(spec.scale_target_ref.name, "payment-service-primary");
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 10));
    assert_eq!(spec.metrics, autoscaler(10).spec.unwrap().metrics);
    assert_eq!(copy.metadata.owner_references, Some(vec![canary_owner()]));

    // The user's autoscaler changes: the primary's follows at promotion, not before.
    let mut changed = hpas.get("payment-service").await.unwrap();
    changed.spec.as_mut().unwrap().max_replicas = 30;
    hpas.replace("payment-service", &PostParams::default(), &changed)
        .await
        .unwrap();
    mark_ready(d, "payment-service-primary").await;
    backend.initialize().await.unwrap();
    let max = |h: HorizontalPodAutoscaler| h.spec.unwrap().max_replicas;
    assert_eq!(max(hpas.get("payment-service-primary").await.unwrap()), 10);
    // The autoscaler sizes the primary; promotion leaves that size alone.
    d.patch_scale(
        "payment-service-primary",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": 4}})),
    )
    .await
    .unwrap();
    mark_ready(d, "payment-service-primary").await;
    backend.claim().await.unwrap();
    let promoted = Traffic {
        promoted: true,
        ..weighted(5.0)
    };
    let _ = backend.apply(&promoted).await;
    assert_eq!(max(hpas.get("payment-service-primary").await.unwrap()), 30);
    assert_eq!(replicas(d, "payment-service-primary").await, 4);
}

#[tokio::test]
async fn blue_green_runs_a_dark_canary_then_switches_the_apex_to_it_whole() {
    let setup = setup(true).await;
    let d = &setup.deployments;
    let backend = backend(&setup, "operator-a");
    let _ = backend.initialize().await;
    mark_ready(d, "payment-service-primary").await;
    backend.initialize().await.unwrap();
    backend.claim().await.unwrap();
    let services: Api<Service> = Api::namespaced(setup.client.clone(), "shop");
    let apex = || async {
        serde_json::to_value(
            services
                .get("payment-service")
                .await
                .unwrap()
                .spec
                .unwrap()
                .selector,
        )
        .unwrap()
    };
    // Blue/green's iterations: a canary with no share. One pod for the webhooks and load tests
    // (through `-canary`), ready before the analysis; no user request reaches it.
    let dark = Traffic {
        canary: true,
        ..weighted(0.0)
    };
    let held = backend.apply(&dark).await.unwrap_err();
    assert!(matches!(held, TrafficFault::Unreachable(_)), "{held:?}");
    assert_eq!(replicas(d, "payment-service").await, 1);
    mark_ready(d, "payment-service").await;
    backend.apply(&dark).await.unwrap();
    assert_eq!(apex().await, json!({"app": "payment-service-primary"}));
    // The switch: everything on the new version, at the primary's size, once it is ready —
    // not 99 canary pods per primary pod, which a share of 100 % of pods would take.
    let switched = weighted(100.0);
    let held = backend.apply(&switched).await.unwrap_err();
    assert!(matches!(held, TrafficFault::Unreachable(_)), "{held:?}");
    assert_eq!(replicas(d, "payment-service").await, 19);
    assert_eq!(
        apex().await,
        json!({"app": "payment-service-primary"}),
        "the apex waits for the canary's pods"
    );
    mark_ready(d, "payment-service").await;
    backend.apply(&switched).await.unwrap();
    assert_eq!(apex().await, json!({"app": "payment-service"}));
    // A rollback from there: the apex back on the primary first, then the canary goes.
    backend.apply(&weighted(0.0)).await.unwrap();
    assert_eq!(apex().await, json!({"app": "payment-service-primary"}));
    assert_eq!(replicas(d, "payment-service").await, 0);
}
