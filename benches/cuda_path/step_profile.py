"""Where a CUDA-path decode step spends its time (cuda_path.py --profile): the host's time to
queue one step (Python and launches) against the step's wall time, the same with the next token
kept on the device (no .item() between steps, so the host may run ahead), and the GPU time per
kernel from torch.profiler. Prints a few lines; measures nothing that goes into a result row.
"""

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from streaming import WeightCache


def run(bench, entries, steps=8):
    model, sync, args = bench.model, bench.sync, bench.args
    model.reset()
    cache = WeightCache(bench.store, entries, bench.device, sync)
    pos = 0
    with torch.inference_mode():
        tok = torch.zeros((), dtype=torch.long, device=bench.device)
        for _ in range(args.prompt + steps):  # warm-up: fills a resident cache, compiles kernels
            tok = model.step(tok, pos, cache)
            pos += 1
        sync.synchronize()

        queued, walls = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = model.step(tok, pos, cache)
            t1 = time.perf_counter()
            tok.item()
            queued.append(t1 - t0)
            walls.append(time.perf_counter() - t0)
            pos += 1
        q, w = statistics.median(queued) * 1e3, statistics.median(walls) * 1e3
        print(f"profile: one step (ends with .item()): host queues it in {q:.1f} ms, "
              f"wall {w:.1f} ms ({1e3 / w:.2f} tok/s)", flush=True)

        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model.step(tok, pos, cache)
            pos += 1
        sync.synchronize()
        w = (time.perf_counter() - t0) / steps * 1e3
        print(f"profile: {steps} steps with the token kept on the device: {w:.1f} ms per step "
              f"({1e3 / w:.2f} tok/s)", flush=True)

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                tok = model.step(tok, pos, cache)
                pos += 1
            sync.synchronize()
    cache.close()
    averages = prof.key_averages()
    # Kernels only: an op's row also carries the time of the kernels it launched, so summing
    # every row counts those twice (the first run of this printed 72.7 ms for a 50 ms step).
    gpu_us = sum(e.self_device_time_total for e in averages
                 if str(getattr(e, "device_type", "")).endswith("CUDA")) / 3
    print(f"profile: GPU busy {gpu_us / 1e3:.1f} ms per step (sum of kernel times); top kernels:", flush=True)
    print(averages.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60), flush=True)
