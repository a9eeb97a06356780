//! The decoder as the core's [`PolicyModel`]: prompts are token ids, optionally with rows of
//! input embeddings (media features) replacing placeholder tokens and explicit M-RoPE
//! positions, which is how the thinker hands an omni-modal prompt to the decoder.

use std::path::Path;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use omniopsd_core::PolicyModel;

use crate::{Error, KvCache, Qwen2Model};

/// M-RoPE position rows of a prompt (temporal, height, width) and the offset of generated
/// tokens: the token at sequence index `i ≥ P` gets position `i + delta` in all rows.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptPositions {
    pub rows: [Vec<i64>; 3],
    pub delta: i64,
}

/// Rows of input embeddings that replace the token embeddings at `slots` (row `k` of
/// `rows`, `[slots.len(), width]` row-major, goes to position `slots[k]`).
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingInserts {
    pub slots: Vec<usize>,
    pub rows: Vec<f32>,
    pub width: usize,
}

/// A prompt: backend-independent, so the autodiff student and the inner-backend teacher
/// share it.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenPrompt {
    pub ids: Vec<u32>,
    /// `None`: positions `0..P` and generated tokens continue at `P`.
    pub positions: Option<PromptPositions>,
    pub inserts: Option<EmbeddingInserts>,
}

impl TokenPrompt {
    /// A text prompt.
    pub fn new(ids: Vec<u32>) -> Self {
        Self {
            ids,
            positions: None,
            inserts: None,
        }
    }

    fn delta(&self) -> i64 {
        self.positions.as_ref().map_or(0, |p| p.delta)
    }

    /// Position rows of the prompt followed by `extra` generated tokens. Saturating: a
    /// media item's time base comes from its file, so the rows can hold any id, and
    /// [`Qwen2Model::check_length`] is what refuses ids past the model's range.
    fn position_rows(&self, extra: usize) -> [Vec<i64>; 3] {
        let p = self.ids.len();
        let tail = (p..p.saturating_add(extra)).map(|i| (i as i64).saturating_add(self.delta()));
        match &self.positions {
            Some(pos) => std::array::from_fn(|k| {
                let mut row = pos.rows[k].clone();
                row.extend(tail.clone());
                row
            }),
            None => std::array::from_fn(|_| (0..(p + extra) as i64).collect()),
        }
    }
}

/// Decoding state: the KV cache, the next sequence index and the position offset.
#[derive(Clone, Debug)]
pub struct DecoderCache<B: Backend> {
    pub kv: KvCache<B>,
    next: usize,
    delta: i64,
}

/// `[3, n, T]` position ids, the same rows for each of the `n` sequences.
fn positions_tensor<B: Backend>(
    rows: &[Vec<i64>; 3],
    n: usize,
    device: &B::Device,
) -> Tensor<B, 3, Int> {
    let t = rows[0].len();
    let data: Vec<i64> = rows
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.iter().copied(), n).flatten())
        .collect();
    Tensor::from_data(TensorData::new(data, [3, n, t]), device)
}

fn int_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

impl<B: Backend> Qwen2Model<B> {
    fn device(&self) -> B::Device {
        self.lm_head_weight().device()
    }

