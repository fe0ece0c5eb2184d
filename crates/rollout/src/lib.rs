//! The rollout state machine: `(state, input, now) -> (state, actions)`.
//!
//! Architecture invariant: this crate never does IO and never reads the clock. Time comes in as
//! milliseconds with each input; webhooks, metric readings and route changes are requested as
//! [`Action`]s and answered as [`Input`]s. Production, `coalmine simulate` and the tests drive the
//! same code.
//!
//! Phases and their order are Flagger's (see `ARCHITECTURE.md` for the tick-by-tick table).

mod builtin;
pub mod dark_launch;
mod drive;
pub mod group;
mod machine;
mod plan;
pub mod sequential;
mod window;

pub use builtin::builtin_reading;
pub use dark_launch::{DarkLaunchPlan, DarkLaunchStage, DarkLaunchStatus};
pub use drive::{NotSaved, World};
pub use machine::{
    Action, Event, EventLevel, Gate, HookResult, Input, Machine, MetricStatus, Outcome, Phase,
    Question, Status, Traffic, TrafficFault,
};
pub use plan::{Check, Plan, Strategy};
pub use sequential::{Observation, SequentialEvidence, SequentialPlan, SequentialState};
pub use window::Window;
