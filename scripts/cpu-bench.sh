#!/usr/bin/env bash
# CPU-only speed of q4wgpu (`q4wgpu bench --cpu`: the int8 SIMD kernel alone on one thread and on
# all, then prompt and decode) on synthetic shapes, and optionally llama.cpp's CPU backend on the
# same shape and threads (issue 11, item 3). Needs no Rust toolchain: carry the release binary.
#
# Usage (repository root): scripts/cpu-bench.sh
# Environment: Q4WGPU (binary; default .device-bin/q4wgpu, else target/release/q4wgpu),
#   OUT (./cpu-bench-out), THREADS (all cores; q4wgpu reads RAYON_NUM_THREADS, llama.cpp -t),
#   SHAPES ("qwen2-0.5b qwen2-32b"), ISAS (best; e.g. "avx2,avx512vnni" or "all"),
#   P (prompt tokens, 64), N (decode steps, 32), R (repetitions, 3),
#   LLAMA_CPU=1: also llama-bench -ngl 0 with CUDA hidden on the 32B GGUF that
#   benches/llama_cpp/run.sh writes (needs .llama carried and its build: about 4 minutes).
# Expected time on 16 cores: about 1 min per shape for q4wgpu (32B: 18 GB of random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
Q4WGPU=${Q4WGPU:-}
if [ -z "$Q4WGPU" ]; then
  for c in .device-bin/q4wgpu target/release/q4wgpu; do
    [ -x "$c" ] && { Q4WGPU=$PWD/$c; break; }
  done
fi
[ -n "$Q4WGPU" ] || { echo "no q4wgpu binary: set Q4WGPU" >&2; exit 1; }
OUT=${OUT:-$PWD/cpu-bench-out}
mkdir -p "$OUT"
THREADS=${THREADS:-$(nproc)}
P=${P:-64} N=${N:-32} R=${R:-3}
isa_args=()
[ -n "${ISAS:-}" ] && isa_args=(--cpu-isa "$ISAS")

{
  echo "host: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  echo "threads: $THREADS; flags: $(grep -m1 -o 'avx512_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} | tee "$OUT/machine.txt"

for shape in ${SHAPES:-qwen2-0.5b qwen2-32b}; do
  echo "== q4wgpu bench --cpu --synthetic $shape"
  RAYON_NUM_THREADS=$THREADS "$Q4WGPU" bench --cpu ${isa_args[@]+"${isa_args[@]}"} \
    --synthetic "$shape" -p "$P" -n "$N" -r "$R" --json "$OUT/q4wgpu_cpu_$shape.json"
done

if [ "${LLAMA_CPU:-0}" = 1 ]; then
  echo "== llama.cpp CPU backend (-ngl 0, -t $THREADS, CUDA devices hidden), qwen2-32b Q4_0"
  CUDA_VISIBLE_DEVICES= LLAMA_NGL=0 benches/llama_cpp/run.sh bench "$OUT" llama_cpu \
    -p "$P" -n "$N" -r "$R" -t "$THREADS"
fi
