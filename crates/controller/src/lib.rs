//! Coalmine's runtime: the edge around the pure core. It owns the clock, the sockets and the
//! state on disk; the rollout state machine and the judges only see values it hands them.

pub mod daemon;
pub mod driver;
pub mod lock;
pub mod processes;
pub mod providers;
pub mod report;
pub mod routers;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod webhooks;
pub mod window;

pub use driver::{checksum, now_ms, Driver, DriverError, Sink};
