#!/usr/bin/env bash
# `q4wgpu serve` on the GPU machine with the real default model (issue 12): aggregate decode
# tok/s at 1, 2, 4 and 8 concurrent streams (--parallel 8), then time to first token of a
# second chat turn with and without the prompt cache (--parallel 1), by scripts/serve-bench.py.
#
# Prepare here: scripts/device-prepare.sh (.device-bin/q4wgpu), ../shared/device/fetch-gl.sh
# (.gl); the model must already be on the machine (the parts of MODEL_PARTS=1, see
# device-prepare.sh). Carry [".gl", ".device-bin/q4wgpu", ".device-bin/COMMIT"]; results go to
# $OUT (serve.jsonl, serve-*.log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/serve-out}
mkdir -p "$OUT"
Q4WGPU=${Q4WGPU:-.device-bin/q4wgpu}
export Q4WGPU_CACHE=${Q4WGPU_CACHE:-/root/q4wgpu-cache}
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null || true
if [ "${ADAPTER:-nvidia}" = nvidia ] && ! "$Q4WGPU" info 2>&1 | grep -qi nvidia; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
echo "{\"commit\": \"$(cat .device-bin/COMMIT 2>/dev/null || echo unknown)\", \"date\": \"$(date -u +%FT%TZ)\"}" >"$OUT/serve.jsonl"

# serve_with PARALLEL BENCH-ARGS...: starts the server, waits for /health, runs the bench.
serve_with() {
  local parallel=$1
  shift
  "$Q4WGPU" serve --adapter "${ADAPTER:-nvidia}" --parallel "$parallel" --port 8080 >"$OUT/serve-p$parallel.log" 2>&1 &
  local pid=$!
  python3 - <<'EOF'
import time, urllib.request
for _ in range(120):
    try:
        if urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=2).status == 200:
            break
    except Exception:
        time.sleep(0.5)
EOF
  timeout 120 python3 scripts/serve-bench.py http://127.0.0.1:8080 "$@" >>"$OUT/serve.jsonl" 2>&1
  echo "serve --parallel $parallel: bench exit $?"
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

serve_with 8 --tokens "${TOKENS:-128}"
serve_with 1 --ttft
cat "$OUT/serve.jsonl"
