#!/usr/bin/env python3
"""llama-bench result rows for the device bench (run.sh: CUDA, run_vulkan.sh: Vulkan).

llama-bench runs with `-o jsonl`: one JSON object per test, written when the test ends, so a run
cut short by its time limit still leaves the rows it finished.

  results.py tag NAME.jsonl   Vulkan rows: add what run_vulkan.sh wrote into NAME.vkconfig before
        the run (vk_config: our name for it; vk_env: the GGML_VK_* switches) and, from the
        `ggml_vulkan: 0 = ...` line llama-bench printed into NAME.stderr.log, vk_device,
        vk_matrix_cores and vk_int_dot (the path the driver actually gave). Prints that line.
  results.py table FILE...    one line per row, for the part's log
  results.py merge OUT.json FILE...   every row of the .jsonl / .json files as one JSON list,
        tagged as `tag` does where a .vkconfig is beside them (so rows of a run stopped by its time
        limit are tagged too). The device bench brings back at most 8 files, so all llama.cpp
        rows share llama_bench.json.
"""

import json
import re
import sys

DEVICE_LINE = re.compile(r"ggml_vulkan: 0 = (.*)$")


def read_rows(path):
    """Rows of a jsonl file (or a JSON list), skipping lines that are not whole objects (a test cut
    off mid-write); returns (rows, number of lines skipped)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
            return [r for r in data if isinstance(r, dict)], 0
        except json.JSONDecodeError:
            pass
    rows, bad = [], 0
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if not line or line in "[]":
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "avg_ts" in row:
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def device_line(stderr_path):
    """The `ggml_vulkan: 0 = ...` text (after '0 = ') or None."""
    try:
        with open(stderr_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                m = DEVICE_LINE.search(line.rstrip("\n"))
                if m:
                    return m.group(1)
    except OSError:
        return None
    return None


def field(device, name):
    m = re.search(rf"\b{re.escape(name)}: ([^|]+)", device or "")
    return m.group(1).strip() if m else None


def sidecar(path, ext):
    return (path[: -len(".jsonl")] if path.endswith(".jsonl") else path) + ext


def add_tags(path, rows):
    """Tags rows of a Vulkan run (see the module doc); returns the device line, or None when
    `path` has no .vkconfig (a CUDA run)."""
    try:
        with open(sidecar(path, ".vkconfig"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        return None
    device = device_line(sidecar(path, ".stderr.log"))
    for r in rows:
        r["vk_config"] = cfg["vk_config"]
        r["vk_env"] = cfg["vk_env"]
        r["vk_device"] = device
        r["vk_matrix_cores"] = field(device, "matrix cores")
        r["vk_int_dot"] = field(device, "int dot")
    return device or "(no 'ggml_vulkan: 0 = ' line in the log)"


def tag(path):
    rows, bad = read_rows(path)
    device = add_tags(path, rows)
    if device is None:
        raise SystemExit(f"{sidecar(path, '.vkconfig')}: missing (run_vulkan.sh writes it)")
    write_jsonl(path, rows)
    print(f"ggml_vulkan: 0 = {device}")
    if bad:
        print(f"{path}: {bad} incomplete line(s) left out")


def test_name(r):
    parts = []
    if r.get("n_prompt"):
        parts.append(f"pp{r['n_prompt']}")
    if r.get("n_gen"):
        parts.append(f"tg{r['n_gen']}")
    name = "+".join(parts) or "?"
    return name + (f" @ d{r['n_depth']}" if r.get("n_depth") else "")


def system_name(r):
    if r.get("vk_config"):
        return f"llama.cpp {r.get('backends', 'Vulkan')} {r['vk_config']} (matrix cores: {r.get('vk_matrix_cores')})"
    return f"llama.cpp {r.get('backends', '?')}"


def table(paths):
    for p in paths:
        rows, bad = read_rows(p)
        for r in rows:
            print(f"{system_name(r)} ngl {r.get('n_gpu_layers')} {test_name(r)}: "
                  f"{r['avg_ts']:.2f} ± {r.get('stddev_ts', 0):.2f} tok/s")
        if bad:
            print(f"{p}: {bad} incomplete line(s) left out")


def merge(out, paths):
    rows = []
    for p in paths:
        try:
            got, bad = read_rows(p)
        except OSError as e:
            print(f"merge: {p}: {e}; left out")
            continue
        add_tags(p, got)
        rows += got
        print(f"merge: {p}: {len(got)} row(s)" + (f", {bad} incomplete line(s) left out" if bad else ""))
    if not rows:
        print(f"merge: no rows; {out} not written")
        return
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)
        fh.write("\n")
    print(f"merge: {len(rows)} row(s) in {out}")


def main(argv):
    if len(argv) == 2 and argv[0] == "tag":
        tag(argv[1])
    elif len(argv) >= 2 and argv[0] == "table":
        table(argv[1:])
    elif len(argv) >= 2 and argv[0] == "merge":
        merge(argv[1], argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
