//! `coalmine demo`: the seed's payment-service story on one machine, in seconds. v1 is healthy,
//! v2 fails about 10 % of requests. A traffic generator sends real requests through Coalmine's
//! router; the controller runs the seed's Canary analysis (2-minute interval, threshold 3) with
//! the sequential judges on, which roll v2 back between ticks. Beside the measured time the demo
//! prints what Flagger's rule (the threshold checks alone) would have needed on the same traffic,
//! from the simulator (`coalmine-sim`: the same state machine on a virtual clock).
//! `--scenario healthy` gives a v2 without the bug, promoted step by step on a 2-second interval.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::sync::mpsc;

use coalmine_controller::traffic::owner;
use coalmine_controller::{driver::now_ms, Driver, Runner, Seams};
use coalmine_rollout::{Action, Event, Input, Machine, Outcome, Plan, Status, Strategy};
use coalmine_router::{RouterConfig, RoutesDoc, UpstreamUrl};
use coalmine_sim::{run_once, simulated_analysis, Decision, Rng, RunResult, Semantics};
use coalmine_spec::duration::{format_duration, Dur};
use coalmine_spec::rollout::{Analysis, Rollout};
use coalmine_spec::scenario::{Behaviour, Latency, Scenario as Traffic, TrafficShape};
use coalmine_spec::Weight;

use crate::rollout_cmd::{OutputFormat, Reporter};
use crate::upstream::{serve, Upstream, UpstreamArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// v2 answers 500 to about 10 % of requests: rolled back
    Bad,
    /// v2 is as good as v1: promoted
    Healthy,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Bad => "bad",
            Scenario::Healthy => "healthy",
        }
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, value_enum, default_value = "bad")]
    pub scenario: Scenario,
    /// Requests per second the traffic generator sends
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub rps: u32,
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// The demo's rollout: the analysis of the seed's payment-service Canary
/// (tests/fixtures/seed/flagger-payment-service.yaml) field for field, without its load-test
/// webhook (the demo sends its own traffic). `INTERVAL` is the seed's for the failing v2.
const DEMO_ROLLOUT: &str = "
apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: payment-service
spec:
  routers: [ROUTER]
  stable: {url: STABLE}
  canary: {url: CANARY}
  analysis:
    interval: INTERVAL
    threshold: 3
    maxWeight: 50
    stepWeight: 10
    metrics:
      - name: request-success-rate
        thresholdRange: {min: 99.5}
        interval: 1m
      - name: request-duration
        thresholdRange: {max: 1000}
        interval: 1m
";
const SEED_INTERVAL: &str = "2m";
/// The healthy v2 is promoted only after every step: on the seed's interval that is 12 minutes.
const HEALTHY_INTERVAL: &str = "2s";
/// Share of v2's requests answered 500 in the bad scenario.
const V2_ERROR_RATE: f64 = 0.10;
/// Both versions' added latency; the simulated traffic's median latency too.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(3);
/// The simulated run that stands for Flagger's rule: `coalmine simulate --seed 1`'s first run.
const FLAGGER_SEED: u64 = 1;
/// The simulated traffic runs this long at most (the rollout ends long before).
const SIMULATED_DAY: Duration = Duration::from_secs(24 * 3600);

async fn start_upstream(name: &str, error_rate: f64) -> anyhow::Result<UpstreamUrl> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = UpstreamUrl::parse(&format!("http://{}", listener.local_addr()?))
        .map_err(anyhow::Error::msg)?;
    let args = UpstreamArgs {
        error_rate,
        latency: UPSTREAM_LATENCY,
        seed: 7,
        ..UpstreamArgs::healthy(listener.local_addr()?, name)
    };
    tokio::spawn(serve(listener, Upstream::new(args)));
    Ok(url)
}

