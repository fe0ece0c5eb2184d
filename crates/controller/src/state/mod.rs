//! The state store seam: where a rollout's steps are kept, so that a restarted controller
//! resumes where the last one stopped.
//!
//! A step (the machine's new status and the events it produced) is saved before any of it is
//! carried out; a step that cannot be saved is not taken (the driver holds and tries again).
//! Implementations: [`sqlite`] (`serve`'s state file) and `run`'s terminal (in the binary: it
//! prints each step and keeps nothing, so a `run` does not resume). A store is chosen by what
//! runs the rollout, not by its document, so a new one is a file here used by its runner.

pub mod sqlite;

use coalmine_rollout::{Event, Status};

use crate::BoxFuture;

/// Why a step could not be saved, or the saved state not read.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StateError(Box<dyn std::error::Error + Send + Sync>);

impl StateError {
    pub fn new(cause: impl std::error::Error + Send + Sync + 'static) -> StateError {
        StateError(Box::new(cause))
    }
}

/// Where one run of one rollout keeps its steps.
pub trait StateStore: Send {
    /// Persists a step before any of it is carried out: the machine's status after it, and the
    /// events it produced (also steps with no change of status, such as a kept router put
    /// right). An error means the step was not saved.
    fn save<'a>(
        &'a mut self,
        status: &'a Status,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StateError>>;

    /// The status to resume from: the last step saved, or None when nothing was (a new
    /// rollout).
    fn load(&self) -> BoxFuture<'_, Result<Option<Status>, StateError>>;
}
