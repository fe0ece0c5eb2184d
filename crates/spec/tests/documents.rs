//! Reading the users' documents: the seed's and Flagger's examples, native Rollouts, mistakes.

use coalmine_spec::documents::{load, read, Document};
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

#[test]
fn a_dark_launch_is_read_with_its_defaults_and_refused_at_the_field_when_wrong() {
    let with = |setting: &str| {
        ROLLOUT.replace(
            "    metrics:\n",
            &format!("    darkLaunch: {setting}\n    metrics:\n"),
        )
    };
    let set = load(&one("r.yaml", &with("{mirrorWeight: 20, duration: 2m}"))).unwrap();
    let Document::Rollout(rollout) = &set.rollouts().next().unwrap().doc else {
        unreachable!()
    };
    let dark = rollout.spec.analysis.dark_launch.clone().unwrap();
    assert_eq!(
        dark.mirror_weight,
        coalmine_spec::Weight::from_percent(20.0).unwrap()
    );
    assert_eq!(dark.duration.0.as_secs(), 120);
    assert_eq!(dark.min_requests, 100);
    assert_eq!(dark.latency_tolerance.0.as_millis(), 10);
    assert_eq!(dark.alpha, 0.01);
    for (setting, field) in [
        ("{mirrorWeight: 0}", "spec.analysis.darkLaunch.mirrorWeight"),
        ("{duration: 0s}", "spec.analysis.darkLaunch.duration"),
        ("{minRequests: 0}", "spec.analysis.darkLaunch.minRequests"),
        ("{alpha: 0.9}", "spec.analysis.darkLaunch.alpha"),
        ("{mirrorWeigth: 20}", "spec.analysis.darkLaunch"),
    ] {
        let err = load(&one("r.yaml", &with(setting))).unwrap_err();
        assert!(err.field.starts_with(field), "{setting}: {err}");
        assert_eq!(err.line, 18, "{setting}: {err}");
    }
    // A dark launch mirrors already, and comes before a weight step.
    let both = with("{}").replace("    threshold: 5\n", "    threshold: 5\n    mirror: true\n");
    let err = load(&one("r.yaml", &both)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.mirror", "{err}");
    let no_steps = with("{}").replace("    stepWeights: [5, 10, 25, 50]\n", "    iterations: 3\n");
    let err = load(&one("r.yaml", &no_steps)).unwrap_err();
    assert_eq!(err.field, "spec.analysis.darkLaunch", "{err}");
}

fn files(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .collect()
}

#[test]
fn rollout_and_canary_names_must_be_dns_1123_labels() {
    let long = "x".repeat(5000);
    for (written, problem) in [
        ("\"\"", "it is empty"),
        ("a/b", "'/' is not allowed"),
        ("..", "'.' is not allowed"),
        ("\"a\\0b\"", "control character \\u{0}"),
        ("\"a\\nb\"", "control character \\n"),
        (long.as_str(), "5000 characters, 63 at most"),
        ("Payment", "uppercase 'P'"),
        ("-web", "starts with '-'"),
    ] {
        let text = ROLLOUT.replace("name: payment-service", &format!("name: {written}"));
        let err = load(&one("r.yaml", &text)).unwrap_err();
        assert_eq!(
            (err.line, err.column, err.field.as_str()),
            (4, 9, "metadata.name"),
            "{written}: {err}"
        );
        assert!(err.message.contains(problem), "{written}: {err}");
        assert!(err.message.contains("DNS-1123 label"), "{err}");
        assert!(err.message.contains("Service names"), "{err}");

        let (name, canary) = fixture("seed/flagger-web-app.yaml");
        let canary = canary.replace("name: web-app\nspec", &format!("name: {written}\nspec"));
        let err = load(&one(&name, &canary)).unwrap_err();
        assert_eq!(
            (err.line, err.field.as_str()),
            (5, "metadata.name"),
            "{written}: {err}"
        );
    }
    let text = ROLLOUT.replace(
        "name: payment-service",
        "name: payment-service\n  namespace: Shop_Floor",
    );
    let err = load(&one("r.yaml", &text)).unwrap_err();
    assert_eq!((err.line, err.field.as_str()), (5, "metadata.namespace"));
    assert!(
        err.message.contains("did you mean \"shop-floor\"?"),
        "{err}"
    );
}

#[test]
fn metric_template_names_must_be_dns_1123_subdomains() {
    let dotted = ERROR_RATE_TEMPLATE.replace("{name: error-rate}", "{name: error-rate.v2}");
    let rollout = TEMPLATED_ROLLOUT.replace("{name: error-rate}", "{name: error-rate.v2}");
    load(&files(&[("r.yaml", &rollout), ("t.yaml", &dotted)])).unwrap();
    let bad = ERROR_RATE_TEMPLATE.replace("{name: error-rate}", "{name: Error_Rate}");
    let err = load(&one("t.yaml", &bad)).unwrap_err();
    assert_eq!(
        (err.line, err.field.as_str()),
        (3, "metadata.name"),
        "{err}"
    );
    assert!(err.message.contains("DNS-1123 subdomain"), "{err}");
}

#[test]
fn an_alert_provider_is_read_with_its_name() {
    let provider = "apiVersion: flagger.app/v1beta1
kind: AlertProvider
metadata: {name: on-call}
spec: {type: slack, channel: releases, address: 'https://hooks.slack.com/services/x'}
";
    let set = load(&one("p.yaml", provider)).unwrap();
    assert_eq!(set.documents[0].doc.kind(), "AlertProvider");
    assert_eq!(set.documents[0].doc.name(), "on-call");
}

#[test]
fn two_documents_of_one_name_are_an_error_naming_both_places() {
    let (set, errors) = read(&files(&[("a.yaml", ROLLOUT), ("b.yaml", ROLLOUT)]));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let err = &errors[0];
    assert_eq!(
        (err.file.as_str(), err.line, err.field.as_str()),
        ("b.yaml", 4, "metadata.name")
    );
    assert!(
        err.message
            .contains("Rollout \"payment-service\" has the same name as the Rollout at a.yaml:4"),
        "{err}"
    );
    assert_eq!(
        set.documents.len(),
        1,
        "the first stays, the second does not"
    );

    // A Canary and a Rollout of one name are two rollouts of that name.
    let (_, canary) = fixture("seed/flagger-payment-service.yaml");
    let err = load(&files(&[("r.yaml", ROLLOUT), ("c.yaml", &canary)])).unwrap_err();
    assert_eq!((err.file.as_str(), err.line), ("c.yaml", 5), "{err}");
    assert!(err.message.contains("the Rollout at r.yaml:4"), "{err}");

    let text = format!("{ERROR_RATE_TEMPLATE}---\n{ERROR_RATE_TEMPLATE}");
    let err = load(&one("t.yaml", &text)).unwrap_err();
    assert_eq!(err.line, 15, "{err}");
    assert!(
        err.message.contains(
            "MetricTemplate \"error-rate\" has the same name as the MetricTemplate at t.yaml:3"
        ),
        "{err}"
    );

    // Kubernetes keeps one name apart in two namespaces, so `check` does; Coalmine's commands
    // address rollouts by name alone, so running or applying both is refused.
    let staging = ROLLOUT.replace(
        "name: payment-service",
        "name: payment-service\n  namespace: staging",
    );
    let set = load(&files(&[("a.yaml", ROLLOUT), ("b.yaml", &staging)])).unwrap();
    assert_eq!(set.documents.len(), 2);
    let err = set.require_runnable().unwrap_err();
    assert_eq!((err.file.as_str(), err.line), ("b.yaml", 4), "{err}");
    assert!(err.message.contains("by name alone"), "{err}");
}

#[test]
fn a_template_is_found_in_the_rollouts_namespace_when_several_share_its_name() {
    let in_ns = |ns: &str, address: &str| {
        ERROR_RATE_TEMPLATE
            .replace(
                "{name: error-rate}",
                &format!("{{name: error-rate, namespace: {ns}}}"),
            )
            .replace("http://127.0.0.1:9090", address)
    };
    let set = load(&files(&[
        ("rollout.yaml", TEMPLATED_ROLLOUT),
        ("other.yaml", &in_ns("other", "http://127.0.0.1:9091")),
        ("shop.yaml", &in_ns("shop", "http://127.0.0.1:9092")),
    ]))
    .unwrap();
    let provider = metric_of(&set).provider.unwrap();
    assert_eq!(provider.address.as_deref(), Some("http://127.0.0.1:9092"));
}

#[test]
fn every_document_of_every_file_is_checked_and_all_mistakes_reported() {
    let bad_name = ROLLOUT.replace("name: payment-service", "name: a/b");
    let bad_threshold = ROLLOUT
        .replace("name: payment-service", "name: other")
        .replace("threshold: 5", "threshold: five");
    let good = ROLLOUT.replace("name: payment-service", "name: fine");
    let (set, errors) = read(&files(&[
        ("one.yaml", &format!("{bad_name}---\n{good}")),
        ("two.yaml", &bad_threshold),
    ]));
    let found: Vec<(&str, u64, &str)> = errors
        .iter()
        .map(|e| (e.file.as_str(), e.line, e.field.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("one.yaml", 4, "metadata.name"),
            ("two.yaml", 13, "spec.analysis.threshold")
        ]
    );
    assert_eq!(
        errors[1].message,
        r#"expected a whole number (0 or more), got "five""#
    );
    assert_eq!(set.documents.len(), 1);
    assert_eq!(set.documents[0].doc.name(), "fine");
}

#[test]
fn a_bad_regex_in_a_match_is_reported_as_written() {
    let text = ROLLOUT.replace("x-canary: {exact: 'true'}", "user-id: {regex: '^(1|2'}");
    let err = load(&one("r.yaml", &text)).unwrap_err();
    assert_eq!(
        (err.line, err.field.as_str()),
        (17, "spec.analysis.match[0].headers.user-id.regex"),
        "{err}"
    );
    assert_eq!(
        err.message,
        r#"invalid regex "^(1|2": unclosed group (at character 2)"#
    );
}

#[test]
fn ports_out_of_range_are_refused_wherever_a_document_has_an_address() {
    for (from, to, field) in [
        (
            "stable: {url: http://127.0.0.1:9001}",
            "stable: {url: http://127.0.0.1:99999}",
            "spec.stable.url",
        ),
        (
            "routers: [http://127.0.0.1:9901]",
            "routers: [http://127.0.0.1:0]",
            "spec.routers[0]",
        ),
        (
            "url: http://127.0.0.1:8089/",
            "url: http://127.0.0.1:80890/",
            "spec.analysis.webhooks[0].url",
        ),
        (
            "routers: [http://127.0.0.1:9901]",
            "router: {listen: '127.0.0.1:70000'}",
            "spec.router.listen",
        ),
    ] {
        let text = ROLLOUT.replace(from, to);
        let err = load(&one("r.yaml", &text)).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains("out of range"), "{err}");
    }
    let template = ERROR_RATE_TEMPLATE.replace("127.0.0.1:9090", "127.0.0.1:123456");
    let err = load(&files(&[
        ("rollout.yaml", TEMPLATED_ROLLOUT),
        ("t.yaml", &template),
    ]))
    .unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.field.as_str()),
        ("t.yaml", "spec.provider.address")
    );
    assert!(err.message.contains("port 123456 is out of range"), "{err}");
}

