#!/usr/bin/env python3
"""Writes the fixtures of tests/oracles.rs: expected values computed here, in numpy, from the
written specs, without any of q4wgpu's code. The Rust tests read them and compare.

  python3 scripts/oracle-fixtures.py [--gguf ~/.cache/q4wgpu/models/qwen2.5-coder-0.5b-instruct.gguf]

Needs numpy; with --gguf also the `gguf` package (pip install gguf), which reads slices of real
tensors of the 0.5B model as realistic inputs. Deterministic: the same command writes the same bytes.

1. tests/fixtures/quant-oracle.safetensors: for each case NAME, `NAME.input` F32 [rows, cols] and
   the expected `NAME.qweight` U32 [rows, blocks*16] and `NAME.scales` BF16 [rows, blocks].

   The spec implemented (README.md, "The INT4 format", the PyTorch method it comes from):
   - for each row of W[out, in], blocks of 128 consecutive elements along `in`; a row whose length
     is not a multiple of 128 ends with a shorter block, as if zero-padded (here: padded with zeros);
   - scale = bf16(absmax / 7): absmax of the block in f32, divided by 7 in f32, rounded to bf16 to
     nearest, ties to even (torch's `.to(torch.bfloat16)`); absmax == 0 -> scale 1;
   - q = clamp(round_half_to_even(w / scale), -8, 7), the division in f32 with the bf16 scale
     widened to f32 (torch.round rounds half to even; so does np.rint);
   - storage: each row padded to whole blocks; a block is 16 little-endian u32 words; element i of
     a block is bits 4*(i mod 8).. of word i / 8, stored as q + 8 (0..15); padding stores 8.
   In PyTorch the same reads, for W zero-padded to [rows, blocks, 128] in f32:
       s = (W.abs().amax(-1) / 7).to(torch.bfloat16); s[W.abs().amax(-1) == 0] = 1
       q = torch.clamp(torch.round(W / s.float()[..., None]), -8, 7)
   Outside the spec, and not covered: non-finite weights, and blocks whose absmax / 7 rounds to
   bf16 zero (absmax below ~7 * 2^-134), where both implementations would divide by zero.

2. tests/fixtures/rope-llama3.json: for each case, a config.json (Llama, llama3 rope_scaling) and
   the expected inverse frequency of every pair index, in float64, from the formula of Hugging
   Face transformers' `_compute_llama3_parameters` (modeling_rope_utils.py), written as its
   torch.where form:
       inv_freq[i] = 1 / theta^(2i / head_dim)
       wavelen = 2 pi / inv_freq
       low_freq_wavelen = old_ctx / low_freq_factor; high_freq_wavelen = old_ctx / high_freq_factor
       scaled = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
       smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
       smoothed = (1 - smooth) * scaled / factor + smooth * scaled
       medium = !(wavelen < high_freq_wavelen) & !(wavelen > low_freq_wavelen)
       result = where(medium, smoothed, scaled)
   (transformers computes in float32; float64 here is the exact value that f32 approximates.)
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

BLOCK = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# --- the quantizer --------------------------------------------------------------------------------


def bf16_bits(x):
    """f32 -> bf16 bit patterns, rounding to nearest, ties to even (finite inputs)."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (b >> 16) & 1
    return ((b + 0x7FFF + lsb) >> 16).astype(np.uint16)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize(w):
    """W f32 [rows, cols] -> (qweight u32 [rows, blocks*16], scales bf16 bits u16 [rows, blocks])."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    blocks = -(-cols // BLOCK)
    padded = np.zeros((rows, blocks * BLOCK), dtype=np.float32)
    padded[:, :cols] = w
    b = padded.reshape(rows, blocks, BLOCK)
    absmax = np.abs(b).max(axis=2)
    scale_bits = bf16_bits(absmax / np.float32(7.0))
    scale_bits[absmax == 0] = bf16_bits(np.float32(1.0))
    scale = bf16_to_f32(scale_bits)
    with np.errstate(divide="raise", invalid="raise"):
        ratio = b / scale[:, :, None]
    assert ratio.dtype == np.float32
    q = np.clip(np.rint(ratio), -8, 7).astype(np.int64)
    nibbles = (q + 8).astype(np.uint32).reshape(rows, blocks * 16, 8)
    words = np.zeros((rows, blocks * 16), dtype=np.uint32)
    for j in range(8):
        words |= nibbles[:, :, j] << np.uint32(4 * j)
    return words, scale_bits


def exact_scale_block(rng, scale, n=BLOCK):
    """A block whose absmax is 7 * scale exactly (scale a bf16 value), so bf16(absmax / 7) = scale:
    every k + 0.5 for k in -7..6 appears (ties, which round to the even neighbour), and the rest
    are random multiples of scale / 4."""
    s = np.float32(scale)
    assert bf16_to_f32(bf16_bits(s)) == s
    ties = np.arange(-7, 7, dtype=np.float32) + np.float32(0.5)
    vals = np.concatenate([[7.0, -7.0], ties, rng.integers(-28, 29, n - 2 - len(ties)) / 4.0])
    rng.shuffle(vals)
    out = (vals.astype(np.float32) * s).astype(np.float32)
    assert np.abs(out).max() == np.float32(7.0) * s
    return out


def quant_cases(rng, gguf_path):
    cases = {}
    # Typical: rows of different scales, some rows with an outlier per block (as in LLM weights).
    w = rng.standard_normal((6, 384)).astype(np.float32)
    w *= np.array([1e-3, 0.02, 0.5, 1.0, 30.0, 1e4], dtype=np.float32)[:, None]
    w[3, ::97] *= 40
    cases["random_normal"] = w
    # Rows whose length is not a multiple of 128: a shorter last block, padded with q = 0.
    for cols in (1, 7, 127, 129, 200, 300):
        cases[f"short_rows_{cols}"] = (rng.standard_normal((3, cols)) * 0.1).astype(np.float32)
    # Zero blocks (scale 1), negative zeros, a block of one non-zero value, a zero row.
    w = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
    w[0, 128:256] = 0.0
    w[1, :128] = -0.0
    w[1, 300:] = 0.0
    w[1, 301] = -3e-3
    w[2, :] = 0.0
    w[3, 256:384] = 0.0
    w[3, 383] = 1e-7
    cases["zero_blocks"] = w
    # Ties at .5: scales exactly representable in bf16 and absmax exactly 7 * scale.
    scales = [1.0, 0.25, 1.5, 3.0, 2.0**-10, 1.0078125, 96.0, 2.0**-20 * 1.75]
    cases["ties_half_even"] = np.stack([exact_scale_block(rng, s) for s in scales])
    # absmax / 7 on a bf16 tie (rounds to even) and just beside it, up or down; +-absmax in one
    # block, so w / scale lands just above or below +-7.
    rows = []
    for m in (1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1 + 2**-8 - 2**-20, 1 + 2**-9,
              1 + 127 * 2**-8, 1.99, 0.9990):
        absmax = np.float32(7.0) * np.float32(m)
        row = (rng.uniform(-1, 1, BLOCK) * absmax * 0.999).astype(np.float32)
        row[5], row[77] = absmax, -absmax
        rows.append(row)
        rows.append(-row)
    cases["bf16_scale_rounding"] = np.stack(rows)
    # Large and small magnitudes (all normal f32, scales normal or subnormal in bf16).
    w = rng.standard_normal((6, 256)).astype(np.float32)
    w *= np.array([3e38 / 4.5, 1e30, 1e-20, 1e-30, 1.5e-37, 2e-38], dtype=np.float32)[:, None]
    w[0, 10] = np.float32(3.4e38)
    w[0, 200] = np.float32(-3.4e38)
    cases["magnitudes"] = w
    # One block mixing magnitudes: small values quantize to 0 or +-1.
    w = (rng.standard_normal((2, BLOCK)) * 1e-3).astype(np.float32)
    w[:, 64] = [500.0, -500.0]
    cases["outlier_block"] = w
    if gguf_path:
        cases.update(real_cases(gguf_path))
    return cases


def real_cases(path):
    """Slices of real tensors of the 0.5B model (Q8_0 in the GGUF, dequantized by the gguf package)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    # (GGUF name, first row, rows, case name): q/k projections, the MLP down projection (4864
    # columns: 38 blocks) and the output projection (lm_head).
    for name, r0, n, case in [
        ("blk.0.attn_k.weight", 0, 4, "real_blk0_attn_k"),
        ("blk.11.attn_q.weight", 100, 2, "real_blk11_attn_q"),
        ("blk.23.ffn_down.weight", 7, 2, "real_blk23_ffn_down"),
        ("output.weight", 9000, 2, "real_output"),
    ]:
        t = tensors[name]
        full = dequantize(t.data, t.tensor_type)
        cols = int(t.shape[0])  # GGUF lists the fastest-varying dimension first
        full = np.asarray(full, dtype=np.float32).reshape(-1, cols)
        out[case] = np.ascontiguousarray(full[r0 : r0 + n])
    return out


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def self_check():
    """The README's worked example: absmax 7 -> scale 1; 2.5 -> 2; -3.5 -> -4 (ties to even)."""
    row = np.zeros((1, BLOCK), dtype=np.float32)
    row[0, :3] = [2.5, -3.5, 7.0]
    words, scales = quantize(row)
    assert scales[0, 0] == 0x3F80
    assert words[0, 0] & 0xFFF == (8 + 7) << 8 | (8 - 4) << 4 | (8 + 2), hex(words[0, 0])
    assert bf16_bits(np.float32(1 + 2**-8)) == 0x3F80  # a tie rounds to the even neighbour
    assert bf16_bits(np.float32(1 + 3 * 2**-8)) == 0x3F82


