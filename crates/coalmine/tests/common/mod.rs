//! Real processes on 127.0.0.1: the `coalmine` binary as router and as upstream.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_coalmine");

/// A child process killed when dropped, with the `key=value` words of its ready line.
pub struct Proc {
    pub child: Child,
    pub ready: String,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("COALMINE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coalmine");
        let stdout = child.stdout.take().unwrap();
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
        Proc { child, ready }
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

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

pub async fn stats(r: &Router) -> serde_json::Value {
    get_json(&format!("{}/stats", r.admin)).await
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
    format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: {name}
spec:
  routers: [{}]
  stable: {{url: {}}}
  canary: {{url: {}}}
  analysis:
{analysis}",
        router.admin, stable.url, canary.url
    )
}
