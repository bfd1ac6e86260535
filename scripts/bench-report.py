#!/usr/bin/env python3
"""Turns the results of scripts/device-bench.sh into BENCHMARKS.md tables and a plot.

  python3 scripts/bench-report.py RESULTS_DIR [--plot bench-budget.png] > BENCHMARKS.md

RESULTS_DIR holds what the device run wrote under $OUT: machine.txt, q4wgpu_*.json (`q4wgpu bench
--json`), cuda_path_*.json (one JSON object each), llama_bench.json (llama-bench -o json). Missing
parts are left out of the tables with a note. The plot (tokens/s against VRAM budget, with the
PCIe bound and the memory model of DESIGN.md §5) needs matplotlib; without it the report says so.
"""

import argparse
import glob
import json
import os
import statistics
import sys


def load_json(path):
    with open(path) as fh:
        text = fh.read().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # cuda_path.py writes one JSON line; tolerate a log with the line at the end.
        return json.loads(text.splitlines()[-1])


def gb(b):
    return b / 1e9


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def pct(fraction):
    return "—" if fraction is None else f"{100 * fraction:.0f} %"


def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}×"


def budget_label(b):
    return "all" if b is None else f"{gb(b):.0f} GB"


class Results:
    def __init__(self, root):
        self.root = root
        self.notes = []
        path = os.path.join(root, "machine.txt")
        self.machine = open(path).read().strip() if os.path.exists(path) else ""
        self.q4 = [load_json(p) for p in sorted(glob.glob(os.path.join(root, "q4wgpu_*.json")))]
        self.cuda = {}
        for p in sorted(glob.glob(os.path.join(root, "cuda_path_*.json"))):
            r = load_json(p)
            self.cuda[r["mode"]] = r
        path = os.path.join(root, "llama_bench.json")
        self.llama = load_json(path) if os.path.exists(path) else []
        if not self.q4:
            self.notes.append("no q4wgpu results (q4wgpu_*.json)")
        if not self.cuda:
            self.notes.append("no CUDA-path results (cuda_path_*.json)")
        if not self.llama:
            self.notes.append("no llama.cpp results (llama_bench.json)")

    def q4_rows(self, shape=None):
        for rep in self.q4:
            for row in rep["rows"]:
                if shape is None or row["model"].startswith(shape):
                    yield rep, row

    def q4_row(self, shape, test_prefix, budget_resident=True):
        """The first row of `shape` whose test starts with `test_prefix`, all layers resident."""
        for rep, row in self.q4_rows(shape):
            if row["test"].startswith(test_prefix) and (row["streamed_layers"] == 0) == budget_resident:
                return rep, row
        return None, None

    def llama_row(self, gen, ngl=99):
        for r in self.llama:
            if (r["n_gen"] > 0) == gen and r.get("n_gpu_layers") == ngl:
                return r
        return None


def machine_section(res):
    out = ["## Machine and run", ""]
    out += [f"    {line}" for line in res.machine.splitlines()] or ["    (machine.txt missing)"]
    out.append("")
    for rep in res.q4[:1]:
        bw = rep["bandwidth"]
        out.append(f"- q4wgpu adapter: {rep['adapter']} ({rep['backend']}, driver {rep['driver']})")
        out.append(f"- measured in the same run: device read {gb(bw['read']):.0f} GB/s (streaming-read kernel, "
                   f"{bw['buffer_bytes'] >> 20} MiB), host→device copies {gb(bw['upload']):.1f} GB/s "
                   f"(8 per submit, from {'host memory' if bw['upload_from_host_memory'] else 'a MAP_WRITE buffer'})")
    for mode, r in sorted(res.cuda.items()):
        out.append(f"- CUDA path ({mode}): torch {r['torch']}, CUDA {r['cuda']}, Triton {r['triton']} on {r['gpu']}")
    if res.llama:
        r = res.llama[0]
        out.append(f"- llama.cpp: build {r.get('build_commit')} ({r.get('backends')}), {r.get('gpu_info')}, "
                   f"model {gb(r.get('model_size', 0)):.2f} GB Q4_0, flash attention {r.get('flash_attn')}")
    out.append("")
    out.append("Commands:")
    out.append("")
    for rep in res.q4:
        out.append(f"    {rep['command']}")
    for mode, r in sorted(res.cuda.items()):
        out.append(f"    {r['command']}")
    if res.llama:
        r = res.llama[0]
        out.append(f"    llama-bench -m <random Q4_0 {r.get('model_type')}> -p {statistics_first(res.llama, 'n_prompt')} "
                   f"-n {statistics_first(res.llama, 'n_gen')} -fa 1 -ngl {r.get('n_gpu_layers')} -o json")
    out.append("")
    return out


