#!/usr/bin/env bash
# Batched decode on the GPU machine, in one call: the tests of the batched step (kv_slots,
# kernels_q8's batched product) first, then the 32B shape decoding 1, 2, 4 and 8 sequences
# together (`bench --parallel`), all resident and at a VRAM budget that streams, printing the
# table last. Prepare here: scripts/device-prepare.sh and ../shared/device/fetch-gl.sh; carry
# [".gl", ".device-bin/q4wgpu", ".device-bin/tests.tar.xz", ".device-bin/COMMIT"].
# Environment: BUDGETS (default "all,12GB"), PARALLEL (default 1,2,4,8), N (decode steps, 64).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
Q4WGPU=${Q4WGPU:-.device-bin/q4wgpu}
start=$SECONDS
log() { echo "[device-parallel $((SECONDS - start)) s] $*" | tee -a "$OUT/summary.log"; }

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
T=${TESTS_TAR:-.device-bin/tests.tar.xz}; [ -f "$T" ] && xz -dc "$T" | tar -C .device-bin -xf -

for t in kv_slots kernels_q8 bench; do
  [ -x ".device-bin/tests/$t" ] || { log "test $t: missing"; continue; }
  echo "== $t" >>"$OUT/tests.log"
  timeout 200 ".device-bin/tests/$t" >>"$OUT/tests.log" 2>&1
  log "test $t: exit $?"
done

log "32B decode, sequences ${PARALLEL:-1,2,4,8}, budgets ${BUDGETS:-all,12GB}"
timeout 420 "$Q4WGPU" bench --adapter nvidia --synthetic qwen2-32b -p 0 -n "${N:-64}" -r 3 \
  --parallel "${PARALLEL:-1,2,4,8}" --vram-budget "${BUDGETS:-all,12GB}" \
  --json "$OUT/parallel.json" >"$OUT/parallel.log" 2>&1
log "bench: exit $?"
grep -E "^\|" "$OUT/parallel.log"
grep -E "test result|FAILED|panicked" "$OUT/tests.log"
cat "$OUT/summary.log"
