#!/usr/bin/env python3
"""Turns the results of scripts/device-bench.sh into BENCHMARKS.md tables and a plot.

  python3 scripts/bench-report.py RESULTS [RESULTS...] [--plot bench-budget.png] > BENCHMARKS.md

RESULTS: folders (or single files) of what the device run wrote under $OUT: machine.txt, the
JSON results, logs.tar.gz (read in place: the part logs, with each line's arrival time, and
vram.log, nvidia-smi's samples of the GPU's memory use). JSON files are recognised by content,
whatever their names: `q4wgpu bench --json` reports, benches/cuda_path/cuda_path.py results (a
list of runs, one per cache size or budget; older files: one object) and llama-bench -o json lists
(device-bench.sh merges every llama.cpp row, CUDA and Vulkan, into llama_bench.json; Vulkan rows
carry vk_config and the driver's matrix-core path, see benches/llama_cpp/results.py). Missing or
unreadable parts are left out with a note.
The plot (decode tokens/s against the VRAM budget, with the PCIe bound) needs matplotlib; without
it the report says so.
"""

import argparse
import datetime
import io
import json
import os
import re
import statistics
import sys
import tarfile

# DESIGN.md §6 targets, quoted next to the measured ratios.
TARGET_RESIDENT_FRACTION = 0.70
TARGET_VS_LLAMA = 1.35
TARGET_VS_CUDA = 7.0
TARGET_FRACTION_OF_MODEL = 0.90
# The 32B shape (DESIGN.md §3), for the llama.cpp byte estimate when no q4wgpu report gives it.
QWEN2_32B = {"hidden_size": 5120, "vocab_size": 152064, "num_hidden_layers": 64,
             "num_attention_heads": 40, "num_key_value_heads": 8}


def gb(b):
    return b / 1e9


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def pct(fraction):
    return "—" if fraction is None else f"{100 * fraction:.0f} %"


def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}×"


def spread(lo, hi, digits=2):
    return "—" if lo is None else f"{lo:.{digits}f}–{hi:.{digits}f}"


def budget_label(b):
    return "all" if b is None else f"{gb(b):.0f} GB"


def short_model(name):
    return name.replace(" (synthetic)", "")


# ---------------------------------------------------------------- reading the results


def gather(paths, notes):
    """{base name: bytes}: files in the folders given (or the files themselves), then the members
    of any .tar.gz among them; a name seen first wins."""
    files = {}
    tars = []

    def add(path):
        name = os.path.basename(path)
        if name.endswith((".tar.gz", ".tgz")):
            tars.append(path)
        elif name not in files:
            with open(path, "rb") as fh:
                files[name] = fh.read()

    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                full = os.path.join(p, name)
                if os.path.isfile(full):
                    add(full)
        elif os.path.isfile(p):
            add(p)
        else:
            notes.append(f"{p}: not found")
    for t in tars:
        try:
            with tarfile.open(t) as tf:
                for m in tf.getmembers():
                    name = os.path.basename(m.name)
                    if m.isfile() and name and name not in files:
                        files[name] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            notes.append(f"{os.path.basename(t)}: unreadable ({e})")
    return files


