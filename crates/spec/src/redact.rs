//! Secrets kept out of what Coalmine shows: status, events, logs and error messages show URLs
//! with their credentials (`user:password@`, `?api_key=`) and secret header values replaced by
//! `REDACTED`. The documents themselves keep them, so Coalmine can still use them.

/// What a hidden secret reads as.
pub const REDACTED: &str = "REDACTED";

/// Query parameter and header names that carry credentials: the name, lowercased, contains one
/// of these.
const SECRET_NAME_PARTS: [&str; 10] = [
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "auth",
    "signature",
    "credential",
    "session",
];

/// Whether a query parameter or header of this name holds a credential.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "sig" || name == "cookie" || SECRET_NAME_PARTS.iter().any(|p| name.contains(p))
}

/// A header value as shown: hidden when the header carries a credential.
pub fn header_value<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret_name(name) {
        REDACTED
    } else {
        value
    }
}

/// One URL without its credentials: the password of `user:password@` (or a lone userinfo,
/// which is usually a token) and the values of secret query parameters.
pub fn url(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &text[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..rest_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                None => out.push_str(REDACTED),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_name(k) => format!("{k}={REDACTED}"),
                    _ => pair.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

/// A notification service's address as shown: its scheme and host only. A chat webhook's
/// secret is its path (`https://hooks.slack.com/services/T0/B0/SECRET`), which [`url`] keeps.
pub fn address(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return REDACTED.to_string();
    };
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let mut out = format!("{}://{host}", &text[..scheme_end]);
    if authority.contains('@') || authority_end < rest.len() {
        out.push('/');
        out.push_str(REDACTED);
    }
    out
}

/// Whether an object with this `type` is a notification provider (an AlertProvider's spec, or
/// its copy in a rollout's alert), whose `address` is shown with [`address`].
pub fn is_notification_kind(kind: &str) -> bool {
    crate::alerts::AlertKind::ALL
        .iter()
        .any(|k| k.as_str() == kind)
}

/// Free text (an error message, a log line) with every `http://` or `https://` URL in it
/// redacted.
pub fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| rest.find(scheme))
        .min()
    {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(candidate.len());
        // Punctuation that ends a sentence is not part of the URL.
        let token = candidate[..end].trim_end_matches([':', ',', '.', ';', ')', ']']);
        out.push_str(&url(token));
        rest = &candidate[token.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_hidden_and_the_rest_kept() {
        assert_eq!(
            url("http://admin:PASSWORD@prom:9090/api?api_key=SECRET&query=up#x"),
            "http://admin:REDACTED@prom:9090/api?api_key=REDACTED&query=up#x"
        );
        assert_eq!(
            url("https://ghp_TOKEN@example.com/"),
            "https://REDACTED@example.com/"
        );
        assert_eq!(
            url("http://127.0.0.1:9090?access_token=a&X-Amz-Signature=b&sig=c&step=1"),
            "http://127.0.0.1:9090?access_token=REDACTED&X-Amz-Signature=REDACTED&sig=REDACTED&step=1"
        );
        assert_eq!(url("http://127.0.0.1:9090"), "http://127.0.0.1:9090");
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn urls_inside_messages_are_hidden() {
        let msg = "error-rate: prometheus http://admin:PASSWORD@h:9090?api_key=SECRET: HTTP 500 (see \"https://u:p@x/y\")";
        let shown = text(msg);
        assert!(
            !shown.contains("PASSWORD") && !shown.contains("SECRET") && !shown.contains("u:p@")
        );
        assert_eq!(
            shown,
            "error-rate: prometheus http://admin:REDACTED@h:9090?api_key=REDACTED: HTTP 500 (see \"https://u:REDACTED@x/y\")"
        );
    }

    #[test]
    fn a_notification_address_shows_its_host_only() {
        assert_eq!(
            address("https://hooks.slack.com/services/T0/B0/SECRET"),
            "https://hooks.slack.com/REDACTED"
        );
        assert_eq!(
            address("http://u:p@127.0.0.1:8080"),
            "http://127.0.0.1:8080/REDACTED"
        );
        assert_eq!(address("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(address("not a url SECRET"), REDACTED);
    }

    #[test]
    fn secret_headers_are_hidden() {
        assert_eq!(header_value("Authorization", "Bearer x"), REDACTED);
        assert_eq!(header_value("X-Api-Key", "x"), REDACTED);
        assert_eq!(header_value("X-Scope-OrgID", "tenant-1"), "tenant-1");
    }
}
