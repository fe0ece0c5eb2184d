//! `coalmine check`, `convert` and `run`: documents in, a rollout driven in the foreground.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use tokio::sync::mpsc;

use coalmine_controller::report::metrics_json;
use coalmine_controller::time::rfc3339;
use coalmine_controller::traffic::owner;
use coalmine_controller::{BoxFuture, Driver, Runner, Seams, StateError, StateStore};
use coalmine_rollout::{Event, EventLevel, Input, Outcome, Status};
use coalmine_spec::documents::{self, Document, DocumentSet, Note};
use coalmine_spec::flagger::{HostPort, Placement};
use coalmine_spec::rollout::{HttpUrl, Rollout, Target};
use coalmine_spec::SpecError;

use crate::BadInput;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// The name standard input is reported under in `file:line:column`.
pub const STDIN_NAME: &str = "<stdin>";

/// Reads the documents the command line names: files, directories (their `*.yaml` and `*.yml`
/// files, sorted by name; subdirectories are not entered, since a manifest tree's
/// subdirectories are usually overlays or other environments of the same objects, which would
/// clash), and `-` for standard input. A file named twice is read once. Every path that cannot
/// be read is reported, then the command fails.
pub fn read_inputs(paths: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut read_file = |path: &Path, shown: String, files: &mut Vec<(String, String)>| {
        let identity = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !seen.insert(identity) {
            return Ok(());
        }
        match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => {
                    files.push((shown, text));
                    Ok(())
                }
                Err(_) => Err(format!("{shown}: cannot read: not UTF-8 text")),
            },
            Err(e) => Err(format!("{shown}: cannot read: {e}")),
        }
    };
    let mut stdin_read = false;
    for path in paths {
        if path == "-" {
            if stdin_read {
                errors.push("-: standard input can be read only once".to_string());
                continue;
            }
            stdin_read = true;
            let mut text = String::new();
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                Ok(_) => files.push((STDIN_NAME.to_string(), text)),
                Err(e) => errors.push(format!("{STDIN_NAME}: cannot read: {e}")),
            }
            continue;
        }
        let input = Path::new(path);
        if !input.is_dir() {
            if let Err(e) = read_file(input, path.clone(), &mut files) {
                errors.push(e);
            }
            continue;
        }
        let entries = match std::fs::read_dir(input) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(format!("{path}: cannot read the directory: {e}"));
                continue;
            }
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|ext| ext == "yaml" || ext == "yml")
            })
            .collect();
        found.sort();
        if found.is_empty() {
            errors.push(format!(
                "{path}: no *.yaml or *.yml files in this directory"
            ));
        }
        for file in found {
            if let Err(e) = read_file(&file, file.display().to_string(), &mut files) {
                errors.push(e);
            }
        }
    }
    match errors.len() {
        0 => Ok(files),
        1 => Err(BadInput(errors.remove(0)).into()),
        n => {
            for e in &errors {
                errln!("coalmine: {e}");
            }
            Err(BadInput(format!("{n} inputs cannot be read")).into())
        }
    }
}

/// Reads the documents the command line names (see [`read_inputs`]), prints the notes and
/// warnings on them, and fails with every mistake as `file:line:column: field: message`.
pub fn load(paths: &[String]) -> anyhow::Result<DocumentSet> {
    load_inputs(paths).map(|(_, set)| set)
}

/// [`load`], also returning the text of every file read (what `apply` sends to the daemon).
pub fn load_inputs(paths: &[String]) -> anyhow::Result<(Vec<(String, String)>, DocumentSet)> {
    let files = read_inputs(paths)?;
    let (set, errors) = documents::read(&files);
    if !errors.is_empty() {
        return Err(spec_errors(errors));
    }
    for note in &set.notes {
        errln!("note: {note}");
    }
    for w in &set.warnings {
        errln!("warning: {w}");
    }
    Ok((files, set))
}

