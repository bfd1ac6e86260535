#!/usr/bin/env bash
# Correctness on the GPU machine, in one call: the GPU test binaries built here, the real
# Qwen2.5-Coder-0.5B answering "1.1+2.3=?" through the CLI (and GPU == CPU greedy tokens and top-5
# log-probabilities in the real-model tests, whose deviations the log keeps), a per-dispatch profile of a 32B-shaped decode step, and ring against zero-copy reads of
# host memory at a budget that streams, with VRAM use sampled by nvidia-smi meanwhile.
#
# Prepare here (scripts/device-prepare.sh does it): .device-bin/q4wgpu, .device-bin/tests.tar.xz
# (the test executables of `cargo test --release --no-run`), .gl (the Vulkan loader). The real model
# must already be on the machine at $Q4WGPU_CACHE/models/ with its .verified marker (the GPU
# machine has no network; scripts/device-prepare.sh splits it into parts that earlier calls carry
# and join there). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export Q4WGPU_CACHE=${Q4WGPU_CACHE:-/root/q4wgpu-cache}
Q4WGPU=${Q4WGPU:-.device-bin/q4wgpu}
start=$SECONDS
log() { echo "[device-tests $((SECONDS - start)) s] $*" | tee -a "$OUT/summary.log"; }

for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null || true
if ! "$Q4WGPU" info 2>&1 | grep -qi nvidia; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$Q4WGPU" info 2>&1 | head -20
} | tee "$OUT/machine.txt"

# 1. Test binaries (each must find the NVIDIA adapter: the log shows "test GPU: ...").
if [ "${TESTS:-1}" != 0 ]; then
  [ -f .device-bin/tests.tar.xz ] && xz -dc .device-bin/tests.tar.xz | tar -C .device-bin -xf -
  for t in .device-bin/tests/*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    log "test binary $name"
    echo "== $name" >>"$OUT/tests.log"
    # real_model prints the log-probability deviations it measured; keep them in the log.
    args=()
    [ "$name" = real_model ] && args=(--nocapture)
    timeout 300 "$t" ${args[@]+"${args[@]}"} >>"$OUT/tests.log" 2>&1
    rc=$?
    log "$name: exit $rc"
  done
  grep -E "^(== |test result|test GPU)" "$OUT/tests.log" | sort -u | head -40
fi

# 2. The README's main command on the real model (the default model, from the cache).
if [ "${REAL:-1}" != 0 ]; then
  log "real model: run --chat --prompt 1.1+2.3=?"
  timeout 120 "$Q4WGPU" run --chat --prompt "1.1+2.3=?" --max-tokens 64 >"$OUT/real.log" 2>&1
  log "real model: exit $?"
  cat "$OUT/real.log"
fi

# 3. Where a 32B decode step spends its time.
if [ "${PROFILE:-1}" != 0 ]; then
  log "profile: 32B decode"
  timeout 180 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 512 -n 64 -r 3 --profile \
    --json "$OUT/profile.json" >"$OUT/profile.log" 2>&1
  log "profile: exit $?"
  cat "$OUT/profile.log"
fi

# 4. Ring against zero-copy at a budget that streams; VRAM sampled meanwhile.
if [ "${ZEROCOPY:-1}" != 0 ]; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 250 >"$OUT/vram.log" 2>&1 &
  smi=$!
  log "streaming: ring and zero-copy at 12 GB and 4 GB"
  timeout 240 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 128 -n 8 -r 2 \
    --vram-budget 12GB,4GB --stream-read ring,zero-copy --json "$OUT/streaming.json" \
    >"$OUT/streaming.log" 2>&1
  log "streaming: exit $?"
  kill "$smi" 2>/dev/null
  cat "$OUT/streaming.log"
  awk -F', ' '{ gsub(/ MiB/, "", $2); if ($2 + 0 > max) max = $2 + 0 } END { print "peak VRAM used during the streaming runs: " max " MiB" }' "$OUT/vram.log" | tee -a "$OUT/summary.log"
fi
log "done"
ls -la "$OUT"
