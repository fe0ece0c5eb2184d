//! Flagger's Canary as the operator reads it from the API server: the seed's reads; one Coalmine
//! cannot run is refused with the field's path, not with a failed watch.

use coalmine_operator::flagger::Canary;

const SEED: &str = include_str!("fixtures/flagger-payment-service.yaml");

fn canary(edit: impl FnOnce(&mut serde_json::Value)) -> Canary {
    let mut object: serde_json::Value = serde_saphyr::from_str(SEED).unwrap();
    edit(&mut object);
    serde_json::from_value(object).unwrap()
}

#[test]
fn the_seeds_canary_reads() {
    let spec = canary(|_| {}).read_spec().unwrap();
    assert_eq!(spec.target_ref.name, "payment-service");
    assert_eq!(spec.analysis.threshold, Some(3));
    assert_eq!(spec.analysis.metrics.len(), 2);
    assert_eq!(spec.analysis.webhooks[0].name, "load-test");
}

#[test]
fn a_canary_coalmine_cannot_run_names_the_field() {
    let err = canary(|o| o["spec"]["analysis"]["threshold"] = "three".into())
        .read_spec()
        .unwrap_err();
    assert_eq!(err.field, "spec.analysis.threshold", "{err}");
    let err = canary(|o| {
        o["spec"]["analysis"]["stepWeight"] = serde_json::Value::Null;
        o["spec"]["analysis"]["maxWeight"] = serde_json::Value::Null;
        o["spec"]["analysis"]["stepWeights"] = serde_json::json!([10, 5]);
    })
    .read_spec()
    .unwrap_err();
    assert_eq!(err.field, "spec.analysis.stepWeights[1]", "{err}");
    assert!(err.message.contains("must rise"), "{err}");
    let err = canary(|o| o["spec"]["targetRef"] = serde_json::json!({"kind": "Deployment"}))
        .read_spec()
        .unwrap_err();
    assert_eq!(err.field, "spec.targetRef", "{err}");
    assert!(err.message.contains("name"), "{err}");
}

#[test]
fn a_canary_without_a_provider_takes_the_operators_or_the_routers_it_names() {
    use coalmine_operator::crd::{RoutersRef, TrafficProvider};
    // The seed names no provider: Flagger would take its -mesh-provider, Coalmine its --provider.
    let seed = canary(|_| {});
    for default in [TrafficProvider::Kubernetes, TrafficProvider::Coalmine] {
        assert_eq!(seed.to_rollout_spec(default).unwrap().provider, default);
    }
    let written = canary(|o| o["spec"]["provider"] = "kubernetes".into());
    assert_eq!(
        written
            .to_rollout_spec(TrafficProvider::Coalmine)
            .unwrap()
            .provider,
        TrafficProvider::Kubernetes
    );
    // Flagger's CRD allows no `provider: coalmine`: naming the routers is choosing them.
    let annotated = canary(|o| {
        o["metadata"]["annotations"] = serde_json::json!({"coalmine.dev/routers": "edge:9901"})
    })
    .to_rollout_spec(TrafficProvider::Kubernetes)
    .unwrap();
    assert_eq!(annotated.provider, TrafficProvider::Coalmine);
    assert_eq!(
        annotated.routers,
        Some(RoutersRef {
            service: "edge".into(),
            admin_port: Some(9901),
            route_service: None,
        })
    );
    // One router fleet, many Canaries: each drives its own service of the routers' table, and
    // the document the run drives says which.
    let on_service = canary(|o| {
        o["metadata"]["annotations"] =
            serde_json::json!({"coalmine.dev/router-service": "checkout"})
    })
    .to_rollout_spec(TrafficProvider::Kubernetes)
    .unwrap();
    assert_eq!(on_service.provider, TrafficProvider::Coalmine);
    let routers = on_service.routers.clone().unwrap();
    assert_eq!(
        (routers.service.as_str(), routers.route_service.as_deref()),
        ("coalmine-router", Some("checkout"))
    );
    let rollout = coalmine_operator::crd::Rollout::new("web-app", on_service);
    assert_eq!(rollout.to_document().spec.router_service(), "checkout");
    let err = canary(|o| {
        o["metadata"]["annotations"] =
            serde_json::json!({"coalmine.dev/router-service": "Check Out"})
    })
    .to_rollout_spec(TrafficProvider::Coalmine)
    .unwrap_err();
    assert_eq!(
        err.field, "metadata.annotations.coalmine.dev/router-service",
        "{err}"
    );
    let err = canary(|o| {
        o["metadata"]["annotations"] = serde_json::json!({"coalmine.dev/routers": "Edge:x"})
    })
    .to_rollout_spec(TrafficProvider::Coalmine)
    .unwrap_err();
    assert_eq!(
        err.field, "metadata.annotations.coalmine.dev/routers",
        "{err}"
    );
    // Flagger's providers this operator drives, by Flagger's names.
    for (name, provider) in [
        ("istio", TrafficProvider::Istio),
        ("gatewayapi:v1", TrafficProvider::GatewayApi),
        ("gatewayapi:v1beta1", TrafficProvider::GatewayApiV1beta1),
        ("nginx", TrafficProvider::Nginx),
    ] {
        let spec = canary(|o| o["spec"]["provider"] = name.into())
            .to_rollout_spec(TrafficProvider::Kubernetes)
            .unwrap();
        assert_eq!(spec.provider, provider, "{name}");
    }
    let err = canary(|o| o["spec"]["provider"] = "linkerd".into())
        .to_rollout_spec(TrafficProvider::Coalmine)
        .unwrap_err();
    assert_eq!(err.field, "spec.provider", "{err}");
    assert!(err.message.contains("coalmine.dev/routers"), "{err}");
}

#[test]
fn the_service_fields_coalmine_does_not_apply_are_named() {
    // Flagger's Istio example: its URI match, rewrite and port discovery are not applied.
    let example: Canary = serde_saphyr::from_str(include_str!(
        "../../../tests/fixtures/flagger/istio-canary.yaml"
    ))
    .unwrap();
    let mut ignored = example.ignored_service_fields();
    ignored.sort();
    assert_eq!(
        ignored,
        [
            "spec.service.match",
            "spec.service.portDiscovery",
            "spec.service.rewrite"
        ]
    );
    // The seed's Canary sets only a port: nothing to say.
    assert!(canary(|_| {}).ignored_service_fields().is_empty());
}
