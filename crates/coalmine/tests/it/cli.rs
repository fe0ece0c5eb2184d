//! Bad input is refused with exit code 2 and a message naming the flag or field.

use crate::common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (i32, String) {
    code_and_printed(&Command::new(BIN).args(args).output().unwrap())
}

/// A proxy config file in a scratch directory (removed with the returned `TempDir`).
fn write_config(name: &str, text: &str) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(&format!("cli-{name}"));
    let path = dir.write("proxy.yaml", text);
    (dir, path)
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (args, flag) in [
        (vec!["proxy", "--stable", "not-a-url"], "--stable"),
        (
            vec!["proxy", "--stable", "http://a:1", "--canary", "https://b:2"],
            "--canary",
        ),
        (
            vec!["proxy", "--stable", "http://a:1", "--canary-weight", "101"],
            "--canary-weight",
        ),
        (
            vec![
                "proxy",
                "--stable",
                "http://a:1",
                "--canary-weight",
                "0.125",
            ],
            "--canary-weight",
        ),
        (
            vec![
                "proxy",
                "--stable",
                "http://a:1",
                "--match",
                "user-id~^(1|2",
            ],
            "--match",
        ),
        (
            vec!["proxy", "--stable", "http://a:1", "--match", "nothing"],
            "--match",
        ),
        (
            vec!["proxy", "--stable", "http://a:1", "--mirror", "x"],
            "--mirror",
        ),
        (
            vec!["proxy", "--stable", "http://a:1", "--threads", "0"],
            "--threads",
        ),
        (
            vec![
                "proxy",
                "--stable",
                "http://a:1",
                "--response-timeout",
                "5 parsecs",
            ],
            "--response-timeout",
        ),
        (vec!["proxy"], "--stable"),
    ] {
        let (code, text) = run(&args);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(flag), "{args:?}: {text}");
    }
}

