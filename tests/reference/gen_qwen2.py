"""Reference fixtures for the Qwen2 text decoder (models/decoder, issue 6).

Everything is built from configs (no hub access) and is deterministic:

* a byte-level BPE tokenizer trained here on the English text below (Qwen2's pre-tokenizer
  regex, NFC, byte-level decoding), 400 tokens including `<|endoftext|>`, `<|im_start|>` and
  `<|im_end|>`, saved as a `Qwen2Tokenizer` (tokenizer.json + tokenizer_config.json with a
  Qwen2-style chat template) into both model directories;
* model A, tests/reference/qwen2_tiny/: `Qwen2ForCausalLM`, vocab_size 448 (the tokenizer's 400
  rounded up to a multiple of 64, so the embedding has rows no token uses), hidden 64,
  intermediate 160, 3 layers, 4 heads, 2 KV heads (GQA), untied LM head, saved in f32;
* model B, tests/reference/qwen2_tiny_tied_bf16/: tied embeddings, 2 layers, 4 heads, 4 KV
  heads (plain multi-head), saved in bfloat16 in several shards with
  model.safetensors.index.json;
* tests/reference/qwen2_ref.safetensors with, for each model (prefix `a.` / `b.`):
  - `prompt{0,1}.ids` [T] (prompt 0 plain text, ~10 tokens; prompt 1 rendered with the chat
    template, ~25 tokens) and `prompt{0,1}.logits` [T, V] of a no-cache forward;
  - `batch.ids` [2, T] (two different equal-length texts) and `batch.logits` [2, T, V];
  - `gen{0,1}` [64]: greedy `generate` of exactly 64 new tokens after prompt 0 / 1
    (do_sample=False, min_new_tokens=max_new_tokens=64); use_cache=True and use_cache=False
    are asserted equal here, and equal to a plain argmax loop (so the end-of-text token never
    wins a step and the min-length processor changes nothing: a Rust loop without stop
    tokens must reproduce them);
  - `gen{0,1}.min_gap` [1]: the smallest top-1 minus top-2 logit gap along the greedy path (how
    much numeric slack the Rust argmax has);
  - `score.prompt_ids` [P], `score.response_ids` [R], `score.logprobs` [R]: the log-probability
    of each response token after the prompt, `log_softmax(logits[P - 1 + r])[response[r]]`;
  - model A only: `pos.ids` [T], `pos.position_ids` [T] (0..T/2, then a jump of +7) and
    `pos.logits` [T, V] of a forward with those explicit position ids.
  Every tensor is stored as f32 (ids too) so one reader serves all.
* tests/reference/qwen2_prompts.json: the prompt texts (prompt 1 as rendered by the chat
  template) and their ids, to check the Rust tokenizer encodes them the same way.

All references are computed in f32 with eager attention. Model B is loaded from its bf16 files
with `dtype=torch.float32`, i.e. every bf16 weight is upcast exactly to f32 and all arithmetic
is f32; the Rust side must read the bf16 weights the same way (exact bf16 -> f32 widening).

Run from the repository root, with a Python that has torch, transformers, safetensors and
tokenizers (tests/reference/README.md: how to make one): python3 tests/reference/gen_qwen2.py
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DIR_A = os.path.join(HERE, "qwen2_tiny")
DIR_B = os.path.join(HERE, "qwen2_tiny_tied_bf16")
OUT_REF = os.path.join(HERE, "qwen2_ref.safetensors")
OUT_PROMPTS = os.path.join(HERE, "qwen2_prompts.json")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 400
MODEL_VOCAB = (TOKENIZER_VOCAB + 63) // 64 * 64
NEW_TOKENS = 64
# Smallest accepted top-1/top-2 logit gap on the greedy paths (logits are of order 5).
MIN_GAP = 2e-3

# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-Instruct's chat template, minus tool calls.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """
She smiled when the letter arrived, and her eyes were bright with joy.
He felt angry and frustrated after waiting for hours in the rain.
The child was scared of the dark and cried for his mother.
They were surprised to see so many friends at the party.
I am so happy today, everything feels wonderful and calm.
The old man looked sad and lonely as he walked along the empty road.
Her voice was trembling; she was afraid that something terrible had happened.
We laughed together and the room was full of warmth and happiness.
His face turned red with anger when he heard the news.
The students were nervous before the exam, but relieved afterwards.
What a pleasant surprise! I did not expect you to come.
The film was so moving that many people in the audience wept quietly.
He shouted at the referee, furious about the unfair decision.
She sighed, tired and disappointed, and closed the door behind her.
The baby giggled and clapped her hands with delight.
I feel nothing at all; it is just an ordinary, neutral day.
The speaker stayed neutral, calm and quiet, showing no strong emotion.
Fear gripped them as the storm grew louder and the lights went out.
My heart is heavy with sorrow since my best friend moved away.
Disgust showed on his face when he tasted the spoiled milk.
They were excited and cheerful, singing songs on the long drive home.
The manager sounded worried about the results of the meeting.
Please describe the emotion of the person in the video and explain why.
The person in the video frowns, speaks slowly and looks down: the emotion is sadness.
The woman raises her voice and clenches her fists, so the emotion is anger.
The man laughs loudly and his tone is bright, so he is happy.
Subtitle: I cannot believe you did this to me! Emotion: anger.
Subtitle: Thank you so much, this means a lot to me. Emotion: happiness.
Subtitle: Oh no, what was that noise? Emotion: fear.
Subtitle: Wow, I never thought I would win! Emotion: surprise.
Subtitle: Fine. Whatever. It does not matter anymore. Emotion: sadness.
The answer is happy. The answer is sad. The answer is angry. The answer is neutral.
Reasoning: the voice is soft and shaking, the face is pale, the words speak of loss.
"""

# Chat turns as the template renders them (role names on their own line), repeated so that
# the role names become single tokens as in Qwen's vocabulary.
DIALOGUE = """
system
You are a helpful assistant.
user
What emotion does the speaker show?
assistant
The speaker shows surprise.
system
Be brief.
user
Is the man angry or sad?
assistant
He is angry.
user
What emotion is this?
assistant
This is happiness.
"""

PROMPT0 = "The woman looked happy."
PROMPT1_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Oh no! What emotion is this?"},
]
BATCH_TEXTS = [
    "He felt angry and frustrated after waiting in the rain.",
    "Subtitle: Thank you so much, this means a lot to me. Emotion:",
]
SCORE_PROMPT_MESSAGES = [
    {"role": "user", "content": "Describe the emotion of the speaker."},
]
SCORE_RESPONSE = "The voice is soft and shaking: the emotion is sadness.<|im_end|>"


def train_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS + DIALOGUE * 6
    tok.train_from_iterator([line for line in text.splitlines() if line], trainer=trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    assert len(vocab) == TOKENIZER_VOCAB, len(vocab)
    hf = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    assert len(hf) == TOKENIZER_VOCAB, len(hf)
    for s in SPECIALS:
        assert hf.convert_tokens_to_ids(s) == vocab[s], s
    return hf


def perturb_(model, generator):
    """Moves RMSNorm weights off 1 and biases off 0, so a loader that drops them fails."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=generator))


