//! `coalmine loadtester`: the webhook Flagger's Canaries call for load (`POST /` with Flagger's
//! `CanaryWebhookPayload`), running `hey` commands natively — no shell, no `hey` binary.
//!
//! As Flagger's loadtester does with a `cmd`, a call is answered at once (202) and the load runs
//! in the background; the same command for the same canary is not started again while it runs
//! (Flagger's controller calls its rollout hooks every interval); a run is stopped at
//! `--timeout`. Unlike Flagger's, everything the command asks is checked before the answer, so a
//! command that cannot run is a 400 with the reason, which the controller shows as the webhook's
//! failure.
//!
//! The loadtester sends load wherever its callers' commands say (after `--resolve`): anyone who
//! can reach it can aim it, so it listens on 127.0.0.1 unless told otherwise.

mod command;
mod report;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Args;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::time::MissedTickBehavior;

use coalmine_controller::http::reqwest_reason;
use coalmine_spec::{format_duration, parse_duration};

use command::{parse_hey, split_words, Hey};
use report::RunStats;

#[derive(Args, Debug, Clone)]
pub struct LoadtesterArgs {
    /// Address to listen on. Whoever reaches it can aim load anywhere the loadtester can
    /// reach: keep it on a trusted address
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Send requests for HOST:PORT to ADDR (an IP:port) instead, like curl's --resolve; the
    /// Host header stays HOST:PORT. Repeatable
    #[arg(long = "resolve", value_name = "HOST:PORT=ADDR", value_parser = parse_resolve)]
    pub resolve: Vec<Mapping>,
    /// Also resolve host names that no --resolve maps through DNS (as in a cluster); without
    /// it, a command naming such a host is refused with 400
    #[arg(long)]
    pub dns: bool,
    /// Requests in flight at once across all running load tests; a command's -c may not exceed it
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrency: u32,
    /// Load tests running at once; a new one beyond this is refused with 503
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_running: u32,
    /// Longest a load test may run (Flagger's loadtester -timeout): a longer -z is refused, an
    /// -n run still going is stopped
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_positive_duration)]
    pub timeout: Duration,
}

/// One `--resolve HOST:PORT=ADDR`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    host: String,
    port: u16,
    addr: SocketAddr,
}

fn parse_resolve(s: &str) -> Result<Mapping, String> {
    let usage =
        || format!("{s:?}: expected HOST:PORT=ADDR, like payment-service:8080=127.0.0.1:18080");
    let (from, to) = s.split_once('=').ok_or_else(usage)?;
    let (host, port) = from.rsplit_once(':').ok_or_else(usage)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(usage());
    }
    let port = port
        .parse()
        .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
    let addr = to
        .parse()
        .map_err(|_| format!("{s:?}: {to:?} is not an IP address and port"))?;
    Ok(Mapping {
        host: host.to_ascii_lowercase(),
        port,
        addr,
    })
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be longer than 0s".into()),
        d => Ok(d),
    }
}

/// Where a command's requests go once `--resolve` has had its say.
#[derive(Debug, Clone, PartialEq)]
struct Destination {
    /// The URL to request: the command's, with the mapped port (and, for an IP host, the
    /// mapped IP).
    url: Url,
    /// A host name the client must connect to the mapped address for (keeps TLS's SNI).
    pin: Option<(String, SocketAddr)>,
    /// The command's own `host[:port]`, sent as `Host` when the URL was changed.
    host_header: Option<String>,
}

fn destination(url: &Url, mappings: &[Mapping], dns: bool) -> Result<Destination, String> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip = bare.parse::<IpAddr>().ok();
    let Some(m) = mappings
        .iter()
        .find(|m| m.port == port && m.host.eq_ignore_ascii_case(bare))
    else {
        if ip.is_none() && !dns {
            let to = |h: &str| format!("{h}:{port}");
            return Err(format!(
                "{} is not mapped: start the loadtester with --resolve {}=ADDR (where {} is \
                 served), or with --dns to look host names up",
                to(host),
                to(host),
                to(host),
            ));
        }
        return Ok(Destination {
            url: url.clone(),
            pin: None,
            host_header: None,
        });
    };
    let mut mapped = url.clone();
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let set = |u: &mut Url| -> Result<(), ()> {
        if ip.is_some() {
            u.set_ip_host(m.addr.ip())?;
        }
        u.set_port(Some(m.addr.port()))
    };
    set(&mut mapped).map_err(|()| format!("cannot send {url} to {}", m.addr))?;
    Ok(Destination {
        url: mapped,
        pin: ip.is_none().then(|| (bare.to_ascii_lowercase(), m.addr)),
        host_header: Some(authority),
    })
}

