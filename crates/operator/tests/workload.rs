//! The objects a rollout runs on, built as Flagger builds them, from a user's Deployment.

mod common;

use std::collections::BTreeMap;

use common::{canary_owner, DEPLOYMENT};

use coalmine_operator::workload::{
    primary_autoscaler, primary_workload, readiness, replica_split, services, spec_hash, Readiness,
    ServicePortSpec, WorkloadError,
};
use coalmine_spec::Weight;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

fn target() -> Deployment {
    serde_saphyr::from_str(DEPLOYMENT).unwrap()
}

fn json_of<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn the_primary_is_the_targets_template_selecting_its_own_pods() {
    let target = target();
    let primary = json_of(
        &primary_workload(&target, &canary_owner(), Some(19), &Default::default()).unwrap(),
    );
    let original = json_of(&target);
    assert_eq!(primary["metadata"]["name"], "payment-service-primary");
    assert_eq!(primary["metadata"]["namespace"], "shop");
    assert_eq!(primary["metadata"]["ownerReferences"][0]["kind"], "Canary");
    assert_eq!(
        primary["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    assert_eq!(
        primary["spec"]["selector"],
        json!({"matchLabels": {"app": "payment-service-primary"}})
    );
    assert_eq!(primary["spec"]["replicas"], 19);
    assert_eq!(primary["spec"]["progressDeadlineSeconds"], 120);
    assert_eq!(primary["spec"]["minReadySeconds"], 5);
    let pod = &primary["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"app": "payment-service-primary", "version": "v1"})
    );
    assert_eq!(
        pod["metadata"]["annotations"],
        original["spec"]["template"]["metadata"]["annotations"]
    );
    // Its scheduling rules are about its own pods.
    assert_eq!(
        pod["spec"]["affinity"]["podAntiAffinity"]
            ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["labelSelector"]["matchLabels"]["app"],
        "payment-service-primary"
    );
    assert_eq!(
        pod["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchExpressions"][0]
            ["values"],
        json!(["payment-service-primary"])
    );
    // Everything else is the user's, untouched.
    assert_eq!(
        pod["spec"]["containers"],
        original["spec"]["template"]["spec"]["containers"]
    );
    assert_eq!(
        pod["spec"]["volumes"],
        original["spec"]["template"]["spec"]["volumes"]
    );
    // The target itself is not changed by building its primary.
    assert_eq!(json_of(&target), original);
}

#[test]
fn a_deployment_without_a_selector_label_is_refused_by_name() {
    let mut target = target();
    let spec = target.spec.as_mut().unwrap();
    spec.selector.match_labels = Some(BTreeMap::from([("tier".into(), "web".into())]));
    let err = primary_workload(&target, &canary_owner(), None, &Default::default()).unwrap_err();
    assert_eq!(
        err,
        WorkloadError::NoSelectorLabel {
            kind: "Deployment",
            name: "payment-service".into()
        }
    );
    assert!(err.to_string().contains("app.kubernetes.io/name"), "{err}");
}

#[test]
fn apex_and_primary_services_select_the_primary_and_canary_the_target() {
    let port = ServicePortSpec {
        name: None,
        port: 80,
        target_port: Some(IntOrString::String("http".into())),
        port_name: None,
    };
    let [apex, primary, canary] = services(&target(), &canary_owner(), &port)
        .unwrap()
        .map(|s| json_of(&s));
    assert_eq!(apex["metadata"]["name"], "payment-service");
    assert_eq!(primary["metadata"]["name"], "payment-service-primary");
    assert_eq!(canary["metadata"]["name"], "payment-service-canary");
    assert_eq!(
        apex["spec"]["selector"],
        json!({"app": "payment-service-primary"})
    );
    assert_eq!(
        primary["spec"]["selector"],
        json!({"app": "payment-service-primary"})
    );
    assert_eq!(
        canary["spec"]["selector"],
        json!({"app": "payment-service"})
    );
    assert_eq!(
        apex["spec"]["ports"],
        json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}])
    );
    // A named apex (Flagger's service.name) names all three.
    let named = ServicePortSpec {
        name: Some("payments".into()),
        ..port
    };
    let [apex, _, canary] = services(&target(), &canary_owner(), &named)
        .unwrap()
        .map(|s| json_of(&s));
    assert_eq!(apex["metadata"]["name"], "payments");
    assert_eq!(canary["metadata"]["name"], "payments-canary");
}

