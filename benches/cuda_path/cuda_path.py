#!/usr/bin/env python3
"""The seed's CUDA path, rebuilt for comparison: INT4 block-128 weights, a Triton kernel that
dequantizes each weight to bf16 when it is used, then torch.nn.functional.linear.

RUNS ON THE DEVICE (PyTorch with CUDA, Triton); here it is only syntax-checked
(python3 -m py_compile). Weights are random (speed does not depend on values), in the same
layout as q4wgpu's (src/quant.rs): per row, blocks of 128 weights; a block is 16 int32 words, weight
i of a block is nibble i % 8 (bits 4*(i%8)..) of word i / 8, stored as q + 8; scales are a separate
[rows, blocks] bf16 array; w = (nibble - 8) * scale.

The decode step is a Qwen2 / Llama layer stack with Hugging Face semantics: RMSNorm, q/k/v
projections (with bias for Qwen2), RoPE (llama3 scaling for the 70B shape), a preallocated KV cache
with grouped-query attention through F.scaled_dot_product_attention, o projection, SwiGLU MLP, final
norm, lm_head, greedy argmax. Each step ends with .item() on the token (one synchronisation per
token, as q4wgpu reads each token back), so wall-clock time per token is honest.

Modes:
  resident  every packed weight on the GPU (made there with torch.randint: no host copy of 16.5 GB)
  streamed  every layer's packed weights in pinned host memory, copied to the GPU for each use
            (on the compute stream, as the seed did); embeddings, norms and lm_head stay on the GPU

Prints one markdown row and one JSON line (also written to --json).
  python3 benches/cuda_path/cuda_path.py --shape qwen2-32b --mode resident -n 64 -r 3
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 128
WORDS_PER_BLOCK = BLOCK // 8

# name: (arch, hidden, layers, ffn, heads, kv_heads, vocab, rms_eps, rope_theta, llama3 scaling)
SHAPES = {
    "tiny": ("qwen2", 256, 2, 512, 4, 2, 1000, 1e-6, 1e6, None),
    "qwen2-0.5b": ("qwen2", 896, 24, 4864, 14, 2, 151936, 1e-6, 1e6, None),
    "qwen2-7b": ("qwen2", 3584, 28, 18944, 28, 4, 152064, 1e-6, 1e6, None),
    "qwen2-32b": ("qwen2", 5120, 64, 27648, 40, 8, 152064, 1e-5, 1e6, None),
    "llama-70b": ("llama", 8192, 80, 28672, 64, 8, 128256, 1e-5, 5e5, (8.0, 1.0, 4.0, 8192)),
}


@triton.jit
def dequant_kernel(qw_ptr, sc_ptr, out_ptr, rows, cols, bpr, ROWS: tl.constexpr):
    """One program: ROWS rows x one 128-weight block -> bf16."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blk = tl.program_id(1)
    e = tl.arange(0, 128)
    col = blk * 128 + e
    rmask = r < rows
    words = tl.load(qw_ptr + r[:, None] * (bpr * 16) + blk * 16 + e[None, :] // 8, mask=rmask[:, None], other=0)
    q = ((words >> ((e[None, :] % 8) * 4)) & 0xF) - 8
    s = tl.load(sc_ptr + r * bpr + blk, mask=rmask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) * s[:, None]).to(tl.bfloat16)
    tl.store(out_ptr + r[:, None] * cols + col[None, :], w, mask=rmask[:, None] & (col < cols)[None, :])


DEQUANT_ROWS = 16


def dequantize(qweight, scales, rows, cols, out):
    """qweight int32 [rows, bpr*16], scales bf16 [rows, bpr] -> out bf16 [rows, cols] (a scratch view)."""
    bpr = (cols + BLOCK - 1) // BLOCK
    grid = (triton.cdiv(rows, DEQUANT_ROWS), bpr)
    dequant_kernel[grid](qweight, scales, out, rows, cols, bpr, ROWS=DEQUANT_ROWS)
    return out


def dequantize_reference(qweight, scales, rows, cols):
    """The same in plain PyTorch, for the start-up check."""
    bpr = (cols + BLOCK - 1) // BLOCK
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int32) * 4
    nib = (qweight.view(rows, bpr * WORDS_PER_BLOCK, 1) >> shifts) & 0xF
    q = (nib.view(rows, bpr, BLOCK) - 8).float()
    w = (q * scales.float().view(rows, bpr, 1)).to(torch.bfloat16).view(rows, bpr * BLOCK)
    return w[:, :cols]