#[test]
fn other_kubernetes_kinds_are_notes_and_shapeless_documents_errors() {
    let set = load(&[fixture("seed/k8s-native.yaml")]).unwrap();
    assert!(set.documents.is_empty());
    let seen: Vec<(u64, &str, &str)> = set
        .notes
        .iter()
        .map(|n| (n.line, n.kind.as_str(), n.name.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (3, "Deployment", "web-app-stable"),
            (23, "Deployment", "web-app-canary"),
            (43, "Service", "web-app")
        ]
    );
    assert!(
        set.notes[0]
            .to_string()
            .starts_with("seed/k8s-native.yaml:3: Deployment web-app-stable: not read by Coalmine"),
        "{}",
        set.notes[0]
    );
    assert!(
        set.notes[2].message.contains("http://web-app:80"),
        "{}",
        set.notes[2]
    );

    let others = "apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web}
spec: {maxReplicas: 5}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
apiVersion: argoproj.io/v1alpha1
kind: Rollout
metadata: {name: web}
";
    let set = load(&one("k.yaml", others)).unwrap();
    let kinds: Vec<&str> = set.notes.iter().map(|n| n.kind.as_str()).collect();
    assert_eq!(kinds, ["HorizontalPodAutoscaler", "ConfigMap", "Rollout"]);
    assert!(
        set.notes[2].message.contains("Argo Rollouts"),
        "{}",
        set.notes[2]
    );

    for (text, field, says) in [
        (
            "replicas: 3\nimage: web\n",
            "apiVersion",
            "missing apiVersion",
        ),
        (
            "apiVersion: v1\nmetadata: {name: x}\n",
            "kind",
            "missing kind",
        ),
        (
            "apiVersion: coalmine.dev/v1alpha1\nkind: Rolout\nmetadata: {name: x}\n",
            "kind",
            "did you mean Rollout?",
        ),
        (
            "apiVersion: coalmine.dev/v1alpa1\nkind: Rollout\nmetadata: {name: x}\n",
            "apiVersion",
            "did you mean coalmine.dev/v1alpha1?",
        ),
        (
            "apiVersion: apps/v1\nkind: Canary\nmetadata: {name: x}\n",
            "apiVersion",
            "a Canary has apiVersion flagger.app/v1beta1",
        ),
        (
            "apiVersion: my app\nkind: Thing\nmetadata: {name: x}\n",
            "apiVersion",
            "not a Kubernetes apiVersion",
        ),
    ] {
        let err = load(&one("x.yaml", text)).unwrap_err();
        assert_eq!(err.field, field, "{text}: {err}");
        assert!(err.message.contains(says), "{text}: {err}");
    }
}

