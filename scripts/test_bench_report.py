#!/usr/bin/env python3
"""Tests of benches/llama_cpp/results.py and scripts/bench-report.py's llama.cpp tables.

  python3 scripts/test_bench_report.py        (about 2 s; needs only Python)

The llama.cpp rows here are FABRICATED test input, not measurements: they are written into a
temporary folder as device-bench.sh's parts would leave them (NAME.jsonl, NAME.stderr.log,
NAME.vkconfig), from the real CUDA row of benchmarks/runs/2026-11-30-h200-bench-1 as the template,
with made-up round sample values so that no table built from them can pass for a result. The
q4wgpu and CUDA-path results of that run are the real ones. The expected cells are computed here
from the fabricated samples (statistics.median), not by the code under test.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "runs", "2026-11-30-h200-bench-1")
RESULTS = os.path.join(ROOT, "benches", "llama_cpp", "results.py")
REPORT = os.path.join(ROOT, "scripts", "bench-report.py")

DEVICE = ("NVIDIA H200 (NVIDIA) | uma: 0 | fp16: 1 | bf16: 1 | fp4: 0 | warp size: 32 | "
          "shared memory: 49152 | int dot: 1 | matrix cores: {}")


def template():
    with open(os.path.join(RUN, "llama_bench.json")) as fh:
        return json.load(fh)[0]


def row(backends, n_prompt, n_gen, depth, samples):
    r = dict(template())
    r.update(backends=backends, n_prompt=n_prompt, n_gen=n_gen, n_depth=depth, samples_ts=samples,
             avg_ts=statistics.mean(samples), stddev_ts=statistics.pstdev(samples))
    r["samples_ns"] = [int((n_prompt + n_gen) / s * 1e9) for s in samples]
    return r


# name: (vk config or None, matrix cores in the stderr line, rows); samples are made up.
PARTS = {
    "llama_bench": (None, None, [row("CUDA", 512, 0, 0, [1000.0, 1100.0, 1200.0]),
                                 row("CUDA", 4096, 0, 0, [900.0, 950.0, 1000.0]),
                                 row("CUDA", 0, 128, 0, [50.0, 51.0, 52.0])]),
    "llama_vk_khr": ("khr", "KHR_coopmat", [row("Vulkan", 512, 0, 0, [800.0, 810.0, 830.0]),
                                            row("Vulkan", 4096, 0, 0, [700.0, 720.0, 760.0]),
                                            row("Vulkan", 0, 128, 0, [40.0, 42.0, 44.0])]),
    "llama_vk_coopmat2": ("coopmat2", "NV_coopmat2v", [row("Vulkan", 512, 0, 0, [1300.0, 1310.0, 1320.0]),
                                                       row("Vulkan", 0, 128, 0, [45.0, 46.0, 47.0])]),
    "llama_depth": (None, None, [row("CUDA", 0, 32, 4096, [30.0, 31.0, 32.0]),
                                 row("CUDA", 0, 32, 16384, [20.0, 21.0, 22.0])]),
    # Stopped by its time limit: one row written, the next cut mid-line, never tagged.
    "llama_vk_none_depth": ("none", "none", [row("Vulkan", 0, 32, 4096, [10.0, 11.0, 12.0])]),
}


def write_parts(work, matrix_cores=None):
    """The files of PARTS in `work`; `matrix_cores` overrides what the stderr lines report."""
    for name, (config, cores, rows) in PARTS.items():
        with open(os.path.join(work, name + ".jsonl"), "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            if name == "llama_vk_none_depth":
                fh.write(json.dumps(row("Vulkan", 0, 32, 16384, [5.0]))[:100])
        with open(os.path.join(work, name + ".stderr.log"), "w") as fh:
            fh.write("load_backend: loaded Vulkan backend\n")
            if config:
                fh.write("ggml_vulkan: Found 1 Vulkan devices:\n")
                fh.write("ggml_vulkan: 0 = " + DEVICE.format((matrix_cores or {}).get(config, cores)) + "\n")
        if config:
            with open(os.path.join(work, name + ".vkconfig"), "w") as fh:
                env = {"khr": "GGML_VK_DISABLE_COOPMAT2=1",
                       "none": "GGML_VK_DISABLE_COOPMAT=1 GGML_VK_DISABLE_COOPMAT2=1"}.get(config, "")
                json.dump({"vk_config": config, "vk_env": env}, fh)


def run(*args):
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def report(merged):
    """bench-report on the real run's files, its llama.cpp rows replaced by `merged`."""
    inputs = [os.path.join(RUN, f) for f in sorted(os.listdir(RUN)) if f != "llama_bench.json"]
    with tempfile.TemporaryDirectory() as tmp:
        return run(REPORT, *inputs, merged, "--plot", os.path.join(tmp, "plot.png"))


