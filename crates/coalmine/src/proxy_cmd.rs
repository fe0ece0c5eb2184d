//! `coalmine proxy`: flags and the YAML config file with the same fields; flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use coalmine_router::geo::Geo;
use coalmine_router::table::{Affinity, HeaderName, DEFAULT_SERVICE};
use coalmine_router::{
    MatchRule, ProxyOptions, RouterConfig, RoutesDoc, StickyKey, TlsFiles, UpstreamUrl, Weight,
};
use coalmine_spec::{parse_duration, parse_yaml, Dur};

use crate::BadInput;

#[derive(Args, Debug, Default)]
pub struct ProxyArgs {
    /// Address for user traffic [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address for the admin API: /routes, /metrics, /stats, /healthz [default: 127.0.0.1:9901]
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// The stable version's base URL, e.g. http://127.0.0.1:9001
    #[arg(long, value_name = "URL", value_parser = UpstreamUrl::parse)]
    pub stable: Option<UpstreamUrl>,
    /// The canary's base URL; without it every request goes to stable
    #[arg(long, value_name = "URL", value_parser = UpstreamUrl::parse)]
    pub canary: Option<UpstreamUrl>,
    /// Percentage of unmatched traffic sent to the canary, 0–100 with up to two decimals
    #[arg(long, value_name = "PCT", value_parser = parse_weight)]
    pub canary_weight: Option<Weight>,
    /// Send matching requests to the canary whatever the weight (repeatable; any match wins):
    /// NAME=VALUE (header), NAME~REGEX (header, whole value), cookie:NAME=VALUE, query:NAME=VALUE,
    /// geo:country=DE, geo:region~US-(CA|WA) (the client's location: --geoip-db or a CDN header)
    #[arg(long = "match", value_name = "RULE", value_parser = MatchRule::parse_flag)]
    pub matches: Vec<MatchRule>,
    /// Send matching requests to the canary whenever there is one, even at weight 0 (a
    /// blue-green preview for load tests); same syntax as --match
    #[arg(long = "preview", value_name = "RULE", value_parser = MatchRule::parse_flag)]
    pub previews: Vec<MatchRule>,
    /// Hash this header's value to pick the version, so a user always gets the same one
    #[arg(long, value_name = "NAME", conflicts_with = "sticky_cookie")]
    pub sticky_header: Option<String>,
    /// Hash this cookie's value to pick the version
    #[arg(long, value_name = "NAME")]
    pub sticky_cookie: Option<String>,
    /// Pin users who got the canary to it with this cookie (Flagger's sessionAffinity)
    #[arg(long, value_name = "NAME")]
    pub affinity_cookie: Option<String>,
    /// Percentage of stable-bound requests also copied to the canary (responses discarded)
    #[arg(long, value_name = "PCT", value_parser = parse_weight)]
    pub mirror: Option<Weight>,
    /// Worker threads, each with its own event loop [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// YAML file with the same fields (camelCase: canaryWeight, stickyHeader, ...); flags override it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (HTTP/2 and HTTP/1.1 through ALPN)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// MaxMind-format database (GeoIP2/GeoLite2 Country or City, DB-IP lite, …) giving the
    /// client's country and region for geo: match rules
    #[arg(long, value_name = "FILE")]
    pub geoip_db: Option<PathBuf>,
    /// Proxies in front of this router whose X-Forwarded-For entries are trusted: the client is
    /// the address this many entries from the right (0: the connection's peer) [default: 0]
    #[arg(long, value_name = "N")]
    pub geo_trusted_hops: Option<u8>,
    /// Header a CDN sets with the client's country (cf-ipcountry, cloudfront-viewer-country);
    /// trusted over the database when present
    #[arg(long, value_name = "NAME")]
    pub geo_country_header: Option<String>,
    /// Header a CDN sets with the client's region (ISO 3166-2 US-CA, or CA beside the country)
    #[arg(long, value_name = "NAME")]
    pub geo_region_header: Option<String>,
    /// Upstream connect timeout [default: 2s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Time allowed for the upstream's response head [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub response_timeout: Option<Duration>,
    /// Time a client has to send a request head [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// How long a kept-alive client connection may wait for its next request [default: 75s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// How long SIGTERM waits for in-flight requests [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Be a Gateway API implementation: the route table comes from the cluster's
    /// GatewayClasses (controllerName --gateway-controller-name), their Gateways, HTTPRoutes,
    /// Services and EndpointSlices, and their status conditions are written; no --stable
    #[arg(long)]
    pub kubernetes: bool,
    /// With --kubernetes: the kubeconfig (default: as kubectl: $KUBECONFIG, ~/.kube/config,
    /// or the pod's service account)
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the controllerName of the GatewayClasses this router serves
    #[arg(long, value_name = "NAME", requires = "kubernetes", default_value = coalmine_operator::gateway::translate::CONTROLLER_NAME)]
    pub gateway_controller_name: String,
    /// With --kubernetes: the address clients reach the Gateways at (its Service's IP or
    /// host name), written to each Gateway's status.addresses
    #[arg(long, value_name = "ADDRESS", requires = "kubernetes")]
    pub gateway_address: Option<String>,
}

