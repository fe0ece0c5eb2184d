//! What the operator's tests share: the seed's release as objects, and a cluster to put them in.
#![allow(dead_code)] // each test binary uses its part

use coalmine_kube_fake::TestCluster;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

pub const DEPLOYMENT: &str = include_str!("../fixtures/payment-service-deployment.yaml");
pub const ROLLOUT: &str = include_str!("../fixtures/payment-service-rollout.yaml");

/// The owner a Canary gives the objects Coalmine makes for it.
pub fn canary_owner() -> OwnerReference {
    OwnerReference {
        api_version: "flagger.app/v1beta1".into(),
        kind: "Canary".into(),
        name: "payment-service".into(),
        uid: "8d0c5a52-1b7e-4c55-9a0e-2f7d1c9e0a11".into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A cluster (real with `KUBEBUILDER_ASSETS`, else the fake) with the namespace `shop`.
pub async fn shop() -> TestCluster {
    let cluster = TestCluster::start().await.unwrap();
    cluster.create_namespace("shop").await.unwrap();
    cluster
}