    /// Checks that `prompt` fits the model: ids inside the vocabulary, non-empty, position
    /// rows and inserted rows of the right sizes. Call it once before rolling out.
    pub fn check_prompt(&self, prompt: &TokenPrompt) -> Result<(), Error> {
        let vocab = self.config().vocab_size;
        let err = |reason: String| Err(Error::Prompt { reason });
        let p = prompt.ids.len();
        if p == 0 {
            return err("no tokens".into());
        }
        if let Some((i, id)) = prompt
            .ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return err(format!(
                "token {i} is {id}, outside the vocabulary of {vocab}"
            ));
        }
        if let Some(pos) = &prompt.positions {
            if let Some(k) = (0..3).find(|&k| pos.rows[k].len() != p) {
                return err(format!(
                    "position row {k} has {} entries for {p} tokens",
                    pos.rows[k].len()
                ));
            }
        }
        if let Some(ins) = &prompt.inserts {
            let h = self.config().hidden_size;
            if ins.width != h || ins.rows.len() != ins.slots.len() * h {
                return err(format!(
                    "{} inserted values of width {} for {} slots; expected width {h}",
                    ins.rows.len(),
                    ins.width,
                    ins.slots.len()
                ));
            }
            if let Some(&s) = ins.slots.iter().find(|&&s| s >= p) {
                return err(format!("insert slot {s} is past the {p} prompt tokens"));
            }
        }
        self.check_length(prompt, 0)
    }

    /// Checks that `prompt` followed by `extra` more tokens stays inside the model's
    /// `max_position_embeddings`: the largest position id (text: `P + extra − 1`; with media,
    /// the TMRoPE position, which can be smaller than the token count) must be below it.
    pub fn check_length(&self, prompt: &TokenPrompt, extra: usize) -> Result<(), Error> {
        let limit = self.config().max_position_embeddings;
        let p = prompt.ids.len();
        // Computed, not materialized: `extra` may be a user's `--max-new-tokens`.
        let prompt_last = match &prompt.positions {
            Some(pos) => pos
                .rows
                .iter()
                .filter_map(|r| r.iter().copied().max())
                .max(),
            None => p.checked_sub(1).map(|i| i as i64),
        };
        let tail_last = (extra > 0).then(|| {
            let index = i64::try_from(p.saturating_add(extra - 1)).unwrap_or(i64::MAX);
            index.saturating_add(prompt.delta())
        });
        let last = prompt_last.into_iter().chain(tail_last).max().unwrap_or(0);
        if last >= i64::try_from(limit).unwrap_or(i64::MAX) {
            let what = if extra == 0 {
                format!("{p} tokens")
            } else {
                format!("{p} tokens + {extra} more")
            };
            return Err(Error::Prompt {
                reason: format!(
                    "{what} reach position {last}, past the model's max_position_embeddings of \
                     {limit} (config.json); shorten the input"
                ),
            });
        }
        Ok(())
    }

    /// Input embeddings of the prompt, `[1, P, H]`, inserted rows in place.
    fn prompt_embeds(&self, prompt: &TokenPrompt) -> Tensor<B, 3> {
        let device = self.device();
        let p = prompt.ids.len();
        let text = self.embed(int_tensor::<B>(&prompt.ids, &device));
        let Some(ins) = &prompt.inserts else {
            return text;
        };
        let h = text.dims()[2];
        let m = ins.slots.len();
        let media = Tensor::<B, 2>::from_data(TensorData::new(ins.rows.clone(), [m, h]), &device);
        let mut index: Vec<i64> = (0..p as i64).collect();
        for (k, &slot) in ins.slots.iter().enumerate() {
            index[slot] = (p + k) as i64;
        }
        Tensor::cat(vec![text.reshape([p, h]), media], 0)
            .select(0, Tensor::from_data(TensorData::new(index, [p]), &device))
            .reshape([1, p, h])
    }

    /// Final hidden states `[1, P, H]` of a prompt, no cache.
    pub fn forward_prompt(&self, prompt: &TokenPrompt) -> Tensor<B, 3> {
        let pos = positions_tensor::<B>(&prompt.position_rows(0), 1, &self.device());
        self.forward_embeds(self.prompt_embeds(prompt), pos, None)
    }

    /// Greedy decoding of up to `max_new_tokens` after `prompt` (argmax, first index on
    /// ties, as transformers' `generate` with `do_sample=False`); stops after a `stop`
    /// token. With `use_cache` false every step re-runs the whole sequence.
    pub fn generate_greedy(
        &self,
        prompt: &TokenPrompt,
        max_new_tokens: usize,
        use_cache: bool,
        stop: &[u32],
    ) -> Result<Vec<u32>, Error> {
        if use_cache {
            let mut out =
                self.generate_batch(&[prompt], max_new_tokens, stop, |_, _, logits: &[f32]| {
                    Ok::<_, Error>(argmax_first(logits))
                })?;
            return Ok(out.swap_remove(0));
        }
        self.check_prompt(prompt)?;
        let device = self.device();
        // Not preallocated: `max_new_tokens` is a caller's bound (often a flag), not a size.
        let mut out = Vec::new();
        while out.len() < max_new_tokens {
            let hidden = if out.is_empty() {
                PolicyModel::prefill(self, prompt, 1).0
            } else {
                // The state after the whole sequence: one uncached pass over prompt ++ out.
                let r = out.len();
                let embeds = Tensor::cat(
                    vec![
                        self.prompt_embeds(prompt),
                        self.embed(int_tensor::<B>(&out, &device)),
                    ],
                    1,
                );
                let pos = positions_tensor::<B>(&prompt.position_rows(r), 1, &device);
                let hidden = self.forward_embeds(embeds, pos, None);
                let width = hidden.dims()[2];
                hidden
                    .narrow(1, prompt.ids.len() + r - 1, 1)
                    .reshape([1, width])
            };
            let next = argmax_first(&read_logits(self.step_logits(hidden))?);
            out.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }

    /// Decodes up to `max_new_tokens` after each of `prompts` in one batch: each prompt
    /// prefilled, their caches left-padded to the longest, then one decode step per token for
    /// every unfinished sequence together (a sequence is finished after a `stop` token and
    /// leaves the batch). `pick(sequence, position, logits)` chooses each token from that
    /// sequence's next-token logits `[V]` (argmax for greedy, a draw for sampling). Each
    /// sequence gets the tokens it would get decoded alone, up to f32 rounding in the
    /// batched products (the padding itself contributes exact zeros).
    pub fn generate_batch<E: From<Error>>(
        &self,
        prompts: &[&TokenPrompt],
        max_new_tokens: usize,
        stop: &[u32],
        mut pick: impl FnMut(usize, usize, &[f32]) -> Result<u32, E>,
    ) -> Result<Vec<Vec<u32>>, E> {
        for p in prompts {
            self.check_prompt(p)?;
        }
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        if prompts.is_empty() || max_new_tokens == 0 {
            return Ok(out);
        }
        let device = self.device();
        let (mut hidden, mut cache) = self.prefill_batch(prompts);
        // The prompt index of each row of the batch.
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        for position in 0..max_new_tokens {
            let logits = read_logits(self.step_logits(hidden))?;
            let vocab = logits.len() / active.len().max(1);
            let mut keep = Vec::with_capacity(active.len());
            let mut next = Vec::with_capacity(active.len());
            for (row, &seq) in active.iter().enumerate() {
                let token = pick(seq, position, &logits[row * vocab..(row + 1) * vocab])?;
                out[seq].push(token);
                if !stop.contains(&token) {
                    keep.push(row);
                    next.push(i64::from(token));
                }
            }
            if keep.is_empty() || position + 1 == max_new_tokens {
                break;
            }
            if keep.len() < active.len() {
                cache = cache.select_rows(&keep);
                active = keep.iter().map(|&r| active[r]).collect();
            }
            let n = next.len();
            let tokens = Tensor::from_data(TensorData::new(next, [n]), &device);
            hidden = self.decode_batch(tokens, &mut cache);
        }
        Ok(out)
    }

    /// Prefills each of `prompts` on its own (no compute spent on padding, and each row's
    /// state exactly the one [`PolicyModel::prefill`] gives it) and stacks the caches
    /// left-padded to the longest for batched decoding: the last prompt position's hidden
    /// state of each, `[n, H]`, and the cache to decode from.
    pub fn prefill_batch(&self, prompts: &[&TokenPrompt]) -> (Tensor<B, 2>, BatchCache<B>) {
        let len = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let mut last = Vec::with_capacity(prompts.len());
        let mut caches = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let (h, cache) = PolicyModel::prefill(self, *prompt, 1);
            last.push(h);
            caches.push(cache.kv);
        }
        let cache = BatchCache {
            kv: KvCache::stack_left_padded(caches),
            pads: prompts.iter().map(|p| len - p.ids.len()).collect(),
            next: prompts
                .iter()
                .map(|p| (p.ids.len() as i64).saturating_add(p.delta()))
                .collect(),
        };
        (Tensor::cat(last, 0), cache)
    }

    /// One decode step of a [`Self::prefill_batch`] batch: `tokens: [n]`, one per sequence
    /// still in the batch; returns their hidden states `[n, H]`.
    pub fn decode_batch(
        &self,
        tokens: Tensor<B, 1, Int>,
        cache: &mut BatchCache<B>,
    ) -> Tensor<B, 2> {
        let n = tokens.dims()[0];
        let device = tokens.device();
        let embeds = self.embed(tokens.reshape([n, 1]));
        let data: Vec<i64> = (0..3).flat_map(|_| cache.next.iter().copied()).collect();
        let pos = Tensor::from_data(TensorData::new(data, [3, n, 1]), &device);
        let hidden = self.forward_padded(embeds, pos, Some(&mut cache.kv), &cache.pads);
        for p in &mut cache.next {
            *p = p.saturating_add(1);
        }
        let h = hidden.dims()[2];
        hidden.reshape([n, h])
    }
}

