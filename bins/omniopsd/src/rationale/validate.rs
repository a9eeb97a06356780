//! Whether an answer may become a rationale. A rationale the teacher reads must exist, be
//! the model's own explanation, be complete, fit the context, and not argue for another label:
//! an answer that fails any of these is never written.
//!
//! The label rule is deliberately conservative, so that describing cues ("a sad-looking smile")
//! never trips it. Only the answer's *conclusion* is read, which is
//! - the text after the last `Label:`, `Emotion:`, `Conclusion:` or `Answer:` (any case) up to
//!   the end of its line, and
//! - every sentence containing `the emotion is`, `the label is` or `the emotion label is`.
//!
//! A conclusion that names basic emotions (in any common form: `happiness`, `anger`,
//! `surprised`, `worry`, ...) but never the gold one asserts another label. A conclusion that
//! names the gold one, or none, is fine.

use std::fmt;

use omniopsd_endpoint::Completion;

/// Why an answer is not a rationale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Nothing but whitespace.
    Empty,
    /// Starts like a refusal (`I can't`, `I'm sorry`, `As an AI`, ...).
    Refused,
    /// The endpoint stopped at the token limit (`finish_reason` `length`).
    Truncated,
    /// Longer than `--max-chars`.
    TooLong { chars: usize, max: usize },
    /// The conclusion names `found` and not the gold label.
    WrongLabel { found: String, gold: String },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Empty => write!(f, "empty answer"),
            Invalid::Refused => write!(f, "the model refused"),
            Invalid::Truncated => write!(f, "truncated answer (finish_reason \"length\")"),
            Invalid::TooLong { chars, max } => {
                write!(f, "over-long answer ({chars} characters, limit {max})")
            }
            Invalid::WrongLabel { found, gold } => {
                write!(
                    f,
                    "the answer concludes `{found}`, the gold label is `{gold}`"
                )
            }
        }
    }
}

/// Openings of a refusal, compared lower-case after straightening apostrophes.
const REFUSALS: [&str; 12] = [
    "i can't",
    "i cannot",
    "i can not",
    "i'm sorry",
    "i am sorry",
    "sorry,",
    "as an ai",
    "i'm unable",
    "i am unable",
    "i won't",
    "i will not",
    "unfortunately, i",
];

/// Word forms of each basic emotion label.
const FORMS: [(&str, &[&str]); 6] = [
    ("happy", &["happy", "happiness", "joy", "joyful", "glad"]),
    ("sad", &["sad", "sadness", "sorrow", "sorrowful"]),
    ("angry", &["angry", "anger", "angrily"]),
    ("surprise", &["surprise", "surprised", "surprising"]),
    (
        "worried",
        &["worried", "worry", "worrying", "anxious", "anxiety"],
    ),
    ("neutral", &["neutral", "neutrality"]),
];

/// The rationale in `completion`, trimmed, or why it is not one.
pub fn validate(completion: &Completion, gold: &str, max_chars: usize) -> Result<String, Invalid> {
    if completion.finish_reason.as_deref() == Some("length") {
        return Err(Invalid::Truncated);
    }
    let text = completion.content.trim();
    if text.is_empty() {
        return Err(Invalid::Empty);
    }
    let opening: String = text
        .chars()
        .take(24)
        .collect::<String>()
        .to_lowercase()
        .replace('\u{2019}', "'");
    if REFUSALS.iter().any(|r| opening.starts_with(r)) {
        return Err(Invalid::Refused);
    }
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(Invalid::TooLong {
            chars,
            max: max_chars,
        });
    }
    // A sample without a basic-emotion label (a sentiment or open-set dataset's) has no
    // conclusion to contradict.
    if let Some(found) = (!gold.is_empty())
        .then(|| contradicted_label(text, gold))
        .flatten()
    {
        return Err(Invalid::WrongLabel {
            found,
            gold: gold.to_string(),
        });
    }
    Ok(text.to_string())
}