def make_config(**kw):
    common = dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # Wider than HF's 0.02 so logits are spread and greedy argmax has clear winners.
        initializer_range=0.15,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(kw)
    return Qwen2Config(**common)


def greedy_reference(model, ids):
    """Greedy 64 tokens three ways (generate with/without cache, plain argmax loop); asserts
    they agree and returns the tokens and the smallest top-1/top-2 logit gap."""
    x = torch.tensor([ids])
    outs = []
    for use_cache in (True, False):
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            use_cache=use_cache,
            pad_token_id=0,
        )
        outs.append(out[0, len(ids):].tolist())
    assert outs[0] == outs[1], "generate differs with and without the cache"
    seq = list(ids)
    gaps = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            seq.append(int(torch.argmax(logits)))
    assert seq[len(ids):] == outs[0], "generate differs from a plain argmax loop"
    assert len(outs[0]) == NEW_TOKENS
    return outs[0], min(gaps)


def chat_prompt(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def references(model, tok, prefix, with_positions):
    out = {}
    prompts = {}
    p0 = tok(PROMPT0)["input_ids"]
    text1 = chat_prompt(tok, PROMPT1_MESSAGES)
    p1 = tok(text1)["input_ids"]
    prompts["prompt0"] = {"text": PROMPT0, "ids": p0}
    prompts["prompt1"] = {"text": text1, "ids": p1}
    with torch.no_grad():
        for name, ids in (("prompt0", p0), ("prompt1", p1)):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0]
            out[f"{prefix}{name}.ids"] = torch.tensor(ids, dtype=torch.float32)
            out[f"{prefix}{name}.logits"] = logits.float()

        b = [tok(t)["input_ids"] for t in BATCH_TEXTS]
        t = min(len(r) for r in b)
        batch = torch.tensor([r[:t] for r in b])
        logits = model(batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
        # Each row on its own must give the same logits: equal lengths, no padding.
        for i in range(2):
            alone = model(batch[i : i + 1], use_cache=False).logits[0]
            assert torch.allclose(alone, logits[i], atol=1e-5)
        out[f"{prefix}batch.ids"] = batch.float()
        out[f"{prefix}batch.logits"] = logits.float()

        score_text = chat_prompt(tok, SCORE_PROMPT_MESSAGES)
        sp = tok(score_text)["input_ids"]
        sr = tok(SCORE_RESPONSE)["input_ids"]
        prompts["score_prompt"] = {"text": score_text, "ids": sp}
        prompts["score_response"] = {"text": SCORE_RESPONSE, "ids": sr}
        logits = model(torch.tensor([sp + sr]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits[len(sp) - 1 : len(sp) - 1 + len(sr)], dim=-1)
        picked = logp[torch.arange(len(sr)), torch.tensor(sr)]
        out[f"{prefix}score.prompt_ids"] = torch.tensor(sp, dtype=torch.float32)
        out[f"{prefix}score.response_ids"] = torch.tensor(sr, dtype=torch.float32)
        out[f"{prefix}score.logprobs"] = picked.float()

        if with_positions:
            ids = p1
            n = len(ids)
            pos = list(range(n // 2)) + [i + 7 for i in range(n // 2, n)]
            x = torch.tensor([ids])
            # An explicit all-ones mask: without one, transformers reads a jump in
            # position_ids as the start of a packed sequence and masks across it.
            logits = model(
                x,
                attention_mask=torch.ones_like(x),
                position_ids=torch.tensor([pos]),
                use_cache=False,
            ).logits[0]
            plain = model(x, use_cache=False).logits[0]
            # The first half must not move (causal), the second half must.
            assert torch.allclose(logits[: n // 2], plain[: n // 2], atol=1e-5)
            assert (logits[n // 2 :] - plain[n // 2 :]).abs().max() > 1e-2
            out[f"{prefix}pos.ids"] = torch.tensor(ids, dtype=torch.float32)
            out[f"{prefix}pos.position_ids"] = torch.tensor(pos, dtype=torch.float32)
            out[f"{prefix}pos.logits"] = logits.float()

    for name, ids in (("gen0", p0), ("gen1", p1)):
        tokens, gap = greedy_reference(model, ids)
        out[f"{prefix}{name}"] = torch.tensor(tokens, dtype=torch.float32)
        out[f"{prefix}{name}.min_gap"] = torch.tensor([gap], dtype=torch.float32)
        print(f"{prefix}{name}: min top-1/top-2 gap {gap:.4g}, tokens {tokens[:12]}...")
    return out, prompts


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def build(config, seed, out_dir, tok, bf16):
    """Random-inits a model from `seed`, perturbs it, saves it (bf16 in 100 KB shards, or f32
    in one file) with the tokenizer, and reloads it in f32 as a user would (bf16 widened)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1000)
    model = Qwen2ForCausalLM(config).float().eval()
    perturb_(model, g)
    fresh_dir(out_dir)
    if bf16:
        model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size="100KB")
        assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
    else:
        model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Qwen2ForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def min_greedy_gap(model, prompts):
    """The smallest top-1 minus top-2 logit gap along the greedy paths of `prompts`."""
    gaps = []
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            for _ in range(NEW_TOKENS):
                logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                top = torch.topk(logits, 2).values
                gaps.append(float(top[0] - top[1]))
                seq.append(int(torch.argmax(logits)))
    return min(gaps)


def build_with_clear_greedy_path(config, out_dir, tok, bf16):
    """The first seed (from 0) whose greedy paths never have two logits within MIN_GAP of
    each other: f32 rounding differences (~1e-6 relative) must not flip an argmax, or the
    Rust generation test would test luck instead of the model."""
    prompts = [tok(PROMPT0)["input_ids"], tok(chat_prompt(tok, PROMPT1_MESSAGES))["input_ids"]]
    for seed in range(100):
        model = build(config, seed, out_dir, tok, bf16)
        gap = min_greedy_gap(model, prompts)
        if gap >= MIN_GAP:
            print(f"{os.path.basename(out_dir)}: seed {seed}, min greedy gap {gap:.4g}")
            return model
    raise RuntimeError("no seed below 100 gives a clear greedy path")


def main():
    tok = train_tokenizer()
    config_a = make_config(
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    ref_a = build_with_clear_greedy_path(config_a, DIR_A, tok, bf16=False)
    config_b = make_config(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    ref_b = build_with_clear_greedy_path(config_b, DIR_B, tok, bf16=True)
    assert torch.equal(ref_b.lm_head.weight, ref_b.model.embed_tokens.weight)

    tensors = {}
    out_a, prompts = references(ref_a, tok, "a.", with_positions=True)
    out_b, _ = references(ref_b, tok, "b.", with_positions=False)
    tensors.update(out_a)
    tensors.update(out_b)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, OUT_REF)
    with open(OUT_PROMPTS, "w") as f:
        json.dump(prompts, f, indent=1)
        f.write("\n")

    for root in (HERE, DIR_A, DIR_B):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isfile(path) and (root != HERE or "qwen2" in name):
                size = os.path.getsize(path)
                assert size < 1_000_000, f"{path} is {size} bytes"
                print(f"{size:>8}  {os.path.relpath(path, HERE)}")


if __name__ == "__main__":
    main()
