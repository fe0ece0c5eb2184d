//! `coalmine check` as a user runs it on their manifests: directories, several files, stdin,
//! other tools' documents with Coalmine's equivalent, every mistake at once; and the names,
//! numbers, regexes and ports that every command refuses the same way.

use crate::common;

use std::process::{Command, Stdio};

use common::*;

/// Runs the binary; returns (exit code, stdout, stderr).
fn coalmine(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.args(args).env("COALMINE_LOG", "warn");
    let out = match stdin {
        Some(text) => output_with_stdin(&mut command, text.as_bytes()),
        None => command.stdin(Stdio::null()).output(),
    }
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn seed_dir() -> String {
    format!("{}/../../tests/fixtures/seed", env!("CARGO_MANIFEST_DIR"))
}

/// A Rollout at the addresses of [`IDLE_PLACEMENT`].
fn rollout(name: &str) -> String {
    rollout_yaml_at(
        name,
        [IDLE_PLACEMENT[1], IDLE_PLACEMENT[3], IDLE_PLACEMENT[5]],
        "    interval: 1s
    threshold: 2
    stepWeights: [10, 50]
",
    )
}

/// `coalmine check FILE` exits 2 and says `says` on stderr.
#[track_caller]
fn assert_check_refuses(file: &std::path::Path, says: &str) {
    let (code, _, err) = coalmine(&["check", file.to_str().unwrap()], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(says), "{err}");
}

const CANARY: &str = "apiVersion: flagger.app/v1beta1
kind: Canary
metadata:
  name: web-app
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web-app}
  analysis:
    interval: 1m
    threshold: 5
    maxWeight: 50
    stepWeight: 5
";

#[test]
fn check_on_a_directory_of_existing_manifests_passes_with_a_note_for_each_other_kind() {
    let (code, out, err) = coalmine(&["check", &seed_dir()], None);
    assert_eq!(code, 0, "{out}{err}");
    let dir = seed_dir();
    for expected in [
        format!("ok    {dir}/flagger-payment-service.yaml:1  Canary payment-service"),
        format!("note: {dir}/istio-user.yaml:3: VirtualService web-app: not applied by Coalmine"),
        format!("note: {dir}/k8s-native.yaml:3: Deployment web-app-stable: not read by Coalmine"),
        format!("note: {dir}/k8s-native.yaml:43: Service web-app: not read by Coalmine"),
        format!("note: {dir}/istio-weighted.yaml:29: DestinationRule web-app"),
        format!("note: {dir}/prometheus-canary-rules.yaml:2: Prometheus rule file"),
        "  http[0] (line 10): requests with header user-id matching ^(1|2|3|4|5)$ go to subset canary: coalmine proxy --match 'user-id~^(1|2|3|4|5)$'".to_string(),
        "rollbackOnAlerts: [{alertname: CanaryHighErrorRate}]".to_string(),
    ] {
        assert!(out.contains(&expected), "wanted {expected:?} in\n{out}");
    }
    assert!(!out.contains("unsupported"), "{out}");

    let (code, out, _) = coalmine(&["check", &seed_dir(), "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!(report["documents"].as_array().unwrap().len(), 2, "{report}");
    let notes = report["notes"].as_array().unwrap();
    let kinds: Vec<&str> = notes.iter().map(|n| n["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "VirtualService",
            "VirtualService",
            "VirtualService",
            "DestinationRule",
            "Deployment",
            "Deployment",
            "Service",
            "Prometheus rule file"
        ],
        "{report}"
    );
    assert_eq!(notes[4]["name"], "web-app-stable");
    assert_eq!(notes[4]["line"], 3);
    assert!(notes[1]["equivalents"][0]
        .as_str()
        .unwrap()
        .contains("--match 'user-id~^(1|2|3|4|5)$'"));
}

/// The rule `check` writes out for the seed's user-based VirtualService routes as Istio did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_match_flag_check_writes_for_a_virtual_service_routes_like_it() {
    let file = format!("{}/istio-user.yaml", seed_dir());
    let (code, out, err) = coalmine(&["check", &file], None);
    assert_eq!(code, 0, "{err}");
    let quoted = out
        .split("--match ")
        .nth(1)
        .and_then(|rest| rest.split(", or").next())
        .unwrap();
    let rule = quoted.trim_matches('\'');
    assert_eq!(rule, "user-id~^(1|2|3|4|5)$");
    let (stable, canary) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&stable, &canary, &["--canary-weight", "0", "--match", rule]);
    for (user, version) in [
        ("3", "canary"),
        ("5", "canary"),
        ("13", "stable"),
        ("6", "stable"),
    ] {
        let body = client()
            .get(format!("{}/", r.base))
            .header("user-id", user)
            .text_body()
            .await;
        assert_eq!(body.trim(), version, "user-id {user}");
    }
}

