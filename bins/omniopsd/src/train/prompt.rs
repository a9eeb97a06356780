//! The chat template: the only place that knows how a corpus record becomes text and tokens.
//!
//! Invariant: every prompt the model sees and every answer it is trained on or scored by is
//! laid out here: the system turn, the student's view (media placeholder, subtitle,
//! question), the teacher's views (the student's context plus a privileged block before the
//! assistant header), and the answer line
//! `emotion: angry; sentiment: negative; open: angry, annoyed, sarcastic`, which
//! [`parse_answer`] reads back into the three MER-UniBench predictions. Samples, the
//! embedded tokenizer's training texts and the scorer all come from these functions.

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use super::tokenizer;
use crate::data::manifest::{sentiment_word, Record};

/// The system turn of every prompt.
pub const SYSTEM_PROMPT: &str =
    "You judge how a speaker feels from the voice, the face and the words.";

/// Which privileged block the teacher sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privileged {
    /// The rationale (the method).
    Rationale,
    /// Only the gold answer (ablation).
    Label,
    /// Nothing: the teacher's context equals the student's (ablation).
    None,
}

/// The gold answer line of a record: the parts for the labels it carries, in the order
/// `emotion: …; sentiment: …; open: …` (all three without a dataset).
pub fn answer(record: &Record) -> String {
    let mut parts = Vec::with_capacity(3);
    if let Some(emotion) = &record.emotion {
        parts.push(format!("emotion: {emotion}"));
    }
    if let Some(score) = record.sentiment {
        parts.push(format!("sentiment: {}", sentiment_word(score)));
    }
    if let Some(openset) = &record.openset {
        parts.push(format!("open: {}", openset.join(", ")));
    }
    parts.join("; ")
}

/// The text part of the student's prompt (media come before it as placeholders/features).
pub fn student_text(record: &Record) -> String {
    format!(
        "subtitle: {}\nhow does the speaker feel?\n",
        record.subtitle
    )
}

/// The user text of a prompt that asks `question` instead of the trainer's question (the
/// subtitle line is the student's): `omniopsd predict --prompt affectgpt`.
pub fn question_text(record: &Record, question: &str) -> String {
    format!("subtitle: {}\n{question}\n", record.subtitle)
}

/// The privileged block inserted before the answer header for the teacher.
pub fn privileged_text(record: &Record, kind: Privileged) -> String {
    match kind {
        Privileged::Rationale => format!(
            "rationale: {}\n",
            record.rationale.as_deref().unwrap_or_default()
        ),
        Privileged::Label => format!("reference: {}\n", answer(record)),
        Privileged::None => String::new(),
    }
}

/// A parsed answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The basic-emotion word (empty if absent).
    pub emotion: String,
    /// The sentiment word (empty if absent).
    pub sentiment: String,
    /// The open-vocabulary labels.
    pub openset: Vec<String>,
}

/// Parses `emotion: ...; sentiment: ...; open: ...`, tolerating missing or reordered parts
/// and stray whitespace (a partly trained model writes partial answers; they score as such).
pub fn parse_answer(text: &str) -> Parsed {
    let mut p = Parsed::default();
    for part in text.split([';', '\n']) {
        let Some((key, value)) = part.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "emotion" if p.emotion.is_empty() => p.emotion = value.to_string(),
            "sentiment" if p.sentiment.is_empty() => p.sentiment = value.to_string(),
            "open" if p.openset.is_empty() => {
                p.openset = value
                    .split(',')
                    .map(|w| w.trim().to_string())
                    .filter(|w| !w.is_empty())
                    .collect()
            }
            _ => {}
        }
    }
    p
}

/// Every text the template produces for `records`, in a fixed order: what the embedded
/// tokenizer is trained on, so each piece of every view is covered by its merges.
pub fn template_texts(records: &[Record]) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for r in records {
        texts.push(student_text(r));
        texts.push(answer(r));
        texts.push(privileged_text(r, Privileged::Rationale));
        texts.push(privileged_text(r, Privileged::Label));
    }
    texts.push(format!("system\n{SYSTEM_PROMPT}\nuser\nassistant\n"));
    texts
}

/// The id of a chat or media token in `tk` (the embedded tokenizer's fixed ids, or a real
/// Qwen2.5-Omni tokenizer's); an error names the token when the tokenizer lacks it.
pub fn special(tk: &Tokenizer, token: &str) -> Result<u32> {
    tk.token_to_id(token).ok_or_else(|| {
        anyhow!("tokenizer has no `{token}` token (a Qwen2.5-Omni chat tokenizer is required)")
    })
}