/// Flagger's `CanaryWebhookPayload`.
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// A command accepted for running.
struct Job {
    canary: String,
    cmd: String,
    log_output: bool,
    hey: Hey,
    destination: Destination,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Duration,
    Requests,
    Timeout,
    Shutdown,
}

impl Stop {
    fn as_str(self) -> &'static str {
        match self {
            Stop::Duration => "duration",
            Stop::Requests => "requests",
            Stop::Timeout => "timeout",
            Stop::Shutdown => "shutdown",
        }
    }
}

struct Run {
    id: u64,
    canary: String,
    cmd: String,
    started: Instant,
    started_unix_ms: u64,
    stats: Mutex<RunStats>,
    /// How long it ran and why it stopped, once it has.
    ended: Mutex<Option<(Duration, Stop)>>,
}

impl Run {
    fn json(&self) -> Value {
        let ended = *self.ended.lock().unwrap();
        let elapsed = ended.map_or_else(|| self.started.elapsed(), |(d, _)| d);
        let mut doc = self.stats.lock().unwrap().json();
        let fields = [
            ("id", json!(self.id)),
            ("canary", json!(self.canary)),
            ("cmd", json!(self.cmd)),
            (
                "state",
                json!(if ended.is_some() {
                    "finished"
                } else {
                    "running"
                }),
            ),
            ("stoppedBy", json!(ended.map(|(_, s)| s.as_str()))),
            ("startedAtMs", json!(self.started_unix_ms)),
            ("seconds", json!(elapsed.as_secs_f64())),
        ];
        for (k, v) in fields {
            doc[k] = v;
        }
        doc
    }
}

/// Finished runs kept for `GET /runs`.
const HISTORY: usize = 100;

#[derive(Default)]
struct Registry {
    /// By (canary, command): Flagger's de-duplication key.
    running: HashMap<(String, String), Arc<Run>>,
    finished: VecDeque<Arc<Run>>,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    skipped: AtomicU64,
    refused: AtomicU64,
    busy: AtomicU64,
    errors: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

struct Loadtester {
    args: LoadtesterArgs,
    /// Requests in flight across all runs.
    permits: Arc<Semaphore>,
    registry: Mutex<Registry>,
    counters: Counters,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
}

/// What the webhook answers.
struct Answer {
    status: StatusCode,
    text: String,
}

impl Answer {
    fn new(status: StatusCode, text: impl Into<String>) -> Answer {
        Answer {
            status,
            text: text.into(),
        }
    }
}

impl Loadtester {
    /// Reads a webhook call into a job, or the 400 that says why it cannot run. The reason
    /// leads and the command is left out: Coalmine's controller shows the first 200
    /// characters of an answer, and the caller knows its command.
    fn job(&self, body: &[u8]) -> Result<Job, String> {
        let payload: Payload = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not Flagger's webhook payload: {e}"))?;
        let metadata = match payload.metadata {
            Some(m) if !m.is_empty() => m,
            _ => return Err("metadata not found in payload".into()),
        };
        let kind = metadata.get("type").map_or("cmd", String::as_str);
        if kind != "cmd" {
            return Err(format!(
                "metadata.type {kind:?} is not supported: Coalmine's loadtester runs hey \
                 commands natively (type \"cmd\", the default; in the background, as Flagger's \
                 does); bash, helm, helmv3, concord, ngrinder and other types need Flagger's \
                 loadtester"
            ));
        }
        let cmd = metadata
            .get("cmd")
            .ok_or("cmd not found in metadata")?
            .clone();
        let hey = split_words(&cmd).and_then(|words| parse_hey(&words))?;
        let max_c = self.args.max_concurrency as usize;
        if hey.concurrency > max_c {
            return Err(format!(
                "-c {} is more than the loadtester's --max-concurrency {max_c}",
                hey.concurrency
            ));
        }
        if let Some(z) = hey.duration.filter(|z| *z > self.args.timeout) {
            return Err(format!(
                "-z {} is longer than the loadtester's --timeout {}",
                format_duration(z),
                format_duration(self.args.timeout)
            ));
        }
        let destination = destination(&hey.url, &self.args.resolve, self.args.dns)?;
        // Flagger's strconv.ParseBool, an unreadable value being false.
        let log_output = matches!(
            metadata.get("logCmdOutput").map(String::as_str),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        );
        Ok(Job {
            canary: format!("{}.{}", payload.name, payload.namespace),
            cmd,
            log_output,
            hey,
            destination,
        })
    }

