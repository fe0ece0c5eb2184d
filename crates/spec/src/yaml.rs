use std::cell::RefCell;
use std::fmt;

use serde::de::DeserializeOwned;

/// A mistake in a document, reported the way compilers do: `file:line:column: field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
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
        let field = path.into_inner();
        SpecError {
            file: file.to_string(),
            line,
            column,
            message: plain_message(&e, text, &field),
            field,
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
/// Where the parser names a Rust type (`invalid u32`, `expected mapping start`), the message
/// says instead what the field takes and what was written (`text` at `field`).
fn plain_message(e: &serde_saphyr::Error, text: &str, field: &str) -> String {
    use serde_saphyr::Error;
    let written = || crate::schema::written_at(text, field);
    let full = match e.without_snippet() {
        Error::Message { msg, .. } => msg.clone(),
        Error::SerdeUnknownField {
            field, expected, ..
        } => return unknown_field_message(field, expected),
        Error::InvalidScalar { ty, .. } => return scalar_message(ty, written()),
        Error::SerdeInvalidType { expected, .. } | Error::SerdeInvalidValue { expected, .. }
            if expected_in_words(expected).is_some() =>
        {
            return scalar_message(expected, written())
        }
        Error::Unexpected { expected, .. } => {
            let wanted = match *expected {
                "string scalar" => "a single value",
                "mapping start" => "a mapping (`key: value` entries)",
                "sequence start" => "a list",
                other => other,
            };
            return match written() {
                Some(w) => format!("expected {wanted}, got {w}"),
                None => format!("expected {wanted}"),
            };
        }
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

/// What a scalar type takes, in words: `u32` is "a whole number (0 or more)".
fn expected_in_words(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "floating point" | "f32" | "f64" => "a number",
        "boolean" | "a boolean" | "bool" => "true or false",
        _ => return None,
    })
}

/// The range of an integer type, for "from 0 to 4294967295" when a number does not fit.
fn integer_range(ty: &str) -> Option<(i128, i128)> {
    Some(match ty {
        "u8" => (0, u8::MAX.into()),
        "u16" => (0, u16::MAX.into()),
        "u32" => (0, u32::MAX.into()),
        "u64" | "usize" => (0, u64::MAX.into()),
        "i8" => (i8::MIN.into(), i8::MAX.into()),
        "i16" => (i16::MIN.into(), i16::MAX.into()),
        "i32" => (i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => (i64::MIN.into(), i64::MAX.into()),
        _ => return None,
    })
}

/// `expected a whole number (0 or more), got "five"`.
fn scalar_message(ty: &str, written: Option<crate::schema::Written>) -> String {
    use crate::schema::Written;
    let Some(expected) = expected_in_words(ty) else {
        return format!("invalid {ty}");
    };
    match (written, integer_range(ty)) {
        (Some(Written::Int(i)), Some((min, max))) if min == 0 && i >= 0 => {
            format!("expected a whole number from 0 to {max}, got {i}")
        }
        (Some(Written::Int(i)), Some((min, max))) if min < 0 => {
            format!("expected a whole number from {min} to {max}, got {i}")
        }
        (Some(w), _) => format!("expected {expected}, got {w}"),
        (None, _) => format!("expected {expected}"),
    }
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

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    struct Numbers {
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        small: Option<u8>,
        #[serde(default)]
        offset: Option<i32>,
        #[serde(default)]
        ratio: Option<f64>,
        #[serde(default)]
        enabled: Option<bool>,
        #[serde(default)]
        inner: Option<Inner>,
        #[serde(default)]
        list: Vec<u32>,
    }

    #[test]
    fn scalar_mistakes_say_what_the_field_takes_and_what_was_written() {
        for (yaml, message) in [
            (
                "count: five",
                r#"expected a whole number (0 or more), got "five""#,
            ),
            ("count: -3", "expected a whole number (0 or more), got -3"),
            ("count: 2.5", "expected a whole number (0 or more), got 2.5"),
            (
                "count: 99999999999",
                "expected a whole number from 0 to 4294967295, got 99999999999",
            ),
            (
                "small: 300",
                "expected a whole number from 0 to 255, got 300",
            ),
            ("offset: x", r#"expected a whole number, got "x""#),
            (
                "offset: 9999999999",
                "expected a whole number from -2147483648 to 2147483647, got 9999999999",
            ),
            ("ratio: high", r#"expected a number, got "high""#),
            ("ratio: true", "expected a number, got true"),
            (
                "enabled: sometimes",
                r#"expected true or false, got "sometimes""#,
            ),
            ("count: [1, 2]", "expected a single value, got a list"),
            (
                "inner: 5",
                "expected a mapping (`key: value` entries), got 5",
            ),
            ("list: 5", "expected a list, got 5"),
            (
                "list: [1, x]",
                r#"expected a whole number (0 or more), got "x""#,
            ),
        ] {
            let err = parse_yaml::<Numbers>("n.yaml", yaml).unwrap_err();
            assert_eq!(err.message, message, "{yaml}");
        }
    }

    #[test]
    fn syntax_error_has_a_location() {
        let err = parse_yaml::<Doc>("r.yaml", "name: [x\n").unwrap_err();
        assert!(err.line >= 1, "{err}");
    }
}
