//! `deploy/kubernetes` as `kubectl apply -k` would send it: every object it lists is accepted by
//! the API server (real with `KUBEBUILDER_ASSETS`, else the fake), and nothing is left out.

use std::path::{Path, PathBuf};

use coalmine_kube_fake::{install_crds, TestCluster};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// The files the kustomization lists, in order.
fn resources() -> Vec<String> {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let kustomization: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(kustomization["kind"], "Kustomization");
    kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_kustomization_lists_every_manifest_and_ships_flaggers_crds_as_coalmine_reads_them() {
    let listed = resources();
    let mut on_disk: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .chain(
            std::fs::read_dir(deploy_dir().join("crds"))
                .unwrap()
                .map(|e| format!("crds/{}", e.unwrap().file_name().into_string().unwrap())),
        )
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, on_disk);
    // The CRDs shipped are the ones Coalmine validates Flagger documents against.
    let shipped = std::fs::read_to_string(deploy_dir().join("crds/flagger.yaml")).unwrap();
    let shipped: Vec<serde_json::Value> = serde_saphyr::from_multiple(&shipped).unwrap();
    let read: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(coalmine_spec::schema::FLAGGER_CRDS).unwrap();
    assert_eq!(shipped, read);
}

#[tokio::test]
async fn every_object_of_the_install_is_accepted_by_the_api_server() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let documents: Vec<(String, serde_json::Value)> = resources()
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
            let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
            docs.into_iter().map(move |d| (file.clone(), d))
        })
        .collect();
    // CRDs first (and established), as kubectl orders them.
    let crds: Vec<&serde_json::Value> = documents
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    let crd_text: String = crds
        .iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect();
    let installed = install_crds(&client, &crd_text).await.unwrap();
    assert_eq!(installed.len(), crds.len());
    assert!(installed.contains(&"rollouts.coalmine.dev".to_string()));
    assert!(installed.contains(&"canaries.flagger.app".to_string()));
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let mut applied = 0;
    for (file, doc) in documents
        .iter()
        .filter(|(_, d)| d["kind"] != "CustomResourceDefinition")
    {
        let object: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let types = object.types.clone().unwrap();
        let gvk = kube::api::GroupVersionKind::try_from(&types).unwrap();
        let (resource, capabilities) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{file}: the API server does not serve {gvk:?}"));
        let name = object.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                object.metadata.namespace.as_deref().unwrap_or("default"),
                &resource,
            ),
        };
        api.patch(&name, &PatchParams::apply("kubectl"), &Patch::Apply(doc))
            .await
            .unwrap_or_else(|e| panic!("{file}: {} {name} refused: {e}", gvk.kind));
        applied += 1;
    }
    // Namespace, ServiceAccount, ClusterRole(Binding), Role(Binding), Deployment, PDB, Service.
    assert_eq!(applied, 9);
}
