//! `coalmine simulate`: many runs of one rollout over a synthetic scenario, in parallel, each a
//! pure function of its seed; optionally the same traces judged by Flagger's rules. A
//! `RolloutGroup` is simulated once, as one release: its timeline and how it ended.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use clap::Args;
use serde_json::json;

use coalmine_rollout::group::{GroupPhase, GroupPlan};
use coalmine_rollout::Gate;
use coalmine_sim::{
    run_group, run_once, simulated_analysis, summarize, GroupRun, MemberSetup, Rng, RunResult,
    Semantics, Summary,
};
use coalmine_spec::documents::{Document, DocumentSet};
use coalmine_spec::group::RolloutGroup;
use coalmine_spec::rollout::{Analysis, Rollout};
use coalmine_spec::scenario::{parse_scenario, Scenario};
use coalmine_spec::Weight;

use crate::rollout_cmd::{load, pick, terminal_bar, OutputFormat};
use crate::BadInput;

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Files with the Rollout (or Flagger Canary), or with a RolloutGroup and its members (the
    /// files `apply` takes); routers and targets may be left out
    #[arg(required = true)]
    pub files: Vec<String>,
    /// Which rollout or group, when the files hold several
    #[arg(long)]
    pub name: Option<String>,
    /// The scenario: traffic, duration, stable's and the canary's error rate and latency (for
    /// a group: every member's, unless --member-scenario gives it its own)
    #[arg(long)]
    pub scenario: String,
    /// A group member's own scenario, as MEMBER=FILE (repeatable): `orders=errors-10pct.yaml`
    /// makes orders' canary fail; the run lasts as long as the longest scenario
    #[arg(long, value_name = "MEMBER=FILE")]
    pub member_scenario: Vec<String>,
    /// How many runs (default 1000); a group is simulated once, with --seed
    #[arg(long)]
    pub runs: Option<usize>,
    /// Seed of the first run; the same seed gives the same results
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also judge the same traces by another tool's rules: `flagger` (threshold checks only)
    #[arg(long, value_parser = ["flagger"])]
    pub compare: Option<String>,
    /// Worker threads (default: the machine's cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// `json`: the summary (for a group: its run and timeline) as one JSON object on the last line
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let set = load(&args.files)?;
    if let Some(group) = chosen_group(&set, args.name.as_deref())? {
        return run_group_once(&args, &set, group);
    }
    if !args.member_scenario.is_empty() {
        return Err(BadInput(
            "--member-scenario: the files hold no RolloutGroup; a single rollout takes --scenario"
                .into(),
        )
        .into());
    }
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
    let scenario = read_scenario(&args.scenario)?;
    let runs = args.runs.unwrap_or(DEFAULT_RUNS);
    if runs == 0 {
        return Err(BadInput("--runs: at least 1".into()).into());
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let started = Instant::now();
    let coalmine = analysis_to_simulate(&analysis);
    let mut semantics = vec![("coalmine", coalmine)];
    if args.compare.is_some() {
        semantics.push((
            "flagger",
            simulated_analysis(&analysis, Semantics::Flagger).0,
        ));
    }
    let mut summaries = Vec::new();
    for (label, analysis) in &semantics {
        let results = run_all(&args, runs, analysis, deadline, &scenario, threads, label);
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
        OutputFormat::Text => print_table(&summaries, runs, seconds),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every run of one semantics, spread over `threads`; results in run order.
fn run_all(
    args: &SimulateArgs,
    runs: usize,
    analysis: &Analysis,
    deadline: u64,
    scenario: &Scenario,
    threads: usize,
    label: &str,
) -> Vec<RunResult> {
    let bar = terminal_bar(
        args.output,
        runs as u64,
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
                        if i >= runs {
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

/// How many runs a rollout is simulated over unless `--runs` says.
const DEFAULT_RUNS: usize = 1000;

fn read_scenario(path: &str) -> anyhow::Result<Scenario> {
    let text =
        std::fs::read_to_string(path).map_err(|e| BadInput(format!("{path}: cannot read: {e}")))?;
    Ok(parse_scenario(path, &text).map_err(|e| BadInput(e.to_string()))?)
}

/// The analysis a simulation runs, saying which checks it leaves out.
fn analysis_to_simulate(analysis: &Analysis) -> Analysis {
    let (simulated, dropped) = simulated_analysis(analysis, Semantics::Coalmine);
    for name in &dropped {
        errln!(
            "warning: metric {name:?} asks a provider, which a simulation does not have; left out"
        );
    }
    simulated
}

/// The group the files and `--name` point at: the one named, or the files' only group when
/// no name is given. `None`: simulate a rollout.
fn chosen_group<'a>(
    set: &'a DocumentSet,
    name: Option<&str>,
) -> anyhow::Result<Option<&'a RolloutGroup>> {
    let groups: Vec<&RolloutGroup> = set.groups().collect();
    if let Some(name) = name {
        return Ok(groups.into_iter().find(|g| g.metadata.name == name));
    }
    match groups.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        several => {
            let names: Vec<&str> = several.iter().map(|g| g.metadata.name.as_str()).collect();
            Err(BadInput(format!(
                "the files hold several groups ({}); pick one with --name",
                names.join(", ")
            ))
            .into())
        }
    }
}

/// Simulates `group` once, as `serve` runs it: its timeline, then its end. Exit 0 when every
/// member promoted, 1 otherwise (rolled back, or still going when the scenarios ended).
fn run_group_once(
    args: &SimulateArgs,
    set: &DocumentSet,
    group: &RolloutGroup,
) -> anyhow::Result<ExitCode> {
    if args.runs.is_some() || args.compare.is_some() {
        return Err(BadInput(format!(
            "--runs and --compare are for a single rollout; group {} is simulated once, with --seed",
            group.metadata.name
        ))
        .into());
    }
    // The documents were checked together: every member is a rollout among the files.
    let rollouts: Vec<Rollout> = group
        .spec
        .members
        .iter()
        .filter_map(|m| {
            set.rollouts().find_map(|d| match &d.doc {
                Document::Rollout(r) if r.metadata.name == m.name => Some((**r).clone()),
                // Where a Canary's traffic goes does not matter to a simulation.
                Document::Canary(c) if c.metadata.name == m.name => {
                    Some(c.to_rollout(Default::default()))
                }
                _ => None,
            })
        })
        .collect();
    let plan = GroupPlan::new(group, |name| {
        rollouts.iter().find(|r| r.metadata.name == name)
    });
    let shared = read_scenario(&args.scenario)?;
    let mut own: Vec<Option<Scenario>> = vec![None; plan.members.len()];
    for given in &args.member_scenario {
        let (member, file) = given.split_once('=').ok_or_else(|| {
            BadInput(format!(
                "--member-scenario {given:?}: MEMBER=FILE, such as orders=errors-10pct.yaml"
            ))
        })?;
        let Some(i) = plan.members.iter().position(|m| m.name == member) else {
            let names: Vec<&str> = plan.members.iter().map(|m| m.name.as_str()).collect();
            return Err(BadInput(format!(
                "--member-scenario {given:?}: {member:?} is not a member of group {} ({})",
                plan.name,
                names.join(", ")
            ))
            .into());
        };
        if own[i].is_some() {
            return Err(BadInput(format!(
                "--member-scenario {given:?}: {member} has a scenario already; give each member one"
            ))
            .into());
        }
        own[i] = Some(read_scenario(file)?);
    }
    let analyses: Vec<Analysis> = rollouts
        .iter()
        .map(|r| analysis_to_simulate(&r.spec.analysis))
        .collect();
    let members: Vec<MemberSetup> = rollouts
        .iter()
        .zip(&analyses)
        .zip(&own)
        .map(|((r, analysis), own)| MemberSetup {
            analysis,
            progress_deadline_seconds: r.spec.progress_deadline_seconds,
            scenario: own.as_ref().unwrap_or(&shared),
        })
        .collect();
    let run = run_group(&plan, &members, args.seed);
    match args.output {
        OutputFormat::Json => {
            let mut doc = serde_json::to_value(&run)?;
            doc["seed"] = json!(args.seed);
            outln!("{doc}");
        }
        OutputFormat::Text => print_timeline(&run),
    }
    Ok(if run.phase == GroupPhase::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_timeline(run: &GroupRun) {
    let width = run
        .members
        .iter()
        .map(|m| m.name.len())
        .chain([run.group.len()])
        .max()
        .unwrap_or(0);
    outln!(
        "{:>8}  {:<width$}  {:>7}  {:<12}  event",
        "time",
        "member",
        "weight",
        "gate"
    );
    for moment in &run.timeline {
        let (member, weight, gate) = match &moment.member {
            Some(member) => (
                member.as_str(),
                percent(moment.weight),
                moment.gate.as_ref().map_or("-".into(), gate_words),
            ),
            None => (run.group.as_str(), "-".into(), "-".into()),
        };
        outln!(
            "{:>8}  {member:<width$}  {weight:>7}  {gate:<12}  {}",
            clock(moment.time_ms),
            moment.message
        );
    }
    let ended = match run.decided_ms {
        Some(ms) => format!(" at {}", clock(ms)),
        None => " (the scenarios ended first)".into(),
    };
    outln!(
        "group {}: {:?}{ended}{}",
        run.group,
        run.phase,
        run.reason
            .as_ref()
            .map_or(String::new(), |r| format!(": {r}"))
    );
}

/// A virtual time as `h:mm:ss` (`m:ss` under an hour).
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    match s / 3600 {
        0 => format!("{}:{:02}", s / 60, s % 60),
        h => format!("{h}:{:02}:{:02}", s / 60 % 60, s % 60),
    }
}

fn percent(w: Weight) -> String {
    format!("{} %", w.percent())
}

/// How far a member's gate lets it go, in a few words.
fn gate_words(gate: &Gate) -> String {
    if !gate.start {
        "closed".into()
    } else if gate.promote {
        "open".into()
    } else {
        format!("up to {}", percent(gate.max_weight))
    }
}
