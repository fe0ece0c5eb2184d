//! The one loop that drives a machine: hand it an input, save the step, make the traffic agree,
//! answer its questions, and go on until it needs nothing more from outside. The driver, the
//! simulator and the tick-by-tick tests all drive the machine through it; only their [`World`]s
//! differ.

use std::collections::VecDeque;
use std::future::{ready, Future};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use coalmine_spec::rollout::HookKind;

use crate::machine::{refused, Action, Event, Input, Machine, Phase, Question, Status};
use crate::TrafficFault;

/// What a machine's steps meet outside it: the clock, the store, the traffic, the answers to
/// its questions. The driver's world is the network, and its answers take time; the
/// simulator's and the tests' are values, ready at once (see [`Machine::drive_now`]).
pub trait World {
    /// Why a step could not be saved.
    type Unsaved: Send;

    /// Whether [`World::save`] can fail. A world whose saves cannot fail spares the loop a copy
    /// of the status per step (the simulator takes millions of steps).
    const SAVE_MAY_FAIL: bool = true;

    /// The time of the next step.
    fn now(&self) -> u64;

    /// Saves a step — the machine's new status and the events it produced — before anything of
    /// it is carried out. A step that cannot be saved never happened: the machine goes back to
    /// the status before it, and the loop stops.
    fn save(
        &mut self,
        _status: &Status,
        _events: &[Event],
    ) -> impl Future<Output = Result<(), Self::Unsaved>> + Send {
        ready(Ok(()))
    }

    /// Makes the traffic agree with the machine after a saved step. A refusal rolls the rollout
    /// back; an unreachable backend is the next tick's to report.
    fn route(
        &mut self,
        _machine: &Machine,
    ) -> impl Future<Output = Result<(), TrafficFault>> + Send {
        ready(Ok(()))
    }

    /// The answer to a question: [`Input::Hooks`] or [`Input::Analysis`].
    fn answer(
        &mut self,
        machine: &Machine,
        question: Question,
    ) -> impl Future<Output = Input> + Send;

    /// Calls the webhooks of `kind` whose answers do not matter (post-rollout).
    fn notify(&mut self, _kind: HookKind, _phase: Phase) -> impl Future<Output = ()> + Send {
        ready(())
    }

    /// Tells of an event (the event webhooks, a test's log).
    fn event(&mut self, _event: &Event) -> impl Future<Output = ()> + Send {
        ready(())
    }
}

/// A step that could not be saved: the input it came from (for the world to hold or queue)
/// and why.
#[derive(Debug)]
pub struct NotSaved<E> {
    pub input: Input,
    pub error: E,
}

impl Machine {
    /// Hands the machine `input` and everything it leads to — answers to the questions it
    /// asks, a rollback when the traffic is refused — until it needs nothing more from outside.
    /// Every step that changes the status is saved before anything of it is carried out (one
    /// that changes nothing is not saved again); at the first step that cannot
    /// be saved the machine is put back as it was before that step, and the loop stops.
    pub async fn drive<W: World>(
        &mut self,
        input: Input,
        world: &mut W,
    ) -> Result<(), NotSaved<W::Unsaved>> {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let before = W::SAVE_MAY_FAIL.then(|| self.status().clone());
            let actions = self.handle(world.now(), input.clone());
            let events: Vec<Event> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Event(e) => Some(e.clone()),
                    _ => None,
                })
                .collect();
            // A step that changed nothing (an empty sample, a repeated command) has nothing to
            // record: a store on an API server or a disk is not written once a second for it.
            let unchanged = events.is_empty() && before.as_ref() == Some(self.status());
            if !unchanged {
                if let Err(error) = world.save(self.status(), &events).await {
                    let before = before.expect("a world whose saves cannot fail did not save");
                    self.undo(before);
                    return Err(NotSaved { input, error });
                }
            }
            let routed = world.route(self).await;
            // Once the rollout has ended there is nothing left to roll back: a backend that
            // refuses its final traffic too is the caller's to report, not a reason to loop.
            if let (Err(TrafficFault::Refused(reason)), None) = (routed, self.outcome()) {
                inputs.push_back(Input::RollBack {
                    reason: refused(&reason),
                });
            }
            for action in actions {
                match action {
                    Action::Ask(question) => inputs.push_back(world.answer(self, question).await),
                    Action::Notify(kind) => world.notify(kind, self.status().phase).await,
                    Action::Event(event) => world.event(&event).await,
                    Action::Finished(_) => {}
                }
            }
        }
        Ok(())
    }

    /// [`Machine::drive`] for a world whose answers are values (the simulator, the tests):
    /// no runtime needed.
    pub fn drive_now<W: World>(
        &mut self,
        input: Input,
        world: &mut W,
    ) -> Result<(), NotSaved<W::Unsaved>> {
        let mut driving = pin!(self.drive(input, world));
        match driving
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(result) => result,
            Poll::Pending => {
                panic!("drive_now is for worlds whose answers are ready at once; drive awaits the others")
            }
        }
    }
}
