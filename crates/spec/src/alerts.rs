//! Notification providers: Flagger's `AlertProvider` (flagger.app/v1beta1) and Coalmine's
//! (coalmine.dev/v1alpha1, which adds the generic `webhook` type and `addressFrom`), and the
//! severities a rollout's `analysis.alerts` filter on.
//!
//! A provider's address is a secret (whoever has a Slack webhook URL can post to the channel).
//! Off Kubernetes it is given by `addressFrom` — a file or an environment variable read when a
//! message is sent — so neither the document nor the state file holds it. An address written
//! inline (`address`, as Flagger allows) is used as written, and never shown: see
//! [`crate::redact::address`].

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rollout::Metadata;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlertProvider {
    #[serde(default, skip_serializing)]
    pub api_version: String,
    #[serde(default, skip_serializing)]
    pub kind: String,
    pub metadata: Metadata,
    pub spec: AlertProviderSpec,
}

/// `spec` of an AlertProvider: where and how a rollout's alerts are posted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlertProviderSpec {
    /// slack, msteams, discord, rocket, gchat, or (Coalmine) webhook.
    #[serde(rename = "type")]
    pub kind: AlertKind,
    /// The channel (Slack, Rocket.Chat, Discord); the webhook's own channel when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The name the messages are posted under (Slack, Rocket.Chat, Discord).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The webhook URL, written inline (Flagger). It is a secret: prefer `addressFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// An HTTP(S) proxy the messages go through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Flagger: a Kubernetes Secret with the key `address` (and `token`, `proxy`). Read by the
    /// operator; `coalmine run` and `serve` have no cluster and take `addressFrom` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Coalmine: where the address is read when a message is sent (`{file: PATH}` or
    /// `{env: NAME}`), so no document or state file holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_from: Option<AddressFrom>,
    /// Flagger's Slack `token` (sent as a bearer token, to `chat.postMessage` unless an address
    /// is given), from the secretRef Secret: held in memory only, never written or shown.
    #[serde(skip)]
    #[schemars(skip)]
    pub token: Option<String>,
}

/// Where Slack's API takes a message from a token (Flagger's default with a token and no address).
pub const SLACK_POST_MESSAGE_URL: &str = "https://slack.com/api/chat.postMessage";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub name: String,
}

/// Where an address is read: a file (its content, surrounding whitespace trimmed) or an
/// environment variable of the process that sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "RawAddressFrom", into = "RawAddressFrom")]
pub enum AddressFrom {
    File(String),
    Env(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawAddressFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<String>,
}

impl TryFrom<RawAddressFrom> for AddressFrom {
    type Error = String;
    fn try_from(raw: RawAddressFrom) -> Result<Self, String> {
        match (raw.file, raw.env) {
            (Some(file), None) if !file.trim().is_empty() => Ok(AddressFrom::File(file)),
            (None, Some(env)) if !env.trim().is_empty() => Ok(AddressFrom::Env(env)),
            (Some(_), None) => Err("`file` names the file that holds the address".into()),
            (None, Some(_)) => {
                Err("`env` names the environment variable that holds the address".into())
            }
            _ => Err("give exactly one of `file` (a file holding the address) or `env` (an environment variable holding it)".into()),
        }
    }
}

impl From<AddressFrom> for RawAddressFrom {
    fn from(a: AddressFrom) -> Self {
        match a {
            AddressFrom::File(file) => RawAddressFrom {
                file: Some(file),
                env: None,
            },
            AddressFrom::Env(env) => RawAddressFrom {
                file: None,
                env: Some(env),
            },
        }
    }
}

impl fmt::Display for AddressFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressFrom::File(path) => write!(f, "file {path}"),
            AddressFrom::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// The services an alert can be posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertKind {
    Slack,
    MsTeams,
    Discord,
    Rocket,
    GChat,
    /// Coalmine: a JSON POST with the rollout, phase, weight, message and severity.
    Webhook,
}

/// Flagger's provider types Coalmine does not send to.
const FLAGGER_ONLY_KINDS: [&str; 3] = ["dingtalk", "dingding", "ringcentral"];

impl AlertKind {
    pub const ALL: [AlertKind; 6] = [
        AlertKind::Slack,
        AlertKind::MsTeams,
        AlertKind::Discord,
        AlertKind::Rocket,
        AlertKind::GChat,
        AlertKind::Webhook,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Slack => "slack",
            AlertKind::MsTeams => "msteams",
            AlertKind::Discord => "discord",
            AlertKind::Rocket => "rocket",
            AlertKind::GChat => "gchat",
            AlertKind::Webhook => "webhook",
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for AlertKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AlertKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Some(kind) = AlertKind::ALL.into_iter().find(|k| k.as_str() == text) {
            return Ok(kind);
        }
        let known: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        let message = if FLAGGER_ONLY_KINDS.contains(&text.as_str()) {
            format!(
                "Flagger's {text:?} provider is not one Coalmine sends to; use one of {}",
                known.join(", ")
            )
        } else {
            let hint = crate::suggest::nearest(&text, known.iter().copied())
                .map(|n| format!(", did you mean {n}?"))
                .unwrap_or_default();
            format!(
                "unknown alert provider type {text:?}{hint} (Coalmine sends to {})",
                known.join(", ")
            )
        };
        Err(serde::de::Error::custom(message))
    }
}

impl JsonSchema for AlertKind {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AlertKind".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        schemars::json_schema!({ "type": "string", "enum": names })
    }
}

/// How much a message matters, as Flagger grades them. An alert of severity `warn` receives
/// `warn` and `error` messages; `info` (the default) receives all; `error` only errors.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warn,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Error => "error",
        }
    }

    /// Whether an alert of this severity receives a message of severity `message`.
    pub fn receives(self, message: Severity) -> bool {
        message >= self
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl JsonSchema for Severity {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Severity".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "enum": ["info", "warn", "error"] })
    }
}

/// What a provider needs to send from `coalmine run` or `serve`, checked when a rollout is
/// about to run: an address (inline or `addressFrom`). Returns the field and the message.
pub fn check_sendable(spec: &AlertProviderSpec) -> Result<(), (String, String)> {
    match (&spec.address, &spec.address_from, &spec.secret_ref) {
        (Some(_), Some(_), _) => Err((
            "spec.addressFrom".into(),
            "give the address once: `address` or `addressFrom`, not both".into(),
        )),
        (Some(_), None, _) | (None, Some(_), _) => Ok(()),
        (None, None, Some(_)) => Err((
            "spec.secretRef".into(),
            "a Kubernetes Secret is read by the operator only: off Kubernetes, give the address with a coalmine.dev/v1alpha1 AlertProvider's addressFrom ({file: PATH} or {env: NAME})".into(),
        )),
        (None, None, None) => Err((
            "spec.addressFrom".into(),
            "the provider needs its address: addressFrom ({file: PATH} or {env: NAME}) or address".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_receives_its_severity_and_above() {
        assert!(Severity::Info.receives(Severity::Info));
        assert!(Severity::Info.receives(Severity::Error));
        assert!(!Severity::Warn.receives(Severity::Info));
        assert!(Severity::Warn.receives(Severity::Warn));
        assert!(Severity::Warn.receives(Severity::Error));
        assert!(!Severity::Error.receives(Severity::Warn));
        assert!(Severity::Error.receives(Severity::Error));
    }
}
