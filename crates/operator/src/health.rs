//! The operator's own HTTP endpoint (`--listen`): `/healthz` (the process serves),
//! `/readyz` (it has reached the API server: followers are ready too, so a rolling update or a
//! drain keeps a standby), `/metrics` (whether this replica leads, the runs it drives), and
//! the dashboard at `/` (`crate::dashboard`).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What the endpoint reports, set by the operator as it goes.
#[derive(Debug, Default)]
pub struct Health {
    pub api_reachable: AtomicBool,
    pub leading: AtomicBool,
    pub runs: AtomicI64,
}

impl Health {
    fn metrics(&self) -> String {
        let mut registry = Registry::default();
        let leader = Gauge::<i64>::default();
        leader.set(i64::from(self.leading.load(Relaxed)));
        registry.register(
            "coalmine_operator_leader",
            "1 while this replica holds the leader Lease",
            leader,
        );
        let runs = Gauge::<i64>::default();
        runs.set(self.runs.load(Relaxed));
        registry.register(
            "coalmine_operator_runs",
            "Rollout runs this replica drives now",
            runs,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

/// Serves until the process ends; `also` (the dashboard) beside the health routes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    also: axum::Router,
) -> std::io::Result<()> {
    let ready = health.clone();
    let metrics = health.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.api_reachable.load(Relaxed) {
                    (StatusCode::OK, "ok\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the API server has not answered yet\n",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    metrics.metrics(),
                )
            }),
        )
        .merge(also);
    axum::serve(listener, app).await
}
