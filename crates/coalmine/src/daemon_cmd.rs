//! `coalmine serve` and its clients: `apply`, `status`, `promote`, `abort`, `pause`, `resume`,
//! `history`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use coalmine_controller::daemon::{self, DaemonConfig, HostedRouter, RouterHost};
use coalmine_router::{RouterConfig, RouterHandle, RoutesDoc};

use crate::rollout_cmd::{load_inputs, spec_errors, OutputFormat};
use crate::BadInput;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the HTTP API the clients use
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9900")]
    pub api: SocketAddr,
    /// SQLite file holding every rollout's state and history (created if missing)
    #[arg(long, value_name = "FILE")]
    pub state: PathBuf,
    /// File holding the bearer token that mutating calls must present
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Serve the API and the dashboard over TLS with this certificate chain (PEM); with
    /// --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A web page's origin (https://shop.example) allowed to evaluate feature flags from a
    /// browser (OpenFeature's web SDKs, over CORS); repeat for more, `*` for any page
    #[arg(long = "ofrep-allow-origin", value_name = "ORIGIN", value_parser = origin)]
    pub ofrep_allow_origins: Vec<String>,
}

/// `*`, or a scheme, host and optional port with nothing after (what browsers send as Origin).
fn origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_string());
    }
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    let bare = url.origin().ascii_serialization();
    if !matches!(url.scheme(), "http" | "https") || bare != text.trim_end_matches('/') {
        return Err(format!(
            "{text:?} is not an origin: write the scheme, host and port alone, as {bare}"
        ));
    }
    Ok(bare)
}

/// A token from its file (`flag` names the file in errors): trimmed, at least 16 characters.
pub(crate) fn read_token_file(path: &std::path::Path, flag: &str) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("{flag} {}: {e}", path.display())))?;
    let token = token.trim().to_string();
    if token.len() < 16 {
        return Err(BadInput(format!(
            "{flag} {}: the token must have at least 16 characters",
            path.display()
        ))
        .into());
    }
    Ok(token)
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let token = read_token_file(&args.token_file, "--token-file")?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            coalmine_router::tls_acceptor(&coalmine_router::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })
            .map_err(|e| BadInput(format!("--tls-cert/--tls-key: {e}")))?,
        ),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(daemon::serve(
        DaemonConfig {
            api: args.api,
            state: args.state.clone(),
            token,
            router_host: Some(Arc::new(InProcessRouters)),
            tls,
            ofrep_origins: daemon::AllowedOrigins(args.ofrep_allow_origins.clone()),
        },
        |addr| {
            outln!("coalmine serve: api={addr} state={}", args.state.display());
        },
        crate::termination(),
    ));
    match served {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A state file that is not Coalmine's is the user's to sort out.
        Err(
            e @ daemon::DaemonError::Store(
                coalmine_controller::state::sqlite::StoreError::NotOurs { .. },
            ),
        ) => Err(BadInput(format!("--state {e}")).into()),
        Err(e) => Err(e.into()),
    }
}

/// `serve` hosts the routers rollouts ask for (`spec.router`) in its own process.
struct InProcessRouters;

/// A router running inside `serve`.
struct InProcessRouter(RouterHandle);

impl RouterHost for InProcessRouters {
    fn start(
        &self,
        listen: SocketAddr,
        admin: SocketAddr,
        routes: RoutesDoc,
    ) -> Result<Box<dyn HostedRouter>, Box<dyn std::error::Error + Send + Sync>> {
        let handle = coalmine_router::start(RouterConfig::embedded(listen, admin, routes))?;
        Ok(Box::new(InProcessRouter(handle)))
    }
}

impl HostedRouter for InProcessRouter {
    fn admin(&self) -> SocketAddr {
        self.0.admin
    }

    fn shut_down(self: Box<Self>) {
        self.0.shutdown();
    }
}

/// How a client finds the daemon and proves it may change things.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The daemon's API
    #[arg(long, env = "COALMINE_API", default_value = "http://127.0.0.1:9900")]
    pub api: String,
    /// File holding the daemon's token (or set COALMINE_TOKEN)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https:// API, besides the system's (a daemon
    /// with its own --tls-cert)
    #[arg(long, value_name = "FILE", env = "COALMINE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

