//! `coalmine proxy --kubernetes`'s watcher against a cluster (real with `KUBEBUILDER_ASSETS`,
//! else the fake): what its statuses say when the router refuses the table it computed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coalmine_kube_fake::install_crds;
use coalmine_operator::gateway::{run, GatewaySettings, TableSink};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{json, Value};

const GATEWAY_CRDS: [&str; 3] = [
    include_str!("../../../tests/fixtures/crds/gateway-api/gatewayclasses.yaml"),
    include_str!("../../../tests/fixtures/crds/gateway-api/gateways.yaml"),
    include_str!("../../../tests/fixtures/crds/gateway-api/httproutes.yaml"),
];

fn gateway_api(kube: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
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

/// The router refusing every table (as it does once it has counted its most service names
/// since it started): the Gateway must not say `Programmed=True`, since its routes' changes
/// are not served; it says so with the router's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_router_refuses_leaves_the_gateway_not_programmed_saying_why() {
    let cluster = common::shop().await;
    let kube = cluster.client();
    for crd in GATEWAY_CRDS {
        install_crds(&kube, crd).await.unwrap();
    }
    create(
        &gateway_api(&kube, "GatewayClass", "gatewayclasses"),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "coalmine"}, "spec": {"controllerName": "coalmine.dev/gateway"}}),
    )
    .await;
    let gateways = gateway_api(&kube, "Gateway", "gateways");
    create(
        &gateways,
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "shop"},
               "spec": {"gatewayClassName": "coalmine", "listeners": [
                   {"name": "web", "port": 80, "protocol": "HTTP"}]}}),
    )
    .await;
    let why = "service \"shop.podinfo.0.0\": this router has counted 65536 services since it started, its most";
    let sink: TableSink = Arc::new(move |_| Err(why.to_string()));
    let settings = GatewaySettings {
        controller_name: "coalmine.dev/gateway".into(),
        address: None,
    };
    let watcher = tokio::spawn(run(kube.clone(), settings, sink));
    let deadline = Instant::now() + Duration::from_secs(10);
    let programmed = loop {
        let status = gateways.get("edge").await.unwrap().data["status"].clone();
        let programmed = status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Programmed"))
            .cloned();
        if let Some(programmed) = programmed {
            break programmed;
        }
        assert!(Instant::now() < deadline, "no status written: {status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    watcher.abort();
    assert_eq!(programmed["status"], "False", "{programmed:#}");
    assert_eq!(programmed["reason"], "Invalid");
    assert!(
        programmed["message"].as_str().unwrap().contains(why),
        "{programmed:#}"
    );
}
