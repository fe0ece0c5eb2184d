//! The ConfigMaps and Secrets a target's pods read, tracked as Flagger tracks them: where they
//! are found, which are left alone, the primary's template pointing at the copies, the hash.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use coalmine_operator::configs::{
    point_at_primary_copies, references, ConfigError, ConfigObject, ConfigRef, Need,
    TrackedConfigs, TRACKING_ANNOTATION,
};
use coalmine_operator::workload::primary_workload;
use common::{canary_owner, DEPLOYMENT};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret};
use serde_json::json;

/// A pod template naming a ConfigMap or Secret in every place a pod can: volumes, projected
/// sources, `envFrom` and `env[].valueFrom`, in containers and init containers.
fn template_reading_everywhere() -> PodTemplateSpec {
    serde_json::from_value(json!({
        "metadata": {"labels": {"app": "payment-service"}},
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": "cm-volume"}},
                {"name": "tls", "secret": {"secretName": "secret-volume"}},
                {"name": "bundle", "projected": {"sources": [
                    {"configMap": {"name": "cm-projected"}},
                    {"secret": {"name": "secret-projected"}},
                    {"serviceAccountToken": {"path": "token"}},
                ]}},
                {"name": "extra", "configMap": {"name": "cm-optional", "optional": true}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "initContainers": [{
                "name": "migrate", "image": "migrate:1",
                "envFrom": [{"secretRef": {"name": "secret-init-from"}}],
                "env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cm-init-key", "key": "mode"}}}],
            }],
            "containers": [{
                "name": "app", "image": "app:1",
                "envFrom": [{"configMapRef": {"name": "cm-from"}}, {"secretRef": {"name": "secret-from", "optional": false}}],
                "env": [
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "secret-key", "key": "password"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "PLAIN", "value": "x"},
                    // Optional here, required in the volume above: required.
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cm-volume", "key": "mode", "optional": true}}},
                ],
            }],
        },
    }))
    .unwrap()
}

#[test]
fn references_are_found_in_every_place_a_pod_reads_them() {
    let found = references(&template_reading_everywhere());
    let expected: BTreeMap<ConfigRef, Need> = [
        (ConfigRef::config_map("cm-volume"), Need::Required),
        (ConfigRef::config_map("cm-projected"), Need::Required),
        (ConfigRef::config_map("cm-optional"), Need::Optional),
        (ConfigRef::config_map("cm-init-key"), Need::Required),
        (ConfigRef::config_map("cm-from"), Need::Required),
        (ConfigRef::secret("secret-volume"), Need::Required),
        (ConfigRef::secret("secret-projected"), Need::Required),
        (ConfigRef::secret("secret-init-from"), Need::Required),
        (ConfigRef::secret("secret-from"), Need::Required),
        (ConfigRef::secret("secret-key"), Need::Required),
    ]
    .into();
    assert_eq!(found, expected);
}

#[test]
fn the_primary_template_reads_the_copies_of_tracked_configs_only() {
    let mut template = template_reading_everywhere();
    let tracked: BTreeSet<ConfigRef> = references(&template)
        .into_keys()
        .filter(|r| r.name != "secret-from")
        .collect();
    point_at_primary_copies(&mut template, &tracked);
    let pod = serde_json::to_value(&template.spec).unwrap();
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "cm-volume-primary");
    assert_eq!(
        pod["volumes"][1]["secret"]["secretName"],
        "secret-volume-primary"
    );
    assert_eq!(
        pod["volumes"][2]["projected"]["sources"],
        json!([{"configMap": {"name": "cm-projected-primary"}}, {"secret": {"name": "secret-projected-primary"}},
            {"serviceAccountToken": {"path": "token"}}])
    );
    assert_eq!(
        pod["volumes"][3]["configMap"]["name"],
        "cm-optional-primary"
    );
    let init = &pod["initContainers"][0];
    assert_eq!(
        init["envFrom"][0]["secretRef"]["name"],
        "secret-init-from-primary"
    );
    assert_eq!(
        init["env"][0]["valueFrom"]["configMapKeyRef"]["name"],
        "cm-init-key-primary"
    );
    let app = &pod["containers"][0];
    assert_eq!(app["envFrom"][0]["configMapRef"]["name"], "cm-from-primary");
    assert_eq!(
        app["envFrom"][1]["secretRef"]["name"], "secret-from",
        "not tracked: left as it is"
    );
    assert_eq!(
        app["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        "secret-key-primary"
    );
    assert_eq!(
        app["env"][3]["valueFrom"]["configMapKeyRef"]["name"],
        "cm-volume-primary"
    );
    assert_eq!(
        app["env"][1],
        json!({"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    );
}

#[test]
fn the_primary_workload_reads_the_copies_and_the_target_keeps_the_originals() {
    let target: Deployment = serde_saphyr::from_str(DEPLOYMENT).unwrap();
    let tracked = BTreeSet::from([ConfigRef::config_map("payment-config")]);
    let primary = primary_workload(&target, &canary_owner(), Some(19), &tracked).unwrap();
    let volume = |d: &Deployment| {
        serde_json::to_value(&d.spec.as_ref().unwrap().template.spec).unwrap()["volumes"][0]
            ["configMap"]["name"]
            .clone()
    };
    assert_eq!(volume(&primary), "payment-config-primary");
    assert_eq!(volume(&target), "payment-config");
}

fn config_map(name: &str, annotations: serde_json::Value, data: serde_json::Value) -> ConfigObject {
    ConfigObject::ConfigMap(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
            "data": data,
        }))
        .unwrap(),
    )
}

