//! Discord: a webhook's Slack-compatible endpoint (`{webhook}/slack`) with Slack's payload, as
//! Flagger posts it.

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec};

use super::{slack, Message, Post, Registration};

pub const REGISTERED: Registration = Registration {
    kind: AlertKind::Discord,
    request,
};

fn request(message: &Message, provider: &AlertProviderSpec, address: &str) -> Post {
    Post {
        url: slack_endpoint(address),
        body: slack::payload(message, provider),
    }
}

/// The webhook's `/slack` endpoint (kept when the address already names it).
fn slack_endpoint(address: &str) -> String {
    let (path, query) = match address.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (address, None),
    };
    let path = path.trim_end_matches('/');
    let mut url = if path.ends_with("/slack") {
        path.to_string()
    } else {
        format!("{path}/slack")
    };
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discord_is_posted_at_the_webhooks_slack_endpoint() {
        assert_eq!(
            slack_endpoint("https://discord.com/api/webhooks/1/T"),
            "https://discord.com/api/webhooks/1/T/slack"
        );
        assert_eq!(
            slack_endpoint("https://discord.com/api/webhooks/1/T/slack?wait=true"),
            "https://discord.com/api/webhooks/1/T/slack?wait=true"
        );
    }
}
