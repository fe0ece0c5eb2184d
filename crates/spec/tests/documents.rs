//! Reading the users' documents: the seed's and Flagger's examples, native Rollouts, mistakes.

use coalmine_spec::documents::{load, Document};
use coalmine_spec::rollout::{HookKind, Target};

fn fixture(path: &str) -> (String, String) {
    let full = format!("{}/../../tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    (path.to_string(), std::fs::read_to_string(full).unwrap())
}

fn one(name: &str, text: &str) -> Vec<(String, String)> {
    vec![(name.to_string(), text.to_string())]
}

const ROLLOUT: &str = "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: payment-service
spec:
  routers: [http://127.0.0.1:9901]
  stable: {url: http://127.0.0.1:9001}
  canary:
    command: [./payment-service, --port, '{port}']
    readiness: {path: /healthz, timeout: 30s}
  analysis:
    interval: 1m
    threshold: 5
    stepWeights: [5, 10, 25, 50]
    match:
      - headers:
          x-canary: {exact: 'true'}
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 1m
      - name: request-duration
        thresholdRange: {max: 500}
        interval: 30s
    webhooks:
      - name: load-test
        type: rollout
        url: http://127.0.0.1:8089/
        timeout: 5s
        metadata: {cmd: 'hey -z 1m -q 10 -c 2 http://127.0.0.1:8080/'}
";

#[test]
fn every_flagger_example_is_read() {
    for path in [
        "seed/flagger-payment-service.yaml",
        "seed/flagger-web-app.yaml",
        "flagger/istio-canary.yaml",
        "flagger/linkerd-canary.yaml",
        "flagger/linkerd-canary-steps.yaml",
    ] {
        let set = load(&[fixture(path)]).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(set.documents[0].doc, Document::Canary(_)),
            "{path}"
        );
    }
    let set = load(&[fixture("seed/flagger-payment-service.yaml")]).unwrap();
    let Document::Canary(c) = &set.documents[0].doc else {
        unreachable!()
    };
    assert_eq!(c.spec.analysis.threshold, Some(3));
    assert_eq!(c.spec.analysis.webhooks[0].kind, HookKind::Rollout);
}

#[test]
fn the_issue_rollout_is_read_with_its_command_target() {
    let set = load(&one("r.yaml", ROLLOUT)).unwrap();
    let Document::Rollout(r) = &set.documents[0].doc else {
        panic!("not a rollout")
    };
    assert!(matches!(&r.spec.canary, Target::Command { command, .. } if command[2] == "{port}"));
    assert_eq!(r.spec.analysis.step_weights.len(), 4);
    assert_eq!(r.spec.progress_deadline_seconds, 600);
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
}

#[test]
fn errors_in_later_documents_report_the_files_own_line() {
    let text = format!(
        "{ROLLOUT}---\n{}",
        ROLLOUT.replace("threshold: 5", "threshold: lots")
    );
    let err = load(&one("two.yaml", &text)).unwrap_err();
    let line = ROLLOUT.lines().count() as u64 + 1 + 13;
    assert_eq!(
        (err.line, err.field.as_str()),
        (line, "spec.analysis.threshold"),
        "{err}"
    );
}

#[test]
fn rules_between_fields_are_reported_at_the_field() {
    let bad = ROLLOUT.replace("stepWeights: [5, 10, 25, 50]", "stepWeights: [5, 25, 10]");
    let err = load(&one("r.yaml", &bad)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.stepWeights[2]");
    assert_eq!(err.line, 14, "{err}");
    assert!(err.message.contains("must rise"), "{err}");

    let both = ROLLOUT.replace("threshold: 5", "threshold: 5\n    stepWeight: 10");
    let err = load(&one("r.yaml", &both)).unwrap_err();
    assert!(
        err.message.contains("either stepWeights or stepWeight"),
        "{err}"
    );

    let unknown = ROLLOUT.replace("name: request-duration", "name: error-budget");
    let err = load(&one("r.yaml", &unknown)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.metrics[1]");
    assert!(err.message.contains("templateRef"), "{err}");
}

#[test]
fn native_mistakes_name_the_field_and_suggest_the_nearest() {
    let typo = ROLLOUT.replace("thresholdRange: {min: 99}", "tresholdRange: {min: 99}");
    let err = load(&one("r.yaml", &typo)).unwrap_err();
    assert_eq!(err.line, 20, "{err}");
    assert!(
        err.message.contains("did you mean `thresholdRange`?"),
        "{err}"
    );

    let hook = ROLLOUT.replace("type: rollout", "type: confirm-promotoin");
    let err = load(&one("r.yaml", &hook)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.webhooks[0].type");
    assert!(
        err.message.contains("did you mean `confirm-promotion`?"),
        "{err}"
    );

    let version = ROLLOUT.replace("coalmine.dev/v1alpha1", "coalmine.dev/v1");
    let err = load(&one("r.yaml", &version)).unwrap_err();
    assert_eq!((err.line, err.field.as_str()), (1, "apiVersion"), "{err}");
}

#[test]
fn a_template_in_another_file_is_a_warning_not_an_error() {
    let canary = "apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: web}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  analysis:
    interval: 30s
    threshold: 5
    stepWeight: 10
    maxWeight: 50
    metrics:
      - name: error-rate
        templateRef: {name: error-rate, namespace: istio-system}
        thresholdRange: {max: 1}
";
    let set = load(&one("c.yaml", canary)).unwrap();
    assert_eq!(set.warnings.len(), 1);
    assert!(
        set.warnings[0].contains("MetricTemplate \"error-rate\""),
        "{:?}",
        set.warnings
    );

    let template = "apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata: {name: error-rate}
spec:
  provider: {type: prometheus, address: 'http://127.0.0.1:9090'}
  query: sum(rate(http_requests_total{status=~\"5..\"}[{{ interval }}]))
";
    let set = load(&[
        ("c.yaml".to_string(), canary.to_string()),
        ("t.yaml".to_string(), template.to_string()),
    ])
    .unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    assert!(set.template("error-rate").is_some());
}
