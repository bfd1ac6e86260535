#!/usr/bin/env python3
"""The seed's CUDA path, rebuilt for comparison: INT4 block-128 weights, a Triton kernel that
dequantizes each weight to bf16 when it is used, then torch.nn.functional.linear.

RUNS ON THE DEVICE (PyTorch with CUDA, Triton). Weights are random (speed does not depend on
values), in the same layout as q4wgpu's (src/quant.rs): per row, blocks of 128 weights; a block is
16 int32 words, weight i of a block is nibble i % 8 (bits 4*(i%8)..) of word i / 8, stored as
q + 8; scales are a separate [rows, blocks] bf16 array; w = (nibble - 8) * scale.

The decode step is a Qwen2 / Llama layer stack with Hugging Face semantics: RMSNorm, q/k/v
projections (with bias for Qwen2), RoPE (llama3 scaling for the 70B shape), a preallocated KV cache
with grouped-query attention through F.scaled_dot_product_attention, o projection, SwiGLU MLP, final
norm, lm_head, greedy argmax. Each step ends with .item() on the token (one synchronisation per
token, as q4wgpu reads each token back), so wall-clock time per token is honest. The prompt is
decoded once; then one untimed warm-up repetition, then -r timed repetitions of -n steps each
(the same positions every time); the median is reported.

Modes:
  resident  every packed weight on the GPU (made there with torch.randint: no host copy of 16.5 GB)
  streamed  every layer's packed weights in pinned host memory (pinned once, at setup, as two
            arenas), copied to the GPU with non_blocking=True for each use, on the compute stream
            as the seed did; embeddings, norms and lm_head stay on the GPU

Prints one markdown row and one JSON line (also written to --json).
  python3 benches/cuda_path/cuda_path.py --shape qwen2-32b --mode resident -n 64 -r 3
  python3 benches/cuda_path/cuda_path.py --check        (the dequant kernel against plain PyTorch)

Without CUDA it refuses to run, except as a smoke test of this code on the CPU, with Triton's
interpreter and the tiny shape (the numbers mean nothing; the JSON says "smoke_test": true):
  TRITON_INTERPRET=1 python3 benches/cuda_path/cuda_path.py --cpu-smoke --shape tiny --check
  TRITON_INTERPRET=1 python3 benches/cuda_path/cuda_path.py --cpu-smoke --shape tiny --mode streamed -n 3 -r 2
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 128
WORDS_PER_BLOCK = BLOCK // 8
# Triton's interpreter (TRITON_INTERPRET=1) converts f32 -> bf16 by truncation; compiled Triton
# rounds to nearest even, as PyTorch does. The check compares against the matching rounding.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# name: (arch, hidden, layers, ffn, heads, kv_heads, vocab, rms_eps, rope_theta, llama3 scaling)
SHAPES = {
    "tiny": ("qwen2", 256, 2, 512, 4, 2, 1000, 1e-6, 1e6, None),  # head dim 64; for --cpu-smoke
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
    assert qweight.shape == (rows, bpr * WORDS_PER_BLOCK) and scales.shape == (rows, bpr), (qweight.shape, scales.shape)
    assert out.shape == (rows, cols) and out.is_contiguous()
    assert rows * cols < 2**31 and rows * bpr * WORDS_PER_BLOCK < 2**31, "kernel offsets are int32"
    grid = (triton.cdiv(rows, DEQUANT_ROWS), bpr)
    dequant_kernel[grid](qweight, scales, out, rows, cols, bpr, ROWS=DEQUANT_ROWS)
    return out


def dequantize_reference(qweight, scales, rows, cols, truncate=False):
    """The same in plain PyTorch: w = (nibble - 8) * scale, the f32 product rounded once to bf16
    (to nearest even; by truncation with truncate=True, to match Triton's interpreter)."""
    bpr = (cols + BLOCK - 1) // BLOCK
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int32) * 4
    nib = (qweight.view(rows, bpr * WORDS_PER_BLOCK, 1) >> shifts) & 0xF
    q = (nib.view(rows, bpr, BLOCK) - 8).float()
    w = q * scales.float().view(rows, bpr, 1)
    if truncate:
        w = (w.view(torch.int32) & ~0xFFFF).view(torch.float32)
    return w.to(torch.bfloat16).view(rows, bpr * BLOCK)[:, :cols]


