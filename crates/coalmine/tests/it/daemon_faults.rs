//! The controller under faults: a full state disk, two daemons on one state file, a closed
//! output pipe, routers it does not own (rules it did not set, another rollout's router, a
//! traffic port given as an admin address, a router restarted with its old command line), an
//! unreadable or empty state file, stale alerts and secrets in addresses. Real `coalmine`
//! processes on 127.0.0.1; the full disk is a tmpfs in a private mount namespace.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::tinydisk::TinyDisk;
use common::*;

const SLOW_STEPS: &str = "    interval: 1s
    threshold: 2
    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80]
";

fn rollout_file(
    dir: &std::path::Path,
    name: &str,
    router: &Router,
    stable: &Upstream,
    canary: &Upstream,
    analysis: &str,
) -> String {
    let text = rollout_yaml(name, router, stable, canary, analysis);
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

async fn router_weight(router: &Router) -> f64 {
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    if routes["canary"].is_null() {
        0.0
    } else {
        routes["canaryWeight"].as_f64().unwrap()
    }
}

/// Starts `coalmine run FILE` (output discarded) and waits until its canary gets traffic.
async fn run_until_the_canary_has_traffic(file: &str, router: &Router) -> std::process::Child {
    let run = Command::new(BIN)
        .args(["run", file])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while router_weight(router).await == 0.0 {
        assert!(Instant::now() < deadline, "the canary never got traffic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run
}

fn history_messages(daemon: &Daemon, name: &str) -> Vec<String> {
    let (code, out) = cli(daemon, &["history", name, "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    out.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["message"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Runs `command` to its end, or kills it after `within`: `None` means it was still running
/// (a daemon that should have refused to start, say).
fn finished_within(mut command: Command, within: Duration) -> Option<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// `coalmine serve` inside the tiny disk's namespace, its state on the tiny disk.
fn serve_on(disk: &TinyDisk, token_dir: &std::path::Path) -> Daemon {
    let args = serve_args(&disk.dir.join("state.db"), token_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    daemon_of(disk.spawn(&args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_state_disk_full_nothing_moves_and_after_a_restart_nothing_repeats() {
    let dir = scratch("diskfull");
    let disk_dir = TempDir::new("tinydisk");
    let disk = TinyDisk::mount(&disk_dir.path, 4096);
    let mut daemon = serve_on(&disk, &dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let file = rollout_file(&dir, "checkout", &router, &v1, &v2, SLOW_STEPS);
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 20.0
    });

    // Full: the rollout holds where it was last saved, and says so.
    disk.fill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = router_weight(&router).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(router_weight(&router).await, held, "no step without saving");
    let s = status(&daemon, "checkout");
    assert_eq!(
        s["canaryWeight"].as_f64().unwrap(),
        held,
        "the routers carry exactly what was saved"
    );
    assert_eq!(s["stateSaved"], false, "{s:#}");
    assert!(
        s["message"].as_str().unwrap().contains("cannot be saved"),
        "{s:#}"
    );
    let metrics = metrics_text(&daemon.api).await;
    assert!(
        metrics.contains("coalmine_rollout_state_unsaved{rollout=\"checkout\"} 1"),
        "{metrics}"
    );

    // Room again: it goes on by itself.
    disk.free();
    let moved = wait_for(&daemon, "checkout", Duration::from_secs(10), |s| {
        s["canaryWeight"].as_f64().unwrap() > held
    });
    assert_eq!(moved["stateSaved"], true, "{moved:#}");

    // Full again, then killed: the restarted daemon continues from what the routers carry.
    disk.fill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_kill = router_weight(&router).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(router_weight(&router).await, at_kill);
    daemon.proc.child.kill().unwrap();
    daemon.proc.child.wait().unwrap();
    disk.free();
    let daemon = serve_on(&disk, &dir);
    // It goes on from there at once (the next step is long due): never back.
    let resumed = status(&daemon, "checkout");
    let w = resumed["canaryWeight"].as_f64().unwrap();
    assert!(
        (at_kill..=at_kill + 10.0).contains(&w),
        "{at_kill} → {resumed:#}"
    );
    let (code, out) = cli(&daemon, &["status", "checkout", "--watch"], None);
    assert_eq!(code, 0, "{out}");
    let messages = history_messages(&daemon, "checkout");
    let count = |m: &str| messages.iter().filter(|x| x.as_str() == m).count();
    for w in [10, 20, 30, 40, 50, 60, 70, 80] {
        assert_eq!(
            count(&format!("Advance canary weight {w}")),
            1,
            "{messages:#?}"
        );
    }
    assert_eq!(count("Promotion completed"), 1, "{messages:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_file_refuses_to_start_and_names_the_first() {
    let dir = scratch("twodaemons");
    let first = serve(&dir);
    let second = finished_within(serve_command(&dir), Duration::from_secs(10))
        .expect("the second daemon kept running");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_ne!(second.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.proc.pid())) && stderr.contains(&first.api[7..]),
        "names the holder: {stderr}"
    );
    assert!(String::from_utf8_lossy(&second.stdout).is_empty());
    // The lock dies with its holder, even under kill -9.
    let mut first = first;
    first.proc.child.kill().unwrap();
    first.proc.child.wait().unwrap();
    let again = serve(&dir);
    assert_eq!(cli(&again, &["status"], None).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_output_pipe_neither_stops_a_rollout_nor_prints_a_panic() {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let analysis = "    interval: 500ms
    threshold: 2
    stepWeights: [10, 20, 30, 40]
";
    let file = write_rollout("pipe", &rollout_yaml("pipe", &router, &v1, &v2, analysis));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args([
                "-c",
                &format!(
                    "'{BIN}' run '{file}' | head -2; echo \"run exited ${{PIPESTATUS[0]}}\" >&2"
                ),
            ])
            .env("COALMINE_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("run exited 0"),
        "promoted despite the closed pipe: {stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v2.url.as_str(), "{routes}");
    assert!(routes["canary"].is_null(), "{routes}");

    // A read command whose reader leaves stops quietly.
    let dir = scratch("pipe-history");
    let daemon = serve(&dir);
    let file = rollout_file(&dir, "hist", &router, &v2, &v1, SLOW_STEPS);
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    wait_for(&daemon, "hist", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 30.0
    });
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "'{BIN}' history hist | head -1; echo \"history exited ${{PIPESTATUS[0]}}\" >&2"
            ),
        ])
        .env("COALMINE_API", &daemon.api)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("history exited 0"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_leaves_the_routing_rules_it_found() {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    // The seed's header and user-id rules, given to the router by hand.
    let router = router(&[
        "--stable",
        &v1.url,
        "--match",
        "x-canary=true",
        "--match",
        "user-id~^(1|2|3|4|5)$",
    ]);
    let before = get_json(&format!("{}/routes", router.admin)).await["match"].clone();
    assert_eq!(before.as_array().unwrap().len(), 2);
    let analysis = "    interval: 1s
    threshold: 2
    stepWeights: [10, 20]
";
    let file = write_rollout("rules", &rollout_yaml("rules", &router, &v1, &v2, analysis));
    let run = tokio::spawn(async move { coalmine_run(&file, &[]).await });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let routes = get_json(&format!("{}/routes", router.admin)).await;
        if !routes["canary"].is_null() && routes["canaryWeight"].as_f64().unwrap() > 0.0 {
            assert_eq!(routes["match"], before, "during the rollout: {routes}");
            // The rules do their job: user 3 reaches the canary whatever the weight.
            let body = client()
                .get(format!("{}/", router.base))
                .header("user-id", "3")
                .text_body()
                .await;
            assert_eq!(body.trim(), "v2");
            break;
        }
        assert!(Instant::now() < deadline, "the canary never got traffic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = run.await.unwrap();
    assert_eq!(run.code, 0, "{:#?}", messages(&run));
    let after = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(after["match"], before, "after the rollout: {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_carries_one_rollout_and_a_second_is_refused_naming_the_first() {
    let dir = scratch("tworollouts");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let first = rollout_file(&dir, "checkout", &router, &v1, &v2, SLOW_STEPS);
    let second = rollout_file(&dir, "payments", &router, &v1, &v2, SLOW_STEPS);
    assert_eq!(cli(&daemon, &["apply", &first], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 10.0
    });
    let (code, out) = cli(&daemon, &["apply", &second], Some(TOKEN));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("\"checkout\""), "names the first: {out}");
    let (code, _) = cli(&daemon, &["status", "payments"], None);
    assert_ne!(code, 0, "the second was not created");
    // `run` on the same router is refused as well, before it changes anything.
    let weight = router_weight(&router).await;
    let run = coalmine_run(&second, &[]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("\"checkout\""), "{}", run.stderr);
    assert!(router_weight(&router).await >= weight);
    // Abort, then delete: the router is free for another rollout.
    assert_eq!(cli(&daemon, &["abort", "checkout"], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(10), |s| {
        s["phase"] == "Failed"
    });
    let (code, out) = cli(&daemon, &["delete", "checkout"], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&daemon, &["apply", &second], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restarted_with_its_old_command_line_gets_the_promotion_back() {
    let dir = scratch("routerrestart");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let (listen, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let command_line = [
        "proxy", "--listen", &listen, "--admin", &admin, "--stable", &v1.url,
    ];
    let first = Proc::spawn(&command_line);
    let router = Router {
        proc: first,
        base: format!("http://{listen}"),
        admin: format!("http://{admin}"),
    };
    let file = rollout_file(
        &dir,
        "checkout",
        &router,
        &v1,
        &v2,
        "    interval: 500ms
    threshold: 2
    stepWeights: [50]
",
    );
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    let (code, out) = cli(&daemon, &["status", "checkout", "--watch"], None);
    assert_eq!(code, 0, "{out}");
    drop(router); // the router process goes
    let again = Proc::spawn(&command_line);
    let admin_url = format!("http://{admin}");
    assert_eq!(
        get_json(&format!("{admin_url}/routes")).await["stable"],
        v1.url.as_str(),
        "restarted as it was first started"
    );
    let deadline = Instant::now() + Duration::from_secs(8);
    while get_json(&format!("{admin_url}/routes")).await["stable"] != v2.url.as_str() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not put the promotion back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = client().get(format!("http://{listen}/")).text_body().await;
    assert_eq!(body.trim(), "v2");
    // The event is saved once the routes are back (the put-back restores what was recorded).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let messages = history_messages(&daemon, "checkout");
        if messages
            .iter()
            .any(|m| m.contains("had lost this rollout's final routes"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{messages:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_refusal_fails_at_once_with_the_reason() {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    // The traffic port given as the admin address: the app behind it answers PUT /routes.
    let text = rollout_yaml(
        "wrongport",
        &router,
        &v1,
        &v2,
        "    interval: 1s\n    threshold: 2\n    stepWeights: [10]\n",
    )
    .replace(&router.admin, &router.base);
    let file = write_rollout("wrongport", &text);
    let run = coalmine_run(&file, &[]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.seconds < 5.0, "took {:.1}s", run.seconds);
    assert!(
        run.stderr.contains("not a Coalmine router's admin API")
            && run.stderr.contains("traffic port"),
        "{}",
        run.stderr
    );
    // A canary the router could never take (TLS to the upstream) is refused before anything.
    let text = rollout_yaml(
        "tlscanary",
        &router,
        &v1,
        &v2,
        "    interval: 1s\n    threshold: 2\n    stepWeights: [10]\n",
    )
    .replace(
        &format!("canary: {{url: {}}}", v2.url),
        "canary: {url: https://127.0.0.1:1}",
    );
    let file = write_rollout("tlscanary", &text);
    let run = coalmine_run(&file, &[]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.seconds < 5.0, "took {:.1}s", run.seconds);
    assert!(run.stderr.contains("spec.canary"), "{}", run.stderr);
    assert!(router_weight(&router).await == 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_provider_addresses_are_never_shown() {
    let dir = scratch("secrets");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    // A Prometheus that is not there: its address shows up in every reason.
    let prometheus = format!(
        "http://admin:PASSWORD@127.0.0.1:{}/?api_key=SECRET",
        free_port()
    );
    let analysis = format!(
        "    interval: 500ms
    threshold: 5
    stepWeights: [10]
    sequential: {{enabled: false}}
    metrics:
      - name: error-rate
        query: sum(up)
        provider: {{type: prometheus, address: '{prometheus}'}}
        thresholdRange: {{max: 1}}
"
    );
    let file = rollout_file(&dir, "secret", &router, &v1, &v2, &analysis);
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    let s = wait_for(&daemon, "secret", Duration::from_secs(20), |s| {
        s["metrics"].as_array().is_some_and(|m| !m.is_empty())
    });
    let reason = s["metrics"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("admin:REDACTED@"), "{reason}");
    let everything = [
        client()
            .get(format!("{}/api/v1/rollouts", daemon.api))
            .text_body()
            .await,
        client()
            .get(format!("{}/api/v1/rollouts/secret/history", daemon.api))
            .text_body()
            .await,
        metrics_text(&daemon.api).await,
        daemon.proc.stderr(),
    ];
    for shown in everything {
        assert!(
            !shown.contains("PASSWORD") && !shown.contains("SECRET"),
            "{shown}"
        );
    }
    // `run` shows the same reasons redacted.
    let run_file = write_rollout(
        "secret-run",
        &rollout_yaml("secretrun", &router, &v1, &v2, &analysis)
            .replace("threshold: 5", "threshold: 1"),
    );
    assert_eq!(cli(&daemon, &["abort", "secret"], Some(TOKEN)).0, 0);
    wait_for(&daemon, "secret", Duration::from_secs(10), |s| {
        s["phase"] == "Failed"
    });
    assert_eq!(cli(&daemon, &["delete", "secret"], Some(TOKEN)).0, 0);
    let run = coalmine_run(&run_file, &[]).await;
    let all = format!(
        "{}{}",
        run.lines.iter().map(|l| l.to_string()).collect::<String>(),
        run.stderr
    );
    assert!(all.contains("REDACTED"), "{all}");
    assert!(
        !all.contains("PASSWORD") && !all.contains("SECRET"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_that_began_before_the_run_does_not_roll_it_back() {
    let dir = scratch("stalealert");
    let daemon = serve(&dir);
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let analysis = format!(
        "{SLOW_STEPS}    rollbackOnAlerts:
      - alertname: CanaryHighErrorRate
        service: checkout
"
    );
    let file = rollout_file(&dir, "checkout", &router, &v1, &v2, &analysis);
    assert_eq!(cli(&daemon, &["apply", &file], Some(TOKEN)).0, 0);
    wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 10.0
    });
    let alert = |starts_at: &str| {
        serde_json::json!({
            "version": "4",
            "status": "firing",
            "alerts": [{
                "status": "firing",
                "labels": {"alertname": "CanaryHighErrorRate", "service": "checkout"},
                "annotations": {"summary": "Canary error rate too high"},
                "startsAt": starts_at,
            }]
        })
    };
    let send = |body: serde_json::Value| {
        let api = daemon.api.clone();
        async move {
            client()
                .post(format!("{api}/api/v1/alertmanager"))
                .bearer_auth(TOKEN)
                .json(&body)
                .json_body()
                .await
        }
    };
    // Still firing from an earlier run (Alertmanager repeats it): left alone.
    let answer = send(alert("2020-01-01T00:00:00.000Z")).await;
    assert_eq!(answer["rolledBack"], serde_json::json!([]), "{answer}");
    assert_eq!(answer["ignored"][0]["rollout"], "checkout", "{answer}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(&daemon, "checkout")["phase"], "Progressing");
    // Begun during this run: rolled back.
    let now = status(&daemon, "checkout")["lastTransitionTime"]
        .as_str()
        .unwrap()
        .to_string();
    let answer = send(alert(&now)).await;
    assert_eq!(
        answer["rolledBack"],
        serde_json::json!(["checkout"]),
        "{answer}"
    );
    wait_for(&daemon, "checkout", Duration::from_secs(5), |s| {
        s["phase"] == "Failed"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_state_file_is_refused_and_a_bad_row_is_named_while_the_others_run() {
    // An empty file is not a fresh state: it may be a truncated one.
    let dir = scratch("emptystate");
    std::fs::write(dir.join("state.db"), b"").unwrap();
    let out = finished_within(serve_command(&dir), Duration::from_secs(10))
        .expect("serve started on an empty state file");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("empty (0 bytes)"), "{stderr}");
    // A new state file is announced.
    let dir = scratch("badrow");
    let daemon = serve(&dir);
    daemon
        .proc
        .wait_for_stderr("created a new, empty state file");
    // Two rollouts, one of whose rows gets damaged while the daemon is down.
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let (r1, r2) = (
        router(&["--stable", &v1.url]),
        router(&["--stable", &v1.url]),
    );
    let good = rollout_file(&dir, "good", &r1, &v1, &v2, SLOW_STEPS);
    let bad = rollout_file(&dir, "bad", &r2, &v1, &v2, SLOW_STEPS);
    assert_eq!(cli(&daemon, &["apply", &good, &bad], Some(TOKEN)).0, 0);
    wait_for(&daemon, "good", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 10.0
    });
    let mut daemon = daemon;
    daemon.proc.child.kill().unwrap();
    daemon.proc.child.wait().unwrap();
    {
        let db = rusqlite::Connection::open(dir.join("state.db")).unwrap();
        db.execute(
            "UPDATE rollouts SET status = '{\"phase\": 7' WHERE name = 'bad'",
            [],
        )
        .unwrap();
    }
    let daemon = serve(&dir);
    let (code, out) = cli(&daemon, &["status", "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bad_row = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "bad")
        .unwrap();
    assert_eq!(bad_row["phase"], "Unknown", "{all:#}");
    daemon.proc.wait_for_stderr("bad");
    // The good one goes on to its end.
    let (code, out) = cli(&daemon, &["status", "good", "--watch"], None);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_whose_terminal_closes_rolls_its_canary_back() {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let file = write_rollout(
        "hangup",
        &rollout_yaml("hangup", &router, &v1, &v2, SLOW_STEPS),
    );
    let mut run = run_until_the_canary_has_traffic(&file, &router).await;
    // SIGHUP, as when the terminal `run` was started in goes away.
    let status = Command::new("kill")
        .args(["-HUP", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = tokio::task::spawn_blocking(move || run.wait().unwrap().code())
        .await
        .unwrap();
    assert_eq!(code, Some(1), "rolled back, not killed");
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert!(routes["canary"].is_null(), "{routes}");
    assert_eq!(routes["stable"], v1.url.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_never_drive_one_router_even_before_a_canary_is_routed() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;
    let (v1, v2, v3) = (
        upstream("v1", &[]),
        upstream("v2", &[]),
        upstream("v3", &[]),
    );
    let router = router(&["--stable", &v1.url]);
    // `alpha` waits at a confirm-rollout gate: it holds the router while no canary is routed.
    let open = Arc::new(AtomicBool::new(false));
    let gate_open = open.clone();
    let (gate, _asked) = common::stub::stub(move |_| {
        let answer = if gate_open.load(Relaxed) {
            common::stub::response("200 OK", "text/plain", "go")
        } else {
            common::stub::response("403 Forbidden", "text/plain", "wait")
        };
        (Duration::ZERO, answer)
    });
    let gated = format!(
        "{SLOW_STEPS}    webhooks:
      - name: gate
        type: confirm-rollout
        url: {gate}/
"
    );
    let alpha = write_rollout(
        "own-alpha",
        &rollout_yaml("alpha", &router, &v1, &v2, &gated),
    );
    let beta = write_rollout(
        "own-beta",
        &rollout_yaml("beta", &router, &v1, &v3, SLOW_STEPS),
    );
    // Killed if the test fails: a gated run would otherwise wait for its deadline.
    let mut first = Proc::spawn(&["run", &alpha, "--output", "json"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let owner = loop {
        let routes = get_json(&format!("{}/routes", router.admin)).await;
        if routes["name"] == "alpha" {
            break routes["owner"].clone();
        }
        assert!(Instant::now() < deadline, "alpha never took the router");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Another rollout, and another controller of the same rollout: both refused before they
    // change anything.
    for (file, what) in [(&beta, "beta"), (&alpha, "a second alpha")] {
        let run = coalmine_run(file, &[]).await;
        assert_eq!(run.code, 2, "{what}: {}", run.stderr);
        assert!(
            run.stderr.contains("rollout \"alpha\""),
            "{what}: {}",
            run.stderr
        );
        let routes = get_json(&format!("{}/routes", router.admin)).await;
        assert_eq!(routes["name"], "alpha", "{what}: {routes}");
        assert_eq!(routes["owner"], owner, "{what}: {routes}");
    }
    let owner = owner.as_str().unwrap_or_default();
    assert!(owner.starts_with("alpha (coalmine run, pid "), "{owner}");
    // A route change sent for another controller is refused by the router itself, whatever it
    // saw before: the check and the change are one step.
    let refused = client()
        .put(format!("{}/routes", router.admin))
        .header("x-coalmine-owner", "beta (elsewhere)")
        .json(&serde_json::json!({"name": "beta", "owner": "beta (elsewhere)", "canary": v3.url, "canaryWeight": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert!(routes["canary"].is_null(), "{routes}");

    // Once alpha is over, its router is free: beta runs.
    open.store(true, Relaxed);
    let first = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = first.child.try_wait().unwrap() {
                return (status.code(), first.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("alpha did not finish once its gate opened");
    })
    .await
    .unwrap();
    assert_eq!(first.0, Some(0), "{}", first.1);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v2.url.as_str(), "{routes}");
    assert!(routes["owner"].is_null(), "freed after the run: {routes}");
    let second = coalmine_run(&beta, &[]).await;
    assert_eq!(second.code, 0, "{:#?} {}", messages(&second), second.stderr);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v3.url.as_str(), "{routes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_run_was_killed_is_taken_over_by_the_next_run() {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let slow = write_rollout(
        "killed",
        &rollout_yaml("killed", &router, &v1, &v2, SLOW_STEPS),
    );
    let mut first = run_until_the_canary_has_traffic(&slow, &router).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    let owner = routes["owner"].as_str().unwrap_or_default().to_string();
    assert!(
        owner.contains(&format!("pid {} ", first.id())),
        "still the killed run's: {routes}"
    );

    // Nothing drives the router any more: the next run of the rollout takes it over, says so,
    // and finishes.
    let quick = write_rollout(
        "killed-again",
        &rollout_yaml(
            "killed",
            &router,
            &v1,
            &v2,
            "    interval: 1s\n    threshold: 2\n    stepWeights: [50]\n",
        ),
    );
    let again = coalmine_run(&quick, &[]).await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("is gone: taking the router over"),
        "{}",
        again.stderr
    );
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v2.url.as_str(), "{routes}");
    assert!(routes["owner"].is_null(), "{routes}");
}
