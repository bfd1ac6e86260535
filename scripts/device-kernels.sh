#!/usr/bin/env bash
# Kernel work on the GPU machine, in one call: the GPU test binaries (correctness first), the
# kernel bench (GEMV f32 and int8 with a workgroup sweep, activation quantizer, barrier cost, GEMM,
# decode attention) and a 32B decode A/B with per-dispatch profiles, printing short tables last.
#
# Prepare here: scripts/device-prepare.sh (.device-bin/q4wgpu, .device-bin/tests.tar.xz with the
# test executables and the kernels bench), ../shared/device/fetch-gl.sh (.gl). Carry
# [".gl", ".device-bin/q4wgpu", ".device-bin/tests.tar.xz"]; logs go to $OUT.
# Environment: TESTS=0 / STATS=0 / KERNELS=0 / E2E=0 / REAL=0 (and PROMPTS=0, DEPTH=0 inside E2E) skip a part;
# CUDA_PROFILE=1 adds the CUDA path's step profile (benches/cuda_path/cuda_path.py --profile); ACTS (int8,f32) the decode activations
# of the end-to-end A/B; SWEEP=0 skips the workgroup sweep; TEST_BINS="kernels_matmul" runs only
# those test binaries; KERNELS_TIMEOUT (default 240 s) bounds the kernel bench. The bench reads its
# own environment (benches/kernels.rs), e.g. the GEMM option sweep alone at M = 512:
#   TESTS=0 E2E=0 REAL=0 KERNELS_TIMEOUT=500 Q4WGPU_BENCH_GEMM_ONLY=1 Q4WGPU_BENCH_GEMM_M=512 \
#     Q4WGPU_BENCH_GEMM_SWEEP=1 scripts/device-kernels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
Q4WGPU=${Q4WGPU:-.device-bin/q4wgpu}
export Q4WGPU_CACHE=${Q4WGPU_CACHE:-/root/q4wgpu-cache}
start=$SECONDS
log() { echo "[device-kernels $((SECONDS - start)) s] $*" | tee -a "$OUT/summary.log"; }

for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null || true
if ! "$Q4WGPU" info 2>&1 | grep -qi nvidia; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "git: $(cat .device-bin/COMMIT 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
} | tee "$OUT/machine.txt"
[ -f .device-bin/tests.tar.xz ] && xz -dc .device-bin/tests.tar.xz | tar -C .device-bin -xf -

