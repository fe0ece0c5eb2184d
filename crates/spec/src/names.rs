//! The names Kubernetes allows, and what a refused one should have been.
//!
//! A Rollout's or Canary's name ends up in Kubernetes object names (Flagger derives the
//! `NAME-canary` and `NAME-primary` Services from it), in Coalmine's API paths
//! (`/api/v1/rollouts/NAME`), in metric labels and in file names, so only what all of them take
//! is accepted: a DNS-1123 label. A name checked here never needs quoting or escaping anywhere.

/// The longest DNS-1123 label (RFC 1123): what a Service name may be.
pub const LABEL_MAX: usize = 63;
/// The longest DNS-1123 subdomain: what most Kubernetes object names may be.
pub const SUBDOMAIN_MAX: usize = 253;

/// What a name is for, which decides the rule it follows and how a refusal explains itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// A Rollout's or Canary's `metadata.name`.
    Rollout,
    /// Any `metadata.namespace`.
    Namespace,
    /// Object names Kubernetes checks as DNS-1123 subdomains (MetricTemplate, AlertProvider).
    Object,
}

impl NameRule {
    fn is_subdomain(self) -> bool {
        self == NameRule::Object
    }

    fn rule(self) -> &'static str {
        match self {
            NameRule::Rollout => "(Rollout and Canary names are DNS-1123 labels, since Flagger derives Kubernetes Service names from a Canary's name and Services take only labels: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit)",
            NameRule::Namespace => "(namespaces are DNS-1123 labels: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit)",
            NameRule::Object => "(Kubernetes requires DNS-1123 subdomains of these names: at most 253 lowercase letters, digits, '-' and '.', every dot-separated part starting and ending with a letter or digit)",
        }
    }
}

/// Checks `name` against `rule`; the error says what is wrong, the rule, and a valid name close
/// to the one given when there is one.
pub fn check_name(name: &str, rule: NameRule) -> Result<(), String> {
    let Some(problem) = problem(name, rule) else {
        return Ok(());
    };
    let shown = shown(name);
    let suggestion = match suggest(name, rule) {
        Some(s) => format!("; did you mean {s:?}?"),
        None => String::new(),
    };
    Err(format!(
        "{shown} is not a valid name: {problem}{suggestion} {}",
        rule.rule()
    ))
}

/// The first thing wrong with `name`, in words.
fn problem(name: &str, rule: NameRule) -> Option<String> {
    let max = if rule.is_subdomain() {
        SUBDOMAIN_MAX
    } else {
        LABEL_MAX
    };
    if name.is_empty() {
        return Some("it is empty".into());
    }
    let length = name.chars().count();
    if length > max {
        return Some(format!("it has {length} characters, {max} at most"));
    }
    if let Some(c) = name.chars().find(|c| !allowed(*c, rule)) {
        return Some(match c {
            'A'..='Z' => format!("uppercase {c:?} is not allowed (lowercase only)"),
            '.' => "'.' is not allowed".to_string(),
            c if c.is_control() => {
                format!("it contains the control character {}", c.escape_default())
            }
            c => format!("{c:?} is not allowed"),
        });
    }
    let parts: Vec<&str> = if rule.is_subdomain() {
        name.split('.').collect()
    } else {
        vec![name]
    };
    for part in parts {
        let first = part.chars().next();
        let last = part.chars().last();
        match (first, last) {
            (None, _) => return Some("it has an empty part between dots".into()),
            (Some(c), _) if !c.is_ascii_alphanumeric() => {
                return Some(format!("{part:?} starts with {c:?}"))
            }
            (_, Some(c)) if !c.is_ascii_alphanumeric() => {
                return Some(format!("{part:?} ends with {c:?}"))
            }
            _ => {}
        }
    }
    None
}

fn allowed(c: char, rule: NameRule) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (c == '.' && rule.is_subdomain())
}

/// The name as an error message shows it: quoted and escaped, cut short when very long.
fn shown(name: &str) -> String {
    const MAX_CHARS: usize = 40;
    if name.chars().count() > MAX_CHARS {
        let head: String = name.chars().take(MAX_CHARS).collect();
        format!("{:?}…", head)
    } else {
        format!("{name:?}")
    }
}

/// A valid name close to `name`: lowercase, other characters as '-', runs of '-' as one, cut to
/// the length allowed. `None` when nothing of the name is left or it is already valid.
fn suggest(name: &str, rule: NameRule) -> Option<String> {
    let max = if rule.is_subdomain() {
        SUBDOMAIN_MAX
    } else {
        LABEL_MAX
    };
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        let c = if allowed(c, rule) { c } else { '-' };
        let separator = c == '-' || c == '.';
        if separator && (out.is_empty() || out.ends_with(['-', '.'])) {
            continue;
        }
        out.push(c);
    }
    let mut out: String = out.chars().take(max).collect();
    while out.ends_with(['-', '.']) {
        out.pop();
    }
    (!out.is_empty() && out != name && problem(&out, rule).is_none()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_dns_1123() {
        for good in ["web", "payment-service", "a", "0", "a1-b2", &"a".repeat(63)] {
            assert_eq!(check_name(good, NameRule::Rollout), Ok(()), "{good}");
        }
        for (bad, problem) in [
            ("", "it is empty"),
            ("a/b", "'/' is not allowed"),
            ("..", "'.' is not allowed"),
            ("a\0b", "control character \\u{0}"),
            ("a\nb", "control character \\n"),
            ("Payment", "uppercase 'P'"),
            ("-web", "starts with '-'"),
            ("web-", "ends with '-'"),
            ("a.b", "'.' is not allowed"),
            ("web_app", "'_' is not allowed"),
        ] {
            let err = check_name(bad, NameRule::Rollout).unwrap_err();
            assert!(err.contains(problem), "{bad:?}: {err}");
            assert!(err.contains("DNS-1123 label"), "{err}");
        }
        let long = "x".repeat(5000);
        let err = check_name(&long, NameRule::Rollout).unwrap_err();
        assert!(err.contains("5000 characters, 63 at most"), "{err}");
        assert!(err.len() < 600, "the name is not repeated whole: {err}");
    }

    #[test]
    fn subdomains_allow_dots_between_labels() {
        for good in ["error-rate", "a.b.c", "x1.y2"] {
            assert_eq!(check_name(good, NameRule::Object), Ok(()), "{good}");
        }
        for bad in ["a..b", ".a", "a.", "A.b", "a/b", "a.-b"] {
            assert!(check_name(bad, NameRule::Object).is_err(), "{bad}");
        }
        assert!(check_name(&"a".repeat(253), NameRule::Object).is_ok());
        assert!(check_name(&"a".repeat(254), NameRule::Object).is_err());
    }

    #[test]
    fn a_close_valid_name_is_suggested() {
        let err = check_name("Payment_Service", NameRule::Rollout).unwrap_err();
        assert!(
            err.starts_with("\"Payment_Service\" is not a valid name: uppercase 'P' is not allowed (lowercase only); did you mean \"payment-service\"? ("),
            "{err}"
        );
        let err = check_name("a/b", NameRule::Rollout).unwrap_err();
        assert!(err.contains("did you mean \"a-b\"?"), "{err}");
        let err = check_name("..", NameRule::Rollout).unwrap_err();
        assert!(!err.contains("did you mean"), "{err}");
        let err = check_name(&"y".repeat(70), NameRule::Rollout).unwrap_err();
        assert!(err.contains(&format!("did you mean \"{}\"", "y".repeat(63))));
    }
}