fn parse_weight(s: &str) -> Result<Weight, String> {
    let pct: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    Weight::from_percent(pct).map_err(String::from)
}

/// The config file. Every field is optional so a file may hold just the routes. The route
/// fields at the top (`stable`, `canary`, ...) are the default service's, as the flags are;
/// `services` lists more, each with its own selectors and routes.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProxyFile {
    #[serde(default, deserialize_with = "coalmine_router::table::services_list")]
    services: Vec<RoutesDoc>,
    name: Option<String>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    stable: Option<UpstreamUrl>,
    canary: Option<UpstreamUrl>,
    canary_weight: Option<Weight>,
    #[serde(default, rename = "match")]
    matches: Vec<MatchRule>,
    #[serde(default)]
    preview: Vec<MatchRule>,
    sticky_header: Option<String>,
    sticky_cookie: Option<String>,
    affinity_cookie: Option<String>,
    mirror: Option<Weight>,
    threads: Option<u16>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    connect_timeout: Option<Dur>,
    response_timeout: Option<Dur>,
    header_read_timeout: Option<Dur>,
    idle_timeout: Option<Dur>,
    drain_timeout: Option<Dur>,
    #[serde(default)]
    geo: GeoFile,
}

/// The config file's `geo` block: where clients are, for `geo:` match rules.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GeoFile {
    database: Option<PathBuf>,
    trusted_hops: Option<u8>,
    country_header: Option<String>,
    region_header: Option<String>,
}

fn sticky(header: Option<String>, cookie: Option<String>) -> Result<Option<StickyKey>, BadInput> {
    match (header, cookie) {
        (Some(h), None) => {
            let name = HeaderName::parse(&h)
                .map_err(|_| BadInput(format!("--sticky-header: {h:?} is not a header name")))?;
            Ok(Some(StickyKey::Header(name)))
        }
        (None, Some(c)) => Ok(Some(StickyKey::Cookie(c))),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(BadInput(
            "stickyHeader and stickyCookie cannot both be set".into(),
        )),
    }
}