struct Client {
    api: String,
    token: Option<String>,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Client {
    fn new(args: &ApiArgs) -> anyhow::Result<Client> {
        let token = match &args.token_file {
            Some(path) => Some(read_token_file(path, "--token-file")?),
            None => std::env::var("COALMINE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(path) = &args.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| BadInput(format!("--ca-file {}: {e}", path.display())))?;
            let ca = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| BadInput(format!("--ca-file {}: {e}", path.display())))?;
            http = http.add_root_certificate(ca);
        }
        Ok(Client {
            api: args.api.trim_end_matches('/').to_string(),
            token,
            http: http.build()?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// Sends a call; a refusal (4xx) is the user's to fix and exits 2.
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.api);
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.token {
            // Who, for the rollout's history: the token is shared, the user and host are not.
            let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
            let actor = format!(
                "{user} on {} (coalmine CLI)",
                coalmine_controller::host_name()
            );
            req = req
                .bearer_auth(token)
                .header(coalmine_controller::daemon::ACTOR_HEADER, actor);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.rt.block_on(async {
            let resp = req.send().await.map_err(|e| {
                anyhow::anyhow!(
                    "{}: {}",
                    self.api,
                    coalmine_controller::http::reqwest_reason(&e)
                )
            })?;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                return Ok(body);
            }
            let message = body["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string();
            if status.is_client_error() {
                Err(BadInput(format!("{message} ({status})")).into())
            } else {
                Err(anyhow::anyhow!("{message} ({status})"))
            }
        })
    }
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Files with one or more Rollouts and the MetricTemplates their metrics refer to;
    /// directories (their *.yaml and *.yml files) and - for stdin work too
    #[arg(required = true)]
    pub files: Vec<String>,
    /// Start a new run even when the document is unchanged (retry a failed release)
    #[arg(long)]
    pub restart: bool,
    /// Where a Flagger Canary's traffic goes (or a Placement document in the files)
    #[command(flatten)]
    pub placement: crate::rollout_cmd::PlacementArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    // Checked here first for the quickest, clearest errors (all of them); the daemon checks
    // again. The daemon gets the texts read here: stdin cannot be read twice.
    let (mut inputs, set) = load_inputs(&args.files)?;
    let errors = set.runnable_errors();
    if !errors.is_empty() {
        return Err(spec_errors(errors));
    }
    // A Canary placed by the flags goes to the daemon with a Placement document saying so.
    let flags = args.placement.placement()?;
    // Every Canary must be placed: by its Placement document or by the flags.
    set.placed_rollouts(flags.as_ref())
        .map_err(|e| BadInput(e.to_string()))?;
    if let Some(placement) = flags {
        let unplaced = set.rollouts().find(|d| {
            matches!(d.doc, coalmine_spec::documents::Document::Canary(_))
                && !set.documents.iter().any(|p| {
                    matches!(p.doc, coalmine_spec::documents::Document::Placement(_))
                        && p.doc.name() == d.doc.name()
                })
        });
        let Some(canary) = unplaced else {
            return Err(BadInput(
                "--router/--stable/--canary place a Flagger Canary, and every Canary in the files has a Placement (or there is none)".into(),
            )
            .into());
        };
        let meta = canary.doc.metadata();
        let doc = json!({
            "apiVersion": coalmine_spec::rollout::API_VERSION,
            "kind": "Placement",
            "metadata": {"name": meta.name, "namespace": meta.namespace},
            "spec": placement,
        });
        inputs.push(("<command line>".to_string(), serde_saphyr::to_string(&doc)?));
    }
    let files: Vec<Value> = inputs
        .into_iter()
        .map(|(file, text)| json!({"file": file, "text": text}))
        .collect();
    let client = Client::new(&args.api)?;
    let result = client.call(
        reqwest::Method::POST,
        "/api/v1/apply",
        Some(json!({"files": files, "restart": args.restart})),
    )?;
    match args.api.output {
        OutputFormat::Json => outln!("{result}"),
        OutputFormat::Text => {
            for a in result["applied"].as_array().into_iter().flatten() {
                outln!(
                    "{} {}",
                    a["name"].as_str().unwrap_or(""),
                    a["action"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One rollout; all of them without it
    pub name: Option<String>,
    /// Follow the rollout until it ends: exit 0 promoted, 1 rolled back
    #[arg(long, requires = "name")]
    pub watch: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

fn status_line(s: &Value) -> String {
    format!(
        "{:<24} {:<16} {:>6}%  failed {:<3} {}",
        s["name"].as_str().unwrap_or(""),
        s["phase"].as_str().unwrap_or(""),
        s["canaryWeight"],
        s["failedChecks"],
        s["message"].as_str().unwrap_or("")
    )
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    let Some(name) = &args.name else {
        let all = client.call(reqwest::Method::GET, "/api/v1/rollouts", None)?;
        match args.api.output {
            OutputFormat::Json => outln!("{all}"),
            OutputFormat::Text => {
                for s in all.as_array().into_iter().flatten() {
                    outln!("{}", status_line(s));
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let path = format!("/api/v1/rollouts/{name}");
    // What was printed last: a line is printed again only when it changes.
    let mut last = None;
    loop {
        let s = client.call(reqwest::Method::GET, &path, None)?;
        let shown = match args.api.output {
            OutputFormat::Json => s.to_string(),
            OutputFormat::Text => status_line(&s),
        };
        if last.as_ref() != Some(&shown) {
            outln!("{shown}");
        }
        let phase = s["phase"].as_str().unwrap_or("").to_string();
        // Nobody reads any more: stop quietly.
        if !args.watch || crate::output::stdout_closed() {
            return Ok(ExitCode::SUCCESS);
        }
        match phase.as_str() {
            "Succeeded" => return Ok(ExitCode::SUCCESS),
            "Failed" => return Ok(ExitCode::from(1)),
            _ => {}
        }
        last = Some(shown);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[derive(Args, Debug)]
pub struct CommandArgs {
    pub name: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl CommandArgs {
    /// `method` on the daemon's `/api/v1/rollouts/NAME` followed by `then`; the answer.
    fn call(&self, method: reqwest::Method, then: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!("/api/v1/rollouts/{}{then}", self.name);
        Client::new(&self.api)?.call(method, &path, None)
    }

    /// Shows the daemon's answer to an action: as it is, or as `NAME: done`.
    fn report(&self, answer: &serde_json::Value, done: &str) -> ExitCode {
        match self.api.output {
            OutputFormat::Json => outln!("{answer}"),
            OutputFormat::Text => outln!("{}: {done}", self.name),
        }
        ExitCode::SUCCESS
    }
}

/// Forgets a finished rollout on the daemon.
pub fn delete(args: CommandArgs) -> anyhow::Result<ExitCode> {
    let answer = args.call(reqwest::Method::DELETE, "")?;
    Ok(args.report(
        &answer,
        "deleted (its routers stay as it left them, and nothing keeps them now)",
    ))
}

/// `promote`, `abort`, `pause`, `resume`.
pub fn command(verb: &str, args: CommandArgs) -> anyhow::Result<ExitCode> {
    let answer = args.call(reqwest::Method::POST, &format!("/{verb}"))?;
    Ok(args.report(&answer, &format!("{verb} sent")))
}

pub fn history(args: CommandArgs) -> anyhow::Result<ExitCode> {
    print_events(
        &args.call(reqwest::Method::GET, "/history")?,
        &args.api.output,
    );
    Ok(ExitCode::SUCCESS)
}

/// Events as `history` shows them: a line each (a JSON object each with `--output json`).
fn print_events(events: &Value, output: &OutputFormat) {
    for e in events.as_array().into_iter().flatten() {
        if crate::output::stdout_closed() {
            break;
        }
        match output {
            OutputFormat::Json => outln!("{e}"),
            OutputFormat::Text => outln!(
                "{}  {:<16} run {:<3} {:<16} {:>6}%  {}",
                e["time"].as_str().unwrap_or(""),
                e["rollout"].as_str().unwrap_or(""),
                e["run"],
                e["phase"].as_str().unwrap_or(""),
                e["canaryWeight"],
                e["message"].as_str().unwrap_or("")
            ),
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum GroupCommand {
    /// Show groups, or one group and each member; `--watch` follows it and exits 0 when every
    /// member promoted, 1 when the group rolled back
    Status(StatusArgs),
    /// Every member's events, one timeline
    History(CommandArgs),
    /// Forget a group that has ended (its members stay: `coalmine delete` each)
    Delete(CommandArgs),
}

fn group_lines(g: &Value) -> Vec<String> {
    let mut lines = vec![format!(
        "group {} ({}): {}{}",
        g["name"].as_str().unwrap_or(""),
        g["policy"].as_str().unwrap_or(""),
        g["phase"].as_str().unwrap_or(""),
        g["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    )];
    for m in g["members"].as_array().into_iter().flatten() {
        lines.push(format!("  {}", status_line(m)));
    }
    lines
}

pub fn group(command: GroupCommand) -> anyhow::Result<ExitCode> {
    match command {
        GroupCommand::Delete(args) => {
            let path = format!("/api/v1/groups/{}", args.name);
            let answer = Client::new(&args.api)?.call(reqwest::Method::DELETE, &path, None)?;
            Ok(args.report(
                &answer,
                "deleted (its members stay: `coalmine delete` each)",
            ))
        }
        GroupCommand::History(args) => {
            let path = format!("/api/v1/groups/{}/history", args.name);
            let events = Client::new(&args.api)?.call(reqwest::Method::GET, &path, None)?;
            print_events(&events, &args.api.output);
            Ok(ExitCode::SUCCESS)
        }
        GroupCommand::Status(args) => {
            let client = Client::new(&args.api)?;
            let Some(name) = &args.name else {
                let all = client.call(reqwest::Method::GET, "/api/v1/groups", None)?;
                match args.api.output {
                    OutputFormat::Json => outln!("{all}"),
                    OutputFormat::Text => {
                        for line in all.as_array().into_iter().flatten().flat_map(group_lines) {
                            outln!("{line}");
                        }
                    }
                }
                return Ok(ExitCode::SUCCESS);
            };
            let path = format!("/api/v1/groups/{name}");
            let mut last = None;
            loop {
                let g = client.call(reqwest::Method::GET, &path, None)?;
                let shown = match args.api.output {
                    OutputFormat::Json => g.to_string(),
                    OutputFormat::Text => group_lines(&g).join("\n"),
                };
                if last.as_ref() != Some(&shown) {
                    outln!("{shown}");
                }
                if !args.watch || crate::output::stdout_closed() {
                    return Ok(ExitCode::SUCCESS);
                }
                match g["phase"].as_str() {
                    Some("Succeeded") => return Ok(ExitCode::SUCCESS),
                    Some("RolledBack") => return Ok(ExitCode::from(1)),
                    _ => {}
                }
                last = Some(shown);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
