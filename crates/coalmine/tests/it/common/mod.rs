//! Real processes on 127.0.0.1: the `coalmine` binary as router, upstream, `run` and daemon;
//! Prometheus and Alertmanager ([`promstack`]).
#![allow(dead_code)]

pub mod browser;
pub mod daemon;
pub mod netns;
pub mod promstack;
pub mod raw;
pub mod stub;
pub mod tinydisk;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_coalmine");

/// A child process killed when dropped, with the `key=value` words of its ready line. Its
/// stderr is passed on and kept (the first MiB), so a test can look for a panic a connection
/// task survived.
pub struct Proc {
    pub child: Child,
    pub ready: String,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut command = Command::new(BIN);
        command.args(args);
        Proc::spawn_command(command, args)
    }

    /// Starts `command` (the binary, perhaps behind a wrapper such as `nsenter`); `args` name
    /// it in messages.
    pub fn spawn_command(mut command: Command, args: &[&str]) -> Proc {
        // Quiet unless the test asked for a level.
        if !command.get_envs().any(|(k, _)| k == "COALMINE_LOG") {
            command.env("COALMINE_LOG", "warn");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn coalmine");
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let kept = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { return };
                eprintln!("{line}");
                let mut kept = kept.lock().unwrap();
                if kept.len() < 1 << 20 {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {} // keep the pipe drained
        });
        let ready = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("coalmine {args:?} did not become ready");
            }
        };
        Proc {
            child,
            ready,
            stderr,
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until the process has written `needle` to stderr: its lines reach
    /// the test through a reader thread, after the process may already have gone on.
    #[track_caller]
    pub fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self, key: &str) -> SocketAddr {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready))
            .parse()
            .unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `coalmine upstream` process; its URL is `http://ADDR`.
pub struct Upstream {
    pub proc: Proc,
    pub url: String,
}

pub fn upstream(name: &str, extra: &[&str]) -> Upstream {
    let mut args = vec!["upstream", "--listen", "127.0.0.1:0", "--name", name];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&args);
    let url = format!("http://{}", proc.addr("listen"));
    Upstream { proc, url }
}

/// A `coalmine proxy` process on ephemeral ports.
pub struct Router {
    pub proc: Proc,
    pub base: String,
    pub admin: String,
}