/// The first label a conclusion of `text` names when it does not name `gold` (module docs).
pub fn contradicted_label(text: &str, gold: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let mut conclusions: Vec<&str> = Vec::new();
    let marker = ["label:", "emotion:", "conclusion:", "answer:"]
        .iter()
        .filter_map(|m| lower.rfind(m).map(|at| at + m.len()))
        .max();
    if let Some(start) = marker {
        let end = lower[start..].find('\n').map_or(lower.len(), |e| start + e);
        conclusions.push(&lower[start..end]);
    }
    for sentence in lower.split(['.', '!', '?', '\n']) {
        if ["the emotion is", "the label is", "the emotion label is"]
            .iter()
            .any(|p| sentence.contains(p))
        {
            conclusions.push(sentence);
        }
    }
    conclusions.into_iter().find_map(|c| {
        let named = labels_named(c);
        (!named.is_empty() && !named.contains(&gold)).then(|| named[0].to_string())
    })
}

/// The basic labels a text names, in order of first mention.
fn labels_named(text: &str) -> Vec<&'static str> {
    let mut named = Vec::new();
    for word in text.split(|c: char| !c.is_alphabetic()) {
        if let Some((label, _)) = FORMS.iter().find(|(_, forms)| forms.contains(&word)) {
            if !named.contains(label) {
                named.push(*label);
            }
        }
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(content: &str) -> Completion {
        Completion {
            content: content.into(),
            finish_reason: Some("stop".into()),
            usage: None,
        }
    }

    #[test]
    fn a_grounded_rationale_with_the_gold_label_is_kept_trimmed() {
        let text = "Audio: the voice trembles and falls. Visual: the mouth smiles politely but \
                    the brows are drawn up. Text: the words say all is fine, which the voice \
                    contradicts.\nLabel: sad\n";
        assert_eq!(
            validate(&answer(text), "sad", 2000),
            Ok(text.trim().to_string())
        );
    }

    #[test]
    fn empty_refused_truncated_and_overlong_answers_are_rejected() {
        assert_eq!(validate(&answer("  \n"), "sad", 2000), Err(Invalid::Empty));
        for refusal in [
            "I can't help with that.",
            "I’m sorry, but",
            "As an AI, I cannot see",
        ] {
            assert_eq!(
                validate(&answer(refusal), "sad", 2000),
                Err(Invalid::Refused),
                "{refusal}"
            );
        }
        let mut cut = answer("Audio: the voice");
        cut.finish_reason = Some("length".into());
        assert_eq!(validate(&cut, "sad", 2000), Err(Invalid::Truncated));
        assert_eq!(
            validate(&answer(&"x".repeat(21)), "sad", 20),
            Err(Invalid::TooLong { chars: 21, max: 20 })
        );
    }

    #[test]
    fn a_conclusion_naming_another_label_is_rejected() {
        let text = "Audio: loud, fast. Visual: a wide grin.\nLabel: Happy";
        assert_eq!(
            validate(&answer(text), "angry", 2000),
            Err(Invalid::WrongLabel {
                found: "happy".into(),
                gold: "angry".into()
            })
        );
        assert_eq!(
            contradicted_label(
                "Everything points one way: the emotion is surprise.",
                "worried"
            ),
            Some("surprise".into())
        );
        assert_eq!(
            contradicted_label("Conclusion: the speaker shows anger.", "sad"),
            Some("angry".into())
        );
    }

    #[test]
    fn cue_descriptions_and_conclusions_naming_the_gold_label_pass() {
        // Other emotion words outside the conclusion are cue descriptions.
        let text = "Audio: a happy-sounding lilt at first. Visual: a forced smile that looks \
                    sad. Conclusion: despite a neutral face, the speaker is angry.";
        assert_eq!(contradicted_label(text, "angry"), None);
        assert_eq!(contradicted_label("Label: not happy but sad", "sad"), None);
        assert_eq!(
            contradicted_label("The voice is calm and flat.", "sad"),
            None
        );
        assert_eq!(contradicted_label("Label: sorrowful", "sad"), None);
    }
}