# --- llama3 RoPE ----------------------------------------------------------------------------------


def llama3_inv_freq(theta, head_dim, factor, low, high, old_ctx):
    i = np.arange(0, head_dim, 2, dtype=np.float64)
    inv_freq = 1.0 / (np.float64(theta) ** (i / head_dim))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    band = np.where(medium, "ramp", np.where(wavelen < high_freq_wavelen, "kept", "divided"))
    return np.where(medium, smoothed, scaled), wavelen, band


def rope_case(name, head_dim, theta, factor, low, high, old_ctx):
    values, _, band = llama3_inv_freq(theta, head_dim, factor, low, high, old_ctx)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": head_dim * 2, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head_dim,
        "vocab_size": 32, "rope_theta": theta,
        "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                         "high_freq_factor": high, "original_max_position_embeddings": old_ctx},
    }
    return {"name": name, "config": config, "inv_freq": [float(v) for v in values],
            "band": [str(b) for b in band]}


def rope_cases():
    cases = [
        # Llama-3.1 8B/70B/405B and Llama-3.2 1B/3B as published.
        rope_case("llama-3.1-70b", 128, 500000.0, 8.0, 1.0, 4.0, 8192),
        rope_case("llama-3.2-1b", 64, 500000.0, 32.0, 1.0, 4.0, 8192),
        # The tiny configs of tests/cpu_reference.rs and src/test_models.rs.
        rope_case("cpu-reference-llama", 40, 500000.0, 8.0, 1.0, 4.0, 64),
        rope_case("tiny-llama", 32, 500000.0, 8.0, 1.0, 4.0, 1024),
        # A wide ramp (many indices inside it), a factor of 1 (the ramp is the identity) and
        # non-default low/high factors.
        rope_case("wide-ramp", 128, 10000.0, 4.0, 1.0, 64.0, 4096),
        rope_case("factor-1", 64, 500000.0, 1.0, 1.0, 4.0, 8192),
        rope_case("low-2-high-8", 96, 1000000.0, 16.0, 2.0, 8.0, 32768),
    ]
    # The ramp's edges: contexts chosen so one wavelength of the 70B table falls just inside or
    # just outside each end of the ramp.
    _, wavelen, _ = llama3_inv_freq(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    i = 20
    for high in (4.0,):
        cases.append(rope_case("edge-high-inside", 128, 500000.0, 8.0, 1.0, high, math.floor(wavelen[i] * high)))
        cases.append(rope_case("edge-high-outside", 128, 500000.0, 8.0, 1.0, high, math.ceil(wavelen[i] * high)))
    cases.append(rope_case("edge-low-outside", 128, 500000.0, 8.0, 1.0, 4.0, math.floor(wavelen[i])))
    cases.append(rope_case("edge-low-inside", 128, 500000.0, 8.0, 1.0, 4.0, math.ceil(wavelen[i])))
    return cases


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="the 0.5B model's GGUF, for slices of real tensors")
    args = p.parse_args()
    self_check()
    rng = np.random.default_rng(20261130)
    cases = quant_cases(rng, args.gguf)
    tensors = {}
    for name, w in cases.items():
        words, scales = quantize(w)
        tensors[f"{name}.input"] = ("F32", w)
        tensors[f"{name}.qweight"] = ("U32", words)
        tensors[f"{name}.scales"] = ("BF16", scales)
    os.makedirs(FIXTURES, exist_ok=True)
    quant_path = os.path.join(FIXTURES, "quant-oracle.safetensors")
    write_safetensors(quant_path, tensors, {
        "generator": "scripts/oracle-fixtures.py", "spec": "README.md, The INT4 format",
        "cases": ",".join(cases), "real_tensors": "yes" if args.gguf else "no",
    })
    rope_path = os.path.join(FIXTURES, "rope-llama3.json")
    with open(rope_path, "w") as f:
        json.dump({"generator": "scripts/oracle-fixtures.py", "cases": rope_cases()}, f, indent=1)
        f.write("\n")
    for path in (quant_path, rope_path):
        print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