pub fn router(extra: &[&str]) -> Router {
    let mut args = vec!["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&args);
    let base = format!("http://{}", proc.addr("listen"));
    let admin = format!("http://{}", proc.addr("admin"));
    Router { proc, base, admin }
}

/// A router splitting between two upstreams, plus any other flags.
pub fn split_router(stable: &Upstream, canary: &Upstream, extra: &[&str]) -> Router {
    let mut args = vec![
        "--stable",
        stable.url.as_str(),
        "--canary",
        canary.url.as_str(),
    ];
    args.extend_from_slice(extra);
    router(&args)
}

pub async fn get_json(url: &str) -> serde_json::Value {
    client().get(url).json_body().await
}

/// Sends a request that must get an answer, and reads the answer's body.
#[allow(async_fn_in_trait)]
pub trait Fetch {
    async fn text_body(self) -> String;
    async fn json_body(self) -> serde_json::Value;
}

impl Fetch for reqwest::RequestBuilder {
    async fn text_body(self) -> String {
        self.send().await.unwrap().text().await.unwrap()
    }
    async fn json_body(self) -> serde_json::Value {
        self.send().await.unwrap().json().await.unwrap()
    }
}

/// Which `coalmine upstream` answered (its `x-upstream`), or `status N` when none did (the
/// router's own answer).
pub fn who_answered(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_else(|| format!("status {}", r.status()))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A client speaking HTTP/2 alone, in clear text (h2c, prior knowledge): the router's hyper
/// path.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

pub async fn stats(r: &Router) -> serde_json::Value {
    get_json(&format!("{}/stats", r.admin)).await
}

/// The 5xx answers one version of a `/stats` document counted.
pub fn server_errors(version: &serde_json::Value) -> u64 {
    version["statuses"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(code, _)| code.starts_with('5'))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum()
}

/// An HTTP/2 connection (prior knowledge, no TLS) to the router, driven in the background.
pub async fn h2c<B>(r: &Router) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(r.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

pub async fn put_routes(r: &Router, doc: serde_json::Value) -> reqwest::Response {
    client()
        .put(format!("{}/routes", r.admin))
        .json(&doc)
        .send()
        .await
        .unwrap()
}

/// Sends `n` GETs over `concurrency` connections; returns each response's body, in no order.
pub async fn bodies(url: &str, n: usize, concurrency: usize) -> Vec<String> {
    let c = client();
    let per = n / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (c, url) = (c.clone(), url.to_string());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(per);
                for _ in 0..per {
                    let r = c
                        .get(&url)
                        .send()
                        .await
                        .expect("request through the router");
                    out.push(r.text().await.unwrap());
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// A native Rollout of `name` over one router and two upstreams; `analysis` is indented 4.
pub fn rollout_yaml(
    name: &str,
    router: &Router,
    stable: &Upstream,
    canary: &Upstream,
    analysis: &str,
) -> String {
    rollout_yaml_at(name, [&router.admin, &stable.url, &canary.url], analysis)
}

/// [`rollout_yaml`] at addresses given as text: `[router admin, stable URL, canary URL]`.
pub fn rollout_yaml_at(name: &str, [router, stable, canary]: [&str; 3], analysis: &str) -> String {
    format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: {name}
spec:
  routers: [{router}]
  stable: {{url: {stable}}}
  canary: {{url: {canary}}}
  analysis:
{analysis}"
    )
}

/// Placement flags at addresses nothing needs to listen on, for commands that refuse or
/// convert a Canary before reaching its routers and versions.
pub const IDLE_PLACEMENT: [&str; 6] = [
    "--router",
    "http://127.0.0.1:9901",
    "--stable",
    "http://127.0.0.1:9001",
    "--canary",
    "http://127.0.0.1:9002",
];

/// A rollout document in a scratch directory of its own, removed when dropped; derefs to its
/// path.
pub struct RolloutFile {
    path: String,
    _dir: TempDir,
}

impl std::ops::Deref for RolloutFile {
    type Target = str;
    fn deref(&self) -> &str {
        &self.path
    }
}

impl std::fmt::Display for RolloutFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path)
    }
}

/// Writes a rollout document into a scratch directory of the test.
pub fn write_rollout(test: &str, text: &str) -> RolloutFile {
    let dir = TempDir::new(&format!("run-{test}"));
    let path = dir
        .write("rollout.yaml", text)
        .to_string_lossy()
        .into_owned();
    RolloutFile { path, _dir: dir }
}

/// Background users: requests through the router until stopped; counts answers by status class.
pub struct Users {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn users(router: &Router, concurrency: usize) -> Users {
    users_over(router, concurrency, client)
}

/// [`users`], each with a client of `client`'s making (its protocol).
pub fn users_over(router: &Router, concurrency: usize, client: fn() -> reqwest::Client) -> Users {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..concurrency)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let url = format!("{}/pay", router.base);
            tokio::spawn(async move {
                let c = client();
                // Bounded: at most 60 s of traffic at ~100 req/s per task.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Relaxed) && Instant::now() < deadline {
                    match c.get(&url).send().await {
                        Ok(r) if r.status().is_server_error() => failed.fetch_add(1, Relaxed),
                        Ok(_) => ok.fetch_add(1, Relaxed),
                        Err(_) => failed.fetch_add(1, Relaxed),
                    };
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    Users {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Users {
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }
}

pub struct RunResult {
    pub code: i32,
    pub lines: Vec<serde_json::Value>,
    pub stderr: String,
    pub seconds: f64,
}

pub async fn coalmine_run(file: &str, extra: &[&str]) -> RunResult {
    let mut args = vec![
        "run".to_string(),
        file.to_string(),
        "--output".into(),
        "json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(&args)
            .env("COALMINE_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        RunResult {
            code: out.status.code().unwrap_or(-1),
            lines: stdout
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

pub fn messages(run: &RunResult) -> Vec<String> {
    run.lines
        .iter()
        .filter_map(|l| {
            l["message"]
                .as_str()
                .map(|m| format!("{} {}", l["phase"], m))
        })
        .collect()
}

/// The canary weights a run advanced to, in order.
pub fn canary_weights(run: &RunResult) -> Vec<f64> {
    run.lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Advance canary weight"))
        })
        .map(|l| l["canaryWeight"].as_f64().unwrap())
        .collect()
}

/// The text of the `/metrics` page under `base`.
pub async fn metrics_text(base: &str) -> String {
    client().get(format!("{base}/metrics")).text_body().await
}

/// A self-signed certificate for `localhost` and its key, written to a scratch directory for a
/// router to serve TLS with.
pub struct SelfSigned {
    pub certified: rcgen::CertifiedKey<rcgen::KeyPair>,
    cert_path: String,
    key_path: String,
    _dir: TempDir,
}

pub fn self_signed(test: &str) -> SelfSigned {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = TempDir::new(test);
    let path = |name: &str, text: &str| dir.write(name, text).to_string_lossy().into_owned();
    let cert_path = path("cert.pem", &certified.cert.pem());
    let key_path = path("key.pem", &certified.signing_key.serialize_pem());
    SelfSigned {
        certified,
        cert_path,
        key_path,
        _dir: dir,
    }
}

impl SelfSigned {
    /// `--tls-cert` and `--tls-key` (a router's, `serve`'s).
    pub fn tls_flags(&self) -> [&str; 4] {
        ["--tls-cert", &self.cert_path, "--tls-key", &self.key_path]
    }
}

/// What a finished command printed: its stdout, then its stderr.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A finished command's exit code (-1 when a signal ended it) and what it printed.
pub fn code_and_printed(out: &Output) -> (i32, String) {
    (out.status.code().unwrap_or(-1), printed(out))
}

/// Runs `command` with `input` on its stdin, keeping what it prints.
pub fn output_with_stdin(command: &mut Command, input: &[u8]) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(input)?;
    child.wait_with_output()
}

/// A fresh directory under the system temp dir, removed (recursively) on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(kind: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "coalmine-test-{kind}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    /// Writes `text` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