    fn submit(self: &Arc<Self>, body: &[u8]) -> Answer {
        let job = match self.job(body) {
            Ok(job) => job,
            Err(reason) => {
                self.counters.refused.fetch_add(1, Relaxed);
                let cmd = serde_json::from_slice::<Payload>(body)
                    .ok()
                    .and_then(|p| p.metadata?.remove("cmd"))
                    .unwrap_or_default();
                tracing::warn!("refused {cmd:?}: {reason}");
                return Answer::new(StatusCode::BAD_REQUEST, reason);
            }
        };
        let key = (job.canary.clone(), job.cmd.clone());
        let run = {
            let mut registry = self.registry.lock().unwrap();
            if let Some(run) = registry.running.get(&key) {
                self.counters.skipped.fetch_add(1, Relaxed);
                tracing::info!(canary = %job.canary, "command skipped, already running: {}", job.cmd);
                return Answer::new(
                    StatusCode::ACCEPTED,
                    format!(
                        "already running (run {}, for {:.1}s): {}",
                        run.id,
                        run.started.elapsed().as_secs_f64(),
                        job.cmd
                    ),
                );
            }
            if *self.shutdown.borrow() {
                return Answer::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            if registry.running.len() >= self.args.max_running as usize {
                self.counters.busy.fetch_add(1, Relaxed);
                let text = format!(
                    "busy: {} load tests are running (--max-running {})",
                    registry.running.len(),
                    self.args.max_running
                );
                tracing::warn!(canary = %job.canary, "refused {}: {text}", job.cmd);
                return Answer::new(StatusCode::SERVICE_UNAVAILABLE, text);
            }
            let run = Arc::new(Run {
                id: self.next_id.fetch_add(1, Relaxed) + 1,
                canary: job.canary.clone(),
                cmd: job.cmd.clone(),
                started: Instant::now(),
                started_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                stats: Mutex::default(),
                ended: Mutex::default(),
            });
            registry.running.insert(key.clone(), run.clone());
            run
        };
        self.counters.started.fetch_add(1, Relaxed);
        tracing::info!(canary = %job.canary, run = run.id, "command starting: {}", job.cmd);
        let text = format!("started run {}: {}", run.id, job.cmd);
        let me = self.clone();
        tokio::spawn(async move {
            let stop = me.execute(&run, &job).await;
            let elapsed = run.started.elapsed();
            *run.ended.lock().unwrap() = Some((elapsed, stop));
            {
                let mut registry = me.registry.lock().unwrap();
                registry.running.remove(&key);
                registry.finished.push_back(run.clone());
                if registry.finished.len() > HISTORY {
                    registry.finished.pop_front();
                }
            }
            let stats = run.stats.lock().unwrap().clone();
            let line = stats.line(elapsed);
            let (canary, cmd, id) = (&job.canary, &job.cmd, run.id);
            match stop {
                Stop::Duration | Stop::Requests => {
                    tracing::info!(%canary, run = id, "command finished: {cmd}: {line}")
                }
                // Cut short: the load the canary was promised did not all arrive.
                Stop::Timeout | Stop::Shutdown => tracing::warn!(
                    %canary,
                    run = id,
                    "command stopped by {}: {cmd}: {line}",
                    stop.as_str()
                ),
            }
            if job.log_output {
                tracing::info!(canary = %job.canary, run = run.id, "{}", stats.report(elapsed));
            }
        });
        Answer::new(StatusCode::ACCEPTED, text)
    }

    /// Runs hey's workers until the duration, the request count, `--timeout` or shutdown.
    async fn execute(self: &Arc<Self>, run: &Arc<Run>, job: &Job) -> Stop {
        let hey = &job.hey;
        let started = tokio::time::Instant::now();
        let hard_deadline = started + self.args.timeout;
        let soft_deadline = hey.duration.map_or(hard_deadline, |z| started + z);
        let client = match self.client(job) {
            Ok(c) => c,
            Err(e) => {
                run.stats.lock().unwrap().failed(e);
                return Stop::Requests;
            }
        };
        let mut headers = hey.headers.clone();
        if let Some(h) = &job.destination.host_header {
            if !headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(h) {
                    headers.insert(header::HOST, v);
                }
            }
        }
        let request = Arc::new(RequestTemplate {
            client,
            method: hey.method.clone(),
            url: job.destination.url.clone(),
            headers,
            body: hey.body.clone().map(Bytes::from),
            basic_auth: hey.basic_auth.clone(),
        });
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..hey.concurrency {
            let worker = Worker {
                request: request.clone(),
                run: run.clone(),
                permits: self.permits.clone(),
                shutdown: self.shutdown.subscribe(),
                quota: hey.requests_per_worker,
                rate: hey.rate_per_worker,
                soft_deadline,
                hard_deadline,
                me: self.clone(),
            };
            workers.spawn(worker.work());
        }
        while workers.join_next().await.is_some() {}
        let now = tokio::time::Instant::now();
        if *self.shutdown.borrow() {
            Stop::Shutdown
        } else if now >= hard_deadline {
            Stop::Timeout
        } else if hey.duration.is_some() {
            Stop::Duration
        } else {
            Stop::Requests
        }
    }

