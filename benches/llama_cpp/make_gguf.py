#!/usr/bin/env python3
"""Random-weight GGUF files of our synthetic shapes for llama-bench (speed does not depend on values).

Every weight matrix, token_embd and output are Q4_0 (like `llama-quantize --pure Q4_0`); norms and
biases F32. Blocks hold random nibbles and an f16 scale of (0.5 + u) / sqrt(21.5 * cols), which
keeps activations of order one, as q4wgpu's synthetic models do. Layers share their numpy arrays,
so writing the 32B shape needs one layer's worth of memory.

The tokenizer is Qwen2's real one (tokens, types, merges), extracted once here from the GGUF the
project already has and carried as a small gzip'd JSON file, padded to the shape's vocabulary with
[PAD<i>] tokens as llama.cpp's converter pads it. Without that file a minimal byte-level BPE
vocabulary is made up; llama-bench only needs a vocabulary that loads.

Uses the gguf-py package vendored in the llama.cpp sources (.llama/llama.cpp/gguf-py).

  make_gguf.py --extract-tokenizer SRC.gguf --out .llama/qwen2-tokenizer.json.gz   (here)
  make_gguf.py --shape qwen2-32b --out /tmp/qwen2-32b-q4_0.gguf [--tokenizer FILE]  (device)
"""

import argparse
import gzip
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / ".llama" / "llama.cpp" / "gguf-py"))
try:
    import yaml  # noqa: F401  (gguf.metadata imports it; only model cards use it)
except ImportError:
    sys.modules["yaml"] = types.ModuleType("yaml")
import gguf  # noqa: E402

# Shapes (hidden, layers, ffn, heads, kv_heads, vocab, rms eps); the same as src/synthetic.rs.
# Qwen2 has q/k/v biases and RoPE base 1e6; the Llama shape neither biases nor Qwen2's vocabulary
# (it gets the minimal byte-level one) and RoPE base 5e5.
SHAPES = {
    "tiny": (256, 2, 512, 4, 2, 152064, 1e-6),
    "qwen2-0.5b": (896, 24, 4864, 14, 2, 151936, 1e-6),
    "qwen2-7b": (3584, 28, 18944, 28, 4, 152064, 1e-6),
    "qwen2-32b": (5120, 64, 27648, 40, 8, 152064, 1e-5),
    "llama-70b": (8192, 80, 28672, 64, 8, 128256, 1e-5),
}

Q4_0 = gguf.GGMLQuantizationType.Q4_0
BLOCK, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q4_0]  # 32 weights in 18 bytes: f16 scale, 16 nibble bytes


