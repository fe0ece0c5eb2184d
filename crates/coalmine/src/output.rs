//! Standard output and error that never panic. `println!` panics when its reader has gone
//! (`coalmine run … | head -4`): for `run` that would abandon a canary with nobody watching.
//! Here a closed stream is noted and further output dropped; commands go on (a rollout runs to
//! its end) or stop quietly (a listing nobody reads).

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout; false once stdout is closed.
pub fn line(args: fmt::Arguments<'_>) -> bool {
    if STDOUT_CLOSED.load(Relaxed) {
        return false;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    let written = written.and_then(|()| out.flush());
    if written.is_err() {
        STDOUT_CLOSED.store(true, Relaxed);
    }
    written.is_ok()
}

/// Writes text to stdout as it is (no newline added); false once stdout is closed.
pub fn text(s: &str) -> bool {
    if STDOUT_CLOSED.load(Relaxed) {
        return false;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_all(s.as_bytes()).and_then(|()| out.flush());
    if written.is_err() {
        STDOUT_CLOSED.store(true, Relaxed);
    }
    written.is_ok()
}

/// Whether stdout's reader has gone.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Relaxed)
}

/// Writes one line to stderr, ignoring a closed stderr.
pub fn error_line(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// `println!` that never panics: see [`line`]; [`stdout_closed`] tells whether anyone still
/// reads.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = $crate::output::line(format_args!($($arg)*));
    }};
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::error_line(format_args!($($arg)*))
    };
}