/// Document mistakes as the command's failure (exit 2): one is the error itself; several are
/// printed a line each, and the error counts them.
pub fn spec_errors(errors: Vec<SpecError>) -> anyhow::Error {
    if errors.len() == 1 {
        return BadInput(errors[0].to_string()).into();
    }
    for e in &errors {
        errln!("coalmine: {e}");
    }
    let files: std::collections::BTreeSet<&str> = errors.iter().map(|e| e.file.as_str()).collect();
    BadInput(format!(
        "{} errors in {}",
        errors.len(),
        match files.len() {
            1 => "1 file".to_string(),
            n => format!("{n} files"),
        }
    ))
    .into()
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Rollout, Canary and MetricTemplate documents: files, directories (their *.yaml and
    /// *.yml files, not subdirectories) or - for stdin. Other Kubernetes kinds get a note.
    #[arg(required = true)]
    pub files: Vec<String>,
    /// `json`: one object with `valid`, `documents`, `notes`, `warnings` and `errors`
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Every document of every input checked, all mistakes reported (exit 2 if there is one):
/// what Coalmine reads is listed as ok, other tools' documents as notes saying what Coalmine
/// does instead.
pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let files = read_inputs(&args.files)?;
    let (set, errors) = documents::read(&files);
    let order = |file: &str| files.iter().position(|f| f.0 == file);
    let mut docs: Vec<&_> = set.documents.iter().collect();
    docs.sort_by_key(|d| (order(&d.file), d.line));
    let mut notes: Vec<&Note> = set.notes.iter().collect();
    notes.sort_by_key(|n| (order(&n.file), n.line));
    match args.output {
        OutputFormat::Json => {
            let docs: Vec<serde_json::Value> = docs
                .iter()
                .map(|d| {
                    serde_json::json!({"file": d.file, "line": d.line, "kind": d.doc.kind(), "name": d.doc.name()})
                })
                .collect();
            outln!(
                "{}",
                serde_json::json!({
                    "valid": errors.is_empty(),
                    "documents": docs,
                    "notes": notes,
                    "warnings": set.warnings,
                    "errors": errors,
                })
            );
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        OutputFormat::Text => {
            // Documents and notes in the order of the files, so the report reads like them.
            let mut lines: Vec<((Option<usize>, u64), String)> = docs
                .iter()
                .map(|d| {
                    (
                        (order(&d.file), d.line),
                        format!(
                            "ok    {}:{}  {} {}",
                            d.file,
                            d.line,
                            d.doc.kind(),
                            d.doc.name()
                        ),
                    )
                })
                .collect();
            lines.extend(
                notes
                    .iter()
                    .map(|n| ((order(&n.file), n.line), format!("note: {n}"))),
            );
            lines.sort_by_key(|(at, _)| *at);
            for (_, line) in lines {
                outln!("{line}");
            }
            for w in &set.warnings {
                errln!("warning: {w}");
            }
            if errors.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(spec_errors(errors))
            }
        }
    }
}

/// Where a Flagger Canary's traffic goes, which Kubernetes would otherwise tell.
#[derive(Args, Debug, Default)]
pub struct PlacementArgs {
    /// Admin address of a Coalmine router carrying the service (repeatable)
    #[arg(long = "router")]
    pub routers: Vec<String>,
    /// The routers' service the Canary drives (its /routes/SERVICE) [default: default]
    #[arg(long, value_name = "SERVICE")]
    pub router_service: Option<String>,
    /// URL of the version serving now
    #[arg(long)]
    pub stable: Option<String>,
    /// URL of the new version
    #[arg(long)]
    pub canary: Option<String>,
    /// HOST=ADDR:PORT: a host name in the Canary's webhook or metric URLs and where it is
    /// reached here (what cluster DNS would say), e.g. flagger-loadtester=127.0.0.1:8089;
    /// HOST may carry a port to map only that one (repeatable)
    #[arg(long, value_name = "HOST=ADDR:PORT")]
    pub resolve: Vec<String>,
}

impl PlacementArgs {
    /// The placement the flags give, if any flag is given.
    pub fn placement(&self) -> anyhow::Result<Option<Placement>> {
        if self.routers.is_empty()
            && self.router_service.is_none()
            && self.stable.is_none()
            && self.canary.is_none()
            && self.resolve.is_empty()
        {
            return Ok(None);
        }
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
        let mut hosts = std::collections::BTreeMap::new();
        for mapping in &self.resolve {
            let (host, to) = mapping.split_once('=').ok_or_else(|| {
                BadInput(format!(
                    "--resolve {mapping:?}: write HOST=ADDR:PORT, e.g. flagger-loadtester=127.0.0.1:8089"
                ))
            })?;
            let to = HostPort::try_from(to.to_string())
                .map_err(|e| BadInput(format!("--resolve {mapping:?}: {e}")))?;
            hosts.insert(host.to_string(), to);
        }
        if let Some(service) = &self.router_service {
            coalmine_spec::check_service_name(service)
                .map_err(|e| BadInput(format!("--router-service: {e}")))?;
        }
        Ok(Some(Placement {
            routers,
            router: None,
            router_service: self.router_service.clone(),
            stable: Some(Target::Url(url("stable", &self.stable)?)),
            canary: Some(Target::Url(url("canary", &self.canary)?)),
            hosts,
            preview: Vec::new(),
        }))
    }
}

/// The one Rollout or Canary a command acts on: the only one in the files, or the one `--name`
/// picks.
pub fn pick<'a>(set: &'a DocumentSet, name: Option<&str>) -> anyhow::Result<&'a Document> {
    let candidates: Vec<_> = set
        .rollouts()
        .filter(|d| name.is_none_or(|want| want == d.doc.name()))
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
        several => {
            let places: Vec<String> = several
                .iter()
                .map(|d| format!("{} {} at {}:{}", d.doc.kind(), d.doc.name(), d.file, d.line))
                .collect();
            let advice = match name {
                // Same name in several namespaces: only the files can tell them apart.
                Some(_) => "pass only the files of the one to act on",
                None => "pick one with --name",
            };
            return Err(BadInput(format!(
                "the files hold several rollouts ({}); {advice}",
                places.join(", ")
            ))
            .into());
        }
    };
    Ok(&chosen.doc)
}

