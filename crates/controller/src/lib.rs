//! Coalmine's runtime: the edge around the pure core. It owns the clock, the sockets and the
//! state on disk; the rollout state machine and the judges only see values it hands them.
//!
//! The seams, each a trait in its own module with today's implementations beside it:
//! [`state`] (where steps are kept) and [`targets`] (the versions of the service).

pub mod daemon;
pub mod driver;
pub mod lock;
pub mod providers;
pub mod report;
pub mod routers;
pub mod state;
pub mod targets;
pub mod telemetry;
pub mod time;
pub mod webhooks;
pub mod window;

use std::future::Future;
use std::pin::Pin;

pub use driver::{checksum, now_ms, Driver};
pub use state::{StateError, StateStore};

/// What a seam's methods return: a future that can move between threads and be held behind
/// `dyn` (the seams are chosen at run time).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What runs a rollout, which decides what its document may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// `coalmine run`: one rollout in the foreground; nothing is kept after it ends.
    Run,
    /// `coalmine serve`: keeps the processes and routers it starts, and every rollout's routers
    /// after the rollout.
    Serve,
}

/// Why a rollout cannot run as written: the field and what it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct Unrunnable {
    pub field: String,
    pub message: String,
}
