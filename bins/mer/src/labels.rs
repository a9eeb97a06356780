//! Label-list parsing and normalisation, matching the benchmark's Python exactly.
//!
//! The reference scorer (AffectGPT's `wheel.py`) works on Python strings: `str.strip()`,
//! `str.lower()` and a `re.split("['\",]", s)` label splitter. Rust's `trim` and `to_lowercase`
//! agree with them except that Python also strips U+001C..U+001F, so [`py_strip`] is written out.

/// Whether Python's `str.isspace()` is true for `c`.
///
/// Python counts characters of bidirectional class WS, B or S or category Zs; that is Rust's
/// `char::is_whitespace` plus the four information separators U+001C..U+001F.
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Step 2 of the README: a label is lower-cased and stripped (`label.lower().strip()`).
pub fn normalize_label(s: &str) -> String {
    py_strip(&s.to_lowercase()).to_string()
}

/// The benchmark's `string_to_list(s)` for a string: drop one leading `[` and one trailing `]`,
/// split on any of `'` `"` `,`, strip every item, drop empty items.
///
/// Items keep their case; callers lower-case with [`normalize_label`] where the reference does.
/// The reference indexes `s[-1]` after removing `[`, so it raises on the one-character string
/// `"["`; here that string is simply an empty list.
pub fn string_to_list(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    let s = s.strip_prefix('[').unwrap_or(s);
    let s = s.strip_suffix(']').unwrap_or(s);
    s.split(['\'', '"', ','])
        .map(py_strip)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses a label list and normalises every label (`string_to_list` then step 2).
pub fn normalized_list(s: &str) -> Vec<String> {
    string_to_list(s)
        .iter()
        .map(|label| normalize_label(label))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_to_list_strips_one_bracket_pair_and_splits_on_quotes_and_commas() {
        assert_eq!(string_to_list("[happy, sad]"), vec!["happy", "sad"]);
        assert_eq!(string_to_list("['happy', \"sad\"]"), vec!["happy", "sad"]);
        assert_eq!(string_to_list("[[happy]]"), vec!["[happy]"]);
        assert_eq!(string_to_list("happy,,sad,"), vec!["happy", "sad"]);
        assert_eq!(string_to_list("[]"), Vec::<String>::new());
        assert_eq!(string_to_list(""), Vec::<String>::new());
        assert_eq!(string_to_list("["), Vec::<String>::new());
        assert_eq!(string_to_list("]"), Vec::<String>::new());
    }

    #[test]
    fn string_to_list_keeps_multi_word_and_hyphenated_labels_whole() {
        assert_eq!(
            string_to_list("[  GUARD ,  SELF-PROTECTION , look after]"),
            vec!["GUARD", "SELF-PROTECTION", "look after"]
        );
    }

    #[test]
    fn string_to_list_splits_apostrophes_like_the_reference() {
        // The reference splits on `'` too, so "can't" becomes two items; reproduce it.
        assert_eq!(string_to_list("can't"), vec!["can", "t"]);
    }

    #[test]
    fn normalisation_lower_cases_and_strips_python_whitespace() {
        assert_eq!(normalize_label("  Happy\t"), "happy");
        assert_eq!(normalize_label("\u{1f}Sad\u{1c}"), "sad");
        assert_eq!(normalize_label("\u{3000}ÄRGER\u{a0}"), "ärger");
        assert_eq!(
            normalized_list(" [ Joy , SELF-Protection ] "),
            vec!["[ joy", "self-protection ]"]
        );
    }

    #[test]
    fn brackets_are_only_removed_at_the_very_ends() {
        // A leading space keeps the bracket inside the first item, as in the reference.
        assert_eq!(string_to_list(" [joy]"), vec!["[joy"]);
    }
}