def parse_json(text):
    text = text.strip()
    if not text:
        raise ValueError("empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # cuda_path.py prints its JSON as the last line: tolerate a log that ends with it.
        return json.loads(text.splitlines()[-1])


def stamped_lines(data):
    """(epoch seconds, text) for each line of a part log that device-bench.sh timestamped."""
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        try:
            out.append((float(head), rest))
        except ValueError:
            continue
    return out


class Results:
    def __init__(self, paths):
        self.notes = []
        files = gather(paths, self.notes)
        self.files = files
        self.machine = self.read_machine(files)
        self.q4 = []
        self.cuda = []  # cuda_path.py runs, normalised by cuda_run()
        self.llama = []
        for name in sorted(n for n in files if n.endswith(".json")):
            try:
                data = parse_json(files[name].decode("utf-8", "replace"))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                self.notes.append(f"{name}: not readable as JSON ({e}); left out")
                continue
            if isinstance(data, dict) and "rows" in data and "bandwidth" in data:
                data["_file"] = name
                self.q4.append(data)
            elif is_cuda_path(data):
                runs = data if isinstance(data, list) else [data]
                if any(run.get("smoke_test") for run in runs):
                    self.notes.append(f"{name}: a CPU smoke test of cuda_path.py, not a measurement; left out")
                    continue
                for run in runs:
                    run = cuda_run(run)
                    key = (run["shape"], run["budget"], run["cache_entries"], run["mode"])
                    if any((r["shape"], r["budget"], r["cache_entries"], r["mode"]) == key for r in self.cuda):
                        self.notes.append(f"{name}: a second CUDA-path run of {run['shape']} at {budget_label(run['budget'])}; left out")
                    else:
                        run["_file"] = name
                        self.cuda.append(run)
            elif isinstance(data, list) and data and all(isinstance(r, dict) and "avg_ts" in r for r in data):
                self.llama += data
            elif isinstance(data, list) and not data:
                self.notes.append(f"{name}: empty list (llama-bench measured nothing?); left out")
            else:
                self.notes.append(f"{name}: not a result this report knows; left out")
        if not self.q4:
            self.notes.append("no q4wgpu results")
        if not self.cuda:
            self.notes.append("no CUDA-path results")
        # Every table here is about the 32B shape (the GB/token estimate assumes it).
        other = [r for r in self.llama if "32B" not in (r.get("model_type") or "")]
        if other:
            kinds = sorted({str(r.get("model_type")) for r in other})
            self.notes.append(f"{len(other)} llama.cpp row(s) of another model ({', '.join(kinds)}) left out")
            self.llama = [r for r in self.llama if r not in other]
        if not self.llama:
            self.notes.append("no llama.cpp results")
        self.vram = VramLog(files, self.notes)

    @staticmethod
    def read_machine(files):
        # machine.txt, or one per set of a split run: each set's lines, its date, commit and
        # command included (two calls must name the same commit to be one comparison).
        names = [n for n in sorted(files) if re.match(r"^machine(-\w+)?\.txt$", n)]
        if names:
            pairs = []
            for name in names:
                for line in files[name].decode("utf-8", "replace").splitlines():
                    key, sep, value = line.partition(":")
                    if sep and (key.strip(), value.strip()) not in pairs:
                        pairs.append((key.strip(), value.strip()))
            return pairs
        if "gpu.txt" in files:  # older runs
            lines = files["gpu.txt"].decode("utf-8", "replace").strip().splitlines()
            return [("gpu", lines[-1])] if lines else []
        return []

    # q4wgpu rows, each with its report (bandwidth, command)

    def q4_rows(self, shape=None, coop=True):
        """q4wgpu rows (of `shape`), from runs with cooperative matrices on (coop=False: off,
        as `bench --no-coop`; None: every run)."""
        for rep in self.q4:
            if coop is not None and rep.get("cooperative_matrices", True) != coop:
                continue
            for row in rep["rows"]:
                if shape is None or row["model"].startswith(shape):
                    yield rep, row

    def q4_resident(self, shape, test_prefix, coop=True):
        """The row of `shape` with no budget (else the first all-resident one) whose test starts so,
        measured with cooperative matrices on (coop=False: a --no-coop run's)."""
        best = None
        for rep, row in self.q4_rows(shape, coop):
            # Not a depth row ("tg128 @ d4096"), and the default decode activations where a run
            # measured several.
            if (not row["test"].startswith(test_prefix) or row["streamed_layers"] != 0
                    or "@" in row["test"] or row.get("decode_activations", "int8") != "int8"):
                continue
            if row["budget"] is None:
                return rep, row
            best = best or (rep, row)
        return best or (None, None)

    def q4_budget_pairs(self):
        """(report, decode row, prompt row) for each model and budget, in the order measured."""
        seen = {}
        for rep, row in self.q4_rows():
            if "@" in row["test"] or row.get("decode_activations", "int8") != "int8":
                continue
            key = (row["model"], row["budget"])
            entry = seen.setdefault(key, [rep, None, None])
            if row["test"].startswith("tg"):
                entry[1] = row
            elif row["test"].startswith("pp"):
                entry[2] = row
        # Largest budget first within each model (the runs may come in any order).
        def order(v):
            row = v[1] or v[2]
            return (row["model"], row["budget"] is not None, -(row["budget"] or 0))
        return sorted((tuple(v) for v in seen.values()), key=order)

    def bandwidth(self):
        """(read, upload) bytes/s measured by q4wgpu in this run (the first report's)."""
        for rep in self.q4:
            bw = rep["bandwidth"]
            return bw["read"], bw["upload"]
        return None, None

    def config_32b(self):
        for rep in self.q4:
            if rep["model"].startswith("qwen2-32b"):
                return rep["config"]
        return QWEN2_32B

    # the CUDA path

    def cuda_resident(self, shape):
        """The CUDA path's run of `shape` with every weight cached and no budget (else any resident one)."""
        runs = [r for r in self.cuda if r["shape"] == shape and r["mode"] == "resident"]
        return next((r for r in runs if r["budget"] is None), runs[0] if runs else None)

    def cuda_budgeted(self):
        """The CUDA path's runs that stream (a budget or a cache smaller than the model), in the order measured."""
        return [r for r in self.cuda if r["mode"] == "streamed"]

    def cuda_at(self, shape, budget):
        """The CUDA path's run of `shape` at `budget` (bytes), if any."""
        for r in self.cuda:
            if r["shape"] == shape and r["budget"] is not None and budget is not None and round(gb(r["budget"]), 1) == round(gb(budget), 1):
                return r
        return None

    # llama.cpp

    def llama_row(self, gen, ngl=99, system="llama.cpp CUDA"):
        """The system's tg row (gen) or pp row at depth 0, preferring tg128 / pp512."""
        found = [r for r in self.llama
                 if llama_system(r) == system and r.get("n_gpu_layers") == ngl and not r.get("n_depth")
                 and (r.get("n_gen", 0) > 0) == gen and (r.get("n_prompt", 0) > 0) != gen]
        for r in found:
            if (r.get("n_gen") if gen else r.get("n_prompt")) == (128 if gen else 512):
                return r
        return found[0] if found else None

    def llama_systems(self):
        """{system name: [rows]}: llama.cpp CUDA, then the Vulkan configurations in VK_CONFIGS order."""
        out = {}
        for r in sorted(self.llama, key=llama_system_order):
            out.setdefault(llama_system(r), []).append(r)
        return out


# Our names for the llama.cpp Vulkan runs (benches/llama_cpp/run_vulkan.sh): what to call them and
# the `matrix cores:` value the driver should then report.
VK_CONFIGS = {
    "coopmat2": ("NV coopmat2 (default)", "NV_coopmat2"),
    "khr": ("KHR coopmat only", "KHR_coopmat"),
    "none": ("no coopmat (integer dot)", "none"),
}


def llama_system(r):
    """The llama.cpp system a row measured: its backend and, for Vulkan, the configuration, with the
    matrix-core path the driver reported (flagged when it is not the one asked for)."""
    cfg = r.get("vk_config")
    if not cfg:
        return f"llama.cpp {r.get('backends') or '?'}"
    label, want = VK_CONFIGS.get(cfg, (cfg, None))
    got = r.get("vk_matrix_cores")
    if got is None:
        return f"llama.cpp Vulkan, {label} (matrix cores not logged)"
    if want and not got.startswith(want):
        return f"llama.cpp Vulkan, {label} (**matrix cores: {got}**, not {want})"
    return f"llama.cpp Vulkan, {label} (matrix cores: {got})"


def llama_system_order(r):
    cfg = r.get("vk_config")
    order = list(VK_CONFIGS)
    return (1 if cfg or "Vulkan" in (r.get("backends") or "") else 0, order.index(cfg) if cfg in order else len(order))


def llama_test(r):
    """llama-bench's own test name: pp512, tg128, tg32 @ d4096."""
    n_p, n_g, d = r.get("n_prompt", 0), r.get("n_gen", 0), r.get("n_depth", 0)
    name = f"pp{n_p}+tg{n_g}" if n_p and n_g else f"tg{n_g}" if n_g else f"pp{n_p}"
    return name + (f" @ d{d}" if d else "")


def llama_test_order(r):
    return (r.get("n_depth", 0), 1 if r.get("n_gen") else 0, r.get("n_prompt", 0), r.get("n_gen", 0))


def is_cuda_path(data):
    if isinstance(data, dict):
        return data.get("system") == "cuda_path"
    return isinstance(data, list) and bool(data) and all(isinstance(r, dict) and r.get("system") == "cuda_path" for r in data)


def cuda_run(r):
    """A cuda_path.py run with the fields of its current form; files from before the N-entry cache
    ("mode": resident or streamed, no budget) become a resident run and an every-layer-streamed run."""
    r = dict(r)
    r.setdefault("budget", None)
    r.setdefault("cache_entries", None)  # None: not recorded (old files)
    r.setdefault("cache_layers", None)
    r.setdefault("weights", None)
    if "max_memory_reserved" not in r and r.get("peak_gpu_memory_gb") is not None:
        r["max_memory_allocated"] = r["peak_gpu_memory_gb"] * 1e9
    return r


def cuda_label(r):
    """What a CUDA-path run kept on the device: 'N/M weights (L layers) cached'."""
    if r["cache_entries"] is None:
        return "every weight resident" if r["mode"] == "resident" else "every layer streamed, no cache"
    layers = r["cache_layers"]
    return f"{r['cache_entries']}/{r['weights']} weights ({layers} layer{'' if layers == 1 else 's'}) cached"


def llama_rate(r):
    """(median, min, max) tokens/s of a llama-bench row (avg_ts when it has no samples)."""
    samples = r.get("samples_ts") or []
    if samples:
        return statistics.median(samples), min(samples), max(samples)
    return r["avg_ts"], None, None


def llama_bytes_per_token(r, cfg):
    """≈ what one decoded token reads: the model file less the embedding table (one row of it is
    read), plus the mean KV cache (f16) over the test. An estimate: llama-bench does not say."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    embed = vocab * h * 18 / 32  # Q4_0: 18 bytes per 32 weights
    mean_ctx = r.get("n_depth", 0) + (r.get("n_gen", 0) + 1) / 2
    return r["model_size"] - embed + layers * 2 * kv * 2 * mean_ctx


# ---------------------------------------------------------------- VRAM samples


class VramLog:
    """nvidia-smi's memory.used samples (vram.log), per part, and each budget's peak: the budget's
    interval runs from the previous budget's last result line in the part log (or the part's
    start) to its own last one."""

    def __init__(self, files, notes):
        self.parts = {}  # name -> {"start", "end", "samples": [(t, MiB)], "total": MiB}
        self.notes = notes
        # vram.log, or one per set of a split run (vram-budgets.log, vram-resident.log).
        logs = [n for n in sorted(files) if re.match(r"^vram(-\w+)?\.log$", n)]
        lines = [line for n in logs for line in files[n].decode("utf-8", "replace").splitlines()]
        current = None
        for line in lines:
            if line.startswith("# start "):
                _, _, name, t = line.split()[:4]
                current = self.parts.setdefault(name, {"start": float(t), "end": None, "samples": [], "total": None})
            elif line.startswith("# end ") and current is not None:
                current["end"] = float(line.split()[3])
                current = None
            elif current is not None:
                cells = [c.strip() for c in line.split(",")]
                try:
                    t = datetime.datetime.strptime(cells[0], "%Y/%m/%d %H:%M:%S.%f")
                    t = t.replace(tzinfo=datetime.timezone.utc).timestamp()
                    used = float(cells[1])
                except (ValueError, IndexError):
                    continue
                current["samples"].append((t, used))
                if len(cells) > 2:
                    try:
                        current["total"] = float(cells[2])
                    except ValueError:
                        pass
        for name, p in self.parts.items():
            if p["samples"]:
                # nvidia-smi was asked for UTC; if it printed local time after all, the first sample
                # is off from the part's start by whole quarter hours: take that offset out.
                off = p["start"] - p["samples"][0][0]
                if abs(off) > 60:
                    shift = round(off / 900) * 900
                    p["samples"] = [(t + shift, u) for t, u in p["samples"]]
                    notes.append(f"vram.log: {name}'s samples shifted by {shift / 3600:+.2f} h (time zone)")

    def budget_peaks(self, files):
        """{(part, model, budget label in GB or None): (peak MiB, idle MiB, samples)}."""
        out = {}
        for name, p in self.parts.items():
            if not p["samples"]:
                continue
            idle = min(u for _, u in p["samples"])
            # The last result line of each (model, budget) in the part's log.
            last = {}
            order = []
            for t, text in stamped_lines(files.get(f"{name}.log", b"")):
                cells = [c.strip() for c in text.strip().strip("|").split("|")]
                if len(cells) < 5 or not re.match(r"^(pp|tg)\d+$", cells[3]):
                    continue
                key = (short_model(cells[0]), None if cells[1] == "all" else float(cells[1].split()[0]))
                if key not in last:
                    order.append(key)
                last[key] = t
            begin = p["start"]
            for key in order:
                window = [u for t, u in p["samples"] if begin <= t <= last[key]]
                if window:
                    out[(name,) + key] = (max(window), idle, len(window))
                begin = last[key]
            if not order:  # no result line to split it by: the whole part
                out[(name, "(whole part)", None)] = (max(u for _, u in p["samples"]), idle, len(p["samples"]))
        return out


# ---------------------------------------------------------------- sections


def machine_section(res):
    out = ["## Machine and run", ""]
    out.append("| what | |")
    out.append("| --- | --- |")
    for key, value in res.machine:
        out.append(f"| {key} | {value.replace('|', '/')} |")
    if not res.machine:
        out.append("| machine | (machine.txt missing) |")
    for rep in res.q4[:1]:
        bw = rep["bandwidth"]
        out.append(f"| q4wgpu adapter | {rep['adapter']} ({rep['backend']}, driver {rep['driver']}) |")
        out.append(f"| measured read bandwidth | {gb(bw['read']):.0f} GB/s (q4wgpu's streaming-read kernel, "
                   f"{bw['buffer_bytes'] >> 20} MiB) |")
        out.append(f"| measured upload bandwidth | {gb(bw['upload']):.1f} GB/s (q4wgpu: 8 copies per submit, from "
                   f"{'host memory' if bw['upload_from_host_memory'] else 'a MAP_WRITE buffer'}) |")
        out.append(f"| q4wgpu run at | {datetime.datetime.fromtimestamp(rep['unix_time'], datetime.timezone.utc):%Y-%m-%d %H:%M} UTC |")
    for r in res.cuda[:1]:
        commit = r.get("git_commit")
        state = {True: ", with uncommitted changes", False: "", None: ", tree state unknown"}[r.get("git_dirty")]
        out.append(f"| CUDA path | torch {r['torch']}, CUDA {r['cuda']}, Triton {r['triton']} on {r['gpu']}; "
                   f"commit {commit[:12] + state if commit else 'not recorded'} |")
        if r.get("copy_bandwidth"):
            size = f", {r['bandwidth_probe_bytes'] >> 20} MiB" if r.get("bandwidth_probe_bytes") else ""
            out.append(f"| CUDA path's measured bandwidths | device copy {gb(r['copy_bandwidth']):.0f} GB/s (read + written{size}); "
                       f"pinned upload {gb(r['upload_bandwidth']):.1f} GB/s (on a side stream{size}) |")
    for system, rows in res.llama_systems().items():
        r = rows[0]
        out.append(f"| {system.replace('|', '/')} | build {r.get('build_commit')} ({r.get('backends')}) on "
                   f"{r.get('gpu_info')}; {r.get('model_type')}, {gb(r.get('model_size', 0)):.2f} GB; "
                   f"flash attention {r.get('flash_attn')} |")
        if r.get("vk_config"):
            device = (r.get("vk_device") or "(not logged)").replace("|", "/")
            out.append(f"| … its device line | ggml_vulkan: 0 = {device} |")
    out += ["", "Commands:", ""]
    for rep in res.q4:
        out.append(f"    {rep['command']}")
    for cmd in dict.fromkeys(r["command"] for r in res.cuda):
        out.append(f"    {cmd}")
    for system, rows in res.llama_systems().items():
        r = rows[0]
        tests = ", ".join(llama_test(x) for x in sorted(rows, key=llama_test_order))
        reps = len(r.get("samples_ts") or []) or "?"
        env = f"{r['vk_env']} " if r.get("vk_env") else "(no GGML_VK_* switch) " if r.get("vk_config") else ""
        out.append(f"    {env}llama-bench ({r.get('backends')}) -m <random Q4_0 GGUF, benches/llama_cpp/make_gguf.py> "
                   f"({tests}; {reps} repetitions; -ngl {r.get('n_gpu_layers')}; -fa {r.get('flash_attn')})")
    out.append("")
    return out


def resident_section(res):
    read_bw, _ = res.bandwidth()
    rep, tg = res.q4_resident("qwen2-32b", "tg")
    _, pp = res.q4_resident("qwen2-32b", "pp512")
    cuda = res.cuda_resident("qwen2-32b")
    ltg, lpp = res.llama_row(gen=True), res.llama_row(gen=False)
    cfg = res.config_32b()
    q4 = tg["tokens_per_second"] if tg else None
    q4pp = pp["tokens_per_second"] if pp else None
    out = ["## 32B shape, all weights resident", ""]
    out.append("Decode: median of the repetitions (llama.cpp: of its samples), spread min–max. GB/token: what one "
               "decoded token reads (INT4 weights with scales, plus the KV cache). Memory limit: GB/token at the "
               "read bandwidth q4wgpu measured in the same run.")
    out.append("")
    out.append("| system | decode tok/s | spread | prompt tok/s | spread | GB/token | achieved GB/s | memory limit tok/s "
               "| % of limit | q4wgpu ÷ system, decode | q4wgpu ÷ system, prompt |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def line(name, rate, lo, hi, prate, plo, phi, bytes_, ratio_pp=True):
        limit = read_bw / bytes_ if read_bw and bytes_ else None
        achieved = f"{gb(bytes_ * rate):.0f}" if bytes_ and rate else "—"
        out.append(f"| {name} | {fmt(rate)} | {spread(lo, hi)} | {fmt(prate, 1)} | {spread(plo, phi, 1)} "
                   f"| {fmt(gb(bytes_) if bytes_ else None, 2)} | {achieved} | {fmt(limit, 1)} "
                   f"| {pct(rate / limit if limit and rate else None)} | {ratio(q4, rate)} "
                   f"| {ratio(q4pp, prate) if ratio_pp else '—'} |")

    if tg:
        line(f"q4wgpu ({tg['test']}, {pp['test'] if pp else 'no pp'})", q4, tg["tokens_per_second_min"],
             tg["tokens_per_second_max"], q4pp, pp and pp["tokens_per_second_min"], pp and pp["tokens_per_second_max"],
             tg["bytes_per_token"])
    _, nocoop = res.q4_resident("qwen2-32b", "pp512", coop=False)
    if nocoop:
        line(f"q4wgpu --no-coop ({nocoop['test']}: cooperative matrices off, the portable GEMM)", None, None, None,
             nocoop["tokens_per_second"], nocoop["tokens_per_second_min"], nocoop["tokens_per_second_max"], None,
             ratio_pp=False)
    if cuda:
        cached = "" if cuda["cache_entries"] is None else f", {cuda_label(cuda)}"
        line(f"CUDA path: Triton dequant to bf16 + F.linear ({cuda['test']}{cached})", cuda["tokens_per_second"],
             cuda["tokens_per_second_min"], cuda["tokens_per_second_max"], None, None, None,
             cuda["int4_bytes_per_token"], ratio_pp=False)
    if ltg or lpp:
        rate, lo, hi = llama_rate(ltg) if ltg else (None, None, None)
        prate, plo, phi = llama_rate(lpp) if lpp else (None, None, None)
        tests = ", ".join(t for t in (ltg and f"tg{ltg['n_gen']}", lpp and f"pp{lpp['n_prompt']}") if t)
        line(f"llama.cpp CUDA, Q4_0 ({tests})", rate, lo, hi, prate, plo, phi,
             llama_bytes_per_token(ltg, cfg) if ltg else None)
    for system in res.llama_systems():
        if system == "llama.cpp CUDA":
            continue
        vtg, vpp = res.llama_row(gen=True, system=system), res.llama_row(gen=False, system=system)
        if not (vtg or vpp):
            continue
        rate, lo, hi = llama_rate(vtg) if vtg else (None, None, None)
        prate, plo, phi = llama_rate(vpp) if vpp else (None, None, None)
        tests = ", ".join(llama_test(t) for t in (vtg, vpp) if t)
        line(f"{system}, Q4_0 ({tests})", rate, lo, hi, prate, plo, phi, llama_bytes_per_token(vtg, cfg) if vtg else None)
    out.append("")
    if ltg:
        out.append("llama.cpp's GB/token is estimated (its file less the embedding table, plus the KV cache): Q4_0 "
                   "stores 4.5 bits per weight against 4.125 here.")
    if cuda:
        out.append("The CUDA path's GB/token counts the INT4 weights it reads; it also writes and reads each weight "
                   "again as bf16 (4× the INT4 bytes), which is why it runs far below the limit.")
        if cuda.get("dram_fraction_of_copy_bandwidth") is not None:
            out.append(f"Counting those bf16 bytes ({gb(cuda['dram_bytes_per_token']):.1f} GB per token), it moves "
                       f"{pct(cuda['dram_fraction_of_copy_bandwidth'])} of the device-to-device copy bandwidth it "
                       f"measured ({gb(cuda['copy_bandwidth']):.0f} GB/s, read + written): how near this method is "
                       f"to its own limit.")
    out.append("")
    return out


def llama_section(res):
    """Every llama.cpp row (CUDA and each Vulkan configuration) by test, with q4wgpu's all-resident
    32B rows where it ran the same test, and q4wgpu ÷ each system."""
    systems = res.llama_systems()
    if not systems:
        return []
    tests = {}
    for rows in systems.values():
        for r in rows:
            tests.setdefault(llama_test(r), llama_test_order(r))
    cols = sorted(tests, key=tests.get)
    q4 = {}
    for _, row in res.q4_rows("qwen2-32b"):
        if row["streamed_layers"] == 0:
            d = row.get("depth") or row.get("n_depth") or 0
            q4.setdefault(row["test"] + (f" @ d{d}" if d else ""), row)

    def cell(rate, lo, hi, digits):
        return "—" if rate is None else f"{rate:.{digits}f}" + (f" ({lo:.{digits}f}–{hi:.{digits}f})" if lo is not None else "")

    out = ["## llama.cpp by test (32B shape, random Q4_0 GGUF, same GPU and run)", ""]
    out.append("tok/s, median of llama-bench's repetitions (min–max). `@ dN`: N positions already in the KV cache "
               "when the test starts. Vulkan configurations: the default (NVIDIA's coopmat2 extension), "
               "`GGML_VK_DISABLE_COOPMAT2=1` (KHR cooperative matrix only: the path wgpu exposes) and "
               "`GGML_VK_DISABLE_COOPMAT=1 GGML_VK_DISABLE_COOPMAT2=1` (no cooperative matrix); the matrix-core "
               "path in each name is what the driver reported in that run.")
    out.append("")
    out.append("| system | " + " | ".join(cols) + " |")
    out.append("| --- |" + " ---: |" * len(cols))
    if any(t in q4 for t in cols):
        cells = []
        for t in cols:
            r = q4.get(t)
            cells.append(cell(r and r["tokens_per_second"], r and r["tokens_per_second_min"],
                              r and r["tokens_per_second_max"], 1 if t.startswith("tg") else 0))
        out.append("| q4wgpu, all resident | " + " | ".join(cells) + " |")
    for system, rows in systems.items():
        by_test = {llama_test(r): r for r in rows}
        cells = []
        for t in cols:
            r = by_test.get(t)
            cells.append(cell(*(llama_rate(r) if r else (None, None, None)), 1 if t.startswith("tg") else 0))
        out.append(f"| {system} | " + " | ".join(cells) + " |")
    out.append("")
    shared = [t for t in cols if t in q4]
    if shared:
        out.append("q4wgpu ÷ system, same test:")
        out.append("")
        out.append("| system | " + " | ".join(shared) + " |")
        out.append("| --- |" + " ---: |" * len(shared))
        for system, rows in systems.items():
            by_test = {llama_test(r): r for r in rows}
            out.append(f"| {system} | " + " | ".join(
                ratio(q4[t]["tokens_per_second"], by_test[t] and llama_rate(by_test[t])[0]) if by_test.get(t) else "—"
                for t in shared) + " |")
        out.append("")
    return out


def budget_section(res, peaks):
    read_bw, up_bw = res.bandwidth()
    out = ["## Under a VRAM budget", ""]
    out.append("PCIe bound: the system's own measured upload bandwidth ÷ the bytes it uploads per decoded token "
               "(the most tokens/s that streaming allows). Memory model (DESIGN.md §5, q4wgpu only): 1 / (resident "
               "bytes ÷ read bandwidth + streamed bytes ÷ upload bandwidth). Peak VRAM: nvidia-smi's memory.used "
               "over the budget's tests, less the part's idle reading (see Peak VRAM below); for the CUDA path "
               "without samples, PyTorch's max_memory_reserved plus its CUDA context (marked ≈).")
    out.append("")
    out.append("| system | budget | on the device | decode tok/s | spread | prompt tok/s | streamed GB/token "
               "| PCIe bound tok/s | % of PCIe bound | memory model tok/s | % of model | peak VRAM GB "
               "| ÷ CUDA path at the same budget |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rep, tg, pp in res.q4_budget_pairs():
        row = tg or pp
        if row["budget"] is None:
            continue
        peak = peak_for(peaks, short_model(row["model"]), row["budget"])
        cuda = res.cuda_at(short_model(row["model"]), row["budget"])
        out.append(f"| q4wgpu, {short_model(row['model'])} | {budget_label(row['budget'])} "
                   f"| {row['resident_layers']}/{row['streamed_layers']} layers resident/streamed "
                   f"| {fmt(tg and tg['tokens_per_second'])} "
                   f"| {spread(tg and tg['tokens_per_second_min'], tg and tg['tokens_per_second_max'])} "
                   f"| {fmt(pp and pp['tokens_per_second'], 1)} "
                   f"| {fmt(tg and gb(tg['streamed_bytes_per_token']))} "
                   f"| {fmt(tg and tg['pcie_bound_tokens_per_second'])} | {pct(tg and tg['fraction_of_pcie_bound'])} "
                   f"| {fmt(tg and tg['memory_limit_tokens_per_second'])} | {pct(tg and tg['fraction_of_memory_limit'])} "
                   f"| {fmt(peak)} "
                   f"| {ratio(tg and tg['tokens_per_second'], cuda and cuda['tokens_per_second'])} |")
    for c in res.cuda_budgeted():
        streamed = c["streamed_bytes_per_token"]
        bound = c.get("pcie_bound_tokens_per_second")
        if bound is None and up_bw and streamed:  # old files: q4wgpu's upload bandwidth
            bound = up_bw / streamed
        tps = c["tokens_per_second"]
        budget = "none" if c["budget"] is None else budget_label(c["budget"])
        out.append(f"| CUDA path, {c['shape']} ({c['test']}) | {budget} | {cuda_label(c)} "
                   f"| {fmt(tps)} | {spread(c['tokens_per_second_min'], c['tokens_per_second_max'])} | — "
                   f"| {fmt(gb(streamed))} | {fmt(bound)} | {pct(tps / bound if bound else None)} | — | — "
                   f"| {cuda_peak(peaks, c)} | — |")
    out.append("")
    if any(c["cache_entries"] is not None for c in res.cuda_budgeted()):
        out.append("The CUDA path's cache takes weights in forward order and reuses the entries of weights already "
                   "used, so with fewer entries than weights no weight is still cached at its next use: it uploads "
                   "every layer weight at every token whatever the budget, and the budget only sets how far ahead "
                   "its preload thread copies. Its fixed part (bf16 embeddings, packed lm_head, norms, KV cache, "
                   "one dequant scratch) stays on the device.")
        out.append("")
    return out


def peak_for(peaks, model, budget, part="q4wgpu"):
    """Peak GB above idle for `model` at `budget` in a part named part*, if vram.log covered it."""
    want = (model, None if budget is None else round(gb(budget), 1))
    for (name, m, b), (peak, idle, _) in peaks.items():
        if name.startswith(part) and (m, None if b is None else round(b, 1)) == want:
            return (peak - idle) * 2**20 / 1e9
    return None


def cuda_peak(peaks, c):
    """The CUDA path run's peak VRAM: nvidia-smi's, else PyTorch's reserved peak plus its context (≈)."""
    peak = peak_for(peaks, c["shape"], c["budget"], part="cuda_path")
    if peak is not None:
        return fmt(peak)
    if c.get("device_bytes_estimate") is not None:
        return f"≈{gb(c['device_bytes_estimate']):.2f}"
    if c.get("max_memory_allocated") is not None:
        return f"≈{gb(c['max_memory_allocated']):.2f} (allocated)"
    return "—"


