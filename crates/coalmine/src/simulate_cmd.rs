//! `coalmine simulate`: many runs of one rollout over a synthetic scenario, in parallel, each a
//! pure function of its seed; optionally the same traces judged by Flagger's rules.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use clap::Args;
use serde_json::json;

use coalmine_sim::{run_once, simulated_analysis, summarize, Rng, RunResult, Semantics, Summary};
use coalmine_spec::documents::Document;
use coalmine_spec::rollout::Analysis;
use coalmine_spec::scenario::{parse_scenario, Scenario};

use crate::rollout_cmd::{load, pick, terminal_bar, OutputFormat};
use crate::BadInput;

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// A file with the Rollout (or Flagger Canary); routers and targets may be left out
    pub file: String,
    /// Which rollout, when the file has several
    #[arg(long)]
    pub name: Option<String>,
    /// The scenario: traffic, duration, stable's and the canary's error rate and latency
    #[arg(long)]
    pub scenario: String,
    /// How many runs
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Seed of the first run; the same seed gives the same results
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also judge the same traces by another tool's rules: `flagger` (threshold checks only)
    #[arg(long, value_parser = ["flagger"])]
    pub compare: Option<String>,
    /// Worker threads (default: the machine's cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// `json`: the summary as one JSON object on the last line
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let set = load(std::slice::from_ref(&args.file))?;
    let (analysis, deadline) = match pick(&set, args.name.as_deref())? {
        Document::Rollout(r) => (r.spec.analysis.clone(), r.spec.progress_deadline_seconds),
        Document::Canary(c) => (
            c.spec.analysis.clone(),
            c.spec
                .progress_deadline_seconds
                .unwrap_or(coalmine_spec::rollout::DEFAULT_PROGRESS_DEADLINE_SECONDS),
        ),
        _ => unreachable!("pick yields rollouts"),
    };
    let text = std::fs::read_to_string(&args.scenario)
        .map_err(|e| BadInput(format!("{}: cannot read: {e}", args.scenario)))?;
    let scenario = parse_scenario(&args.scenario, &text).map_err(|e| BadInput(e.to_string()))?;
    if args.runs == 0 {
        return Err(BadInput("--runs: at least 1".into()).into());
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let started = Instant::now();
    let (coalmine, dropped) = simulated_analysis(&analysis, Semantics::Coalmine);
    for name in &dropped {
        errln!(
            "warning: metric {name:?} asks a provider, which a simulation does not have; left out"
        );
    }
    let mut semantics = vec![("coalmine", coalmine)];
    if args.compare.is_some() {
        semantics.push((
            "flagger",
            simulated_analysis(&analysis, Semantics::Flagger).0,
        ));
    }
    let mut summaries = Vec::new();
    for (label, analysis) in &semantics {
        let results = run_all(&args, analysis, deadline, &scenario, threads, label);
        summaries.push((*label, summarize(&results)));
    }
    let seconds = started.elapsed().as_secs_f64();
    let (_, main) = &summaries[0];
    match args.output {
        OutputFormat::Json => {
            let mut doc = serde_json::to_value(main)?;
            for (label, summary) in &summaries[1..] {
                doc[*label] = serde_json::to_value(summary)?;
            }
            doc["seed"] = json!(args.seed);
            doc["elapsedSeconds"] = json!((seconds * 100.0).round() / 100.0);
            outln!("{doc}");
        }
        OutputFormat::Text => print_table(&summaries, args.runs, seconds),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every run of one semantics, spread over `threads`; results in run order.
fn run_all(
    args: &SimulateArgs,
    analysis: &Analysis,
    deadline: u64,
    scenario: &Scenario,
    threads: usize,
    label: &str,
) -> Vec<RunResult> {
    let bar = terminal_bar(
        args.output,
        args.runs as u64,
        "{spinner} {prefix:>8} [{bar:30}] {pos}/{len} runs  {elapsed}",
        label,
    );
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, RunResult)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= args.runs {
                            return mine;
                        }
                        // The same seed per run for every semantics: identical traces.
                        let mut rng = Rng::for_run(args.seed, i as u64);
                        mine.push((i, run_once(analysis, deadline, scenario, &mut rng)));
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("simulation worker"))
            .collect()
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn print_table(summaries: &[(&str, Summary)], runs: usize, seconds: f64) {
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    outln!(
        "{:<9} {:>11} {:>9} {:>10} {:>14} {:>14} {:>16} {:>16}",
        "judge",
        "rolled back",
        "promoted",
        "undecided",
        "detect p50 s",
        "detect p95 s",
        "canary req p50",
        "canary fail p50"
    );
    for (label, s) in summaries {
        outln!(
            "{:<9} {:>11} {:>9} {:>10} {:>14} {:>14} {:>16} {:>16}",
            label,
            s.rolled_back,
            s.promoted,
            s.undecided,
            num(s.detection_seconds.p50),
            num(s.detection_seconds.p95),
            num(s.canary_requests.p50),
            num(s.canary_failures.p50),
        );
    }
    outln!("{runs} runs per judge in {seconds:.1} s");
}
