//! Flagger's webhooks: `POST {name, namespace, phase, checksum, metadata}`; a status up to 202
//! is a pass, anything else (or no answer within `timeout`) is not.

use std::time::Duration;

use serde_json::{json, Value};

use coalmine_rollout::{Event, HookResult, Phase};
use coalmine_spec::rollout::{HookKind, Webhook};

use crate::http::reqwest_reason;

/// Flagger's default webhook timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Hooks {
    hooks: Vec<Webhook>,
    client: reqwest::Client,
    name: String,
    namespace: String,
    checksum: String,
}

impl Hooks {
    pub fn new(hooks: Vec<Webhook>, name: &str, namespace: &str, checksum: &str) -> Hooks {
        Hooks {
            hooks,
            client: reqwest::Client::new(),
            name: name.to_string(),
            namespace: namespace.to_string(),
            checksum: checksum.to_string(),
        }
    }

    /// Calls every hook of `kind` in order, as Flagger does.
    pub async fn call(&self, kind: HookKind, phase: Phase) -> Vec<HookResult> {
        let mut results = Vec::new();
        for hook in self.hooks.iter().filter(|h| h.kind == kind) {
            let body = json!({
                "name": self.name,
                "namespace": self.namespace,
                "phase": phase.as_str(),
                "checksum": self.checksum,
                "metadata": hook.metadata,
            });
            results.push(self.post(hook, &body).await);
        }
        results
    }

    /// Sends an event to every `event` hook; answers are logged, never acted on.
    pub async fn send_event(&self, event: &Event) {
        for hook in self.hooks.iter().filter(|h| h.kind == HookKind::Event) {
            let mut metadata = serde_json::Map::new();
            for (k, v) in &hook.metadata {
                metadata.insert(k.clone(), Value::String(v.clone()));
            }
            metadata.insert("eventMessage".into(), json!(event.message));
            metadata.insert("eventType".into(), json!(format!("{:?}", event.level)));
            let body = json!({
                "name": self.name,
                "namespace": self.namespace,
                "phase": event.phase.as_str(),
                "checksum": self.checksum,
                "metadata": metadata,
            });
            let result = self.post(hook, &body).await;
            if !result.ok {
                tracing::warn!(hook = %hook.name, "event webhook: {}", result.message);
            }
        }
    }

    async fn post(&self, hook: &Webhook, body: &Value) -> HookResult {
        let timeout = hook.timeout.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUT);
        let attempts = hook.retries.unwrap_or(0) + 1;
        let mut message = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let sent = self
                .client
                .post(hook.url.as_str())
                .timeout(timeout)
                .json(body)
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().as_u16() <= 202 => {
                    return HookResult {
                        name: hook.name.clone(),
                        ok: true,
                        message: resp.status().as_u16().to_string(),
                    }
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.text().await.unwrap_or_default();
                    let text: String = text.trim().chars().take(200).collect();
                    message = if text.is_empty() {
                        format!("answered {status}")
                    } else {
                        format!("answered {status}: {text}")
                    };
                }
                Err(e) => message = reqwest_reason(&e),
            }
        }
        HookResult {
            name: hook.name.clone(),
            ok: false,
            message,
        }
    }
}
