//! The `coalmine` binary: parse the command line, call the library, print. Exit codes:
//! 0 success (promoted), 1 failure (rolled back, or a runtime error), 2 bad input.

#[macro_use]
mod output;

mod daemon_cmd;
mod demo;
mod loadtester;
mod operator_cmd;
mod proxy_cmd;
mod rollout_cmd;
mod simulate_cmd;
mod upstream;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Automated canary releases: its own L7 router, its own controller, one binary.
#[derive(Parser)]
#[command(name = "coalmine", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router: split traffic between stable and canary, record both, take route changes
    Proxy(Box<proxy_cmd::ProxyArgs>),
    /// Run a demo: two built-in payment-service versions behind the router, real traffic
    Demo(demo::DemoArgs),
    /// Validate Rollout, Flagger Canary and MetricTemplate documents
    Check(rollout_cmd::CheckArgs),
    /// Turn a Flagger Canary into a native Rollout, given where its traffic goes
    Convert(rollout_cmd::ConvertArgs),
    /// Drive one rollout in the foreground: exit 0 promoted, 1 rolled back, 2 invalid input
    Run(rollout_cmd::RunArgs),
    /// Run a rollout's state machine and judges over synthetic traffic on a virtual clock, many times (a RolloutGroup: once, as one release)
    Simulate(simulate_cmd::SimulateArgs),
    /// Run the daemon: many rollouts, state in SQLite, an API for the commands below
    Serve(daemon_cmd::ServeArgs),
    /// Start or change rollouts on the daemon (a changed document restarts the analysis)
    Apply(daemon_cmd::ApplyArgs),
    /// Show rollouts; `status NAME --watch` follows one and exits 0 promoted, 1 rolled back
    Status(daemon_cmd::StatusArgs),
    /// Skip the rest of the analysis and promote now
    Promote(daemon_cmd::CommandArgs),
    /// Roll back now
    Abort(daemon_cmd::CommandArgs),
    /// Stop advancing (ticks are skipped) until `resume`
    Pause(daemon_cmd::CommandArgs),
    /// Continue a paused rollout
    Resume(daemon_cmd::CommandArgs),
    /// Every event of every run of a rollout
    History(daemon_cmd::CommandArgs),
    /// Rollout groups on the daemon: `group status [NAME]`, `group history NAME`
    #[command(subcommand)]
    Group(daemon_cmd::GroupCommand),
    /// Forget a finished rollout (state and history); its routers stay as it left them
    Delete(daemon_cmd::CommandArgs),
    /// Run a small HTTP service with an injectable error rate and latency (demos, tests)
    Upstream(upstream::UpstreamArgs),
    /// Run Flagger's load-test webhook: `hey` commands from Canary webhooks, run natively
    Loadtester(loadtester::LoadtesterArgs),
    /// Run the Kubernetes operator: lead through a Lease, run the cluster's Rollouts
    Operator(operator_cmd::OperatorArgs),
    /// Print Coalmine's Kubernetes custom resource definitions (`coalmine crd | kubectl apply -f -`)
    Crd(operator_cmd::CrdArgs),
}

/// Input the user must fix: reported as such and exits 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and `run` talk to people through their own output; logs are for servers.
    let default_level = match cli.command {
        Command::Proxy(_)
        | Command::Upstream(_)
        | Command::Serve(_)
        | Command::Loadtester(_)
        | Command::Operator(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        // Colours only for a person at a terminal, not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COALMINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Proxy(args) => proxy_cmd::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args),
        Command::Upstream(args) => upstream::run(args).map(|()| ExitCode::SUCCESS),
        Command::Loadtester(args) => loadtester::run(args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => rollout_cmd::check(args),
        Command::Crd(args) => operator_cmd::crd(args),
        Command::Operator(args) => operator_cmd::operator(args),
        Command::Convert(args) => rollout_cmd::convert(args),
        Command::Run(args) => rollout_cmd::run(args),
        Command::Simulate(args) => simulate_cmd::run(args),
        Command::Serve(args) => daemon_cmd::serve(args),
        Command::Apply(args) => daemon_cmd::apply(args),
        Command::Status(args) => daemon_cmd::status(args),
        Command::Promote(args) => daemon_cmd::command("promote", args),
        Command::Abort(args) => daemon_cmd::command("abort", args),
        Command::Pause(args) => daemon_cmd::command("pause", args),
        Command::Resume(args) => daemon_cmd::command("resume", args),
        Command::History(args) => daemon_cmd::history(args),
        Command::Group(command) => daemon_cmd::group(command),
        Command::Delete(args) => daemon_cmd::delete(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            errln!("coalmine: {e:#}");
            if e.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Resolves on SIGTERM, SIGINT or SIGHUP: the terminal of a foreground command that steers
/// traffic (`run`) closing must roll its canary back, not kill it where it stands.
pub async fn interruption() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    tokio::select! {
        () = termination() => {}
        _ = hangup.recv() => {}
    }
}

/// Blocks the calling thread until SIGTERM or SIGINT.
pub fn wait_for_termination() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(termination());
}