class PinnedArena:
    """One pinned host allocation handed out in slices (torch's pinned allocator rounds each
    allocation up to a power of two: 16.5 GB of separate tensors would pin about 27 GB)."""

    def __init__(self, numel, dtype):
        self.buf = torch.empty(numel, dtype=dtype, pin_memory=True)
        self.at = 0

    def take(self, shape):
        n = math.prod(shape)
        out = self.buf[self.at:self.at + n].view(shape)
        self.at += n
        return out


def q4_sizes(rows, cols):
    bpr = (cols + BLOCK - 1) // BLOCK
    return rows * bpr * WORDS_PER_BLOCK, rows * bpr


class Q4:
    """One packed matrix, made on the GPU; in streamed mode moved to slices of pinned host arenas."""

    def __init__(self, rows, cols, arenas=None):
        self.rows, self.cols = rows, cols
        bpr = (cols + BLOCK - 1) // BLOCK
        words = torch.randint(-2**31, 2**31 - 1, (rows, bpr * WORDS_PER_BLOCK), dtype=torch.int32, device="cuda")
        base = 1.0 / math.sqrt(21.5 * cols)
        scales = ((0.5 + torch.rand(rows, bpr, device="cuda")) * base).to(torch.bfloat16)
        if arenas is not None:
            self.qweight = arenas[0].take(words.shape).copy_(words)
            self.scales = arenas[1].take(scales.shape).copy_(scales)
        else:
            self.qweight, self.scales = words, scales

    def nbytes(self):
        return self.qweight.numel() * 4 + self.scales.numel() * 2

    def weight(self, scratch):
        """The bf16 weight: copied to the GPU first if it lives in host memory, then dequantized."""
        qw, sc = self.qweight, self.scales
        if not qw.is_cuda:
            qw = qw.to("cuda", non_blocking=True)
            sc = sc.to("cuda", non_blocking=True)
        out = scratch[: self.rows * self.cols].view(self.rows, self.cols)
        return dequantize(qw, sc, self.rows, self.cols, out)


def rope_inv_freq(head_dim, theta, scaling):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        factor, low, high, old_ctx = scaling
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(torch.bfloat16)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rot.float() * sin).to(torch.bfloat16)


