"""INT4 block-128 dequantization to bf16: the Triton kernel the CUDA path runs, and plain PyTorch
to check it against.

Layout (the same as q4wgpu's, src/quant.rs): per row, blocks of 128 weights; a block is 16 int32
words; weight i of a block is nibble i % 8 (bits 4*(i%8)..) of word i / 8, stored as q + 8; the
scales are a separate [rows, blocks] bf16 array; w = (nibble - 8) * scale, the f32 product rounded
once to bf16.
"""

import os

import torch
import triton
import triton.language as tl

BLOCK = 128
WORDS_PER_BLOCK = BLOCK // 8
# Weights per program: the original method's kernel is a flat 1-D kernel of this many elements.
PROGRAM_ELEMENTS = 1024
# Triton's interpreter (TRITON_INTERPRET=1) converts f32 -> bf16 by truncation; compiled Triton
# rounds to nearest even, as PyTorch does. The checks compare against the matching rounding.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def dequant_kernel(qw_ptr, sc_ptr, out_ptr, n, cols, bpr, ALIGNED: tl.constexpr, SIZE: tl.constexpr):
    """One program: SIZE consecutive elements of the flat [rows, cols] output -> bf16."""
    offs = tl.program_id(0) * SIZE + tl.arange(0, SIZE)
    mask = offs < n
    if ALIGNED:
        # cols % 128 == 0: words and scales run in the output's order, no division by cols.
        col = offs
        word = offs // 8
        scale = offs // 128
    else:
        row = offs // cols
        col = offs - row * cols
        word = row * (bpr * 16) + col // 8
        scale = row * bpr + col // 128
    words = tl.load(qw_ptr + word, mask=mask, other=0)
    q = ((words >> ((col % 8) * 4)) & 0xF) - 8
    s = tl.load(sc_ptr + scale, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (q.to(tl.float32) * s).to(tl.bfloat16), mask=mask)


def blocks_per_row(cols):
    return (cols + BLOCK - 1) // BLOCK


def dequantize(qweight, scales, rows, cols, out):
    """qweight int32 [rows, bpr*16], scales bf16 [rows, bpr] -> out bf16 [rows, cols] (a scratch view)."""
    bpr = blocks_per_row(cols)
    assert qweight.shape == (rows, bpr * WORDS_PER_BLOCK) and scales.shape == (rows, bpr), (qweight.shape, scales.shape)
    assert qweight.is_contiguous() and scales.is_contiguous()
    assert out.shape == (rows, cols) and out.is_contiguous()
    n = rows * cols
    assert n < 2**31 and rows * bpr * WORDS_PER_BLOCK < 2**31, "kernel offsets are int32"
    grid = (triton.cdiv(n, PROGRAM_ELEMENTS),)
    dequant_kernel[grid](qweight, scales, out, n, cols, bpr, ALIGNED=cols % BLOCK == 0, SIZE=PROGRAM_ELEMENTS)
    return out


def dequantize_reference(qweight, scales, rows, cols, out=None, truncate=INTERPRETED):
    """The same in plain PyTorch: w = (nibble - 8) * scale, the f32 product rounded once to bf16
    (to nearest even; by truncation with truncate=True, as Triton's interpreter does).
    Takes `out` so that it can stand in for dequantize()."""
    bpr = blocks_per_row(cols)
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int32) * 4
    nib = (qweight.reshape(rows, bpr * WORDS_PER_BLOCK, 1) >> shifts) & 0xF
    q = (nib.view(rows, bpr, BLOCK) - 8).float()
    w = q * scales.float().view(rows, bpr, 1)
    if truncate:
        w = (w.view(torch.int32) & ~0xFFFF).view(torch.float32)
    w = w.to(torch.bfloat16).view(rows, bpr * BLOCK)[:, :cols]
    if out is None:
        return w
    return out.copy_(w)


def random_q4(rows, cols, device, generator=None):
    """(qweight, scales) of random packed weights; the scales keep F.linear's outputs near unit
    size for unit-size inputs, so that a deep random stack stays finite."""
    bpr = blocks_per_row(cols)
    words = torch.randint(-2**31, 2**31, (rows, bpr * WORDS_PER_BLOCK), dtype=torch.int32, device=device,
                          generator=generator)
    base = 1.0 / (21.5 * cols) ** 0.5
    scales = ((0.5 + torch.rand(rows, bpr, device=device, generator=generator)) * base).to(torch.bfloat16)
    return words, scales


def check(device, shapes):
    """The kernel against plain PyTorch, exactly, on each [rows, cols]; then three elements against
    nibble x scale computed one by one. Returns None, or a description of the first mismatch."""
    for rows, cols in shapes:
        qw, sc = random_q4(rows, cols, device)
        got = torch.full((rows, cols), float("nan"), dtype=torch.bfloat16, device=device)
        dequantize(qw, sc, rows, cols, got)
        want = dequantize_reference(qw, sc, rows, cols)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            return (f"dequant kernel disagrees with the reference for [{rows}, {cols}] at {bad}: "
                    f"{got[tuple(bad)].item()} vs {want[tuple(bad)].item()}")
        # Independently of the reference's vectorised layout: single nibbles.
        for r, c in ((0, 0), (rows - 1, cols - 1), (rows // 2, min(cols - 1, 130))):
            word = int(qw[r, (c // BLOCK) * WORDS_PER_BLOCK + (c % BLOCK) // 8])
            nib = (word >> (4 * (c % 8))) & 0xF
            exact = (nib - 8) * float(sc[r, c // BLOCK])
            if abs(float(got[r, c]) - exact) > abs(exact) / 128 + 1e-30:
                return (f"dequant kernel: [{rows}, {cols}] element ({r}, {c}) is {float(got[r, c])}, "
                        f"nibble {nib} x scale gives {exact}")
    return None
