//! What the controller's HTTP clients share.

/// reqwest's Display omits the cause ("error sending request"); the cause is what users need.
/// URLs in it are shown without credentials.
pub fn reqwest_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.is_connect() {
        return "connection refused or unreachable".into();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    coalmine_spec::redact::text(&text)
}
