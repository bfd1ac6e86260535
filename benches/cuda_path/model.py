"""The CUDA path's decode step: a Qwen2 / Llama layer stack with Hugging Face semantics (RMSNorm,
q/k/v projections with bias for Qwen2, RoPE with llama3 scaling for the 70B shape, a preallocated
KV cache with grouped-query attention through F.scaled_dot_product_attention, o projection,
SwiGLU MLP, final norm, lm_head, greedy argmax). Every layer linear takes its weight from a
WeightCache (streaming.py), dequantizes it to bf16 into one scratch buffer and calls F.linear.

The fixed part stays on the device whatever the cache: bf16 embeddings, norms, biases, the packed
lm_head (dequantized in row chunks that fit the scratch, so the scratch is one layer matrix, not
the vocabulary), the KV cache and the scratch.
"""

import math

import torch
import torch.nn.functional as F

from dequant import dequantize, random_q4
from streaming import KINDS, Packed

# name: (arch, hidden, layers, ffn, heads, kv_heads, vocab, rms_eps, rope_theta, llama3 scaling)
SHAPES = {
    "tiny": ("qwen2", 128, 3, 256, 2, 1, 512, 1e-6, 1e6, None),  # head dim 64; for the CPU
    "qwen2-0.5b": ("qwen2", 896, 24, 4864, 14, 2, 151936, 1e-6, 1e6, None),
    "qwen2-7b": ("qwen2", 3584, 28, 18944, 28, 4, 152064, 1e-6, 1e6, None),
    "qwen2-32b": ("qwen2", 5120, 64, 27648, 40, 8, 152064, 1e-5, 1e6, None),
    "llama-70b": ("llama", 8192, 80, 28672, 64, 8, 128256, 1e-5, 5e5, (8.0, 1.0, 4.0, 8192)),
}


def kinds_of(shape):
    """{kind: Packed} of one layer's linears, in KINDS (forward) order."""
    _, h, _, ffn, heads, kv_heads = SHAPES[shape][:6]
    kv = kv_heads * (h // heads)
    rc = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (ffn, h), "up": (ffn, h), "down": (h, ffn)}
    return {name: Packed(*rc[name]) for name in KINDS}


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
    """The fixed, device-resident part, and the decode step. `dequant` is dequant.dequantize (the
    Triton kernel) or dequant.dequantize_reference (plain PyTorch, for --check)."""

    def __init__(self, shape, ctx, device, dequant=dequantize):
        arch, h, layers, ffn, heads, kv_heads, vocab, eps, theta, scaling = SHAPES[shape]
        self.h, self.layers, self.vocab = h, layers, vocab
        self.heads, self.kv_heads, self.eps = heads, kv_heads, eps
        self.d = h // heads
        self.dequant = dequant
        kv = kv_heads * self.d
        dev = device
        self.kinds = kinds_of(shape)
        bias = arch == "qwen2"

        def small(n):
            return (torch.rand(n, device=dev) * 0.04 - 0.02).to(torch.bfloat16)

        # Made in place: no f32 temporaries (they would show in a small budget's VRAM samples).
        self.embed = torch.empty(vocab, h, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
        self.per_layer = [{"bq": small(h) if bias else None, "bk": small(kv) if bias else None,
                           "bv": small(kv) if bias else None,
                           "n1": torch.ones(h, device=dev), "n2": torch.ones(h, device=dev)} for _ in range(layers)]
        self.norm = torch.ones(h, device=dev)
        self.lm = Packed(vocab, h)
        self.lm_qweight, self.lm_scales = random_q4(vocab, h, dev)
        self.inv_freq = rope_inv_freq(self.d, theta, scaling).to(dev)
        self.k_cache = torch.zeros(layers, kv_heads, ctx, self.d, dtype=torch.bfloat16, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        biggest = max(p.rows * p.cols for p in self.kinds.values())
        self.lm_chunk_rows = max(1, biggest // h)
        self.scratch = torch.empty(biggest, dtype=torch.bfloat16, device=dev)
        self.kv_bytes_per_position = layers * 2 * kv * 2

    def linear(self, x, cache, kind, bias=None):
        p = self.kinds[kind]
        with cache.next(kind) as (qweight, scales):
            w = self.dequant(qweight, scales, p.rows, p.cols, self.scratch[: p.rows * p.cols].view(p.rows, p.cols))
        return F.linear(x, w, bias)

    def lm_head(self, x):
        """Logits in row chunks of the packed lm_head, each dequantized into the scratch."""
        out = torch.empty(1, self.vocab, dtype=torch.bfloat16, device=x.device)
        for r0 in range(0, self.vocab, self.lm_chunk_rows):
            r1 = min(self.vocab, r0 + self.lm_chunk_rows)
            rows = r1 - r0
            w = self.dequant(self.lm_qweight[r0:r1], self.lm_scales[r0:r1], rows, self.h,
                             self.scratch[: rows * self.h].view(rows, self.h))
            out[:, r0:r1] = F.linear(x, w)
        return out

    def logits(self, token, pos, cache):
        """Appends `token` at `pos`; returns the logits [1, vocab] (bf16)."""
        x = self.embed[token].view(1, self.h)
        freqs = pos * self.inv_freq
        cos = torch.cat((freqs, freqs)).cos()
        sin = torch.cat((freqs, freqs)).sin()
        for i, L in enumerate(self.per_layer):
            hn = rms_norm(x, L["n1"], self.eps)
            q = self.linear(hn, cache, "q", L["bq"]).view(self.heads, self.d)
            k = self.linear(hn, cache, "k", L["bk"]).view(self.kv_heads, self.d)
            v = self.linear(hn, cache, "v", L["bv"]).view(self.kv_heads, self.d)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.k_cache[i, :, pos] = k
            self.v_cache[i, :, pos] = v
            a = F.scaled_dot_product_attention(
                q.view(1, self.heads, 1, self.d),
                self.k_cache[i, :, : pos + 1].unsqueeze(0),
                self.v_cache[i, :, : pos + 1].unsqueeze(0),
                enable_gqa=True,
            ).reshape(1, self.h)
            x = x + self.linear(a, cache, "o")
            hn = rms_norm(x, L["n2"], self.eps)
            g = F.silu(self.linear(hn, cache, "gate"))
            u = self.linear(hn, cache, "up")
            x = x + self.linear(g * u, cache, "down")
        return self.lm_head(rms_norm(x, self.norm, self.eps))

    def step(self, token, pos, cache):
        """Appends `token` at `pos`; returns the greedy next token (a device scalar)."""
        return self.logits(token, pos, cache).float().argmax(-1)[0]

    def reset(self):
        self.k_cache.zero_()
        self.v_cache.zero_()
