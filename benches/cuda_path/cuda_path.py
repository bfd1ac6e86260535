#!/usr/bin/env python3
"""The CUDA path: the original INT4 method rebuilt for comparison, at its best.

RUNS ON THE DEVICE (PyTorch with CUDA, Triton). Weights are random (speed does not depend on
values), in q4wgpu's INT4 block-128 layout. What the original method does, and how this matches
it (the modules beside this file hold each part):

  - dequant.py: a flat 1-D Triton kernel, 1024 weights per program, turns one packed weight into
    bf16 (w = (nibble - 8) * scale) just before use; then torch.nn.functional.linear in bf16.
  - streaming.py: every layer weight lives in pinned host memory; a preload thread with its own
    CUDA stream copies the weights, in forward order, into a device cache of N entries, reusing
    entries already used; each linear waits (a CUDA event) until its weight is in the cache.
    N = every weight is the resident mode (the first pass fills the cache, later passes copy
    nothing); a smaller N streams every weight once per token.
  - model.py: the decode step (Qwen2 / Llama, Hugging Face semantics), with the fixed part on the
    device: bf16 embeddings, norms, biases, the packed lm_head, the KV cache, one dequant scratch.

Decoding: the prompt is decoded once, then one untimed warm-up repetition, then -r timed
repetitions of -n steps (the same positions each time); each step ends with .item() on the token,
as q4wgpu reads each token back. Medians are reported.

Cache sizes, one run each in this process (the pinned weights are made once):
  --cache all,128,14        entries (weights); 7 per layer
  --vram-budget all,12GB    N is the most whole layers' worth of entries that fit in the budget
                            after the CUDA context and libraries (measured: device memory in use
                            less PyTorch's pool), the fixed part (PyTorch's pool after it is made)
                            and the step's transient tensors (measured in a warm-up step)
Each run records PyTorch's max_memory_allocated and max_memory_reserved; reserved plus the
context is the device memory the run needed, checked against the budget ("within_budget").

Bandwidth, measured in the same process: a 512 MiB device-to-device copy (bytes read + written
per second: the DRAM traffic of a streaming read-and-write) and a 512 MiB pinned host -> device
copy on a side stream. A run reports the INT4 bytes read per token (weights and KV cache) x tokens/s as a share
of the copy bandwidth, the DRAM traffic it causes (plus the bf16 written and read again), and, when
streaming, the PCIe bound: upload bandwidth / bytes uploaded per token (counted by the preload
thread over the timed repetitions).

Prints one markdown row per run and one JSON line each; --json writes a JSON list of the runs.
  python3 benches/cuda_path/cuda_path.py --shape qwen2-32b --vram-budget all,12GB,8GB,4GB -n 32 -r 3
  python3 benches/cuda_path/cuda_path.py --check      (dequant kernel, and cached = resident logits)

The JSON records the commit: GIT_COMMIT (and GIT_DIRTY=0/1) from the environment, else git here.

Without CUDA it refuses to run, except as a smoke test of this code on the CPU under Triton's
interpreter with the tiny shape (numbers mean nothing; the JSON says "smoke_test": true). There
the preload thread and its handshake run as on the GPU, with synchronous copies and no streams
or events (streaming.py says why that still tests the cache):
  TRITON_INTERPRET=1 python3 benches/cuda_path/cuda_path.py --cpu-smoke --shape tiny --check
  TRITON_INTERPRET=1 python3 benches/cuda_path/cuda_path.py --cpu-smoke --shape tiny --cache all,3 -n 3 -r 2
"""

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dequant  # noqa: E402
import step_profile  # noqa: E402
import measure  # noqa: E402
from model import SHAPES, Model  # noqa: E402
from streaming import HostStore, Sync, WeightCache, cache_bytes, entries_for  # noqa: E402

MiB = 1 << 20
# Held back from a budget beyond what is measured: the caching allocator's rounding of the
# slot pools and of step tensors that the warm-up step did not show.
BUDGET_MARGIN = 64 * MiB


def progress(msg):
    """A line on stderr at once (the device run keeps the log of a part that runs out of time)."""
    print(f"cuda_path: {msg}", file=sys.stderr, flush=True)


