//! Targets that are processes: `serve` starts them on a free port, waits until they answer their
//! readiness path, and stops them when their version leaves service.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use coalmine_spec::rollout::{HttpUrl, Readiness, Target};

use super::{TargetError, TargetKind, Version};
use crate::BoxFuture;

pub struct Command;

impl TargetKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn runs(&self, target: &Target) -> bool {
        matches!(target, Target::Command { .. })
    }

    fn needs_keeper(&self) -> bool {
        true
    }

    fn start<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<Box<dyn Version>, TargetError>> {
        Box::pin(async move {
            let Target::Command {
                command,
                readiness,
                env,
            } = target
            else {
                return Err(TargetError::Unknown);
            };
            let process = ManagedProcess::spawn(command, env, readiness)?;
            Ok(Box::new(process) as Box<dyn Version>)
        })
    }
}

/// A running version of the service. Dropping it kills the process.
pub struct ManagedProcess {
    command: Vec<String>,
    readiness: Readiness,
    url: HttpUrl,
    child: tokio::process::Child,
}

impl ManagedProcess {
    /// Starts `command` with `{port}` replaced by a free port (also in `$PORT`).
    fn spawn(
        command: &[String],
        env: &BTreeMap<String, String>,
        readiness: &Readiness,
    ) -> Result<ManagedProcess, TargetError> {
        let port = free_port().map_err(TargetError::NoFreePort)?;
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
        let child = cmd.spawn().map_err(|source| TargetError::Spawn {
            program: args[0].clone(),
            source,
        })?;
        Ok(ManagedProcess {
            command: command.to_vec(),
            readiness: readiness.clone(),
            url: HttpUrl::parse(&format!("http://127.0.0.1:{port}"))
                .expect("a loopback address with a port is an HTTP URL"),
            child,
        })
    }

    /// Waits until `GET readiness.path` answers 2xx, up to `readiness.timeout`.
    async fn wait_ready(&mut self) -> Result<(), TargetError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("{}{}", self.url.as_str(), self.readiness.path);
        let deadline = Instant::now() + self.readiness.timeout.0;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(TargetError::Exited {
                    program: self.command[0].clone(),
                    status,
                });
            }
            match client.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => last = format!("answered {}", resp.status()),
                Err(e) => last = crate::http::reqwest_reason(&e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TargetError::NotReady {
            url,
            timeout: self.readiness.timeout,
            last,
        })
    }
}

impl Version for ManagedProcess {
    fn url(&self) -> &HttpUrl {
        &self.url
    }

    /// The same command: a changed environment or readiness alone does not restart it.
    fn runs(&self, target: &Target) -> bool {
        matches!(target, Target::Command { command, .. } if *command == self.command)
    }

    fn ready(&mut self) -> BoxFuture<'_, Result<(), TargetError>> {
        Box::pin(self.wait_ready())
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        // Killed on drop.
        drop(self);
        Box::pin(std::future::ready(()))
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
