//! The API semantics the operator relies on, through `TestCluster` and a real `kube::Client`, so
//! these run unchanged against a real API server (`KUBEBUILDER_ASSETS`) and against the fake.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind, Status};
use kube::runtime::watcher;
use serde_json::json;

use coalmine_kube_fake::{install_crds, TestCluster};

/// Flagger's CRDs (`tests/fixtures/flagger/crd.yaml`) as `coalmine-spec` embeds them: the same
/// text but for the indentation of two descriptions, which YAML 1.2 wants deeper.
use coalmine_spec::schema::FLAGGER_CRDS;
const PAYMENT_CANARY: &str =
    include_str!("../../../tests/fixtures/seed/flagger-payment-service.yaml");

/// Each test works in its own namespace, so they also run against one shared real cluster.
async fn namespace(client: &kube::Client, name: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
    name.to_owned()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap()
}

#[tokio::test]
async fn create_get_replace_delete_with_the_api_errors() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "crud").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let created = api
        .create(&PostParams::default(), &config_map("a", &[("k", "v")]))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("crud"));
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert!(meta.resource_version.is_some());

    let err = api_error(
        api.create(&PostParams::default(), &config_map("a", &[]))
            .await,
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));

    let err = api_error(api.get("missing").await);
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.message, "configmaps \"missing\" not found");

    let mut generated = config_map("", &[]);
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = api
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let name = generated.metadata.name.unwrap();
    assert!(
        name.starts_with("gen-") && name.len() == "gen-".len() + 5,
        "{name}"
    );

    let bad = api_error(
        api.create(&PostParams::default(), &config_map("Bad_Name", &[]))
            .await,
    );
    assert_eq!((bad.code, bad.reason.as_str()), (422, "Invalid"));

    let missing_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "no-such-namespace");
    let err = api_error(
        missing_ns
            .create(&PostParams::default(), &config_map("a", &[]))
            .await,
    );
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));

    let mut changed = api.get("a").await.unwrap();
    changed.data = Some(BTreeMap::from([("k".to_string(), "w".to_string())]));
    let replaced = api
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(api.get("a").await.unwrap().data.unwrap()["k"], "w");

    api.delete("a", &DeleteParams::default()).await.unwrap();
    let err = api_error(api.get("a").await);
    assert_eq!(err.code, 404);
}

#[tokio::test]
async fn a_stale_resource_version_is_a_conflict() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "occ").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &config_map("a", &[("n", "0")]))
        .await
        .unwrap();

    let read_by_one = api.get("a").await.unwrap();
    let read_by_two = read_by_one.clone();
    let mut first = read_by_one;
    first.data = Some(BTreeMap::from([("n".to_string(), "1".to_string())]));
    api.replace("a", &PostParams::default(), &first)
        .await
        .unwrap();

    let mut second = read_by_two;
    second.data = Some(BTreeMap::from([("n".to_string(), "2".to_string())]));
    let err = api_error(api.replace("a", &PostParams::default(), &second).await);
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("the object has been modified"),
        "{}",
        err.message
    );

    // A merge patch carrying the stale version is refused the same way.
    let stale = second.metadata.resource_version.clone().unwrap();
    let patch = json!({"metadata": {"resourceVersion": stale}, "data": {"n": "3"}});
    let err = api_error(
        api.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    assert_eq!(err.code, 409);
    assert_eq!(api.get("a").await.unwrap().data.unwrap()["n"], "1");
}

