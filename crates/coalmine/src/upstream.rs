//! `coalmine upstream`: a small HTTP service to put behind the router in demos and tests, with
//! injectable faults (500s, connection resets, latency). The demo's payment-service v1 and v2
//! are two of these.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use coalmine_spec::parse_duration;

#[derive(Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,
    /// Name returned in every body and in the `x-upstream` header
    #[arg(long, default_value = "stable")]
    pub name: String,
    /// Share of requests (0 to 1) answered 500
    #[arg(long, value_name = "RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub error_rate: f64,
    /// Delay added before every answer
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Share of requests (0 to 1) whose connection is reset (TCP RST) after the whole request
    /// was read, with no answer: a crashing or misbehaving version
    #[arg(long, value_name = "RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub reset_rate: f64,
    /// Share of requests (0 to 1) answered 200 whose connection is reset half-way through the
    /// body
    #[arg(long, value_name = "RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub reset_body_rate: f64,
    /// Seed of the fault draws, so a run can be replayed
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl UpstreamArgs {
    /// A healthy upstream on `listen` named `name`, for in-process use (the demo).
    pub fn healthy(listen: SocketAddr, name: &str) -> UpstreamArgs {
        UpstreamArgs {
            listen,
            name: name.into(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            reset_rate: 0.0,
            reset_body_rate: 0.0,
            seed: 1,
        }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1")),
    }
}

pub struct Upstream {
    args: UpstreamArgs,
    draws: AtomicU64,
    /// What reached this upstream, for `/_coalmine/received`.
    received: Mutex<Received>,
}

/// Requests received, and how many carried an `x-request-id` seen before: a router that sends
/// a request twice shows here.
#[derive(Default)]
struct Received {
    requests: u64,
    /// Copies a router mirrored here (`x-coalmine-mirror: true`): everything else came from
    /// users.
    mirrored: u64,
    by_method: HashMap<String, u64>,
    ids: HashMap<String, u32>,
    duplicates: u64,
    duplicates_by_method: HashMap<String, u64>,
}

/// Ids remembered at most (a test's worth); later ids are not checked.
const MAX_TRACKED_IDS: usize = 1 << 20;

/// What the upstream does with one request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Error,
    Reset,
    ResetMidBody,
}

/// The upstream's reply body: a full one, or one that breaks off half-way (the connection is
/// then reset).
pub enum Reply {
    Full(Option<Bytes>),
    /// The first part, then (once it has had time to leave) an error.
    Broken {
        first: Option<Bytes>,
        pause: std::pin::Pin<Box<tokio::time::Sleep>>,
    },
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        match self.get_mut() {
            Reply::Full(b) => Poll::Ready(b.take().map(|d| Ok(hyper::body::Frame::data(d)))),
            Reply::Broken { first, pause } => match first.take() {
                Some(d) => Poll::Ready(Some(Ok(hyper::body::Frame::data(d)))),
                None => pause
                    .as_mut()
                    .poll(cx)
                    .map(|()| Some(Err(std::io::Error::other("injected reset")))),
            },
        }
    }
}

impl Upstream {
    pub fn new(args: UpstreamArgs) -> Arc<Self> {
        Arc::new(Upstream {
            args,
            draws: AtomicU64::new(0),
            received: Mutex::new(Received::default()),
        })
    }