#[test]
fn the_primary_autoscaler_scales_the_primary() {
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "payment-service", "namespace": "shop"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "payment-service"},
            "minReplicas": 2, "maxReplicas": 10,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}
        }
    }))
    .unwrap();
    let copy = json_of(&primary_autoscaler(
        &hpa,
        &canary_owner(),
        "payment-service-primary",
    ));
    assert_eq!(copy["metadata"]["name"], "payment-service-primary");
    assert_eq!(
        copy["spec"]["scaleTargetRef"]["name"],
        "payment-service-primary"
    );
    // As Flagger's `hpa_reconciler.go`: the target's kind and API version, the bounds, metrics
    // and behaviour; owned like the primary.
    assert_eq!(copy["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(copy["spec"]["scaleTargetRef"]["apiVersion"], "apps/v1");
    assert_eq!(copy["spec"]["minReplicas"], 2);
    assert_eq!(copy["spec"]["maxReplicas"], 10);
    assert_eq!(copy["spec"]["metrics"], json_of(&hpa)["spec"]["metrics"]);
    assert_eq!(copy["spec"]["behavior"], json_of(&hpa)["spec"]["behavior"]);
    assert_eq!(copy["metadata"]["namespace"], "shop");
    assert_eq!(copy["metadata"]["ownerReferences"][0]["kind"], "Canary");
}

#[test]
fn the_seeds_nineteen_to_one_and_the_fewest_replicas_that_reach_a_weight() {
    let pct = |p: f64| Weight::from_percent(p).unwrap();
    // Seed 000: 19 stable replicas and 1 canary are 5 %.
    let split = replica_split(19, pct(5.0));
    assert_eq!(split.canary, 1);
    assert!((split.effective_percent - 5.0).abs() < 1e-9);
    assert_eq!(replica_split(10, pct(50.0)).canary, 10);
    assert_eq!(replica_split(19, pct(0.0)).canary, 0);
    assert_eq!(replica_split(0, pct(5.0)).canary, 1);
    // Every weight on every small primary: the share reached is at least the weight, and one
    // replica fewer would not reach it.
    for primary in 1..=40 {
        for step in 1..100 {
            let w = pct(f64::from(step));
            let split = replica_split(primary, w);
            let share = |c: i32| f64::from(c) / f64::from(primary + c);
            assert!(share(split.canary) >= f64::from(step) / 100.0 - 1e-12);
            assert!(share(split.canary - 1) < f64::from(step) / 100.0 - 1e-12);
            assert!((100.0 * share(split.canary) - split.effective_percent).abs() < 1e-9);
        }
    }
}

#[test]
fn the_spec_hash_follows_the_template_and_its_configs() {
    let target = target();
    let template = &target.spec.as_ref().unwrap().template;
    let configs = BTreeMap::from([("ConfigMap/payment-config".to_string(), "a1".to_string())]);
    let base = spec_hash(template, &configs);
    assert_eq!(base, spec_hash(&template.clone(), &configs.clone()));
    let mut changed = template.clone();
    changed.spec.as_mut().unwrap().containers[0].image =
        Some("registry.example/payment-service:2.0.0".into());
    assert_ne!(base, spec_hash(&changed, &configs));
    let edited = BTreeMap::from([("ConfigMap/payment-config".to_string(), "b2".to_string())]);
    assert_ne!(base, spec_hash(template, &edited));
}

fn with_status(replicas: i32, status: serde_json::Value) -> Deployment {
    let mut d = target();
    d.metadata.generation = Some(2);
    d.spec.as_mut().unwrap().replicas = Some(replicas);
    d.status = Some(serde_json::from_value(status).unwrap());
    d
}

#[test]
fn readiness_follows_flaggers_rules() {
    let now = 1_800_000_000; // 2027-01-15T08:00:00Z
    let ready = with_status(
        4,
        json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 4, "availableReplicas": 4}),
    );
    assert_eq!(readiness(&ready, 100, 600, now), Readiness::Ready);
    let not_observed = with_status(
        4,
        json!({"observedGeneration": 1, "replicas": 4, "updatedReplicas": 4, "availableReplicas": 4}),
    );
    assert!(
        matches!(readiness(&not_observed, 100, 600, now), Readiness::Waiting(w) if w.contains("not observed"))
    );
    let updating = with_status(
        4,
        json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 2, "availableReplicas": 4}),
    );
    assert!(
        matches!(readiness(&updating, 100, 600, now), Readiness::Waiting(w) if w.contains("2 of 4 updated"))
    );
    let old_pending = with_status(
        4,
        json!({"observedGeneration": 2, "replicas": 6, "updatedReplicas": 4, "availableReplicas": 4}),
    );
    assert!(
        matches!(readiness(&old_pending, 100, 600, now), Readiness::Waiting(w) if w.contains("2 old replicas"))
    );
    // Half available: short of 100 %, enough at a 50 % threshold.
    let half = with_status(
        4,
        json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 4, "availableReplicas": 2}),
    );
    assert!(matches!(
        readiness(&half, 100, 600, now),
        Readiness::Waiting(_)
    ));
    assert_eq!(readiness(&half, 50, 600, now), Readiness::Ready);
    // The deployment controller gave up: the run fails.
    let exceeded = with_status(
        4,
        json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 2, "availableReplicas": 2,
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"payment-service-7d9\" has timed out progressing."}]}),
    );
    assert!(
        matches!(readiness(&exceeded, 100, 600, now), Readiness::Failed(w) if w.contains("timed out"))
    );
    // Short of replicas for longer than the deadline: fails; within it: waits.
    let short_since = |secs_ago: i64| {
        let t = k8s_openapi::jiff::Timestamp::from_second(now - secs_ago)
            .unwrap()
            .to_string();
        with_status(
            4,
            json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 4, "availableReplicas": 1,
            "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "lastUpdateTime": t, "lastTransitionTime": t}]}),
        )
    };
    assert!(matches!(
        readiness(&short_since(601), 100, 600, now),
        Readiness::Failed(_)
    ));
    assert!(matches!(
        readiness(&short_since(30), 100, 600, now),
        Readiness::Waiting(_)
    ));
}

