//! Dark launches end to end: a real router mirrors users' requests to a real canary upstream
//! while `coalmine run` judges the canary's answers against stable's for the same requests.
//! The acceptance: a canary answering 500 to 3 % of the mirrored requests is stopped
//! before any user request reaches it.

use std::time::Duration;

use crate::common::*;

/// A canary ladder (50 %, 100 %) behind a dark launch of every stable request. The
/// sequential judges are off: the dark launch's paired test decides alone.
fn analysis(duration: &str, min_requests: u64) -> String {
    format!(
        "    interval: 2s
    stepWeight: 50
    maxWeight: 100
    darkLaunch: {{mirrorWeight: 100, duration: {duration}, minRequests: {min_requests}}}
    sequential: {{enabled: false}}
"
    )
}

/// What a `coalmine upstream` counted: requests copied by a router, and all the others.
async fn received(upstream: &Upstream) -> (u64, u64) {
    let doc = get_json(&format!("{}/_coalmine/received", upstream.url)).await;
    (
        doc["mirrored"].as_u64().unwrap(),
        doc["notMirrored"].as_u64().unwrap(),
    )
}

/// Seconds between the first events whose messages start with `from` and `to` (their times
/// of day, `HH:MM:SS.mmm`).
fn seconds_between(run: &RunResult, from: &str, to: &str) -> f64 {
    let at = |prefix: &str| -> f64 {
        let line = run
            .lines
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no event {prefix:?}: {:#?}", messages(run)));
        let time = &line["time"].as_str().unwrap()[11..23];
        let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    };
    at(to) - at(from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_three_percent_of_mirrored_requests_never_sees_a_user() {
    a_canary_failing_three_percent_is_stopped_before_any_user(client, "HTTP/1.1").await;
}

/// The same over HTTP/2 (h2c): the users' requests take the router's hyper path, whose copies
/// must be paired with the users' answers just the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_http2_requests_are_paired_and_judged_alike() {
    a_canary_failing_three_percent_is_stopped_before_any_user(h2c_client, "HTTP/2").await;
}

async fn a_canary_failing_three_percent_is_stopped_before_any_user(
    users_client: fn() -> reqwest::Client,
    protocol: &str,
) {
    let stable = upstream("v1", &[]);
    let canary = upstream("v2", &["--error-rate", "0.03"]);
    let router = router(&["--stable", &stable.url]);
    let file = write_rollout(
        "dark-bad",
        &rollout_yaml("dark", &router, &stable, &canary, &analysis("60s", 200)),
    );
    let traffic = users_over(&router, 4, users_client);
    let run = tokio::time::timeout(Duration::from_secs(90), coalmine_run(&file, &[]))
        .await
        .expect("the dark launch decided within 90 s");
    let (ok, failed) = traffic.stop().await;
    let said = messages(&run).join("\n");
    assert_eq!(run.code, 1, "{said}\n{}", run.stderr);
    let last = run.lines.last().unwrap();
    assert_eq!(last["outcome"], "rolledBack", "{last}");
    assert!(
        said.contains("Dark launch: mirroring 100 % of stable's requests"),
        "{said}"
    );
    assert!(said.contains("Dark launch failed"), "{said}");
    assert!(!said.contains("Dark launch passed"), "{said}");
    // The status never gave the canary a share, and no user request reached it: every request
    // it saw was a copy.
    let weights: Vec<f64> = run
        .lines
        .iter()
        .filter_map(|l| l["canaryWeight"].as_f64())
        .collect();
    assert!(weights.iter().all(|w| *w == 0.0), "{weights:?}");
    let (mirrored, from_users) = received(&canary).await;
    assert_eq!(from_users, 0, "user requests reached the canary");
    assert!(mirrored > 0);
    // The users were answered by stable alone, well.
    assert_eq!(failed, 0, "{ok} answered, {failed} failed");
    // What the router paired: the canary's failures where stable answered well.
    let pairs = stats(&router).await["mirror"]["pairs"].clone();
    let canary_only = pairs["canaryOnlyFailed"].as_u64().unwrap();
    assert!(canary_only >= 10, "{pairs}");
    assert_eq!(pairs["stableOnlyFailed"], 0, "{pairs}");
    let evidence = &last["darkLaunch"]["evidence"];
    assert_eq!(last["darkLaunch"]["stage"], "failed", "{last}");
    let detection = seconds_between(&run, "Dark launch: mirroring", "Rolling back");
    // The router's own series say the same, per pair of outcomes.
    let metrics = client()
        .get(format!("{}/metrics", router.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series =
        "coalmine_router_mirror_pairs_total{service=\"default\",stable=\"ok\",canary=\"error\"} ";
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .unwrap();
    // Read after /stats: a copy still in flight then may have been paired since.
    assert!(counted >= canary_only, "{counted} < {canary_only}");
    eprintln!(
        "dark launch over {protocol}, canary failing 3 %: rolled back {detection:.1} s after mirroring began; judged on {} pairs ({} canary-only failures, {} stable-only); the router paired {} by the end ({} ok, {} canary-only), the canary saw {mirrored} copies and {from_users} user requests; users: {ok} answered, {failed} failed",
        evidence["pairs"],
        evidence["canaryOnlyFailed"],
        evidence["stableOnlyFailed"],
        pairs["bothOk"].as_u64().unwrap() + canary_only,
        pairs["bothOk"],
        canary_only,
    );
    assert!(detection < 30.0, "{detection} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_passes_its_dark_launch_and_goes_on_to_weights() {
    let stable = upstream("v1", &[]);
    let canary = upstream("v2", &[]);
    let router = router(&["--stable", &stable.url]);
    let file = write_rollout(
        "dark-ok",
        &rollout_yaml("dark", &router, &stable, &canary, &analysis("4s", 100)),
    );
    let traffic = users(&router, 4);
    let run = tokio::time::timeout(Duration::from_secs(90), coalmine_run(&file, &[]))
        .await
        .expect("the rollout ended within 90 s");
    let (ok, failed) = traffic.stop().await;
    let said = messages(&run).join("\n");
    assert_eq!(run.code, 0, "{said}\n{}", run.stderr);
    assert!(said.contains("Dark launch passed"), "{said}");
    assert_eq!(canary_weights(&run), vec![50.0, 100.0], "{said}");
    // No weight before the dark launch passed.
    let passed_at = run
        .lines
        .iter()
        .position(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Dark launch passed"))
        })
        .unwrap();
    assert!(
        run.lines[..passed_at]
            .iter()
            .all(|l| l["canaryWeight"].as_f64().is_none_or(|w| w == 0.0)),
        "{said}"
    );
    assert_eq!(run.lines.last().unwrap()["darkLaunch"]["stage"], "passed");
    // Then users did reach it: the count that stays 0 above can move.
    let (mirrored, from_users) = received(&canary).await;
    assert!(
        mirrored >= 100 && from_users > 0,
        "{mirrored} copies, {from_users} from users"
    );
    assert_eq!(failed, 0, "{ok} answered, {failed} failed");
}