/// The default service: the route flags over the file's top-level route fields; `None` when
/// neither gives a stable upstream (then every route flag is a mistake).
fn default_service(args: &ProxyArgs, file: &ProxyFile) -> Result<Option<RoutesDoc>, BadInput> {
    let Some(stable) = args.stable.clone().or(file.stable.clone()) else {
        let given = [
            (args.canary.is_some() || file.canary.is_some(), "canary"),
            (
                args.canary_weight.is_some() || file.canary_weight.is_some(),
                "canaryWeight",
            ),
            (
                !args.matches.is_empty() || !file.matches.is_empty(),
                "match",
            ),
            (
                !args.previews.is_empty() || !file.preview.is_empty(),
                "preview",
            ),
            (args.mirror.is_some() || file.mirror.is_some(), "mirror"),
            (
                args.affinity_cookie.is_some() || file.affinity_cookie.is_some(),
                "affinityCookie",
            ),
            (
                args.sticky_header.is_some()
                    || args.sticky_cookie.is_some()
                    || file.sticky_header.is_some()
                    || file.sticky_cookie.is_some(),
                "stickyHeader/stickyCookie",
            ),
        ];
        if let Some((_, field)) = given.iter().find(|(set, _)| *set) {
            return Err(BadInput(format!(
                "{field} sets the default service's routes, which needs --stable (or `stable` in the --config file); a service in `services` has its own"
            )));
        }
        return Ok(None);
    };
    let (sh, sc) = if args.sticky_header.is_some() || args.sticky_cookie.is_some() {
        (args.sticky_header.clone(), args.sticky_cookie.clone())
    } else {
        (file.sticky_header.clone(), file.sticky_cookie.clone())
    };
    let mut routes = RoutesDoc::stable_only(stable.into());
    if let Some(name) = &file.name {
        routes.name = name.clone();
    }
    routes.canary = args.canary.clone().or(file.canary.clone()).map(Into::into);
    routes.canary_weight = args
        .canary_weight
        .or(file.canary_weight)
        .unwrap_or(Weight::ZERO);
    routes.matches = if args.matches.is_empty() {
        file.matches.clone()
    } else {
        args.matches.clone()
    };
    routes.preview = if args.previews.is_empty() {
        file.preview.clone()
    } else {
        args.previews.clone()
    };
    routes.sticky = sticky(sh, sc)?;
    routes.affinity = args
        .affinity_cookie
        .clone()
        .or(file.affinity_cookie.clone())
        .map(|cookie_name| Affinity {
            cookie_name,
            max_age: 86_400,
            release: None,
        });
    routes.mirror = args.mirror.or(file.mirror).unwrap_or(Weight::ZERO);
    Ok(Some(routes))
}

/// Merges the file (if any) under the flags and checks what is required.
pub fn router_config(args: ProxyArgs) -> Result<RouterConfig, BadInput> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
            parse_yaml::<ProxyFile>(&path.display().to_string(), &text)
                .map_err(|e| BadInput(e.to_string()))?
        }
        None => ProxyFile::default(),
    };
    let routes = default_service(&args, &file)?
        .into_iter()
        .chain(file.services)
        .collect::<Vec<_>>();
    if args.kubernetes && !routes.is_empty() {
        return Err(BadInput(
            "--kubernetes takes its routes from the cluster's HTTPRoutes; drop --stable and the --config file's routes".into(),
        ));
    }
    if routes.is_empty() && !args.kubernetes {
        return Err(BadInput(
            "--stable is required (or `stable` or `services` in the --config file, or --kubernetes)".into(),
        ));
    }
    coalmine_router::table::check_services(&routes).map_err(|e| {
        BadInput(match &args.config {
            Some(path) => format!(
                "{}: {e} (the top-level routes are service {DEFAULT_SERVICE:?})",
                path.display()
            ),
            None => e.to_string(),
        })
    })?;
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
    ) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => return Err(BadInput("tlsCert and tlsKey go together".into())),
    };
    let geo = geography(
        GeoFile {
            database: args.geoip_db,
            trusted_hops: args.geo_trusted_hops,
            country_header: args.geo_country_header,
            region_header: args.geo_region_header,
        },
        file.geo,
    )?;
    for doc in &routes {
        if let Some(why) = geo.unserved(doc.matches.iter().chain(&doc.preview)) {
            return Err(BadInput(format!("service {}: {why}", doc.service)));
        }
    }
    let dur = |flag: Option<Duration>, file: Option<Dur>, default: u64| {
        flag.or(file.map(|d| d.0))
            .unwrap_or(Duration::from_secs(default))
    };
    Ok(RouterConfig {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:8080".parse().unwrap()),
        admin: args
            .admin
            .or(file.admin)
            .unwrap_or_else(|| "127.0.0.1:9901".parse().unwrap()),
        threads: usize::from(args.threads.or(file.threads).unwrap_or(1)),
        routes,
        tls,
        proxy: ProxyOptions {
            connect_timeout: dur(args.connect_timeout, file.connect_timeout, 2),
            response_timeout: dur(args.response_timeout, file.response_timeout, 30),
            geo: std::sync::Arc::new(geo),
            routes_written_by: args
                .kubernetes
                .then(|| "the cluster's Gateway API objects (coalmine proxy --kubernetes)".into()),
            ..ProxyOptions::default()
        },
        header_read_timeout: dur(args.header_read_timeout, file.header_read_timeout, 10),
        max_header_bytes: 64 * 1024,
        idle_timeout: dur(args.idle_timeout, file.idle_timeout, 75),
        drain_timeout: dur(args.drain_timeout, file.drain_timeout, 30),
    })
}

