//! "Did you mean …?" for misspelt field names and values.

/// The candidate closest to `word` by edit distance, if it is close enough to be a plausible
/// typo: at most `max(2, len / 3)` edits, where `len` is the length of `word` in characters.
///
/// Letters are compared case-insensitively, but a word that differs from a candidate only in
/// case still counts as one edit, so `StepWeight` suggests `stepWeight`. Ties go to the
/// candidate that comes first.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let d = distance(word, candidate);
        if d <= limit && best.is_none_or(|(best_d, _)| d < best_d) {
            best = Some((d, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Case-insensitive Levenshtein distance, with a pure case difference counted as one edit.
fn distance(a: &str, b: &str) -> usize {
    let lower = |s: &str| s.to_lowercase().chars().collect::<Vec<char>>();
    match levenshtein(&lower(a), &lower(b)) {
        0 if a != b => 1,
        d => d,
    }
}

fn levenshtein(a: &[char], b: &[char]) -> usize {
    // Two rows of the classic table: `prev[j]` is the distance between a[..i] and b[..j].
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut row = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != cb);
            row[j + 1] = substitution.min(prev[j + 1] + 1).min(row[j] + 1);
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANALYSIS: [&str; 5] = [
        "interval",
        "threshold",
        "maxWeight",
        "stepWeight",
        "stepWeights",
    ];

    #[test]
    fn suggests_the_closest_field_for_a_typo() {
        assert_eq!(nearest("stepWieght", ANALYSIS), Some("stepWeight"));
        assert_eq!(nearest("treshold", ANALYSIS), Some("threshold"));
        assert_eq!(nearest("intervall", ANALYSIS), Some("interval"));
        assert_eq!(nearest("wieght", ["weight", "height"]), Some("weight"));
    }

    #[test]
    fn a_case_difference_is_one_edit_not_zero() {
        assert_eq!(distance("StepWeight", "stepWeight"), 1);
        assert_eq!(distance("stepWeight", "stepWeight"), 0);
        assert_eq!(distance("STEPWIEGHT", "stepWeight"), 2);
        // An exact match beats a case-only one even when it comes later.
        assert_eq!(nearest("name", ["Name", "name"]), Some("name"));
        assert_eq!(nearest("StepWeight", ANALYSIS), Some("stepWeight"));
    }

    #[test]
    fn nothing_is_suggested_for_a_distant_word() {
        assert_eq!(nearest("colour", ANALYSIS), None);
        assert_eq!(nearest("x", ["interval"]), None);
        assert_eq!(nearest("anything", []), None);
    }

    #[test]
    fn the_limit_grows_with_the_word() {
        // Short words allow two edits.
        assert_eq!(nearest("ab", ["xy"]), Some("xy"));
        assert_eq!(nearest("abc", ["xyz"]), None);
        // Nine characters allow three edits, not four.
        assert_eq!(nearest("abcdefghi", ["abcdefxyz"]), Some("abcdefxyz"));
        assert_eq!(nearest("abcdefghi", ["abcdewxyz"]), None);
    }

    #[test]
    fn ties_go_to_the_first_candidate() {
        assert_eq!(nearest("cat", ["bat", "hat"]), Some("bat"));
        assert_eq!(nearest("cat", ["hat", "bat"]), Some("hat"));
    }

    #[test]
    fn distance_is_levenshtein() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("abc", ""), 3);
        assert_eq!(distance("flaw", "lawn"), 2);
    }
}