#[test]
fn bad_config_file_names_file_line_column_and_field() {
    let cases = [
        (
            "weight",
            "stable: http://127.0.0.1:1\ncanary: http://127.0.0.1:2\ncanaryWeight: 250\n",
            ":3:",
            "canaryWeight",
        ),
        (
            "url",
            "stable: http://127.0.0.1:1\ncanary: ftp://x\n",
            ":2:",
            "canary",
        ),
        (
            "regex",
            "stable: http://127.0.0.1:1\nmatch:\n  - header: user-id\n    regex: \"^(1|2\"\n",
            ":3:",
            "regex",
        ),
        (
            "unknown",
            "stable: http://127.0.0.1:1\ncanaryWieght: 5\n",
            ":2:",
            "canaryWieght",
        ),
        ("yaml", "stable: [http://127.0.0.1:1\n", ":", "proxy.yaml"),
    ];
    for (name, yaml, line, field) in cases {
        let (_dir, path) = write_config(name, yaml);
        let (code, text) = run(&["proxy", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {text}");
        let expected_prefix = format!("{}{line}", path.display());
        assert!(
            text.contains(&expected_prefix),
            "{name}: wanted {expected_prefix} in {text}"
        );
        assert!(text.contains(field), "{name}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_sets_routes_and_flags_override_it() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let (_dir, path) = write_config(
        "good",
        &format!(
            "name: web-app\nstable: {}\ncanary: {}\ncanaryWeight: 0\nmatch:\n  - header: x-canary\n    exact: \"true\"\n  - user-id~^(1|2|3|4|5)$\nmirror: 0\nresponseTimeout: 5s\n",
            s.url, c.url
        ),
    );
    let r = router(&["--config", path.to_str().unwrap(), "--canary-weight", "0.5"]);
    let routes: serde_json::Value = get_json(&format!("{}/routes", r.admin)).await;
    assert_eq!(routes["name"], "web-app");
    assert_eq!(routes["canaryWeight"], 0.5, "the flag overrides the file");
    assert_eq!(routes["match"].as_array().unwrap().len(), 2);
    let body = client()
        .get(format!("{}/", r.base))
        .header("user-id", "4")
        .text_body()
        .await;
    assert_eq!(body.trim(), "canary");
}

#[test]
fn help_is_available_everywhere() {
    for args in [
        vec!["--help"],
        vec!["proxy", "--help"],
        vec!["demo", "--help"],
        vec!["upstream", "--help"],
        vec!["check", "--help"],
        vec!["convert", "--help"],
        vec!["run", "--help"],
        vec!["serve", "--help"],
        vec!["apply", "--help"],
        vec!["status", "--help"],
        vec!["history", "--help"],
        vec!["simulate", "--help"],
    ] {
        let (code, text) = run(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
}

fn fixture(path: &str) -> String {
    format!("{}/../../tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_every_flagger_example_and_reports_them_as_json() {
    // Flagger's three examples are alternatives for one Canary (podinfo in namespace test), so
    // each is checked with the seed's two; together they would be one name defined thrice.
    for example in [
        "flagger/istio-canary.yaml",
        "flagger/linkerd-canary.yaml",
        "flagger/linkerd-canary-steps.yaml",
    ] {
        let files = [
            fixture("seed/flagger-payment-service.yaml"),
            fixture("seed/flagger-web-app.yaml"),
            fixture(example),
        ];
        let mut args = vec!["check", "--output", "json"];
        args.extend(files.iter().map(String::as_str));
        let (code, text) = run(&args);
        assert_eq!(code, 0, "{text}");
        let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(report["documents"].as_array().unwrap().len(), 3);
        assert!(report["documents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["kind"] == "Canary"));
    }
}

#[test]
fn check_names_an_unknown_flagger_field_with_its_nearest_neighbour() {
    let text = std::fs::read_to_string(fixture("seed/flagger-web-app.yaml"))
        .unwrap()
        .replace("maxWeight: 50", "maxWieght: 50");
    let (_dir, path) = write_config("typo", &text);
    let (code, out) = run(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let line = text.lines().position(|l| l.contains("maxWieght")).unwrap() + 1;
    assert!(
        out.contains(&format!("{}:{line}:5: spec.analysis.maxWieght: unknown field `maxWieght`, did you mean `maxWeight`?", path.display())),
        "{out}"
    );
}

#[test]
fn convert_turns_the_seed_canary_into_a_rollout_that_check_accepts() {
    let seed = fixture("seed/flagger-payment-service.yaml");
    let (code, yaml) = run(&[&["convert", seed.as_str()][..], &IDLE_PLACEMENT].concat());
    assert_eq!(code, 0, "{yaml}");
    assert!(yaml.contains("kind: Rollout"), "{yaml}");
    assert!(yaml.contains("stepWeight: 10"), "{yaml}");
    let (_dir, path) = write_config("converted", &yaml);
    let (code, out) = run(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Rollout payment-service"), "{out}");

    let (code, out) = run(&["convert", &fixture("seed/flagger-payment-service.yaml")]);
    assert_eq!(code, 2, "placement flags are required: {out}");
    assert!(out.contains("--router"), "{out}");
}

fn scenario_example(name: &str) -> String {
    format!(
        "{}/../../examples/scenarios/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `simulate` on a group's files, with `extra` arguments: exit code, the JSON run, the output.
fn simulate_group(extra: &[&str]) -> (i32, serde_json::Value, String) {
    let group = scenario_example("group.yaml");
    let scenario = scenario_example("identical.yaml");
    let mut args = vec!["simulate", &group, "--scenario", &scenario, "--seed", "3"];
    args.extend_from_slice(extra);
    let (code, out) = run(&args);
    let json = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    (code, json, out)
}

/// The times (ms) at which each member logged `message`, in the group's order.
fn member_times(run: &serde_json::Value, message: &str) -> Vec<u64> {
    ["ledger", "payments", "orders"]
        .iter()
        .map(|m| {
            run["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["member"] == *m && t["message"] == message)
                .unwrap_or_else(|| panic!("{m}: no {message:?} in {run}"))["timeMs"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn simulate_runs_a_group_as_one_release_and_rolls_it_back_last_member_first() {
    // Nobody fails: all three take each step at the same moment, and all promote (exit 0).
    let (code, healthy, out) = simulate_group(&["--output", "json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(healthy["phase"], "Succeeded", "{healthy}");
    for m in healthy["members"].as_array().unwrap() {
        assert_eq!(m["decision"], "promoted", "{m}");
    }
    let at_10 = member_times(&healthy, "Advance canary weight 10");
    let at_50 = member_times(&healthy, "Advance canary weight 50");
    let promoted = member_times(&healthy, "Promotion completed");
    for times in [&at_10, &at_50, &promoted] {
        assert!(
            times.iter().all(|t| *t == times[0]),
            "not in lock-step: {times:?}"
        );
    }
    assert!(
        at_10[0] < at_50[0] && at_50[0] < promoted[0],
        "{at_10:?} {at_50:?} {promoted:?}"
    );

    // The last member's canary fails 10 % of requests: it rolls back, then payments, then
    // ledger (exit 1), and the group says why.
    let failing = format!("orders={}", scenario_example("errors-10pct.yaml"));
    let (code, failed, out) = simulate_group(&["--member-scenario", &failing, "--output", "json"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(failed["phase"], "RolledBack", "{failed}");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("group checkout-release: member orders rolled back (Sequential test"),
        "{reason}"
    );
    let order: Vec<&str> = failed["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["message"].as_str().unwrap().starts_with("Rolling back"))
        .map(|t| t["member"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["orders", "payments", "ledger"], "{failed}");
    // Ledger and payments were healthy: they went back only because orders failed.
    assert!(
        member_times(&failed, "Advance canary weight 10")[0]
            < failed["decidedMs"].as_u64().unwrap()
    );

    // The text timeline tells the same.
    let (code, _, out) = simulate_group(&["--member-scenario", &failing]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("group checkout-release: RolledBack at "),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains(" ledger ") && l.contains("Rolling back")),
        "{out}"
    );

    // Bad input exits 2: a member not among the files, named where it is written.
    let text = std::fs::read_to_string(scenario_example("group.yaml"))
        .unwrap()
        .replace("- name: orders\n---", "- name: order\n---");
    let (_dir, bad) = write_config("group", &text);
    let line = text
        .lines()
        .position(|l| l.ends_with("- name: order"))
        .unwrap()
        + 1;
    let scenario = scenario_example("identical.yaml");
    let (code, out) = run(&["simulate", bad.to_str().unwrap(), "--scenario", &scenario]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("proxy.yaml:{line}:"))
            && out.contains("spec.members[2].name")
            && out.contains("did you mean \"orders\""),
        "{out}"
    );
    // And a member scenario for a rollout outside the group.
    let (code, _, out) = simulate_group(&["--member-scenario", "billing=x.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("--member-scenario") && out.contains("\"billing\" is not a member"),
        "{out}"
    );
}

#[test]
fn simulate_prints_a_reproducible_summary_beside_flaggers_on_the_same_traces() {
    let args = [
        "simulate",
        &scenario_example("rollout.yaml"),
        "--scenario",
        &scenario_example("errors-10pct.yaml"),
        "--runs",
        "40",
        "--seed",
        "5",
        "--compare",
        "flagger",
        "--output",
        "json",
    ];
    let (code, out) = run(&args);
    assert_eq!(code, 0, "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["runs"], 40, "{summary}");
    assert_eq!(summary["rolledBack"], 40, "{summary}");
    assert_eq!(summary["flagger"]["rolledBack"], 40, "{summary}");
    let ours = summary["detectionSeconds"]["p50"].as_f64().unwrap();
    let flagger = summary["flagger"]["detectionSeconds"]["p50"]
        .as_f64()
        .unwrap();
    assert!(ours * 10.0 < flagger, "{ours} s vs Flagger's {flagger} s");
    for key in ["promoted", "undecided", "canaryRequests", "canaryFailures"] {
        assert!(summary.get(key).is_some(), "{key} missing: {summary}");
    }
    // The same seed gives the same runs.
    let (_, again) = run(&args);
    let again: serde_json::Value = serde_json::from_str(again.lines().last().unwrap()).unwrap();
    for key in [
        "detectionSeconds",
        "canaryRequests",
        "canaryFailures",
        "flagger",
    ] {
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("elapsedSeconds");
            }
            v
        };
        assert_eq!(strip(&summary[key]), strip(&again[key]), "{key}");
    }

    let (_bad_dir, bad) = write_config(
        "scenario",
        "traffic: {rps: 200}\nduration: 45m\nstable: {errorRate: 0.001, latency: {median: 50ms, sigma: 0.5}}\ncanary: {errorRate: 2, latency: {median: 50ms, sigma: 0.5}}\n",
    );
    let (code, out) = run(&[
        "simulate",
        &scenario_example("rollout.yaml"),
        "--scenario",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(":4:") && out.contains("canary.errorRate"),
        "{out}"
    );
}
