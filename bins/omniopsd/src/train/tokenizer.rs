//! The embedded model's tokenizer: byte-level BPE (as Qwen2's) trained on the corpus texts with
//! the `tokenizers` crate, saved as a standard `tokenizer.json`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

/// Special tokens, in id order from 0: padding, end of text, then Qwen2.5-Omni's chat-turn
/// markers and media tokens under their Qwen2.5-Omni names, so prompts follow its chat template
/// and the thinker's placeholder expansion finds the tokens its `config.json` names.
pub const SPECIALS: [&str; 11] = [
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
];
/// Id of `<|pad|>`.
#[cfg_attr(not(test), allow(dead_code))]
pub const PAD: u32 = 0;
/// Id of `<|endoftext|>`.
#[cfg_attr(not(test), allow(dead_code))]
pub const EOS: u32 = 1;
/// Id of `<|im_start|>`, which opens a chat turn.
#[cfg_attr(not(test), allow(dead_code))]
pub const IM_START: u32 = 2;
/// Id of `<|im_end|>`, which closes a chat turn (the answer's stop token).
pub const IM_END: u32 = 3;
/// Id of `<|AUDIO|>`, one per audio-tower output row once expanded.
pub const AUDIO: u32 = 4;
/// Id of `<|audio_bos|>`.
pub const AUDIO_BOS: u32 = 5;
/// Id of `<|audio_eos|>`.
pub const AUDIO_EOS: u32 = 6;
/// Id of `<|IMAGE|>`.
pub const IMAGE: u32 = 7;
/// Id of `<|VIDEO|>`, one per merged vision-tower output row once expanded.
pub const VIDEO: u32 = 8;
/// Id of `<|vision_bos|>`.
pub const VISION_BOS: u32 = 9;
/// Id of `<|vision_eos|>`.
pub const VISION_EOS: u32 = 10;

/// Trains a byte-level BPE tokenizer of at most `vocab_size` entries on `texts`.
pub fn train(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    tk.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let tokenizer = Tokenizer::from(tk);
    for (i, s) in SPECIALS.iter().enumerate() {
        if tokenizer.token_to_id(s) != Some(i as u32) {
            return Err(anyhow!("tokenizer: special token {s} did not get id {i}"));
        }
    }
    Ok(tokenizer)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tk: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tk
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?
        .get_ids()
        .to_vec())
}

/// Text of `ids`, special tokens skipped.
pub fn decode(tk: &Tokenizer, ids: &[u32]) -> Result<String> {
    tk.decode(ids, true)
        .map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
}

/// Saves as `tokenizer.json`.
pub fn save(tk: &Tokenizer, path: &Path) -> Result<()> {
    let json = tk
        .to_string(true)
        .map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
    omniopsd_checkpoint::atomic::write_atomic(path, json.as_bytes())
        .with_context(|| format!("saving {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts() -> Vec<String> {
        (0..50)
            .map(|i| format!("emotion: angry; sentiment: negative; open: angry, annoyed {i}"))
            .chain((0..50).map(|i| format!("subtitle: I'm fine, really, number {i}.")))
            .collect()
    }

    #[test]
    fn trained_tokenizer_round_trips_and_is_deterministic() {
        let a = train(&texts(), 300).unwrap();
        let b = train(&texts(), 300).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert!(a.get_vocab_size(true) <= 300);
        let text = "emotion: sad; open: lonely, hurt";
        let ids = encode(&a, text).unwrap();
        assert_eq!(decode(&a, &ids).unwrap(), text);
        let ids = encode(&a, "<|AUDIO|> x").unwrap();
        assert_eq!(ids[0], AUDIO, "media placeholder is one special token");
    }

    #[test]
    fn specials_get_their_fixed_ids_and_stay_whole_inside_text() {
        let tk = train(&texts(), 300).unwrap();
        let ids = [
            PAD, EOS, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS, IMAGE, VIDEO, VISION_BOS,
            VISION_EOS,
        ];
        for (s, id) in SPECIALS.iter().zip(ids) {
            assert_eq!(tk.token_to_id(s), Some(id), "{s}");
        }
        let ids = encode(
            &tk,
            "<|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|>hi<|im_end|>",
        )
        .unwrap();
        assert_eq!(ids[0], IM_START);
        assert_eq!(ids.last(), Some(&IM_END));
        let pos = ids.iter().position(|&t| t == VISION_BOS).unwrap();
        assert_eq!(ids[pos..pos + 3], [VISION_BOS, VIDEO, VISION_EOS]);
        assert_eq!(
            decode(&tk, &ids).unwrap(),
            "user\nhi",
            "specials are skipped on decode"
        );
    }
}