def vram_section(res, peaks):
    if not peaks:
        return ["## Peak VRAM", "", "(no vram.log samples in these results)", ""]
    rows = {}
    for rep, row in res.q4_rows():
        rows.setdefault((short_model(row["model"]), None if row["budget"] is None else round(gb(row["budget"]), 1)), row)
    out = ["## Peak VRAM (nvidia-smi, every 200 ms)", ""]
    out.append("Idle: the lowest reading in the part (the sampler starts before the program). Peak − idle includes "
               "the driver's own allocations for the process, so it is a strict test of the budget.")
    out.append("")
    out.append("| part | model | budget | samples | idle GB | peak GB | peak − idle GB "
               "| the program's own account GB | within the budget |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for (part, model, budget), (peak, idle, n) in peaks.items():
        if part.startswith("cuda_path"):
            # Its own account: PyTorch's reserved peak plus the CUDA context it measured.
            c = res.cuda_resident(model) if budget is None else res.cuda_at(model, budget * 1e9)
            row = c and c.get("device_bytes_estimate") is not None and {"device_bytes": c["device_bytes_estimate"]}
        else:
            row = rows.get((model, None if budget is None else round(budget, 1)))
        above = (peak - idle) * 2**20 / 1e9
        ok = "—" if budget is None or model == "(whole part)" else ("yes" if above <= budget else f"**no** (+{above - budget:.2f} GB)")
        label = "—" if model == "(whole part)" else "all" if budget is None else f"{budget:g} GB"
        out.append(f"| {part} | {model} | {label} | {n} "
                   f"| {idle * 2**20 / 1e9:.2f} | {peak * 2**20 / 1e9:.2f} | {above:.2f} "
                   f"| {fmt(row and gb(row['device_bytes']))} | {ok} |")
    out.append("")
    return out


def ratios_section(res):
    _, tg = res.q4_resident("qwen2-32b", "tg")
    _, pp = res.q4_resident("qwen2-32b", "pp512")
    _, nocoop = res.q4_resident("qwen2-32b", "pp512", coop=False)
    cuda_r = res.cuda_resident("qwen2-32b")
    ltg, lpp = res.llama_row(gen=True), res.llama_row(gen=False)
    read_bw, _ = res.bandwidth()
    out = ["## Ratios (32B shape unless said)", ""]
    if tg:
        q4 = tg["tokens_per_second"]
        limit = read_bw / tg["bytes_per_token"] if read_bw else None
        if limit:
            out.append(f"- q4wgpu decode, all resident: {100 * q4 / limit:.0f} % of the memory limit "
                       f"(target ≥ {100 * TARGET_RESIDENT_FRACTION:.0f} %)")
        if cuda_r:
            out.append(f"- q4wgpu ÷ CUDA path, decode, all resident: {ratio(q4, cuda_r['tokens_per_second'])} "
                       f"(target ≥ {TARGET_VS_CUDA:g}×)")
        if ltg:
            out.append(f"- q4wgpu ÷ llama.cpp CUDA, decode, all resident: {ratio(q4, llama_rate(ltg)[0])} "
                       f"(target ≥ {TARGET_VS_LLAMA:g}×)")
    if pp and lpp:
        out.append(f"- q4wgpu ÷ llama.cpp CUDA, prompt ({pp['test']} against pp{lpp['n_prompt']}): "
                   f"{ratio(pp['tokens_per_second'], llama_rate(lpp)[0])} (target ≥ 1×)")
    for system in res.llama_systems():
        if system == "llama.cpp CUDA":
            continue
        vtg, vpp = res.llama_row(gen=True, system=system), res.llama_row(gen=False, system=system)
        if tg and vtg:
            out.append(f"- q4wgpu ÷ {system}, decode ({tg['test']} against {llama_test(vtg)}): "
                       f"{ratio(tg['tokens_per_second'], llama_rate(vtg)[0])}")
        if pp and vpp:
            out.append(f"- q4wgpu ÷ {system}, prompt ({pp['test']} against {llama_test(vpp)}): "
                       f"{ratio(pp['tokens_per_second'], llama_rate(vpp)[0])}")
        if nocoop and vpp and vpp.get("vk_config") == "none":
            out.append(f"- q4wgpu --no-coop ÷ {system}, prompt ({nocoop['test']} against {llama_test(vpp)}; "
                       f"neither uses cooperative matrices): {ratio(nocoop['tokens_per_second'], llama_rate(vpp)[0])} "
                       f"(issue 10 target ≥ 0.8×)")
    streamed = [(tg_, rep) for rep, tg_, _ in res.q4_budget_pairs()
                if tg_ and tg_["model"].startswith("qwen2-32b") and tg_["streamed_layers"] > 0]
    if streamed:
        worst = min(r["fraction_of_memory_limit"] for r, _ in streamed)
        out.append(f"- q4wgpu under a budget: {100 * worst:.0f} % of the memory model at worst "
                   f"(target ≥ {100 * TARGET_FRACTION_OF_MODEL:.0f} %)")
    for rep, tg_, _ in res.q4_budget_pairs():
        if not tg_ or tg_["budget"] is None:
            continue
        c = res.cuda_at(short_model(tg_["model"]), tg_["budget"])
        if c:
            out.append(f"- q4wgpu ÷ CUDA path, {short_model(tg_['model'])} at {budget_label(tg_['budget'])}: "
                       f"{ratio(tg_['tokens_per_second'], c['tokens_per_second'])} (q4wgpu "
                       f"{tg_['resident_layers']}/{tg_['streamed_layers']} layers resident/streamed; CUDA path "
                       f"{cuda_label(c)})")
    if len(out) == 2:
        out.append("(not enough results for ratios)")
    out.append("")
    return out


def all_rows_section(res):
    out = ["## All q4wgpu rows", ""]
    out.append("| model | budget | layers res/str | test | tok/s | min–max | GB/token | streamed GB/token | GB/s "
               "| memory model tok/s | % of model | PCIe bound tok/s | % of PCIe bound |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rep, r in res.q4_rows(coop=None):
        off = "" if rep.get("cooperative_matrices", True) else " (--no-coop)"
        out.append(f"| {short_model(r['model'])} | {budget_label(r['budget'])} | {r['resident_layers']}/{r['streamed_layers']} "
                   f"| {r['test']}{off} | {r['tokens_per_second']:.2f} | {spread(r['tokens_per_second_min'], r['tokens_per_second_max'])} "
                   f"| {gb(r['bytes_per_token']):.3f} | {gb(r['streamed_bytes_per_token']):.3f} "
                   f"| {gb(r['achieved_bytes_per_second']):.1f} | {r['memory_limit_tokens_per_second']:.2f} "
                   f"| {pct(r['fraction_of_memory_limit'])} | {fmt(r['pcie_bound_tokens_per_second'])} "
                   f"| {pct(r['fraction_of_pcie_bound'])} |")
    for rep in res.q4:
        for s in rep.get("skipped", []):
            out.append(f"\n{rep['model']}: budget {budget_label(s['budget'])} skipped: {s['reason']}")
    out.append("")
    return out


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"(plot skipped: matplotlib is not installed here; `pip install matplotlib` and rerun with --plot {path})"
    rows = {}
    for _, r in res.q4_rows("qwen2-32b"):
        if r["test"].startswith("tg"):
            rows.setdefault(r["budget"], r)  # the first decode row of each budget
    if not rows:
        return "(plot skipped: no 32B decode rows)"
    read_bw, up_bw = res.bandwidth()
    budgets = sorted(b for b in rows if b is not None)
    top = gb(budgets[-1]) if budgets else 16.0
    all_x = top * 1.25 + 2

    def x_of(b):
        return all_x if b is None else gb(b)

    order = budgets + ([None] if None in rows else [])
    xs = [x_of(b) for b in order]
    fig, ax = plt.subplots(figsize=(8, 6))
    tps = [rows[b]["tokens_per_second"] for b in order]
    ax.plot(xs, tps, "o-", color="C0", lw=2, label="q4wgpu decode (median)", zorder=5)
    for x, b in zip(xs, order):
        r = rows[b]
        frac = r["fraction_of_pcie_bound"] or r["fraction_of_memory_limit"]
        what = "PCIe bound" if r["fraction_of_pcie_bound"] else "HBM limit"
        ax.annotate(f"{r['tokens_per_second']:.1f}\n{100 * frac:.0f} % of {what}", (x, r["tokens_per_second"]),
                    textcoords="offset points", xytext=(0, -10), ha="center", va="top", fontsize=7, color="C0")
    # The bound as a function of the budget: the layers that fit stay resident (the planner's
    # overhead beyond fixed + resident layers, as measured, taken as constant), the rest stream.
    if read_bw and up_bw:
        r0 = rows[order[0]]
        layers, layer_bytes, fixed = r0["layers"], r0["layer_bytes"], r0["fixed_bytes"]
        overheads = [b - fixed - rows[b]["resident_layers"] * layer_bytes for b in budgets
                     if rows[b]["streamed_layers"] > 0]
        overhead = statistics.median(overheads) if overheads else 0
        all_bytes = r0["bytes_per_token"]  # one decoded token's reads with every layer resident
        bx, by = [], []
        lo = max(0.5, gb(fixed + overhead + layer_bytes) - 0.5)
        steps = 400
        for i in range(steps + 1):
            b = (lo + (top - lo) * i / steps) * 1e9
            res_layers = max(0, min(layers, int((b - fixed - overhead) // layer_bytes)))
            streamed = (layers - res_layers) * layer_bytes
            bx.append(gb(b))
            # Each is an upper bound, so is the smaller: PCIe alone overshoots once one layer streams.
            by.append(min(up_bw / streamed, read_bw / all_bytes) if streamed else read_bw / all_bytes)
        if None in rows:
            bx.append(all_x)
            by.append(read_bw / rows[None]["bytes_per_token"])
        ax.plot(bx, by, ":", color="C3", lw=1.5,
                label=f"bound: PCIe ({gb(up_bw):.0f} GB/s) for the layers that do not fit, HBM ({gb(read_bw):.0f} GB/s) once all fit")
        ax.plot(xs, [rows[b]["pcie_bound_tokens_per_second"] or read_bw / rows[b]["bytes_per_token"] for b in order],
                "s", color="C3", ms=4)
    ax.plot(xs, [rows[b]["memory_limit_tokens_per_second"] for b in order], "x", color="C1", ms=7,
            label="memory model at the measured budgets (HBM + PCIe in series)")
    cuda_r = res.cuda_resident("qwen2-32b")
    if cuda_r:
        ax.axhline(cuda_r["tokens_per_second"], color="gray", lw=1,
                   label=f"CUDA path, resident ({cuda_r['tokens_per_second']:.1f})")
    cuda_b = [c for c in res.cuda_budgeted() if c["shape"] == "qwen2-32b" and c["budget"] is not None]
    if cuda_b:
        ax.plot([gb(c["budget"]) for c in cuda_b], [c["tokens_per_second"] for c in cuda_b], "D--", color="gray",
                ms=5, label="CUDA path under the budget (N-entry cache)")
    for c in res.cuda_budgeted():
        if c["shape"] == "qwen2-32b" and c["budget"] is None:  # old files: every layer streamed, no budget
            ax.axhline(c["tokens_per_second"], color="gray", ls="-.", lw=1,
                       label=f"CUDA path, all streamed ({c['tokens_per_second']:.2f})")
    lt = res.llama_row(gen=True)
    if lt:
        ax.axhline(llama_rate(lt)[0], color="C2", lw=1, label=f"llama.cpp CUDA, resident ({llama_rate(lt)[0]:.1f})")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{gb(b):g}" if b is not None else "all" for b in order])
    ax.set_xlim(0, all_x * 1.08)
    ax.set_xlabel("VRAM budget (GB)")
    ax.set_ylabel("decode tokens/s (log scale)")
    ax.set_yscale("log")
    ax.set_title("32B shape (random INT4 weights): decode speed against the VRAM budget", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    # The path as given: BENCHMARKS.md is written where the report runs (the repository root).
    return f"![decode tokens/s against VRAM budget]({path})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="folders (or files) the device run wrote ($OUT)")
    ap.add_argument("--plot", default="bench-budget.png", help="PNG to write (next to BENCHMARKS.md)")
    args = ap.parse_args()
    res = Results(args.results)
    peaks = res.vram.budget_peaks(res.files)
    out = ["# Benchmarks", ""]
    out.append("Written by scripts/bench-report.py from one run of scripts/device-bench.sh: every system measured "
               "in the same call on the same machine, synthetic (random) weights of the real shapes.")
    out.append("")
    out += machine_section(res)
    out += resident_section(res)
    out += llama_section(res)
    out += budget_section(res, peaks)
    out += ratios_section(res)
    out.append(plot(res, args.plot))
    out.append("")
    out += vram_section(res, peaks)
    out += all_rows_section(res)
    if res.notes:
        out.append("Notes: " + "; ".join(res.notes) + ".")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