#[tokio::test]
async fn server_side_apply_between_two_managers() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "ssa").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let apply = |manager: &'static str, force: bool, data: serde_json::Value| {
        let api = api.clone();
        async move {
            let mut params = PatchParams::apply(manager);
            params.force = force;
            let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": data});
            api.patch("shared", &params, &Patch::Apply(&config)).await
        }
    };

    apply("alice", false, json!({"x": "1", "y": "2"}))
        .await
        .unwrap();
    // The same value for `y`: shared, no conflict.
    apply("bob", false, json!({"y": "2", "z": "3"}))
        .await
        .unwrap();

    let err = api_error(apply("bob", false, json!({"x": "9"})).await);
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("conflict with \"alice\""),
        "{}",
        err.message
    );
    assert!(err.message.contains(".data.x"), "{}", err.message);

    // Forced: bob takes `x`; he no longer applies `z` (his alone: removed) nor `y` (alice's
    // too: kept).
    let forced = apply("bob", true, json!({"x": "9"})).await.unwrap();
    let data = forced.data.clone().unwrap();
    assert_eq!(
        data,
        BTreeMap::from([
            ("x".to_string(), "9".to_string()),
            ("y".to_string(), "2".to_string())
        ])
    );
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}:{}",
                m.manager.clone().unwrap(),
                m.operation.clone().unwrap()
            )
        })
        .collect();
    assert!(
        managers.contains(&"alice:Apply".to_string()),
        "{managers:?}"
    );
    assert!(managers.contains(&"bob:Apply".to_string()), "{managers:?}");

    // Alice drops `y` (now hers alone) and keeps `x` in her config with bob's value: `y` goes.
    let after = apply("alice", false, json!({"x": "9"})).await.unwrap();
    assert_eq!(
        after.data.unwrap(),
        BTreeMap::from([("x".to_string(), "9".to_string())])
    );
}

#[tokio::test]
async fn status_is_a_subresource_and_generation_counts_spec_changes() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "status").await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx"}]}
            }
        },
        "status": {"readyReplicas": 7}
    }))
    .unwrap();
    let created = api
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(
        created.status.and_then(|s| s.ready_replicas),
        None,
        "status is dropped on create"
    );

    // Status written through the main resource is ignored...
    let status_patch = json!({"status": {"readyReplicas": 1}});
    let patched = api
        .patch("web", &PatchParams::default(), &Patch::Merge(&status_patch))
        .await
        .unwrap();
    assert_eq!(patched.status.and_then(|s| s.ready_replicas), None);
    // ...and through /status it is the only thing that changes, with no new generation.
    let both = json!({"metadata": {"labels": {"x": "y"}}, "spec": {"replicas": 5}, "status": {"readyReplicas": 1}});
    let patched = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&both))
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().ready_replicas, Some(1));
    assert_eq!(patched.spec.unwrap().replicas, Some(1));
    assert_eq!(patched.metadata.labels, None);
    assert_eq!(patched.metadata.generation, Some(1));

    // Metadata alone does not bump the generation; the spec does.
    let labels = json!({"metadata": {"labels": {"tier": "front"}}});
    let labelled = api
        .patch("web", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(1));
    let scale = json!({"spec": {"replicas": 3}});
    let scaled = api
        .patch("web", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    assert_eq!(scaled.metadata.generation, Some(2));
    assert_eq!(
        scaled.status.unwrap().ready_replicas,
        Some(1),
        "status survives a spec write"
    );

    // Strategic merge: containers merge by name.
    let sidecar = json!({"spec": {"template": {"spec": {"containers": [{"name": "proxy", "image": "envoy"}]}}}});
    let merged = api
        .patch("web", &PatchParams::default(), &Patch::Strategic(&sidecar))
        .await
        .unwrap();
    let containers = merged.spec.unwrap().template.spec.unwrap().containers;
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["web", "proxy"]);

    // The scale subresource reads and writes spec.replicas.
    let scale = api.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    let five = json!({"spec": {"replicas": 5}});
    api.patch_scale("web", &PatchParams::default(), &Patch::Merge(&five))
        .await
        .unwrap();
    assert_eq!(
        api.get("web").await.unwrap().spec.unwrap().replicas,
        Some(5)
    );
}