/// The one rollout `convert` and `run` act on: the files, `--name` among them, and where a
/// Canary's traffic goes. Each command gives `files` its own help.
#[derive(Args, Debug)]
pub struct RolloutChoice {
    #[arg(required = true)]
    pub files: Vec<String>,
    /// Which rollout, when the file has several
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

impl RolloutChoice {
    /// The rollout to act on: a Rollout as written, a Canary placed by its Placement document
    /// or the flags.
    fn pick(&self, set: &DocumentSet) -> anyhow::Result<Rollout> {
        let chosen = pick(set, self.name.as_deref())?.name().to_string();
        let flags = self.placement.placement()?;
        let placed = set
            .placed_rollouts(flags.as_ref())
            .map_err(|e| BadInput(e.to_string()))?;
        Ok(placed
            .into_iter()
            .find(|r| r.metadata.name == chosen)
            .expect("every rollout of the files is placed"))
    }
}

#[derive(Args, Debug)]
#[command(mut_arg("files", |a| a.help(
    "A file with a Flagger Canary, and files with the MetricTemplates it uses (their queries \
     are written into the Rollout); directories (their *.yaml and *.yml files) and - for \
     stdin work too"
)))]
pub struct ConvertArgs {
    #[command(flatten)]
    pub rollout: RolloutChoice,
}

pub fn convert(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let set = load(&args.rollout.files)?;
    let rollout = args.rollout.pick(&set)?;
    crate::output::text(&serde_saphyr::to_string(&rollout)?);
    Ok(ExitCode::SUCCESS)
}