class Model:
    def __init__(self, shape, mode, ctx):
        arch, h, layers, ffn, heads, kv_heads, vocab, eps, theta, scaling = SHAPES[shape]
        self.h, self.heads, self.kv_heads, self.eps = h, heads, kv_heads, eps
        self.d = h // heads
        kv = kv_heads * self.d
        dev = "cuda"
        shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (ffn, h), "up": (ffn, h), "down": (h, ffn)}
        arenas = None
        if mode == "streamed":
            sizes = [q4_sizes(*rc) for rc in shapes.values()]
            arenas = (PinnedArena(layers * sum(w for w, _ in sizes), torch.int32),
                      PinnedArena(layers * sum(s for _, s in sizes), torch.bfloat16))
        self.embed = (torch.rand(vocab, h, device=dev) * 2 - 1).to(torch.bfloat16)
        self.layers = []
        for _ in range(layers):
            bias = arch == "qwen2"
            self.layers.append({
                **{name: Q4(rows, cols, arenas) for name, (rows, cols) in shapes.items()},
                "bq": (torch.rand(h, device=dev) * 0.04 - 0.02).to(torch.bfloat16) if bias else None,
                "bk": (torch.rand(kv, device=dev) * 0.04 - 0.02).to(torch.bfloat16) if bias else None,
                "bv": (torch.rand(kv, device=dev) * 0.04 - 0.02).to(torch.bfloat16) if bias else None,
                "n1": torch.ones(h, device=dev), "n2": torch.ones(h, device=dev),
            })
        self.norm = torch.ones(h, device=dev)
        self.lm_head = Q4(vocab, h)
        self.inv_freq = rope_inv_freq(self.d, theta, scaling).to(dev)
        self.k_cache = torch.zeros(layers, kv_heads, ctx, self.d, dtype=torch.bfloat16, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        biggest = max(vocab * h, ffn * h)
        self.scratch = torch.empty(biggest, dtype=torch.bfloat16, device=dev)
        self.layer_bytes = sum(m.nbytes() for k, m in self.layers[0].items() if isinstance(m, Q4))
        self.lm_head_bytes = self.lm_head.nbytes()
        self.kv_bytes_per_position = layers * 2 * kv * 2

    def step(self, token, pos):
        """Appends `token` at `pos`; returns the greedy next token (a GPU scalar)."""
        x = self.embed[token].view(1, self.h)
        freqs = pos * self.inv_freq
        cos = torch.cat((freqs, freqs)).cos()
        sin = torch.cat((freqs, freqs)).sin()
        for i, L in enumerate(self.layers):
            s = self.scratch
            hn = rms_norm(x, L["n1"], self.eps)
            q = F.linear(hn, L["q"].weight(s), L["bq"]).view(self.heads, self.d)
            k = F.linear(hn, L["k"].weight(s), L["bk"]).view(self.kv_heads, self.d)
            v = F.linear(hn, L["v"].weight(s), L["bv"]).view(self.kv_heads, self.d)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.k_cache[i, :, pos] = k
            self.v_cache[i, :, pos] = v
            a = F.scaled_dot_product_attention(
                q.view(1, self.heads, 1, self.d),
                self.k_cache[i, :, : pos + 1].unsqueeze(0),
                self.v_cache[i, :, : pos + 1].unsqueeze(0),
                enable_gqa=True,
            ).reshape(1, self.h)
            x = x + F.linear(a, L["o"].weight(s))
            hn = rms_norm(x, L["n2"], self.eps)
            g = F.silu(F.linear(hn, L["gate"].weight(s)))
            u = F.linear(hn, L["up"].weight(s))
            x = x + F.linear(g * u, L["down"].weight(s))
        logits = F.linear(rms_norm(x, self.norm, self.eps), self.lm_head.weight(self.scratch))
        return logits.float().argmax(-1)[0]


def check_dequant():
    """The Triton kernel against plain PyTorch on an awkward shape (exact: same f32 product, one rounding)."""
    rows, cols = 37, 300
    m = Q4(rows, cols)
    scratch = torch.empty(rows * cols, dtype=torch.bfloat16, device="cuda")
    got = m.weight(scratch)
    want = dequantize_reference(m.qweight, m.scales, rows, cols)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[0].tolist()
        sys.exit(f"dequant kernel disagrees with the reference at {bad}: {got[tuple(bad)]} vs {want[tuple(bad)]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-32b")
    ap.add_argument("--mode", choices=["resident", "streamed"], default="resident")
    ap.add_argument("-n", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("-r", type=int, default=3, help="timed repetitions (after one warm-up)")
    ap.add_argument("--prompt", type=int, default=4, help="tokens decoded before timing starts")
    ap.add_argument("--json", help="also write the JSON line to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    check_dequant()
    t0 = time.time()
    ctx = args.prompt + args.n + 1
    model = Model(args.shape, args.mode, ctx)
    torch.cuda.synchronize()
    load_s = time.time() - t0
    prompt = torch.randint(0, SHAPES[args.shape][6], (args.prompt,)).tolist()

    def run(steps):
        tok = 0
        for p, t in enumerate(prompt):
            tok = model.step(t, p).item()
        start = time.time()
        for i in range(steps):
            tok = model.step(tok, args.prompt + i).item()
        return steps / (time.time() - start)

    with torch.inference_mode():
        run(min(args.n, 4))
        rates = [run(args.n) for _ in range(args.r)]
    layers = SHAPES[args.shape][2]
    mean_kv = args.prompt + (args.n + 1) / 2
    weight_bytes = layers * model.layer_bytes + model.lm_head_bytes
    streamed = layers * model.layer_bytes if args.mode == "streamed" else 0
    tps = statistics.median(rates)
    result = {
        "system": "cuda_path",
        "shape": args.shape,
        "mode": args.mode,
        "test": f"tg{args.n}",
        "tokens": args.n,
        "tokens_per_second": tps,
        "tokens_per_second_min": min(rates),
        "tokens_per_second_max": max(rates),
        "samples": rates,
        "int4_bytes_per_token": weight_bytes + mean_kv * model.kv_bytes_per_position,
        "streamed_bytes_per_token": streamed,
        "load_seconds": load_s,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "command": " ".join(sys.argv),
        "unix_time": int(time.time()),
    }
    gb = result["int4_bytes_per_token"] / 1e9
    print(f"| {args.shape} | CUDA path ({args.mode}) | tg{args.n} | {tps:.2f} | {min(rates):.2f}–{max(rates):.2f} "
          f"| {gb:.3f} | {gb * tps:.1f} |")
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