#[tokio::test]
async fn a_watch_from_a_resource_version_sees_what_follows() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "watch").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &config_map("before", &[]))
        .await
        .unwrap();
    let listed = api.list(&ListParams::default()).await.unwrap();
    let from = listed.metadata.resource_version.unwrap();

    let mut events = api
        .watch(&WatchParams::default().timeout(20), &from)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &config_map("after", &[("a", "1")]))
        .await
        .unwrap();
    let patch = json!({"data": {"a": "2"}});
    api.patch("after", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    api.delete("after", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("the watch stays open")
            .unwrap();
        match event {
            WatchEvent::Added(cm) => seen.push(format!("ADDED {}", cm.metadata.name.unwrap())),
            WatchEvent::Modified(cm) => seen.push(format!(
                "MODIFIED {} a={}",
                cm.metadata.name.unwrap(),
                cm.data.unwrap()["a"]
            )),
            WatchEvent::Deleted(cm) => seen.push(format!("DELETED {}", cm.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen, ["ADDED after", "MODIFIED after a=2", "DELETED after"]);
}

/// Needs the fake's compaction hook; against a real server there is no way to force it.
#[tokio::test]
async fn an_expired_resource_version_is_gone_and_the_watcher_relists() {
    let cluster = TestCluster::start().await.unwrap();
    let Some(fake) = cluster.fake() else {
        return;
    };
    let client = cluster.client();
    let ns = namespace(&client, "expiry").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &config_map("one", &[]))
        .await
        .unwrap();
    let old = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    async fn next_of<S: futures::Stream + Unpin>(stream: &mut S) -> S::Item {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watcher event within 10 s")
            .expect("the watcher never ends")
    }
    macro_rules! next {
        () => {
            next_of(&mut stream)
        };
    }
    assert!(matches!(next!().await, Ok(watcher::Event::Init)));
    assert!(matches!(next!().await, Ok(watcher::Event::InitApply(_))));
    assert!(matches!(next!().await, Ok(watcher::Event::InitDone)));

    api.create(&PostParams::default(), &config_map("two", &[]))
        .await
        .unwrap();
    assert!(matches!(next!().await, Ok(watcher::Event::Apply(_))));
    fake.compact();

    // A watch started from before the compaction is told 410 Expired.
    let mut raw = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match raw.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // So is a list continued from before it.
    let paged = api.list(&ListParams::default().limit(1)).await.unwrap();
    assert!(paged.metadata.continue_.is_some());
    // A write elsewhere moves the resourceVersion past the page's before the compaction.
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    elsewhere
        .create(&PostParams::default(), &config_map("expiry-elsewhere", &[]))
        .await
        .unwrap();
    fake.compact();
    let err = api_error(
        api.list(
            &ListParams::default()
                .limit(1)
                .continue_token(paged.metadata.continue_.as_deref().unwrap()),
        )
        .await,
    );
    assert_eq!((err.code, err.reason.as_str()), (410, "Expired"));

    // The open watcher gets the 410, then relists and sees both objects.
    match next!().await {
        Err(watcher::Error::WatchError(e)) => assert_eq!(e.code, 410),
        other => panic!("expected the 410, got {other:?}"),
    }
    assert!(matches!(next!().await, Ok(watcher::Event::Init)));
    let mut relisted = Vec::new();
    loop {
        match next!().await.unwrap() {
            watcher::Event::InitApply(cm) => relisted.push(cm.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(relisted, ["one", "two"]);
}

#[tokio::test]
async fn lists_take_label_selectors_and_pages() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "lists").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for (name, app, tier) in [
        ("a", "web", Some("front")),
        ("b", "web", None),
        ("c", "db", Some("back")),
        ("d", "cache", None),
    ] {
        let mut cm = config_map(name, &[]);
        let mut labels = BTreeMap::from([("app".to_string(), app.to_string())]);
        if let Some(tier) = tier {
            labels.insert("tier".into(), tier.into());
        }
        cm.metadata.labels = Some(labels);
        api.create(&PostParams::default(), &cm).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect()
    };
    let select = |selector: &'static str| {
        let api = api.clone();
        async move {
            names(
                api.list(&ListParams::default().labels(selector))
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(select("app=web").await, ["a", "b"]);
    assert_eq!(select("app!=web").await, ["c", "d"]);
    assert_eq!(select("app in (db,cache)").await, ["c", "d"]);
    assert_eq!(select("app notin (db,cache)").await, ["a", "b"]);
    assert_eq!(select("tier").await, ["a", "c"]);
    assert_eq!(select("!tier").await, ["b", "d"]);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(names(by_name), ["c"]);

    let mut pages = Vec::new();
    let mut params = ListParams::default().limit(3);
    loop {
        let page = api.list(&params).await.unwrap();
        let token = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        pages.push(names(page));
        match token {
            Some(token) => params = ListParams::default().limit(3).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, [vec!["a", "b", "c"], vec!["d"]]);

    // Across namespaces.
    let everywhere: Api<ConfigMap> = Api::all(client.clone());
    let all = everywhere
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert!(all
        .items
        .iter()
        .all(|c| c.metadata.namespace.as_deref() == Some("lists")));
    assert_eq!(all.items.len(), 2);
}

#[tokio::test]
async fn two_contenders_for_a_lease_one_wins() {
    let cluster = TestCluster::start().await.unwrap();
    let ns = namespace(&cluster.client(), "lease").await;
    let one: Api<Lease> = Api::namespaced(cluster.client(), &ns);
    let two: Api<Lease> = Api::namespaced(cluster.new_client().await.unwrap(), &ns);
    let lease = |holder: &str| -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "leader"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}
        }))
        .unwrap()
    };
    let (lease_one, lease_two, post) = (lease("one"), lease("two"), PostParams::default());
    let (a, b) = tokio::join!(one.create(&post, &lease_one), two.create(&post, &lease_two));
    let (won, lost) = match (a, b) {
        (Ok(won), lost) | (lost, Ok(won)) => (won, lost),
        other => panic!("neither created the lease: {other:?}"),
    };
    assert_eq!(api_error(lost).code, 409);

    // Both read the lease and try to take it over: one update wins, the other is a Conflict.
    let seen = one.get("leader").await.unwrap();
    assert_eq!(
        seen.metadata.resource_version,
        won.metadata.resource_version
    );
    let mut by_one = seen.clone();
    by_one.spec.as_mut().unwrap().holder_identity = Some("one".into());
    let mut by_two = seen;
    by_two.spec.as_mut().unwrap().holder_identity = Some("two".into());
    let (a, b) = tokio::join!(
        one.replace("leader", &post, &by_one),
        two.replace("leader", &post, &by_two)
    );
    let (winner, loser) = match (a, b) {
        (Ok(w), l) | (l, Ok(w)) => (w, l),
        other => panic!("neither took the lease: {other:?}"),
    };
    let err = api_error(loser);
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    let holder = one
        .get("leader")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder, winner.spec.unwrap().holder_identity);
}

