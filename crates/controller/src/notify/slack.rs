//! Slack's incoming webhooks: a message with one attachment (colour by severity, the rollout
//! as author, the text, the fields), as Flagger posts it. Rocket.Chat and Discord's Slack
//! endpoint take the same payload.

use serde_json::{json, Value};

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec};

use super::{slack_color, Message, Post, Registration};

pub const REGISTERED: Registration = Registration {
    kind: AlertKind::Slack,
    request,
};

fn request(message: &Message, provider: &AlertProviderSpec, address: &str) -> Post {
    Post {
        url: address.to_string(),
        body: payload(message, provider),
    }
}

/// Slack's message: `text` (the notification's fallback and preview) and `attachments`.
pub fn payload(message: &Message, provider: &AlertProviderSpec) -> Value {
    let fields: Vec<Value> = message
        .fields
        .iter()
        .map(|(title, value)| json!({"title": title, "value": value, "short": false}))
        .collect();
    let mut body = json!({
        "text": format!("{}: {}", message.subject(), message.headline),
        "icon_emoji": ":rocket:",
        "attachments": [{
            "color": slack_color(message.severity),
            "author_name": message.subject(),
            "text": message.text(),
            "mrkdwn_in": ["text"],
            "fields": fields,
        }],
    });
    if let Some(channel) = &provider.channel {
        body["channel"] = json!(channel);
    }
    if let Some(username) = &provider.username {
        body["username"] = json!(username);
    }
    body
}