    fn client(&self, job: &Job) -> Result<reqwest::Client, String> {
        let hey = &job.hey;
        let mut b = reqwest::Client::builder()
            // Only where the command says: no proxy from the environment, no redirects.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            // hey does not check certificates either (in-cluster services have private ones).
            .danger_accept_invalid_certs(true)
            .pool_max_idle_per_host(if hey.keepalive { hey.concurrency } else { 0 });
        if let Some(t) = hey.request_timeout {
            b = b.timeout(t);
        }
        if !(hey.http2 && job.destination.url.scheme() == "https") {
            b = b.http1_only();
        }
        if let Some((name, addr)) = &job.destination.pin {
            b = b.resolve(name, *addr);
        }
        b.build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))
    }

    fn record(&self, run: &Run, result: Result<(u16, Duration), String>) {
        match result {
            Ok((status, latency)) => {
                run.stats.lock().unwrap().answered(status, latency);
                *self
                    .counters
                    .statuses
                    .lock()
                    .unwrap()
                    .entry(status)
                    .or_default() += 1;
            }
            Err(reason) => {
                run.stats.lock().unwrap().failed(reason);
                self.counters.errors.fetch_add(1, Relaxed);
            }
        }
    }

    fn runs_json(&self) -> Value {
        let registry = self.registry.lock().unwrap();
        let mut runs: Vec<&Arc<Run>> = registry
            .running
            .values()
            .chain(registry.finished.iter())
            .collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.id));
        json!({"runs": runs.iter().map(|r| r.json()).collect::<Vec<_>>()})
    }

    /// Prometheus text format 0.0.4.
    fn metrics(&self) -> String {
        let c = &self.counters;
        let running = self.registry.lock().unwrap().running.len();
        let mut out = String::from(
            "# HELP coalmine_loadtester_commands_total Webhook calls, by what became of them.\n\
             # TYPE coalmine_loadtester_commands_total counter\n",
        );
        for (result, n) in [
            ("started", &c.started),
            ("skipped", &c.skipped),
            ("refused", &c.refused),
            ("busy", &c.busy),
        ] {
            out += &format!(
                "coalmine_loadtester_commands_total{{result=\"{result}\"}} {}\n",
                n.load(Relaxed)
            );
        }
        out += "# HELP coalmine_loadtester_running_commands Load tests running now.\n\
                # TYPE coalmine_loadtester_running_commands gauge\n";
        out += &format!("coalmine_loadtester_running_commands {running}\n");
        out += "# HELP coalmine_loadtester_requests_total Requests load tests sent, by answer \
                (status code, or error).\n\
                # TYPE coalmine_loadtester_requests_total counter\n";
        for (status, n) in c.statuses.lock().unwrap().iter() {
            out += &format!("coalmine_loadtester_requests_total{{code=\"{status}\"}} {n}\n");
        }
        out += &format!(
            "coalmine_loadtester_requests_total{{code=\"error\"}} {}\n",
            c.errors.load(Relaxed)
        );
        out
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let reply = |status: StatusCode, content_type: &str, body: String| {
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        };
        let text = |a: Answer| {
            let mut body = a.text;
            body.push('\n');
            reply(a.status, "text/plain; charset=utf-8", body)
        };
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        Ok(match (method, path.as_str()) {
            (Method::GET, "/healthz") => text(Answer::new(StatusCode::OK, "OK")),
            (Method::GET, "/runs") => reply(
                StatusCode::OK,
                "application/json",
                self.runs_json().to_string(),
            ),
            (Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics(),
            ),
            (Method::POST, "/") => match Limited::new(req.into_body(), 1 << 20).collect().await {
                Ok(body) => text(self.submit(&body.to_bytes())),
                Err(e) => text(Answer::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body failed: {e}"),
                )),
            },
            (_, "/") => {
                let mut r = text(Answer::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "POST Flagger's webhook payload here",
                ));
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                r
            }
            (_, p) if p.starts_with("/gate/") || p.starts_with("/rollback/") => text(Answer::new(
                StatusCode::NOT_FOUND,
                format!(
                    "{p}: Flagger's loadtester gates are not part of Coalmine's loadtester; \
                     `coalmine pause`, `resume`, `promote` and `abort` steer a rollout"
                ),
            )),
            (_, p) => text(Answer::new(
                StatusCode::NOT_FOUND,
                format!("{p}: not found (POST /, GET /healthz, /runs, /metrics)"),
            )),
        })
    }
}