fn canary_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("flagger.app", "v1beta1", "Canary");
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, "canaries"),
    )
}

fn payment_canary() -> DynamicObject {
    serde_saphyr::from_str(PAYMENT_CANARY).unwrap()
}

#[tokio::test]
async fn flagger_crds_install_and_canaries_are_validated_pruned_and_defaulted() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let names = install_crds(&client, FLAGGER_CRDS).await.unwrap();
    assert!(
        names.contains(&"canaries.flagger.app".to_string()),
        "{names:?}"
    );
    let ns = namespace(&client, "canaries").await;
    let api = canary_api(&client, &ns);

    // Discovery serves the new resource.
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let canary = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(r, _)| r.kind == "Canary")
        .expect("Canary is discovered");
    assert_eq!(canary.0.plural, "canaries");

    let accepted = api
        .create(&PostParams::default(), &payment_canary())
        .await
        .unwrap();
    assert_eq!(accepted.metadata.generation, Some(1));

    let mut bad = payment_canary();
    bad.metadata.name = Some("bad-interval".into());
    bad.data["spec"]["analysis"]["interval"] = json!("1x");
    let err = api_error(api.create(&PostParams::default(), &bad).await);
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(
        err.message.contains("spec.analysis.interval"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("should match '^[0-9]+(m|s)'"),
        "{}",
        err.message
    );

    let mut bad = payment_canary();
    bad.metadata.name = Some("bad-type".into());
    bad.data["spec"]["analysis"]["threshold"] = json!("lots");
    let err = api_error(api.create(&PostParams::default(), &bad).await);
    assert_eq!(err.code, 422);
    assert!(
        err.message.contains("spec.analysis.threshold"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("must be of type number"),
        "{}",
        err.message
    );

    // Unknown fields are pruned (a warning), or refused with fieldValidation=Strict.
    let mut extra = payment_canary();
    extra.metadata.name = Some("extra".into());
    extra.data["spec"]["colour"] = json!("red");
    let stored = api.create(&PostParams::default(), &extra).await.unwrap();
    assert!(
        stored.data["spec"].get("colour").is_none(),
        "{:?}",
        stored.data
    );
    assert_eq!(stored.data["spec"]["targetRef"]["name"], "payment-service");
    extra.metadata.name = Some("extra-strict".into());
    let body = serde_json::to_vec(&extra).unwrap();
    let url = api.resource_url();
    let http_request = http::Request::post(format!("{url}?fieldValidation=Strict"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let err = api_error(client.request::<DynamicObject>(http_request).await);
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"));
    assert!(
        err.message.contains("unknown field \"spec.colour\""),
        "{}",
        err.message
    );

    // Defaults from the schema are filled in.
    let mut gateway = payment_canary();
    gateway.metadata.name = Some("gateway".into());
    gateway.data["spec"]["service"]["gatewayRefs"] =
        json!([{"name": "public", "namespace": "istio-system"}]);
    let stored = api.create(&PostParams::default(), &gateway).await.unwrap();
    assert_eq!(
        stored.data["spec"]["service"]["gatewayRefs"][0],
        json!({"name": "public", "namespace": "istio-system", "group": "gateway.networking.k8s.io", "kind": "Gateway"})
    );

    // Deleting the CRD stops serving canaries.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("canaries.flagger.app", &DeleteParams::default())
        .await
        .unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Err(kube::Error::Api(status)) = api.list(&ListParams::default()).await {
                break status.code;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("canaries stop being served within 30 s");
    assert_eq!(gone, 404);
}

#[tokio::test]
async fn gateway_api_and_istio_crds_install_and_default_their_objects() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    for crds in [
        include_str!("../../../tests/fixtures/crds/gateway-api/gatewayclasses.yaml"),
        include_str!("../../../tests/fixtures/crds/gateway-api/gateways.yaml"),
        include_str!("../../../tests/fixtures/crds/gateway-api/httproutes.yaml"),
        include_str!("../../../tests/fixtures/crds/gateway-api/grpcroutes.yaml"),
        include_str!("../../../tests/fixtures/crds/gateway-api/referencegrants.yaml"),
        include_str!("../../../tests/fixtures/crds/istio/networking.yaml"),
    ] {
        install_crds(&client, crds).await.unwrap();
    }
    let ns = namespace(&client, "routes").await;
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "httproutes");
    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {
            "parentRefs": [{"name": "public"}],
            "rules": [{"backendRefs": [{"name": "web-primary", "port": 80, "weight": 90}]}]
        }
    }))
    .unwrap();
    let stored = routes.create(&PostParams::default(), &route).await.unwrap();
    let rule = &stored.data["spec"]["rules"][0];
    assert_eq!(
        rule["matches"],
        json!([{"path": {"type": "PathPrefix", "value": "/"}}])
    );
    assert_eq!(stored.data["spec"]["parentRefs"][0]["kind"], "Gateway");

    let mut bad = route.clone();
    bad.metadata.name = Some("bad".into());
    bad.data["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(-1);
    let err = api_error(routes.create(&PostParams::default(), &bad).await);
    assert_eq!(err.code, 422);
    assert!(
        err.message.contains("spec.rules[0].backendRefs[0].weight"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn the_streaming_list_watcher_gets_the_initial_objects_then_changes() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "streaming").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &config_map("first", &[]))
        .await
        .unwrap();
    let mut stream = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    while !seen.contains(&"done".to_string()) {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap();
        match event.unwrap() {
            watcher::Event::Init => seen.push("init".to_string()),
            watcher::Event::InitApply(cm) => seen.push(cm.metadata.name.unwrap()),
            watcher::Event::InitDone => seen.push("done".to_string()),
            other => panic!("unexpected {other:?}"),
        }
    }
    // kube's streaming-list watcher starts with the objects (it emits no `Init`).
    assert_eq!(seen, ["first", "done"]);
    api.create(&PostParams::default(), &config_map("second", &[]))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        Ok(watcher::Event::Apply(cm)) => assert_eq!(cm.metadata.name.as_deref(), Some("second")),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_finalizer_holds_deletion_until_it_is_removed() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "finalizers").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut cm = config_map("held", &[]);
    cm.metadata.finalizers = Some(vec!["coalmine.dev/cleanup".into()]);
    api.create(&PostParams::default(), &cm).await.unwrap();

    api.delete("held", &DeleteParams::default()).await.unwrap();
    let held = api.get("held").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());

    // No new finalizer may be added now.
    let more = json!({"metadata": {"finalizers": ["coalmine.dev/cleanup", "other"]}});
    let err = api_error(
        api.patch("held", &PatchParams::default(), &Patch::Merge(&more))
            .await,
    );
    assert_eq!(err.code, 422);

    let release = json!({"metadata": {"finalizers": null}});
    api.patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    assert_eq!(api_error(api.get("held").await).code, 404);
}

