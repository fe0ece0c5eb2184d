//! A `coalmine serve` process with its state in a scratch directory, and its CLI clients.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Proc, TempDir, BIN};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct Daemon {
    pub proc: Proc,
    pub api: String,
}

/// A fresh directory for one test, holding the daemon's token file; removed when dropped.
pub fn scratch(test: &str) -> TempDir {
    let dir = TempDir::new(&format!("serve-{test}"));
    dir.write("token", TOKEN);
    dir
}

/// The arguments of `coalmine serve` on an ephemeral port with its state in `state` and the
/// token file of `dir`.
pub fn serve_args(state: &Path, dir: &Path) -> Vec<String> {
    let token = dir.join("token");
    ["serve", "--api", "127.0.0.1:0", "--state"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            state.to_string_lossy().into_owned(),
            "--token-file".into(),
            token.to_string_lossy().into_owned(),
        ])
        .collect()
}

/// `coalmine serve` with its state and token in `dir`, as a command to start.
pub fn serve_command(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.args(serve_args(&dir.join("state.db"), dir));
    command
}

/// A started daemon: the process and its API address.
pub fn daemon_of(proc: Proc) -> Daemon {
    let api = format!("http://{}", proc.addr("api"));
    Daemon { proc, api }
}

/// `coalmine serve` on an ephemeral port with its state and token in `dir`.
pub fn serve(dir: &Path) -> Daemon {
    daemon_of(Proc::spawn_command(serve_command(dir), &["serve"]))
}

/// Runs a client command against the daemon; returns (exit code, stdout + stderr).
pub fn cli(daemon: &Daemon, args: &[&str], token: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("COALMINE_API", &daemon.api)
        .env_remove("COALMINE_TOKEN");
    if let Some(t) = token {
        cmd.env("COALMINE_TOKEN", t);
    }
    super::code_and_printed(&cmd.output().unwrap())
}

pub fn status(daemon: &Daemon, name: &str) -> serde_json::Value {
    let (code, out) = cli(daemon, &["status", name, "--output", "json"], None);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

pub fn wait_for(
    daemon: &Daemon,
    name: &str,
    within: Duration,
    what: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_until(within, || status(daemon, name), what)
}

/// Reads with `read` every 100 ms until `what` holds of the answer, or panics after `within`
/// showing the last one.
pub fn wait_until(
    within: Duration,
    read: impl Fn() -> serde_json::Value,
    what: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = read();
        if what(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting; last status {s:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
