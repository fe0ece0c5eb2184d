//! The operator's resources and its Lease against an API server: the real one when
//! `KUBEBUILDER_ASSETS` names envtest's binaries, else the in-repo fake (the same tests).

mod common;

use coalmine_kube_fake::install_crds;
use coalmine_operator::crd::{crds_yaml, Rollout, RolloutGroup};
use coalmine_operator::leader::{Elector, LeaseTimings};
use common::{shop, ROLLOUT};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};

#[tokio::test]
async fn the_api_server_takes_coalmines_crd_and_keeps_every_field_of_a_rollout() {
    let cluster = shop().await;
    let installed = install_crds(&cluster.client(), &crds_yaml()).await.unwrap();
    assert_eq!(
        installed,
        ["rollouts.coalmine.dev", "rolloutgroups.coalmine.dev"]
    );
    let api: Api<Rollout> = Api::namespaced(cluster.client(), "shop");
    let written: Rollout = serde_saphyr::from_str(ROLLOUT).unwrap();
    let stored = api.create(&PostParams::default(), &written).await.unwrap();
    // Nothing pruned: Coalmine's additions to the analysis survive the schema.
    assert_eq!(stored.spec, written.spec);
    // A value the schema refuses is refused by the API server, naming the field.
    let mut bad: serde_json::Value = serde_saphyr::from_str(ROLLOUT).unwrap();
    bad["metadata"]["name"] = "bad-weight".into();
    bad["spec"]["analysis"]["stepWeights"] = serde_json::json!([5, 150]);
    // Sent as written (Coalmine's own types would not even hold a weight of 150).
    let bad: DynamicObject = serde_json::from_value(bad).unwrap();
    let raw: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        "shop",
        &ApiResource::erase::<Rollout>(&()),
    );
    let err = raw.create(&PostParams::default(), &bad).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("not refused by the API server: {err}")
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.analysis.stepWeights[1]"),
        "{}",
        status.message
    );

    // A group keeps every field too: `reached` a weight with decimals or `promoted`.
    let groups: Api<RolloutGroup> = Api::namespaced(cluster.client(), "shop");
    let written: RolloutGroup = serde_saphyr::from_str(
        "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata: {name: payment-change, namespace: shop}
spec:
  policy: order
  sharedCohort: false
  members:
    - name: ledger
    - name: payments
      dependsOn: [{name: ledger, reached: 12.5}]
    - name: orders
      dependsOn: [{name: payments, reached: promoted}]
",
    )
    .unwrap();
    let stored = groups
        .create(&PostParams::default(), &written)
        .await
        .unwrap();
    assert_eq!(stored.spec, written.spec);
}

#[tokio::test]
async fn of_two_operators_one_leads_and_the_other_takes_over_only_when_the_lease_expires() {
    let cluster = shop().await;
    let timings = LeaseTimings::default();
    let elector = |client, who| Elector::new(client, "shop", "coalmine-operator", who, timings);
    let a = elector(cluster.client(), "operator-a");
    let b = elector(cluster.new_client().await.unwrap(), "operator-b");
    let t0 = Timestamp::now();
    let at = |secs: i64| {
        t0.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
            .unwrap()
    };
    // Both try at once: the API server lets exactly one write the lease.
    let (ra, rb) = tokio::join!(a.try_once(at(0)), b.try_once(at(0)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.is_none() != rb.is_none(),
        "exactly one leads: {ra:?} {rb:?}"
    );
    let (leader, other, other_name) = if ra.is_none() {
        (&a, &b, "operator-b")
    } else {
        (&b, &a, "operator-a")
    };
    let leader_name = leader.identity().to_string();
    // The leader renews; the other waits while the lease is fresh.
    assert_eq!(leader.try_once(at(3)).await.unwrap(), None);
    assert_eq!(
        other.try_once(at(10)).await.unwrap(),
        Some(leader_name.clone())
    );
    // The leader dies (no more renewals): the other takes over once 8 s have passed since it
    // saw the last renewal (at 10 s, on its own clock), not before.
    assert_eq!(
        other.try_once(at(17)).await.unwrap(),
        Some(leader_name.clone())
    );
    assert_eq!(other.try_once(at(18)).await.unwrap(), None);
    assert_eq!(
        leader.try_once(at(19)).await.unwrap(),
        Some(other_name.to_string()),
        "the old leader sees the new one and does not lead"
    );
    // A clean shutdown gives the lease up at once.
    other.release().await.unwrap();
    assert_eq!(leader.try_once(at(20)).await.unwrap(), None);
}
