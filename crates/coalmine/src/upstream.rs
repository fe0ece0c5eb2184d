//! `coalmine upstream`: a small HTTP service to put behind the router in demos and tests, with
//! an injectable error rate and latency. The demo's payment-service v1 and v2 are two of these.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
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
    /// Seed of the error draws, so a run can be replayed
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
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
}

impl Upstream {
    pub fn new(args: UpstreamArgs) -> Arc<Self> {
        Arc::new(Upstream {
            args,
            draws: AtomicU64::new(0),
        })
    }

    /// Deterministic per request number: the n-th request fails or not whatever the timing.
    fn fails(&self) -> bool {
        if self.args.error_rate <= 0.0 {
            return false;
        }
        let n = self.draws.fetch_add(1, Relaxed);
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&n.to_le_bytes(), self.args.seed);
        (h as f64 / u64::MAX as f64) < self.args.error_rate
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if !self.args.latency.is_zero() {
            tokio::time::sleep(self.args.latency).await;
        }
        let path = req.uri().path().to_string();
        let reply = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .header("x-upstream", self.args.name.as_str())
                .body(Full::new(Bytes::from(body)))
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
        if self.fails() {
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} failed\n", self.args.name),
            ));
        }
        Ok(reply(StatusCode::OK, format!("{}\n", self.args.name)))
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
            let svc = service_fn(move |req| upstream.clone().answer(req));
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
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
        println!(
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
