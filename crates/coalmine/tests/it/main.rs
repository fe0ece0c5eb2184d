//! Every integration test of the `coalmine` binary in one test binary: one link instead of
//! one per file, and one run. `cargo test -p coalmine --test it faults::` runs one module.

mod common;

mod check;
mod cli;
mod daemon_faults;
mod dark_launch;
mod dashboard;
mod deploy;
mod faults;
mod flags;
mod gateway;
mod geography;
mod groups;
mod http1;
mod loadtester;
mod malformed;
mod mesh_metrics;
mod notifications;
mod operator;
mod operator_groups;
mod operator_providers;
mod operator_routers;
mod prometheus;
mod rollout;
mod router;
mod serve;
mod services;
