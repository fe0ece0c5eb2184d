//! `coalmine crd`: Coalmine's custom resource definitions, as `kubectl apply -f -` takes them.

use std::process::ExitCode;

use clap::Args;
use coalmine_operator::crd::TrafficProvider;

use crate::rollout_cmd::OutputFormat;

#[derive(Args)]
pub struct CrdArgs {
    /// `text`: a YAML stream; `json`: one `v1` `List`
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn crd(args: CrdArgs) -> anyhow::Result<ExitCode> {
    let text = match args.output {
        OutputFormat::Text => coalmine_operator::crd::crds_yaml(),
        OutputFormat::Json => {
            let list = serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": coalmine_operator::crd::crds(),
            });
            format!("{}\n", serde_json::to_string_pretty(&list)?)
        }
    };
    crate::output::text(&text);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct OperatorArgs {
    /// The kubeconfig to use (default: as kubectl: $KUBECONFIG, ~/.kube/config, or the pod's
    /// service account inside a cluster)
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Watch one namespace (default: all)
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// This replica's name in the Lease and in Events (default: $POD_NAME, else host and pid)
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where the leader Lease lives
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Where `/healthz`, `/readyz`, `/metrics` and the dashboard (`/`) are served
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9092")]
    pub listen: std::net::SocketAddr,
    /// File holding the token that signs people in to the dashboard's actions (promote, abort,
    /// pause, resume); without one the dashboard only shows
    #[arg(long, value_name = "FILE", env = "COALMINE_DASHBOARD_TOKEN_FILE")]
    pub dashboard_token_file: Option<std::path::PathBuf>,
    /// The leader Lease's name (replicas with the same one elect one leader)
    #[arg(long, default_value = "coalmine-operator")]
    pub lease_name: String,
    /// The provider of Flagger Canaries that name none (as Flagger's -mesh-provider):
    /// `kubernetes` splits by replicas, `coalmine` drives Coalmine's routers in the cluster,
    /// `istio`, `gatewayapi:v1` (or `gatewayapi:v1beta1`) and `nginx` write Flagger's
    /// VirtualService, HTTPRoute or canary Ingress
    #[arg(long, default_value = "kubernetes", value_parser = provider)]
    pub provider: TrafficProvider,
    /// The Prometheus that scrapes the mesh or ingress (as Flagger's -metrics-server): under
    /// providers istio, gatewayapi and nginx the versions' counts (for the built-in checks and
    /// the sequential judges) come from its series; a Canary's spec.metricsServer wins
    #[arg(long, value_name = "URL", default_value = "http://prometheus:9090")]
    pub metrics_server: String,
}

fn provider(name: &str) -> Result<TrafficProvider, String> {
    TrafficProvider::from_name(name).ok_or_else(|| {
        format!("{name:?}: one of kubernetes, coalmine, istio, gatewayapi:v1, gatewayapi:v1beta1, nginx")
    })
}

/// A client as kubectl finds its cluster: `kubeconfig` when given, else `$KUBECONFIG`,
/// `~/.kube/config` or the pod's service account.
pub(crate) async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| crate::BadInput(format!("--kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| crate::BadInput(format!("--kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

pub fn operator(args: OperatorArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = kube_client(args.kubeconfig.as_deref()).await?;
        let identity = args.identity.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| crate::BadInput(format!("--listen {}: {e}", args.listen)))?;
        let listen = listener.local_addr()?;
        let gate = match &args.dashboard_token_file {
            Some(path) => coalmine_controller::dashboard::Gate::new(
                crate::daemon_cmd::read_token_file(path, "--dashboard-token-file")?,
            ),
            None => coalmine_operator::dashboard::read_only_gate(),
        };
        let dashboard = coalmine_operator::dashboard::Dashboard::start(
            client.clone(),
            args.namespace.as_deref(),
            gate,
        );
        let health = std::sync::Arc::new(coalmine_operator::health::Health::default());
        tokio::spawn(coalmine_operator::health::serve(
            listener,
            health.clone(),
            dashboard.routes(),
        ));
        crate::outln!(
            "coalmine operator: listen={listen} identity={identity} lease={}/{}",
            args.lease_namespace,
            args.lease_name
        );
        coalmine_operator::run::run(
            client,
            coalmine_operator::run::Settings {
                namespace: args.namespace,
                identity,
                lease_namespace: args.lease_namespace,
                lease_name: args.lease_name,
                timings: Default::default(),
                health,
                default_provider: args.provider,
                metrics_server: args.metrics_server,
            },
        )
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}
