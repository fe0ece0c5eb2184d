//! Google Chat's incoming webhooks: `text` and a card (header with the rollout; the message and
//! each field as a text paragraph), the card as Flagger posts it.

use serde_json::{json, Value};

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec};

use super::{Message, Post, Registration};

pub const REGISTERED: Registration = Registration {
    kind: AlertKind::GChat,
    request,
};

fn request(message: &Message, _: &AlertProviderSpec, address: &str) -> Post {
    Post {
        url: address.to_string(),
        body: payload(message),
    }
}

fn payload(message: &Message) -> Value {
    let mut sections = vec![json!({"widgets": [{"textParagraph": {"text": format!("<b>{}</b>", escape(&message.text()))}}]})];
    sections.extend(message.fields.iter().map(|(name, value)| {
        json!({"widgets": [{"textParagraph": {"text": format!("{}<br><b>{}</b>", escape(name), escape(value))}}]})
    }));
    json!({
        "text": format!("{}: {}", message.subject(), message.headline),
        "cards": [{
            "header": {"title": "Coalmine", "subtitle": message.subject()},
            "sections": sections,
        }],
    })
}

/// Card text is HTML: a reason quoting `<` or `&` shows as written.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
