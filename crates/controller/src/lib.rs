//! Coalmine's runtime: the edge around the pure core. It owns the clock, the sockets and the
//! state on disk; the rollout state machine and the judges only see values it hands them.
//!
//! The driver holds four seams, each a trait in its own module with its implementations
//! beside it: [`traffic`] (what carries the traffic: Coalmine's routers), [`observations`]
//! (both versions' counts: the routers' `/stats`), [`state`] (where steps are kept: SQLite for
//! `serve`, the terminal for `run`) and [`targets`] (the versions of the service: URLs and
//! commands).

/// Declares a seam's implementations, a module each, and lists each module's `REGISTERED`
/// value in `$list`, in the order they are tried: a new implementation is its file and its name
/// in this one line.
macro_rules! implementations {
    ($list:ident: $ty:ty = [$($module:ident),* $(,)?]) => {
        $(pub mod $module;)*
        /// Every implementation of this seam, in the order they are tried.
        pub const $list: &[$ty] = &[$($module::REGISTERED),*];
    };
}
pub(crate) use implementations;

pub mod daemon;
pub mod dashboard;
pub mod driver;
pub mod flags;
pub mod http;
pub mod lock;
pub mod notify;
pub mod observations;
pub mod providers;
pub mod report;
pub mod state;
pub mod targets;
pub mod telemetry;
pub mod time;
pub mod traffic;
pub mod webhooks;

use std::future::Future;
use std::pin::Pin;

use coalmine_spec::rollout::Rollout;

pub use driver::{checksum, now_ms, Driver, Seams};
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

/// Everything a rollout needs to run under `runner`, checked without starting or reaching
/// anything: a traffic backend that takes it, targets `runner` can run, and what the driver
/// itself needs. `run` and `serve`'s `apply` both ask this before anything starts; opening the
/// seams asks the same of each.
pub fn check(rollout: &Rollout, runner: Runner) -> Result<(), Unrunnable> {
    traffic::check(rollout, runner)?;
    targets::check(rollout, runner)?;
    Driver::check(rollout)
}

/// This machine's name, for telling controllers apart.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "unknown host".to_string(),
    }
}