#[test]
fn istio_documents_get_the_routers_equivalent_written_out() {
    let set = load(&[fixture("seed/istio-user.yaml")]).unwrap();
    let note = &set.notes[0];
    assert_eq!(
        (note.kind.as_str(), note.name.as_str(), note.line),
        ("VirtualService", "web-app", 3)
    );
    let header_rule = &note.equivalents[0];
    assert!(
        header_rule.starts_with("http[0] (line 10): "),
        "{header_rule}"
    );
    assert!(
        header_rule.contains("coalmine proxy --match 'user-id~^(1|2|3|4|5)$'"),
        "{header_rule}"
    );
    // The Rollout form is itself a valid analysis.match.
    let written = header_rule.split("analysis.match: ").nth(1).unwrap();
    let matches: Vec<coalmine_spec::rollout::HttpMatch> =
        coalmine_spec::parse_yaml("note", written).unwrap();
    assert_eq!(
        matches[0].headers["user-id"],
        coalmine_spec::rollout::StringMatch::Regex("^(1|2|3|4|5)$".into())
    );
    assert!(note.equivalents[1].contains("--stable URL"), "{note}");

    let set = load(&[fixture("seed/istio-weighted.yaml")]).unwrap();
    let (service, rule) = (&set.notes[0], &set.notes[1]);
    assert!(
        service.equivalents[0].contains("--match canary=true"),
        "{service}"
    );
    assert!(
        service.equivalents[1].contains("subset stable 95 %, subset canary 5 %")
            && service.equivalents[1].contains("--canary-weight 5")
            && service.equivalents[1].contains("stepWeights: [5, ...]"),
        "{service}"
    );
    assert_eq!(rule.kind, "DestinationRule");
    assert!(
        rule.equivalents[0].contains("subset stable")
            && rule.equivalents[0].contains("spec.stable.url"),
        "{rule}"
    );
    assert!(
        rule.equivalents[1].contains("subset canary")
            && rule.equivalents[1].contains("spec.canary.url"),
        "{rule}"
    );

    // A condition the router cannot match is named, and no narrower rule is offered for it.
    let uri = "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: api}
spec:
  http:
    - match: [{uri: {prefix: /v2}, headers: {x-beta: {exact: '1'}}}]
      route: [{destination: {host: api-canary}}]
";
    let set = load(&one("vs.yaml", uri)).unwrap();
    let line = &set.notes[0].equivalents[0];
    assert!(line.contains("uri cannot be matched"), "{line}");
    assert!(!line.contains("--match"), "{line}");
}

