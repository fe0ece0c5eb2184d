//! `coalmine check`, `convert` and `run`: documents in, a rollout driven in the foreground.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use tokio::sync::mpsc;

use coalmine_controller::report::metrics_json;
use coalmine_controller::time::rfc3339;
use coalmine_controller::{Driver, Sink};
use coalmine_rollout::{Event, EventLevel, Input, Outcome, Status};
use coalmine_spec::documents::{self, Document, DocumentSet};
use coalmine_spec::flagger::Placement;
use coalmine_spec::rollout::{HttpUrl, Rollout, Target};
use coalmine_spec::weight::basis_points_to_percent;

use crate::BadInput;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// Reads the files, prints warnings, and fails with `file:line:column: field: message`.
pub fn load(paths: &[String]) -> anyhow::Result<DocumentSet> {
    let mut files = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BadInput(format!("{path}: cannot read: {e}")))?;
        files.push((path.clone(), text));
    }
    let set = documents::load(&files).map_err(|e| BadInput(e.to_string()))?;
    for w in &set.warnings {
        errln!("warning: {w}");
    }
    Ok(set)
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Files with Rollout, Canary and MetricTemplate documents
    #[arg(required = true)]
    pub files: Vec<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let set = load(&args.files)?;
    let docs: Vec<serde_json::Value> = set
        .documents
        .iter()
        .map(|d| {
            let (kind, name) = match &d.doc {
                Document::Rollout(r) => ("Rollout", r.metadata.name.as_str()),
                Document::Canary(c) => ("Canary", c.metadata.name.as_str()),
                Document::MetricTemplate(t) => ("MetricTemplate", t.metadata.name.as_str()),
                Document::AlertProvider => ("AlertProvider", ""),
            };
            serde_json::json!({"file": d.file, "line": d.line, "kind": kind, "name": name})
        })
        .collect();
    match args.output {
        OutputFormat::Json => outln!(
            "{}",
            serde_json::json!({"valid": true, "documents": docs, "warnings": set.warnings})
        ),
        OutputFormat::Text => {
            for d in &docs {
                outln!(
                    "ok  {}:{}  {} {}",
                    d["file"].as_str().unwrap_or(""),
                    d["line"],
                    d["kind"].as_str().unwrap_or(""),
                    d["name"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a Flagger Canary's traffic goes, which Kubernetes would otherwise tell.
#[derive(Args, Debug, Default)]
pub struct PlacementArgs {
    /// Admin address of a Coalmine router carrying the service (repeatable)
    #[arg(long = "router")]
    pub routers: Vec<String>,
    /// URL of the version serving now
    #[arg(long)]
    pub stable: Option<String>,
    /// URL of the new version
    #[arg(long)]
    pub canary: Option<String>,
}

impl PlacementArgs {
    fn placement(&self) -> anyhow::Result<Placement> {
        let url = |flag: &str, v: &Option<String>| -> anyhow::Result<HttpUrl> {
            let v = v.as_deref().ok_or_else(|| {
                BadInput(format!(
                    "a Flagger Canary needs --{flag} URL (Kubernetes would supply it)"
                ))
            })?;
            HttpUrl::parse(v).map_err(|e| BadInput(format!("--{flag}: {e}")).into())
        };
        let routers = self
            .routers
            .iter()
            .map(|r| HttpUrl::parse(r).map_err(|e| BadInput(format!("--router: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if routers.is_empty() {
            return Err(BadInput("a Flagger Canary needs --router ADMIN_URL".into()).into());
        }
        Ok(Placement {
            routers,
            stable: Target::Url(url("stable", &self.stable)?),
            canary: Target::Url(url("canary", &self.canary)?),
        })
    }
}

/// The one Rollout or Canary a command acts on: the only one in the files, or the one `--name`
/// picks.
pub fn pick<'a>(set: &'a DocumentSet, name: Option<&str>) -> anyhow::Result<&'a Document> {
    let candidates: Vec<_> = set
        .rollouts()
        .filter(|d| {
            let n = match &d.doc {
                Document::Rollout(r) => &r.metadata.name,
                Document::Canary(c) => &c.metadata.name,
                _ => return false,
            };
            name.is_none_or(|want| want == n)
        })
        .collect();
    let chosen = match candidates.as_slice() {
        [one] => one,
        [] => {
            return Err(BadInput(match name {
                Some(n) => format!("no Rollout or Canary named {n:?} in the files"),
                None => "the files hold no Rollout or Canary".into(),
            })
            .into())
        }
        _ => {
            return Err(
                BadInput("the files hold several rollouts; pick one with --name".into()).into(),
            )
        }
    };
    Ok(&chosen.doc)
}

/// The rollout a command runs: a Rollout as written, a Canary placed by the flags.
fn pick_rollout(
    set: &DocumentSet,
    name: Option<&str>,
    placement: &PlacementArgs,
) -> anyhow::Result<Rollout> {
    match pick(set, name)? {
        Document::Canary(c) => Ok(c.to_rollout(placement.placement()?)),
        Document::Rollout(r) => Ok(r.clone()),
        _ => unreachable!("rollouts() yields rollouts"),
    }
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A file with a Flagger Canary, and files with the MetricTemplates it uses (their queries
    /// are written into the Rollout)
    #[arg(required = true)]
    pub files: Vec<String>,
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

pub fn convert(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let set = load(&args.files)?;
    let rollout = pick_rollout(&set, args.name.as_deref(), &args.placement)?;
    crate::output::text(&serde_saphyr::to_string(&rollout)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A file with the Rollout (or a Flagger Canary plus --router/--stable/--canary), and files
    /// with the MetricTemplates its metrics refer to
    #[arg(required = true)]
    pub files: Vec<String>,
    /// Which rollout, when the file has several
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// `json`: one JSON object per event, then the final status
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let set = load(&args.files)?;
    set.require_templates()
        .map_err(|e| BadInput(e.to_string()))?;
    let rollout = pick_rollout(&set, args.name.as_deref(), &args.placement)?;
    let mut driver =
        Driver::new(&rollout, None).map_err(|e| BadInput(format!("{}: {e}", args.files[0])))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Before anything moves: the routers must be Coalmine routers no other rollout drives.
    rt.block_on(driver.claim_routers())
        .map_err(|e| BadInput(format!("{}: {e}", rollout.metadata.name)))?;
    let mut reporter = Reporter::new(&rollout.metadata.name, args.output);
    let outcome = rt.block_on(async {
        let (control, inputs) = mpsc::channel(16);
        // Interrupting a run (Ctrl-C, SIGTERM, the terminal closing) rolls back: traffic
        // never stays on an unwatched canary.
        tokio::spawn(async move {
            crate::interruption().await;
            let _ = control
                .send(Input::Abort {
                    reason: "interrupted".into(),
                })
                .await;
        });
        driver.run(inputs, &mut reporter).await
    });
    reporter.finish(driver.status(), outcome, driver.settled());
    Ok(match outcome {
        Outcome::Promoted if driver.settled() => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Prints a run: a progress bar on a terminal, a line per event otherwise, or JSON lines.
pub struct Reporter {
    name: String,
    format: OutputFormat,
    bar: Option<indicatif::ProgressBar>,
}

/// A progress bar when a person watches (text output on a terminal); plain lines otherwise.
pub fn terminal_bar(
    format: OutputFormat,
    len: u64,
    template: &str,
    prefix: &str,
) -> Option<indicatif::ProgressBar> {
    (format == OutputFormat::Text && std::io::stdout().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    })
}

impl Reporter {
    pub fn new(name: &str, format: OutputFormat) -> Reporter {
        let bar = terminal_bar(
            format,
            100,
            "{spinner} {prefix} [{bar:30}] {pos:>3}% canary  {msg}",
            name,
        );
        Reporter {
            name: name.to_string(),
            format,
            bar,
        }
    }

    pub fn finish(&mut self, status: &Status, outcome: Outcome, settled: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let verdict = match outcome {
            Outcome::Promoted => "promoted",
            Outcome::RolledBack => "rolled back",
        };
        match self.format {
            OutputFormat::Json => outln!(
                "{}",
                serde_json::json!({
                    "rollout": self.name,
                    "outcome": outcome,
                    "phase": status.phase,
                    "canaryWeight": basis_points_to_percent(status.canary_weight),
                    "failedChecks": status.failed_checks,
                    "routersUpdated": settled,
                    "durationSeconds": (status.last_transition_ms.saturating_sub(status.started_ms)) as f64 / 1000.0,
                })
            ),
            OutputFormat::Text => {
                outln!(
                    "{}: {verdict} after {:.1}s ({})",
                    self.name,
                    (status.last_transition_ms.saturating_sub(status.started_ms)) as f64 / 1000.0,
                    status.message
                );
                if !settled {
                    outln!("warning: the routers did not take the final routes; check them with GET /routes");
                }
            }
        }
    }
}

impl Sink for Reporter {
    /// Never fails: what a terminal or pipe does with the output cannot stop a rollout (a closed
    /// pipe only ends the printing).
    fn record(&mut self, status: &Status, events: &[Event]) -> Result<(), String> {
        for event in events {
            match self.format {
                OutputFormat::Json => outln!(
                    "{}",
                    serde_json::json!({
                        "time": rfc3339(event.time_ms),
                        "rollout": self.name,
                        "level": event.level,
                        "phase": event.phase,
                        "canaryWeight": basis_points_to_percent(event.weight),
                        "failedChecks": status.failed_checks,
                        "message": event.message,
                        "metrics": metrics_json(&status.metrics),
                    })
                ),
                OutputFormat::Text => {
                    let mark = if event.level == EventLevel::Warning {
                        "!"
                    } else {
                        " "
                    };
                    let line = format!(
                        "{} {mark} {:<16} {:>5}%  {}",
                        &rfc3339(event.time_ms)[11..23],
                        event.phase.as_str(),
                        basis_points_to_percent(event.weight),
                        event.message
                    );
                    match &self.bar {
                        Some(bar) => bar.println(line),
                        None => outln!("{line}"),
                    }
                }
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(u64::from(status.canary_weight / 100));
            bar.set_message(format!(
                "{} ({} failed)",
                status.phase.as_str(),
                status.failed_checks
            ));
        }
        Ok(())
    }
}