/// One run's request, built once and sent by every worker.
struct RequestTemplate {
    client: reqwest::Client,
    method: Method,
    url: Url,
    headers: http::HeaderMap,
    body: Option<Bytes>,
    basic_auth: Option<(String, String)>,
}

impl RequestTemplate {
    /// Sends once and reads the whole answer, as hey does; the latency includes the body.
    async fn send(&self) -> Result<(u16, Duration), String> {
        let started = Instant::now();
        let mut r = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone());
        if let Some(body) = &self.body {
            r = r.body(body.clone());
        }
        if let Some((user, pass)) = &self.basic_auth {
            r = r.basic_auth(user, Some(pass));
        }
        let mut resp = r.send().await.map_err(|e| reqwest_reason(&e))?;
        let status = resp.status().as_u16();
        while resp
            .chunk()
            .await
            .map_err(|e| reqwest_reason(&e))?
            .is_some()
        {}
        Ok((status, started.elapsed()))
    }
}

/// One of hey's `-c` workers: one request at a time, at most `-q` a second.
struct Worker {
    request: Arc<RequestTemplate>,
    run: Arc<Run>,
    permits: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    quota: Option<u64>,
    rate: Option<f64>,
    /// No request starts after it (`-z`).
    soft_deadline: tokio::time::Instant,
    /// Requests in flight are abandoned at it (`--timeout`).
    hard_deadline: tokio::time::Instant,
    me: Arc<Loadtester>,
}

impl Worker {
    async fn work(mut self) {
        // One request per tick, the first at once: `-z 2s -q 10` is 20 requests per worker.
        // Late ticks are not made up in a burst (Go's ticker in hey drops them too).
        let mut ticker = self.rate.map(|q| {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / q));
            t.set_missed_tick_behavior(MissedTickBehavior::Skip);
            t
        });
        let mut sent = 0u64;
        let mut shutdown = self.shutdown.clone();
        let stopping = async move {
            let _ = shutdown.wait_for(|&s| s).await;
        };
        tokio::pin!(stopping);
        loop {
            if self.quota.is_some_and(|n| sent >= n) {
                return;
            }
            if let Some(t) = ticker.as_mut() {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = tokio::time::sleep_until(self.soft_deadline) => return,
                    _ = &mut stopping => return,
                }
            }
            if tokio::time::Instant::now() >= self.soft_deadline
                || *self.shutdown.borrow_and_update()
            {
                return;
            }
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => p,
                _ = tokio::time::sleep_until(self.soft_deadline) => return,
                _ = &mut stopping => return,
            };
            let Ok(_permit) = permit else { return };
            let result = tokio::select! {
                r = self.request.send() => r,
                _ = tokio::time::sleep_until(self.hard_deadline) => return,
                _ = &mut stopping => return,
            };
            self.me.record(&self.run, result);
            sent += 1;
        }
    }
}