/// Decoding state of prompts decoded together ([`Qwen2Model::prefill_batch`]): the KV cache,
/// each sequence's left padding and the position id of its next token.
#[derive(Clone, Debug)]
pub struct BatchCache<B: Backend> {
    pub kv: KvCache<B>,
    pads: Vec<usize>,
    next: Vec<i64>,
}

impl<B: Backend> BatchCache<B> {
    /// Keeps the sequences `rows` (batch indices, in that order).
    fn select_rows(self, rows: &[usize]) -> Self {
        Self {
            kv: self.kv.select_rows(rows),
            pads: rows.iter().map(|&r| self.pads[r]).collect(),
            next: rows.iter().map(|&r| self.next[r]).collect(),
        }
    }
}

/// The values of a logits tensor as f32.
fn read_logits<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<f32>, Error> {
    logits
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| Error::Prompt {
            reason: format!("reading logits: {e:?}"),
        })
}

/// Index of the largest value, the first on ties (NaN never wins).
pub fn argmax_first(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

impl<B: Backend> PolicyModel<B> for Qwen2Model<B> {
    type Prompt = TokenPrompt;
    type Cache = DecoderCache<B>;

    /// The prompt runs once, as a batch of one, and its keys and values are repeated for the
    /// `n` sequences: every sequence shares it, so there is nothing to gain from `n` copies of
    /// the same forward (the prompt is most of the tokens of an omni-modal episode).
    fn prefill(&self, prompt: &TokenPrompt, n: usize) -> (Tensor<B, 2>, DecoderCache<B>) {
        let device = self.device();
        let p = prompt.ids.len();
        let mut kv = KvCache::new();
        let pos = positions_tensor::<B>(&prompt.position_rows(0), 1, &device);
        let hidden = self.forward_embeds(self.prompt_embeds(prompt), pos, Some(&mut kv));
        let h = hidden.dims()[2];
        let last = hidden.narrow(1, p - 1, 1).reshape([1, h]).repeat_dim(0, n);
        let cache = DecoderCache {
            kv: kv.repeat(n),
            next: p,
            delta: prompt.delta(),
        };
        (last, cache)
    }

    fn decode(&self, tokens: Tensor<B, 1, Int>, cache: &mut DecoderCache<B>) -> Tensor<B, 2> {
        let n = tokens.dims()[0];
        let device = tokens.device();
        let embeds = self.embed(tokens.reshape([n, 1]));
        let pos = cache.next as i64 + cache.delta;
        let pos = Tensor::from_data(TensorData::new(vec![pos; 3 * n], [3, n, 1]), &device);
        let hidden = self.forward_embeds(embeds, pos, Some(&mut cache.kv));
        cache.next += 1;
        let h = hidden.dims()[2];
        hidden.reshape([n, h])
    }

    /// The shared prompt once (see [`PolicyModel::prefill`]), then `response[..r-1]` for the
    /// `n` sequences against its cached keys and values: the same states as one causal pass
    /// over each `prompt ++ response`, and gradients reach the prompt through the cache.
    fn response_hidden(&self, prompt: &TokenPrompt, response: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n, r] = response.dims();
        let device = response.device();
        let (last, mut cache) = PolicyModel::prefill(self, prompt, n);
        let h = last.dims()[1];
        let first = last.reshape([n, 1, h]);
        if r == 1 {
            return first;
        }
        let p = prompt.ids.len();
        let tail = prompt.position_rows(r - 1).map(|row| row[p..].to_vec());
        let pos = positions_tensor::<B>(&tail, n, &device);
        let embeds = self.embed(response.narrow(1, 0, r - 1));
        let rest = self.forward_embeds(embeds, pos, Some(&mut cache.kv));
        Tensor::cat(vec![first, rest], 1)
    }

    fn lm_head(&self) -> Tensor<B, 2> {
        self.lm_head_weight()
    }

    /// The head is a parameter (or the tied embedding), so it takes a gradient exactly when it
    /// requires one: not under LoRA, whose base is frozen.
    fn lm_head_trainable(&self) -> bool {
        self.lm_head_weight().is_require_grad()
    }

    fn step_logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        Qwen2Model::step_logits(self, hidden)
    }
}

