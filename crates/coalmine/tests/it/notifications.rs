//! Notifications end to end: `coalmine run` with real router and upstream processes, its
//! alerts posted to a local HTTP server standing in for Slack, Teams, Discord, Rocket.Chat,
//! Google Chat and a plain webhook; and a service that fails or hangs holds no step.

use crate::common;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::stub::{response, stub, Received};
use common::*;

/// `coalmine run FILE --output json` with `env` set (an address given by `addressFrom: {env}`).
async fn run_with_env(file: &str, env: &[(&str, String)]) -> RunResult {
    let file = file.to_string();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(["run", &file, "--output", "json"])
            .env("COALMINE_LOG", "warn")
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        RunResult {
            code: out.status.code().unwrap_or(-1),
            lines: String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
                .collect(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            seconds: started.elapsed().as_secs_f64(),
        }
    })
    .await
    .unwrap()
}

/// A coalmine.dev AlertProvider document.
fn provider(name: &str, kind: &str, address_from: &str) -> String {
    format!(
        "---
apiVersion: coalmine.dev/v1alpha1
kind: AlertProvider
metadata:
  name: {name}
spec:
  type: {kind}
  channel: releases
  username: coalmine
  addressFrom: {address_from}
"
    )
}

/// Every request the stub got so far, and those that come within `wait`.
fn collect(received: &mpsc::Receiver<Received>, wait: Duration) -> Vec<Received> {
    let deadline = Instant::now() + wait;
    let mut all = Vec::new();
    while let Ok(r) = received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        all.push(r);
    }
    all
}

fn bodies(all: &[Received], path: &str) -> Vec<Value> {
    all.iter()
        .filter(|r| r.path == path)
        .map(|r| {
            assert_eq!(r.method, "POST", "{path}");
            assert!(
                r.header("content-type")
                    .is_some_and(|t| t.starts_with("application/json")),
                "{path}: {:?}",
                r.headers
            );
            serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
        })
        .collect()
}