if [ "${TESTS:-1}" != 0 ]; then
  for t in .device-bin/tests/*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    case $name in kernels-bench | shader-stats | real_model | bench) continue ;; esac
    [ -n "${TEST_BINS:-}" ] && case " $TEST_BINS " in *" $name "*) ;; *) continue ;; esac
    echo "== $name" >>"$OUT/tests.log"
    Q4WGPU_REQUIRE_COOP=1 timeout 200 "$t" >>"$OUT/tests.log" 2>&1
    log "test $name: exit $?"
  done
fi

# What the driver made of each kernel variant (registers and the rest it reports).
if [ "${STATS:-1}" != 0 ] && [ -x .device-bin/tests/shader-stats ]; then
  timeout 120 .device-bin/tests/shader-stats >"$OUT/shader-stats.log" 2>&1
  log "shader stats: exit $?"
fi

if [ "${KERNELS:-1}" != 0 ] && [ -x .device-bin/tests/kernels-bench ]; then
  log "kernels bench"
  sweep=()
  [ "${SWEEP:-1}" != 0 ] && sweep=(--sweep)
  timeout "${KERNELS_TIMEOUT:-240}" .device-bin/tests/kernels-bench ${sweep[@]+"${sweep[@]}"} >"$OUT/kernels.log" 2>&1
  log "kernels bench: exit $?"
fi

if [ "${E2E:-1}" != 0 ]; then
  fusions=${FUSIONS:-none/input-norm}
  log "32B decode A/B (${ACTS:-int8,f32}; fusions $fusions) with profiles"
  timeout 240 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 512 -n 128 -r 3 \
    --decode-activations "${ACTS:-int8,f32}" --decode-fusion "$fusions" --profile \
    --json "$OUT/e2e.json" >"$OUT/e2e.log" 2>&1
  log "32B: exit $?"
  [ "${PROMPTS:-1}" != 0 ] && log "32B prompts: chunks of 64 and 512, and 4096 tokens"
  [ "${PROMPTS:-1}" != 0 ] && for chunk in 64 512; do
    timeout 100 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 512 -n 0 -r 3 --chunk $chunk \
      --json "$OUT/pp512-chunk$chunk.json" >"$OUT/pp512-chunk$chunk.log" 2>&1
    log "pp512 chunk $chunk: exit $?"
  done
  if [ "${PROMPTS:-1}" != 0 ]; then
    timeout 100 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 4096 -n 0 -r 2 --chunk 512 \
      --json "$OUT/pp4096.json" >"$OUT/pp4096.log" 2>&1
    log "pp4096: exit $?"
  fi
  [ "${DEPTH:-1}" != 0 ] && log "32B at depth" && timeout 120 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 512 -n 32 -r 2 -d 4096,16384 \
    --json "$OUT/depth.json" >"$OUT/depth.log" 2>&1
  [ "${DEPTH:-1}" != 0 ] && log "32B depth: exit $?"
fi

# The real model (on the machine already: earlier calls join its parts into $Q4WGPU_CACHE).
if [ "${REAL:-1}" != 0 ] && [ -f "$Q4WGPU_CACHE/models/qwen2.5-coder-0.5b-instruct.gguf.verified" ]; then
  log "real model: tests, the README question, int8 quality"
  # The CLI tests run the binary at the path cargo compiled into them (CARGO_BIN_EXE_q4wgpu).
  bin=$(grep -ao -m1 '/[[:alnum:]/_.-]*/target/release/q4wgpu' .device-bin/tests/real_model | head -1)
  [ -n "$bin" ] && mkdir -p "$(dirname "$bin")" && cp "$Q4WGPU" "$bin"
  echo "== real_model" >>"$OUT/tests.log"
  timeout 300 .device-bin/tests/real_model >>"$OUT/tests.log" 2>&1
  log "test real_model: exit $?"
  timeout 120 "$Q4WGPU" run --chat --prompt "1.1+2.3=?" --max-tokens 64 >"$OUT/real.log" 2>&1
  log "real run: exit $?"
  # Time to first token of a 4096-token prompt on the real model (issue 10), and its decode.
  timeout 120 "$Q4WGPU" bench --adapter nvidia -p 4096 -n 128 -r 2 --json "$OUT/real_bench.json" >"$OUT/real_bench.log" 2>&1
  log "real model bench (pp4096, tg128): exit $?"
  cat README.md ARCHITECTURE.md src/engine.rs >/tmp/eval-text.txt
  timeout 180 "$Q4WGPU" eval --file /tmp/eval-text.txt --max-tokens 2048 --json "$OUT/eval.json" >"$OUT/eval.log" 2>&1
  log "eval: exit $?"
fi
# Where a CUDA-path decode step spends its time (host queueing vs GPU kernels; issue 14).
if [ "${CUDA_PROFILE:-0}" = 1 ]; then
  log "CUDA path profile (32B, resident)"
  timeout 150 python3 benches/cuda_path/cuda_path.py --shape qwen2-32b --vram-budget all --profile \
    >"$OUT/cuda_profile.log" 2>&1
  log "CUDA path profile: exit $?"
fi
log "done"
grep -E "^(== |test result|test GPU)|FAILED|panicked" "$OUT/tests.log" 2>/dev/null | head -40
head -80 "$OUT/shader-stats.log" 2>/dev/null
cat "$OUT/kernels.log" 2>/dev/null | grep -v "^  gemv" | head -150
# The activation quantizer and decode attention tables (past the first 150 lines with --sweep).
grep -E "^\| (rmsnorm|plain|swiglu|legacy|grouped)" "$OUT/kernels.log" 2>/dev/null | head -80
# The GEMM sweep's summaries (its full table is in kernels.log).
grep -A8 "^### GEMM best" "$OUT/kernels.log" 2>/dev/null
grep -hE "^\| qwen2|^\| (dispatch|norm|qkv|rope|attention|o |post|gate|swiglu|down|final|lm_head)" "$OUT/e2e.log" "$OUT"/pp*.log "$OUT/depth.log" 2>/dev/null | head -150
cat "$OUT/real.log" "$OUT/eval.log" 2>/dev/null | tail -12
grep -E "^\| " "$OUT/real_bench.log" 2>/dev/null | head -6
grep -E "^profile|^ *Name|^-|triton|gemv|gemm|Kernel|elementwise|Self CUDA" "$OUT/cuda_profile.log" 2>/dev/null | cut -c1-160 | head -40
