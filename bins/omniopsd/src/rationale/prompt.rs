//! The prompt template: a text file with `{{placeholder}}`s filled from the sample.
//!
//! | placeholder | value |
//! |---|---|
//! | `{{id}}` | the sample id |
//! | `{{subtitle}}` | what the speaker says |
//! | `{{emotion}}` | the gold basic emotion (`happy`, `sad`, `angry`, `surprise`, `worried`, `neutral`) |
//! | `{{sentiment}}` | the gold sentiment score in `[-3, 3]` |
//! | `{{sentiment_word}}` | its sign as a word: `positive`, `negative`, `neutral` |
//! | `{{openset}}` | the gold open-vocabulary labels, comma-separated |
//! | `{{media}}` | what is attached, in words: `4 video frames in time order and the audio track` |
//! | `{{frames}}` | the number of frames attached (`0` with `--no-frames`) |
//! | `{{audio}}` | `attached`, or `not attached` with `--no-audio` |
//!
//! A label the sample does not carry (a sentiment dataset has no `emotion`) fills in empty.
//!
//! An unknown placeholder is an error when the template is read, not a silent blank.

use anyhow::{bail, Result};

use crate::data::manifest::{sentiment_word, Record};

/// The shipped template (an evidence-aware rationale ending in `Label: <gold emotion>`).
pub const DEFAULT_PROMPT: &str = include_str!("default_prompt.txt");

/// Every placeholder a template may use.
pub const PLACEHOLDERS: [&str; 9] = [
    "id",
    "subtitle",
    "emotion",
    "sentiment",
    "sentiment_word",
    "openset",
    "media",
    "frames",
    "audio",
];

/// A parsed template: literal text and placeholder names, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Field(&'static str),
}

/// What is attached to the request, for `{{media}}`, `{{frames}}` and `{{audio}}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// Frames sent as images.
    pub frames: usize,
    /// Whether the audio is sent.
    pub audio: bool,
}

impl Template {
    /// Parses `text`; `source` names it in errors (a file path, or `default`).
    pub fn parse(text: &str, source: &str) -> Result<Template> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            let Some(len) = rest[open + 2..].find("}}") else {
                bail!("prompt {source}: `{{{{` without a closing `}}}}`");
            };
            let name = rest[open + 2..open + 2 + len].trim();
            let Some(field) = PLACEHOLDERS.iter().find(|p| **p == name) else {
                bail!(
                    "prompt {source}: unknown placeholder `{{{{{name}}}}}` (known: {})",
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{{{p}}}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            parts.push(Part::Field(field));
            rest = &rest[open + 2 + len + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            bail!("prompt {source}: no placeholder; the model would never see the sample's subtitle or labels");
        }
        Ok(Template { parts })
    }

    /// The prompt for `record` with `attached` media.
    pub fn render(&self, record: &Record, attached: Attached) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(field) => out.push_str(&field_value(field, record, attached)),
            }
        }
        out
    }
}

fn field_value(field: &str, record: &Record, attached: Attached) -> String {
    match field {
        "id" => record.id.clone(),
        "subtitle" => record.subtitle.clone(),
        "emotion" => record.emotion.clone().unwrap_or_default(),
        "sentiment" => record.sentiment.map(|s| s.to_string()).unwrap_or_default(),
        "sentiment_word" => record
            .sentiment
            .map(|s| sentiment_word(s).to_string())
            .unwrap_or_default(),
        "openset" => record.openset.as_deref().unwrap_or_default().join(", "),
        "frames" => attached.frames.to_string(),
        "audio" => if attached.audio {
            "attached"
        } else {
            "not attached"
        }
        .to_string(),
        _ => media_words(attached),
    }
}

fn media_words(attached: Attached) -> String {
    let frames = match attached.frames {
        0 => None,
        1 => Some("1 video frame".to_string()),
        n => Some(format!("{n} video frames in time order")),
    };
    match (frames, attached.audio) {
        (Some(f), true) => format!("{f} and the audio track"),
        (Some(f), false) => format!("{f} (no audio)"),
        (None, true) => "the audio track (no video frames)".to_string(),
        (None, false) => "no media, only the subtitle".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::Split;

    fn record() -> Record {
        Record {
            id: "s1".into(),
            split: Split::Train,
            audio: Some("a.wav".into()),
            video: "f".into(),
            subtitle: "I'm fine, thanks.".into(),
            rationale: None,
            rationale_model: None,
            rationale_prompt: None,
            dataset: None,
            emotion: Some("sad".into()),
            sentiment: Some(-1.5),
            openset: Some(vec!["sad".into(), "lonely".into()]),
            conflict: None,
        }
    }

    #[test]
    fn every_placeholder_is_filled_from_the_sample() {
        let all: String = PLACEHOLDERS
            .iter()
            .map(|p| format!("[{{{{ {p} }}}}]"))
            .collect();
        let t = Template::parse(&all, "test").unwrap();
        let got = t.render(
            &record(),
            Attached {
                frames: 4,
                audio: true,
            },
        );
        assert_eq!(
            got,
            "[s1][I'm fine, thanks.][sad][-1.5][negative][sad, lonely]\
             [4 video frames in time order and the audio track][4][attached]"
        );
    }

    #[test]
    fn an_unknown_or_unclosed_placeholder_is_an_error_naming_it() {
        let err = Template::parse("x {{label}} y", "p.txt")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.txt") && err.contains("{{label}}") && err.contains("{{subtitle}}"),
            "{err}"
        );
        let err = Template::parse("x {{emotion", "p.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("closing"), "{err}");
        assert!(Template::parse("no fields", "p.txt").is_err());
    }

    #[test]
    fn the_default_prompt_states_the_labels_and_asks_for_the_label_line() {
        let t = Template::parse(DEFAULT_PROMPT, "default").unwrap();
        let got = t.render(
            &record(),
            Attached {
                frames: 0,
                audio: false,
            },
        );
        assert!(got.contains("Subtitle: \"I'm fine, thanks.\""), "{got}");
        assert!(got.contains("- basic emotion: sad\n"), "{got}");
        assert!(got.contains("no media, only the subtitle"), "{got}");
        assert!(got.trim_end().ends_with("\"Label: sad\"."), "{got}");
    }
}
