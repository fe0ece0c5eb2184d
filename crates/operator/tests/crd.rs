//! The CRD under `deploy/kubernetes/` is the output of the Rust types, and those types read
//! what users write.

mod common;

use coalmine_operator::crd::{crds_yaml, Rollout, TrafficProvider};
use common::ROLLOUT;

const COMMITTED: &str = include_str!("../../../deploy/kubernetes/crds/coalmine.yaml");

#[test]
fn the_committed_crd_is_the_generated_one() {
    assert!(
        COMMITTED == crds_yaml(),
        "deploy/kubernetes/crds/coalmine.yaml is stale: run `coalmine crd > deploy/kubernetes/crds/coalmine.yaml`"
    );
}

#[test]
fn a_rollout_with_coalmines_analysis_reads_into_the_types() {
    let spec = serde_saphyr::from_str::<Rollout>(ROLLOUT).unwrap().spec;
    assert_eq!(spec.provider, TrafficProvider::Kubernetes);
    assert_eq!(spec.target_ref.name, "payment-service");
    assert_eq!(spec.analysis.step_weights.len(), 4);
    assert_eq!(spec.analysis.sequential.alpha, 0.02);
    // What the CRD declares is what the types write: no field the API server would prune.
    let crd: serde_json::Value = serde_json::to_value(&coalmine_operator::crd::crds()[0]).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let written = serde_json::to_value(&spec).unwrap();
    for key in written.as_object().unwrap().keys() {
        assert!(
            schema["properties"].get(key).is_some(),
            "{key} is not in the CRD"
        );
    }
    for key in written["analysis"].as_object().unwrap().keys() {
        assert!(
            schema["properties"]["analysis"]["properties"]
                .get(key)
                .is_some(),
            "analysis.{key} is not in the CRD"
        );
    }
}
