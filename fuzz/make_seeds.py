#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/seeds/<target>/ (standard library only;
the outputs are committed, so fuzzing needs no Python). Run from anywhere:
    python3 fuzz/make_seeds.py
Each seed is a small valid input, so mutations start deep inside the readers."""
import json
import struct
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "seeds"


def write(target, name, data):
    out = SEEDS / target
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors):
    """tensors: {name: (shape, [floats])} as F32."""
    header, blob = {}, b""
    for name, (shape, values) in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob


def tiny_qwen2(hidden=8, inter=16, vocab=16, heads=2, kv=1, tie=False):
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie,
        "eos_token_id": 2, "hidden_act": "silu",
    }
    d = hidden // heads

    def t(*shape):
        n = 1
        for s in shape:
            n *= s
        return (list(shape), [((i * 37) % 11 - 5) / 20 for i in range(n)])

    p = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": t(vocab, hidden),
        p + "input_layernorm.weight": t(hidden),
        p + "post_attention_layernorm.weight": t(hidden),
        p + "self_attn.q_proj.weight": t(heads * d, hidden), p + "self_attn.q_proj.bias": t(heads * d),
        p + "self_attn.k_proj.weight": t(kv * d, hidden), p + "self_attn.k_proj.bias": t(kv * d),
        p + "self_attn.v_proj.weight": t(kv * d, hidden), p + "self_attn.v_proj.bias": t(kv * d),
        p + "self_attn.o_proj.weight": t(hidden, heads * d),
        p + "mlp.gate_proj.weight": t(inter, hidden), p + "mlp.up_proj.weight": t(inter, hidden),
        p + "mlp.down_proj.weight": t(hidden, inter),
        "model.norm.weight": t(hidden),
    }
    if not tie:
        tensors["lm_head.weight"] = t(vocab, hidden)
    return json.dumps(config).encode(), tensors


def prefixed(data):
    return struct.pack("<H", len(data)) + data


def checkpoint_seeds():
    config, tensors = tiny_qwen2()
    weights = safetensors(tensors)
    write("checkpoint_open", "qwen2_single", b"\x00" + prefixed(config) + weights)
    shard = "model-00001-of-00001.safetensors"
    index = json.dumps({"metadata": {}, "weight_map": {k: shard for k in tensors}}).encode()
    write("checkpoint_open", "qwen2_indexed", b"\x01" + prefixed(config) + prefixed(index) + weights)
    config, tensors = tiny_qwen2(tie=True)
    write("checkpoint_open", "qwen2_tied", b"\x00" + prefixed(config) + safetensors(tensors))
    write("checkpoint_reader", "qwen2", weights)


def train_config_seeds():
    write("train_config", "empty", "")
    write("train_config", "sections", """name = "seed"
seeds = [0, 1]
methods = ["opsd", "label-sft"]
[data]
synth_n = 24
max_frames = 4
[model]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
intermediate_size = 64
[warmup]
steps = 2
[opsd]
steps = 3
batch_size = 2
grad_accumulation = 2
samples_per_prompt = 2
divergence = "jsd"
beta = 0.5
loss_top_k = 8
teacher = "ema"
lr_decay = "cosine"
[eval]
every = 2
[checkpoint]
every = 1
keep_last = 2
""")


def manifest_seeds():
    line = {"id": "s1", "split": "train", "audio": "a.wav", "video": "v", "subtitle": "I'm fine.",
            "rationale": "A trembling voice under a polite sentence.", "emotion": "sad",
            "sentiment": -1.5, "openset": ["sad", "tense"], "conflict": "masking"}
    other = dict(line, id="s2", split="heldout", emotion="happy", sentiment=2.0, openset=["joyful"])
    del other["conflict"]
    write("manifest_jsonl", "two", json.dumps(line) + "\n\n" + json.dumps(other) + "\n")


def wav(samples, rate=16000, bits=16, fmt=1):
    width = bits // 8
    data = b"".join(struct.pack("<h", s) if bits == 16 else struct.pack("<f", s) for s in samples)
    head = struct.pack("<4sI4s", b"RIFF", 36 + len(data), b"WAVE")
    head += struct.pack("<4sIHHIIHH", b"fmt ", 16, fmt, 1, rate, rate * width, width, bits)
    return head + struct.pack("<4sI", b"data", len(data)) + data


def png(width, height, color_type=2, channels=3):
    raw = b"".join(b"\x00" + bytes((x * 9 + y * 5) % 256 for x in range(width * channels)) for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def media_seeds():
    write("media", "pcm16", wav([(i * 97) % 2000 - 1000 for i in range(800)]))
    write("media", "float32", wav([((i * 13) % 100 - 50) / 100 for i in range(400)], bits=32, fmt=3))
    write("media", "rgb_png", png(6, 4))
    write("media", "gray_alpha_png", png(3, 3, color_type=4, channels=2))


def tokenizer_seeds():
    source = HERE.parent / "tests" / "reference" / "qwen2_tiny" / "tokenizer.json"
    write("tokenizer_json", "qwen2_tiny", source.read_bytes())


if __name__ == "__main__":
    checkpoint_seeds()
    train_config_seeds()
    manifest_seeds()
    media_seeds()
    tokenizer_seeds()
    for target in sorted(SEEDS.iterdir()):
        print(target.name, sorted(p.name for p in target.iterdir()))
