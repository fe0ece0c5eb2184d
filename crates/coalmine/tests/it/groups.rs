//! Rollout groups under `serve`: three services of one router (ledger, payments, orders)
//! released as one. Their users stay in one cohort across the services, they move in
//! lock-step, and one member's failure rolls every member back, the last listed first, a
//! promoted one to its previous version.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

const SERVICES: [&str; 3] = ["ledger", "payments", "orders"];

/// Each service's stable and canary upstreams (the canary of `failing` answers 500 to 10 %),
/// and one router with a service per path prefix, sticky by the user's id.
struct Shop {
    upstreams: Vec<(Upstream, Upstream)>,
    router: Router,
    /// More of every member's `analysis` (indented as its fields).
    analysis: String,
}

impl Shop {
    fn start(dir: &TempDir, failing: Option<&str>) -> Shop {
        let upstreams: Vec<(Upstream, Upstream)> = SERVICES
            .iter()
            .map(|s| {
                let faults: &[&str] = if Some(*s) == failing {
                    &["--error-rate", "0.1"]
                } else {
                    &[]
                };
                (
                    upstream(&format!("{s}-v1"), &[]),
                    upstream(&format!("{s}-v2"), faults),
                )
            })
            .collect();
        let services: String = SERVICES
            .iter()
            .zip(&upstreams)
            .map(|(s, (v1, _))| {
                format!(
                    "  - service: {s}\n    paths: [/{s}]\n    sticky: {{header: x-user-id}}\n    stable: {}\n",
                    v1.url
                )
            })
            .collect();
        let config = dir.write("router.yaml", &format!("services:\n{services}"));
        let router = router(&["--config", config.to_str().unwrap()]);
        Shop {
            upstreams,
            router,
            analysis: String::new(),
        }
    }

    /// Writes the group and its members to one file and applies it to `daemon`; the file.
    fn apply(
        &self,
        dir: &TempDir,
        daemon: &Daemon,
        group: &str,
        steps: [&str; 3],
        processes: bool,
    ) -> std::path::PathBuf {
        let file = dir.write("release.yaml", &self.documents(group, steps, processes));
        let (code, out) = cli(daemon, &["apply", file.to_str().unwrap()], Some(TOKEN));
        assert_eq!(code, 0, "{out}");
        file
    }

    /// The group and its members, one file. With `processes`, ledger's versions are processes
    /// `serve` runs itself (the new one stops when it loses, the old one when it is replaced).
    fn documents(&self, group: &str, steps: [&str; 3], processes: bool) -> String {
        let mut docs = vec![group.to_string()];
        for (i, service) in SERVICES.iter().enumerate() {
            let (v1, v2) = &self.upstreams[i];
            let analysis = format!(
                "    interval: 1s\n    threshold: 2\n    stepWeights: {}\n{}",
                steps[i], self.analysis
            );
            let mut doc = rollout_yaml(service, &self.router, v1, v2, &analysis)
                .replace("spec:\n", &format!("spec:\n  routerService: {service}\n"));
            if processes && *service == "ledger" {
                let process = |name: &str| {
                    format!("{{command: [{BIN}, upstream, --listen, '127.0.0.1:{{port}}', --name, {name}], readiness: {{path: /healthz, timeout: 10s}}}}")
                };
                doc = doc
                    .replace(&format!("{{url: {}}}", v1.url), &process("ledger-v1"))
                    .replace(&format!("{{url: {}}}", v2.url), &process("ledger-v2"));
            }
            docs.push(doc);
        }
        docs.join("---\n")
    }
}

/// Applies `member`'s document from the group's `file` again, alone (`apply --restart`).
fn apply_alone(daemon: &Daemon, dir: &TempDir, file: &std::path::Path, member: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let document = text
        .split("---\n")
        .find(|d| d.contains("kind: Rollout\n") && d.contains(&format!("name: {member}\n")))
        .unwrap();
    let alone = dir.write(&format!("{member}.yaml"), document);
    let (code, out) = cli(
        daemon,
        &["apply", "--restart", alone.to_str().unwrap()],
        Some(TOKEN),
    );
    assert_eq!(code, 0, "{out}");
}

