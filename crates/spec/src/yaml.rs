use std::cell::RefCell;
use std::fmt;

use serde::de::DeserializeOwned;

/// A mistake in a document, reported the way compilers do: `file:line:column: field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub file: String,
    /// 1-based; 0 when the parser could not tell.
    pub line: u64,
    pub column: u64,
    /// Dotted path of the offending field (`spec.analysis.interval`), empty at the top level.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Parses one YAML document. Validation that a type does inside its `Deserialize` impl (a bad
/// URL, regex or weight) is reported at the value's own line and column with its field path.
pub fn parse_yaml<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, SpecError> {
    let path = RefCell::new(String::new());
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            *path.borrow_mut() = clean_path(&e.path().to_string());
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        SpecError {
            file: file.to_string(),
            line,
            column,
            field: path.into_inner(),
            message: plain_message(&e),
        }
    })
}

/// serde_path_to_error says `.` for the root and `?` for positions it cannot name.
fn clean_path(path: &str) -> String {
    if path == "." || path == "?" {
        String::new()
    } else {
        path.to_string()
    }
}

/// The parser's message without its own location suffix or source snippet: we print those.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let full = match e {
        serde_saphyr::Error::Message { msg, .. } => msg.clone(),
        serde_saphyr::Error::SerdeUnknownField {
            field, expected, ..
        } => return unknown_field_message(field, expected),
        other => other.to_string(),
    };
    let first = full.lines().next().unwrap_or("").trim();
    let first = strip_location_prefix(first);
    let message = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    // Some errors arrive already formatted; read the unknown field and the list back.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, list)) = rest.split_once("`, expected one of ") {
            let expected: Vec<&str> = list.split(", ").map(|f| f.trim_matches('`')).collect();
            return unknown_field_message(field, &expected);
        }
    }
    message.to_string()
}

/// "error: line 3 column 3: message" → "message": the location is reported separately.
fn strip_location_prefix(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("error: line ") else {
        return text;
    };
    match rest.find(": ") {
        Some(i) if rest[..i].contains(" column ") => &rest[i + 2..],
        _ => text,
    }
}

/// Users want the field they meant, not the list: "unknown field `stepWieght`, did you mean
/// `stepWeight`?"; the whole list only when nothing is near.
fn unknown_field_message(field: &str, expected: &[&str]) -> String {
    match crate::suggest::nearest(field, expected.iter().copied()) {
        Some(near) => format!("unknown field `{field}`, did you mean `{near}`?"),
        None => format!(
            "unknown field `{field}`, expected one of {}",
            expected
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: String,
        inner: Inner,
    }

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        weight: u32,
    }

    #[test]
    fn type_error_names_file_line_column_and_field() {
        let err = parse_yaml::<Doc>("r.yaml", "name: x\ninner:\n  weight: lots\n").unwrap_err();
        assert_eq!((err.line, err.column), (3, 11), "{err}");
        assert_eq!(err.field, "inner.weight");
        assert!(
            err.to_string().starts_with("r.yaml:3:11: inner.weight: "),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse_yaml::<Doc>("r.yaml", "name: x\ninner:\n  wieght: 3\n").unwrap_err();
        assert!(err.message.contains("wieght"), "{err}");
        assert_eq!(err.line, 3, "{err}");
    }

    #[test]
    fn unknown_field_suggests_the_nearest_known_one() {
        let err = parse_yaml::<Doc>("r.yaml", "name: x\ninner:\n  wieght: 3\n").unwrap_err();
        assert_eq!(
            err.message,
            "unknown field `wieght`, did you mean `weight`?"
        );
        let err = parse_yaml::<Doc>("r.yaml", "name: x\ninner:\n  colour: 3\n").unwrap_err();
        assert!(err.message.contains("expected"), "{err}");
    }

    #[test]
    fn syntax_error_has_a_location() {
        let err = parse_yaml::<Doc>("r.yaml", "name: [x\n").unwrap_err();
        assert!(err.line >= 1, "{err}");
    }
}