/// Reads a `tokenizer.json` with the `tokenizers` library. That library panics on some
/// malformed files (a `decoder` of no known kind, found by fuzzing: `expect("Helper")` in its
/// deserializer); such a panic is caught here and becomes [`Error::Tokenizer`] naming the
/// file, like any other unreadable tokenizer.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, Error> {
    let error = |reason: String| Error::Tokenizer {
        file: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes)) {
        Ok(Ok(tokenizer)) => Ok(tokenizer),
        Ok(Err(e)) => Err(error(e.to_string())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(error(format!(
                "not a tokenizer the tokenizers library can read (it failed inside: {what})"
            )))
        }
    }
}

/// Reads `tokenizer.json` and checks every id it can produce has an embedding row
/// (`vocab_size` rows; HF pads the embedding above the tokenizer's size, never below). The
/// largest id decides, not the token count: added tokens may sit at any id.
pub fn check_tokenizer(path: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer, Error> {
    let tokenizer = load_tokenizer(path)?;
    let size = tokenizer
        .get_vocab(true)
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(tokenizer.get_vocab_size(true));
    if size > vocab_size {
        return Err(Error::TokenizerVocab {
            file: path.to_path_buf(),
            tokenizer: size,
            embedding: vocab_size,
        });
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::argmax_first;

    /// The `tokenizers` library panics (`expect("Helper")`) on a `decoder` whose JSON breaks
    /// inside (a raw control character in a key: the fuzzer's find); that is an error here.
    #[test]
    fn a_tokenizer_the_library_panics_on_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("omniopsd-tk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let text = "{\"version\":\"1.0\",\"truncation\":null,\"padding\":null,\"added_tokens\":[],\
                    \"normalizer\":null,\"pre_tokenizer\":null,\"post_processor\":null,\
                    \"decoder\":{\"type\":\"ByteLevel\",\"use_regex\u{1b}\":true},\
                    \"model\":{\"type\":\"WordLevel\",\"vocab\":{\"a\":0},\"unk_token\":\"a\"}}";
        std::fs::write(&path, text).unwrap();
        let result = super::load_tokenizer(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        match result {
            Err(crate::Error::Tokenizer { file, reason }) => {
                assert_eq!(file, path);
                assert!(reason.contains("failed inside"), "{reason}");
            }
            other => panic!("expected a tokenizer error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax_first(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(argmax_first(&[f32::NAN, 1.0]), 1);
    }
}