    /// Deterministic per request number: the n-th request fails or not whatever the timing.
    fn fault(&self) -> Fault {
        let a = &self.args;
        if a.error_rate <= 0.0 && a.reset_rate <= 0.0 && a.reset_body_rate <= 0.0 {
            return Fault::None;
        }
        let n = self.draws.fetch_add(1, Relaxed);
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&n.to_le_bytes(), a.seed);
        let u = h as f64 / u64::MAX as f64;
        if u < a.error_rate {
            Fault::Error
        } else if u < a.error_rate + a.reset_rate {
            Fault::Reset
        } else if u < a.error_rate + a.reset_rate + a.reset_body_rate {
            Fault::ResetMidBody
        } else {
            Fault::None
        }
    }

    fn note_received(&self, req: &Request<Incoming>) {
        let mut r = self.received.lock().expect("received");
        let method = req.method().as_str().to_string();
        r.requests += 1;
        if req
            .headers()
            .get("x-coalmine-mirror")
            .is_some_and(|v| v == "true")
        {
            r.mirrored += 1;
        }
        *r.by_method.entry(method.clone()).or_default() += 1;
        let Some(id) = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Some(seen) = r.ids.get_mut(id) {
            *seen += 1;
            r.duplicates += 1;
            *r.duplicates_by_method.entry(method).or_default() += 1;
        } else if r.ids.len() < MAX_TRACKED_IDS {
            r.ids.insert(id.to_string(), 1);
        }
    }

    fn received_doc(&self) -> String {
        let r = self.received.lock().expect("received");
        serde_json::json!({
            "requests": r.requests,
            "mirrored": r.mirrored,
            "notMirrored": r.requests - r.mirrored,
            "byMethod": r.by_method,
            "duplicates": r.duplicates,
            "duplicatesByMethod": r.duplicates_by_method,
        })
        .to_string()
    }

    /// Answers one request; `reset` is set when the connection must be reset rather than
    /// answered.
    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
        reset: Arc<AtomicBool>,
    ) -> Result<Response<Reply>, std::io::Error> {
        if req.uri().path() == "/_coalmine/received" {
            return Ok(Response::new(Reply::Full(Some(self.received_doc().into()))));
        }
        self.note_received(&req);
        if !self.args.latency.is_zero() {
            tokio::time::sleep(self.args.latency).await;
        }
        let path = req.uri().path().to_string();
        let reply = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .header("x-upstream", self.args.name.as_str())
                .body(Reply::Full(Some(Bytes::from(body))))
                .expect("static response parts")
        };
        if path == "/healthz" {
            return Ok(reply(StatusCode::OK, "ok\n".into()));
        }
        if let Some(code) = path.strip_prefix("/status/") {
            let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
            return Ok(reply(
                status.unwrap_or(StatusCode::BAD_REQUEST),
                format!("{}\n", self.args.name),
            ));
        }
        if let Some(ms) = path.strip_prefix("/sleep/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            return Ok(reply(StatusCode::OK, format!("{}\n", self.args.name)));
        }
        if let Some(n) = path.strip_prefix("/bytes/") {
            let n: usize = n.parse().unwrap_or(0).min(64 << 20);
            return Ok(reply(StatusCode::OK, "x".repeat(n)));
        }
        if path == "/echo" {
            let (parts, body) = req.into_parts();
            let received = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            let doc = serde_json::json!({
                "upstream": self.args.name,
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "bodyBytes": received.len(),
                "bodyXxh3": format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&received)),
            });
            return Ok(reply(StatusCode::OK, doc.to_string()));
        }
        // Drain what the client sent before answering, as a real service would.
        let _ = req.into_body().collect().await;
        match self.fault() {
            Fault::None => Ok(reply(StatusCode::OK, format!("{}\n", self.args.name))),
            Fault::Error => Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} failed\n", self.args.name),
            )),
            Fault::Reset => {
                reset.store(true, Relaxed);
                Err(std::io::Error::other("injected reset"))
            }
            Fault::ResetMidBody => {
                reset.store(true, Relaxed);
                let body = format!("{} ", self.args.name).repeat(64);
                Ok(Response::builder()
                    .header("x-upstream", self.args.name.as_str())
                    .header("content-length", body.len() * 2)
                    .body(Reply::Broken {
                        first: Some(Bytes::from(body)),
                        pause: Box::pin(tokio::time::sleep(Duration::from_millis(20))),
                    })
                    .expect("static response parts"))
            }
        }
    }
}

/// Serves on an already bound listener until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, upstream: Arc<Upstream>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            // An injected reset closes the socket with SO_LINGER 0: the peer gets an RST.
            let socket = socket2::SockRef::from(&stream).try_clone().ok();
            let reset = Arc::new(AtomicBool::new(false));
            let flag = reset.clone();
            let svc = service_fn(move |req| upstream.clone().answer(req, flag.clone()));
            let served = builder.serve_connection(TokioIo::new(stream), svc).await;
            if reset.load(Relaxed) || served.is_err() {
                if let Some(s) = socket {
                    let _ = s.set_linger(Some(Duration::ZERO));
                }
            }
        });
    }
}

pub fn run(args: UpstreamArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        outln!(
            "coalmine upstream: listen={} name={}",
            listener.local_addr()?,
            args.name
        );
        let server = tokio::spawn(serve(listener, Upstream::new(args)));
        crate::termination().await;
        server.abort();
        Ok(())
    })
}
