//! `coalmine loadtester` end to end: the real loadtester, router and upstreams on 127.0.0.1,
//! called with Flagger's webhook payload and the seed's own `hey` command, and driven by
//! `coalmine run` from the seed's Canary.

use crate::common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// The seed's Canary (tests/fixtures/seed/flagger-payment-service.yaml).
fn seed_canary() -> String {
    let path = format!(
        "{}/../../tests/fixtures/seed/flagger-payment-service.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The seed's load-test command, exactly as its Canary has it.
fn seed_cmd() -> String {
    let canary = seed_canary();
    let line = canary
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmd: "))
        .expect("the seed's webhook has a cmd");
    let cmd: String = serde_json::from_str(line).expect("a quoted cmd");
    assert_eq!(cmd, "hey -z 1m -q 10 -c 2 http://payment-service:8080/");
    cmd
}

/// `text` with `from` replaced by `to`; `from` must be there (so a changed seed fails loudly).
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in {text}");
    text.replacen(from, to, 1)
}

struct Loadtester {
    proc: Proc,
    url: String,
}

fn loadtester(extra: &[&str]) -> Loadtester {
    let mut args = vec!["loadtester", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&args);
    let url = format!("http://{}", proc.addr("listen"));
    Loadtester { proc, url }
}

/// Flagger's `CanaryWebhookPayload`, as Flagger's controller (and Coalmine's) sends it.
fn payload(canary: &str, metadata: Value) -> Value {
    json!({
        "name": canary,
        "namespace": "default",
        "phase": "Progressing",
        "checksum": "6d4c9f5b2f0c3e7a",
        "metadata": metadata,
    })
}

/// A loadtester's base URL, however it was started.
trait Endpoint {
    fn url(&self) -> &str;
}

impl Endpoint for Loadtester {
    fn url(&self) -> &str {
        &self.url
    }
}

async fn post(lt: &impl Endpoint, body: &Value) -> (u16, String) {
    let r = client().post(lt.url()).json(body).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn start(lt: &impl Endpoint, canary: &str, cmd: &str) -> (u16, String) {
    post(lt, &payload(canary, json!({ "cmd": cmd }))).await
}

async fn runs(lt: &impl Endpoint) -> Vec<Value> {
    get_json(&format!("{}/runs", lt.url())).await["runs"]
        .as_array()
        .unwrap()
        .clone()
}

/// The run number a 202 names (`started run N: ...` or `already running (run N, ...`).
fn run_id(answer: &str) -> u64 {
    let digits: String = answer
        .split("run ")
        .nth(1)
        .unwrap_or_else(|| panic!("no run in {answer:?}"))
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// Waits (at most `within`) for run `id` to finish; returns its record.
async fn finished(lt: &impl Endpoint, id: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let run = runs(lt).await.into_iter().find(|r| r["id"] == id);
        if let Some(run) = run.filter(|r| r["state"] == "finished") {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn router_requests(r: &Router) -> u64 {
    let st = stats(r).await;
    ["stable", "canary"]
        .iter()
        .map(|v| st[v]["requests"].as_u64().unwrap_or(0))
        .sum()
}

/// The value of one series on the loadtester's `/metrics`.
async fn metric(lt: &Loadtester, series: &str) -> u64 {
    let text = metrics_text(&lt.url).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// One request as a test-side server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: http::HeaderMap,
    body: String,
}

/// An HTTP server on 127.0.0.1 that answers 200 and keeps every request, to see exactly what the
/// loadtester sends.
struct Recorder {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

async fn recorder() -> Recorder {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (kept, accepted) = (seen.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let kept = kept.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            kept.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Recorder {
        addr,
        seen,
        connections,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_command_sends_its_rate_to_the_mapped_address() {
    let v1 = upstream("v1", &[]);
    let router = router(&["--stable", &v1.url]);
    let mapping = format!(
        "payment-service:8080={}",
        router.base.trim_start_matches("http://")
    );
    let lt = loadtester(&["--resolve", &mapping]);
    // The seed's command with -z 1m shortened to 2 s.
    let cmd = seed_cmd().replace("-z 1m", "-z 2s");
    let (status, answer) = start(&lt, "payment-service", &cmd).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer.starts_with("started run "), "{answer}");
    let run = finished(&lt, run_id(&answer), Duration::from_secs(20)).await;

    // -q 10 per worker, -c 2 workers, 2 s: 40 requests. Each worker starts at most one request
    // per tick, the first at once and none at or after 2 s, so never more than 2 x 20; a busy
    // machine may lose a few ticks, hence the lower bound.
    let sent = run["requests"].as_u64().unwrap();
    let received = router_requests(&router).await;
    assert_eq!(
        received, sent,
        "every request the run counts reached the router: {run}"
    );
    assert!((30..=40).contains(&received), "{received} requests: {run}");
    assert_eq!(run["statusCodes"]["200"], received, "{run}");
    assert_eq!(run["errors"], 0, "{run}");
    assert_eq!(run["stoppedBy"], "duration");
    assert_eq!(run["canary"], "payment-service.default");
    assert!(run["latencyMs"]["p99"].as_f64().unwrap() > 0.0, "{run}");

    let metrics = metrics_text(&lt.url).await;
    assert!(
        metrics.contains(&format!(
            "coalmine_loadtester_requests_total{{code=\"200\"}} {received}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("coalmine_loadtester_commands_total{result=\"started\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heys_flags_shape_the_requests_and_the_host_stays_the_commands() {
    let rec = recorder().await;
    let lt = loadtester(&["--resolve", &format!("api.internal:80={}", rec.addr)]);
    let cmd = "hey -n 4 -c 2 -m put -T application/json -d '{\"amount\": 5}' \
               -H 'X-Canary: yes' -H \"Accept: text/html\" -A text/plain -U probe \
               -a ops:s3cret 'http://api.internal/pay?currency=eur&x=1'";
    let (status, answer) = start(&lt, "payment-service", cmd).await;
    assert_eq!(status, 202, "{answer}");
    let run = finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(run["stoppedBy"], "requests");
    assert_eq!(run["statusCodes"]["200"], 4, "{run}");

    let seen = rec.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "-n 4: {seen:#?}");
    for s in &seen {
        assert_eq!(s.method, "PUT");
        assert_eq!(s.uri, "/pay?currency=eur&x=1");
        assert_eq!(
            s.headers["host"], "api.internal",
            "the command's host, not the mapped one"
        );
        assert_eq!(s.headers["content-type"], "application/json");
        assert_eq!(s.headers["x-canary"], "yes");
        assert_eq!(
            s.headers["accept"], "text/plain",
            "-A wins over -H Accept, as in hey"
        );
        assert!(
            s.headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("probe coalmine-loadtester/"),
            "{:?}",
            s.headers["user-agent"]
        );
        // ops:s3cret
        assert_eq!(s.headers["authorization"], "Basic b3BzOnMzY3JldA==");
        assert_eq!(s.body, "{\"amount\": 5}");
    }

    // -host replaces the Host header; hey's defaults are GET and text/html.
    let (status, answer) = start(
        &lt,
        "payment-service",
        "hey -n 1 -c 1 -host shop.example http://api.internal/",
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    let last = rec.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.method, "GET");
    assert_eq!(last.headers["host"], "shop.example");
    assert_eq!(last.headers["content-type"], "text/html");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_cannot_run_get_400_with_the_reason() {
    let lt = loadtester(&[
        "--resolve",
        "payment-service:8080=127.0.0.1:9",
        "--max-concurrency",
        "8",
        "--timeout",
        "10m",
    ]);
    let cases = [
        (
            json!({"cmd": "hey -z 1m -Z 5 http://payment-service:8080/"}),
            "unknown flag -Z: the loadtester supports hey's -z -n -c -q",
        ),
        (json!({"cmd": "hey -z 1m -q 10 -c 2"}), "no URL"),
        (
            json!({"cmd": "hey -D /etc/passwd http://payment-service:8080/"}),
            "-D reads the request body from a file; the loadtester reads no files",
        ),
        (
            json!({"cmd": "ghz --insecure -z 1m payment-service:8080"}),
            "`ghz` is not supported: Coalmine's loadtester runs hey commands natively",
        ),
        (
            json!({"type": "bash", "cmd": "hey -z 1m http://payment-service:8080/"}),
            "metadata.type \"bash\" is not supported",
        ),
        (
            json!({"type": "helmv3", "cmd": "test payment-service"}),
            "metadata.type \"helmv3\" is not supported",
        ),
        (json!({"logCmdOutput": "true"}), "cmd not found in metadata"),
        (json!({}), "metadata not found in payload"),
        (
            json!({"cmd": "hey -z 1m -c 2 http://orders:8080/"}),
            "orders:8080 is not mapped: start the loadtester with --resolve orders:8080=ADDR",
        ),
        (
            json!({"cmd": "hey -z 1m -c 50 http://payment-service:8080/"}),
            "-c 50 is more than the loadtester's --max-concurrency 8",
        ),
        (
            json!({"cmd": "hey -z 1h -c 2 http://payment-service:8080/"}),
            "-z 1h is longer than the loadtester's --timeout 10m",
        ),
    ];
    for (metadata, reason) in cases {
        let (status, answer) = post(&lt, &payload("payment-service", metadata.clone())).await;
        assert_eq!(status, 400, "{metadata}: {answer}");
        assert!(answer.contains(reason), "{metadata}: {answer}");
    }
    let (status, answer) = post(&lt, &json!("not a payload")).await;
    assert_eq!(status, 400);
    assert!(answer.contains("not Flagger's webhook payload"), "{answer}");
    assert!(runs(&lt).await.is_empty(), "nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_metacharacters_are_refused_and_nothing_is_sent() {
    let rec = recorder().await;
    let lt = loadtester(&["--resolve", &format!("payment-service:8080={}", rec.addr)]);
    let url = "http://payment-service:8080/";
    let target = format!("http://{}/", rec.addr);
    for (cmd, reason) in [
        (
            format!("hey -n 1 -c 1 {url}; hey -n 1 -c 1 {target}"),
            "; at column",
        ),
        (format!("hey -n 1 -c 1 {url} | tee /tmp/out"), "| at column"),
        (
            format!("hey -n 1 -c 1 {url} && hey {target}"),
            "& at column",
        ),
        (format!("hey -n 1 -c 1 $(echo {url})"), "$( at column"),
        (format!("hey -n 1 -c 1 `echo {url}`"), "` at column"),
        (format!("hey -n 1 -c 1 \"$URL\" {url}"), "$U at column"),
        (format!("hey -n 1 -c 1 {url} > /tmp/out"), "> at column"),
        (format!("hey -n 1 -c 1 {url} < /dev/null"), "< at column"),
        (
            format!("hey -n 1 -c 1 {url}\nhey {target}"),
            "a line break at column",
        ),
    ] {
        let (status, answer) = start(&lt, "payment-service", &cmd).await;
        assert_eq!(status, 400, "{cmd:?}: {answer}");
        assert!(answer.contains(reason), "{cmd:?}: {answer}");
        assert!(
            answer.contains("the loadtester runs one hey command without a shell"),
            "{answer}"
        );
    }
    // Quoted, the same characters are part of an argument.
    let (status, answer) = start(
        &lt,
        "payment-service",
        &format!("hey -n 1 -c 1 -d 'a;b|c $(d) `e` > f' {url}"),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    let seen = rec.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the quoted command ran: {seen:#?}");
    assert_eq!(seen[0].body, "a;b|c $(d) `e` > f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_command_for_the_same_canary_runs_once_at_a_time_as_in_flagger() {
    let v1 = upstream("v1", &[]);
    let router = router(&["--stable", &v1.url]);
    let mapping = format!(
        "payment-service:8080={}",
        router.base.trim_start_matches("http://")
    );
    let lt = loadtester(&["--resolve", &mapping]);
    let cmd = "hey -z 2s -q 5 -c 1 http://payment-service:8080/";

    let (status, first) = start(&lt, "payment-service", cmd).await;
    assert_eq!(status, 202, "{first}");
    let first = run_id(&first);
    // Flagger's controller calls its rollout hooks every interval: while the command runs, the
    // call is accepted and nothing new starts.
    let (status, again) = start(&lt, "payment-service", cmd).await;
    assert_eq!(status, 202, "{again}");
    assert!(again.starts_with("already running"), "{again}");
    assert_eq!(run_id(&again), first);
    // Flagger's key is the canary and the command: another canary, or another command, runs.
    let (status, other_canary) = start(&lt, "checkout", cmd).await;
    assert_eq!(status, 202);
    assert!(other_canary.starts_with("started run "), "{other_canary}");
    let (status, other_cmd) = start(&lt, "payment-service", &cmd.replace("-q 5", "-q 4")).await;
    assert_eq!(status, 202);
    assert!(other_cmd.starts_with("started run "), "{other_cmd}");
    let running = runs(&lt).await;
    assert_eq!(running.len(), 3, "{running:#?}");

    // Once it has finished, the next call starts it again.
    finished(&lt, first, Duration::from_secs(20)).await;
    let (status, later) = start(&lt, "payment-service", cmd).await;
    assert_eq!(status, 202);
    assert!(later.starts_with("started run "), "{later}");
    assert!(run_id(&later) > first);
    let all = runs(&lt).await;
    for r in &all {
        finished(&lt, r["id"].as_u64().unwrap(), Duration::from_secs(20)).await;
    }
    let all = runs(&lt).await;
    assert_eq!(all.len(), 4, "{all:#?}");
    let sent: u64 = all.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(router_requests(&router).await, sent);
    let metrics = metrics_text(&lt.url).await;
    assert!(
        metrics.contains("coalmine_loadtester_commands_total{result=\"skipped\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_running_a_new_load_test_is_refused_with_503() {
    let rec = recorder().await;
    let mapping = format!("payment-service:8080={}", rec.addr);
    let lt = loadtester(&["--resolve", &mapping, "--max-running", "1"]);
    let cmd = "hey -z 3s -q 2 -c 1 http://payment-service:8080/";
    let (status, answer) = start(&lt, "payment-service", cmd).await;
    assert_eq!(status, 202, "{answer}");
    let (status, busy) = start(&lt, "checkout", cmd).await;
    assert_eq!(status, 503, "{busy}");
    assert!(
        busy.contains("busy: 1 load tests are running (--max-running 1)"),
        "{busy}"
    );
    // The running one is still de-duplicated, not refused.
    let (status, again) = start(&lt, "payment-service", cmd).await;
    assert_eq!(status, 202, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_methods_and_paths() {
    let lt = loadtester(&[]);
    let c = client();
    let r = c.get(format!("{}/healthz", lt.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "OK\n");
    let r = c.get(&lt.url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = c
        .post(format!("{}/gate/check", lt.url))
        .json(&payload("payment-service", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("gates are not part of"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_running_load_tests_logs_what_they_did_and_exits_zero() {
    let v1 = upstream("v1", &[]);
    let router = router(&["--stable", &v1.url]);
    let mapping = format!(
        "payment-service:8080={}",
        router.base.trim_start_matches("http://")
    );
    let mut lt = loadtester(&["--resolve", &mapping]);
    let cmd = seed_cmd(); // a minute of load
    let (status, answer) = start(&lt, "payment-service", &cmd).await;
    assert_eq!(status, 202, "{answer}");
    // Load is flowing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while router_requests(&router).await < 3 {
        assert!(Instant::now() < deadline, "no load arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &lt.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = lt.proc.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "the loadtester did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0), "{}", lt.proc.stderr());
    let log = lt.proc.stderr();
    assert!(
        log.contains(&format!("command stopped by shutdown: {cmd}: ")),
        "{log}"
    );
    // The load stopped with it.
    let after = router_requests(&router).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(router_requests(&router).await, after);
    assert!(log.contains(" requests in "), "{log}");
}

/// The seed's Canary with only `interval` shortened (2m is 15 minutes of test). Its webhook
/// still says `http://flagger-loadtester/`: the placement maps that host to the loadtester.
fn seed_canary_for_test(interval: &str) -> String {
    replaced(
        &seed_canary(),
        "interval: 2m",
        &format!("interval: {interval}"),
    )
}

/// `--resolve flagger-loadtester=ADDR`: where the seed's webhook host is reached here.
fn loadtester_host(lt: &Loadtester) -> String {
    format!(
        "flagger-loadtester={}",
        lt.url.trim_start_matches("http://")
    )
}

/// The seed's payment-service before a release: v1 serving behind a router, v2 ready.
struct SeedService {
    v1: Upstream,
    v2: Upstream,
    router: Router,
}

fn seed_service() -> SeedService {
    let v1 = upstream("v1", &[]);
    let v2 = upstream("v2", &[]);
    let router = router(&["--stable", &v1.url]);
    SeedService { v1, v2, router }
}

impl SeedService {
    /// `--resolve payment-service:8080=ADDR`: the seed's load test reaches the router.
    fn mapping(&self) -> String {
        format!(
            "payment-service:8080={}",
            self.router.base.trim_start_matches("http://")
        )
    }

    /// `coalmine run` of the seed's Canary, analysed every `interval`, placed on this service
    /// by the flags, its webhook host resolved to `lt`.
    async fn run(&self, lt: &Loadtester, interval: &str) -> RunResult {
        let dir = TempDir::new("loadtester-seed");
        let file = dir.write("canary.yaml", &seed_canary_for_test(interval));
        coalmine_run(
            file.to_str().unwrap(),
            &[
                "--router",
                &self.router.admin,
                "--stable",
                &self.v1.url,
                "--canary",
                &self.v2.url,
                "--resolve",
                &loadtester_host(lt),
            ],
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalmine_run_promotes_the_seeds_canary_on_load_from_the_loadtester_alone() {
    let service = seed_service();
    let lt = loadtester(&["--resolve", &service.mapping()]);
    let run = service.run(&lt, "2s").await;
    let msgs = messages(&run);
    assert_eq!(run.code, 0, "{msgs:#?}\n{}", run.stderr);
    assert_eq!(
        canary_weights(&run),
        vec![10.0, 20.0, 30.0, 40.0, 50.0],
        "{msgs:#?}"
    );
    assert!(
        !msgs.iter().any(|m| m.contains("rollout webhook")),
        "the load-test hook passed every time: {msgs:#?}"
    );
    // Every analysis after the first called the hook; the loadtester started the command once
    // and let the later calls through while it ran (-z 1m outlasts the rollout).
    let all = runs(&lt).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["canary"], "payment-service.default");
    assert_eq!(all[0]["cmd"], seed_cmd().as_str());
    // One call per analysis, and five analyses passed (one per weight).
    let skipped = metric(
        &lt,
        "coalmine_loadtester_commands_total{result=\"skipped\"}",
    )
    .await;
    assert!(skipped >= 4, "{skipped} calls de-duplicated");
    // No other traffic was sent: what the canary was judged on came from the loadtester.
    let st = stats(&service.router).await;
    let canary = st["canary"]["requests"].as_u64().unwrap();
    assert!(canary > 0, "{st}");
    assert_eq!(st["canary"]["statuses"]["200"], canary, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_mapping_the_seeds_rollout_fails_and_says_which_one_is_missing() {
    let service = seed_service();
    let lt = loadtester(&[]);
    let run = service.run(&lt, "500ms").await;
    let msgs = messages(&run).join("\n");
    assert_eq!(run.code, 1, "{msgs}\n{}", run.stderr);
    assert!(
        msgs.contains(
            "rollout webhook load-test (answered 400: payment-service:8080 is not mapped: start \
             the loadtester with --resolve payment-service:8080=ADDR"
        ),
        "{msgs}"
    );
    assert!(
        msgs.contains("failed 3 checks"),
        "the seed's threshold: {msgs}"
    );
    assert!(runs(&lt).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_reuses_a_workers_connection_and_disable_keepalive_does_not() {
    use std::sync::atomic::Ordering::Relaxed;
    let rec = recorder().await;
    let lt = loadtester(&["--resolve", &format!("api.internal:80={}", rec.addr)]);
    let (_, answer) = start(&lt, "a", "hey -n 4 -c 1 http://api.internal/").await;
    finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(rec.seen.lock().unwrap().len(), 4);
    assert_eq!(
        rec.connections.load(Relaxed),
        1,
        "one worker, one kept-alive connection"
    );
    let (_, answer) = start(
        &lt,
        "a",
        "hey -n 4 -c 1 -disable-keepalive http://api.internal/",
    )
    .await;
    finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(rec.seen.lock().unwrap().len(), 8);
    assert_eq!(
        rec.connections.load(Relaxed),
        1 + 4,
        "a connection per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_count_as_errors_after_t_and_timeout_stops_a_run() {
    let v1 = upstream("v1", &[]);
    let mapping = format!(
        "payment-service:8080={}",
        v1.url.trim_start_matches("http://")
    );
    let lt = loadtester(&["--resolve", &mapping, "--timeout", "2s"]);
    // -t 1: a 3 s answer is a timeout error, and no latency is recorded for it.
    let (status, answer) = start(
        &lt,
        "payment-service",
        "hey -n 1 -c 1 -t 1 http://payment-service:8080/sleep/3000",
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let run = finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(run["requests"], 1, "{run}");
    assert_eq!(run["errors"], 1, "{run}");
    assert_eq!(run["errorReasons"]["timed out"], 1, "{run}");
    assert_eq!(run["latencyMs"]["p50"], Value::Null, "{run}");
    // --timeout 2s stops a run of -n 1000 at two requests a second.
    let (_, answer) = start(
        &lt,
        "payment-service",
        "hey -n 1000 -c 1 -q 2 http://payment-service:8080/",
    )
    .await;
    let run = finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(run["stoppedBy"], "timeout", "{run}");
    let sent = run["requests"].as_u64().unwrap();
    assert!((1..=4).contains(&sent), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_looked_up_only_with_dns() {
    let rec = recorder().await;
    // `localhost` is in /etc/hosts: the lookup never leaves the machine.
    let cmd = format!("hey -n 1 -c 1 http://localhost:{}/", rec.addr.port());
    let without = loadtester(&[]);
    let (status, answer) = start(&without, "payment-service", &cmd).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains(&format!(
            "localhost:{} is not mapped: start the loadtester with --resolve",
            rec.addr.port()
        )),
        "{answer}"
    );
    let with = loadtester(&["--dns"]);
    let (status, answer) = start(&with, "payment-service", &cmd).await;
    assert_eq!(status, 202, "{answer}");
    let run = finished(&with, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(run["statusCodes"]["200"], 1, "{run}");
    assert_eq!(
        rec.seen.lock().unwrap()[0].headers["host"],
        format!("localhost:{}", rec.addr.port()).as_str()
    );
    // An IP address needs no lookup and no mapping.
    let (status, answer) = start(
        &without,
        "payment-service",
        &format!("hey -n 1 -c 1 http://{}/", rec.addr),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    finished(&without, run_id(&answer), Duration::from_secs(10)).await;
    assert_eq!(rec.seen.lock().unwrap().len(), 2);
}

/// The loadtester at its default log level (info), its stderr collected.
struct Logged {
    child: std::process::Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Endpoint for Logged {
    fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loadtester_logging_info(extra: &[&str]) -> Logged {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(BIN)
        .args(["loadtester", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("COALMINE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let addr = ready
        .trim()
        .strip_prefix("coalmine loadtester: listen=")
        .unwrap_or_else(|| panic!("ready line {ready:?}"))
        .to_string();
    let log = Arc::new(Mutex::new(String::new()));
    let kept = log.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut kept = kept.lock().unwrap();
            kept.push_str(&line);
            kept.push('\n');
        }
    });
    Logged {
        child,
        url: format!("http://{addr}"),
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_logs_a_summary_and_log_cmd_output_adds_heys_report() {
    let rec = recorder().await;
    let lt = loadtester_logging_info(&["--resolve", &format!("payment-service:8080={}", rec.addr)]);
    let cmd = "hey -n 3 -c 1 http://payment-service:8080/";
    let (status, answer) = post(
        &lt,
        &payload(
            "payment-service",
            json!({"cmd": cmd, "logCmdOutput": "true"}),
        ),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    let quiet = "hey -n 2 -c 1 http://payment-service:8080/";
    let (_, answer) = start(&lt, "payment-service", quiet).await;
    finished(&lt, run_id(&answer), Duration::from_secs(10)).await;
    // The summary is logged as the run ends; give the log a moment to reach the pipe.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = lt.log.lock().unwrap().clone();
        if log.matches("command finished").count() == 2 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        log.contains(&format!("command finished: {cmd}: 3 requests in ")),
        "{log}"
    );
    assert!(log.contains("200: 3; 0 errors; latency p50 "), "{log}");
    assert!(
        log.contains(&format!("command finished: {quiet}: 2 requests in ")),
        "{log}"
    );
    assert_eq!(
        log.matches("Status code distribution:").count(),
        1,
        "only with logCmdOutput: {log}"
    );
    assert!(log.contains("  [200]\t3 responses"), "{log}");
}

#[test]
fn help_and_a_bad_resolve_flag() {
    let out = std::process::Command::new(BIN)
        .args(["loadtester", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--resolve",
        "--dns",
        "--max-concurrency",
        "--max-running",
        "--timeout",
    ] {
        assert!(help.contains(flag), "{help}");
    }
    assert!(help.contains("trusted address"), "{help}");
    let out = std::process::Command::new(BIN)
        .args(["loadtester", "--resolve", "payment-service=127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("expected HOST:PORT=ADDR, like payment-service:8080=127.0.0.1:18080"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_applies_the_seeds_canary_with_a_placement_document() {
    use common::daemon::*;
    let service = seed_service();
    let SeedService { v1, v2, router } = &service;
    let lt = loadtester(&["--resolve", &service.mapping()]);
    let dir = scratch("placement");
    let canary = dir.join("canary.yaml");
    std::fs::write(&canary, seed_canary_for_test("1s")).unwrap();
    // What Kubernetes would say about the Canary, said once in a file of its own.
    let placement = dir.join("placement.yaml");
    std::fs::write(
        &placement,
        format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Placement
metadata:
  name: payment-service
spec:
  routers: [{}]
  stable: {{url: {}}}
  canary: {{url: {}}}
  hosts:
    flagger-loadtester: {}
",
            router.admin,
            v1.url,
            v2.url,
            lt.url.trim_start_matches("http://")
        ),
    )
    .unwrap();
    let daemon = serve(&dir);
    // Without its placement the Canary is refused, naming what is missing.
    let (code, out) = cli(&daemon, &["apply", canary.to_str().unwrap()], Some(TOKEN));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("Placement"), "{out}");
    let (code, out) = cli(
        &daemon,
        &[
            "apply",
            canary.to_str().unwrap(),
            placement.to_str().unwrap(),
        ],
        Some(TOKEN),
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&daemon, &["status", "payment-service", "--watch"], None);
    assert_eq!(code, 0, "promoted on the loadtester's traffic: {out}");
    assert_eq!(runs(&lt).await.len(), 1);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["stable"], v2.url.as_str());
}

/// A blue-green Rollout whose load test reaches the canary through the preview header.
fn blue_green(router: &Router, v1: &Upstream, v2: &Upstream, lt: &Loadtester) -> String {
    format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: blue-green
spec:
  routers: [{}]
  stable: {{url: {}}}
  canary: {{url: {}}}
  preview:
    - headers: {{x-preview: {{exact: \"true\"}}}}
  analysis:
    interval: 1s
    threshold: 2
    iterations: 4
    metrics:
      - name: request-success-rate
        thresholdRange: {{min: 99}}
        interval: 2s
    webhooks:
      - name: load-test
        url: {}/
        metadata:
          cmd: \"hey -z 1m -q 20 -c 2 -H 'x-preview: true' http://shop:8080/\"
",
        router.admin, v1.url, v2.url, lt.url
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_canary_is_measured_through_its_preview_before_users_reach_it() {
    for (v2_errors, promoted) in [("0", true), ("0.3", false)] {
        let v1 = upstream("v1", &[]);
        let v2 = upstream("v2", &["--error-rate", v2_errors, "--seed", "4"]);
        let router = router(&["--stable", &v1.url]);
        let mapping = format!("shop:8080={}", router.base.trim_start_matches("http://"));
        let lt = loadtester(&["--resolve", &mapping]);
        let file = write_rollout("blue-green", &blue_green(&router, &v1, &v2, &lt));
        let traffic = users(&router, 2);
        let run = coalmine_run(&file, &[]).await;
        let (ok, failed) = traffic.stop().await;
        let msgs = messages(&run);
        assert_eq!(
            run.code,
            if promoted { 0 } else { 1 },
            "{msgs:#?}\n{}",
            run.stderr
        );
        // The load test starts with the first analysis, so that one may find its window
        // empty; every later one has the preview traffic to judge.
        let holds = msgs.iter().filter(|m| m.contains("no data")).count();
        assert!(
            holds <= 1,
            "the preview traffic gave the checks data: {msgs:#?}"
        );
        // Users never met the canary before the switch: none of its failures reached them.
        if !promoted {
            assert_eq!(failed, 0, "{ok} ok, {failed} failed");
        }
        let st = stats(&router).await;
        assert!(st["canary"]["requests"].as_u64().unwrap() > 0, "{st}");
    }
}