#[test]
fn check_reports_every_mistake_in_every_file_then_exits_2() {
    let dir = TempDir::new("check-all");
    let one = dir.write(
        "one.yaml",
        &format!(
            "{}---\n{}",
            rollout("a/b"),
            rollout("fine").replace("threshold: 2", "threshold: five")
        ),
    );
    let two = dir.write("two.yaml", &rollout("Other"));
    let three = dir.write("three.yaml", &rollout("fine"));
    let paths = [&one, &two, &three].map(|p| p.display().to_string());
    let (code, out, err) = coalmine(&["check", &paths[0], &paths[1], &paths[2]], None);
    assert_eq!(code, 2, "{out}{err}");
    for expected in [
        format!("{}:4:9: metadata.name: \"a/b\" is not a valid name", paths[0]),
        format!(
            "{}:24:16: spec.analysis.threshold: expected a whole number (0 or more), got \"five\"",
            paths[0]
        ),
        format!(
            "{}:4:9: metadata.name: \"Other\" is not a valid name: uppercase 'O' is not allowed (lowercase only); did you mean \"other\"?",
            paths[1]
        ),
        "coalmine: 3 errors in 2 files".to_string(),
    ] {
        assert!(err.contains(&expected), "wanted {expected:?} in\n{err}");
    }
    assert!(
        out.contains(&format!("ok    {}:1  Rollout fine", paths[2])),
        "{out}"
    );

    let (code, out, _) = coalmine(&["check", "--output", "json", &paths[0], &paths[1]], None);
    assert_eq!(code, 2, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["valid"], false);
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{report}");
    assert_eq!(errors[1]["field"], "spec.analysis.threshold");
    assert_eq!(errors[1]["line"], 24);
    assert_eq!(errors[1]["column"], 16);
}

