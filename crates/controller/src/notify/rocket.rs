//! Rocket.Chat's incoming webhooks take Slack's payload, as Flagger sends it.

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec};

use super::{slack, Message, Post, Registration};

pub const REGISTERED: Registration = Registration {
    kind: AlertKind::Rocket,
    request,
};

fn request(message: &Message, provider: &AlertProviderSpec, address: &str) -> Post {
    Post {
        url: address.to_string(),
        body: slack::payload(message, provider),
    }
}
