//! Targets that are processes: `serve` starts them on a free port, waits until they answer their
//! readiness path, and stops them when their version leaves service.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use coalmine_spec::rollout::Readiness;

/// A running version of the service. Dropping it kills the process.
pub struct ManagedProcess {
    pub command: Vec<String>,
    pub url: String,
    child: tokio::process::Child,
}

impl ManagedProcess {
    /// Starts `command` with `{port}` replaced by a free port (also in `$PORT`) and waits until
    /// `GET readiness.path` answers 2xx, up to `readiness.timeout`.
    pub async fn start(
        command: &[String],
        env: &BTreeMap<String, String>,
        readiness: &Readiness,
    ) -> Result<ManagedProcess, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let args: Vec<String> = command
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let mut cmd = tokio::process::Command::new(&args[0]);
        cmd.args(&args[1..])
            .envs(env)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // The process must not outlive the daemon, even when the daemon is killed with -9: a
        // restarted daemon starts its own copies and would otherwise leak these.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", args[0]))?;
        let mut process = ManagedProcess {
            command: command.to_vec(),
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        process.wait_ready(readiness).await?;
        Ok(process)
    }

    async fn wait_ready(&mut self, readiness: &Readiness) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!("{}{}", self.url, readiness.path);
        let deadline = Instant::now() + readiness.timeout.0;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{:?} exited ({status}) before it was ready",
                    self.command[0]
                ));
            }
            match client.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => last = format!("answered {}", resp.status()),
                Err(e) => last = crate::routers::reqwest_reason(&e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "{url} was not ready within {} ({last})",
            readiness.timeout
        ))
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