/// The sum of `apiserver_request_total` over the series with these labels.
async fn requests_counted(client: &kube::Client, resource: &str, verb: &str) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            l.contains(&format!("resource=\"{resource}\""))
                && l.contains(&format!("verb=\"{verb}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn requests_are_counted_at_metrics_as_the_real_server_counts_them() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "counted").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let lists_before = requests_counted(&client, "configmaps", "LIST").await;
    for _ in 0..3 {
        maps.list(&ListParams::default()).await.unwrap();
    }
    let map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"}});
    maps.patch("m", &PatchParams::apply("counter"), &Patch::Apply(&map))
        .await
        .unwrap();
    assert!(requests_counted(&client, "configmaps", "LIST").await >= lists_before + 3.0);
    assert!(requests_counted(&client, "configmaps", "APPLY").await >= 1.0);
}

#[tokio::test]
async fn a_service_gets_a_cluster_ip_of_the_range_and_keeps_it() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "services").await;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client, &ns);
    let applied = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-app-primary"},
        "spec": {"selector": {"app": "web-app-primary"}, "ports": [{"name": "http", "port": 80}]}});
    let apply = PatchParams::apply("coalmine").force();
    let created = services
        .patch("web-app-primary", &apply, &Patch::Apply(&applied))
        .await
        .unwrap();
    let spec = created.spec.unwrap();
    let ip: std::net::Ipv4Addr = spec.cluster_ip.clone().unwrap().parse().unwrap();
    // 10.231.128.0/17
    assert!(
        ip.octets()[..2] == [10, 231] && ip.octets()[2] >= 128,
        "{ip} not in {}",
        coalmine_kube_fake::SERVICE_CIDR
    );
    assert_eq!(spec.cluster_ips, Some(vec![ip.to_string()]));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );
    // The same apply again (no clusterIP in it) and a replace without one keep the address.
    let again = services
        .patch("web-app-primary", &apply, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(again.spec.unwrap().cluster_ip, Some(ip.to_string()));
    let other = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web-app-canary"},
                "spec": {"ports": [{"port": 80}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let other_ip = other.spec.unwrap().cluster_ip.unwrap();
    assert_ne!(other_ip, ip.to_string(), "two Services, one address");
    let refused = api_error(
        services
            .patch(
                "web-app-primary",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"clusterIP": other_ip, "clusterIPs": [other_ip]}})),
            )
            .await,
    );
    assert_eq!(refused.code, 422, "{refused:?}");
    assert!(
        refused.message.contains("spec.clusterIPs[0]"),
        "{}",
        refused.message
    );
    // An apply of the selector alone by the manager that set the ports drops them (server-side
    // apply removes the fields a manager no longer applies): a Service without ports is refused.
    let selector_only = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-app-primary"},
        "spec": {"selector": {"app": "web-app"}}});
    let refused = api_error(
        services
            .patch("web-app-primary", &apply, &Patch::Apply(&selector_only))
            .await,
    );
    assert_eq!(refused.code, 422, "{refused:?}");
    assert!(
        refused.message.contains("spec.ports"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn an_endpoint_slice_may_not_point_at_loopback() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "slices").await;
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::namespaced(client, &ns);
    let slice = |address: &str| {
        serde_json::from_value(json!({
            "metadata": {"name": "coalmine-router-1", "labels": {"kubernetes.io/service-name": "coalmine-router"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address]}],
            "ports": [{"name": "admin", "port": 9090, "protocol": "TCP"}],
        }))
        .unwrap()
    };
    let refused = api_error(
        slices
            .create(&PostParams::default(), &slice("127.0.0.1"))
            .await,
    );
    assert_eq!(refused.code, 422, "{refused:?}");
    assert!(
        refused.message.contains("endpoints[0].addresses[0]")
            && refused.message.contains("may not be in the loopback range"),
        "{}",
        refused.message
    );
    slices
        .create(&PostParams::default(), &slice("10.231.0.1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_apply_that_changes_nothing_is_not_a_new_version() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "noop").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
    let apply = PatchParams::apply("coalmine").force();
    let first = api
        .patch("a", &apply, &Patch::Apply(&applied))
        .await
        .unwrap();
    // A second later (managedFields' times have a resolution of a second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = api
        .patch("a", &apply, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version, first.metadata.resource_version,
        "a repeated apply is dropped, not written (watchers see nothing)"
    );
    let changed = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "w"}});
    let changed = api
        .patch("a", &apply, &Patch::Apply(&changed))
        .await
        .unwrap();
    assert_ne!(
        changed.metadata.resource_version,
        first.metadata.resource_version
    );
}