def random_q4_0(rng, rows, cols):
    """A [rows, cols] Q4_0 tensor as raw bytes, shape (rows, cols / 32 * 18)."""
    assert cols % BLOCK == 0, cols
    blocks = rng.integers(0, 256, size=(rows, cols // BLOCK, BLOCK_BYTES), dtype=np.uint8)
    base = 1.0 / math.sqrt(21.5 * cols)
    scales = (base * (0.5 + rng.random((rows, cols // BLOCK), dtype=np.float32))).astype(np.float16)
    blocks[:, :, :2] = scales.view(np.uint8).reshape(rows, cols // BLOCK, 2)
    return blocks.reshape(rows, -1)


def extract_tokenizer(src, out):
    reader = gguf.GGUFReader(src)

    def field(name):
        f = reader.get_field(name)
        if f is None:
            raise SystemExit(f"{src}: no {name} in the header")
        return f

    def strings(name):
        f = field(name)
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    f = field("tokenizer.ggml.token_type")
    types_ = [int(f.parts[i][0]) for i in f.data]
    pre = field("tokenizer.ggml.pre")
    data = {
        "source": os.path.basename(src),
        "pre": bytes(pre.parts[pre.data[0]]).decode(),
        "tokens": strings("tokenizer.ggml.tokens"),
        "token_types": types_,
        "merges": strings("tokenizer.ggml.merges"),
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        f = reader.get_field(f"tokenizer.ggml.{key}")
        if f is not None:
            data[key] = int(f.parts[f.data[0]][0])
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        json.dump(data, fh)
    print(f"{out}: {len(data['tokens'])} tokens, {len(data['merges'])} merges, {os.path.getsize(out) / 1e6:.1f} MB")


def byte_level_vocab():
    """GPT-2's byte-to-character map: the 256 byte tokens every byte-level BPE vocabulary has."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def tokenizer_for(path, vocab):
    if path and Path(path).is_file():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            t = json.load(fh)
        print(f"tokenizer: {path} ({len(t['tokens'])} tokens from {t.get('source')})")
    else:
        print(f"tokenizer: {path or 'none given'} not found; a minimal byte-level BPE vocabulary")
        tokens = byte_level_vocab() + ["Ġt", "he", "<|endoftext|>"]
        t = {"pre": "qwen2", "tokens": tokens, "token_types": [1] * (len(tokens) - 1) + [3],
             "merges": ["Ġ t", "h e"], "bos_token_id": len(tokens) - 1, "eos_token_id": len(tokens) - 1}
    if len(t["tokens"]) > vocab:
        raise SystemExit(f"the tokenizer has {len(t['tokens'])} tokens, more than the shape's vocabulary {vocab}")
    pad = range(len(t["tokens"]), vocab)
    t["tokens"] = t["tokens"] + [f"[PAD{i}]" for i in pad]
    t["token_types"] = t["token_types"] + [int(gguf.TokenType.UNUSED)] * len(pad)
    return t


def write_model(shape, out, tokenizer_path, seed):
    hidden, layers, ffn, heads, kv_heads, vocab, eps = SHAPES[shape]
    arch = "llama" if shape.startswith("llama") else "qwen2"
    kv = hidden // heads * kv_heads
    rng = np.random.default_rng(seed)
    start = time.time()
    w = gguf.GGUFWriter(out, arch)
    w.add_name(f"{shape} synthetic (random Q4_0)")
    w.add_context_length(131072)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(5e5 if arch == "llama" else 1e6)
    w.add_layer_norm_rms_eps(eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    t = tokenizer_for(tokenizer_path if arch == "qwen2" else None, vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(t["pre"])
    w.add_token_list(t["tokens"])
    w.add_token_types(t["token_types"])
    w.add_token_merges(t["merges"])
    w.add_bos_token_id(t.get("bos_token_id", 0))
    w.add_eos_token_id(t.get("eos_token_id", 0))

    ones = np.ones(hidden, dtype=np.float32)

    def bias(n):
        return (0.02 * (2 * rng.random(n, dtype=np.float32) - 1)).astype(np.float32)

    # One array per kind, shared by every layer.
    shared = {
        "attn_q.weight": random_q4_0(rng, hidden, hidden),
        "attn_k.weight": random_q4_0(rng, kv, hidden),
        "attn_v.weight": random_q4_0(rng, kv, hidden),
        "attn_output.weight": random_q4_0(rng, hidden, hidden),
        "ffn_gate.weight": random_q4_0(rng, ffn, hidden),
        "ffn_up.weight": random_q4_0(rng, ffn, hidden),
        "ffn_down.weight": random_q4_0(rng, hidden, ffn),
    }
    if arch == "qwen2":
        shared.update({"attn_q.bias": bias(hidden), "attn_k.bias": bias(kv), "attn_v.bias": bias(kv)})
    w.add_tensor("token_embd.weight", random_q4_0(rng, vocab, hidden), raw_dtype=Q4_0)
    for layer in range(layers):
        p = f"blk.{layer}."
        w.add_tensor(p + "attn_norm.weight", ones)
        for kind, arr in shared.items():
            w.add_tensor(p + kind, arr, raw_dtype=Q4_0 if arr.dtype == np.uint8 else None)
        w.add_tensor(p + "ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", random_q4_0(rng, vocab, hidden), raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = os.path.getsize(out)
    print(f"{out}: {shape}, {size / 1e9:.2f} GB, written in {time.time() - start:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=str(ROOT / ".llama" / "qwen2-tokenizer.json.gz"))
    ap.add_argument("--extract-tokenizer", metavar="SRC_GGUF")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.extract_tokenizer:
        extract_tokenizer(args.extract_tokenizer, args.out)
    elif args.shape:
        write_model(args.shape, args.out, args.tokenizer, args.seed)
    else:
        ap.error("give --shape or --extract-tokenizer")


if __name__ == "__main__":
    main()