pub fn run(args: LoadtesterArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: LoadtesterArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    outln!("coalmine loadtester: listen={}", listener.local_addr()?);
    for m in &args.resolve {
        tracing::info!("resolving {}:{} to {}", m.host, m.port, m.addr);
    }
    let (shutdown, _) = watch::channel(false);
    let me = Arc::new(Loadtester {
        permits: Arc::new(Semaphore::new(args.max_concurrency as usize)),
        args,
        registry: Mutex::default(),
        counters: Counters::default(),
        next_id: AtomicU64::new(0),
        shutdown,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let terminated = crate::termination();
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let me = me.clone();
                let svc = service_fn(move |req| me.clone().answer(req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut terminated => break,
        }
    }
    drop(listener);
    // Stop every run: each logs what it did before it is gone.
    me.shutdown.send_replace(true);
    let running = me.registry.lock().unwrap().running.len();
    tracing::info!("shutting down: stopping {running} load tests");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !me.registry.lock().unwrap().running.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn resolve_flags_read_like_curls() {
        assert_eq!(
            parse_resolve("Payment-Service:8080=127.0.0.1:18080").unwrap(),
            Mapping {
                host: "payment-service".into(),
                port: 8080,
                addr: "127.0.0.1:18080".parse().unwrap()
            }
        );
        assert_eq!(parse_resolve("[::1]:80=[::1]:9000").unwrap().host, "::1");
        for (bad, needle) in [
            ("payment-service:8080", "expected HOST:PORT=ADDR"),
            ("payment-service=127.0.0.1:1", "expected HOST:PORT=ADDR"),
            ("h:http=127.0.0.1:1", "\"http\" is not a port"),
            (
                "h:80=localhost:1",
                "\"localhost:1\" is not an IP address and port",
            ),
        ] {
            let e = parse_resolve(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn a_mapped_name_keeps_its_name_for_tls_and_host_and_takes_the_mapped_port() {
        let maps = [parse_resolve("payment-service:8080=127.0.0.1:18080").unwrap()];
        let d = destination(&url("http://payment-service:8080/pay?x=1"), &maps, false).unwrap();
        assert_eq!(d.url.as_str(), "http://payment-service:18080/pay?x=1");
        assert_eq!(
            d.pin,
            Some(("payment-service".into(), "127.0.0.1:18080".parse().unwrap()))
        );
        assert_eq!(d.host_header.as_deref(), Some("payment-service:8080"));
        // The scheme's default port is the one to map.
        let maps = [parse_resolve("web:80=127.0.0.1:9").unwrap()];
        let d = destination(&url("http://WEB/"), &maps, false).unwrap();
        assert_eq!(d.url.as_str(), "http://web:9/");
        assert_eq!(d.host_header.as_deref(), Some("web"));
    }

    #[test]
    fn a_mapped_ip_is_replaced_and_other_ports_are_not_mapped() {
        let maps = [parse_resolve("10.0.0.5:80=127.0.0.1:9001").unwrap()];
        let d = destination(&url("http://10.0.0.5/"), &maps, false).unwrap();
        assert_eq!(d.url.as_str(), "http://127.0.0.1:9001/");
        assert_eq!(d.pin, None);
        assert_eq!(d.host_header.as_deref(), Some("10.0.0.5"));
        // Unmapped IPs go where they say; unmapped names need --dns.
        let d = destination(&url("http://10.0.0.5:81/"), &maps, false).unwrap();
        assert_eq!(
            (d.url.as_str(), d.host_header),
            ("http://10.0.0.5:81/", None)
        );
        let e = destination(&url("http://payment-service:8080/"), &maps, false).unwrap_err();
        assert_eq!(
            e,
            "payment-service:8080 is not mapped: start the loadtester with --resolve \
             payment-service:8080=ADDR (where payment-service:8080 is served), or with --dns to \
             look host names up"
        );
        let d = destination(&url("http://payment-service:8080/"), &maps, true).unwrap();
        assert_eq!(d.url.as_str(), "http://payment-service:8080/");
    }
}
