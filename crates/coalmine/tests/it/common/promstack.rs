//! Real Prometheus and Alertmanager (the Debian binaries) on 127.0.0.1, tuned for fast tests.
//!
//! Each process gets a fresh temporary directory (config, rule files, storage, log) removed on
//! drop, a free port on 127.0.0.1, and is killed (and reaped) on drop. Starting blocks until
//! `/-/ready` answers 200 (at most [`READY_TIMEOUT`]); call it from a multi-thread runtime (or
//! `spawn_blocking`) when other tasks must keep running meanwhile.
//!
//! Timing: Prometheus learns its scrape targets and its Alertmanagers through discovery managers
//! that publish at most every 5 s (not configurable), so the first scrape and the first alert
//! delivery come about 5 s after start. `--rules.alert.resend-delay=1s` matters: alerts that fire
//! before the Alertmanager is known are dropped and only resent after that delay (1 min by
//! default).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, TempDir};
use serde_json::{json, Value};

/// How long a start waits for `/-/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One endpoint Prometheus scrapes (`/metrics`).
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    /// The `job` label; targets with the same job share one scrape config.
    pub job: String,
    /// `host:port` (an `http://` prefix and trailing `/` are tolerated, e.g. `Router::admin`).
    pub address: String,
    /// Extra target labels, e.g. `service=payment-service`.
    pub labels: BTreeMap<String, String>,
}

impl ScrapeTarget {
    pub fn new(job: &str, address: &str) -> ScrapeTarget {
        ScrapeTarget {
            job: job.to_string(),
            address: address.to_string(),
            labels: BTreeMap::new(),
        }
    }

    pub fn label(mut self, name: &str, value: &str) -> ScrapeTarget {
        self.labels.insert(name.to_string(), value.to_string());
        self
    }
}

/// What a [`Prometheus`] scrapes, evaluates and alerts to.
#[derive(Clone, Debug)]
pub struct PrometheusSetup {
    pub scrape: Vec<ScrapeTarget>,
    /// Global scrape interval (and, capped to it, timeout), e.g. `"1s"`.
    pub scrape_interval: String,
    /// Rule files as `(file name, YAML text)`; the name must be a plain file name.
    pub rule_files: Vec<(String, String)>,
    /// Global rule evaluation interval, e.g. `"1s"`.
    pub evaluation_interval: String,
    /// `host:port` of an Alertmanager (see [`Alertmanager::address`]).
    pub alertmanager: Option<String>,
}

impl Default for PrometheusSetup {
    fn default() -> Self {
        PrometheusSetup {
            scrape: Vec::new(),
            scrape_interval: "1s".to_string(),
            rule_files: Vec::new(),
            evaluation_interval: "1s".to_string(),
            alertmanager: None,
        }
    }
}

/// A running `prometheus` (Debian package `prometheus`).
pub type Prometheus = Server<PrometheusKind>;
pub enum PrometheusKind {}

impl Prometheus {
    /// Writes the config and rule files, starts Prometheus and waits until it is ready.
    pub fn start(setup: PrometheusSetup) -> Prometheus {
        let bin = find_binary("prometheus", "prometheus");
        let dir = TempDir::new("prometheus");
        let rules_dir = dir.path.join("rules");
        fs::create_dir(&rules_dir).unwrap();
        let mut rule_paths = Vec::new();
        for (name, text) in &setup.rule_files {
            assert!(
                !name.is_empty() && !name.contains('/') && name != "." && name != "..",
                "rule file name {name:?} must be a plain file name"
            );
            let path = rules_dir.join(name);
            fs::write(&path, text).unwrap();
            rule_paths.push(path.to_str().unwrap().to_string());
        }
        let config = prometheus_config(&setup, &rule_paths);
        Server::spawn(
            "prometheus",
            &bin,
            dir,
            &config,
            "--storage.tsdb.path",
            // Alerts that fire before the Alertmanager is discovered are dropped, and only
            // resent after this delay (default 1m). Not needed: --rules.alert.for-grace-period
            // only applies when restoring `for` state after a restart, never with a fresh TSDB.
            &["--rules.alert.resend-delay=1s"],
        )
    }