/// Requests and failures seen by users, per version that answered (the `x-upstream` header).
struct Seen {
    v1: AtomicU64,
    v2: AtomicU64,
    v2_failed: AtomicU64,
    router_errors: AtomicU64,
    /// When the first request that v2 answered was sent (ms since the epoch; MAX: none yet).
    first_v2_sent_ms: AtomicU64,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen {
            v1: AtomicU64::new(0),
            v2: AtomicU64::new(0),
            v2_failed: AtomicU64::new(0),
            router_errors: AtomicU64::new(0),
            first_v2_sent_ms: AtomicU64::new(u64::MAX),
        }
    }
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
                let sent_ms = now_ms();
                match client.get(&url).send().await {
                    Ok(resp) => {
                        let v2 = resp
                            .headers()
                            .get("x-upstream")
                            .is_some_and(|v| v.as_bytes().ends_with(b"v2"));
                        if v2 {
                            seen.v2.fetch_add(1, Relaxed);
                            seen.first_v2_sent_ms.fetch_min(sent_ms, Relaxed);
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

/// The rollout's first tick ("Initialization done", "New revision detected"), taken here so the
/// demo's one change to the timeline is visible: the next tick — "Starting canary analysis", the
/// first step — is due at once instead of one interval later, as in Flagger and `coalmine run`.
/// The driver continues from the returned status; everything after runs as written.
fn first_step_at_once(rollout: &Rollout, reporter: &mut Reporter) -> Status {
    let spec = &rollout.spec;
    let plan = Plan::new(
        &spec.analysis,
        spec.progress_deadline_seconds,
        spec.skip_analysis,
    );
    let now = now_ms();
    let mut machine = Machine::new(plan, now);
    let events: Vec<Event> = machine
        .handle(now, Input::Tick { traffic: Ok(()) })
        .into_iter()
        .filter_map(|action| match action {
            Action::Event(event) => Some(event),
            _ => None,
        })
        .collect();
    reporter.print(machine.status(), &events);
    let mut status = machine.status().clone();
    status.next_tick_ms = Some(now);
    status
}

/// The demo's traffic as the simulator sees it: the generator's rate, v1 without errors, v2
/// with its error rate, both with the upstreams' latency.
fn simulated_traffic(rps: u32, v2_error_rate: f64) -> Traffic {
    let latency = Latency {
        median: Dur(UPSTREAM_LATENCY),
        sigma: 0.25,
    };
    Traffic {
        traffic: TrafficShape {
            rps: f64::from(rps),
            curve: Vec::new(),
        },
        duration: Dur(SIMULATED_DAY),
        stable: Behaviour {
            error_rate: 0.0,
            latency: latency.clone(),
            start_after: None,
        },
        canary: Behaviour {
            error_rate: v2_error_rate,
            latency,
            start_after: None,
        },
    }
}

/// What Flagger's rule — the same analysis without the sequential judges, from its first tick on
/// Flagger's timeline — does with the same traffic: one simulated run.
fn flaggers_rule(analysis: &Analysis, deadline: u64, traffic: &Traffic) -> RunResult {
    let (flagger, _) = simulated_analysis(analysis, Semantics::Flagger);
    run_once(
        &flagger,
        deadline,
        traffic,
        &mut Rng::for_run(FLAGGER_SEED, 0),
    )
}

/// `interval 2m, threshold 3, steps 10 → 20 → 30 → 40 → 50 %, request-success-rate min 99.5
/// over 1m, ...`, from the analysis itself.
fn describe(analysis: &Analysis, plan: &Plan) -> String {
    let mut parts = vec![
        format!("interval {}", format_duration(analysis.interval.0)),
        format!("threshold {}", plan.threshold),
    ];
    if let Strategy::Canary { ladder, .. } = &plan.strategy {
        let steps: Vec<String> = ladder.iter().map(|w| format!("{}", w.percent())).collect();
        parts.push(format!("steps {} %", steps.join(" → ")));
    }
    for check in &analysis.metrics {
        let range = check.range();
        let mut bounds = Vec::new();
        if let Some(min) = range.min {
            bounds.push(format!("min {min}"));
        }
        if let Some(max) = range.max {
            bounds.push(format!("max {max}"));
        }
        let window = format_duration(check.window());
        parts.push(format!(
            "{} {} over {window}",
            check.name,
            bounds.join(", ")
        ));
    }
    parts.join(", ")
}

/// 9612 → "9,612".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn seconds_between(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (v2_error_rate, interval) = match args.scenario {
            Scenario::Bad => (V2_ERROR_RATE, SEED_INTERVAL),
            Scenario::Healthy => (0.0, HEALTHY_INTERVAL),
        };
        let v1 = start_upstream("payment-service-v1", 0.0).await?;
        let v2 = start_upstream("payment-service-v2", v2_error_rate).await?;
        let mut routes = RoutesDoc::stable_only(v1.clone().into());
        routes.name = "payment-service".into();
        let router = coalmine_router::start(RouterConfig::embedded(
            "127.0.0.1:0".parse()?,
            "127.0.0.1:0".parse()?,
            routes,
        ))?;
        let text = DEMO_ROLLOUT
            .replace("ROUTER", &format!("http://{}", router.admin))
            .replace("STABLE", v1.as_str())
            .replace("CANARY", v2.as_str())
            .replace("INTERVAL", interval);
        let rollout: Rollout = coalmine_spec::parse_yaml("demo-rollout.yaml", &text)?;
        let analysis = &rollout.spec.analysis;
        let deadline = rollout.spec.progress_deadline_seconds;
        let plan = Plan::new(analysis, deadline, rollout.spec.skip_analysis);
        let text_output = args.output == OutputFormat::Text;
        let demo_only = match args.scenario {
            Scenario::Bad => format!(
                "the first step (to {} %) comes at once, where Flagger and `coalmine run` take it one interval ({interval}) after the rollout starts; every check, threshold and later step is the seed's",
                plan.next_weight(Weight::ZERO).map_or(0, |w| w.basis_points() / 100)
            ),
            Scenario::Healthy => format!(
                "the interval is {HEALTHY_INTERVAL}, not the seed's {SEED_INTERVAL}, so the promotion takes seconds, and the first step comes at once"
            ),
        };
        if text_output {
            outln!(
                "coalmine demo ({}): payment-service v1 at {v1}, v2 at {v2}{}",
                args.scenario.name(),
                if v2_error_rate > 0.0 {
                    format!(" (answers 500 to ~{:.0} % of requests)", 100.0 * v2_error_rate)
                } else {
                    String::new()
                }
            );
            outln!(
                "router on http://{} (admin http://{}), {} req/s of traffic",
                router.listen,
                router.admin,
                args.rps
            );
            outln!(
                "analysis: the seed's payment-service Canary — {} — with the sequential judges on (alpha {})",
                describe(analysis, &plan),
                analysis.sequential.alpha
            );
            outln!("demo only: {demo_only}");
        }

        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = tokio::spawn(generate_traffic(
            format!("http://{}/pay", router.listen),
            args.rps,
            seen.clone(),
            stop.clone(),
        ));
        let mut reporter = Reporter::new("payment-service", args.output);
        let status = first_step_at_once(&rollout, &mut reporter);
        let seams = Seams::open(&rollout, Runner::Run, &owner("payment-service", "coalmine demo"))?;
        let mut driver = Driver::new(&rollout, Some(status), seams)?;
        let (_control, mut inputs) = mpsc::channel(1);
        let outcome = tokio::time::timeout(Duration::from_secs(90), driver.run(&mut inputs, &mut reporter))
            .await
            .map_err(|_| anyhow::anyhow!("the demo rollout did not finish within 90 s"))?;
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
        let status = driver.status();
        let evidence = status.sequential.as_ref().map(|s| s.evidence());
        let by_sequential_test = outcome == Outcome::RolledBack
            && evidence
                .as_ref()
                .is_some_and(|e| e.errors.rejected || e.latency.rejected);
        // Both counted from the rollout's start and from the first request v2 answered.
        let decided_seconds = seconds_between(status.started_ms, status.last_transition_ms);
        let first_v2_ms = Some(seen.first_v2_sent_ms.load(Relaxed)).filter(|&ms| ms != u64::MAX);
        let detection_seconds = first_v2_ms
            .filter(|_| outcome == Outcome::RolledBack)
            .map(|first| seconds_between(first, status.last_transition_ms));
        let simulated = simulated_traffic(args.rps, v2_error_rate);
        let flagger = (args.scenario == Scenario::Bad)
            .then(|| flaggers_rule(analysis, deadline, &simulated));

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
            match (outcome, detection_seconds) {
                (Outcome::RolledBack, Some(detected)) => outln!(
                    "v2 rolled back {detected:.1}s after its first request ({decided_seconds:.1}s after the rollout started), by {}: {v2n} requests reached v2, {v2f} of them failed.",
                    if by_sequential_test { "the sequential test" } else { "the threshold checks" },
                ),
                (Outcome::RolledBack, None) => outln!(
                    "v2 rolled back {decided_seconds:.1}s after the rollout started, before any request reached it."
                ),
                (Outcome::Promoted, _) => outln!(
                    "v2 promoted {decided_seconds:.1}s after the rollout started: {v2n} requests reached it, {v2f} of them failed."
                ),
            }
            if let Some(f) = &flagger {
                outln!("{}", flagger_sentence(analysis, &plan, f, args.rps, v2_error_rate));
            }
            outln!(
                "Users sent {total} requests: {v2n} reached v2 ({share:.2} %), {v2f} of them failed; {errs} failed in the router."
            );
        } else {
            outln!(
                "{}",
                json!({
                    "scenario": args.scenario.name(),
                    "outcome": outcome,
                    "rolledBackBySequentialTest": by_sequential_test,
                    "reason": status.message,
                    "decidedSeconds": decided_seconds,
                    "detectionSeconds": detection_seconds,
                    "requests": total,
                    "v2Requests": v2n,
                    "v2Failures": v2f,
                    "routerErrors": errs,
                    "rps": args.rps,
                    "demoOnly": demo_only,
                    "analysis": analysis,
                    "sequential": evidence,
                    "flagger": flagger.as_ref().map(|f| flagger_json(f, &simulated)),
                })
            );
        }
        // The story played out: the expected decision (for the bad v2, by the sequential test),
        // the routers took it, and no request failed anywhere but in v2 itself.
        let played_out = outcome == expected
            && (expected == Outcome::Promoted || by_sequential_test)
            && driver.settled()
            && errs == 0;
        Ok(if played_out { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}

/// The run of Flagger's rule in words: when it decides, counted from v2's first request (and
/// from the rollout's start), and what users would have met meanwhile.
fn flagger_sentence(
    analysis: &Analysis,
    plan: &Plan,
    result: &RunResult,
    rps: u32,
    v2_error_rate: f64,
) -> String {
    let settings = format!(
        "interval {}, threshold {}",
        format_duration(analysis.interval.0),
        plan.threshold
    );
    let how = format!(
        "simulated: the same state machine without the sequential test, {rps} req/s, v2 failing {:.0} %, seed {FLAGGER_SEED}",
        100.0 * v2_error_rate
    );
    let verb = match result.decision {
        Decision::RolledBack => "rolled back",
        Decision::Promoted => "promoted v2",
        Decision::Undecided => {
            return format!(
                "Flagger's rule with these settings ({settings}) would not have decided within {} ({how}).",
                format_duration(SIMULATED_DAY)
            )
        }
    };
    let decided_ms = result.decided_ms.unwrap_or(0);
    let since_start = format_duration(Duration::from_millis(decided_ms));
    let when = match result.exposed_ms {
        Some(exposed) => format!(
            "{} after v2's first request ({since_start} after the rollout started, its first step {} in)",
            format_duration(Duration::from_millis(decided_ms.saturating_sub(exposed))),
            format_duration(Duration::from_millis(exposed)),
        ),
        None => format!("{since_start} after the rollout started"),
    };
    format!(
        "Flagger's rule with these settings ({settings}) would have {verb} {when} — by then about {} requests would have reached v2 and {} failed ({how}).",
        thousands(result.canary_requests),
        thousands(result.canary_failures),
    )
}

fn flagger_json(result: &RunResult, simulated: &Traffic) -> serde_json::Value {
    let seconds = |ms: Option<u64>| ms.map(|ms| ms as f64 / 1000.0);
    json!({
        "decision": result.decision,
        "decidedSeconds": seconds(result.decided_ms),
        "detectionSeconds": result.decided_ms.zip(result.exposed_ms).map(|(d, e)| d.saturating_sub(e) as f64 / 1000.0),
        "firstV2RequestSeconds": seconds(result.exposed_ms),
        "v2Requests": result.canary_requests,
        "v2Failures": result.canary_failures,
        "seed": FLAGGER_SEED,
        "scenario": simulated,
    })
}
