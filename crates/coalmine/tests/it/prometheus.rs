//! Checks against real metrics and real alerts: Prometheus scraping Coalmine's routers every
//! second, the seed's queries through MetricTemplates, Alertmanager calling `coalmine serve`,
//! and providers that are down, slow or answering garbage.

use crate::common;

use std::time::{Duration, Instant};

use common::daemon::*;
use common::promstack::*;
use common::stub::*;
use common::*;

fn examples(path: &str) -> String {
    let full = format!("{}/../../examples/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(full).unwrap()
}

/// Each check of the last analysis in a `run --output json` log: (name, value, verdict).
fn last_readings(run: &RunResult) -> Vec<(String, Option<f64>, String)> {
    let line = run
        .lines
        .iter()
        .rev()
        .find(|l| l["metrics"].as_array().is_some_and(|m| !m.is_empty()))
        .expect("a status with metrics");
    line["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["value"].as_f64(),
                m["verdict"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn fixture(path: &str) -> String {
    let full = format!("{}/../../tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(full).unwrap()
}

/// A stable and a canary upstream (the canary failing `error_rate` of requests), a router
/// carrying all traffic to stable, and a real Prometheus scraping it every second with the
/// target label `service=payment-service`, up and scraped before this returns.
struct Stack {
    stable: Upstream,
    canary: Upstream,
    router: Router,
    prometheus: Prometheus,
}

async fn stack(
    error_rate: &str,
    extra_scrape: Vec<ScrapeTarget>,
    rules: Vec<(String, String)>,
    alertmanager: Option<String>,
) -> Stack {
    let stable = upstream("v1", &[]);
    let canary = upstream("v2", &["--error-rate", error_rate, "--seed", "7"]);
    let router = router(&["--stable", &stable.url]);
    let mut scrape = vec![
        ScrapeTarget::new("coalmine-router", &router.admin).label("service", "payment-service")
    ];
    scrape.extend(extra_scrape);
    let prometheus = Prometheus::start_scraping(PrometheusSetup {
        scrape,
        rule_files: rules,
        alertmanager,
        ..PrometheusSetup::default()
    })
    .await;
    Stack {
        stable,
        canary,
        router,
        prometheus,
    }
}

/// The example templates, pointed at this test's Prometheus.
fn templates(prometheus: &Prometheus) -> String {
    examples("prometheus/metric-templates.yaml").replace("http://127.0.0.1:9090", &prometheus.url)
}

/// The template checks decide here: the sequential judges (which would catch this canary
/// first) are off.
const SEED_CHECKS: &str = "    interval: 2s
    threshold: 2
    stepWeights: [20, 50]
    sequential: {enabled: false}
    metrics:
      - name: error-rate
        templateRef: {name: error-rate}
        thresholdRange: {max: 0.01}
        interval: 10s
      - name: latency-p95
        templateRef: {name: latency-p95}
        thresholdRange: {max: 0.5}
        interval: 10s
";

/// `coalmine run` of a Rollout with the seed's checks (the example templates) against a stack
/// whose canary fails `error_rate` of requests, with users sending traffic meanwhile.
async fn seed_checks_run(
    error_rate: &str,
    test: &str,
) -> (Stack, RunResult, Vec<String>, (u64, u64)) {
    let s = stack(error_rate, vec![], vec![], None).await;
    let traffic = users(&s.router, 2);
    let rollout = write_rollout(
        test,
        &rollout_yaml(
            "payment-service",
            &s.router,
            &s.stable,
            &s.canary,
            SEED_CHECKS,
        ),
    );
    let templates_file = write_rollout(&format!("{test}-templates"), &templates(&s.prometheus));
    let run = coalmine_run(&rollout, &[&templates_file]).await;
    let users = traffic.stop().await;
    let log = messages(&run);
    println!(
        "{:.1} s, users: {} ok, {} failed\n{}",
        run.seconds,
        users.0,
        users.1,
        log.join("\n")
    );
    (s, run, log, users)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_queries_through_templates_roll_back_a_failing_canary() {
    let (s, run, log, _) = seed_checks_run("0.2", "prom-fail").await;
    assert_eq!(run.code, 1, "rolled back exits 1: {}", run.stderr);
    // Each failed check names the query's value against the bound.
    let halts: Vec<&String> = log
        .iter()
        .filter(|m| m.contains("Halt advancement"))
        .collect();
    assert_eq!(halts.len(), 2, "{log:#?}");
    assert!(
        halts
            .iter()
            .all(|m| m.contains("error-rate: ") && m.contains("> 0.01 (max)")),
        "{halts:#?}"
    );
    assert!(log.iter().any(|m| m.contains("Rolling back")), "{log:#?}");
    assert!(!log.iter().any(|m| m.contains("Promotion")), "{log:#?}");
    // The canary's own error rate: not the seed's self-divided query (1.0), nor a rate blended
    // with stable's (0.2 x 20 % = 0.04). Its 10 s window holds at least 100 canary requests
    // (two users at 20 % give about 20/s even on a loaded machine), so the binomial standard
    // deviation is at most 0.04, and 0.2 +- 3.5 of those (a 1 in 4,000 miss) is 0.06..0.34.
    let error_rate = last_readings(&run)[0].1.expect("error rate value");
    assert!(
        (0.06..0.35).contains(&error_rate),
        "canary fails 20 %: {error_rate}"
    );
    let routes = get_json(&format!("{}/routes", s.router.admin)).await;
    assert_eq!(routes["canaryWeight"], 0.0, "{routes}");

    // Why the example does not use the seed's error-rate query as written: it divides each 5xx
    // series by itself (one-to-one matching on every label, `status` included).
    let seed = fixture("seed/promql-queries.txt")
        .lines()
        .find(|l| l.starts_with("rate(") && l.contains(" / "))
        .unwrap()
        .replace("[5m]", "[1m]");
    let samples = s.prometheus.query_vector(&seed).await;
    assert!(!samples.is_empty(), "{seed}");
    for sample in &samples {
        assert!(sample.labels["status"].starts_with('5'), "{sample:?}");
        assert_eq!(
            sample.value, 1.0,
            "the seed's form reads 100 % errors: {sample:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_queries_through_templates_promote_a_healthy_canary() {
    let (s, run, log, (_, failed)) = seed_checks_run("0", "prom-ok").await;
    assert_eq!(run.code, 0, "promoted exits 0: {}", run.stderr);
    assert_eq!(failed, 0);
    assert!(
        log.iter().any(|m| m.contains("Promotion completed")),
        "{log:#?}"
    );
    // Zero errors read as 0 (not "no data"): the corrected query's `or vector(0)` at work.
    let readings = last_readings(&run);
    assert_eq!(readings[0].1, Some(0.0), "{readings:?}");
    let p95 = readings[1].1.unwrap();
    assert!(p95 > 0.0 && p95 < 0.5, "p95 {p95} s");
    let routes = get_json(&format!("{}/routes", s.router.admin)).await;
    assert_eq!(routes["stable"], s.canary.url.as_str(), "{routes}");
}

/// A Prometheus that answers nothing within the provider's timeout.
fn slow_prometheus() -> String {
    stub(|_| {
        (
            Duration::from_secs(4),
            response("200 OK", "application/json", "{}"),
        )
    })
    .0
}

/// A server answering 200 with something that is not Prometheus' JSON.
fn garbage_prometheus() -> String {
    stub(|_| {
        (
            Duration::ZERO,
            response("200 OK", "text/html", "<html>It works!</html>"),
        )
    })
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_slow_or_garbage_fails_checks_with_reasons_and_never_promotes() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    let down = format!("http://127.0.0.1:{}", free_port());
    let (slow, garbage) = (slow_prometheus(), garbage_prometheus());
    let metric = |name: &str, address: &str| {
        format!(
            "      - name: {name}
        query: sum(rate(http_requests_total[1m]))
        provider: {{type: prometheus, address: '{address}', timeout: 1s}}
        thresholdRange: {{max: 1}}
"
        )
    };
    let analysis = format!(
        "    interval: 1s
    threshold: 2
    stepWeights: [10, 50]
    metrics:
{}{}{}",
        metric("down", &down),
        metric("slow", &slow),
        metric("garbage", &garbage)
    );
    let file = write_rollout(
        "prom-broken",
        &rollout_yaml("checkout", &router, &v1, &v2, &analysis),
    );
    let run = coalmine_run(&file, &[]).await;
    let log = messages(&run);
    println!("{:.1} s\n{}", run.seconds, log.join("\n"));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!log.iter().any(|m| m.contains("Promotion")), "{log:#?}");
    let halt = log
        .iter()
        .find(|m| m.contains("Halt advancement"))
        .expect("a failed check");
    for reason in [
        "down: prometheus http://127.0.0.1:",
        "connection refused",
        "slow: prometheus",
        "no answer within 1s",
        "garbage: prometheus",
        "not Prometheus' JSON",
        "It works!",
    ] {
        assert!(halt.contains(reason), "{reason:?} missing from {halt}");
    }
    // Each check's own verdict is in the status too.
    let verdicts: Vec<String> = last_readings(&run).into_iter().map(|r| r.2).collect();
    assert_eq!(verdicts, ["fail", "fail", "fail"]);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["canary"], serde_json::Value::Null, "{routes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_provider_posts_with_headers_and_reads_its_number_by_jsonpath() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    let (quality, requests) = stub(|_| {
        (
            Duration::ZERO,
            response(
                "200 OK",
                "application/json",
                r#"{"data": [{"version": "stable", "errorRate": 0.001}, {"version": "canary", "errorRate": "0.07"}]}"#,
            ),
        )
    });
    let templates_text = format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: MetricTemplate
metadata: {{name: quality}}
spec:
  provider:
    type: web
    address: {quality}/v1/quality?service={{{{ service }}}}
    method: POST
    headers: {{X-Api-Key: secret-1}}
    body: '{{\"window\": \"{{{{ interval }}}}\", \"env\": \"{{{{ variables.env }}}}\"}}'
  query: $.data[?(@.version == 'canary')].errorRate
"
    );
    let analysis = "    interval: 1s
    threshold: 2
    stepWeights: [10, 50]
    metrics:
      - name: canary-error-rate
        templateRef: {name: quality}
        templateVariables: {env: prod}
        interval: 30s
        thresholdRange: {max: 0.05}
";
    let rollout = write_rollout(
        "web",
        &rollout_yaml("checkout", &router, &v1, &v2, analysis),
    );
    let templates_file = write_rollout("web-templates", &templates_text);
    let run = coalmine_run(&rollout, &[&templates_file]).await;
    let log = messages(&run);
    println!("{}", log.join("\n"));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        log.iter()
            .any(|m| m.contains("canary-error-rate: 0.07 > 0.05 (max)")),
        "{log:#?}"
    );
    let first = requests
        .recv_timeout(Duration::from_secs(1))
        .expect("the provider was asked");
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/v1/quality?service=checkout");
    assert_eq!(first.header("x-api-key"), Some("secret-1"));
    assert_eq!(first.body, r#"{"window": "30s", "env": "prod"}"#);
}

/// The seed's alert rule, as written but for a shorter `for`, evaluated by a real Prometheus.
fn seed_rules() -> (String, String) {
    let rules = fixture("seed/prometheus-canary-rules.yaml").replace("for: 2m", "for: 1s");
    assert!(rules.contains("for: 1s"));
    ("canary-rules.yaml".to_string(), rules)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_through_alertmanager_rolls_back_the_matching_rollout_at_once() {
    let dir = scratch("alerts");
    let daemon = serve(&dir);
    let receiver = format!("{}/api/v1/alertmanager", daemon.api);
    let alertmanager =
        tokio::task::spawn_blocking(move || Alertmanager::start(&receiver, Some(TOKEN)))
            .await
            .unwrap();
    let daemon_target = ScrapeTarget::new("coalmine-daemon", &daemon.api);
    let s = stack(
        "0.2",
        vec![daemon_target],
        vec![seed_rules()],
        Some(alertmanager.address()),
    )
    .await;
    let traffic = users(&s.router, 2);
    // Lenient checks, slow steps, no sequential judges: only the alert can end this early.
    let analysis = "    interval: 2s
    threshold: 5
    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80, 90]
    sequential: {enabled: false}
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 50}
        interval: 10s
    rollbackOnAlerts:
      - alertname: CanaryHighErrorRate
        service: payment-service
";
    let file = dir.join("rollout.yaml");
    std::fs::write(
        &file,
        rollout_yaml("payment-service", &s.router, &s.stable, &s.canary, analysis),
    )
    .unwrap();
    let (code, out) = cli(&daemon, &["apply", file.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 0, "{out}");

    // Without the token the receiver refuses and nothing changes.
    let payload = serde_json::json!({
        "version": "4", "status": "firing", "receiver": "coalmine", "groupKey": "{}:{}",
        "alerts": [{"status": "firing", "labels": {"alertname": "CanaryHighErrorRate", "service": "payment-service"}, "annotations": {}}]
    });
    let url = format!("{}/api/v1/alertmanager", daemon.api);
    let refused = client().post(&url).json(&payload).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    // An alert for another service matches nothing.
    let mut other = payload.clone();
    other["alerts"][0]["labels"]["service"] = "search".into();
    let answer = client()
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap()["rolledBack"],
        serde_json::json!([])
    );
    assert_eq!(status(&daemon, "payment-service")["phase"], "Progressing");

    // The real chain: router -> Prometheus (seed rule) -> Alertmanager -> coalmine serve.
    let firing = s
        .prometheus
        .wait_for_firing("CanaryHighErrorRate", Duration::from_secs(30))
        .await;
    let fired_at = Instant::now();
    println!("firing: {firing}");
    let failed = wait_for(&daemon, "payment-service", Duration::from_secs(30), |st| {
        st["phase"] == "Failed"
    });
    let reaction = fired_at.elapsed();
    let (ok, errors) = traffic.stop().await;
    let (_, history) = cli(&daemon, &["history", "payment-service"], None);
    println!("rolled back {reaction:?} after Prometheus fired; users {ok} ok, {errors} failed\n{history}");
    assert!(
        failed["canaryWeight"].as_f64().unwrap() < 90.0,
        "the alert, not the steps, ended it: {failed:#}"
    );
    assert!(
        history.contains("alert CanaryHighErrorRate firing"),
        "{history}"
    );
    assert!(history.contains("service=payment-service"), "{history}");
    assert!(history.contains("Canary error rate too high"), "{history}");
    let routes = get_json(&format!("{}/routes", s.router.admin)).await;
    assert_eq!(routes["canary"], serde_json::Value::Null, "{routes}");

    // The daemon's own metrics, as the same Prometheus scraped them.
    for series in [
        r#"coalmine_rollout_phase{rollout="payment-service",phase="Failed"}"#,
        r#"coalmine_rollout_outcomes_total{rollout="payment-service",outcome="rolled_back"}"#,
    ] {
        s.prometheus
            .wait_until(series, |v| v == 1.0, Duration::from_secs(20))
            .await;
    }
    let weight = s
        .prometheus
        .value(r#"max_over_time(coalmine_rollout_weight{rollout="payment-service"}[1m])"#)
        .await
        .unwrap();
    assert!(
        weight >= 10.0,
        "the weight rose before the rollback: {weight}"
    );
}