class PinnedArena:
    """One pinned host allocation handed out in slices (torch's pinned allocator rounds each
    allocation up to a power of two: 16.5 GB of separate tensors would pin about 27 GB)."""

    def __init__(self, numel, dtype, pin):
        self.buf = torch.empty(numel, dtype=dtype, pin_memory=pin)
        self.at = 0

    def take(self, shape):
        n = math.prod(shape)
        assert self.at + n <= self.buf.numel()
        out = self.buf[self.at:self.at + n].view(shape)
        self.at += n
        return out


def q4_sizes(rows, cols):
    bpr = (cols + BLOCK - 1) // BLOCK
    return rows * bpr * WORDS_PER_BLOCK, rows * bpr


class Q4:
    """One packed matrix, made on the device; in streamed mode moved to slices of pinned host arenas."""

    def __init__(self, rows, cols, device, arenas=None):
        self.rows, self.cols, self.device = rows, cols, device
        bpr = (cols + BLOCK - 1) // BLOCK
        words = torch.randint(-2**31, 2**31, (rows, bpr * WORDS_PER_BLOCK), dtype=torch.int32, device=device)
        base = 1.0 / math.sqrt(21.5 * cols)
        scales = ((0.5 + torch.rand(rows, bpr, device=device)) * base).to(torch.bfloat16)
        self.streamed = arenas is not None
        if self.streamed:
            self.qweight = arenas[0].take(words.shape).copy_(words)
            self.scales = arenas[1].take(scales.shape).copy_(scales)
        else:
            self.qweight, self.scales = words, scales

    def nbytes(self):
        return self.qweight.numel() * 4 + self.scales.numel() * 2

    def weight(self, scratch):
        """The bf16 weight: copied to the device first if it lives in host memory, then dequantized.
        The copy is asynchronous (pinned source) and ordered before the kernel on the same stream."""
        qw, sc = self.qweight, self.scales
        if self.streamed:
            qw = qw.to(self.device, non_blocking=True)
            sc = sc.to(self.device, non_blocking=True)
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
    def __init__(self, shape, mode, ctx, device):
        arch, h, layers, ffn, heads, kv_heads, vocab, eps, theta, scaling = SHAPES[shape]
        self.h, self.heads, self.kv_heads, self.eps = h, heads, kv_heads, eps
        self.d = h // heads
        kv = kv_heads * self.d
        dev = device
        shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (ffn, h), "up": (ffn, h), "down": (h, ffn)}
        arenas = None
        self.pinned_bytes = 0
        if mode == "streamed":
            sizes = [q4_sizes(*rc) for rc in shapes.values()]
            pin = dev != "cpu"  # pinning needs CUDA; the CPU smoke test only walks the code path
            arenas = (PinnedArena(layers * sum(w for w, _ in sizes), torch.int32, pin),
                      PinnedArena(layers * sum(s for _, s in sizes), torch.bfloat16, pin))
            self.pinned_bytes = sum(a.buf.numel() * a.buf.element_size() for a in arenas) if pin else 0
        self.embed = (torch.rand(vocab, h, device=dev) * 2 - 1).to(torch.bfloat16)
        self.layers = []
        for _ in range(layers):
            bias = arch == "qwen2"
            self.layers.append({
                **{name: Q4(rows, cols, dev, arenas) for name, (rows, cols) in shapes.items()},
                "bq": (torch.rand(h, device=dev) * 0.04 - 0.02).to(torch.bfloat16) if bias else None,
                "bk": (torch.rand(kv, device=dev) * 0.04 - 0.02).to(torch.bfloat16) if bias else None,
                "bv": (torch.rand(kv, device=dev) * 0.04 - 0.02).to(torch.bfloat16) if bias else None,
                "n1": torch.ones(h, device=dev), "n2": torch.ones(h, device=dev),
            })
        self.norm = torch.ones(h, device=dev)
        self.lm_head = Q4(vocab, h, dev)
        self.inv_freq = rope_inv_freq(self.d, theta, scaling).to(dev)
        self.k_cache = torch.zeros(layers, kv_heads, ctx, self.d, dtype=torch.bfloat16, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        biggest = max(vocab * h, ffn * h)
        self.scratch = torch.empty(biggest, dtype=torch.bfloat16, device=dev)
        self.layer_bytes = sum(m.nbytes() for k, m in self.layers[0].items() if isinstance(m, Q4))
        self.lm_head_bytes = self.lm_head.nbytes()
        self.kv_bytes_per_position = layers * 2 * kv * 2

    def step(self, token, pos):
        """Appends `token` at `pos`; returns the greedy next token (a device scalar)."""
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


def progress(msg):
    """A line on stderr at once (the device run keeps the log of a part that runs out of time)."""
    print(f"cuda_path: {msg}", file=sys.stderr, flush=True)


def check_dequant(device, shapes):
    """The Triton kernel against plain PyTorch, exactly (the same f32 product, one rounding).
    Returns a description of what was checked; exits on a mismatch."""
    for rows, cols in shapes:
        m = Q4(rows, cols, device)
        scratch = torch.full((rows * cols,), float("nan"), dtype=torch.bfloat16, device=device)
        got = m.weight(scratch)
        want = dequantize_reference(m.qweight, m.scales, rows, cols, truncate=INTERPRETED)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            sys.exit(f"dequant kernel disagrees with the reference for [{rows}, {cols}] at {bad}: "
                     f"{got[tuple(bad)].item()} vs {want[tuple(bad)].item()}")
        # The nibble values themselves, independently of the reference's vectorised layout.
        for r, c in ((0, 0), (rows - 1, cols - 1), (rows // 2, min(cols - 1, 130))):
            word = int(m.qweight[r, (c // BLOCK) * WORDS_PER_BLOCK + (c % BLOCK) // 8])
            nib = (word >> (4 * (c % 8))) & 0xF
            exact = (nib - 8) * float(m.scales[r, c // BLOCK])
            if abs(float(got[r, c]) - exact) > abs(exact) / 128 + 1e-30:
                sys.exit(f"dequant kernel: [{rows}, {cols}] element ({r}, {c}) is {float(got[r, c])}, "
                         f"nibble {nib} x scale gives {exact}")
    return ", ".join(f"[{r}, {c}]" for r, c in shapes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-32b")
    ap.add_argument("--mode", choices=["resident", "streamed"], default="resident")
    ap.add_argument("-n", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("-r", type=int, default=3, help="timed repetitions (after one warm-up)")
    ap.add_argument("--prompt", type=int, default=4, help="tokens decoded once before the warm-up")
    ap.add_argument("--json", help="also write the JSON line to this file")
    ap.add_argument("--check", action="store_true",
                    help="only check the dequant kernel against plain PyTorch on awkward and on the shape's matrix sizes, then exit")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="without CUDA, run on the CPU under TRITON_INTERPRET=1 (tiny shape only): tests the code, measures nothing")
    args = ap.parse_args()
    if args.n < 1 or args.r < 1 or args.prompt < 1:
        ap.error("-n, -r and --prompt must be at least 1")

    if torch.cuda.is_available() and not args.cpu_smoke:
        device = "cuda"
        if INTERPRETED:
            sys.exit("cuda_path.py: TRITON_INTERPRET is set; unset it for the GPU benchmark")
    elif args.cpu_smoke:
        if not INTERPRETED:
            sys.exit("cuda_path.py: --cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
        if args.shape != "tiny":
            sys.exit("cuda_path.py: --cpu-smoke runs only --shape tiny")
        device = "cpu"
    else:
        sys.exit("cuda_path.py: CUDA is not available (torch.cuda.is_available() is False; "
                 f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); this benchmark needs an NVIDIA GPU. "
                 "A smoke test of the code on the CPU: TRITON_INTERPRET=1 ... --cpu-smoke --shape tiny")

    torch.manual_seed(0)
    arch, h, layers, ffn, heads, kv_heads, vocab = SHAPES[args.shape][:7]
    kv = kv_heads * (h // heads)
    awkward = [(37, 300), (16, 128), (5, 1000)]
    if args.check:
        real = sorted({(h, h), (kv, h), (ffn, h), (h, ffn), (vocab, h)})
        if device == "cpu":  # the interpreter is slow: a few rows of each real width
            real = sorted({(min(r, 40), c) for r, c in real})
        print("dequant kernel == reference for", check_dequant(device, awkward + real))
        return 0
    check_dequant(device, awkward)  # cheap, every run: a wrong kernel must not produce numbers

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    ctx = args.prompt + args.n + 1
    model = Model(args.shape, args.mode, ctx, device)
    sync()
    load_s = time.perf_counter() - t0
    progress(f"{args.shape} {args.mode}: model ready in {load_s:.1f} s"
             + (f", {torch.cuda.memory_allocated() / 1e9:.2f} GB on the GPU" if device == "cuda" else "")
             + (f", {model.pinned_bytes / 1e9:.2f} GB pinned" if model.pinned_bytes else ""))
    prompt = torch.randint(0, vocab, (args.prompt,)).tolist()
    generated = []

    def run(steps, keep=False):
        """Decodes `steps` tokens after the prompt; returns tokens/s. .item() waits for each token."""
        tok = first
        start = time.perf_counter()
        for i in range(steps):
            tok = model.step(tok, args.prompt + i).item()
            if keep:
                generated.append(tok)
        return steps / (time.perf_counter() - start)

    with torch.inference_mode():
        first = 0
        for p, t in enumerate(prompt):
            first = model.step(t, p).item()
        progress(f"prompt of {args.prompt} decoded")
        warm = run(args.n, keep=True)  # warm-up (Triton compile, cuBLAS heuristics, allocator), untimed
        progress(f"warm-up: {warm:.2f} tok/s")
        rates = []
        for _ in range(args.r):
            rates.append(run(args.n))
            progress(f"repetition {len(rates)}: {rates[-1]:.2f} tok/s")
    if device == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
        gpu = torch.cuda.get_device_name()
    else:
        peak_gb, gpu = None, "cpu (smoke test, Triton interpreter)"
    mean_kv = args.prompt + (args.n + 1) / 2
    weight_bytes = layers * model.layer_bytes + model.lm_head_bytes
    streamed = layers * model.layer_bytes if args.mode == "streamed" else 0
    tps = statistics.median(rates)
    bytes_per_token = weight_bytes + mean_kv * model.kv_bytes_per_position
    result = {
        "system": "cuda_path",
        "shape": args.shape,
        "mode": args.mode,
        "test": f"tg{args.n}",
        "tokens": args.n,
        "prompt_tokens": args.prompt,
        "repetitions": args.r,
        "tokens_per_second": tps,
        "tokens_per_second_min": min(rates),
        "tokens_per_second_max": max(rates),
        "samples": rates,
        "int4_bytes_per_token": bytes_per_token,
        "streamed_bytes_per_token": streamed,
        "achieved_bytes_per_second": bytes_per_token * tps,
        "weight_bytes": weight_bytes,
        "load_seconds": load_s,
        "peak_gpu_memory_gb": peak_gb,
        "pinned_host_bytes": model.pinned_bytes,
        "generated": generated,
        "gpu": gpu,
        "smoke_test": device != "cuda",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "command": " ".join(["cuda_path.py"] + sys.argv[1:]),
        "unix_time": int(time.time()),
    }
    gb = bytes_per_token / 1e9
    print(f"| {args.shape} | CUDA path ({args.mode}) | tg{args.n} | {tps:.2f} | {min(rates):.2f}–{max(rates):.2f} "
          f"| {gb:.3f} | {gb * tps:.1f} |")
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