def parse_size(text):
    """'24GB', '8GiB', '512MB', '1.5G' or bytes (the units of q4wgpu's --vram-budget)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": MiB,
             "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
    if not m or m.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 24GB, 8GiB or 512MB")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def parse_list(text, item):
    out = []
    for t in text.split(","):
        t = t.strip()
        out.append(None if t.lower() in ("all", "none") else item(t))
    return out


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of entries (or 'all')") from None
    if n < 1:
        raise argparse.ArgumentTypeError("a cache holds at least 1 entry")
    return n


def label(budget):
    if budget is None:
        return "all"
    return f"{budget / 1e9:.1f} GB" if budget >= 1e9 else f"{budget / 1e9:.2g} GB"


def cached(entries, weights, layers):
    return f"{entries}/{weights} weights ({layers} layer{'' if layers == 1 else 's'}) cached"


class Bench:
    """The fixed part, the pinned weights, the bandwidths and the memory figures of one process."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.sync = Sync(device)
        self.vocab = SHAPES[args.shape][6]
        cuda = device == "cuda"
        t0 = time.perf_counter()
        self.model = Model(args.shape, args.prompt + max(args.n, args.streamed_n) + 1, device)
        self.sync.synchronize()
        self.fixed_bytes = torch.cuda.memory_allocated() if cuda else self.fixed_tensor_bytes()
        self.store = HostStore(self.model.kinds, self.model.layers, device, pin=cuda)
        self.sync.synchronize()
        self.load_s = time.perf_counter() - t0
        progress(f"{args.shape}: fixed part {self.fixed_bytes / 1e9:.2f} GB on the device, "
                 f"{self.store.count} layer weights ({self.store.layers * self.store.layer_bytes / 1e9:.2f} GB) "
                 f"in {'pinned' if cuda else 'CPU'} host memory, ready in {self.load_s:.1f} s")
        # 512 MiB: far beyond the L2 cache, and small beside a budget (these buffers show in the
        # first run's VRAM samples).
        self.probe = probe = 512 * MiB if cuda else 16 * MiB
        self.copy_bw = measure.copy_bandwidth(self.sync, device, probe)
        self.upload_bw = measure.upload_bandwidth(self.sync, self.store, device, probe)
        progress(f"device copy {self.copy_bw / 1e9:.0f} GB/s (read + written), "
                 f"pinned upload {self.upload_bw / 1e9:.1f} GB/s")
        self.context_bytes, self.transient_bytes, self.device_total = 0, 0, None
        self.fixed_reserved = self.fixed_bytes
        if cuda:
            self.measure_overheads()

    def fixed_tensor_bytes(self):
        m = self.model
        tensors = [m.embed, m.norm, m.lm_qweight, m.lm_scales, m.inv_freq, m.k_cache, m.v_cache, m.scratch]
        tensors += [t for L in m.per_layer for t in L.values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def measure_overheads(self):
        """One step with a one-layer cache loads every kernel and library module; then the device
        memory outside PyTorch's pool is the context's, and the step's peak beyond the fixed part
        and the cache is its transient tensors."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = WeightCache(self.store, 7, self.device, self.sync)
        with torch.inference_mode():
            self.model.step(0, 0, cache).item()
        cache.close()
        self.transient_bytes = max(0, torch.cuda.max_memory_allocated() - self.fixed_bytes - cache.nbytes)
        del cache
        gc.collect()
        torch.cuda.empty_cache()
        used, self.device_total = measure.device_used_bytes()
        self.fixed_reserved = torch.cuda.memory_reserved()
        self.context_bytes = used - self.fixed_reserved
        progress(f"CUDA context and modules {self.context_bytes / 1e9:.2f} GB, step transients "
                 f"{self.transient_bytes / 1e6:.0f} MB, fixed part reserved {self.fixed_reserved / 1e9:.2f} GB")

    def entries_for_budget(self, budget):
        """(entries, None) for a budget, or (None, why not)."""
        if budget is None:
            return self.store.count, None
        margin = BUDGET_MARGIN if self.device == "cuda" else 0
        room = budget - self.context_bytes - self.fixed_reserved - self.transient_bytes - margin
        entries = entries_for(self.store, max(0, room))
        if entries == 0:
            layer = cache_bytes(self.store, 7)
            return None, (f"budget {label(budget)} leaves {room / 1e9:.3f} GB after the CUDA context "
                          f"({self.context_bytes / 1e9:.3f} GB), the fixed part ({self.fixed_reserved / 1e9:.3f} GB), "
                          f"step transients and a {margin >> 20} MiB margin; one layer's entries need {layer / 1e9:.3f} GB")
        return entries, None

    def run(self, entries, budget):
        """Decodes with a cache of `entries`; returns the result dict."""
        args, model, sync = self.args, self.model, self.sync
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model.reset()
        cache = WeightCache(self.store, entries, self.device, sync)
        tag = f"cache {cache.entries}" if budget is None and self.args.cache else label(budget)
        progress(f"{tag}: {cached(cache.entries, self.store.count, cache.slots_per_kind)}, "
                 f"{cache.nbytes / 1e9:.2f} GB of slots")
        prompt = torch.randint(0, self.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
        steps, reps = (args.n, args.r) if cache.resident else (args.streamed_n, args.streamed_r)
        generated = []
        with torch.inference_mode():
            first = 0
            for p, t in enumerate(prompt):
                first = model.step(t, p, cache).item()

            def decode(keep=False):
                tok = first
                start = time.perf_counter()
                for i in range(steps):
                    tok = model.step(tok, args.prompt + i, cache).item()
                    if keep:
                        generated.append(tok)
                return steps / (time.perf_counter() - start)

            warm = decode(keep=True)  # also fills a resident cache; untimed
            progress(f"{tag}: warm-up {warm:.2f} tok/s")
            rates = []
            copied0 = cache.bytes_copied
            for _ in range(reps):
                rates.append(decode())
                progress(f"{tag}: repetition {len(rates)}: {rates[-1]:.2f} tok/s")
            copied = cache.bytes_copied - copied0
        cache.close()
        result = self.result(cache, budget, steps, rates, copied / (steps * reps), generated)
        cache = None  # frees the slots (close() waited for their copies)
        gc.collect()
        if cuda:
            result["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            result["max_memory_reserved"] = torch.cuda.max_memory_reserved()
            result["device_bytes_estimate"] = result["max_memory_reserved"] + self.context_bytes
            if budget is not None:
                result["within_budget"] = result["device_bytes_estimate"] <= budget
            # Before the row is printed: nvidia-smi's samples after it belong to the next run.
            torch.cuda.empty_cache()
        return result

    def result(self, cache, budget, steps, rates, streamed, generated):
        args, model, store = self.args, self.model, self.store
        tps = statistics.median(rates)
        weight_bytes = store.layers * store.layer_bytes + model.lm.nbytes
        mean_kv = args.prompt + (steps + 1) / 2
        bytes_per_token = weight_bytes + mean_kv * model.kv_bytes_per_position
        elements = store.layers * sum(p.rows * p.cols for p in model.kinds.values()) + model.vocab * model.h
        traffic = bytes_per_token + 2 * 2 * elements  # + bf16 written by the dequant, read by F.linear
        bound = self.upload_bw / streamed if streamed else None
        return {
            "system": "cuda_path",
            "shape": args.shape,
            "budget": budget,
            "mode": "resident" if cache.resident else "streamed",
            "cache_entries": cache.entries,
            "cache_layers": cache.slots_per_kind,
            "weights": store.count,
            "layers": store.layers,
            "layer_bytes": store.layer_bytes,
            "cache_bytes": cache.nbytes,
            "fixed_bytes": self.fixed_bytes,
            "context_bytes": self.context_bytes,
            "transient_bytes": self.transient_bytes,
            "test": f"tg{steps}",
            "tokens": steps,
            "prompt_tokens": args.prompt,
            "repetitions": len(rates),
            "tokens_per_second": tps,
            "tokens_per_second_min": min(rates),
            "tokens_per_second_max": max(rates),
            "samples": rates,
            "weight_bytes": weight_bytes,
            "int4_bytes_per_token": bytes_per_token,
            "achieved_bytes_per_second": bytes_per_token * tps,
            "bandwidth_probe_bytes": self.probe,
            "copy_bandwidth": self.copy_bw,
            "fraction_of_copy_bandwidth": bytes_per_token * tps / self.copy_bw,
            "dram_bytes_per_token": traffic,
            "dram_fraction_of_copy_bandwidth": traffic * tps / self.copy_bw,
            "streamed_bytes_per_token": streamed,
            "upload_bandwidth": self.upload_bw,
            "pcie_bound_tokens_per_second": bound,
            "fraction_of_pcie_bound": tps / bound if bound else None,
            "copies": cache.copies,
            "pinned_host_bytes": store.pinned_bytes,
            "load_seconds": self.load_s,
            "generated": generated,
        }


def check_cache(device, shape, positions=3):
    """Cached and streamed decoding against the resident one, logits bit for bit; the resident
    one against plain PyTorch dequantization; copy counts as the cache's design says; and one
    altered weight byte must change the logits (the comparison can fail). Returns None or a
    description of the first failure."""
    sync = Sync(device)
    model = Model(shape, positions + 1, device)
    store = HostStore(model.kinds, model.layers, device, pin=device == "cuda")
    tokens = torch.randint(0, model.vocab, (positions,), generator=torch.Generator().manual_seed(2)).tolist()
    count = store.count

    def decode(entries, dq=dequant.dequantize):
        model.dequant = dq
        model.reset()
        cache = WeightCache(store, entries, device, sync)
        with torch.inference_mode():
            out = torch.cat([model.logits(t, p, cache).float().cpu() for p, t in enumerate(tokens)])
        cache.close()
        model.dequant = dequant.dequantize
        return out, cache.copies

    want, copies = decode(count)
    if copies != count:
        return f"{shape}: the resident cache copied {copies} weights over {positions} steps; each weight once is {count}"
    if not torch.isfinite(want).all():
        return f"{shape}: resident logits are not finite"
    plain, _ = decode(count, dequant.dequantize_reference)
    if not torch.equal(want, plain):
        return f"{shape}: resident logits with the Triton kernel differ from those with plain PyTorch dequantization"
    # 1 and 5: fewer entries than a layer; 7: one layer; 10: one layer and a half (two layers'
    # slots); count - 1: all but one weight. A cache with a slot for every weight keeps them;
    # a smaller one never hits (streaming.py), so it copies every weight at every step.
    for n in sorted({1, 5, 7, 10, count - 1}):
        got, copies = decode(n)
        if not torch.equal(want, got):
            p = int((want != got).any(-1).nonzero()[0])
            diff = (want - got).abs().max().item()
            return f"{shape}: cache of {n} entries: logits at position {p} differ from resident (max |diff| {diff})"
        steady = count if math.ceil(n / 7) >= model.layers else count * positions
        if not steady <= copies <= steady + n:
            return (f"{shape}: cache of {n} entries copied {copies} weights over {positions} steps; "
                    f"expected {steady} (+ up to {n} ahead)")
    blob = store.blobs[3]  # layer 0's o projection (q and k cannot matter at position 0)
    saved = blob.clone()
    blob[5] ^= 0x11
    got, _ = decode(1)
    blob.copy_(saved)
    if torch.equal(want, got):
        return f"{shape}: altering a byte of layer 0's o weight left the logits unchanged: the comparison cannot fail"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-32b")
    sizes = ap.add_mutually_exclusive_group()
    sizes.add_argument("--cache", type=lambda t: parse_list(t, positive_int),
                       help="cache sizes in weights (entries), comma-separated; 'all' is resident")
    sizes.add_argument("--vram-budget", type=lambda t: parse_list(t, parse_size),
                       help="VRAM budgets, comma-separated (e.g. all,12GB,8GB,4GB); default all")
    ap.add_argument("-n", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("-r", type=int, default=3, help="timed repetitions (after one warm-up)")
    ap.add_argument("--streamed-n", type=int, help="-n for the runs that stream (default: -n)")
    ap.add_argument("--streamed-r", type=int, help="-r for the runs that stream (default: -r)")
    ap.add_argument("--prompt", type=int, default=4, help="tokens decoded once before the warm-up")
    ap.add_argument("--json", help="also write the results, a JSON list, to this file")
    ap.add_argument("--check", action="store_true",
                    help="check the dequant kernel against plain PyTorch (awkward and this shape's matrix sizes) and "
                         "cached/streamed logits against resident ones on small shapes, then exit")
    ap.add_argument("--profile", action="store_true",
                    help="print where one decode step's time goes (host queueing, GPU kernels) for the first "
                         "cache size asked for, then exit (step_profile.py)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="without CUDA, run on the CPU under TRITON_INTERPRET=1 (tiny shape only): tests the code, measures nothing")
    args = ap.parse_args()
    args.streamed_n = args.streamed_n or args.n
    args.streamed_r = args.streamed_r or args.r
    if min(args.n, args.r, args.prompt, args.streamed_n, args.streamed_r) < 1:
        ap.error("-n, -r, --streamed-n, --streamed-r and --prompt must be at least 1")

    if torch.cuda.is_available() and not args.cpu_smoke:
        device = "cuda"
        if dequant.INTERPRETED:
            sys.exit("cuda_path.py: TRITON_INTERPRET is set; unset it for the GPU benchmark")
    elif args.cpu_smoke:
        if not dequant.INTERPRETED:
            sys.exit("cuda_path.py: --cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
        if args.shape != "tiny":
            sys.exit("cuda_path.py: --cpu-smoke runs only --shape tiny")
        device = "cpu"
    else:
        sys.exit("cuda_path.py: CUDA is not available (torch.cuda.is_available() is False; "
                 f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); this benchmark needs an NVIDIA GPU. "
                 "A smoke test of the code on the CPU: TRITON_INTERPRET=1 ... --cpu-smoke --shape tiny")

    torch.manual_seed(0)
    _, h, _, ffn, heads, kv_heads, vocab = SHAPES[args.shape][:7]
    kv = kv_heads * (h // heads)
    awkward = [(37, 300), (16, 128), (5, 1000), (3, 1024 + 128)]
    if args.check:
        real = sorted({(h, h), (kv, h), (ffn, h), (h, ffn), (vocab, h)})
        if device == "cpu":  # the interpreter is slow: a few rows of each real width
            real = sorted({(min(r, 40), c) for r, c in real})
        bad = dequant.check(device, awkward + real)
        if bad:
            sys.exit(bad)
        print("dequant kernel == plain PyTorch for", ", ".join(f"[{r}, {c}]" for r, c in awkward + real), flush=True)
        for shape in ["tiny"] + (["qwen2-0.5b"] if device == "cuda" else []):
            t0 = time.perf_counter()
            bad = check_cache(device, shape)
            if bad:
                sys.exit(bad)
            print(f"{shape}: cached and streamed logits == resident logits == plain-PyTorch-dequant logits, "
                  f"bit for bit ({time.perf_counter() - t0:.1f} s)", flush=True)
        return 0
    bad = dequant.check(device, awkward)  # cheap, every run: a wrong kernel must not produce numbers
    if bad:
        sys.exit(bad)

    bench = Bench(args, device)
    commit, dirty = measure.git_info()
    plan = [(c if c is not None else bench.store.count, None) for c in args.cache] if args.cache else \
        [(None, b) for b in (args.vram_budget or [None])]
    if args.profile:
        entries, budget = plan[0]
        if entries is None:
            entries, why = bench.entries_for_budget(budget)
            if why:
                sys.exit(why)
        step_profile.run(bench, entries)
        return 0
    results, skipped = [], []
    for entries, budget in plan:
        if entries is None:
            entries, why = bench.entries_for_budget(budget)
            if why:
                progress(f"skipped: {why}")
                skipped.append({"budget": budget, "reason": why})
                continue
        r = bench.run(entries, budget)
        r.update({
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test, Triton interpreter)",
            "device_total_bytes": bench.device_total,
            "smoke_test": device != "cuda",
            "git_commit": commit,
            "git_dirty": dirty,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "command": " ".join(["cuda_path.py"] + sys.argv[1:]),
            "unix_time": int(time.time()),
        })
        k = min(len(r["generated"]), len(results[0]["generated"])) if results else 0
        if k and r["generated"][:k] != results[0]["generated"][:k]:
            r["generated_differs_from_first_run"] = True  # same weights, prompt and steps: must not happen
            progress(f"WARNING: {label(budget)} generated other tokens than the first run")
        results.append(r)
        print_row(r)
    for r in results:
        r["skipped"] = skipped
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh)
            fh.write("\n")
    return 0 if results else 1


def print_row(r):
    """The markdown row (budget in the second cell and the test in the fourth, as q4wgpu's rows, so
    that bench-report.py can split the part's VRAM samples by budget), then the JSON line."""
    gb = r["int4_bytes_per_token"] / 1e9
    bound = r["pcie_bound_tokens_per_second"]
    bound_cells = "— | —" if bound is None else f"{bound:.2f} | {100 * r['fraction_of_pcie_bound']:.0f} %"
    peak = r.get("max_memory_reserved")
    peak_cell = "—" if peak is None else f"{peak / 1e9:.2f}"
    print(f"| {r['shape']} | {label(r['budget'])} | CUDA path, {cached(r['cache_entries'], r['weights'], r['cache_layers'])} "
          f"| {r['test']} | {r['tokens_per_second']:.2f} "
          f"| {r['tokens_per_second_min']:.2f}–{r['tokens_per_second_max']:.2f} | {gb:.3f} "
          f"| {r['streamed_bytes_per_token'] / 1e9:.3f} | {100 * r['fraction_of_copy_bandwidth']:.0f} % "
          f"| {bound_cells} | {peak_cell} |", flush=True)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