/// The token that ends an answer in `tk`: `<|im_end|>`.
pub fn stop_token(tk: &Tokenizer) -> Result<u32> {
    special(tk, "<|im_end|>")
}

/// The view a prompt is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Media and subtitle only.
    Student,
    /// The student's context plus a privileged block.
    Teacher(Privileged),
}

/// Prompt token ids in Qwen2.5-Omni's chat layout:
///
/// ```text
/// <|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n
/// <|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|>{student text}{privileged block}<|im_end|>\n
/// <|im_start|>assistant\n
/// ```
///
/// The single `<|VIDEO|>` is the placeholder the thinker expands into the record's
/// interleaved frame and audio tokens (`<|audio_bos|>` … `<|audio_eos|>`). Each text piece is
/// tokenized on its own, so the teacher's ids are the student's with the block's ids inserted
/// before `<|im_end|>`, and both end with the same assistant header.
pub fn prompt_ids(tk: &Tokenizer, record: &Record, view: View) -> Result<Vec<u32>> {
    chat_ids(tk, &student_text(record), record, view, true)
}

/// The student's chat layout ([`prompt_ids`], or [`text_prompt_ids`] without `video`) with
/// `user_text` in place of the student text.
pub fn user_prompt_ids(
    tk: &Tokenizer,
    record: &Record,
    user_text: &str,
    video: bool,
) -> Result<Vec<u32>> {
    chat_ids(tk, user_text, record, View::Student, video)
}

/// [`prompt_ids`] for a text-only model (a `Qwen2ForCausalLM` checkpoint): the same chat
/// layout without the video block, so the student has the subtitle alone.
pub fn text_prompt_ids(tk: &Tokenizer, record: &Record, view: View) -> Result<Vec<u32>> {
    chat_ids(tk, &student_text(record), record, view, false)
}

fn chat_ids(
    tk: &Tokenizer,
    user_text: &str,
    record: &Record,
    view: View,
    video: bool,
) -> Result<Vec<u32>> {
    let text = |s: &str| tokenizer::encode(tk, s);
    let (im_start, im_end) = (special(tk, "<|im_start|>")?, special(tk, "<|im_end|>")?);
    let mut ids = vec![im_start];
    ids.extend(text(&format!("system\n{SYSTEM_PROMPT}"))?);
    ids.push(im_end);
    ids.extend(text("\n")?);
    ids.push(im_start);
    ids.extend(text("user\n")?);
    if video {
        ids.extend([
            special(tk, "<|vision_bos|>")?,
            special(tk, "<|VIDEO|>")?,
            special(tk, "<|vision_eos|>")?,
        ]);
    }
    ids.extend(text(user_text)?);
    if let View::Teacher(kind) = view {
        ids.extend(text(&privileged_text(record, kind))?);
    }
    ids.extend(assistant_header(tk)?);
    Ok(ids)
}

/// `<|im_end|>\n<|im_start|>assistant\n`: closes the user turn and opens the answer.
pub fn assistant_header(tk: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = vec![special(tk, "<|im_end|>")?];
    ids.extend(tokenizer::encode(tk, "\n")?);
    ids.push(special(tk, "<|im_start|>")?);
    ids.extend(tokenizer::encode(tk, "assistant\n")?);
    Ok(ids)
}