/// The seconds of the day an event of a run's JSON lines happened at (`time` is RFC 3339).
fn event_seconds(line: &Value) -> f64 {
    let time = line["time"].as_str().expect("an event's time");
    let clock = &time[11..23];
    let parts: Vec<f64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// From the run's first event to its last: how long its steps took, whatever the process did
/// after them.
fn steps_seconds(run: &RunResult) -> f64 {
    let events: Vec<&Value> = run.lines.iter().filter(|l| l["time"].is_string()).collect();
    event_seconds(events.last().unwrap()) - event_seconds(events[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_canary_is_posted_to_every_kind_in_the_shape_its_service_takes() {
    let (base, received) = stub(|_| (Duration::ZERO, response("200 OK", "text/plain", "ok")));
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &["--error-rate", "0.2", "--seed", "4"]);
    let router = router(&["--stable", &v1.url]);
    let dir = TempDir::new("notify-kinds");
    let address = |name: &str, path: &str| {
        dir.write(name, &format!("{base}{path}\n"))
            .display()
            .to_string()
    };
    let analysis = "    interval: 2s
    threshold: 5
    stepWeights: [10, 25, 50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 10s
    alerts:
      - {name: on-call, severity: error, providerRef: {name: team-slack}}
      - {name: teams, providerRef: {name: team-teams}}
      - {name: discord, providerRef: {name: team-discord}}
      - {name: rocket, providerRef: {name: team-rocket}}
      - {name: gchat, providerRef: {name: team-gchat}}
      - {name: incidents, severity: warn, providerRef: {name: incidents}}
";
    let mut text = rollout_yaml("payment-service", &router, &v1, &v2, analysis);
    text += &provider("team-slack", "slack", "{env: TEAM_SLACK_WEBHOOK}");
    text += &provider(
        "team-teams",
        "msteams",
        &format!("{{file: {}}}", address("teams", "/teams/SECRET-T")),
    );
    text += &provider(
        "team-discord",
        "discord",
        &format!("{{file: {}}}", address("discord", "/discord/SECRET-D")),
    );
    text += &provider(
        "team-rocket",
        "rocket",
        &format!("{{file: {}}}", address("rocket", "/rocket/SECRET-R")),
    );
    text += &provider(
        "team-gchat",
        "gchat",
        &format!("{{file: {}}}", address("gchat", "/gchat/SECRET-G")),
    );
    text += &provider(
        "incidents",
        "webhook",
        &format!("{{file: {}}}", address("webhook", "/webhook/SECRET-W")),
    );
    let file = write_rollout("notify-kinds", &text);
    let traffic = users(&router, 4);
    let run = run_with_env(
        &file,
        &[("TEAM_SLACK_WEBHOOK", format!("{base}/slack/SECRET-S"))],
    )
    .await;
    traffic.stop().await;
    assert_eq!(run.code, 1, "{:#?}\n{}", messages(&run), run.stderr);
    let all = collect(&received, Duration::from_secs(1));
    let paths: Vec<&str> = all.iter().map(|r| r.path.as_str()).collect();
    eprintln!("{paths:#?}");

    // Slack: severity error, so the rollback alone; `text` and one attachment, coloured
    // danger, with the reason and the sequential judges' evidence.
    let slack = bodies(&all, "/slack/SECRET-S");
    assert_eq!(slack.len(), 1, "{slack:#?}");
    let slack = &slack[0];
    assert!(slack["text"]
        .as_str()
        .unwrap()
        .contains("payment-service.default"));
    assert_eq!(slack["channel"], "releases");
    assert_eq!(slack["username"], "coalmine");
    let attachment = &slack["attachments"][0];
    assert_eq!(attachment["color"], "danger");
    assert_eq!(attachment["author_name"], "payment-service.default");
    let reason = attachment["text"].as_str().unwrap();
    assert!(
        reason.contains("Rolling back: Sequential test: the canary fails more often than stable"),
        "{reason}"
    );
    let fields: Vec<&str> = attachment["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["title"].as_str().unwrap())
        .collect();
    for field in ["Phase", "Canary weight", "Failure rates", "Bayes factor"] {
        assert!(fields.contains(&field), "{field} in {fields:?}");
    }

    // Teams (info: every message): the start, then the rollback as a red MessageCard.
    let teams = bodies(&all, "/teams/SECRET-T");
    assert!(teams.len() >= 2, "{teams:#?}");
    assert!(teams[0]["sections"][0]["activityTitle"]
        .as_str()
        .unwrap()
        .starts_with("New revision detected"));
    let card = teams.last().unwrap();
    assert_eq!(card["@type"], "MessageCard");
    assert_eq!(card["@context"], "http://schema.org/extensions");
    assert_eq!(card["themeColor"], "FF0000");
    assert_eq!(card["summary"], "payment-service.default");
    let section = &card["sections"][0];
    assert!(section["activityTitle"]
        .as_str()
        .unwrap()
        .contains("Sequential test"));
    assert!(section["facts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "Bayes factor"));

    // Discord: its webhook's Slack-compatible endpoint, Slack's payload.
    let discord = bodies(&all, "/discord/SECRET-D/slack");
    assert!(discord.len() >= 2, "{paths:#?}");
    assert_eq!(discord.last().unwrap()["attachments"][0]["color"], "danger");
    // Rocket.Chat: Slack's payload at the address.
    let rocket = bodies(&all, "/rocket/SECRET-R");
    assert!(rocket.len() >= 2);
    assert!(rocket.last().unwrap()["attachments"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Rolling back"));

    // Google Chat: `text`, and a card with a header and text paragraphs.
    let gchat = bodies(&all, "/gchat/SECRET-G");
    assert!(gchat.len() >= 2);
    let chat = gchat.last().unwrap();
    assert!(chat["text"]
        .as_str()
        .unwrap()
        .contains("payment-service.default"));
    let card = &chat["cards"][0];
    assert_eq!(card["header"]["subtitle"], "payment-service.default");
    assert!(card["sections"][0]["widgets"][0]["textParagraph"]["text"]
        .as_str()
        .unwrap()
        .contains("Rolling back"));

    // The webhook (warn and above): no start message; the rollback with its fields.
    let webhook = bodies(&all, "/webhook/SECRET-W");
    assert!(!webhook.is_empty());
    assert!(
        webhook.iter().all(|w| w["severity"] != "info"),
        "{webhook:#?}"
    );
    let last = webhook.last().unwrap();
    assert_eq!(
        (
            &last["name"],
            &last["namespace"],
            &last["phase"],
            &last["severity"]
        ),
        (
            &Value::from("payment-service"),
            &Value::from("default"),
            &Value::from("Failed"),
            &Value::from("error")
        )
    );
    assert!(last["reason"].as_str().unwrap().contains("Sequential test"));
    assert!(last["fields"]["Bayes factor"].is_string());
    assert!(!run.stderr.contains("SECRET"), "{}", run.stderr);
}

/// Runs the same healthy rollout with these alerts; returns the run.
async fn promoted_with(test: &str, alerts: &[(&str, String)]) -> RunResult {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    let dir = TempDir::new(test);
    let mut analysis = "    interval: 1s
    threshold: 2
    stepWeights: [20, 50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 5s
    alerts:
"
    .to_string();
    let mut providers = String::new();
    for (name, address) in alerts {
        analysis += &format!("      - {{name: {name}, providerRef: {{name: {name}}}}}\n");
        let path = dir.write(name, address);
        providers += &provider(name, "webhook", &format!("{{file: {}}}", path.display()));
    }
    let file = write_rollout(
        test,
        &(rollout_yaml("payment-service", &router, &v1, &v2, &analysis) + &providers),
    );
    let traffic = users(&router, 4);
    let run = coalmine_run(&file, &[]).await;
    traffic.stop().await;
    assert_eq!(run.code, 0, "{:#?}\n{}", messages(&run), run.stderr);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_or_hangs_delays_no_step_and_a_failing_one_is_retried() {
    let (base, received) = stub(|r| {
        if r.path.starts_with("/hang") {
            // Longer than a post may take: every attempt times out.
            (
                Duration::from_secs(30),
                response("200 OK", "text/plain", "late"),
            )
        } else if r.path.starts_with("/broken") {
            (
                Duration::ZERO,
                response("500 Internal Server Error", "text/plain", "down"),
            )
        } else {
            (Duration::ZERO, response("200 OK", "text/plain", "ok"))
        }
    });
    let healthy = promoted_with(
        "notify-healthy",
        &[("healthy", format!("{base}/healthy/A/SECRET"))],
    )
    .await;
    let with_faults = promoted_with(
        "notify-faults",
        &[
            ("hang", format!("{base}/hang/SECRET")),
            ("broken", format!("{base}/broken/SECRET")),
            ("witness", format!("{base}/witness/SECRET")),
        ],
    )
    .await;
    let all = collect(&received, Duration::from_secs(1));
    let count = |prefix: &str| all.iter().filter(|r| r.path.starts_with(prefix)).count();
    let (steps_healthy, steps_faults) = (steps_seconds(&healthy), steps_seconds(&with_faults));
    eprintln!(
        "steps: {steps_healthy:.2}s with a healthy receiver, {steps_faults:.2}s with a hanging and a failing one; processes {:.1}s and {:.1}s; posts: healthy {}, witness {}, broken {}, hang {}",
        healthy.seconds,
        with_faults.seconds,
        count("/healthy"),
        count("/witness"),
        count("/broken"),
        count("/hang")
    );
    // The same rollout takes the same time (ticks of 1 s; one tick of slack for scheduling).
    assert!(
        steps_faults < steps_healthy + 1.0,
        "{steps_faults:.2}s against {steps_healthy:.2}s"
    );
    // The process waits at most its flush bound (10 s) for the last messages.
    assert!(
        with_faults.seconds < healthy.seconds + 12.0,
        "{:.1}s against {:.1}s",
        with_faults.seconds,
        healthy.seconds
    );
    // A healthy receiver beside the faulty ones got every message, each once.
    let sent = count("/witness");
    assert!(sent >= 2, "start and promotion at least: {sent}");
    assert!(count("/healthy") >= 2);
    // The failing one: every message, four attempts each.
    assert_eq!(count("/broken"), 4 * sent);
    assert!(count("/hang") >= 1);
    assert!(
        !with_faults.stderr.contains("SECRET"),
        "{}",
        with_faults.stderr
    );
    assert!(
        with_faults
            .stderr
            .contains("notification given up after 4 attempts: answered 500"),
        "{}",
        with_faults.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_the_address_from_its_environment_and_never_stores_it() {
    use common::daemon::*;
    let (base, received) = stub(|_| (Duration::ZERO, response("200 OK", "text/plain", "ok")));
    let dir = scratch("notify");
    let mut command = serve_command(&dir);
    command.env("CHECKOUT_ALERTS_URL", format!("{base}/hooks/SECRET-SERVE"));
    let daemon = daemon_of(Proc::spawn_command(command, &["serve"]));
    let (v1, v2) = (
        upstream("v1", &[]),
        upstream("v2", &["--error-rate", "0.5"]),
    );
    let router = router(&["--stable", &v1.url]);
    let analysis = "    interval: 1s
    threshold: 2
    stepWeights: [50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 3s
    alerts:
      - {name: incidents, severity: error, providerRef: {name: incidents}}
";
    let rollout = rollout_yaml("checkout", &router, &v1, &v2, analysis);
    // Without its AlertProvider the rollout is refused at the reference, and nothing starts.
    let alone = dir.write("alone.yaml", &rollout);
    let (code, out) = cli(&daemon, &["apply", alone.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("alone.yaml:18:57:") && out.contains("spec.analysis.alerts[0].providerRef"),
        "{out}"
    );
    assert_eq!(
        cli(&daemon, &["status", "--output", "json"], None).1.trim(),
        "[]"
    );

    let file = dir.write(
        "rollout.yaml",
        &(rollout + &provider("incidents", "webhook", "{env: CHECKOUT_ALERTS_URL}")),
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
    let (code, out) = cli(&daemon, &["apply", file.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&daemon, &["status", "checkout", "--watch"], None);
    assert_eq!(code, 1, "{out}");
    traffic.abort();
    let posts = collect(&received, Duration::from_secs(3));
    let bodies = bodies(&posts, "/hooks/SECRET-SERVE");
    assert_eq!(bodies.len(), 1, "errors only: {bodies:#?}");
    assert_eq!(bodies[0]["phase"], "Failed");
    assert_eq!(bodies[0]["severity"], "error");
    assert!(
        bodies[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("Rolling back:"),
        "{:#}",
        bodies[0]
    );
    // The state file knows where the address is, not what it is.
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(&*dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("state.db")
        {
            stored.extend(std::fs::read(&path).unwrap());
        }
    }
    let stored = String::from_utf8_lossy(&stored);
    assert!(stored.contains("CHECKOUT_ALERTS_URL"));
    assert!(!stored.contains("SECRET-SERVE"));
    assert!(!daemon.proc.stderr().contains("SECRET-SERVE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_cannot_be_saved_is_not_told_and_is_told_once_saved() {
    use common::daemon::*;
    use common::tinydisk::TinyDisk;
    let (base, received) = stub(|_| (Duration::ZERO, response("200 OK", "text/plain", "ok")));
    let dir = scratch("notify-unsaved");
    let address = dir.write("incidents-url", &format!("{base}/incidents"));
    let disk_dir = TempDir::new("notify-tinydisk");
    let disk = TinyDisk::mount(&disk_dir.path, 4096);
    let args = serve_args(&disk.dir.join("state.db"), &dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = daemon_of(disk.spawn(&args));
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let analysis = "    interval: 1s
    threshold: 2
    stepWeights: [10, 20, 30, 40, 50, 60, 70, 80]
    alerts:
      - {name: incidents, severity: error, providerRef: {name: incidents}}
";
    let file = dir.write(
        "rollout.yaml",
        &(rollout_yaml("checkout", &router, &v1, &v2, analysis)
            + &provider(
                "incidents",
                "webhook",
                &format!("{{file: {}}}", address.display()),
            )),
    );
    assert_eq!(
        cli(&daemon, &["apply", file.to_str().unwrap()], Some(TOKEN)).0,
        0
    );
    wait_for(&daemon, "checkout", Duration::from_secs(20), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 20.0
    });

    // The disk full, an abort cannot be saved: it is held, and nobody is told of a rollback
    // that has not happened.
    disk.fill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, out) = cli(&daemon, &["abort", "checkout"], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let held = collect(&received, Duration::from_secs(3));
    assert_eq!(held.len(), 0, "{held:#?}");
    assert_ne!(status(&daemon, "checkout")["phase"], "Failed");

    // Room again: the rollback is saved, then told, once.
    disk.free();
    wait_for(&daemon, "checkout", Duration::from_secs(10), |s| {
        s["phase"] == "Failed"
    });
    let told = collect(&received, Duration::from_secs(3));
    let told = bodies(&told, "/incidents");
    assert_eq!(told.len(), 1, "{told:#?}");
    assert_eq!(told[0]["phase"], "Failed");
    assert!(
        told[0]["reason"].as_str().unwrap().contains("abort"),
        "{:#}",
        told[0]
    );
}
