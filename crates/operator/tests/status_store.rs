//! A Rollout's status as the state store (real API server with `KUBEBUILDER_ASSETS`, else the
//! fake): a step is written whole and read back to resume; its events become Events; a status
//! that cannot be written is an error (the driver holds), never a silent loss.

use coalmine_controller::state::StateStore;
mod common;

use coalmine_kube_fake::install_crds;
use coalmine_operator::crd::{crds_yaml, Rollout};
use coalmine_operator::seams::status_store::RolloutStatusStore;
use coalmine_rollout::{Event, EventLevel, Machine, Phase, Plan};
use common::{shop, ROLLOUT};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

#[tokio::test]
async fn a_step_is_written_whole_read_back_and_told_as_events() {
    let cluster = shop().await;
    let client = cluster.client();
    install_crds(&client, &crds_yaml()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(client.clone(), "shop");
    let rollout: Rollout = serde_saphyr::from_str(ROLLOUT).unwrap();
    let rollout = api.create(&PostParams::default(), &rollout).await.unwrap();
    let document = rollout.to_document();
    let mut store =
        RolloutStatusStore::new(client.clone(), &rollout, document.clone(), "operator-a");
    assert_eq!(
        store.load().await.unwrap(),
        None,
        "a new rollout has no state"
    );

    let spec = &document.spec;
    let plan = Plan::new(&spec.analysis, spec.progress_deadline_seconds, false);
    let machine = Machine::new(plan, 1_800_000_000_000);
    let status = machine.status().clone();
    let event = Event {
        time_ms: 1_800_000_000_000,
        level: EventLevel::Info,
        phase: Phase::Initializing,
        weight: coalmine_spec::Weight::ZERO,
        message: "New revision detected! Scaling up payment-service.shop".into(),
    };
    store
        .save(&status, std::slice::from_ref(&event))
        .await
        .unwrap();

    // Flagger's fields, where kubectl and Flagger's dashboards read them.
    let written = api.get("payment-service").await.unwrap();
    let shown = serde_json::to_value(written.status.as_ref().unwrap()).unwrap();
    assert_eq!(shown["phase"], "Initializing", "{shown:#}");
    assert_eq!(shown["canaryWeight"], 0.0);
    assert_eq!(shown["failedChecks"], 0);
    assert_eq!(shown["conditions"][0]["type"], "Promoted");
    assert_eq!(shown["conditions"][0]["status"], "Unknown");
    assert_eq!(shown["lastTransitionTime"], "2027-01-15T08:00:00.000Z");
    assert_eq!(shown["observedGeneration"], 1);
    // And the state a new operator resumes from, whole.
    assert_eq!(store.load().await.unwrap(), Some(status.clone()));
    let fresh = RolloutStatusStore::new(client.clone(), &written, document, "operator-b");
    assert_eq!(fresh.load().await.unwrap(), Some(status.clone()));

    let events: Api<KubeEvent> = Api::namespaced(client.clone(), "shop");
    let listed = events.list(&ListParams::default()).await.unwrap();
    let ours: Vec<_> = listed
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("payment-service"))
        .collect();
    assert_eq!(ours.len(), 1, "{listed:#?}");
    assert_eq!(ours[0].reason.as_deref(), Some("Synced"));
    assert_eq!(ours[0].type_.as_deref(), Some("Normal"));
    assert_eq!(ours[0].note.as_deref(), Some(event.message.as_str()));
    assert_eq!(
        ours[0].regarding.as_ref().unwrap().kind.as_deref(),
        Some("Rollout")
    );

    // The Rollout is gone: the step is not saved, and says so.
    api.delete("payment-service", &DeleteParams::default())
        .await
        .unwrap();
    let err = store.save(&status, &[]).await.unwrap_err();
    assert!(err.to_string().contains("payment-service"), "{err}");
}

#[tokio::test]
async fn each_message_of_a_phase_is_its_own_event_and_a_repeat_counts_on_it() {
    let cluster = shop().await;
    let client = cluster.client();
    install_crds(&client, &crds_yaml()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(client.clone(), "shop");
    let rollout: Rollout = serde_saphyr::from_str(ROLLOUT).unwrap();
    let rollout = api.create(&PostParams::default(), &rollout).await.unwrap();
    let document = rollout.to_document();
    let mut store =
        RolloutStatusStore::new(client.clone(), &rollout, document.clone(), "operator-a");
    let spec = &document.spec;
    let plan = Plan::new(&spec.analysis, spec.progress_deadline_seconds, false);
    let status = Machine::new(plan, 1_800_000_000_000).status().clone();
    // The steps of one phase, as a run tells them; the hold said twice.
    let said = [
        "Advance canary weight 10",
        "Advance canary weight 20",
        "Holding weight: traffic: canary not ready",
        "Holding weight: traffic: canary not ready",
    ];
    for message in said {
        let event = Event {
            time_ms: 1_800_000_000_000,
            level: EventLevel::Info,
            phase: Phase::Progressing,
            weight: coalmine_spec::Weight::ZERO,
            message: message.into(),
        };
        store.save(&status, &[event]).await.unwrap();
    }

    // `kubectl describe` lists each message, the repeated one once with its count.
    let events: Api<KubeEvent> = Api::namespaced(client.clone(), "shop");
    let mut told: Vec<(String, i32)> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            let count = e.series.map_or(1, |s| s.count);
            (e.note.unwrap_or_default(), count)
        })
        .collect();
    told.sort();
    assert_eq!(
        told,
        [
            ("Advance canary weight 10".to_string(), 1),
            ("Advance canary weight 20".to_string(), 1),
            ("Holding weight: traffic: canary not ready".to_string(), 2),
        ]
    );
}