/// The gold answer's ids, `answer(record)` then [`STOP_TOKEN`].
pub fn answer_ids(tk: &Tokenizer, record: &Record) -> Result<Vec<u32>> {
    let mut ids = tokenizer::encode(tk, &answer(record))?;
    ids.push(stop_token(tk)?);
    Ok(ids)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::manifest::Split;
    use crate::data::synth::{self, SynthConfig};
    use crate::train::tiny::STOP_TOKEN;
    use crate::train::tokenizer::VIDEO;

    /// A 3-sample synthetic corpus on disk and a tokenizer trained on its texts.
    pub(crate) struct Corpus {
        pub dir: tempfile::TempDir,
        pub records: Vec<Record>,
        pub tk: Tokenizer,
    }

    pub(crate) fn corpus() -> Corpus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            n: 3,
            ..SynthConfig::default()
        };
        let records = synth::synthesize(dir.path(), &cfg, |_| {}).unwrap();
        let texts: Vec<String> = records
            .iter()
            .flat_map(|r| {
                [
                    student_text(r),
                    privileged_text(r, Privileged::Rationale),
                    answer(r),
                ]
            })
            .chain([SYSTEM_PROMPT.to_string()])
            .collect();
        let tk = tokenizer::train(&texts, 384).unwrap();
        Corpus { dir, records, tk }
    }

    /// A held-out record with these labels.
    pub(crate) fn record(emotion: &str, sentiment: f64, openset: &[&str]) -> Record {
        Record {
            id: format!("{emotion}{sentiment}"),
            split: Split::Heldout,
            audio: None,
            video: String::new(),
            subtitle: "x".into(),
            rationale: Some("r".into()),
            rationale_model: None,
            rationale_prompt: None,
            dataset: None,
            emotion: Some(emotion.into()),
            sentiment: Some(sentiment),
            openset: Some(openset.iter().map(|s| s.to_string()).collect()),
            conflict: None,
        }
    }

    #[test]
    fn parse_answer_reads_the_gold_format_back() {
        let r = record("angry", -2.0, &["angry", "annoyed", "sarcastic"]);
        let p = parse_answer(&answer(&r));
        assert_eq!(p.emotion, "angry");
        assert_eq!(p.sentiment, "negative");
        assert_eq!(p.openset, vec!["angry", "annoyed", "sarcastic"]);
    }

    #[test]
    fn parse_answer_tolerates_partial_answers() {
        let p = parse_answer("sentiment:  positive ; emotion: happy");
        assert_eq!(
            (p.emotion.as_str(), p.sentiment.as_str()),
            ("happy", "positive")
        );
        assert!(p.openset.is_empty());
        assert_eq!(parse_answer("garbage"), Parsed::default());
    }

    fn chat_text(r: &Record, block: &str) -> String {
        format!(
            "<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n\
             <|vision_bos|><|VIDEO|><|vision_eos|>{}{block}<|im_end|>\n<|im_start|>assistant\n",
            student_text(r)
        )
    }

    #[test]
    fn prompt_ids_decode_to_the_chat_layout() {
        let c = corpus();
        let r = &c.records[0];
        let student = prompt_ids(&c.tk, r, View::Student).unwrap();
        assert_eq!(c.tk.decode(&student, false).unwrap(), chat_text(r, ""));
        // Tokenizing the whole chat string gives the same ids: the pieces meet at specials.
        assert_eq!(
            tokenizer::encode(&c.tk, &chat_text(r, "")).unwrap(),
            student
        );
        let teacher = prompt_ids(&c.tk, r, View::Teacher(Privileged::Rationale)).unwrap();
        let block = privileged_text(r, Privileged::Rationale);
        assert_eq!(c.tk.decode(&teacher, false).unwrap(), chat_text(r, &block));
        assert_eq!(student.iter().filter(|&&t| t == VIDEO).count(), 1);
    }

    #[test]
    fn teacher_prompt_is_student_prompt_with_the_block_before_the_assistant_header() {
        let c = corpus();
        let r = &c.records[1];
        let student = prompt_ids(&c.tk, r, View::Student).unwrap();
        let header = assistant_header(&c.tk).unwrap();
        assert!(student.ends_with(&header));
        let body = &student[..student.len() - header.len()];
        for kind in [Privileged::Rationale, Privileged::Label, Privileged::None] {
            let teacher = prompt_ids(&c.tk, r, View::Teacher(kind)).unwrap();
            let block = tokenizer::encode(&c.tk, &privileged_text(r, kind)).unwrap();
            let expected: Vec<u32> = [body, &block, &header].concat();
            assert_eq!(teacher, expected, "{kind:?}");
        }
        assert_eq!(
            prompt_ids(&c.tk, r, View::Teacher(Privileged::None)).unwrap(),
            student
        );
    }

    #[test]
    fn answer_ids_are_the_gold_line_then_the_stop_token() {
        let c = corpus();
        let r = &c.records[2];
        let ids = answer_ids(&c.tk, r).unwrap();
        assert_eq!(ids.last(), Some(&STOP_TOKEN));
        assert_eq!(ids.iter().filter(|&&t| t == STOP_TOKEN).count(), 1);
        assert_eq!(
            c.tk.decode(&ids, false).unwrap(),
            format!("{}<|im_end|>", answer(r))
        );
    }
}