/// The NGINX provider copies a user's Ingress (networking.k8s.io/v1) to a canary Ingress: both
/// are served, and an apply of the copy's annotations leaves the user's own annotations on it.
#[tokio::test]
async fn ingresses_are_served_and_applied_annotation_by_annotation() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = namespace(&client, "ingresses").await;
    let ingresses: Api<k8s_openapi::api::networking::v1::Ingress> =
        Api::namespaced(client.clone(), &ns);
    let ingress = serde_json::from_value(json!({
        "metadata": {"name": "web-app-canary", "annotations": {"team": "web"}},
        "spec": {"rules": [{"host": "web.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "web-app-canary", "port": {"number": 80}}}}]}}]},
    }))
    .unwrap();
    ingresses
        .create(&PostParams::default(), &ingress)
        .await
        .unwrap();
    let apply = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web-app-canary",
            "annotations": {"nginx.ingress.kubernetes.io/canary-weight": "10"}},
    });
    let applied = ingresses
        .patch(
            "web-app-canary",
            &PatchParams::apply("coalmine").force(),
            &Patch::Apply(&apply),
        )
        .await
        .unwrap();
    let annotations = applied.metadata.annotations.unwrap();
    assert_eq!(annotations["team"], "web");
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/canary-weight"],
        "10"
    );
    assert!(applied.spec.unwrap().rules.is_some(), "the spec stays");
}
