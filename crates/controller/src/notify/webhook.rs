//! Coalmine's generic webhook: one JSON object with the rollout, where it stands and what
//! happened, for anything that takes a POST (an incident tool, a bot, a log).

use serde_json::{json, Value};

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec};

use super::{Message, Post, Registration};

pub const REGISTERED: Registration = Registration {
    kind: AlertKind::Webhook,
    request,
};

fn request(message: &Message, _: &AlertProviderSpec, address: &str) -> Post {
    Post {
        url: address.to_string(),
        body: payload(message),
    }
}

fn payload(message: &Message) -> Value {
    let fields: serde_json::Map<String, Value> = message
        .fields
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    json!({
        "name": message.name,
        "namespace": message.namespace,
        "phase": message.phase.as_str(),
        "canaryWeight": message.weight.percent(),
        "severity": message.severity.as_str(),
        "message": message.headline,
        "reason": message.reason,
        "fields": fields,
    })
}
