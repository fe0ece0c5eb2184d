//! `coalmine demo`: the seed's payment-service story on one machine, in seconds. v1 is healthy,
//! v2 fails about 10 % of requests. A traffic generator sends real requests through Coalmine's
//! router; the controller gives v2 5 %, watches it, and rolls it back. `--scenario healthy`
//! gives a v2 without the bug, which is promoted step by step.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tokio::sync::mpsc;

use coalmine_controller::Driver;
use coalmine_rollout::Outcome;
use coalmine_router::{RouterConfig, RoutesDoc, UpstreamUrl};
use coalmine_spec::rollout::Rollout;

use crate::rollout_cmd::{OutputFormat, Reporter};
use crate::upstream::{serve, Upstream, UpstreamArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// v2 answers 500 to about 10 % of requests: rolled back
    Bad,
    /// v2 is as good as v1: promoted
    Healthy,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, value_enum, default_value = "bad")]
    pub scenario: Scenario,
    /// Requests per second the traffic generator sends
    #[arg(long, default_value_t = 200)]
    pub rps: u32,
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// The demo's rollout: the seed's steps and checks with a 2-second interval.
const DEMO_ROLLOUT: &str = "
apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: payment-service
spec:
  routers: [ROUTER]
  stable: {url: STABLE}
  canary: {url: CANARY}
  progressDeadlineSeconds: 60
  analysis:
    interval: 3s
    threshold: 2
    stepWeights: [5, 10, 25, 50]
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99}
        interval: 10s
      - name: request-duration
        thresholdRange: {max: 500}
        interval: 10s
";

async fn start_upstream(name: &str, error_rate: f64) -> anyhow::Result<UpstreamUrl> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = UpstreamUrl::parse(&format!("http://{}", listener.local_addr()?))
        .map_err(anyhow::Error::msg)?;
    let args = UpstreamArgs {
        error_rate,
        latency: Duration::from_millis(3),
        seed: 7,
        ..UpstreamArgs::healthy(listener.local_addr()?, name)
    };
    tokio::spawn(serve(listener, Upstream::new(args)));
    Ok(url)
}

/// Requests and failures seen by users, per version that answered (the `x-upstream` header).
#[derive(Default)]
struct Seen {
    v1: AtomicU64,
    v2: AtomicU64,
    v2_failed: AtomicU64,
    router_errors: AtomicU64,
}

async fn generate_traffic(url: String, rps: u32, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let client = reqwest::Client::new();
    let workers = 8;
    let gap = Duration::from_secs_f64(workers as f64 / f64::from(rps.max(1)));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, seen, stop) = (client.clone(), url.clone(), seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(gap);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Relaxed) {
                ticker.tick().await;
                match client.get(&url).send().await {
                    Ok(resp) => {
                        let v2 = resp
                            .headers()
                            .get("x-upstream")
                            .is_some_and(|v| v.as_bytes().ends_with(b"v2"));
                        if v2 {
                            seen.v2.fetch_add(1, Relaxed);
                            if resp.status().is_server_error() {
                                seen.v2_failed.fetch_add(1, Relaxed);
                            }
                        } else if resp.headers().contains_key("x-upstream") {
                            seen.v1.fetch_add(1, Relaxed);
                        } else {
                            seen.router_errors.fetch_add(1, Relaxed);
                        }
                    }
                    Err(_) => {
                        seen.router_errors.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let v2_error_rate = match args.scenario {
            Scenario::Bad => 0.10,
            Scenario::Healthy => 0.0,
        };
        let v1 = start_upstream("payment-service-v1", 0.0).await?;
        let v2 = start_upstream("payment-service-v2", v2_error_rate).await?;
        let mut routes = RoutesDoc::stable_only(v1.clone());
        routes.name = "payment-service".into();
        let router = coalmine_router::start(RouterConfig::embedded(
            "127.0.0.1:0".parse()?,
            "127.0.0.1:0".parse()?,
            routes,
        ))?;
        let text = DEMO_ROLLOUT
            .replace("ROUTER", &format!("http://{}", router.admin))
            .replace("STABLE", v1.as_str())
            .replace("CANARY", v2.as_str());
        let rollout: Rollout = coalmine_spec::parse_yaml("demo-rollout.yaml", &text)?;
        let text_output = args.output == OutputFormat::Text;
        if text_output {
            outln!(
                "coalmine demo ({:?}): payment-service v1 at {v1}, v2 at {v2}{}",
                args.scenario,
                if v2_error_rate > 0.0 { " (fails ~10 % of requests)" } else { "" }
            );
            outln!(
                "router on http://{} (admin http://{}), {} req/s of traffic; steps 5 → 10 → 25 → 50 %, every 3s, threshold 2, sequential judges on (alpha 0.01)",
                router.listen, router.admin, args.rps
            );
        }

        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = tokio::spawn(generate_traffic(
            format!("http://{}/pay", router.listen),
            args.rps,
            seen.clone(),
            stop.clone(),
        ));
        let started = Instant::now();
        let mut driver = Driver::new(&rollout, None)?;
        let mut reporter = Reporter::new("payment-service", args.output);
        let (_control, inputs) = mpsc::channel(1);
        let outcome = tokio::time::timeout(Duration::from_secs(90), driver.run(inputs, &mut reporter))
            .await
            .map_err(|_| anyhow::anyhow!("the demo rollout did not finish within 90 s"))?;
        let elapsed = started.elapsed();
        // A second more traffic shows where users land after the decision.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Relaxed);
        let _ = traffic.await;
        reporter.finish(driver.status(), outcome, driver.settled());
        router.shutdown();

        let (v1n, v2n, v2f, errs) = (
            seen.v1.load(Relaxed),
            seen.v2.load(Relaxed),
            seen.v2_failed.load(Relaxed),
            seen.router_errors.load(Relaxed),
        );
        let total = v1n + v2n + errs;
        let share = 100.0 * v2n as f64 / total.max(1) as f64;
        let expected = match args.scenario {
            Scenario::Bad => Outcome::RolledBack,
            Scenario::Healthy => Outcome::Promoted,
        };
        let evidence = driver.status().sequential.as_ref().map(|s| s.evidence());
        if text_output {
            if let Some(e) = &evidence {
                let t = &e.errors.totals;
                outln!(
                    "sequential evidence: errors {}/{} on v2 vs {}/{} on v1, Bayes factor {:.1} (rolls back at {:.0}), p = {:.4}; latency p = {:.3} over {} v2 samples",
                    t.canary_failures,
                    t.canary_requests,
                    t.stable_failures,
                    t.stable_requests,
                    e.errors.log_bayes_factor.exp(),
                    2.0 / e.alpha,
                    e.errors.p_value,
                    e.latency.p_value,
                    e.latency.canary_samples,
                );
            }
            let verb = if outcome == Outcome::RolledBack { "rolled back" } else { "promoted" };
            outln!(
                "v2 {verb} {:.1}s after the rollout started. Users sent {total} requests: {v2n} reached v2 ({share:.2} %), {v2f} of them failed; {errs} failed in the router.",
                elapsed.as_secs_f64()
            );
        } else {
            outln!(
                "{}",
                serde_json::json!({"scenario": format!("{:?}", args.scenario).to_lowercase(), "outcome": outcome, "seconds": elapsed.as_secs_f64(), "requests": total, "v2Requests": v2n, "v2Failures": v2f, "routerErrors": errs, "sequential": evidence})
            );
        }
        // The story played out: the expected decision, the routers took it, and no request failed
        // anywhere but in v2 itself.
        let played_out = outcome == expected && driver.settled() && errs == 0;
        Ok(if played_out { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}
