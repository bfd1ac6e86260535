#!/usr/bin/env python3
"""The CPU-offload comparison of issue 11 as a markdown table, from one device-bench.sh run with
SET=offload (its $OUT folder): q4wgpu at each budget (streaming only and with CPU layers) against
llama.cpp CUDA at the -ngl whose nvidia-smi peak is nearest to q4wgpu's at that budget.

Usage: python3 scripts/offload-report.py [--plot PNG] RUN_FOLDER [RUN_FOLDER...]
(one table per folder; the plot: decode tok/s against peak VRAM, every folder's points)
"""
import importlib.util
import pathlib
import sys

spec = importlib.util.spec_from_file_location(
    "bench_report", pathlib.Path(__file__).with_name("bench-report.py"))
br = importlib.util.module_from_spec(spec)
spec.loader.exec_module(br)


def part_peak_gb(peaks, part):
    """Peak less idle of a part that prints no q4wgpu result lines (llama.cpp's)."""
    for (name, _, _), (peak, idle, _) in peaks.items():
        if name == part:
            return (peak - idle) * 2**20 / 1e9
    return None


def q4_rows(res):
    """{(model, budget GB): {"stream": tg row, "hybrid": tg row, "pp": pp row}} of the budget rows."""
    out = {}
    for _, row in res.q4_rows():
        if row["budget"] is None:
            continue
        key = (br.short_model(row["model"]), round(br.gb(row["budget"]), 1))
        slot = out.setdefault(key, {})
        if row["test"].startswith("pp"):
            slot["pp"] = row
        elif row.get("cpu_layers", 0) > 0:
            slot["hybrid"] = row
        else:
            slot["stream"] = row
    return out


def llama_parts(res, peaks):
    """[(ngl, peak GB, tg row, pp row)] of the llama_ngl* parts."""
    out = []
    for ngl in sorted({r.get("n_gpu_layers") for r in res.llama if r.get("n_gpu_layers", 99) < 99}):
        tg = res.llama_row(gen=True, ngl=ngl)
        pp = res.llama_row(gen=False, ngl=ngl)
        out.append((ngl, part_peak_gb(peaks, f"llama_ngl{ngl}"), tg, pp))
    return out


def table(folder):
    res = br.Results([folder])
    peaks = res.vram.budget_peaks(res.files)
    llama = llama_parts(res, peaks)
    lines = [f"Run `{folder}` ({dict(res.machine).get('git', 'commit unknown')}):", "",
             "| budget | q4wgpu peak VRAM GB | q4wgpu decode: streaming / with CPU layers (layers res/str/cpu) "
             "| llama.cpp -ngl, peak VRAM GB | llama.cpp decode | decode ratio | q4wgpu pp512 | llama.cpp pp512 "
             "| prompt ratio |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (model, budget), rows in sorted(q4_rows(res).items(), key=lambda kv: -kv[0][1]):
        stream, hybrid, pp = rows.get("stream"), rows.get("hybrid"), rows.get("pp")
        peak = br.peak_for(peaks, model, budget * 1e9)
        best = hybrid or stream
        # llama.cpp at the peak nearest q4wgpu's (the 32B shape only: its GGUF is that shape).
        near = None
        if peak is not None and model == "qwen2-32b":
            near = min((p for p in llama if p[1] is not None), key=lambda p: abs(p[1] - peak), default=None)
        ltg = near and near[2] and br.llama_rate(near[2])[0]
        lpp = near and near[3] and br.llama_rate(near[3])[0]
        layers = (f"{best['resident_layers']}/{best['streamed_layers'] - best.get('cpu_layers', 0)}"
                  f"/{best.get('cpu_layers', 0)}") if best else "—"
        lines.append(
            f"| {model} at {budget:g} GB | {br.fmt(peak)} "
            f"| {br.fmt(stream and stream['tokens_per_second'])} / {br.fmt(hybrid and hybrid['tokens_per_second'])} ({layers}) "
            f"| {near[0] if near else '—'}, {br.fmt(near and near[1])} | {br.fmt(ltg)} "
            f"| {br.ratio(best and best['tokens_per_second'], ltg)} "
            f"| {br.fmt(pp and pp['tokens_per_second'], 1)} | {br.fmt(lpp, 1)} "
            f"| {br.ratio(pp and pp['tokens_per_second'], lpp)} |")
    lines.append("")
    return lines


def plot(folders, path):
    """Decode tok/s against nvidia-smi's peak VRAM: q4wgpu streaming, q4wgpu with CPU layers and
    llama.cpp -ngl, the 32B shape, one marker per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "os^D"
    for i, folder in enumerate(folders):
        res = br.Results([folder])
        peaks = res.vram.budget_peaks(res.files)
        curves = {"q4wgpu, streaming only": [], "q4wgpu, CPU layers + streaming": [],
                  "llama.cpp CUDA, -ngl (CPU offload)": []}
        for (model, budget), rows in q4_rows(res).items():
            peak = br.peak_for(peaks, model, budget * 1e9)
            if model != "qwen2-32b" or peak is None:
                continue
            for key, name in (("stream", "q4wgpu, streaming only"), ("hybrid", "q4wgpu, CPU layers + streaming")):
                if rows.get(key):
                    curves[name].append((peak, rows[key]["tokens_per_second"]))
        for _, peak, tg, _ in llama_parts(res, peaks):
            if peak is not None and tg:
                curves["llama.cpp CUDA, -ngl (CPU offload)"].append((peak, br.llama_rate(tg)[0]))
        for c, (name, pts) in enumerate(curves.items()):
            pts.sort()
            if pts:
                ax.plot([p for p, _ in pts], [t for _, t in pts], markers[i % 4] + "-", color=f"C{c}",
                        label=f"{name} ({pathlib.Path(folder).name})", alpha=0.9 if i == 0 else 0.55)
    ax.set_xlabel("peak VRAM, GB (nvidia-smi, less idle)")
    ax.set_ylabel("decode tok/s (32B shape, tg32)")
    ax.set_title("Models larger than the GPU's memory: H200, 16 host cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = sys.argv[1:]
    png = None
    if len(args) > 1 and args[0] == "--plot":
        png, args = args[1], args[2:]
    out = []
    for folder in args:
        out += table(folder)
    print("\n".join(out))
    if png:
        plot(args, png)


if __name__ == "__main__":
    main()