def statistics_first(rows, key):
    vals = [r[key] for r in rows if r.get(key)]
    return vals[0] if vals else 0


def decode_section(res):
    out = ["## 32B shape, all weights resident", ""]
    rep, tg = res.q4_row("qwen2-32b", "tg")
    _, pp = res.q4_row("qwen2-32b", "pp")
    cuda = res.cuda.get("resident")
    llama_tg = res.llama_row(gen=True)
    llama_pp = res.llama_row(gen=False)
    q4 = tg["tokens_per_second"] if tg else None
    limit = tg["memory_limit_tokens_per_second"] if tg else None
    out.append("| system | decode tok/s | spread | q4wgpu ÷ system | % of memory limit |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    if tg:
        out.append(f"| memory limit: {gb(tg['bytes_per_token']):.2f} GB/token at the measured read bandwidth "
                   f"| {limit:.1f} | — | {ratio(q4, limit)} | 100 % |")
        out.append(f"| q4wgpu ({tg['test']}) | {q4:.2f} | {tg['tokens_per_second_min']:.2f}–{tg['tokens_per_second_max']:.2f} "
                   f"| 1.00× | {100 * q4 / limit:.0f} % |")
    if cuda:
        c = cuda["tokens_per_second"]
        out.append(f"| CUDA path, resident ({cuda['test']}) | {c:.2f} | {cuda['tokens_per_second_min']:.2f}–"
                   f"{cuda['tokens_per_second_max']:.2f} | {ratio(q4, c)} | {pct(c / limit if limit else None)} |")
    if llama_tg:
        l = llama_tg["avg_ts"]
        out.append(f"| llama.cpp CUDA Q4_0 (tg{llama_tg['n_gen']}) | {l:.2f} | ± {llama_tg['stddev_ts']:.2f} "
                   f"| {ratio(q4, l)} | {pct(l / limit if limit else None)} |")
    out.append("")
    out.append("| system | prompt tok/s | spread | q4wgpu ÷ system |")
    out.append("| --- | ---: | ---: | ---: |")
    qpp = pp["tokens_per_second"] if pp else None
    if pp:
        out.append(f"| q4wgpu ({pp['test']}) | {qpp:.1f} | {pp['tokens_per_second_min']:.1f}–{pp['tokens_per_second_max']:.1f} | 1.00× |")
    if llama_pp:
        out.append(f"| llama.cpp CUDA Q4_0 (pp{llama_pp['n_prompt']}) | {llama_pp['avg_ts']:.1f} | ± {llama_pp['stddev_ts']:.1f} "
                   f"| {ratio(qpp, llama_pp['avg_ts'])} |")
    out.append("")
    return out


def budget_section(res):
    out = ["## Under a VRAM budget", ""]
    out.append("Memory model (DESIGN.md §5): 1 / (resident bytes / read bandwidth + streamed bytes / upload bandwidth); "
               "PCIe bound: upload bandwidth / streamed bytes per token.")
    out.append("")
    out.append("| model | budget | layers res/str | test | tok/s | streamed GB/token | PCIe bound tok/s | % of PCIe bound | memory model tok/s | % of model |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for _, r in res.q4_rows():
        out.append(f"| {r['model']} | {budget_label(r['budget'])} | {r['resident_layers']}/{r['streamed_layers']} | {r['test']} "
                   f"| {r['tokens_per_second']:.2f} | {gb(r['streamed_bytes_per_token']):.2f} "
                   f"| {fmt(r['pcie_bound_tokens_per_second'])} "
                   f"| {pct(r['fraction_of_pcie_bound'])} "
                   f"| {r['memory_limit_tokens_per_second']:.2f} | {100 * r['fraction_of_memory_limit']:.0f} % |")
    cuda = res.cuda.get("streamed")
    if cuda:
        out.append("")
        _, tg = res.q4_row("qwen2-32b", "tg", budget_resident=False)
        up = res.q4[0]["bandwidth"]["upload"] if res.q4 else None
        bound = up / cuda["streamed_bytes_per_token"] if up else None
        out.append(f"CUDA path with every layer streamed from pinned memory: {cuda['tokens_per_second']:.2f} tok/s "
                   f"({gb(cuda['streamed_bytes_per_token']):.2f} GB/token; the same bytes at q4wgpu's measured upload bandwidth "
                   f"allow {fmt(bound)} tok/s).")
    out.append("")
    return out


def all_rows_section(res):
    out = ["## All q4wgpu rows", ""]
    out.append("| model | budget | layers res/str | test | tok/s | min–max | GB/token | streamed GB/token | GB/s | memory limit tok/s | % of limit |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for _, r in res.q4_rows():
        out.append(f"| {r['model']} | {budget_label(r['budget'])} | {r['resident_layers']}/{r['streamed_layers']} | {r['test']} "
                   f"| {r['tokens_per_second']:.2f} | {r['tokens_per_second_min']:.2f}–{r['tokens_per_second_max']:.2f} "
                   f"| {gb(r['bytes_per_token']):.3f} | {gb(r['streamed_bytes_per_token']):.3f} "
                   f"| {gb(r['achieved_bytes_per_second']):.1f} | {r['memory_limit_tokens_per_second']:.2f} "
                   f"| {100 * r['fraction_of_memory_limit']:.0f} % |")
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
    rows = [r for _, r in res.q4_rows("qwen2-32b") if r["test"].startswith("tg")]
    if not rows or not res.q4:
        return "(plot skipped: no 32B decode rows)"
    bw = res.q4[0]["bandwidth"]
    full = max(r["fixed_bytes"] + r["layers"] * r["layer_bytes"] for r in rows)

    def x_of(r):
        return gb(r["budget"]) if r["budget"] is not None else gb(full)

    rows.sort(key=x_of)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([x_of(r) for r in rows], [r["tokens_per_second"] for r in rows], "o-", label="q4wgpu decode")
    ax.plot([x_of(r) for r in rows], [r["memory_limit_tokens_per_second"] for r in rows], "--",
            label="memory model (HBM + PCIe, measured)")
    streamed = [r for r in rows if r["pcie_bound_tokens_per_second"]]
    if streamed:
        ax.plot([x_of(r) for r in streamed], [r["pcie_bound_tokens_per_second"] for r in streamed], ":x",
                label=f"PCIe bound ({gb(bw['upload']):.0f} GB/s)")
    if "resident" in res.cuda:
        ax.axhline(res.cuda["resident"]["tokens_per_second"], color="gray", lw=0.8, label="CUDA path, resident")
    if "streamed" in res.cuda:
        ax.axhline(res.cuda["streamed"]["tokens_per_second"], color="gray", ls="-.", lw=0.8, label="CUDA path, streamed")
    lt = res.llama_row(gen=True)
    if lt:
        ax.axhline(lt["avg_ts"], color="green", lw=0.8, label="llama.cpp CUDA, resident")
    ax.set_xlabel("VRAM budget (GB); rightmost point: all resident")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title("32B shape (random INT4 weights), decode speed against VRAM budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"![decode tokens/s against VRAM budget]({os.path.basename(path)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="the directory the device run wrote ($OUT)")
    ap.add_argument("--plot", default="bench-budget.png", help="PNG to write (next to BENCHMARKS.md)")
    args = ap.parse_args()
    res = Results(args.results)
    out = ["# Benchmarks", ""]
    out.append("Written by scripts/bench-report.py from one run of scripts/device-bench.sh: every system measured "
               "in the same call on the same machine, synthetic (random) weights of the real shapes.")
    out.append("")
    out += machine_section(res)
    out += decode_section(res)
    out += budget_section(res)
    out.append(plot(res, args.plot))
    out.append("")
    out += all_rows_section(res)
    if res.notes:
        out.append("Missing: " + "; ".join(res.notes) + ".")
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