    /// [`Prometheus::start`] off the async runtime's threads, then waits until every scrape
    /// target is up (scraped once).
    pub async fn start_scraping(setup: PrometheusSetup) -> Prometheus {
        let targets = setup.scrape.len();
        let prometheus = tokio::task::spawn_blocking(move || Prometheus::start(setup))
            .await
            .unwrap();
        prometheus
            .wait_for_targets_up(targets, Duration::from_secs(30))
            .await;
        prometheus
    }

    /// Instant query (`GET /api/v1/query`); returns the `data` object
    /// (`{"resultType": ..., "result": ...}`). Panics on an error answer.
    pub async fn query(&self, expr: &str) -> Value {
        let url = format!("{}/api/v1/query", self.url);
        let body = get_json(&self.http, &url, &[("query", expr)]).await;
        if body["status"] != "success" {
            panic!("query {expr:?} failed: {body}");
        }
        body["data"].clone()
    }

    /// The samples of an instant vector query, as (labels, value). Panics on other result types.
    pub async fn query_vector(&self, expr: &str) -> Vec<Sample> {
        let data = self.query(expr).await;
        if data["resultType"] != "vector" {
            panic!("query {expr:?} is not an instant vector: {data}");
        }
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Sample {
                labels: s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect(),
                value: parse_value(&s["value"]),
            })
            .collect()
    }

    /// The value of a query that gives one sample or a scalar; `None` when the vector is empty.
    /// Panics when it gives several samples.
    pub async fn value(&self, expr: &str) -> Option<f64> {
        let data = self.query(expr).await;
        match data["resultType"].as_str() {
            Some("scalar") => Some(parse_value(&data["result"])),
            Some("vector") => {
                let result = data["result"].as_array().unwrap();
                match result.len() {
                    0 => None,
                    1 => Some(parse_value(&result[0]["value"])),
                    _ => panic!("query {expr:?} gives several samples: {data}"),
                }
            }
            _ => panic!("query {expr:?} gives neither a scalar nor a vector: {data}"),
        }
    }

    /// Polls [`Prometheus::value`] every 250 ms until `ok(value)`; returns that value.
    /// Panics after `timeout` with the last answer.
    pub async fn wait_until(&self, expr: &str, ok: impl Fn(f64) -> bool, timeout: Duration) -> f64 {
        let ok = &ok;
        self.poll(timeout, Duration::from_millis(250), || async move {
            match self.value(expr).await {
                Some(v) if ok(v) => Ok(v),
                v => Err(format!("{expr:?} still {v:?} after {timeout:?}")),
            }
        })
        .await
    }

    /// `GET /api/v1/targets`: the `data` object (`activeTargets`, `droppedTargets`).
    pub async fn targets(&self) -> Value {
        let url = format!("{}/api/v1/targets", self.url);
        get_json(&self.http, &url, &[]).await["data"].clone()
    }

    /// Waits until at least `n` active targets have health `up`; returns the active targets.
    pub async fn wait_for_targets_up(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.poll(timeout, Duration::from_millis(200), || async move {
            let active = self.targets().await["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if active.iter().filter(|t| t["health"] == "up").count() >= n {
                return Ok(active);
            }
            Err(format!(
                "fewer than {n} targets up after {timeout:?}: {}",
                Value::Array(active)
            ))
        })
        .await
    }

    /// `GET /api/v1/alerts`: every active alert, pending or firing.
    pub async fn alerts(&self) -> Vec<Value> {
        let url = format!("{}/api/v1/alerts", self.url);
        get_json(&self.http, &url, &[]).await["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The alerts in state `firing`.
    pub async fn firing_alerts(&self) -> Vec<Value> {
        let mut alerts = self.alerts().await;
        alerts.retain(|a| a["state"] == "firing");
        alerts
    }

    /// Waits until an alert named `alertname` fires; returns it.
    pub async fn wait_for_firing(&self, alertname: &str, timeout: Duration) -> Value {
        self.poll(timeout, Duration::from_millis(200), || async move {
            let alerts = self.alerts().await;
            if let Some(a) = alerts
                .iter()
                .find(|a| a["labels"]["alertname"] == alertname && a["state"] == "firing")
            {
                return Ok(a.clone());
            }
            Err(format!(
                "{alertname} not firing after {timeout:?}: {}",
                Value::Array(alerts)
            ))
        })
        .await
    }

    /// Looks every `every` until `look` finds what it looks for; after `timeout`, panics with
    /// what the last look saw and Prometheus's log.
    async fn poll<T, F, Look>(&self, timeout: Duration, every: Duration, look: Look) -> T
    where
        F: std::future::Future<Output = Result<T, String>>,
        Look: Fn() -> F,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = match look().await {
                Ok(found) => return found,
                Err(seen) => seen,
            };
            if Instant::now() >= deadline {
                panic!("{seen}\nprometheus log:\n{}", self.log());
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// One sample of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn prometheus_config(setup: &PrometheusSetup, rule_paths: &[String]) -> Value {
    let mut jobs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for t in &setup.scrape {
        let address = t
            .address
            .trim_start_matches("http://")
            .trim_end_matches('/');
        assert!(
            !address.contains('/'),
            "scrape address {:?} must be host:port",
            t.address
        );
        jobs.entry(&t.job)
            .or_default()
            .push(json!({"targets": [address], "labels": t.labels}));
    }
    let scrape_configs: Vec<Value> = jobs
        .into_iter()
        .map(|(job, static_configs)| json!({"job_name": job, "static_configs": static_configs}))
        .collect();
    let mut config = json!({
        "global": {
            "scrape_interval": setup.scrape_interval,
            "scrape_timeout": setup.scrape_interval,
            "evaluation_interval": setup.evaluation_interval,
        },
        "scrape_configs": scrape_configs,
        "rule_files": rule_paths,
    });
    if let Some(am) = &setup.alertmanager {
        config["alerting"] = json!({
            "alertmanagers": [{
                "api_version": "v2",
                "timeout": "5s",
                "static_configs": [{"targets": [am.trim_start_matches("http://")]}],
            }]
        });
    }
    config
}

/// A running `prometheus-alertmanager` (Debian package `prometheus-alertmanager`) with one
/// webhook receiver, clustering off; its address is for [`PrometheusSetup::alertmanager`].
pub type Alertmanager = Server<AlertmanagerKind>;
pub enum AlertmanagerKind {}

impl Alertmanager {
    /// One route (grouped by `alertname`, group_wait 0s, group_interval 1s, repeat_interval 1h)
    /// to a webhook at `webhook_url` (`send_resolved: false`), with `Authorization: Bearer
    /// TOKEN` when `bearer_token` is given.
    pub fn start(webhook_url: &str, bearer_token: Option<&str>) -> Alertmanager {
        let bin = find_binary("prometheus-alertmanager", "prometheus-alertmanager");
        let dir = TempDir::new("alertmanager");
        let mut webhook = json!({"url": webhook_url, "send_resolved": false});
        if let Some(token) = bearer_token {
            webhook["http_config"] =
                json!({"authorization": {"type": "Bearer", "credentials": token}});
        }
        let config = json!({
            "route": {
                "receiver": "webhook",
                "group_by": ["alertname"],
                "group_wait": "0s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [{"name": "webhook", "webhook_configs": [webhook]}],
        });
        Server::spawn(
            "prometheus-alertmanager",
            &bin,
            dir,
            &config,
            "--storage.path",
            // Empty: no cluster listener, no gossip, no settle wait before notifying.
            &["--cluster.listen-address="],
        )
    }

    /// `GET /api/v2/alerts`: the alerts Alertmanager holds.
    pub async fn alerts(&self) -> Vec<Value> {
        let url = format!("{}/api/v2/alerts", self.url);
        get_json(&self.http, &url, &[])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A child process on 127.0.0.1 with its temp dir; killed, reaped and cleaned up on drop.
/// `K` says which server it is, and so what it answers (see [`Prometheus`], [`Alertmanager`]).
pub struct Server<K> {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Time from spawning the process to `/-/ready` answering 200.
    pub ready_after: Duration,
    child: Child,
    listen: String,
    log_path: PathBuf,
    http: reqwest::Client,
    // Dropped after `child` is killed (see Drop).
    dir: TempDir,
    kind: std::marker::PhantomData<K>,
}

impl<K> Server<K> {
    /// Writes `config` to `{name}.yml` in `dir` and `bin`'s storage (`storage_flag`) to
    /// `dir/data`, spawns `bin` on a free port with those and `flags`, and waits for
    /// `/-/ready`; retries with another port when the chosen one was taken meanwhile.
    fn spawn(
        name: &str,
        bin: &Path,
        dir: TempDir,
        config: &Value,
        storage_flag: &str,
        flags: &[&str],
    ) -> Server<K> {
        let config_path = dir.path.join(format!("{name}.yml"));
        // JSON is YAML: serde_json does the quoting.
        fs::write(&config_path, serde_json::to_string_pretty(config).unwrap()).unwrap();
        let storage = dir.path.join("data");
        let args = |listen: &str| {
            let mut args = vec![
                format!("--config.file={}", config_path.display()),
                format!("{storage_flag}={}", storage.display()),
                format!("--web.listen-address={listen}"),
                "--log.level=warn".to_string(),
            ];
            args.extend(flags.iter().map(|f| f.to_string()));
            args
        };
        let log_path = dir.path.join(format!("{name}.log"));
        for attempt in 1..=3 {
            let listen = format!("127.0.0.1:{}", free_port());
            let log = fs::File::create(&log_path).unwrap();
            let spawned = Instant::now();
            let mut child = Command::new(bin)
                .args(args(&listen))
                .current_dir(&dir.path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let deadline = spawned + READY_TIMEOUT;
            loop {
                if http_status(&listen, "/-/ready") == Some(200) {
                    return Server {
                        url: format!("http://{listen}"),
                        ready_after: spawned.elapsed(),
                        child,
                        listen,
                        log_path,
                        http: http_client(),
                        dir,
                        kind: std::marker::PhantomData,
                    };
                }
                if let Some(status) = child.try_wait().unwrap() {
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    if attempt < 3 && log.contains("address already in use") {
                        break; // the port was taken between free_port() and the bind: retry
                    }
                    panic!(
                        "{name} exited ({status}) before becoming ready on {listen}; last log lines:\n{}",
                        tail(&log, 40)
                    );
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    panic!(
                        "{name} not ready on {listen} after {READY_TIMEOUT:?}; last log lines:\n{}",
                        tail(&log, 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `host:port` the server listens on.
    pub fn address(&self) -> String {
        self.listen.clone()
    }

    /// Everything the server has logged so far (warnings and errors).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl<K> Drop for Server<K> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` is removed after this, once the process no longer writes into it.
    }
}

/// The path of `command` (searched in PATH, then /usr/bin); panics naming the Debian package.
fn find_binary(command: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{command}` not found: install the Debian package `{package}` \
                 (scripts/test installs it: apt-get install {package})"
            )
        })
}

/// The status code of a plain blocking `GET path` (HTTP/1.0), or `None` if it fails.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_json(http: &reqwest::Client, url: &str, query: &[(&str, &str)]) -> Value {
    let resp = http
        .get(url)
        .query(query)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {url} {query:?}: {status}, not JSON ({e}): {text}"))
}

/// `[timestamp, "value"]` -> value (`"NaN"`, `"+Inf"` included).
fn parse_value(v: &Value) -> f64 {
    let s = v[1].as_str().unwrap_or_else(|| panic!("not a sample: {v}"));
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => s.parse().unwrap_or_else(|_| panic!("not a number: {v}")),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
