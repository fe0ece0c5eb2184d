//! Feature flags over OFREP (`spec.flag`): a real OpenFeature SDK (the JavaScript server SDK
//! with its OFREP provider, pinned in `tests/fixtures/ofrep-sdk`) evaluates the flags `coalmine
//! serve` serves, against a real router stepping the same cohort.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use common::daemon::*;
use common::*;

/// The pinned SDK: `npm ci` there installs it (`scripts/test` does when it is missing).
fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ofrep-sdk")
}

/// Evaluates `key` through the OpenFeature SDK's OFREP provider once per context; each
/// result is the SDK's details (`value`, `variant`, `reason`, `errorCode`).
fn sdk_evaluate(api: &str, key: &str, default: &Value, contexts: &[Value]) -> Vec<Value> {
    let dir = sdk_dir();
    assert!(
        dir.join("node_modules/@openfeature/server-sdk").is_dir()
            && dir
                .join("node_modules/@openfeature/ofrep-provider")
                .is_dir(),
        "the OpenFeature SDK is not installed in {}: run `npm ci --prefix {}` (scripts/test does)",
        dir.display(),
        dir.display()
    );
    let mut child = Command::new("node")
        .arg(dir.join("evaluate.js"))
        .args([api, key, &default.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (Node.js 18 or later) runs the OpenFeature SDK");
    let mut input = String::new();
    for c in contexts {
        input.push_str(&c.to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "the SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), contexts.len());
    results
}

/// The served flags (`GET /api/v1/flags`).
async fn served_flags(daemon: &Daemon) -> Value {
    get_json(&format!("{}/api/v1/flags", daemon.api)).await
}

/// Waits until flag `key` serves `serving` at `percent`.
async fn wait_for_flag(daemon: &Daemon, key: &str, serving: &str, percent: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = served_flags(daemon).await;
        let found = all
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == key)
            .cloned();
        if let Some(f) = &found {
            if f["serving"] == serving && f["canaryPercent"] == percent {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flag {key} never served {serving} at {percent}%: {all:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn apply(daemon: &Daemon, dir: &TempDir, name: &str, text: &str) {
    let path = dir.write(name, text);
    let (code, out) = cli(daemon, &["apply", path.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
}

/// The web page of `tests/fixtures/ofrep-web-sdk` (OpenFeature's web SDK and its OFREP
/// provider, installed there by `npm ci`), served from an origin of its own; its URL.
fn web_page() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ofrep-web-sdk");
    assert!(
        root.join("node_modules/@openfeature/web-sdk").is_dir(),
        "npm ci --prefix {} (scripts/test does)",
        root.display()
    );
    let (url, _requests) = stub::stub(move |r| {
        let path = r.path.split('?').next().unwrap_or_default();
        let file = path.trim_start_matches('/');
        let file = if file.is_empty() { "index.html" } else { file };
        let kind = if file.ends_with(".html") {
            "text/html; charset=utf-8"
        } else {
            "text/javascript; charset=utf-8"
        };
        let body = (!file.split('/').any(|part| part == ".."))
            .then(|| std::fs::read_to_string(root.join(file)).ok())
            .flatten();
        match body {
            Some(body) => (Duration::ZERO, stub::response("200 OK", kind, &body)),
            None => (
                Duration::ZERO,
                stub::response("404 Not Found", "text/plain", ""),
            ),
        }
    });
    url
}

/// Runs `call` (an expression of the page's functions, with `arguments[0]`...) in `browser`
/// and returns what its promise resolves to. The page keeps the answer and the test polls for
/// it: the provider's failures may raise errors in the page meanwhile, which would end
/// WebDriver's asynchronous script.
async fn page_call(browser: &browser::Browser, call: &str, args: Value) -> Value {
    browser
        .run(
            &format!(
                "window.answer = undefined;
                 ({call}).then((v) => {{ window.answer = {{value: v}}; }},
                               (e) => {{ window.answer = {{thrown: String(e)}}; }});"
            ),
            args,
        )
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = browser.run("return window.answer ?? null", json!([])).await;
        if !answer.is_null() {
            assert!(answer["thrown"].is_null(), "{call}: {answer}");
            return answer["value"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{call}: no answer in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A browser page evaluates the flag with OpenFeature's web SDK, one user after another, and
/// gets the router's decision for each; its polling brings a rollback to the page; a page of
/// an origin not allowed gets nothing but its defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_in_chromium_sees_the_routers_cohort_and_a_rollback_by_polling() {
    const USERS: usize = 400;
    const PERCENT: u32 = 10;
    const POLL_MS: u64 = 1_000;
    let page = web_page();
    let other_page = web_page();
    let dir = scratch("flags-web");
    let mut command = serve_command(&dir);
    command.args(["--ofrep-allow-origin", &page]);
    let daemon = daemon_of(Proc::spawn_command(command, &["serve"]));
    let (_v1, _v2, router) = checkout_held_at(&daemon, &dir, PERCENT).await;
    let users: Vec<String> = (0..USERS).map(|i| format!("web-user-{i}")).collect();
    let routed = routed_by(&router, &users).await;

    let browser = browser::Browser::start(800, 600).await;
    browser.goto(&format!("{page}/index.html")).await;
    browser
        .wait_for_text("#ready", Duration::from_secs(10), |t| t == "ready")
        .await;
    let started = page_call(
        &browser,
        "startFlags(arguments[0], arguments[1], arguments[2])",
        json!([daemon.api, POLL_MS, users[0]]),
    )
    .await;
    assert_eq!(started["ready"], true, "{started}");
    let evaluated = page_call(
        &browser,
        "evaluateUsers(arguments[0], arguments[1])",
        json!(["new-checkout", users]),
    )
    .await;
    let evaluated = evaluated.as_array().expect("one answer a user").clone();
    assert_eq!(evaluated.len(), USERS);
    let mut mismatches = Vec::new();
    let mut canary_users = Vec::new();
    for ((user, who), e) in users.iter().zip(&routed).zip(&evaluated) {
        // The web SDK answers from the bulk evaluation it fetched: its reason is `CACHED`.
        assert!(e["errorCode"].is_null(), "{user}: {e}");
        assert_eq!(e["value"], json!(e["variant"] == "on"), "{user}: {e}");
        let flag_canary = e["variant"] == "on";
        if flag_canary != (who == "v2") {
            mismatches.push(format!("{user}: router {who}, page {e}"));
        }
        if flag_canary {
            canary_users.push(user.clone());
        }
    }
    // Binomial(400, 0.1): mean 40, sd 6; outside 5 sd fails once in ~3.5 million.
    eprintln!(
        "web SDK: {} mismatches / {USERS}; {} users on the canary at {PERCENT}% (bound 10..70)",
        mismatches.len(),
        canary_users.len()
    );
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert!((10..=70).contains(&canary_users.len()));

    // A canary user's open page: the rollback reaches it at its next poll.
    page_call(
        &browser,
        "evaluateUsers(arguments[0], arguments[1])",
        json!(["new-checkout", [canary_users[0]]]),
    )
    .await;
    let before = page_call(&browser, "watchFlag(arguments[0])", json!(["new-checkout"])).await;
    assert_eq!(before["variant"], "on", "{before}");
    let aborted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (code, out) = cli(&daemon, &["abort", "checkout"], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let deadline = std::time::Instant::now() + Duration::from_millis(POLL_MS + 5_000);
    let changed = loop {
        let changes = browser.run("return window.flagChanges", json!([])).await;
        if let Some(c) = changes.as_array().and_then(|c| c.last()).cloned() {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never saw the rollback"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(changed["variant"], "off", "{changed}");
    assert_eq!(changed["value"], false, "{changed}");
    let after_ms = changed["at"].as_u64().unwrap().saturating_sub(aborted_at);
    eprintln!("web SDK: the rollback reached the open page {after_ms} ms after the abort (poll {POLL_MS} ms)");
    // At most one poll, plus the rollback's own save and the answer's way back.
    assert!(after_ms <= POLL_MS + 2_000, "{after_ms} ms");

    // A page of another origin: its browser keeps Coalmine's answers from it.
    browser.goto(&format!("{other_page}/index.html")).await;
    browser
        .wait_for_text("#ready", Duration::from_secs(10), |t| t == "ready")
        .await;
    let started = page_call(
        &browser,
        "startFlags(arguments[0], arguments[1], arguments[2])",
        json!([daemon.api, POLL_MS, canary_users[0]]),
    )
    .await;
    assert_eq!(started["ready"], false, "{started}");
    let refused = page_call(
        &browser,
        "evaluateUsers(arguments[0], arguments[1])",
        json!(["new-checkout", [canary_users[0]]]),
    )
    .await;
    assert_eq!(refused[0]["value"], false, "{refused}");
    assert!(!refused[0]["errorCode"].is_null(), "{refused}");
}

/// A confirm-promotion gate nobody answers (nothing listens on port 1): the rollout holds at
/// its last weight.
const HOLD_AT_LAST_WEIGHT: &str = "    webhooks:
      - name: hold
        type: confirm-promotion
        url: http://127.0.0.1:1/
";

/// `checkout`: a rollout with flag `new-checkout` (`on` on the canary), held at `percent` %
/// on `router` (sticky by the `user-id` header).
fn checkout(router: &Router, v1: &Upstream, v2: &Upstream, percent: u32) -> String {
    format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: checkout
spec:
  routers: [{}]
  stable: {{url: {}}}
  canary: {{url: {}}}
  flag:
    key: new-checkout
    variants: {{on: true, off: false}}
    canary: on
    stable: off
  analysis:
    interval: 1s
    stepWeights: [{percent}]
    sequential: {{enabled: false}}
{HOLD_AT_LAST_WEIGHT}",
        router.admin, v1.url, v2.url
    )
}

/// `checkout` applied to `daemon` on a new router with real upstreams, once the rollout and
/// its flag hold at `percent` %: the upstreams (v1, v2) and the router.
async fn checkout_held_at(
    daemon: &Daemon,
    dir: &TempDir,
    percent: u32,
) -> (Upstream, Upstream, Router) {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url, "--sticky-header", "user-id"]);
    apply(
        daemon,
        dir,
        "checkout.yaml",
        &checkout(&router, &v1, &v2, percent),
    );
    wait_for(daemon, "checkout", Duration::from_secs(30), |s| {
        s["canaryWeight"] == f64::from(percent)
    });
    wait_for_flag(daemon, "new-checkout", "split", f64::from(percent)).await;
    (v1, v2, router)
}

/// Which version the router sent each user to (a real request each, as header `user-id`).
async fn routed_by(router: &Router, users: &[String]) -> Vec<String> {
    let url = format!("{}/", router.base);
    let c = client();
    let mut routed = vec![String::new(); users.len()];
    let mut tasks = Vec::new();
    for chunk in 0..16 {
        let (c, url, users) = (c.clone(), url.clone(), users.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (chunk..users.len()).step_by(16) {
                let r = c
                    .get(&url)
                    .header("user-id", &users[i])
                    .send()
                    .await
                    .expect("an answer through the router");
                out.push((i, who_answered(&r)));
            }
            out
        }));
    }
    for t in tasks {
        for (i, who) in t.await.unwrap() {
            routed[i] = who;
        }
    }
    routed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openfeature_sdk_sees_the_routers_cohort_for_10000_users() {
    const USERS: usize = 10_000;
    const PERCENT: u32 = 10;
    let dir = scratch("flags-cohort");
    let daemon = serve(&dir);
    let (_v1, _v2, router) = checkout_held_at(&daemon, &dir, PERCENT).await;

    // The router's decision for each user: which upstream answered a real request.
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
    let routed = routed_by(&router, &users).await;

    // The SDK's variant for the same users.
    let contexts: Vec<Value> = (0..USERS)
        .map(|i| json!({"targetingKey": format!("user-{i}")}))
        .collect();
    let evaluated = sdk_evaluate(&daemon.api, "new-checkout", &json!(false), &contexts);

    let mut mismatches = Vec::new();
    let mut canary = 0usize;
    for (i, (who, e)) in routed.iter().zip(&evaluated).enumerate() {
        assert!(who == "v1" || who == "v2", "user-{i} answered by {who}");
        assert_eq!(e["reason"], "SPLIT", "user-{i}: {e}");
        let flag_canary = e["variant"] == "on";
        assert_eq!(e["value"], json!(flag_canary), "user-{i}: {e}");
        if flag_canary != (who == "v2") {
            mismatches.push(format!("user-{i}: router {who}, flag {e}"));
        }
        canary += usize::from(flag_canary);
    }
    // Binomial(10,000, 0.1): mean 1,000, sd 30; outside 5 sd fails once in ~3.5 million.
    let (mean, sd) = (USERS as f64 * 0.1, (USERS as f64 * 0.1 * 0.9).sqrt());
    eprintln!(
        "flags: {} mismatches / {USERS}; canary {canary} / {USERS} users at weight {PERCENT}% (bound {:.0}..{:.0})",
        mismatches.len(),
        mean - 5.0 * sd,
        mean + 5.0 * sd
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    assert!(
        (canary as f64 - mean).abs() <= 5.0 * sd,
        "{canary} of {USERS} users on the canary at {PERCENT}%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_groups_see_the_canary_and_errors_have_ofreps_shapes() {
    let dir = scratch("flags-targeting");
    let mut daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url, "--sticky-header", "user-id"]);
    apply(
        &daemon,
        &dir,
        "flag.yaml",
        &format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: banner
spec:
  routers: [{}]
  stable: {{url: {}}}
  canary: {{url: {}}}
  flag:
    key: new-banner
    variants: {{blue: \"#0000ff\", grey: \"#808080\"}}
    canary: blue
    stable: grey
    targeting:
      - user-id: {{regex: \"qa-[0-9]+\"}}
      - region: {{exact: eu-west}}
        plan: {{exact: enterprise}}
  analysis:
    interval: 1s
    stepWeights: [1]
    sequential: {{enabled: false}}
{HOLD_AT_LAST_WEIGHT}",
            router.admin, v1.url, v2.url
        ),
    );
    wait_for_flag(&daemon, "new-banner", "split", 1.0).await;

    let contexts = [
        json!({"user-id": "qa-17"}),
        json!({"targetingKey": "anyone", "region": "eu-west", "plan": "enterprise"}),
        json!({"targetingKey": "anyone", "region": "eu-west", "plan": "free"}),
        json!({"user-id": "qa-x", "region": "eu-west"}),
    ];
    let got = sdk_evaluate(&daemon.api, "new-banner", &json!("default"), &contexts);
    assert_eq!(
        (&got[0]["value"], &got[0]["variant"], &got[0]["reason"]),
        (&json!("#0000ff"), &json!("blue"), &json!("TARGETING_MATCH")),
        "{got:#?}"
    );
    assert_eq!(got[1]["reason"], "TARGETING_MATCH", "{got:#?}");
    assert_eq!(got[1]["variant"], "blue", "{got:#?}");
    assert_eq!(got[2]["reason"], "SPLIT", "{got:#?}");
    // Neither rule holds and there is no key to split by: the SDK's default, with OFREP's code.
    assert_eq!(
        (&got[3]["value"], &got[3]["errorCode"]),
        (&json!("default"), &json!("TARGETING_KEY_MISSING")),
        "{got:#?}"
    );
    let missing = sdk_evaluate(
        &daemon.api,
        "no-such-flag",
        &json!(false),
        &[json!({"targetingKey": "u"})],
    );
    assert_eq!(missing[0]["errorCode"], "FLAG_NOT_FOUND", "{missing:#?}");
    assert_eq!(missing[0]["value"], false);

    // The wire shapes, status by status.
    let c = client();
    let post = |path: &str, body: &str| {
        c.post(format!("{}{path}", daemon.api))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let r = post(
        "/ofrep/v1/evaluate/flags/no-such-flag",
        r#"{"context": {"targetingKey": "u"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["key"], "no-such-flag");
    assert_eq!(body["errorCode"], "FLAG_NOT_FOUND");
    assert!(body["errorDetails"].is_string());
    for (body, code) in [
        ("{not json", "PARSE_ERROR"),
        (r#"{"context": [1, 2]}"#, "INVALID_CONTEXT"),
        (r#"{"context": {"targetingKey": 42}}"#, "INVALID_CONTEXT"),
        (r#"{"context": {"plan": "free"}}"#, "TARGETING_KEY_MISSING"),
    ] {
        let r = post("/ofrep/v1/evaluate/flags/new-banner", body)
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(
            (&answer["key"], &answer["errorCode"]),
            (&json!("new-banner"), &json!(code)),
            "{body}: {answer}"
        );
    }
    let r = post(
        "/ofrep/v1/evaluate/flags/new-banner",
        r#"{"context": {"targetingKey": "u", "user-id": "qa-1"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let one: Value = r.json().await.unwrap();
    assert_eq!(one["key"], "new-banner");
    assert_eq!(one["metadata"]["rollout"], "banner");

    // Bulk: every flag, an ETag, and 304 while nothing changed.
    let bulk_body = r#"{"context": {"targetingKey": "u", "user-id": "qa-1"}}"#;
    let r = post("/ofrep/v1/evaluate/flags", bulk_body).await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let all: Value = r.json().await.unwrap();
    assert_eq!(all["flags"][0], one, "bulk and single evaluations agree");
    let again = c
        .post(format!("{}/ofrep/v1/evaluate/flags", daemon.api))
        .header("if-none-match", &etag)
        .body(bulk_body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let other = c
        .post(format!("{}/ofrep/v1/evaluate/flags", daemon.api))
        .header("if-none-match", &etag)
        .body(r#"{"context": {"targetingKey": "u"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "another context, another answer");
    let r = post("/ofrep/v1/evaluate/flags", "{not json").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], "PARSE_ERROR");

    // Durable: after kill -9, the resumed rollout serves the share its saved traffic says.
    let split = sdk_evaluate(&daemon.api, "new-banner", &json!("default"), &split_users());
    daemon.proc.child.kill().unwrap();
    daemon.proc.child.wait().unwrap();
    let daemon = serve(&dir);
    wait_for_flag(&daemon, "new-banner", "split", 1.0).await;
    let again = sdk_evaluate(&daemon.api, "new-banner", &json!("default"), &split_users());
    assert_eq!(
        split, again,
        "the same users see the canary after a restart"
    );
    assert!(
        split.iter().any(|e| e["variant"] == "blue"),
        "some of 2,000 users at 1%"
    );
}

fn split_users() -> Vec<Value> {
    (0..2_000)
        .map(|i| json!({"targetingKey": format!("user-{i}")}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_variant_with_bad_reported_errors_rolls_back_and_everyone_sees_stable() {
    let dir = scratch("flags-counts");
    let daemon = serve(&dir);
    apply(
        &daemon,
        &dir,
        "flag.yaml",
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: pricing
spec:
  flag:
    key: new-pricing
    variants: {on: true, off: false}
    canary: on
    stable: off
  analysis:
    interval: 1s
    threshold: 2
    stepWeights: [10, 20, 50]
    sequential: {enabled: false}
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 2s
",
    );
    wait_for_flag(&daemon, "new-pricing", "split", 10.0).await;
    let c = client();
    let counts = format!("{}/api/v1/flags/new-pricing/counts", daemon.api);
    let report = json!({"variants": {
        "on": {"requests": 100, "errors": 20, "latencyMicros": [[2000, 100]]},
        "off": {"requests": 900, "errors": 0, "latencyMicros": [[2000, 900]]},
    }});
    // Counts decide rollbacks: reporting them takes the token.
    let r = c.post(&counts).json(&report).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let bad = c
        .post(&counts)
        .bearer_auth(TOKEN)
        .json(&json!({"variants": {"purple": {"requests": 1}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad
        .text()
        .await
        .unwrap()
        .contains("no variant \\\"purple\\\""));
    let reporter = tokio::spawn({
        let (c, counts, report) = (c.clone(), counts.clone(), report.clone());
        async move {
            loop {
                let r = c
                    .post(&counts)
                    .bearer_auth(TOKEN)
                    .json(&report)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let failed = wait_for(&daemon, "pricing", Duration::from_secs(30), |s| {
        s["phase"] == "Failed"
    });
    reporter.abort();
    // Judged on the reported counts: 80 of every 100 canary requests succeeded.
    assert_eq!(failed["outcome"], "rolledBack", "{failed:#}");
    assert_eq!(
        failed["metrics"][0]["name"], "request-success-rate",
        "{failed:#}"
    );
    assert_eq!(failed["metrics"][0]["value"], 80.0, "{failed:#}");
    wait_for_flag(&daemon, "new-pricing", "stable", 0.0).await;
    let contexts: Vec<Value> = (0..500)
        .map(|i| json!({"targetingKey": format!("user-{i}")}))
        .collect();
    for e in sdk_evaluate(&daemon.api, "new-pricing", &json!(true), &contexts) {
        assert_eq!(
            (&e["value"], &e["variant"], &e["reason"]),
            (&json!(false), &json!("off"), &json!("DEFAULT")),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_is_stepped_by_one_rollout_and_bad_flags_are_refused_changing_nothing() {
    let dir = scratch("flags-refused");
    let daemon = serve(&dir);
    let flag_rollout = |name: &str, key: &str| {
        format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: {name}
spec:
  flag:
    key: {key}
    variants: {{on: true, off: false}}
    canary: on
    stable: off
  analysis:
    interval: 1s
    stepWeights: [10]
{HOLD_AT_LAST_WEIGHT}"
        )
    };
    apply(
        &daemon,
        &dir,
        "first.yaml",
        &flag_rollout("first", "checkout-v2"),
    );
    wait_for_flag(&daemon, "checkout-v2", "split", 10.0).await;
    let before = served_flags(&daemon).await;

    let second = dir.write("second.yaml", &flag_rollout("second", "checkout-v2"));
    let (code, out) = cli(&daemon, &["apply", second.to_str().unwrap()], Some(TOKEN));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("feature flag \"checkout-v2\" already carries rollout \"first\""),
        "{out}"
    );
    let bad = dir.write("bad.yaml", &flag_rollout("third", "checkout v3"));
    let (code, out) = cli(&daemon, &["apply", bad.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("bad.yaml:7:10: spec.flag.key"), "{out}");
    let (_, listed) = cli(&daemon, &["status", "--output", "json"], None);
    assert!(
        !listed.contains("second") && !listed.contains("third"),
        "{listed}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served_flags(&daemon).await, before, "nothing changed");

    // `run` has nothing to serve a flag with once it exits.
    let out = Command::new(BIN)
        .args(["run", dir.join("first.yaml").to_str().unwrap()])
        .output()
        .unwrap();
    let (code, printed) = code_and_printed(&out);
    assert_eq!(code, 2, "{printed}");
    assert!(
        printed.contains("spec.flag: a feature flag is served by `coalmine serve`"),
        "{printed}"
    );
}

/// An app's per-variant series as its Prometheus client exposes them, growing since `start` at
/// `rps` requests a second per variant with the share `failing` answered 500, every request
/// taking 5–10 ms.
fn app_exporter(variants: [(&'static str, f64, f64); 2]) -> String {
    let start = std::time::Instant::now();
    let (url, _requests) = common::stub::stub(move |_| {
        let secs = start.elapsed().as_secs_f64();
        let mut text = String::from("# TYPE app_requests_total counter\n");
        let mut histogram = String::from("# TYPE app_request_duration_seconds histogram\n");
        for (variant, rps, failing) in variants {
            let total = (rps * secs).floor();
            let failed = (total * failing).floor();
            let labels = format!(r#"app="shop",variant="{variant}""#);
            text.push_str(&format!(
                "app_requests_total{{{labels},status=\"200\"}} {}\napp_requests_total{{{labels},status=\"500\"}} {failed}\n",
                total - failed
            ));
            for (le, n) in [("0.005", 0.0), ("0.01", total), ("+Inf", total)] {
                histogram.push_str(&format!(
                    "app_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n"
                ));
            }
            histogram.push_str(&format!(
                "app_request_duration_seconds_sum{{{labels}}} {}\napp_request_duration_seconds_count{{{labels}}} {total}\n",
                total * 0.0075
            ));
        }
        text.push_str(&histogram);
        (
            Duration::ZERO,
            common::stub::response("200 OK", "text/plain; version=0.0.4", &text),
        )
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_judged_on_the_apps_prometheus_series_by_variant_rolls_back() {
    use common::promstack::{Prometheus, PrometheusSetup, ScrapeTarget};
    let exporter = app_exporter([("on", 200.0, 0.2), ("off", 800.0, 0.001)]);
    let prometheus = Prometheus::start_scraping(PrometheusSetup {
        scrape: vec![ScrapeTarget::new("shop", &exporter)],
        ..PrometheusSetup::default()
    })
    .await;
    let dir = scratch("flags-series");
    let daemon = serve(&dir);
    apply(
        &daemon,
        &dir,
        "flag.yaml",
        &format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: shop-search
spec:
  flag:
    key: new-search
    variants: {{on: true, off: false}}
    canary: on
    stable: off
    prometheus:
      address: {}
      requests: app_requests_total
      duration: app_request_duration_seconds
      selector: 'app=\"shop\"'
  analysis:
    interval: 2s
    stepWeights: [10, 20, 50]
",
            prometheus.url
        ),
    );
    let failed = wait_for(&daemon, "shop-search", Duration::from_secs(60), |s| {
        s["phase"] == "Failed"
    });
    // Judged on the series by variant: `on` (the canary) fails 20 %, `off` 0.1 %.
    assert_eq!(failed["outcome"], "rolledBack", "{failed:#}");
    let errors = &failed["sequential"]["errors"];
    assert_eq!(errors["rejected"], true, "{failed:#}");
    let canary_rate = errors["canaryFailureRate"].as_f64().unwrap();
    let stable_rate = errors["stableFailureRate"].as_f64().unwrap();
    assert!((0.15..0.25).contains(&canary_rate), "{failed:#}");
    assert!(stable_rate < 0.01, "{failed:#}");
    assert!(
        errors["stableRequests"].as_f64().unwrap() > errors["canaryRequests"].as_f64().unwrap()
    );
    wait_for_flag(&daemon, "new-search", "stable", 0.0).await;
}

/// A browser page evaluates flags through OpenFeature's web SDK only when CORS lets its origin
/// read the answer: `serve --ofrep-allow-origin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_web_pages_may_evaluate_flags_from_a_browser() {
    let dir = scratch("flags-cors");
    let mut command = serve_command(&dir);
    command.args(["--ofrep-allow-origin", "https://shop.example"]);
    let daemon = daemon_of(Proc::spawn_command(command, &["serve"]));
    let url = format!("{}/ofrep/v1/evaluate/flags/new-banner", daemon.api);
    let c = client();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allowed = preflight("https://shop.example").await.unwrap();
    assert_eq!(allowed.status(), 204);
    let h = allowed.headers();
    assert_eq!(h["access-control-allow-origin"], "https://shop.example");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("content-type"));
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // The evaluation itself (here: no such flag, OFREP's 404) is readable by the allowed page,
    // its ETag too, and by no other.
    let evaluate = |origin: &'static str| {
        c.post(&url)
            .header("origin", origin)
            .json(&json!({"context": {"targetingKey": "user-1"}}))
            .send()
    };
    let answer = evaluate("https://shop.example").await.unwrap();
    assert_eq!(answer.status(), 404);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(answer.headers()["access-control-expose-headers"], "ETag");
    let other = evaluate("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // OFREP's configuration: polling on, at least a second apart, no caching; tagged.
    let configuration = format!("{}/ofrep/v1/configuration", daemon.api);
    let answer = c
        .get(&configuration)
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let etag = answer.headers()["etag"].clone();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["name"], "coalmine");
    let polling = &body["capabilities"]["cacheInvalidation"]["polling"];
    assert_eq!(polling["enabled"], true);
    assert_eq!(polling["minPollingIntervalMs"], 1000);
    assert_eq!(body["capabilities"]["caching"]["enabled"], false);
    let again = c
        .get(&configuration)
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // The rest of the API grants no other origin anything.
    let list = c
        .get(format!("{}/api/v1/rollouts", daemon.api))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert!(list.headers().get("access-control-allow-origin").is_none());

    // A path after the origin is refused at start, as bad input.
    let mut bad = serve_command(&dir);
    bad.args(["--ofrep-allow-origin", "https://shop.example/app"]);
    let out = bad.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("write the scheme, host and port alone"));
}

/// The daemon's resident memory, in KiB (`/proc`).
fn rss_kib(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.proc.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_evaluations_and_counts_get_errors_and_the_flags_serve_on() {
    let dir = scratch("flags-hostile");
    let daemon = serve(&dir);
    apply(
        &daemon,
        &dir,
        "flag.yaml",
        &format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: pricing
spec:
  flag:
    key: new-pricing
    variants: {{on: true, off: false}}
    canary: on
    stable: off
  analysis:
    interval: 1s
    stepWeights: [10]
    sequential: {{enabled: false}}
{HOLD_AT_LAST_WEIGHT}"
        ),
    );
    wait_for_flag(&daemon, "new-pricing", "split", 10.0).await;
    let c = client();
    let one = format!("{}/ofrep/v1/evaluate/flags/new-pricing", daemon.api);
    let all = format!("{}/ofrep/v1/evaluate/flags", daemon.api);
    let post = |url: &str, body: Vec<u8>| {
        c.post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let rss_before = rss_kib(&daemon);

    // A targeting key of 1 MB is a key like any other.
    let huge_key = json!({"context": {"targetingKey": "u".repeat(1 << 20)}});
    let started = std::time::Instant::now();
    let r = post(&one, huge_key.to_string().into_bytes()).await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["reason"], "SPLIT", "{answer}");
    let huge_key_took = started.elapsed();

    // Nesting beyond any context's, bytes that are not UTF-8: OFREP's parse error, each flag's.
    let deep = format!(
        "{{\"context\": {{\"a\": {}{}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut not_utf8 = br#"{"context": {"targetingKey": "u-"#.to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe, 0x80]);
    not_utf8.extend_from_slice(br#""}}"#);
    for body in [deep.into_bytes(), not_utf8] {
        for url in [&one, &all] {
            let r = post(url, body.clone()).await.unwrap();
            assert_eq!(r.status(), 400, "{url}");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["errorCode"], "PARSE_ERROR", "{url}: {e}");
        }
    }
    // A body past the API's limit (2 MiB) is refused before it is read whole, as OFREP's error.
    for url in [&one, &all] {
        // A connection of its own: the daemon answers before the body's end, then closes it.
        let r = client()
            .post(url)
            .header("content-type", "application/json")
            .body(vec![b' '; 3 << 20])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["errorCode"], "INVALID_CONTEXT", "{url}: {e}");
        assert!(
            e["errorDetails"].as_str().unwrap().contains("length limit"),
            "{e}"
        );
    }

    // Counts that would overflow are refused, changing nothing; negative ones never parse.
    let counts = format!("{}/api/v1/flags/new-pricing/counts", daemon.api);
    let report = |requests: Value| json!({"variants": {"on": {"requests": requests}}});
    let send = |doc: Value| c.post(&counts).bearer_auth(TOKEN).json(&doc).send();
    // The rollout takes the counts each second: a take between two reports starts them anew.
    let mut refused = None;
    for _ in 0..5 {
        let r = send(report(json!(1u64 << 63))).await.unwrap();
        if r.status() == 400 {
            refused = Some(r.text().await.unwrap());
            break;
        }
        assert_eq!(r.status(), 202);
    }
    let refused = refused.expect("a report past 2^64 - 1 is refused");
    assert!(refused.contains("refused"), "says why: {refused}");
    for bad in [json!(-1), json!(1e30), json!("12")] {
        assert_eq!(send(report(bad)).await.unwrap().status(), 400);
    }

    // And the flags serve on: every evaluation answered, at once.
    let started = std::time::Instant::now();
    for i in 0..200 {
        let r = post(
            &one,
            json!({"context": {"targetingKey": format!("user-{i}")}})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
    }
    let two_hundred_took = started.elapsed();
    let rss_after = rss_kib(&daemon);
    eprintln!(
        "1 MB targeting key answered in {huge_key_took:?}; 200 evaluations after the hostile ones in {two_hundred_took:?}; RSS {rss_before} KiB before, {rss_after} KiB after"
    );
    assert!(two_hundred_took < Duration::from_secs(5));
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory bounded: {rss_before} → {rss_after} KiB"
    );
    wait_for_flag(&daemon, "new-pricing", "split", 10.0).await;
}