#[test]
fn prometheus_rules_point_to_rollback_on_alerts() {
    let set = load(&[fixture("seed/prometheus-canary-rules.yaml")]).unwrap();
    let note = &set.notes[0];
    assert_eq!((note.kind.as_str(), note.line), ("Prometheus rule file", 2));
    assert!(note.message.contains("rollbackOnAlerts"), "{note}");
    assert!(note.message.contains("Alerts roll back"), "{note}");
    assert_eq!(
        note.equivalents,
        ["alert CanaryHighErrorRate (group canary, line 5): rollbackOnAlerts: [{alertname: CanaryHighErrorRate}]"]
    );

    let operator = "apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata: {name: canary-rules}
spec:
  groups:
    - name: canary
      rules:
        - record: job:errors:rate5m
          expr: sum(rate(http_requests_total{status=~\"5..\"}[5m]))
        - alert: CanaryHighLatency
          expr: vector(1)
";
    let set = load(&one("pr.yaml", operator)).unwrap();
    let note = &set.notes[0];
    assert_eq!(note.name, "canary-rules");
    assert_eq!(
        note.equivalents,
        ["alert CanaryHighLatency (group canary, line 10): rollbackOnAlerts: [{alertname: CanaryHighLatency}]"]
    );
}

/// The ROLLOUT above as a member named `name` stepping through `steps`.
fn member(name: &str, steps: &str) -> String {
    ROLLOUT
        .replace("name: payment-service", &format!("name: {name}"))
        .replace(
            "stepWeights: [5, 10, 25, 50]",
            &format!("stepWeights: {steps}"),
        )
}

#[test]
fn a_groups_members_share_its_cohort_and_its_mistakes_are_named_where_they_are() {
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  members:
    - name: ledger
    - name: payments
";
    let files = vec![
        ("group.yaml".to_string(), group.to_string()),
        ("ledger.yaml".to_string(), member("ledger", "[5, 50]")),
        ("payments.yaml".to_string(), member("payments", "[5, 50]")),
    ];
    let set = load(&files).unwrap();
    let rollouts = set.placed_rollouts(None).unwrap();
    let cohorts: Vec<&str> = rollouts.iter().map(|r| r.cohort()).collect();
    assert_eq!(cohorts, ["group/payment-change", "group/payment-change"]);

    let mistake = |group_text: &str, payments_steps: &str| {
        let files = vec![
            ("group.yaml".to_string(), group_text.to_string()),
            ("ledger.yaml".to_string(), member("ledger", "[5, 50]")),
            (
                "payments.yaml".to_string(),
                member("payments", payments_steps),
            ),
        ];
        load(&files).unwrap_err()
    };
    let e = mistake(
        &group.replace("- name: payments", "- name: paymnets"),
        "[5, 50]",
    );
    assert_eq!(
        (e.file.as_str(), e.line, e.column),
        ("group.yaml", 8, 13),
        "{e}"
    );
    assert_eq!(e.field, "spec.members[1].name");
    assert!(e.message.contains("did you mean \"payments\""), "{e}");

    let e = mistake(group, "[10, 50]");
    assert_eq!(
        (e.line, e.field.as_str()),
        (8, "spec.members[1].name"),
        "{e}"
    );
    assert!(e.message.contains("the same weight steps"), "{e}");

    let ordered = group.replace(
        "  members:\n    - name: ledger\n    - name: payments\n",
        "  policy: order\n  members:\n    - name: payments\n      dependsOn: [{name: ledger, reached: 50}]\n    - name: ledger\n",
    );
    let e = mistake(&ordered, "[10, 50]");
    assert_eq!(e.field, "spec.members[0].dependsOn[0].name", "{e}");
    assert!(e.message.contains("listed before"), "{e}");

    let unreachable = ordered.replace(
        "    - name: payments\n      dependsOn: [{name: ledger, reached: 50}]\n    - name: ledger\n",
        "    - name: ledger\n    - name: payments\n      dependsOn: [{name: ledger, reached: 40}]\n",
    );
    let e = mistake(&unreachable, "[10, 50]");
    assert_eq!(e.field, "spec.members[1].dependsOn[0].reached", "{e}");
    assert!(e.message.contains("never stops at 40 %"), "{e}");
}

#[test]
fn a_groups_members_pin_users_with_one_cookie_of_their_release() {
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  members: [{name: ledger}, {name: payments}]
";
    let pinned = |name: &str, affinity: &str, canary: &str| {
        member(name, "[5, 50]")
            .replace(
                "    threshold: 5\n",
                &format!("    threshold: 5\n{affinity}"),
            )
            .replace("./payment-service", canary)
    };
    let cookie = "    sessionAffinity: {cookieName: shop-canary}\n";
    let files = |payments_affinity: &str, payments_canary: &str, group: &str| {
        vec![
            ("group.yaml".to_string(), group.to_string()),
            (
                "ledger.yaml".to_string(),
                pinned("ledger", cookie, "./ledger-v2"),
            ),
            (
                "payments.yaml".to_string(),
                pinned("payments", payments_affinity, payments_canary),
            ),
        ]
    };
    let release_of = |files: Vec<(String, String)>| {
        let rollouts = load(&files).unwrap().placed_rollouts(None).unwrap();
        let releases: Vec<Option<String>> = rollouts
            .iter()
            .map(|r| r.group_release().map(str::to_string))
            .collect();
        assert_eq!(releases[0], releases[1], "one release for every member");
        releases[0].clone()
    };
    let release = release_of(files(cookie, "./payments-v2", group)).expect("a release");
    // A new canary of one member is a new release of the group; the same canaries are the same.
    assert_ne!(
        Some(release.clone()),
        release_of(files(cookie, "./payments-v3", group))
    );
    assert_eq!(
        Some(release),
        release_of(files(cookie, "./payments-v2", group))
    );
    // Members keeping cohorts of their own have no release to share.
    let apart = group.replace("spec:\n", "spec:\n  sharedCohort: false\n");
    assert_eq!(release_of(files(cookie, "./payments-v2", &apart)), None);
    assert!(load(&files(
        "    sessionAffinity: {cookieName: other}\n",
        "x",
        &apart
    ))
    .is_ok());
    // Members pinning nobody need no release: their documents stay as they were.
    let plain = |name: &str| (format!("{name}.yaml"), pinned(name, "", "./v2"));
    let rollouts = load(&[
        ("group.yaml".to_string(), group.to_string()),
        plain("ledger"),
        plain("payments"),
    ])
    .unwrap()
    .placed_rollouts(None)
    .unwrap();
    assert!(rollouts
        .iter()
        .all(|r| r.group_release().is_none() && r.cohort() == "group/payment-change"));

    // One cookie or none: another name, another lifetime, or none at all is refused, where
    // the member says it.
    let e = load(&files(
        "    sessionAffinity: {cookieName: payments-canary}\n",
        "./payments-v2",
        group,
    ))
    .unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.column, e.field.as_str()),
        (
            "payments.yaml",
            14,
            35,
            "spec.analysis.sessionAffinity.cookieName"
        ),
        "{e}"
    );
    assert!(e.message.contains("\"shop-canary\""), "{e}");
    let e = load(&files(
        "    sessionAffinity: {cookieName: shop-canary, maxAge: 60}\n",
        "./payments-v2",
        group,
    ))
    .unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.field.as_str()),
        ("payments.yaml", "spec.analysis.sessionAffinity.maxAge"),
        "{e}"
    );
    assert!(e.message.contains("86400 s"), "{e}");
    let e = load(&files("", "./payments-v2", group)).unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.field.as_str()),
        ("payments.yaml", 12, "spec.analysis"),
        "{e}"
    );
    assert!(e.message.contains("no sessionAffinity"), "{e}");
}

#[test]
fn the_group_example_is_read_as_three_members_in_order() {
    let path = format!(
        "{}/../../examples/groups/payment-change.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let set = load(&one("payment-change.yaml", &text)).unwrap();
    let group = set.groups().next().expect("the group");
    let order: Vec<&str> = group.spec.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(order, ["ledger", "payments", "orders"]);
    let rollouts = set.placed_rollouts(None).unwrap();
    assert!(rollouts
        .iter()
        .all(|r| r.cohort() == "group/payment-change"));
    let services: Vec<&str> = rollouts.iter().map(|r| r.spec.router_service()).collect();
    assert_eq!(services, ["ledger", "payments", "orders"]);
}