#[test]
fn a_daemon_set_is_parked_by_a_node_selector_that_is_not_part_of_its_revision() {
    use coalmine_operator::workload::{daemon_set_readiness, Workload};
    use k8s_openapi::api::apps::v1::DaemonSet;
    let agent: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "node-agent", "namespace": "shop", "generation": 2},
        "spec": {"selector": {"matchLabels": {"app": "node-agent"}},
            "template": {"metadata": {"labels": {"app": "node-agent"}},
                "spec": {"nodeSelector": {"kubernetes.io/os": "linux"}, "containers": [{"name": "agent", "image": "agent:1"}]}}},
    }))
    .unwrap();
    assert_eq!(agent.canary_size(), 1);
    let mut parked = agent.clone();
    let (patch, to_scale) = DaemonSet::size_patch(0);
    assert!(!to_scale, "a DaemonSet has no scale subresource");
    parked
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .node_selector
        .as_mut()
        .unwrap()
        .insert(
            "flagger.app/scale-to-zero".into(),
            patch["spec"]["template"]["spec"]["nodeSelector"]["flagger.app/scale-to-zero"]
                .as_str()
                .unwrap()
                .into(),
        );
    assert_eq!(parked.canary_size(), 0);
    // Parking and unparking change no revision; the user's own node selector stays.
    let configs = BTreeMap::new();
    assert_eq!(
        spec_hash(&parked.revision_template(), &configs),
        spec_hash(&agent.revision_template(), &configs)
    );
    // The primary runs where the user said, never parked, selecting its own pods.
    let primary = primary_workload(&parked, &canary_owner(), None, &Default::default()).unwrap();
    let pod = primary
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([(
            "kubernetes.io/os".to_string(),
            "linux".to_string()
        )]))
    );
    assert_eq!(primary.metadata.name.as_deref(), Some("node-agent-primary"));
    // Ready when every scheduled pod is updated and enough are available.
    let with = |status: serde_json::Value| {
        let mut ds = agent.clone();
        ds.status = Some(serde_json::from_value(status).unwrap());
        ds
    };
    let rolling = with(
        json!({"observedGeneration": 2, "currentNumberScheduled": 3, "desiredNumberScheduled": 3,
        "numberMisscheduled": 0, "numberReady": 1, "updatedNumberScheduled": 1, "numberAvailable": 1}),
    );
    assert!(
        matches!(daemon_set_readiness(&rolling, 100), Readiness::Waiting(w) if w.contains("1 of 3 scheduled pods are updated")),
        "{:?}",
        daemon_set_readiness(&rolling, 100)
    );
    let half = with(
        json!({"observedGeneration": 2, "currentNumberScheduled": 4, "desiredNumberScheduled": 4,
        "numberMisscheduled": 0, "numberReady": 2, "updatedNumberScheduled": 4, "numberAvailable": 2}),
    );
    assert!(matches!(
        daemon_set_readiness(&half, 100),
        Readiness::Waiting(_)
    ));
    assert_eq!(daemon_set_readiness(&half, 50), Readiness::Ready);
    let stale = with(
        json!({"observedGeneration": 1, "currentNumberScheduled": 3, "desiredNumberScheduled": 3,
        "numberMisscheduled": 0, "numberReady": 3, "updatedNumberScheduled": 3, "numberAvailable": 3}),
    );
    assert!(
        matches!(daemon_set_readiness(&stale, 100), Readiness::Waiting(w) if w.contains("not observed"))
    );
}
