"""What the CUDA path measures besides tokens/s: the device's copy and upload bandwidths in the
same process, its memory, and the commit measured."""

import os
import statistics
import subprocess
import time

import torch


def median_seconds(sync, stream, fn, reps=5, warm=2):
    """Median time of fn() on `stream` (CUDA events), or of the CPU call (the smoke test)."""
    times = []
    with sync.on(stream):
        for i in range(warm + reps):
            if sync.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            if i >= warm:
                times.append(seconds)
    return statistics.median(times)


def copy_bandwidth(sync, device, nbytes):
    """Device-to-device copy of nbytes: bytes read plus bytes written per second, the DRAM traffic
    a streaming read-and-write reaches (the CUDA path's dequantization is such a stream)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = median_seconds(sync, None if not sync.cuda else torch.cuda.current_stream(), lambda: dst.copy_(src))
    return 2 * nbytes / t  # the buffers are freed on return


def upload_bandwidth(sync, store, device, nbytes):
    """Pinned host -> device, one copy of up to nbytes of the host store's largest chunk, on a side
    stream as the preload thread copies: bytes per second."""
    src = max(store.chunks, key=lambda c: c.numel())[:nbytes]
    dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
    t = median_seconds(sync, sync.stream(), lambda: dst.copy_(src, non_blocking=True))
    return src.numel() / t


def device_used_bytes():
    """Device memory in use by everything (CUDA context, libraries' modules, PyTorch's pool)."""
    free, total = torch.cuda.mem_get_info()
    return total - free, total


def git_info():
    """(commit, dirty): from GIT_COMMIT / GIT_DIRTY (scripts/device-bench.sh exports them once),
    else from git in this checkout; None where neither says."""
    commit = os.environ.get("GIT_COMMIT") or None
    dirty = os.environ.get("GIT_DIRTY") or None  # empty: not known
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    if commit is None:
        commit = (git("rev-parse", "HEAD") or "").strip() or None
    if dirty is not None:
        dirty = dirty.strip().lower() in ("1", "true", "yes")
    elif commit is not None and not os.environ.get("GIT_COMMIT"):  # both from this checkout
        status = git("status", "--porcelain")
        dirty = None if status is None else bool(status.strip())
    return commit, dirty
