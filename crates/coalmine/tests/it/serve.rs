//! `coalmine serve` and its clients: durable state, the token, kill -9 and resume.

use crate::common;

use std::time::Duration;

use common::daemon::*;
use common::*;

fn rollout_file(
    dir: &std::path::Path,
    router: &Router,
    stable: &Upstream,
    canary: &Upstream,
    analysis: &str,
) -> String {
    let text = rollout_yaml("checkout", router, stable, canary, analysis);
    let path = dir.join(format!("rollout-{}.yaml", text.len()));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const SLOW_STEPS: &str = "    interval: 1s
    threshold: 2
    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_without_the_token_get_401_and_change_nothing() {
    let dir = scratch("auth");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let file = rollout_file(&dir, &router, &v1, &v2, SLOW_STEPS);
    for token in [None, Some("wrong-token-0123456789")] {
        let (code, out) = cli(&daemon, &["apply", &file], token);
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("401"), "{out}");
    }
    let (code, out) = cli(&daemon, &["status", "--output", "json"], None);
    assert_eq!(
        (code, out.trim()),
        (0, "[]"),
        "reads are open; nothing was created"
    );
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(
        routes["canary"],
        serde_json::Value::Null,
        "the router was not touched"
    );
    // With the token the same call works, and commands need it too.
    let (code, out) = cli(&daemon, &["apply", &file], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&daemon, &["abort", "checkout"], None);
    assert_eq!(code, 2, "{out}");
    assert_ne!(status(&daemon, "checkout")["phase"], "Failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_a_rollout_continues_from_its_persisted_weight_and_promotes_once() {
    let dir = scratch("kill9");
    let mut daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let file = rollout_file(&dir, &router, &v1, &v2, SLOW_STEPS);
    let (code, out) = cli(&daemon, &["apply", &file], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let before = wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 30.0
    });
    daemon.proc.child.kill().unwrap(); // SIGKILL: no chance to clean up
    daemon.proc.child.wait().unwrap();
    let held = get_json(&format!("{}/routes", router.admin)).await;
    let weight_at_kill = held["canaryWeight"].as_f64().unwrap();
    assert!(weight_at_kill >= 30.0, "{held}");

    let daemon = serve(&dir);
    let resumed = status(&daemon, "checkout");
    assert_eq!(resumed["phase"], "Progressing", "{resumed:#}");
    assert!(
        resumed["canaryWeight"].as_f64().unwrap() >= before["canaryWeight"].as_f64().unwrap(),
        "no reset to 0: {resumed:#}"
    );
    let (code, out) = cli(&daemon, &["status", "checkout", "--watch"], None);
    assert_eq!(code, 0, "--watch exits 0 on promotion: {out}");
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v2.url.as_str());

    let (code, out) = cli(&daemon, &["history", "checkout", "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    let messages: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["message"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let count = |m: &str| messages.iter().filter(|x| x.as_str() == m).count();
    for w in [10, 20, 30, 40, 50, 60, 70, 80] {
        assert_eq!(
            count(&format!("Advance canary weight {w}")),
            1,
            "{messages:#?}"
        );
    }
    assert_eq!(
        count("Routing all traffic to the new version"),
        1,
        "{messages:#?}"
    );
    assert_eq!(count("Promotion completed"), 1, "{messages:#?}");
    assert_eq!(count("Rollout applied"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_apply_leaves_the_running_rollout_as_it_was_and_commands_steer_it() {
    let dir = scratch("steer");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let file = rollout_file(&dir, &router, &v1, &v2, SLOW_STEPS);
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"] == 20.0
    });
    assert_eq!(cli(&daemon, &["pause", "checkout"], Some(TOKEN)).0, 0);
    std::thread::sleep(Duration::from_millis(300));
    let paused = status(&daemon, "checkout");
    assert_eq!(paused["paused"], true);

    let broken = std::fs::read_to_string(&file)
        .unwrap()
        .replace("threshold: 2", "threshold: two");
    let broken_file = dir.join("broken.yaml");
    std::fs::write(&broken_file, broken).unwrap();
    let (code, out) = cli(
        &daemon,
        &["apply", broken_file.to_str().unwrap()],
        Some(TOKEN),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("broken.yaml:11:16: spec.analysis.threshold"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = status(&daemon, "checkout");
    assert_eq!(
        after["canaryWeight"], paused["canaryWeight"],
        "paused and untouched"
    );
    assert_eq!(after["startedAt"], paused["startedAt"], "same run");

    assert_eq!(cli(&daemon, &["resume", "checkout"], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(10), |s| {
        s["canaryWeight"].as_f64().unwrap() > paused["canaryWeight"].as_f64().unwrap()
    });
    assert_eq!(cli(&daemon, &["promote", "checkout"], Some(TOKEN)).0, 0);
    let done = wait_for(&daemon, "checkout", Duration::from_secs(10), |s| {
        s["phase"] == "Succeeded"
    });
    assert_eq!(done["conditions"][0]["status"], "True");
    let (code, out) = cli(&daemon, &["abort", "checkout"], Some(TOKEN));
    assert_eq!(code, 2, "a finished rollout cannot be aborted: {out}");
    assert!(out.contains("not running"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_by_the_daemon_and_watch_exits_1() {
    let dir = scratch("fail");
    let daemon = serve(&dir);
    let (v1, v2) = (
        upstream("v1", &[]),
        upstream("v2", &["--error-rate", "0.5"]),
    );
    let router = router(&["--stable", &v1.url]);
    let file = rollout_file(
        &dir,
        &router,
        &v1,
        &v2,
        "    interval: 1s
    threshold: 2
    stepWeights: [50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 3s
",
    );
    let traffic = tokio::spawn({
        let url = format!("{}/", router.base);
        async move {
            let c = client();
            for _ in 0..1500 {
                let _ = c.get(&url).send().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    let (code, out) = cli(&daemon, &["status", "checkout", "--watch"], None);
    assert_eq!(code, 1, "{out}");
    traffic.abort();
    let s = status(&daemon, "checkout");
    assert_eq!(s["phase"], "Failed");
    // Half of the canary's requests fail: the sequential judge sees it within a sample or two
    // of the first step, before the first analysis tick, and status shows its evidence.
    assert!(
        s["message"].as_str().unwrap().contains("Sequential test"),
        "{s:#}"
    );
    let errors = &s["sequential"]["errors"];
    assert_eq!(errors["rejected"], true, "{s:#}");
    assert!(errors["pValue"].as_f64().unwrap() < 0.005, "{s:#}");
    assert!(errors["canaryFailures"].as_u64().unwrap() > 0, "{s:#}");
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["canary"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_serve_process_hosts_the_router_and_runs_both_versions() {
    let dir = scratch("hosted");
    let daemon = serve(&dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let version = |name: &str| {
        format!("{{command: [{BIN}, upstream, --listen, '127.0.0.1:{{port}}', --name, {name}], readiness: {{path: /healthz, timeout: 10s}}}}")
    };
    let text = format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: checkout
spec:
  router: {{listen: '{listen}'}}
  routerService: checkout     # its hosted router's one service is named so
  stable: {}
  canary: {}
  analysis:
    interval: 1s
    threshold: 2
    stepWeights: [50]
",
        version("v1"),
        version("v2")
    );
    let file = dir.join("hosted.yaml");
    std::fs::write(&file, text).unwrap();
    let (code, out) = cli(&daemon, &["apply", file.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let url = format!("http://{listen}/");
    let half = wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"] == 50.0
    });
    assert_eq!(half["phase"], "Progressing");
    let seen = bodies(&url, 200, 4).await;
    let v2 = seen.iter().filter(|b| b.trim() == "v2").count();
    assert!(
        (60..=140).contains(&v2),
        "about half of 200 reach v2 at 50 %: {v2}"
    );
    let (code, out) = cli(&daemon, &["status", "checkout", "--watch"], None);
    assert_eq!(code, 0, "{out}");
    let seen = bodies(&url, 50, 2).await;
    assert!(seen.iter().all(|b| b.trim() == "v2"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_refuses_bad_names_and_two_rollouts_of_one_name_on_both_sides() {
    let dir = scratch("names");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let good = rollout_yaml("checkout", &router, &v1, &v2, SLOW_STEPS);

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, good.replace("name: checkout", "name: check/out")).unwrap();
    let (code, out) = cli(&daemon, &["apply", bad.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("bad.yaml:4:9: metadata.name: \"check/out\" is not a valid name"),
        "{out}"
    );

    // The daemon's API refuses the same documents itself (a NUL would reach its /metrics).
    let staging = good.replace("name: checkout", "name: checkout\n  namespace: staging");
    for (files, says) in [
        (
            vec![("bad.yaml", good.replace("name: checkout", "name: \"a\\0b\""))],
            "bad.yaml:4:9: metadata.name: \"a\\0b\" is not a valid name",
        ),
        (
            vec![("a.yaml", good.clone()), ("b.yaml", good.clone())],
            "b.yaml:4:9: metadata.name: Rollout \"checkout\" has the same name as the Rollout at a.yaml:4",
        ),
        (
            vec![("a.yaml", good.clone()), ("b.yaml", staging)],
            "b.yaml:4:9: metadata.name: Rollout \"checkout\" (namespace staging) has the same name as the Rollout at a.yaml:4 (namespace default): Coalmine addresses rollouts by name alone",
        ),
    ] {
        let body = serde_json::json!({
            "files": files.iter().map(|(f, t)| serde_json::json!({"file": f, "text": t})).collect::<Vec<_>>(),
        });
        let resp = client()
            .post(format!("{}/api/v1/apply", daemon.api))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let answer: serde_json::Value = resp.json().await.unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(says), "wanted {says:?} in {error}");
    }
    let (code, out) = cli(&daemon, &["status", "--output", "json"], None);
    assert_eq!((code, out.trim()), (0, "[]"), "nothing was applied");

    // `apply -` sends what it read from stdin, named `<stdin>`.
    let mut apply = std::process::Command::new(BIN);
    apply
        .args(["apply", "-", "--api", &daemon.api])
        .env("COALMINE_TOKEN", TOKEN);
    let (code, out) = code_and_printed(&output_with_stdin(&mut apply, good.as_bytes()).unwrap());
    assert_eq!(code, 0, "{out}");
    assert_eq!(status(&daemon, "checkout")["name"], "checkout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_words_a_person_reads_are_right() {
    let dir = scratch("words");
    // Logs at info, to a pipe (as to a file): no colour codes, weights in percent.
    let mut command = serve_command(&dir);
    command.env("COALMINE_LOG", "info");
    let daemon = daemon_of(Proc::spawn_command(command, &["serve"]));
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let file = rollout_file(
        &dir,
        &router,
        &v1,
        &v2,
        "    interval: 10s
    threshold: 2
    stepWeights: [10, 20]
",
    );
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(25), |s| {
        s["canaryWeight"] == 10.0
    });
    let logs = daemon.proc.stderr();
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a log file: {logs}"
    );
    assert!(logs.contains("weight_percent=10"), "{logs}");
    assert!(!logs.contains("weight=1000"), "{logs}");

    // `status --watch` prints a line again only when it changes (the sequential evidence under
    // it changes every second; the line does not for the 10 s of this step).
    let watch = std::process::Command::new(BIN)
        .args(["status", "checkout", "--watch"])
        .env("COALMINE_API", &daemon.api)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    unsafe_kill(watch.id() as i32);
    let out = watch.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(lines <= 2, "{}", String::from_utf8_lossy(&out.stdout));

    // A rolled-back document applied again is not silently "unchanged".
    assert_eq!(cli(&daemon, &["abort", "checkout"], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(10), |s| {
        s["phase"] == "Failed"
    });
    let (code, out) = cli(&daemon, &["apply", &file], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("unchanged") && out.contains("--restart"),
        "{out}"
    );
}

fn unsafe_kill(pid: i32) {
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_even_with_a_dashboard_open() {
    let dir = scratch("sigterm-dashboard");
    let mut daemon = serve(&dir);
    let mut watch = client()
        .get(format!("{}/api/v1/watch", daemon.api))
        .send()
        .await
        .unwrap();
    let first = watch.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event: snapshot"));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &daemon.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = daemon.proc.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon still runs 5 s after SIGTERM: an open page's stream held it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let rest = tokio::time::timeout(Duration::from_secs(2), watch.chunk()).await;
    assert!(
        matches!(rest, Ok(Ok(None)) | Ok(Err(_))),
        "the page's stream ended: {rest:?}"
    );
}