fn group_status(daemon: &Daemon, name: &str) -> serde_json::Value {
    let (code, out) = cli(daemon, &["group", "status", name, "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn wait_for_group(
    daemon: &Daemon,
    name: &str,
    within: Duration,
    what: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_until(within, || group_status(daemon, name), what)
}

/// A group's timeline, as `coalmine group history --output json` prints it.
struct History(Vec<serde_json::Value>);

impl History {
    fn of(daemon: &Daemon, group: &str) -> History {
        let (code, out) = cli(
            daemon,
            &["group", "history", group, "--output", "json"],
            None,
        );
        assert_eq!(code, 0, "{out}");
        History(
            out.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }

    /// When `member` first said something starting with `starts` (RFC 3339: ordered as text).
    fn time(&self, member: &str, starts: &str) -> String {
        self.0
            .iter()
            .find(|e| e["rollout"] == member && e["message"].as_str().unwrap().starts_with(starts))
            .unwrap_or_else(|| panic!("no {starts:?} of {member} in {:#?}", self.0))["time"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// When each member said `message`.
    fn every(&self, message: &str) -> std::vec::IntoIter<String> {
        SERVICES
            .iter()
            .map(|s| self.time(s, message))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

fn weights(group: &serde_json::Value) -> Vec<f64> {
    group["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["canaryWeight"].as_f64().unwrap())
        .collect()
}

/// Pauses every member once all stand at `weight` and returns the group so held: nothing
/// moves while the test looks at the users.
fn hold_at(daemon: &Daemon, group: &str, weight: f64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        wait_for_group(daemon, group, Duration::from_secs(30), |g| {
            weights(g).iter().all(|w| *w == weight)
        });
        for s in SERVICES {
            let (code, out) = cli(daemon, &["pause", s], Some(TOKEN));
            assert_eq!(code, 0, "{out}");
        }
        let g = wait_for_group(daemon, group, Duration::from_secs(5), |g| {
            g["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["paused"] == true)
        });
        if weights(&g).iter().all(|w| *w == weight) {
            return g;
        }
        // Paused between two members' steps: try the next step.
        assert!(Instant::now() < deadline, "never held at one weight: {g:#}");
        for s in SERVICES {
            cli(daemon, &["resume", s], Some(TOKEN));
        }
    }
}

/// Which version (`v1`, `v2`) of each service answers one user's chain of requests.
async fn chain(c: &reqwest::Client, router: &Router, user: &str) -> Vec<String> {
    let mut versions = Vec::new();
    for service in SERVICES {
        let r = c
            .get(format!("{}/{service}/checkout", router.base))
            .header("x-user-id", user)
            .send()
            .await
            .unwrap();
        let who = who_answered(&r);
        versions.push(who.rsplit('-').next().unwrap().to_string());
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_moves_in_lock_step_and_keeps_each_user_on_one_version_across_its_services() {
    let dir = scratch("group-cohort");
    let shop = Shop::start(&dir, None);
    let daemon = serve(&dir);
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  policy: together
  members: [{name: ledger}, {name: payments}, {name: orders}]
";
    let steps = "[30, 60]";
    let file = shop.apply(&dir, &daemon, group, [steps, steps, steps], false);

    // Held at one step (each member paused once all three reached it): the cohort is checked
    // while nothing moves.
    let held = hold_at(&daemon, "payment-change", 30.0);
    assert_eq!(held["phase"], "Progressing", "{held:#}");
    for member in held["members"].as_array().unwrap() {
        assert_eq!(member["group"], "payment-change", "{member:#}");
    }
    // The dashboard's page of a member says which group it moves with.
    let page = get_json(&format!("{}/api/v1/rollouts/orders/live", daemon.api)).await;
    assert_eq!(page["group"], "payment-change");

    // 10,002 requests: 3,334 users, each a chain through the three services.
    let users = 3334;
    let c = client();
    let mut mixed = Vec::new();
    let mut on_canary = 0;
    for u in 0..users {
        let versions = chain(&c, &shop.router, &format!("user-{u}")).await;
        if versions.iter().any(|v| *v != versions[0]) {
            mixed.push(format!("user-{u}: {versions:?}"));
        } else if versions[0] == "v2" {
            on_canary += 1;
        }
    }
    eprintln!(
        "{on_canary} of {users} users on every canary, {} mixed",
        mixed.len()
    );
    assert!(
        mixed.is_empty(),
        "{} mixed chains: {:?}",
        mixed.len(),
        &mixed[..mixed.len().min(10)]
    );
    // Binomial(3334, 0.3): mean 1000.2, sd 26.5; six sd either side.
    assert!(
        (841..=1159).contains(&on_canary),
        "{on_canary} of {users} users on the canaries at 30 %"
    );

    for s in SERVICES {
        let (code, out) = cli(&daemon, &["resume", s], Some(TOKEN));
        assert_eq!(code, 0, "{out}");
    }
    let done = wait_for_group(&daemon, "payment-change", Duration::from_secs(60), |g| {
        g["phase"] == "Succeeded"
    });
    assert!(done["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["phase"] == "Succeeded"));
    // Everyone on the new versions.
    let versions = chain(&c, &shop.router, "user-1").await;
    assert_eq!(versions, ["v2", "v2", "v2"]);

    // One timeline: each member's steps, named; 60 % was taken by every member only after
    // every member had taken 30 %.
    let history = History::of(&daemon, "payment-change");
    let last_at_30 = history.every("Advance canary weight 30").max();
    let first_at_60 = history.every("Advance canary weight 60").min();
    assert!(
        last_at_30 <= first_at_60,
        "{last_at_30:?} > {first_at_60:?}"
    );

    // A member applied again alone stays a member: the same group, the same cohort (the
    // route's name salts its sticky buckets).
    apply_alone(&daemon, &dir, &file, "orders");
    assert_eq!(status(&daemon, "orders")["group"], "payment-change");
    let routes = get_json(&format!("{}/routes/orders", shop.router.admin)).await;
    assert_eq!(routes["name"], "group/payment-change", "{routes:#}");
}

/// One request of a user carrying `cookie` (if any): who answered, and the affinity cookie
/// the answer set (`NAME=VALUE`).
async fn visit(
    c: &reqwest::Client,
    router: &Router,
    service: &str,
    cookie: Option<&str>,
) -> (String, Option<String>) {
    let mut req = c.get(format!("{}/{service}/checkout", router.base));
    if let Some(cookie) = cookie {
        req = req.header("cookie", cookie);
    }
    let r = req.send().await.unwrap();
    let version = who_answered(&r).rsplit('-').next().unwrap().to_string();
    let set = r.headers().get("set-cookie").map(|v| {
        let v = v.to_str().unwrap();
        v.split(';').next().unwrap().to_string()
    });
    (version, set)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_affinity_cookie_pins_a_user_on_every_members_canary_until_the_group_rolls_back() {
    let dir = scratch("group-affinity");
    let mut shop = Shop::start(&dir, None);
    shop.analysis = "    sessionAffinity: {cookieName: shop-canary}\n".into();
    let daemon = serve(&dir);
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  members: [{name: ledger}, {name: payments}, {name: orders}]
";
    let steps = "[30, 60]";
    shop.apply(&dir, &daemon, group, [steps, steps, steps], false);
    hold_at(&daemon, "payment-change", 30.0);

    // 360 users without a sticky id: each lands on one service (in turn ledger, payments,
    // orders) by the router's draw, and one the canary answered goes on through every
    // service with the cookie it was given.
    let c = client();
    let users = 360;
    let mut cookies = Vec::new();
    let mut mixed = Vec::new();
    for u in 0..users {
        let first = SERVICES[u % 3];
        let (version, cookie) = visit(&c, &shop.router, first, None).await;
        match (version.as_str(), cookie) {
            ("v1", None) => continue,
            ("v2", Some(cookie)) => {
                let mut versions = Vec::new();
                for service in SERVICES {
                    versions.push(visit(&c, &shop.router, service, Some(&cookie)).await.0);
                }
                if versions.iter().any(|v| v != "v2") {
                    mixed.push(format!("user-{u} pinned by {first}: {versions:?}"));
                }
                cookies.push(cookie);
            }
            other => panic!("user-{u} on {first}: {other:?}"),
        }
    }
    let pinned = cookies.len();
    eprintln!(
        "{pinned} of {users} users pinned by one member's canary, {} mixed chains",
        mixed.len()
    );
    assert!(
        mixed.is_empty(),
        "{} mixed: {:?}",
        mixed.len(),
        &mixed[..mixed.len().min(10)]
    );
    // Binomial(360, 0.3): mean 108, sd 8.7; six sd either side.
    assert!(
        (56..=160).contains(&pinned),
        "{pinned} of {users} pinned at 30 %"
    );
    // One cookie, whichever member's canary set it.
    cookies.sort();
    cookies.dedup();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let cookie = &cookies[0];
    assert!(cookie.starts_with("shop-canary="), "{cookie}");

    // A member aborted: the group rolls back, and the cookie pins nobody any more.
    let (code, out) = cli(&daemon, &["abort", "payments"], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    wait_for_group(&daemon, "payment-change", Duration::from_secs(60), |g| {
        g["phase"] == "RolledBack"
    });
    let mut seen = BTreeMap::new();
    for _ in 0..pinned {
        for service in SERVICES {
            let (version, set) = visit(&c, &shop.router, service, Some(cookie)).await;
            assert_eq!(set, None, "{service} pinned a user after the rollback");
            *seen.entry(version).or_insert(0) += 1;
        }
    }
    assert_eq!(seen, BTreeMap::from([("v1".to_string(), 3 * pinned)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_rolls_the_whole_group_back_last_listed_first_a_promoted_one_too() {
    let dir = scratch("group-rollback");
    let shop = Shop::start(&dir, Some("orders"));
    let daemon = serve(&dir);
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  policy: order
  members:
    - name: ledger
    - name: payments
      dependsOn: [{name: ledger, reached: promoted}]
    - name: orders
      dependsOn: [{name: payments, reached: 20}]
";
    let ladder = "[20, 40, 60, 80]";

    // Users on every service, each with an id of their own, until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let traffic: Vec<_> = (0..6)
        .map(|t| {
            let (stop, answered) = (stop.clone(), answered.clone());
            let base = shop.router.base.clone();
            tokio::spawn(async move {
                let c = client();
                let deadline = Instant::now() + Duration::from_secs(90);
                let mut u = 0u64;
                while !stop.load(Relaxed) && Instant::now() < deadline {
                    let service = SERVICES[t % 3];
                    u += 1;
                    let r = c
                        .get(format!("{base}/{service}/pay"))
                        .header("x-user-id", format!("user-{t}-{u}"))
                        .send()
                        .await;
                    if r.is_ok() {
                        answered.fetch_add(1, Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    let file = shop.apply(&dir, &daemon, group, ["[50]", ladder, ladder], true);
    let done = wait_for_group(&daemon, "payment-change", Duration::from_secs(60), |g| {
        g["phase"] == "RolledBack"
    });
    stop.store(true, Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    let reason = done["reason"].as_str().unwrap();
    assert!(reason.contains("member orders rolled back"), "{reason}");
    // The evidence of orders' own rollback comes with it.
    assert!(reason.contains("canary"), "{reason}");

    let history = History::of(&daemon, "payment-change");
    let at = |member: &str, starts: &str| history.time(member, starts);
    // ledger was promoted before payments started; orders started at payments' 20 %.
    assert!(at("ledger", "Promotion completed") < at("payments", "Advance canary weight 20"));
    assert!(at("payments", "Advance canary weight 20") <= at("orders", "Advance canary weight 20"));
    // Reverse order: orders (the failure), payments, then ledger's promoted version.
    let orders_failed = at("orders", "Rolling back: ");
    let payments_back = at("payments", "Rolling back: group payment-change");
    let ledger_back = at(
        "ledger",
        "Rolling back the promoted version: group payment-change",
    );
    assert!(orders_failed <= payments_back && payments_back <= ledger_back);
    let started = at("orders", "Advance canary weight 20");
    eprintln!(
        "orders on the canary at {started}, failed at {orders_failed}; payments back at {payments_back}, ledger at {ledger_back}; {} requests answered",
        answered.load(Relaxed)
    );

    // Every user on the old versions again, ledger's included: its old version's process was
    // kept for the group after ledger's promotion.
    let c = client();
    let mut seen = BTreeMap::new();
    for u in 0..300 {
        for v in chain(&c, &shop.router, &format!("after-{u}")).await {
            *seen.entry(v).or_insert(0) += 1;
        }
    }
    assert_eq!(seen, BTreeMap::from([("v1".to_string(), 900)]));

    // orders applied again alone: the earlier run's failure is not held against it; it waits
    // at its start for payments, which rolled back in that run, to be applied again.
    apply_alone(&daemon, &dir, &file, "orders");
    let waiting = wait_for_group(&daemon, "payment-change", Duration::from_secs(10), |g| {
        g["phase"] == "Progressing"
    });
    std::thread::sleep(Duration::from_secs(2));
    let orders = status(&daemon, "orders");
    assert_eq!(orders["phase"], "Waiting", "{orders:#}\n{waiting:#}");
    let message = orders["message"].as_str().unwrap();
    assert!(
        message.contains("payments (rolled back in an earlier run: apply it again)"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_group_resumes_it_in_lock_step() {
    let dir = scratch("group-killed");
    let shop = Shop::start(&dir, None);
    let mut daemon = serve(&dir);
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  members: [{name: ledger}, {name: payments}, {name: orders}]
";
    let steps = "[20, 40, 60]";
    shop.apply(&dir, &daemon, group, [steps, steps, steps], false);
    wait_for_group(&daemon, "payment-change", Duration::from_secs(30), |g| {
        weights(g).iter().any(|w| *w >= 20.0)
    });
    // kill -9: nothing of the daemon's is left but its state file.
    daemon.proc.child.kill().unwrap();
    daemon.proc.child.wait().unwrap();
    daemon = serve(&dir);
    let done = wait_for_group(&daemon, "payment-change", Duration::from_secs(60), |g| {
        g["phase"] == "Succeeded"
    });
    assert_eq!(weights(&done), [0.0, 0.0, 0.0], "{done:#}");
    let history = History::of(&daemon, "payment-change");
    // Every step was taken by every member only after every member had taken the one before,
    // across the restart.
    for (lower, higher) in [("20", "40"), ("40", "60")] {
        let last = history
            .every(&format!("Advance canary weight {lower}"))
            .max();
        let first = history
            .every(&format!("Advance canary weight {higher}"))
            .min();
        assert!(
            last <= first,
            "{lower} % last at {last:?}, {higher} % first at {first:?}"
        );
    }
    assert_eq!(
        chain(&client(), &shop.router, "user-7").await,
        ["v2", "v2", "v2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_and_its_promoted_member_are_not_deleted_while_the_group_may_still_revert_it() {
    let dir = scratch("group-delete");
    let shop = Shop::start(&dir, None);
    let daemon = serve(&dir);
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  policy: order
  members:
    - name: ledger
    - name: payments
      dependsOn: [{name: ledger, reached: promoted}]
    - name: orders
      dependsOn: [{name: payments, reached: promoted}]
";
    let ladder = "[10, 20, 30, 40, 50]";
    shop.apply(&dir, &daemon, group, ["[50]", ladder, "[50]"], false);
    wait_for(&daemon, "ledger", Duration::from_secs(30), |s| {
        s["outcome"] == "promoted"
    });
    // ledger is finished, but its group is not: were payments to fail, the group would put
    // ledger's old version back. Deleting ledger now would lose that.
    let (code, out) = cli(&daemon, &["delete", "ledger"], Some(TOKEN));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("member of rollout group payment-change"),
        "{out}"
    );
    assert_eq!(status(&daemon, "ledger")["outcome"], "promoted");
    assert_eq!(
        group_status(&daemon, "payment-change")["phase"],
        "Progressing"
    );
    // Nor the group itself: it alone opens its members' gates and would take ledger back.
    let (code, out) = cli(&daemon, &["group", "delete", "payment-change"], Some(TOKEN));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("rollout group payment-change is still Progressing"),
        "{out}"
    );
    // Once the group has ended, both may go; the group first, its members staying.
    wait_for_group(&daemon, "payment-change", Duration::from_secs(60), |g| {
        g["phase"] == "Succeeded"
    });
    let (code, out) = cli(&daemon, &["group", "delete", "payment-change"], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&daemon, &["group", "status", "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );
    let (code, _) = cli(&daemon, &["group", "status", "payment-change"], None);
    assert_ne!(code, 0, "the group is gone");
    let (code, out) = cli(&daemon, &["group", "delete", "payment-change"], Some(TOKEN));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("no rollout group named \"payment-change\""),
        "{out}"
    );
    assert_eq!(status(&daemon, "orders")["outcome"], "promoted");
    let (code, out) = cli(&daemon, &["delete", "ledger"], Some(TOKEN));
    assert_eq!(code, 0, "{out}");
}

/// Each member's canary weight as its router carries it, and as its saved status says.
async fn carried_and_saved(daemon: &Daemon, router: &Router) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for service in SERVICES {
        let routes = get_json(&format!("{}/routes/{service}", router.admin)).await;
        let saved = status(daemon, service);
        out.push((
            format!("{service} {} / {}", routes["stable"], saved["phase"]),
            routes["canaryWeight"].as_f64().unwrap_or(0.0),
            saved["canaryWeight"].as_f64().unwrap(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rolling_back_with_its_state_disk_full_moves_nothing_unsaved_and_ends_after() {
    group_with_a_full_disk(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_its_group_failing_on_a_full_disk_rolls_it_back_once_restarted() {
    group_with_a_full_disk(true).await;
}

/// orders fails while the state disk is full; room returns (with `kill`: the daemon is killed
/// -9 first, and started again once there is room).
async fn group_with_a_full_disk(kill: bool) {
    let dir = scratch(if kill {
        "group-diskfull-kill"
    } else {
        "group-diskfull"
    });
    let disk_dir = TempDir::new("tinydisk");
    let disk = common::tinydisk::TinyDisk::mount(&disk_dir.path, 4096);
    let shop = Shop::start(&dir, Some("orders"));
    let args = serve_args(&disk.dir.join("state.db"), &dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = daemon_of(disk.spawn(&args));
    let group = "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata:
  name: payment-change
spec:
  policy: order
  members:
    - name: ledger
    - name: payments
      dependsOn: [{name: ledger, reached: promoted}]
    - name: orders
      dependsOn: [{name: payments, reached: 20}]
";
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (stop, base) = (stop.clone(), shop.router.base.clone());
        async move {
            let c = client();
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut u = 0u64;
            while !stop.load(Relaxed) && Instant::now() < deadline {
                u += 1;
                let _ = c
                    .get(format!("{base}/{}/pay", SERVICES[(u % 3) as usize]))
                    .header("x-user-id", format!("user-{u}"))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    // orders' many steps give the sequential judge time to reject its 10 % of failures
    // after a restart, which loses the evidence gathered while nothing could be saved.
    let (ladder, long) = (
        "[20, 40, 60, 80]",
        "[20, 25, 30, 35, 40, 45, 50, 55, 60, 70, 80]",
    );
    shop.apply(&dir, &daemon, group, ["[50]", ladder, long], false);
    wait_for(&daemon, "orders", Duration::from_secs(60), |s| {
        s["canaryWeight"].as_f64().unwrap() >= 20.0 || s["phase"] == "Failed"
    });

    // Full while orders fails and the group rolls back: every member's routes stay exactly
    // what its saved status says.
    disk.fill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = carried_and_saved(&daemon, &shop.router).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = carried_and_saved(&daemon, &shop.router).await;
        assert_eq!(now, held, "nothing moves while nothing can be saved");
        for (member, carried, saved) in &now {
            assert_eq!(carried, saved, "{member}: routes carry what was saved");
        }
    }
    let during = group_status(&daemon, "payment-change")["phase"].clone();

    // Room again: the group's rollback goes on by itself, to its end, each member once.
    if kill {
        daemon.proc.child.kill().unwrap();
        daemon.proc.child.wait().unwrap();
        disk.free();
        daemon = daemon_of(disk.spawn(&args));
    } else {
        disk.free();
    }
    let done = wait_for_group(&daemon, "payment-change", Duration::from_secs(40), |g| {
        g["phase"] == "RolledBack"
    });
    stop.store(true, Relaxed);
    traffic.await.unwrap();
    assert_eq!(weights(&done), [0.0, 0.0, 0.0], "{done:#}");
    let history = History::of(&daemon, "payment-change");
    let rollbacks = |member: &str| {
        history
            .0
            .iter()
            .filter(|e| {
                e["rollout"] == member && e["message"].as_str().unwrap().starts_with("Rolling back")
            })
            .count()
    };
    assert_eq!(SERVICES.map(rollbacks), [1, 1, 1], "{:#?}", history.0);
    let c = client();
    for u in 0..50 {
        assert_eq!(
            chain(&c, &shop.router, &format!("after-{u}")).await,
            ["v1", "v1", "v1"]
        );
    }
    eprintln!(
        "disk full with the group {during} (killed: {kill}): held {held:?}; rolled back after"
    );
}
