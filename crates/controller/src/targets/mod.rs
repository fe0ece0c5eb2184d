//! The targets seam: the versions of the service a rollout sends traffic to — how each is
//! started, found ready and stopped.
//!
//! Kinds: [`url`] (a version already serving at a URL: nothing to start or stop) and
//! [`command`] (a process `serve` starts on a free port and stops when its version leaves
//! service). The kind of a target is the first in [`KINDS`] that runs it.

pub mod command;
pub mod url;

use coalmine_spec::rollout::{HttpUrl, Rollout, Target};
use coalmine_spec::Dur;

use crate::{BoxFuture, Runner, Unrunnable};

/// Every kind of target, the first that runs a target wins. A new kind: a file here and a line.
pub const KINDS: &[&dyn TargetKind] = &[&url::Url, &command::Command];

/// Why a version could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no free port: {0}")]
    NoFreePort(std::io::Error),
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program:?} exited ({status}) before it was ready")]
    Exited {
        program: String,
        status: std::process::ExitStatus,
    },
    #[error("{url} was not ready within {timeout} ({last})")]
    NotReady {
        url: String,
        timeout: Dur,
        last: String,
    },
    #[error("{0}")]
    Client(#[from] reqwest::Error),
    #[error("no kind of target runs this one")]
    Unknown,
}

/// A kind of target.
pub trait TargetKind: Sync {
    /// How the kind is called in messages (`command`).
    fn name(&self) -> &'static str;
    /// Whether this kind runs `target`.
    fn runs(&self, target: &Target) -> bool;
    /// Whether a version of this kind stops serving once nothing keeps it (a process the
    /// runner started): only a runner that stays after the rollout (`serve`) can use it.
    fn needs_keeper(&self) -> bool;
    /// Starts a version (not yet ready: see [`Version::ready`]).
    fn start<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<Box<dyn Version>, TargetError>>;
}

/// A started version of the service.
pub trait Version: Send {
    /// Where its traffic goes.
    fn url(&self) -> &HttpUrl;
    /// Whether it already runs `target`: a version is kept across runs while its target is
    /// unchanged.
    fn runs(&self, target: &Target) -> bool;
    /// Waits until it serves.
    fn ready(&mut self) -> BoxFuture<'_, Result<(), TargetError>>;
    /// Stops it (dropping it stops it too).
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

pub fn kind_of(target: &Target) -> Result<&'static dyn TargetKind, TargetError> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.runs(target))
        .ok_or(TargetError::Unknown)
}

/// Starts a version and waits until it is ready.
pub async fn start(target: &Target) -> Result<Box<dyn Version>, TargetError> {
    let mut version = kind_of(target)?.start(target).await?;
    version.ready().await?;
    Ok(version)
}

/// Checks, without starting anything, that both versions have a target `runner` can run.
pub fn check(rollout: &Rollout, runner: Runner) -> Result<(), Unrunnable> {
    // A rollout stepping only a flag has one app serving both variants: no versions to start.
    if crate::traffic::flag::alone(rollout)
        && rollout.spec.stable.is_none()
        && rollout.spec.canary.is_none()
    {
        return Ok(());
    }
    for (field, target) in [
        ("stable", &rollout.spec.stable),
        ("canary", &rollout.spec.canary),
    ] {
        let unrunnable = |message: String| Unrunnable {
            field: field.to_string(),
            message,
        };
        let Some(target) = target else {
            return Err(unrunnable(match runner {
                Runner::Run => "the version's url is needed to run the rollout".into(),
                Runner::Serve => {
                    "give the version's url or command (only `coalmine simulate` runs without)"
                        .into()
                }
            }));
        };
        let kind = kind_of(target).map_err(|e| unrunnable(e.to_string()))?;
        if kind.needs_keeper() && runner == Runner::Run {
            return Err(unrunnable(format!(
                "a {} target needs `coalmine serve`, which keeps the process running after the rollout; give a url here",
                kind.name()
            )));
        }
    }
    Ok(())
}