#[test]
fn a_directory_is_read_file_by_file_in_order_but_not_its_subdirectories() {
    let dir = TempDir::new("check-dir");
    dir.write("b.yml", &rollout("second"));
    dir.write("a.yaml", &rollout("first"));
    dir.write("notes.txt", "not a manifest");
    std::fs::create_dir(dir.path.join("overlay")).unwrap();
    dir.write("overlay/c.yaml", &rollout("first"));
    let (code, out, err) = coalmine(&["check", dir.path.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    let listed: Vec<&str> = out.lines().collect();
    assert_eq!(listed.len(), 2, "{out}");
    assert!(listed[0].ends_with("a.yaml:1  Rollout first"), "{out}");
    assert!(listed[1].ends_with("b.yml:1  Rollout second"), "{out}");

    let empty = TempDir::new("check-empty");
    let (code, _, err) = coalmine(&["check", empty.path.to_str().unwrap()], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no *.yaml or *.yml files"), "{err}");
}

#[test]
fn stdin_is_read_for_a_dash_and_reported_as_stdin() {
    let (code, out, err) = coalmine(&["check", "-"], Some(&rollout("web")));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok    <stdin>:1  Rollout web"), "{out}");
    let (code, _, err) = coalmine(&["check", "-"], Some(&rollout("we..b")));
    assert_eq!(code, 2);
    assert!(
        err.contains("<stdin>:4:9: metadata.name: \"we..b\""),
        "{err}"
    );
}

#[test]
fn two_rollouts_of_one_name_are_an_error_naming_both_files() {
    let dir = TempDir::new("check-twice");
    let a = dir.write("a.yaml", &rollout("web"));
    let b = dir.write("b.yaml", &rollout("web"));
    let (code, _, err) = coalmine(&["check", a.to_str().unwrap(), b.to_str().unwrap()], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "{}:4:9: metadata.name: Rollout \"web\" has the same name as the Rollout at {}:4",
            b.display(),
            a.display()
        )),
        "{err}"
    );
}

#[test]
fn an_alert_provider_is_listed_with_its_name() {
    let provider = "apiVersion: flagger.app/v1beta1
kind: AlertProvider
metadata: {name: on-call}
spec: {type: slack, channel: releases, address: 'https://hooks.slack.com/services/x'}
";
    let dir = TempDir::new("provider");
    let file = dir.write("provider.yaml", provider);
    let (code, out, err) = coalmine(&["check", file.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("provider.yaml:1  AlertProvider on-call"),
        "{out}"
    );
}

#[test]
fn every_command_that_loads_documents_refuses_a_bad_name_with_exit_2() {
    let dir = TempDir::new("names");
    let long = "x".repeat(5000);
    for name in ["\"\"", "a/b", "..", "\"a\\0b\"", "\"a\\nb\"", long.as_str()] {
        let file = dir.write("r.yaml", &rollout(name));
        let file = file.to_str().unwrap();
        let canary = dir.write(
            "c.yaml",
            &CANARY.replace("  name: web-app\nspec", &format!("  name: {name}\nspec")),
        );
        let canary = canary.to_str().unwrap();
        let mut convert = vec!["convert", canary];
        convert.extend(IDLE_PLACEMENT);
        let mut run_canary = vec!["run", canary];
        run_canary.extend(IDLE_PLACEMENT);
        for (args, line) in [
            (vec!["check", file], 4),
            (vec!["run", file], 4),
            (vec!["simulate", file, "--scenario", file], 4),
            (convert, 4),
            (run_canary, 4),
            (vec!["apply", file, "--api", "http://127.0.0.1:9"], 4),
        ] {
            let (code, out, err) = coalmine(&args, None);
            assert_eq!(code, 2, "{args:?} {name}: {out}{err}");
            assert!(
                err.contains(&format!(".yaml:{line}:9: metadata.name: ")),
                "{args:?} {name}: {err}"
            );
            assert!(err.contains("DNS-1123 label"), "{err}");
            assert!(!err.contains('\0'), "a NUL is shown escaped");
            assert!(
                err.len() < 2000,
                "a long name is cut short: {} bytes",
                err.len()
            );
        }
    }
}

#[test]
fn ports_out_of_range_are_refused_in_flags_and_documents() {
    let dir = TempDir::new("ports");
    let canary = dir.write("c.yaml", CANARY);
    let canary = canary.to_str().unwrap();
    let good = [
        ("--router", "http://127.0.0.1:9901"),
        ("--stable", "http://127.0.0.1:9001"),
        ("--canary", "http://127.0.0.1:9002"),
    ];
    for bad in ["--router", "--stable", "--canary"] {
        for command in ["convert", "run"] {
            let mut args = vec![command, canary];
            for (flag, value) in good {
                args.push(flag);
                args.push(if flag == bad {
                    "http://127.0.0.1:99999"
                } else {
                    value
                });
            }
            let (code, out, err) = coalmine(&args, None);
            assert_eq!(code, 2, "{args:?}: {out}{err}");
            assert!(
                err.contains(&format!(
                    "{bad}: \"http://127.0.0.1:99999\": port 99999 is out of range (ports are 1 to 65535)"
                )),
                "{args:?}: {err}"
            );
        }
    }
    for (stable, canary) in [
        ("http://127.0.0.1:99999", "http://127.0.0.1:9002"),
        ("http://127.0.0.1:9001", "http://127.0.0.1:99999"),
    ] {
        let args = ["proxy", "--stable", stable, "--canary", canary];
        let (code, _, err) = coalmine(&args, None);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("port 99999 is out of range"), "{err}");
    }
    let file = dir.write(
        "r.yaml",
        &rollout("web").replace("127.0.0.1:9002", "127.0.0.1:99999"),
    );
    assert_check_refuses(
        &file,
        "r.yaml:8:17: spec.canary.url: \"http://127.0.0.1:99999\": port 99999 is out of range",
    );
}

#[test]
fn a_bad_regex_is_shown_as_the_user_wrote_it() {
    let (code, _, err) = coalmine(
        &[
            "proxy",
            "--stable",
            "http://127.0.0.1:9001",
            "--match",
            "user-id~^(1|2",
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(r#"invalid regex "^(1|2": unclosed group (at character 2)"#),
        "{err}"
    );
    assert!(!err.contains("(?:"), "{err}");
    // Not whole by itself, this pattern would escape the anchors: `^(?:a)|(b)$`.
    let (code, _, err) = coalmine(
        &[
            "proxy",
            "--stable",
            "http://127.0.0.1:9001",
            "--match",
            "x~a)|(b",
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(r#"invalid regex "a)|(b""#), "{err}");

    let dir = TempDir::new("regex");
    let config = dir.write(
        "proxy.yaml",
        "stable: http://127.0.0.1:9001\nmatch:\n  - header: user-id\n    regex: \"[a-\"\n",
    );
    let (code, _, err) = coalmine(&["proxy", "--config", config.to_str().unwrap()], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(r#"invalid regex "[a-""#), "{err}");
    assert!(!err.contains("(?:"), "{err}");

    let file = dir.write(
        "r.yaml",
        &rollout("web").replace(
            "    stepWeights: [10, 50]\n",
            "    stepWeights: [10, 50]\n    match:\n      - headers: {user-id: {regex: '^(1|2'}}\n",
        ),
    );
    assert_check_refuses(
        &file,
        "r.yaml:14:36: spec.analysis.match[0].headers.user-id.regex: invalid regex \"^(1|2\": unclosed group",
    );
}

#[test]
fn top_level_help_shows_status_watch_after_the_name() {
    let (code, out, _) = coalmine(&["--help"], None);
    assert_eq!(code, 0);
    assert!(out.contains("`status NAME --watch`"), "{out}");
    assert!(!out.contains("--watch NAME"), "{out}");
}

#[test]
fn a_blue_green_rollout_without_a_preview_is_warned_that_nothing_measures_it() {
    let blue_green =
        rollout("bluegreen").replace("    stepWeights: [10, 50]\n", "    iterations: 3\n");
    let (code, _, stderr) = coalmine(&["check", "-"], Some(&blue_green));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("blue-green") && stderr.contains("spec.preview"),
        "{stderr}"
    );
    let previewed = blue_green.replace(
        "  analysis:\n",
        "  preview:\n    - headers: {x-preview: {exact: \"true\"}}\n  analysis:\n",
    );
    let (code, _, stderr) = coalmine(&["check", "-"], Some(&previewed));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("blue-green"), "{stderr}");
}

#[test]
fn a_placement_places_its_canary_and_one_without_a_canary_is_an_error() {
    let dir = TempDir::new("placement");
    let seed =
        std::fs::read_to_string(format!("{}/flagger-payment-service.yaml", seed_dir())).unwrap();
    let canary = dir.write("canary.yaml", &seed);
    let placement = "apiVersion: coalmine.dev/v1alpha1
kind: Placement
metadata:
  name: payment-service
spec:
  routers: [http://127.0.0.1:9901]
  stable: {url: http://127.0.0.1:9001}
  canary: {url: http://127.0.0.1:9002}
  hosts:
    flagger-loadtester: 127.0.0.1:8089
";
    let placed = dir.write("placement.yaml", placement);
    let (code, stdout, stderr) = coalmine(
        &[
            "convert",
            canary.to_str().unwrap(),
            placed.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("url: http://127.0.0.1:8089"), "{stdout}");
    assert!(stdout.contains("routers:"), "{stdout}");
    let orphan = dir.write(
        "orphan.yaml",
        &placement.replace("name: payment-service", "name: other"),
    );
    let (code, _, stderr) = coalmine(
        &[
            &[
                "convert",
                canary.to_str().unwrap(),
                orphan.to_str().unwrap(),
            ][..],
            &IDLE_PLACEMENT,
        ]
        .concat(),
        None,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("places no Canary"), "{stderr}");
    let bad = dir.write(
        "bad.yaml",
        &placement.replace("127.0.0.1:8089", "127.0.0.1"),
    );
    assert_check_refuses(&bad, "bad.yaml:10:");
}
