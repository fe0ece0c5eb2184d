//! Kubernetes Events as `kubectl describe` lists them: one per message, a repeat of a message
//! counted on its own Event (a series). kube-runtime's `Recorder` keys a series by type, reason,
//! action and object, not by the note: every later message of a phase (each "Advance canary
//! weight N", a hold's new reason) would only count on the first one's Event, never shown.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Reporter};

/// How many notes keep their series; past that they are forgotten (a note seen again then
/// starts a new Event), so a run whose messages all differ holds no more than this.
const NOTES_KEPT: usize = 64;

/// Publishes Events, a series per note.
pub struct Recorder {
    client: kube::Client,
    reporter: Reporter,
    by_note: Mutex<HashMap<String, kube::runtime::events::Recorder>>,
}

impl Recorder {
    pub fn new(client: kube::Client, reporter: Reporter) -> Recorder {
        Recorder {
            client,
            reporter,
            by_note: Mutex::new(HashMap::new()),
        }
    }

    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let note = event.note.clone().unwrap_or_default();
        let recorder = {
            let mut by_note = self.by_note.lock().expect("recorders lock");
            if by_note.len() >= NOTES_KEPT && !by_note.contains_key(&note) {
                by_note.clear();
            }
            by_note
                .entry(note)
                .or_insert_with(|| {
                    kube::runtime::events::Recorder::new(self.client.clone(), self.reporter.clone())
                })
                .clone()
        };
        recorder.publish(event, regarding).await
    }
}
