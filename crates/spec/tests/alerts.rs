//! AlertProviders and a rollout's `analysis.alerts`: read fully, resolved into the rollout,
//! mistakes named at their file, line, column and field.

use coalmine_spec::alerts::{AddressFrom, AlertKind, Severity};
use coalmine_spec::documents::{load, read, Document};
use coalmine_spec::rollout::Rollout;

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

const ROLLOUT: &str = "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: checkout
spec:
  routers: [http://127.0.0.1:9901]
  stable: {url: http://127.0.0.1:9001}
  canary: {url: http://127.0.0.1:9002}
  analysis:
    interval: 1m
    stepWeights: [10, 50]
    alerts:
      - name: on-call
        severity: warn
        providerRef: {name: team-slack}
      - name: everything
        providerRef: {name: team-slack}
";

const PROVIDER: &str = "apiVersion: coalmine.dev/v1alpha1
kind: AlertProvider
metadata:
  name: team-slack
spec:
  type: slack
  channel: releases
  username: coalmine
  addressFrom: {env: SLACK_WEBHOOK}
";

fn rollout_of(set: &coalmine_spec::documents::DocumentSet) -> Rollout {
    set.rollouts()
        .find_map(|d| match &d.doc {
            Document::Rollout(r) => Some((**r).clone()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn an_alerts_provider_is_copied_into_the_rollout_without_its_address() {
    let set = load(&files(&[("r.yaml", ROLLOUT), ("p.yaml", PROVIDER)])).unwrap();
    set.require_runnable().unwrap();
    let rollout = rollout_of(&set);
    let alerts = &rollout.spec.analysis.alerts;
    assert_eq!(alerts[0].severity, Some(Severity::Warn));
    assert_eq!(alerts[1].severity, None, "info by default");
    let provider = alerts[0].provider.as_ref().expect("resolved");
    assert_eq!(provider.kind, AlertKind::Slack);
    assert_eq!(provider.channel.as_deref(), Some("releases"));
    assert_eq!(
        provider.address_from,
        Some(AddressFrom::Env("SLACK_WEBHOOK".into()))
    );
    // Self-contained: the stored rollout reads back with its provider, and names no secret.
    let stored = serde_json::to_string(&rollout).unwrap();
    let back: Rollout = serde_json::from_str(&stored).unwrap();
    assert_eq!(back, rollout);
    assert!(stored.contains("SLACK_WEBHOOK") && !stored.contains("hooks.slack.com"));
}

#[test]
fn an_unknown_provider_ref_is_an_error_at_the_reference_when_running() {
    let (set, errors) = read(&files(&[("r.yaml", ROLLOUT)]));
    assert!(errors.is_empty(), "check reads it: {errors:?}");
    assert!(
        set.warnings
            .iter()
            .any(|w| w.contains("AlertProvider \"team-slack\"")),
        "{:?}",
        set.warnings
    );
    let err = set.require_runnable().unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.line, err.column),
        ("r.yaml", 15, 22),
        "{err}"
    );
    assert_eq!(err.field, "spec.analysis.alerts[0].providerRef");
    assert!(
        err.message
            .contains("\"team-slack\" is not in the files given"),
        "{err}"
    );
}

#[test]
fn address_from_takes_exactly_one_source_and_says_so_at_its_position() {
    let both = PROVIDER.replace(
        "addressFrom: {env: SLACK_WEBHOOK}",
        "addressFrom: {env: SLACK_WEBHOOK, file: /run/secrets/slack}",
    );
    let err = load(&files(&[("p.yaml", &both)])).unwrap_err();
    assert_eq!((err.file.as_str(), err.line), ("p.yaml", 9), "{err}");
    assert_eq!(err.field, "spec.addressFrom");
    assert!(err.message.contains("exactly one of `file`"), "{err}");
}

#[test]
fn a_type_coalmine_does_not_send_to_is_refused_naming_the_field() {
    let dingtalk = PROVIDER.replace("type: slack", "type: dingtalk");
    let err = load(&files(&[("p.yaml", &dingtalk)])).unwrap_err();
    assert_eq!((err.line, err.field.as_str()), (6, "spec.type"), "{err}");
    assert!(err.message.contains("not one Coalmine sends to"), "{err}");
    let typo = PROVIDER.replace("type: slack", "type: slak");
    let err = load(&files(&[("p.yaml", &typo)])).unwrap_err();
    assert!(err.message.contains("did you mean slack?"), "{err}");
}

#[test]
fn a_flagger_provider_with_a_secret_ref_cannot_run_off_kubernetes() {
    let flagger = "apiVersion: flagger.app/v1beta1
kind: AlertProvider
metadata:
  name: team-slack
spec:
  type: slack
  channel: releases
  secretRef:
    name: slack-url
";
    let set = load(&files(&[("r.yaml", ROLLOUT), ("p.yaml", flagger)])).unwrap();
    let err = set.require_runnable().unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.line, err.field.as_str()),
        ("p.yaml", 9, "spec.secretRef"),
        "{err}"
    );
    assert!(err.message.contains("addressFrom"), "{err}");
}

#[test]
fn an_address_written_inline_works_and_is_warned_about() {
    let inline = PROVIDER.replace(
        "addressFrom: {env: SLACK_WEBHOOK}",
        "address: https://hooks.slack.com/services/T0/B0/SECRET",
    );
    let set = load(&files(&[("r.yaml", ROLLOUT), ("p.yaml", &inline)])).unwrap();
    set.require_runnable().unwrap();
    let warning = set
        .warnings
        .iter()
        .find(|w| w.contains("spec.address is a secret"))
        .expect("warned");
    assert!(warning.starts_with("p.yaml:4"), "{warning}");
    assert!(!warning.contains("SECRET"), "{warning}");
}

#[test]
fn the_example_providers_are_read_and_serve_the_alerts_the_example_names() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/notifications/alert-providers.yaml"
    );
    let providers = std::fs::read_to_string(path).unwrap();
    let rollout = ROLLOUT
        .replacen("{name: team-slack}", "{name: on-call}", 1)
        .replacen("{name: team-slack}", "{name: releases-slack}", 1);
    let set = load(&files(&[
        ("r.yaml", &rollout),
        ("alert-providers.yaml", &providers),
    ]))
    .unwrap();
    set.require_runnable().unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let alerts = rollout_of(&set).spec.analysis.alerts;
    let kinds: Vec<AlertKind> = alerts
        .iter()
        .map(|a| a.provider.as_ref().unwrap().kind)
        .collect();
    assert_eq!(kinds, [AlertKind::MsTeams, AlertKind::Slack]);
}
