//! A `coalmine serve` process with its state in a scratch directory, and its CLI clients.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Proc, BIN};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct Daemon {
    pub proc: Proc,
    pub api: String,
}

/// A fresh directory for one test, holding the daemon's token file.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("coalmine-serve-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    dir
}

/// `coalmine serve` on an ephemeral port with its state and token in `dir`.
pub fn serve(dir: &Path) -> Daemon {
    let state = dir.join("state.db");
    let token = dir.join("token");
    let proc = Proc::spawn(&[
        "serve",
        "--api",
        "127.0.0.1:0",
        "--state",
        state.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let api = format!("http://{}", proc.addr("api"));
    Daemon { proc, api }
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
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
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
    let deadline = Instant::now() + within;
    loop {
        let s = status(daemon, name);
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
