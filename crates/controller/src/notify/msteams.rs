//! Microsoft Teams' incoming webhooks: a MessageCard (one section: the text as its title, the
//! rollout as subtitle, the fields as facts; red when it is an error), as Flagger posts it.

use serde_json::{json, Value};

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec, Severity};

use super::{Message, Post, Registration};

pub const REGISTERED: Registration = Registration {
    kind: AlertKind::MsTeams,
    request,
};

fn request(message: &Message, _: &AlertProviderSpec, address: &str) -> Post {
    Post {
        url: address.to_string(),
        body: payload(message),
    }
}

fn payload(message: &Message) -> Value {
    let facts: Vec<Value> = message
        .fields
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    json!({
        "@type": "MessageCard",
        "@context": "http://schema.org/extensions",
        "themeColor": match message.severity {
            Severity::Error => "FF0000",
            Severity::Warn => "FFA500",
            Severity::Info => "0076D7",
        },
        "summary": message.subject(),
        "sections": [{
            "activityTitle": message.text(),
            "activitySubtitle": message.subject(),
            "facts": facts,
        }],
    })
}
