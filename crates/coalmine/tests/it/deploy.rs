//! The monitoring files users deploy (`deploy/`): the Prometheus rules and their unit tests, the
//! example Prometheus and Alertmanager configurations, and the Grafana dashboard, checked with
//! Debian's `promtool` (package `prometheus`, which scripts/test installs) and, when it is there,
//! `amtool` (package `prometheus-alertmanager`).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use common::{printed, TempDir};

/// Every metric the routers and the daemon export that the rules and the dashboard may read.
const KNOWN_METRICS: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "http_request_duration_seconds_sum",
    "http_request_duration_seconds_count",
    "coalmine_router_upstream_failures_total",
    "coalmine_router_canary_weight_ratio",
    "coalmine_router_route_generation",
    "coalmine_rollout_weight",
    "coalmine_rollout_phase",
    "coalmine_rollout_failed_checks",
    "coalmine_rollout_metric_value",
    "coalmine_rollout_outcomes_total",
    "coalmine_rollout_duration_seconds_bucket",
    "coalmine_rollout_duration_seconds_sum",
    "coalmine_rollout_duration_seconds_count",
];

/// Dashboard panels that must exist: a word of the title and a metric the panel must read.
const REQUIRED_PANELS: &[(&str, &str)] = &[
    ("weight", "coalmine_rollout_weight"),
    ("phase", "coalmine_rollout_phase"),
    ("failed checks", "coalmine_rollout_failed_checks"),
    ("success rate", "http_requests_total"),
    ("latency p95", "http_request_duration_seconds_bucket"),
    ("latency p99", "http_request_duration_seconds_bucket"),
    ("request rate", "http_requests_total"),
    ("outcomes", "coalmine_rollout_outcomes_total"),
    ("duration", "coalmine_rollout_duration_seconds"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn deploy_file(relative: &str) -> PathBuf {
    let path = deploy_dir().join(relative);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// The path of `command` (searched in PATH, then /usr/bin).
fn find_tool(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

fn promtool() -> PathBuf {
    find_tool("promtool").unwrap_or_else(|| {
        panic!(
            "`promtool` not found in PATH or /usr/bin: install Debian's `prometheus` package \
             (scripts/test installs it: apt-get install prometheus)"
        )
    })
}

/// Runs `tool args...` in `dir`, asserts it succeeded and returns what it printed.
fn run_ok(tool: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = printed(&out);
    assert!(
        out.status.success(),
        "`{} {}` (in {}) failed with {}:\n{text}",
        tool.display(),
        args.join(" "),
        dir.display(),
        out.status
    );
    text
}

/// A fresh directory under the system's temporary directory, removed on drop.
/// Identifiers (metric names, recorded names, label names, functions) in PromQL-ish text; a
/// trailing colon (a YAML key) is not part of one.
fn identifiers(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map(|w| w.trim_end_matches(':'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .collect()
}

/// The raw metric names `text` reads that the routers and the daemon do not export.
fn unknown_metrics(text: &str) -> BTreeSet<String> {
    identifiers(text)
        .into_iter()
        .filter(|w| !w.contains(':') && (w.starts_with("http_") || w.starts_with("coalmine_")))
        .filter(|w| !KNOWN_METRICS.contains(w))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prometheus rules and configuration

#[test]
fn rules_pass_promtool_check_rules() {
    let rules = deploy_file("prometheus/coalmine-rules.yaml");
    let printed = run_ok(
        &promtool(),
        &["check", "rules", rules.to_str().unwrap()],
        &deploy_dir(),
    );
    assert!(printed.contains("SUCCESS"), "{printed}");
}

#[test]
fn rules_unit_tests_pass() {
    deploy_file("prometheus/coalmine-rules.yaml");
    let tests = deploy_file("prometheus/coalmine-rules.test.yaml");
    // The test file names its rule file relative to itself; run from elsewhere to prove it.
    let elsewhere = TempDir::new("deploy");
    let printed = run_ok(
        &promtool(),
        &["test", "rules", tests.to_str().unwrap()],
        &elsewhere.path,
    );
    assert!(printed.contains("SUCCESS"), "{printed}");
}

#[test]
fn rules_define_the_documented_alerts_with_labels_and_annotations() {
    let text = fs::read_to_string(deploy_file("prometheus/coalmine-rules.yaml")).unwrap();
    let tests = fs::read_to_string(deploy_file("prometheus/coalmine-rules.test.yaml")).unwrap();
    for alert in [
        "CanaryHighErrorRate",
        "CanaryHighLatency",
        "CanaryErrorRateAboveStable",
        "CoalmineRolloutStuck",
        "CoalmineRolloutFailed",
    ] {
        let start = text
            .find(&format!("- alert: {alert}\n"))
            .unwrap_or_else(|| panic!("coalmine-rules.yaml has no alert {alert}"));
        let rest = &text[start + 1..];
        let rule = &rest[..rest.find("\n      - ").unwrap_or(rest.len())];
        for needle in ["severity:", "summary:", "description:"] {
            assert!(rule.contains(needle), "{alert} lacks {needle}:\n{rule}");
        }
        // Each alert is tested both firing and silent.
        let named = format!("alertname: {alert}\n");
        assert!(
            tests.matches(&named).count() >= 2,
            "coalmine-rules.test.yaml should test {alert} firing and not firing"
        );
    }
    // Tells how a Rollout matches the alerts.
    assert!(text.contains("rollbackOnAlerts"));
}

#[test]
fn rules_read_only_exported_metrics_and_recorded_series() {
    let text = fs::read_to_string(deploy_file("prometheus/coalmine-rules.yaml")).unwrap();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let unknown = unknown_metrics(&code);
    assert!(
        unknown.is_empty(),
        "unknown metrics in the rules: {unknown:?}"
    );
    let recorded: BTreeSet<&str> = code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::trim)
        .collect();
    assert!(recorded.len() >= 4, "too few recording rules: {recorded:?}");
    for name in identifiers(&code).into_iter().filter(|w| w.contains(':')) {
        assert!(
            recorded.contains(name),
            "the rules read {name}, which no recording rule defines"
        );
    }
}

#[test]
fn example_prometheus_config_is_valid_and_loads_the_rules() {
    let config = deploy_file("prometheus/prometheus.example.yaml");
    // `rule_files` are relative to the configuration file, wherever promtool runs.
    let elsewhere = TempDir::new("deploy");
    let printed = run_ok(
        &promtool(),
        &["check", "config", config.to_str().unwrap()],
        &elsewhere.path,
    );
    assert!(
        printed.contains("1 rule files found") && printed.contains("coalmine-rules.yaml"),
        "the example configuration should load coalmine-rules.yaml:\n{printed}"
    );
    let text = fs::read_to_string(&config).unwrap();
    for needle in [
        "job_name: coalmine-router",
        "job_name: coalmine-daemon",
        "service:",
    ] {
        assert!(
            text.contains(needle),
            "prometheus.example.yaml lacks {needle}"
        );
    }
}

#[test]
fn example_alertmanager_config_is_valid() {
    let config = deploy_file("alertmanager/alertmanager.example.yaml");
    let text = fs::read_to_string(&config).unwrap();
    for needle in [
        "url: http://COALMINE_API/api/v1/alertmanager",
        "send_resolved: false",
        "type: Bearer",
        "credentials_file:",
        "group_wait:",
    ] {
        assert!(
            text.contains(needle),
            "alertmanager.example.yaml lacks {needle}"
        );
    }
    match find_tool("amtool") {
        Some(amtool) => {
            let printed = run_ok(
                &amtool,
                &["check-config", config.to_str().unwrap()],
                &deploy_dir(),
            );
            assert!(printed.contains("SUCCESS"), "{printed}");
        }
        None => eprintln!(
            "amtool not found (Debian package prometheus-alertmanager): \
             alertmanager.example.yaml checked only for its contents"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana dashboard

fn dashboard() -> Value {
    let path = deploy_file("grafana/coalmine-dashboard.json");
    let text = fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or_default()
}

/// Every (panel title, refId, expr) of the dashboard.
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    panels(dashboard)
        .into_iter()
        .filter(|p| !is_row(p))
        .flat_map(|p| {
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                (
                    title(p).to_string(),
                    t["refId"].as_str().unwrap_or_default().to_string(),
                    t["expr"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect()
}

/// What a Grafana variable stands for when the dashboard's queries are checked.
fn variable_value(name: &str) -> &'static str {
    match name {
        "__rate_interval" => "1m",
        "__interval" => "15s",
        "__interval_ms" => "15000",
        "__range" => "1h",
        "__range_s" => "3600",
        "__range_ms" => "3600000",
        "rollout" | "service" => "payment-service",
        other => panic!("the dashboard uses ${other}, which this test does not know"),
    }
}

/// Replaces Grafana's `$name`, `${name}`, `${name:format}` and `[[name]]` with concrete values.
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (name, len) = if let Some(braced) = tail.strip_prefix("${") {
            let end = braced
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
            let inner = &braced[..end];
            (inner.split(':').next().unwrap(), end + 3)
        } else if let Some(bracketed) = tail.strip_prefix("[[") {
            let end = bracketed
                .find("]]")
                .unwrap_or_else(|| panic!("unclosed [[ in {expr}"));
            let inner = &bracketed[..end];
            (inner.split(':').next().unwrap(), end + 4)
        } else if let Some(plain) = tail.strip_prefix('$') {
            let end = plain
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(plain.len());
            assert!(end > 0, "a lone $ in {expr}");
            (&plain[..end], end + 1)
        } else {
            out.push('[');
            rest = &tail[1..];
            continue;
        };
        out.push_str(variable_value(name));
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

#[test]
fn substitute_replaces_every_variable_form() {
    assert_eq!(
        substitute(r#"rate(x{rollout=~"$rollout", s=~"${service:regex}"}[$__rate_interval])"#),
        r#"rate(x{rollout=~"payment-service", s=~"payment-service"}[1m])"#
    );
    assert_eq!(
        substitute(r#"increase(x{r=~"[[rollout]]"}[${__range}])"#),
        r#"increase(x{r=~"payment-service"}[1h])"#
    );
    assert_eq!(substitute("sum(x[5m:30s])"), "sum(x[5m:30s])");
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let dashboard = dashboard();
    let mut exprs: Vec<(String, String)> = queries(&dashboard)
        .into_iter()
        .map(|(title, ref_id, expr)| (format!("panel {title:?} query {ref_id}"), expr))
        .collect();
    // The variables' `label_values(metric, label)` read a metric selector too.
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let query = var["definition"].as_str().unwrap_or_default();
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            if let Some((selector, _label)) = args.rsplit_once(',') {
                exprs.push((format!("variable {}", var["name"]), selector.to_string()));
            }
        }
    }
    assert!(exprs.len() >= 10, "too few dashboard queries: {exprs:?}");

    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (what, expr)) in exprs.iter().enumerate() {
        assert!(!expr.trim().is_empty(), "{what} has no expr");
        for var in ["$rollout", "$service"] {
            // Multi-value variables expand to a regex: they belong after =~ or !~ only.
            for (at, _) in expr.match_indices(var) {
                let before = &expr[..at];
                assert!(
                    before.ends_with("=~\"") || before.ends_with("!~\""),
                    "{what} uses {var} outside a regex matcher: {expr}"
                );
            }
        }
        let unknown = unknown_metrics(expr);
        assert!(
            unknown.is_empty(),
            "{what} reads unknown metrics {unknown:?}"
        );
        // A JSON string is a valid YAML double-quoted scalar.
        let yaml_expr = serde_json::to_string(&substitute(expr)).unwrap();
        rules.push_str(&format!(
            "      # {what}\n      - record: dashboard:query_{i}\n        expr: {yaml_expr}\n"
        ));
    }
    let dir = TempDir::new("deploy");
    let file = dir.write("dashboard-queries.yaml", &rules);
    let out = Command::new(promtool())
        .args(["check", "rules", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a dashboard query is not valid PromQL:\n{}\nrules checked:\n{rules}",
        printed(&out)
    );
}

#[test]
fn dashboard_panels_have_titles_datasources_and_cover_the_rollout() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    for key in ["title", "uid"] {
        assert!(
            !dashboard[key].as_str().unwrap_or_default().is_empty(),
            "the dashboard has no {key}"
        );
    }

    let vars: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    let ds = vars.get("datasource").expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let rollout = vars.get("rollout").expect("a `rollout` variable");
    assert_eq!(rollout["type"], "query");
    assert_eq!(
        rollout["definition"],
        "label_values(coalmine_rollout_weight, rollout)"
    );
    assert_eq!(
        rollout["query"]["query"],
        "label_values(coalmine_rollout_weight, rollout)"
    );

    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let t = title(panel);
        assert!(!t.trim().is_empty(), "a panel without a title: {panel}");
        let id = panel["id"].as_u64().unwrap_or_else(|| panic!("{t}: no id"));
        assert!(ids.insert(id), "{t}: panel id {id} used twice");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24) && grid["h"].is_u64(),
            "{t}: bad gridPos {grid}"
        );
        if is_row(panel) {
            continue;
        }
        assert_eq!(
            panel["datasource"]["type"], "prometheus",
            "{t}: datasource {}",
            panel["datasource"]
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{t}");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("{t}: no targets"));
        let mut refs = BTreeSet::new();
        for target in targets {
            assert!(
                refs.insert(target["refId"].as_str().unwrap_or_default()),
                "{t}: refId used twice"
            );
            if !target["datasource"].is_null() {
                assert_eq!(target["datasource"], panel["datasource"], "{t}");
            }
        }
    }

    let queries = queries(&dashboard);
    for (word, metric) in REQUIRED_PANELS {
        assert!(
            queries
                .iter()
                .any(|(t, _, e)| t.to_lowercase().contains(word) && e.contains(metric)),
            "no panel titled like {word:?} reading {metric}; panels: {:?}",
            queries.iter().map(|(t, _, _)| t).collect::<BTreeSet<_>>()
        );
    }
}

/// The dashboard query of the panel whose title contains `title`, refId `ref_id`, substituted.
fn panel_query(dashboard: &Value, title: &str, ref_id: &str) -> String {
    let (_, _, expr) = queries(dashboard)
        .into_iter()
        .find(|(t, r, _)| t.contains(title) && r == ref_id)
        .unwrap_or_else(|| panic!("no dashboard panel {title:?} with query {ref_id}"));
    serde_json::to_string(&substitute(&expr)).unwrap()
}

#[test]
fn dashboard_queries_compute_what_their_panels_show() {
    let d = dashboard();
    let success = panel_query(&d, "Success rate", "A");
    let rate = panel_query(&d, "Request rate", "A");
    let p95 = panel_query(&d, "Latency p95", "A");
    let weight = panel_query(&d, "Canary weight", "A");
    let phase = panel_query(&d, "Phase", "A");
    let outcomes = panel_query(&d, "Outcomes", "A");
    // $service and $rollout stand for payment-service: web-app must not show.
    let tests = format!(
        r#"rule_files: [empty.yaml]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'http_requests_total{{instance="r1", service="payment-service", version="stable", status="200"}}'
        values: '0+150x40'
      - series: 'http_requests_total{{instance="r2", service="payment-service", version="stable", status="200"}}'
        values: '0+150x40'
      - series: 'http_requests_total{{instance="r1", service="payment-service", version="canary", status="200"}}'
        values: '0+27x40'
      - series: 'http_requests_total{{instance="r1", service="payment-service", version="canary", status="502"}}'
        values: '0+3x40'
      - series: 'http_requests_total{{instance="r1", service="web-app", version="canary", status="500"}}'
        values: '0+30x40'
      - series: 'http_request_duration_seconds_bucket{{service="payment-service", version="stable", le="0.025"}}'
        values: '0+0x40'
      - series: 'http_request_duration_seconds_bucket{{service="payment-service", version="stable", le="0.05"}}'
        values: '0+300x40'
      - series: 'http_request_duration_seconds_bucket{{service="payment-service", version="stable", le="+Inf"}}'
        values: '0+300x40'
      - series: 'http_request_duration_seconds_bucket{{service="payment-service", version="canary", le="0.25"}}'
        values: '0+0x40'
      - series: 'http_request_duration_seconds_bucket{{service="payment-service", version="canary", le="0.5"}}'
        values: '0+30x40'
      - series: 'http_request_duration_seconds_bucket{{service="payment-service", version="canary", le="+Inf"}}'
        values: '0+30x40'
    promql_expr_test:
      - expr: {success}
        eval_time: 5m
        exp_samples:
          - labels: '{{version="stable"}}'
            value: 1
          - labels: '{{version="canary"}}'
            value: 0.9
      - expr: {rate}
        eval_time: 5m
        exp_samples:
          - labels: '{{version="stable"}}'
            value: 20
          - labels: '{{version="canary"}}'
            value: 2
      - expr: {p95}
        eval_time: 5m
        exp_samples:
          - labels: '{{version="stable"}}'
            value: 0.04875
          - labels: '{{version="canary"}}'
            value: 0.4875
  - interval: 1m
    input_series:
      - series: 'coalmine_rollout_weight{{rollout="payment-service"}}'
        values: '0x60 10x30 20x29'
      - series: 'coalmine_rollout_phase{{rollout="payment-service", phase="Progressing"}}'
        values: '1x100 0x19'
      - series: 'coalmine_rollout_phase{{rollout="payment-service", phase="WaitingPromotion"}}'
        values: '0x100 1x19'
      - series: 'coalmine_rollout_phase{{rollout="web-app", phase="Failed"}}'
        values: '1x120'
      # payment-service: rolled back at 70m (a series that appears already at 1) and promoted
      # at 100m (2 -> 3); promoted once more before the last hour; web-app's rollback is not shown
      - series: 'coalmine_rollout_outcomes_total{{rollout="payment-service", outcome="rolled_back"}}'
        values: '_x70 1x49'
      - series: 'coalmine_rollout_outcomes_total{{rollout="payment-service", outcome="promoted"}}'
        values: '1x40 2x59 3x19'
      - series: 'coalmine_rollout_outcomes_total{{rollout="web-app", outcome="rolled_back"}}'
        values: '_x90 1x29'
    promql_expr_test:
      - expr: {weight}
        eval_time: 110m
        exp_samples:
          - labels: '{{rollout="payment-service"}}'
            value: 20
      # phases are numbered 1-9 in Flagger's order: WaitingPromotion is 5
      - expr: {phase}
        eval_time: 110m
        exp_samples:
          - labels: '{{rollout="payment-service"}}'
            value: 5
      # over the last hour ($__range = 1h)
      - expr: {outcomes}
        eval_time: 119m
        exp_samples:
          - labels: '{{outcome="promoted"}}'
            value: 1
          - labels: '{{outcome="rolled_back"}}'
            value: 1
"#
    );
    let dir = TempDir::new("deploy");
    dir.write("empty.yaml", "groups: []\n");
    let file = dir.write("dashboard.test.yaml", &tests);
    let out = Command::new(promtool())
        .args(["test", "rules", file.to_str().unwrap()])
        .current_dir(&dir.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dashboard queries computed unexpected values:\n{}\ntest file:\n{tests}",
        printed(&out)
    );
}
