//! `coalmine run` end to end: real router and upstream processes on 127.0.0.1, real traffic,
//! the controller moving weights through the router's admin API.

use crate::common;

use std::convert::Infallible;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_20_percent_is_rolled_back_and_the_router_sends_all_to_stable() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &["--error-rate", "0.2", "--seed", "3"]);
    let router = router(&["--stable", &v1.url]);
    // Flagger's rule alone here (the sequential judges have their own test below).
    let analysis = "    interval: 2s
    threshold: 2
    stepWeights: [10, 25, 50]
    sequential: {enabled: false}
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 10s
";
    let file = write_rollout(
        "fail",
        &rollout_yaml("payment-service", &router, &v1, &v2, analysis),
    );
    let traffic = users(&router, 4);
    let run = coalmine_run(&file, &[]).await;
    let (ok, failed) = traffic.stop().await;
    eprintln!(
        "rolled back in {:.1}s; users: {ok} ok, {failed} failed",
        run.seconds
    );
    assert_eq!(run.code, 1, "{:#?}\n{}", messages(&run), run.stderr);
    let last = run.lines.last().unwrap();
    assert_eq!(last["outcome"], "rolledBack");
    assert_eq!(last["routersUpdated"], true);
    let msgs = messages(&run).join("\n");
    assert!(msgs.contains("request-success-rate"), "{msgs}");
    assert!(msgs.contains("failed 2 checks"), "{msgs}");
    // Flagger's timing at interval 2s, threshold 2: weight at T1, failures at T2 and T3,
    // rollback at T4 (8 s), plus process start-up.
    assert!(run.seconds < 12.0, "took {:.1}s", run.seconds);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["canary"], serde_json::Value::Null);
    assert_eq!(routes["stable"], v1.url.as_str());
    // Users met v2's failures only while it had its 10 % share.
    assert!(
        failed > 0 && (failed as f64) < 0.2 * 0.25 * (ok + failed) as f64,
        "{ok} ok, {failed} failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequential_judge_rolls_back_between_ticks_long_before_flaggers_rule() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &["--error-rate", "0.2", "--seed", "4"]);
    let router = router(&["--stable", &v1.url]);
    // Flagger's rule would need five failed checks 5 s apart: a rollback at T7, 35 s.
    let analysis = "    interval: 5s
    threshold: 5
    stepWeights: [10, 25, 50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 10s
";
    let file = write_rollout(
        "sequential",
        &rollout_yaml("payment-service", &router, &v1, &v2, analysis),
    );
    let traffic = users(&router, 4);
    let run = coalmine_run(&file, &[]).await;
    let (ok, failed) = traffic.stop().await;
    let msgs = messages(&run);
    eprintln!(
        "{:.1}s; users: {ok} ok, {failed} failed\n{}",
        run.seconds,
        msgs.join("\n")
    );
    assert_eq!(run.code, 1, "{msgs:#?}\n{}", run.stderr);
    let rollback = msgs
        .iter()
        .find(|m| m.contains("Rolling back"))
        .expect("a rollback");
    assert!(
        rollback.contains("Sequential test: the canary fails more often than stable"),
        "{rollback}"
    );
    assert!(rollback.contains("Bayes factor"), "{rollback}");
    // Weight 10 % at T1 (5 s); the judge needs a handful of canary failures, not five ticks.
    assert!(run.seconds < 15.0, "took {:.1}s", run.seconds);
    let halts = msgs
        .iter()
        .filter(|m| m.contains("Halt advancement"))
        .count();
    assert!(halts < 5, "{msgs:#?}");
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["canary"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_and_becomes_stable() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    let analysis = "    interval: 1s
    threshold: 2
    stepWeights: [20, 50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 5s
      - name: request-duration
        thresholdRange: {max: 500}
        interval: 5s
";
    let file = write_rollout(
        "healthy",
        &rollout_yaml("payment-service", &router, &v1, &v2, analysis),
    );
    let traffic = users(&router, 4);
    let run = coalmine_run(&file, &[]).await;
    let (ok, failed) = traffic.stop().await;
    assert_eq!(run.code, 0, "{:#?}\n{}", messages(&run), run.stderr);
    assert_eq!(failed, 0, "no user request failed during the rollout");
    assert!(ok > 100);
    let phases: Vec<&str> = run
        .lines
        .iter()
        .filter_map(|l| l["phase"].as_str())
        .collect();
    for phase in ["Progressing", "Promoting", "Finalising", "Succeeded"] {
        assert!(phases.contains(&phase), "{phases:?}");
    }
    assert_eq!(canary_weights(&run), vec![20.0, 50.0]);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(
        routes["stable"],
        v2.url.as_str(),
        "the new version is stable now"
    );
    assert_eq!(routes["canary"], serde_json::Value::Null);
}

/// A webhook receiver: answers 200 when `open`, 403 otherwise, and keeps every body.
struct Gate {
    url: String,
    open: Arc<AtomicBool>,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn gate() -> Gate {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/gate", listener.local_addr().unwrap());
    let open = Arc::new(AtomicBool::new(false));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let (o, b) = (open.clone(), bodies.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (o, b) = (o.clone(), b.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (o, b) = (o.clone(), b.clone());
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            b.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            let status = if o.load(Relaxed) { 200 } else { 403 };
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Gate { url, open, bodies }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_promotion_holds_in_waiting_promotion_until_the_gate_opens() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    let gate = gate().await;
    let analysis = format!(
        "    interval: 500ms
    threshold: 2
    stepWeights: [50]
    webhooks:
      - name: release-manager
        type: confirm-promotion
        url: {}
        timeout: 2s
        metadata: {{ticket: REL-42}}
",
        gate.url
    );
    let file = write_rollout(
        "gate",
        &rollout_yaml("payment-service", &router, &v1, &v2, &analysis),
    );
    let run = tokio::spawn(async move { coalmine_run(&file, &[]).await });
    // Closed for 3 s: the rollout must wait at 50 %, not promote and not fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["canaryWeight"], 50.0);
    assert_eq!(routes["canary"], v2.url.as_str());
    let asked = gate.bodies.lock().unwrap().len();
    assert!(asked >= 3, "the gate is asked every interval ({asked})");
    gate.open.store(true, Relaxed);
    let run = run.await.unwrap();
    assert_eq!(run.code, 0, "{:#?}", messages(&run));
    let msgs = messages(&run).join("\n");
    assert!(
        msgs.contains(
            "\"WaitingPromotion\" Halt: confirm-promotion release-manager (answered 403)"
        ),
        "{msgs}"
    );
    let body = gate.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["name"], "payment-service");
    assert_eq!(body["namespace"], "default");
    assert_eq!(body["metadata"]["ticket"], "REL-42");
    assert!(body["phase"].is_string() && body["checksum"].as_str().is_some_and(|c| c.len() == 16));
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v2.url.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_router_holds_the_rollout_and_rolls_back_at_the_deadline() {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let mut router = router(&["--stable", &v1.url]);
    let text = rollout_yaml(
        "payment-service",
        &router,
        &v1,
        &v2,
        "    interval: 500ms
    threshold: 5
    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80, 90]
",
    )
    .replace("  analysis:", "  progressDeadlineSeconds: 2\n  analysis:");
    let file = write_rollout("unreachable", &text);
    let run = tokio::spawn(async move { coalmine_run(&file, &[]).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    router.proc.child.kill().unwrap();
    let run = run.await.unwrap();
    assert_eq!(run.code, 1, "{:#?}", messages(&run));
    let msgs = messages(&run).join("\n");
    assert!(msgs.contains("Holding weight: traffic:"), "{msgs}");
    assert!(msgs.contains("progressDeadlineSeconds"), "{msgs}");
    assert_eq!(run.lines.last().unwrap()["routersUpdated"], false);
}

#[test]
fn invalid_rollouts_exit_2_with_file_line_column_and_field() {
    let file = write_rollout(
        "invalid",
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: x
spec:
  routers: [http://127.0.0.1:1]
  stable: {url: http://127.0.0.1:2}
  canary: {url: http://127.0.0.1:3}
  analysis:
    interval: 1m
    stepWieght: 10
",
    );
    let out = Command::new(BIN).args(["run", &file]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{file}:11:5: spec.analysis")),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `stepWeight`?"), "{stderr}");
}

#[test]
fn a_rollout_without_its_canary_only_simulates_and_run_says_so() {
    let file = write_rollout(
        "no-canary",
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata: {name: x}
spec:
  routers: [http://127.0.0.1:1]
  stable: {url: http://127.0.0.1:2}
  analysis: {interval: 1m, stepWeights: [5, 50]}
",
    );
    let out = Command::new(BIN).args(["run", &file]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("spec.canary"), "{stderr}");
}

/// `coalmine demo` with these flags: its exit code, and its stdout.
fn demo(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).arg("demo").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{stdout}{stderr}"))
}

fn last_json_line(out: &str) -> serde_json::Value {
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The seed's payment-service Canary (tests/fixtures/seed/flagger-payment-service.yaml).
fn seed_canary() -> String {
    format!(
        "{}/../../tests/fixtures/seed/flagger-payment-service.yaml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn the_demo_rolls_back_the_bad_v2_by_the_sequential_test_long_before_flaggers_rule_would() {
    let (code, out) = demo(&["--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let summary = last_json_line(&out);
    assert_eq!(summary["outcome"], "rolledBack", "{summary}");
    assert_eq!(summary["rolledBackBySequentialTest"], true, "{summary}");
    assert_eq!(summary["routerErrors"], 0, "{summary}");
    let errors = &summary["sequential"]["errors"];
    assert_eq!(errors["rejected"], true, "{summary}");

    // The analysis is the seed's Canary's (its load-test webhook aside: the demo sends traffic).
    let analysis = &summary["analysis"];
    assert_eq!(analysis["interval"], "2m", "{summary}");
    assert_eq!(analysis["threshold"], 3, "{summary}");
    assert_eq!(analysis["stepWeight"], 10.0, "{summary}");
    assert_eq!(analysis["maxWeight"], 50.0, "{summary}");
    assert_eq!(
        analysis["metrics"],
        serde_json::json!([
            {"name": "request-success-rate", "interval": "1m", "thresholdRange": {"min": 99.5}},
            {"name": "request-duration", "interval": "1m", "thresholdRange": {"max": 1000.0}},
        ]),
        "{summary}"
    );
    // Its one change, the first step at once, is said.
    assert!(
        summary["demoOnly"]
            .as_str()
            .unwrap()
            .contains("first step (to 10 %) comes at once"),
        "{summary}"
    );

    // Flagger's rule on these settings, tick by tick (interval 2m, threshold 3): the first step
    // comes at the tick one interval in; the checks at the next three ticks each fail (10 % of
    // 500s over 1m against min 99.5); the tick after the third failure rolls back. So 4
    // intervals after v2's first request, 5 after the rollout's start.
    let (interval_s, threshold) = (120.0, 3.0);
    let flagger = &summary["flagger"];
    assert_eq!(flagger["decision"], "rolledBack", "{summary}");
    assert_eq!(flagger["firstV2RequestSeconds"], interval_s, "{summary}");
    assert_eq!(
        flagger["detectionSeconds"],
        (threshold + 1.0) * interval_s,
        "{summary}"
    );
    assert_eq!(
        flagger["decidedSeconds"],
        (threshold + 2.0) * interval_s,
        "{summary}"
    );
    // Meanwhile v2 gets 10 % of the demo's rate, and fails 10 % of that.
    let rps = summary["rps"].as_f64().unwrap();
    let expected_v2 = rps * 0.10 * (threshold + 1.0) * interval_s;
    let flagger_v2 = flagger["v2Requests"].as_f64().unwrap();
    let flagger_failed = flagger["v2Failures"].as_f64().unwrap();
    assert!(
        (flagger_v2 - expected_v2).abs() < 0.05 * expected_v2,
        "{flagger_v2} vs {expected_v2}"
    );
    assert!(
        (flagger_failed - 0.1 * flagger_v2).abs() < 0.15 * 0.1 * flagger_v2,
        "{flagger_failed} of {flagger_v2}"
    );

    // The sequential test decided before Flagger's rule could even run its first check, and
    // users met far fewer of v2's failures.
    let measured = summary["detectionSeconds"].as_f64().unwrap();
    assert!(measured > 0.0 && measured < interval_s, "{summary}");
    assert!(
        summary["v2Failures"].as_f64().unwrap() < flagger_failed,
        "{summary}"
    );

    // The simulator says the same for the seed's own file on the demo's traffic.
    let scenario = &flagger["scenario"];
    assert_eq!(scenario["traffic"]["rps"], rps, "{summary}");
    assert_eq!(scenario["stable"]["errorRate"], 0.0, "{summary}");
    assert_eq!(scenario["canary"]["errorRate"], 0.1, "{summary}");
    let dir = TempDir::new("demo");
    let scenario_file = dir.write("scenario.yaml", &scenario.to_string());
    let seed = flagger["seed"].to_string();
    let out = Command::new(BIN)
        .args(["simulate", &seed_canary(), "--scenario"])
        .arg(&scenario_file)
        .args(["--runs", "1", "--seed", &seed, "--compare", "flagger"])
        .args(["--output", "json"])
        .output()
        .unwrap();
    let simulated = last_json_line(&String::from_utf8_lossy(&out.stdout));
    let simulated = &simulated["flagger"];
    assert_eq!(
        simulated["detectionSeconds"]["p50"], flagger["detectionSeconds"],
        "{simulated}"
    );
    assert_eq!(
        simulated["canaryRequests"]["p50"], flagger_v2,
        "{simulated}"
    );
    assert_eq!(
        simulated["canaryFailures"]["p50"], flagger_failed,
        "{simulated}"
    );

    // The text output says both, with the same simulated numbers.
    let (code, text) = demo(&[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("by the sequential test"), "{text}");
    let said = format!(
        "Flagger's rule with these settings (interval 2m, threshold 3) would have rolled back 8m after v2's first request (10m after the rollout started, its first step 2m in) — by then about {} requests would have reached v2 and {} failed",
        thousands(flagger_v2 as u64),
        thousands(flagger_failed as u64),
    );
    assert!(text.contains(&said), "{said}\n{text}");
    assert!(text.contains("demo only: the first step"), "{text}");
}

/// 9612 → "9,612".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn the_demo_promotes_a_healthy_v2_on_a_short_interval_and_says_so() {
    let (code, out) = demo(&["--scenario", "healthy", "--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let summary = last_json_line(&out);
    assert_eq!(summary["outcome"], "promoted", "{summary}");
    assert_eq!(summary["routerErrors"], 0, "{summary}");
    assert_eq!(summary["v2Failures"], 0, "{summary}");
    assert_eq!(summary["analysis"]["interval"], "2s", "{summary}");
    assert!(
        summary["demoOnly"]
            .as_str()
            .unwrap()
            .contains("the interval is 2s, not the seed's 2m"),
        "{summary}"
    );
    // No rollback, so nothing to compare with Flagger's rule.
    assert!(summary["flagger"].is_null(), "{summary}");
    assert!(summary["detectionSeconds"].is_null(), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_canary_is_judged_on_its_answers_to_the_copies() {
    // Blue-green with mirroring (Flagger's dark launch): users only ever reach v1, the canary
    // answers copies, and those answers are its observations.
    let analysis = "    interval: 1s
    threshold: 2
    iterations: 3
    mirror: true
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 2s
";
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    let file = write_rollout(
        "mirror-ok",
        &rollout_yaml("mirrored", &router, &v1, &v2, analysis),
    );
    let traffic = users(&router, 4);
    // Three 1-second iterations: well within 60 s unless the analysis holds for want of data.
    let run = tokio::time::timeout(Duration::from_secs(60), coalmine_run(&file, &[]))
        .await
        .expect("the mirrored rollout held instead of progressing");
    let (_, failed) = traffic.stop().await;
    assert_eq!(run.code, 0, "{:#?}\n{}", messages(&run), run.stderr);
    assert_eq!(failed, 0);
    let msgs = messages(&run).join("\n");
    assert!(msgs.contains("Advance canary iteration 3/3"), "{msgs}");
    let st = stats(&router).await;
    assert!(st["mirror"]["requests"].as_u64().unwrap() > 0, "{st}");

    // A canary failing half its copies is rolled back, and no user saw a failure.
    let v3 = upstream("v3", &["--error-rate", "0.5"]);
    let second = common::router(&["--stable", &v1.url]);
    let file = write_rollout(
        "mirror-bad",
        &rollout_yaml("mirrored", &second, &v1, &v3, analysis),
    );
    let traffic = users(&second, 4);
    let run = coalmine_run(&file, &[]).await;
    let (ok, failed) = traffic.stop().await;
    assert_eq!(run.code, 1, "{:#?}\n{}", messages(&run), run.stderr);
    assert_eq!(failed, 0, "{ok} ok, {failed} failed");
    let last = run.lines.last().unwrap();
    assert_eq!(last["outcome"], "rolledBack");
}