/// How long `run` waits at its end for its last notifications to be posted.
const NOTIFICATIONS_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Args, Debug)]
#[command(mut_arg("files", |a| a.help(
    "A file with the Rollout (or a Flagger Canary plus --router/--stable/--canary), and files \
     with the MetricTemplates its metrics refer to; directories (their *.yaml and *.yml \
     files) and - for stdin work too"
)))]
pub struct RunArgs {
    #[command(flatten)]
    pub rollout: RolloutChoice,
    /// `json`: one JSON object per event, then the final status
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let set = load(&args.rollout.files)?;
    let mut missing = set.missing_templates();
    missing.extend(set.unsendable_alerts());
    if !missing.is_empty() {
        return Err(spec_errors(missing));
    }
    let rollout = args.rollout.pick(&set)?;
    let controller = format!(
        "coalmine run, pid {} on {}",
        std::process::id(),
        coalmine_controller::host_name()
    );
    let owner = owner(&rollout.metadata.name, &controller);
    let mut driver = Seams::open(&rollout, Runner::Run, &owner)
        .and_then(|seams| Driver::new(&rollout, None, seams))
        .map_err(|e| BadInput(format!("{}: {e}", args.rollout.files[0])))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Before anything moves: the routers must be Coalmine routers no other rollout drives.
    rt.block_on(driver.claim())
        .map_err(|e| BadInput(format!("{}: {e}", rollout.metadata.name)))?;
    let mut reporter = Reporter::new(&rollout.metadata.name, args.output);
    let outcome = rt.block_on(async {
        let (control, mut inputs) = mpsc::channel(16);
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
        let outcome = driver.run(&mut inputs, &mut reporter).await;
        // Nothing drives the routers once `run` exits: they keep the final routes and are
        // free for the next rollout. Not if they did not take those routes: then they stay
        // this rollout's, and another is refused until someone looks.
        if driver.settled() {
            if let Err(e) = driver.release().await {
                tracing::warn!("the routers carry the final routes but were not freed: {e}");
            }
        }
        outcome
    });
    reporter.finish(driver.status(), outcome, driver.settled());
    // The last notification (promoted, rolled back) is posted before the process goes, unless
    // its service is slow or down: the exit waits only so long for it.
    rt.block_on(driver.flush_notifications(NOTIFICATIONS_FLUSH));
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
                    "canaryWeight": status.canary_weight.percent(),
                    "failedChecks": status.failed_checks,
                    "routersUpdated": settled,
                    "durationSeconds": (status.last_transition_ms.saturating_sub(status.started_ms)) as f64 / 1000.0,
                    "darkLaunch": status.dark_launch.as_ref().map(|d| serde_json::json!({
                        "stage": d.stage,
                        "evidence": d.evidence(),
                    })),
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

/// `run`'s state store is the terminal: it prints every step and keeps nothing, so a run does
/// not resume.
impl StateStore for Reporter {
    fn save<'a>(
        &'a mut self,
        status: &'a Status,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StateError>> {
        self.print(status, events);
        Box::pin(std::future::ready(Ok(())))
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<Status>, StateError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

impl Reporter {
    /// Never fails: what a terminal or pipe does with the output cannot stop a rollout (a closed
    /// pipe only ends the printing).
    pub fn print(&mut self, status: &Status, events: &[Event]) {
        for event in events {
            match self.format {
                OutputFormat::Json => outln!(
                    "{}",
                    serde_json::json!({
                        "time": rfc3339(event.time_ms),
                        "rollout": self.name,
                        "level": event.level,
                        "phase": event.phase,
                        "canaryWeight": event.weight.percent(),
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
                        event.weight.percent(),
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
            bar.set_position(u64::from(status.canary_weight.basis_points() / 100));
            bar.set_message(format!(
                "{} ({} failed)",
                status.phase.as_str(),
                status.failed_checks
            ));
        }
    }
}