/// The geography sources: flags over the file's `geo` block, the database opened (a file that
/// is not a MaxMind DB is bad input, said now rather than as rules that never hold).
fn geography(flags: GeoFile, file: GeoFile) -> Result<Geo, BadInput> {
    let header = |flag: Option<String>, file: Option<String>, what: &str| {
        flag.or(file)
            .map(|name| {
                HeaderName::parse(&name)
                    .map(|n| n.as_str().to_string())
                    .map_err(|_| {
                        BadInput(format!(
                            "--geo-{what}-header: {name:?} is not a header name"
                        ))
                    })
            })
            .transpose()
    };
    let mut geo = Geo::default();
    geo.trusted_hops = flags.trusted_hops.or(file.trusted_hops).unwrap_or(0);
    geo.country_header = header(flags.country_header, file.country_header, "country")?;
    geo.region_header = header(flags.region_header, file.region_header, "region")?;
    if let Some(path) = flags.database.or(file.database) {
        geo = geo
            .with_database(&path)
            .map_err(|e| BadInput(format!("--geoip-db: {e}")))?;
    }
    Ok(geo)
}

/// Gateway API mode: a thread of its own watches the cluster and swaps the router's table. A
/// cluster that cannot be reached at start is bad input; later, the watches retry with backoff
/// and the last table keeps serving.
fn program_from_cluster(
    handle: &coalmine_router::RouterHandle,
    kubeconfig: Option<PathBuf>,
    settings: coalmine_operator::gateway::GatewaySettings,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = runtime.block_on(crate::operator_cmd::kube_client(kubeconfig.as_deref()))?;
    let shared = handle.shared.clone();
    let sink: coalmine_operator::gateway::TableSink = std::sync::Arc::new(move |docs| {
        shared
            .replace_routes(docs)
            .map(|table| table.generation)
            .map_err(|e| e.to_string())
    });
    std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(coalmine_operator::gateway::run(client, settings, sink)) {
                tracing::error!(error = %e, "Gateway API programming stopped; the last table keeps serving");
            }
        })?;
    Ok(())
}

/// Runs the router until SIGTERM or SIGINT, then drains and returns.
pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let gateway = args.kubernetes.then(|| {
        (
            args.kubeconfig.clone(),
            coalmine_operator::gateway::GatewaySettings {
                controller_name: args.gateway_controller_name.clone(),
                address: args.gateway_address.clone(),
            },
        )
    });
    let config = router_config(args)?;
    let threads = config.threads;
    let handle = coalmine_router::start(config)?;
    if let Some((kubeconfig, settings)) = gateway {
        program_from_cluster(&handle, kubeconfig, settings)?;
    }
    outln!(
        "coalmine proxy: listen={} admin={} threads={threads}",
        handle.listen,
        handle.admin
    );
    // Each service when they are few; a count when a table is large.
    let table = handle.table();
    if table.services.len() > 10 {
        tracing::info!(services = table.services.len(), "routing");
    }
    for s in table
        .services
        .iter()
        .take_while(|_| table.services.len() <= 10)
    {
        tracing::info!(
            service = s.doc.service,
            stable = %s.doc.stable,
            canary = s.doc.canary.as_ref().map(|c| c.to_string()).unwrap_or_default(),
            canary_weight = s.doc.canary_weight.percent(),
            "routing"
        );
    }
    crate::wait_for_termination();
    tracing::info!("draining");
    handle.shutdown();
    Ok(())
}