fn secret(name: &str, type_: &str, data: serde_json::Value) -> ConfigObject {
    ConfigObject::Secret(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"}, "type": type_, "data": data,
        }))
        .unwrap(),
    )
}

#[test]
fn switched_off_and_cluster_owned_configs_are_not_tracked_and_missing_ones_by_need() {
    let password = json!({"password": "aHVudGVyMg=="});
    let found = vec![
        (
            ConfigRef::config_map("settings"),
            Need::Required,
            Some(config_map("settings", json!({}), json!({"mode": "v1"}))),
        ),
        (
            ConfigRef::config_map("shared"),
            Need::Required,
            Some(config_map(
                "shared",
                json!({TRACKING_ANNOTATION: "disabled"}),
                json!({"region": "eu"}),
            )),
        ),
        (
            ConfigRef::secret("db"),
            Need::Required,
            Some(secret("db", "Opaque", password.clone())),
        ),
        (
            ConfigRef::secret("cert"),
            Need::Required,
            Some(secret(
                "cert",
                "kubernetes.io/tls",
                json!({"tls.crt": "Y2VydA=="}),
            )),
        ),
        (
            ConfigRef::secret("registry"),
            Need::Required,
            Some(secret(
                "registry",
                "kubernetes.io/dockerconfigjson",
                json!({".dockerconfigjson": "e30="}),
            )),
        ),
        (ConfigRef::config_map("extra"), Need::Optional, None),
    ];
    let tracked = TrackedConfigs::from_found(found.clone()).unwrap();
    assert_eq!(
        tracked.references(),
        BTreeSet::from([
            ConfigRef::config_map("settings"),
            ConfigRef::secret("cert"),
            ConfigRef::secret("db"),
        ])
    );
    // Flagger's keys in `status.trackedConfigs`.
    assert_eq!(
        tracked.hashes().into_keys().collect::<Vec<_>>(),
        ["configmap/settings", "secret/cert", "secret/db"]
    );
    // A required one missing is named.
    let mut missing = found;
    missing.push((ConfigRef::secret("api-key"), Need::Required, None));
    let err = TrackedConfigs::from_found(missing).unwrap_err();
    assert_eq!(
        err,
        ConfigError::Missing {
            reference: ConfigRef::secret("api-key")
        }
    );
    assert!(err.to_string().starts_with("Secret api-key"), "{err}");
    // A Secret's data is never shown, however the tracked configs are printed.
    let shown = format!("{tracked:?} {:?}", tracked.objects());
    assert!(
        !shown.contains("aHVudGVyMg") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(shown.contains("Secret db"), "{shown}");
}

#[test]
fn the_hash_follows_the_data_and_names_but_not_the_metadata() {
    let base = config_map("settings", json!({}), json!({"mode": "v1"}));
    assert_eq!(base.hash(), base.clone().hash());
    assert_ne!(
        base.hash(),
        config_map("settings", json!({}), json!({"mode": "v2"})).hash()
    );
    assert_ne!(
        base.hash(),
        config_map("other", json!({}), json!({"mode": "v1"})).hash(),
        "the same data under another name is another config"
    );
    assert_eq!(
        base.hash(),
        config_map(
            "settings",
            json!({"owner": "payments"}),
            json!({"mode": "v1"})
        )
        .hash()
    );
    let db = secret("db", "Opaque", json!({"password": "aHVudGVyMg=="}));
    assert_ne!(
        db.hash(),
        secret("db", "Opaque", json!({"password": "c3dvcmRmaXNo"})).hash()
    );
    let mut binary: ConfigMap = match base.clone() {
        ConfigObject::ConfigMap(cm) => cm,
        ConfigObject::Secret(_) => unreachable!(),
    };
    binary.binary_data = Some(BTreeMap::from([(
        "blob".to_string(),
        k8s_openapi::ByteString(vec![1, 2, 3]),
    )]));
    assert_ne!(base.hash(), ConfigObject::ConfigMap(binary).hash());
}

#[test]
fn a_copy_is_the_data_and_type_under_the_primary_name_owned_like_the_primary() {
    let original: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "shop", "labels": {"team": "payments"},
            "annotations": {"note": "x"}, "resourceVersion": "7", "uid": "u-1"},
        "type": "kubernetes.io/basic-auth", "immutable": true,
        "data": {"username": "YWRtaW4=", "password": "aHVudGVyMg=="},
    }))
    .unwrap();
    let ConfigObject::Secret(copy) =
        ConfigObject::Secret(original.clone()).primary_copy(&canary_owner())
    else {
        panic!("a Secret's copy is a Secret")
    };
    assert_eq!(copy.metadata.name.as_deref(), Some("db-primary"));
    assert_eq!(copy.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(copy.metadata.owner_references, Some(vec![canary_owner()]));
    assert_eq!(copy.metadata.resource_version, None);
    assert_eq!(copy.type_.as_deref(), Some("kubernetes.io/basic-auth"));
    assert_eq!(copy.data, original.data);
    // Refreshed at each promotion: never immutable.
    assert_eq!(copy.immutable, None);
    let cm = config_map("settings", json!({}), json!({"mode": "v1"}));
    let ConfigObject::ConfigMap(copy) = cm.primary_copy(&canary_owner()) else {
        panic!("a ConfigMap's copy is a ConfigMap")
    };
    assert_eq!(copy.metadata.name.as_deref(), Some("settings-primary"));
    assert_eq!(
        serde_json::to_value(copy.data).unwrap(),
        json!({"mode": "v1"})
    );
}
