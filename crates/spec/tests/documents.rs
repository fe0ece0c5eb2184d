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
    assert!(
        matches!(&r.spec.canary, Some(Target::Command { command, .. }) if command[2] == "{port}")
    );
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

const TEMPLATED_ROLLOUT: &str = "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata: {name: payment-service, namespace: shop}
spec:
  routers: [http://127.0.0.1:9901]
  stable: {url: http://127.0.0.1:9001}
  canary: {url: http://127.0.0.1:9002}
  analysis:
    interval: 10s
    threshold: 2
    stepWeights: [5, 50]
    metrics:
      - name: error-rate
        templateRef: {name: error-rate}
        thresholdRange: {max: 0.01}
        interval: 30s
        templateVariables: {version: canary}
";

const ERROR_RATE_TEMPLATE: &str = "apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata: {name: error-rate}
spec:
  provider:
    type: prometheus
    address: http://127.0.0.1:9090
    headers: {X-Scope-OrgID: [tenant-1]}
  query: |
    (sum(rate(http_requests_total{service=\"{{ service }}\",namespace=\"{{namespace}}\",status=~\"5..\",version=\"{{ variables.version }}\"}[{{ interval }}])) or vector(0))
    / sum(rate(http_requests_total{service=\"{{ service }}\",version=\"{{ variables.version }}\"}[{{ interval }}]))
";

fn metric_of(set: &coalmine_spec::documents::DocumentSet) -> coalmine_spec::rollout::MetricCheck {
    match &set.rollouts().next().unwrap().doc {
        Document::Rollout(r) => r.spec.analysis.metrics[0].clone(),
        Document::Canary(c) => c.spec.analysis.metrics[0].clone(),
        _ => unreachable!(),
    }
}

#[test]
fn a_template_from_another_file_is_resolved_into_the_check() {
    let set = load(&[
        ("rollout.yaml".to_string(), TEMPLATED_ROLLOUT.to_string()),
        (
            "templates.yaml".to_string(),
            ERROR_RATE_TEMPLATE.to_string(),
        ),
    ])
    .unwrap();
    set.require_templates().unwrap();
    let check = metric_of(&set);
    let provider = check.provider.expect("provider copied from the template");
    assert_eq!(provider.kind, "prometheus");
    assert_eq!(provider.address.as_deref(), Some("http://127.0.0.1:9090"));
    assert_eq!(provider.headers["X-Scope-OrgID"].values(), ["tenant-1"]);
    let query = check.query.unwrap();
    assert!(
        query.contains(
            r#"service="payment-service",namespace="shop",status=~"5..",version="canary"}[30s]"#
        ),
        "{query}"
    );
    assert!(!query.contains("{{"), "{query}");
}

#[test]
fn running_without_the_template_file_is_an_error_at_the_reference() {
    let set = load(&one("rollout.yaml", TEMPLATED_ROLLOUT)).unwrap();
    let err = set.require_templates().unwrap_err();
    assert_eq!(err.file, "rollout.yaml");
    assert_eq!(
        (err.line, err.field.as_str()),
        (14, "spec.analysis.metrics[0].templateRef")
    );
    assert!(
        err.message.contains("pass the file that defines it"),
        "{err}"
    );
}

#[test]
fn template_mistakes_point_into_the_template_file() {
    let missing_var = TEMPLATED_ROLLOUT.replace(
        "templateVariables: {version: canary}",
        "templateVariables: {}",
    );
    let err = load(&[
        ("rollout.yaml".to_string(), missing_var),
        (
            "templates.yaml".to_string(),
            ERROR_RATE_TEMPLATE.to_string(),
        ),
    ])
    .unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.line, err.field.as_str()),
        ("templates.yaml", 10, "spec.query")
    );
    assert!(
        err.message
            .contains("add `version` to the metric's templateVariables"),
        "{err}"
    );

    let datadog = ERROR_RATE_TEMPLATE.replace("type: prometheus", "type: datadog");
    let err = load(&[
        ("rollout.yaml".to_string(), TEMPLATED_ROLLOUT.to_string()),
        ("templates.yaml".to_string(), datadog),
    ])
    .unwrap_err();
    assert_eq!((err.line, err.field.as_str()), (6, "spec.provider.type"));
    assert!(err.message.contains("`prometheus` and `web`"), "{err}");
}

#[test]
fn a_web_template_needs_a_valid_jsonpath() {
    let web = "apiVersion: coalmine.dev/v1alpha1
kind: MetricTemplate
metadata: {name: error-rate}
spec:
  provider:
    type: web
    address: http://127.0.0.1:8080/quality?service={{ service }}
    method: POST
    body: '{\"window\": \"{{ interval }}\"}'
  query: $.data[?(@.version == 'canary')].errorRate
";
    let set = load(&[
        ("rollout.yaml".to_string(), TEMPLATED_ROLLOUT.to_string()),
        ("web.yaml".to_string(), web.to_string()),
    ])
    .unwrap();
    let check = metric_of(&set);
    let provider = check.provider.unwrap();
    assert_eq!(
        provider.address.as_deref(),
        Some("http://127.0.0.1:8080/quality?service=payment-service")
    );
    assert_eq!(provider.body.as_deref(), Some(r#"{"window": "30s"}"#));

    let broken = web.replace(
        "query: $.data[?(@.version == 'canary')].errorRate",
        "query: data.errorRate",
    );
    let err = load(&[
        ("rollout.yaml".to_string(), TEMPLATED_ROLLOUT.to_string()),
        ("web.yaml".to_string(), broken),
    ])
    .unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.field.as_str()),
        ("web.yaml", "spec.query")
    );
    assert!(err.message.contains("JSONPath"), "{err}");
}

#[test]
fn a_canary_inline_query_goes_to_its_metrics_server() {
    let canary = "apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: web}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web-deploy}
  service: {port: 80, name: web-svc}
  metricsServer: http://127.0.0.1:9090
  analysis:
    interval: 30s
    threshold: 5
    stepWeight: 10
    maxWeight: 50
    metrics:
      - name: errors
        query: sum(rate(http_requests_total{service=\"{{ service }}\",target=\"{{ target }}\"}[1m]))
        thresholdRange: {max: 1}
";
    let set = load(&one("c.yaml", canary)).unwrap();
    let check = metric_of(&set);
    assert_eq!(
        check.provider.unwrap().address.as_deref(),
        Some("http://127.0.0.1:9090")
    );
    assert_eq!(
        check.query.unwrap(),
        r#"sum(rate(http_requests_total{service="web-svc",target="web-deploy"}[1m]))"#
    );
    let without_server = canary.replace("  metricsServer: http://127.0.0.1:9090\n", "");
    let err = load(&one("c.yaml", &without_server)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.metrics[0].provider");
}

#[test]
fn an_empty_alert_matcher_is_refused() {
    let text = ROLLOUT.replace(
        "    metrics:\n",
        "    rollbackOnAlerts: [{}]\n    metrics:\n",
    );
    let err = load(&one("r.yaml", &text)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.rollbackOnAlerts[0]");
}

#[test]
fn sequential_settings_out_of_range_are_refused_at_the_field() {
    for (setting, field) in [
        ("{alpha: 0}", "spec.analysis.sequential.alpha"),
        (
            "{latencyTolerance: -0.1}",
            "spec.analysis.sequential.latencyTolerance",
        ),
        (
            "{quantiles: [0.5, 1.5]}",
            "spec.analysis.sequential.quantiles[1]",
        ),
    ] {
        let text = ROLLOUT.replace(
            "    metrics:\n",
            &format!("    sequential: {setting}\n    metrics:\n"),
        );
        let err = load(&one("r.yaml", &text)).unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }
}
