//! `coalmine demo`: the seed's payment-service story on one machine. v1 is healthy, v2 fails
//! about 10 % of requests; the router sends v2 a 5 % share of real traffic and records both.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use coalmine_router::{ProxyOptions, RouterConfig, RoutesDoc, UpstreamUrl, Weight};

use crate::upstream::{serve, Upstream, UpstreamArgs};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Requests the traffic generator sends
    #[arg(long, default_value_t = 4000)]
    pub requests: u32,
    /// Share of traffic sent to v2, in percent
    #[arg(long, default_value_t = 5.0)]
    pub canary_weight: f64,
}

async fn start_upstream(name: &str, error_rate: f64) -> anyhow::Result<UpstreamUrl> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = UpstreamUrl::parse(&format!("http://{}", listener.local_addr()?))
        .map_err(anyhow::Error::msg)?;
    let args = UpstreamArgs {
        listen: listener.local_addr()?,
        name: name.into(),
        error_rate,
        latency: Duration::ZERO,
        seed: 7,
    };
    tokio::spawn(serve(listener, Upstream::new(args)));
    Ok(url)
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let weight = Weight::from_percent(args.canary_weight)
        .map_err(|e| crate::BadInput(format!("--canary-weight: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let v1 = start_upstream("payment-service-v1", 0.0).await?;
        let v2 = start_upstream("payment-service-v2", 0.10).await?;
        let mut routes = RoutesDoc::stable_only(v1.clone());
        routes.name = "payment-service".into();
        routes.canary = Some(v2.clone());
        routes.canary_weight = weight;
        let router = coalmine_router::start(RouterConfig {
            listen: "127.0.0.1:0".parse()?,
            admin: "127.0.0.1:0".parse()?,
            threads: 1,
            routes,
            tls: None,
            proxy: ProxyOptions::default(),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(5),
        })?;
        println!("coalmine demo: payment-service v1 at {v1}, v2 (fails ~10 %) at {v2}");
        println!(
            "router on http://{} sends {}% of traffic to v2; admin on http://{}",
            router.listen,
            weight.percent(),
            router.admin
        );
        let started = Instant::now();
        let client = reqwest::Client::new();
        let url = Arc::new(format!("http://{}/pay", router.listen));
        let per_task = args.requests / 8;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    let _ = client.get(url.as_str()).send().await.and_then(|r| r.error_for_status());
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let stats: serde_json::Value =
            client.get(format!("http://{}/stats", router.admin)).send().await?.json().await?;
        println!("sent {} requests in {:.1}s", per_task * 8, started.elapsed().as_secs_f64());
        println!("{:<8} {:>9} {:>6} {:>8}", "version", "requests", "5xx", "errors");
        let mut rows = Vec::new();
        for version in ["stable", "canary"] {
            let v = &stats[version];
            let requests = v["requests"].as_u64().unwrap_or(0);
            let failed: u64 = v["statuses"]
                .as_object()
                .map(|m| m.iter().filter(|(k, _)| k.starts_with('5')).map(|(_, n)| n.as_u64().unwrap_or(0)).sum())
                .unwrap_or(0);
            let rate = if requests > 0 { 100.0 * failed as f64 / requests as f64 } else { 0.0 };
            println!("{version:<8} {requests:>9} {failed:>6} {rate:>7.2}%");
            rows.push((requests, failed));
        }
        println!(
            "v2 saw {} of {} requests ({:.2}%), and failed {} of them: only the canary's share of users met the bug.",
            rows[1].0,
            rows[0].0 + rows[1].0,
            100.0 * rows[1].0 as f64 / (rows[0].0 + rows[1].0).max(1) as f64,
            rows[1].1
        );
        router.shutdown();
        // The story played out when v1 never failed and v2's failures were seen.
        let played_out = rows[0].1 == 0 && (weight == Weight::ZERO || rows[1].1 > 0);
        Ok(if played_out { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}