def merge(work, out):
    files = sorted(os.path.join(work, f) for f in os.listdir(work) if f.endswith(".jsonl"))
    return run(RESULTS, "merge", out, *files)


def table(md, heading):
    """Rows (lists of cells) of the first table after `heading`."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def cell(samples, tg):
    d = 1 if tg else 0
    return f"{statistics.median(samples):.{d}f} ({min(samples):.{d}f}–{max(samples):.{d}f})"


class MergeTest(unittest.TestCase):
    def test_rows_merged_and_tagged(self):
        with tempfile.TemporaryDirectory() as work:
            write_parts(work)
            out = os.path.join(work, "merged.json")
            log = merge(work, out)
            with open(out) as fh:
                rows = json.load(fh)
        want = sum(len(r) for _, _, r in PARTS.values())
        self.assertEqual(len(rows), want)
        self.assertIn("1 incomplete line(s) left out", log)
        vk = [r for r in rows if r["backends"] == "Vulkan"]
        self.assertTrue(vk and all(r.get("vk_config") for r in vk))
        self.assertFalse(any("vk_config" in r for r in rows if r["backends"] == "CUDA"))
        by_cfg = {r["vk_config"]: r for r in vk}
        self.assertEqual(by_cfg["khr"]["vk_matrix_cores"], "KHR_coopmat")
        self.assertEqual(by_cfg["khr"]["vk_env"], "GGML_VK_DISABLE_COOPMAT2=1")
        self.assertEqual(by_cfg["coopmat2"]["vk_matrix_cores"], "NV_coopmat2v")
        self.assertEqual(by_cfg["none"]["vk_matrix_cores"], "none")  # tagged at merge, never by `tag`
        self.assertEqual(by_cfg["coopmat2"]["vk_int_dot"], "1")

    def test_tag_rewrites_in_place(self):
        with tempfile.TemporaryDirectory() as work:
            write_parts(work)
            path = os.path.join(work, "llama_vk_khr.jsonl")
            printed = run(RESULTS, "tag", path)
            with open(path) as fh:
                rows = [json.loads(line) for line in fh]
        self.assertIn("matrix cores: KHR_coopmat", printed)
        self.assertEqual({r["vk_config"] for r in rows}, {"khr"})


class ReportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with tempfile.TemporaryDirectory() as work:
            write_parts(work)
            merged = os.path.join(work, "llama_example.json")
            merge(work, merged)
            cls.md = report(merged)

    def test_llama_table_has_every_test_and_system(self):
        rows = table(self.md, "## llama.cpp by test")
        self.assertEqual(rows[0], ["system", "pp512", "pp4096", "tg128", "tg32 @ d4096", "tg32 @ d16384"])
        by_system = {r[0]: r[1:] for r in rows[2:]}
        cuda = by_system["llama.cpp CUDA"]
        self.assertEqual(cuda[0], cell([1000.0, 1100.0, 1200.0], False))
        self.assertEqual(cuda[4], cell([20.0, 21.0, 22.0], True))
        khr = by_system["llama.cpp Vulkan, KHR coopmat only (matrix cores: KHR_coopmat)"]
        self.assertEqual(khr[:3], [cell([800.0, 810.0, 830.0], False), cell([700.0, 720.0, 760.0], False),
                                   cell([40.0, 42.0, 44.0], True)])
        self.assertEqual(khr[3:], ["—", "—"])
        cm2 = by_system["llama.cpp Vulkan, NV coopmat2 (default) (matrix cores: NV_coopmat2v)"]
        self.assertEqual(cm2[1], "—")
        none = by_system["llama.cpp Vulkan, no coopmat (integer dot) (matrix cores: none)"]
        self.assertEqual(none, ["—", "—", "—", cell([10.0, 11.0, 12.0], True), "—"])
        # q4wgpu's real all-resident rows of that run, where it ran the same test.
        q4 = by_system["q4wgpu, all resident"]
        self.assertTrue(q4[0].startswith("236 ") and q4[2].startswith("65.5 "), q4)

    def test_ratios_against_each_system(self):
        with open(os.path.join(RUN, "q4wgpu_32b_resident.json")) as fh:
            q4 = {r["test"]: r["tokens_per_second"] for r in json.load(fh)["rows"] if r["budget"] is None}
        m = re.search(r"q4wgpu ÷ llama\.cpp Vulkan, KHR coopmat only \(matrix cores: KHR_coopmat\), prompt "
                      r"\(pp512 against pp512\): ([0-9.]+)×", self.md)
        self.assertIsNotNone(m, self.md)
        self.assertAlmostEqual(float(m.group(1)), q4["pp512"] / 810.0, places=2)
        m = re.search(r"q4wgpu ÷ llama\.cpp CUDA, decode, all resident: ([0-9.]+)×", self.md)
        self.assertAlmostEqual(float(m.group(1)), q4["tg128"] / 51.0, places=2)

    def test_resident_table_lists_vulkan_beside_cuda(self):
        names = [r[0] for r in table(self.md, "## 32B shape, all weights resident")]
        self.assertIn("llama.cpp CUDA, Q4_0 (tg128, pp512)", names)
        self.assertIn("llama.cpp Vulkan, KHR coopmat only (matrix cores: KHR_coopmat), Q4_0 (tg128, pp512)", names)
        self.assertIn("llama.cpp Vulkan, NV coopmat2 (default) (matrix cores: NV_coopmat2v), Q4_0 (tg128, pp512)", names)

    def test_device_line_recorded(self):
        self.assertIn("ggml_vulkan: 0 = NVIDIA H200 (NVIDIA) / uma: 0", self.md)
        self.assertIn("GGML_VK_DISABLE_COOPMAT2=1 llama-bench (Vulkan)", self.md)


class MismatchTest(unittest.TestCase):
    def test_wrong_matrix_path_is_flagged(self):
        # The driver gave no cooperative matrix although only coopmat2 was switched off.
        with tempfile.TemporaryDirectory() as work:
            write_parts(work, matrix_cores={"khr": "none"})
            merged = os.path.join(work, "llama_example.json")
            merge(work, merged)
            md = report(merged)
        self.assertIn("llama.cpp Vulkan, KHR coopmat only (**matrix cores: none**, not KHR_coopmat)", md)


class OtherModelTest(unittest.TestCase):
    def test_rows_of_another_model_left_out_with_a_note(self):
        # The tables are about the 32B shape: a tiny model's rows (a lavapipe smoke run) stay out.
        with tempfile.TemporaryDirectory() as work:
            tiny = dict(row("Vulkan", 64, 0, 0, [1.0, 2.0, 3.0]), model_type="qwen2 ?B Q4_0", vk_config="khr",
                        vk_matrix_cores="none")
            path = os.path.join(work, "tiny.json")
            with open(path, "w") as fh:
                json.dump([tiny], fh)
            md = report(path)
        self.assertIn("1 llama.cpp row(s) of another model (qwen2 ?B Q4_0) left out", md)
        self.assertNotIn("pp64", md)


class OldRunTest(unittest.TestCase):
    def test_cuda_only_run_unchanged(self):
        with tempfile.TemporaryDirectory() as tmp:
            md = run(REPORT, RUN, "--plot", os.path.join(tmp, "plot.png"))
        self.assertNotIn("llama.cpp Vulkan", md)
        rows = table(md, "## llama.cpp by test")
        self.assertEqual(rows[0], ["system", "pp512", "tg128"])
        with open(os.path.join(RUN, "llama_bench.json")) as fh:
            real = json.load(fh)
        self.assertEqual(rows[3][1], cell(real[0]["samples_ts"], False))


if __name__ == "__main__":
    unittest.main()
