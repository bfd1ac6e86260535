#!/usr/bin/env bash
# Decode attention on the GPU machine in one call: its kernel tests, then the kernel bench's
# attention rows (legacy against grouped kernel, and the grouped kernel's split settings), each
# against the streaming read measured in the same run.
#
#   here:   scripts/device-attention.sh prepare     (builds .device-bin/attn/{kernels_attention,kernels})
#   device: carry [".gl", ".device-bin/attn"], command: scripts/device-attention.sh
# Logs go to $OUT (attention-tests.log, attention-bench.md).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p .device-bin/attn
  cargo build --release --tests --benches
  for target in "test kernels_attention" "bench kernels"; do
    set -- $target
    exe=$(cargo test --release --no-run --message-format=json --"$1" "$2" 2>/dev/null |
      python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])
' | tail -1)
    strip -o ".device-bin/attn/$2" "$exe"
  done
  du -sh .device-bin/attn/* | sed 's/^/prepare: /'
  exit 0
fi

OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null || true
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'

timeout 300 .device-bin/attn/kernels_attention >"$OUT/attention-tests.log" 2>&1
echo "kernels_attention: exit $?"
grep -E "^(test |test result|test GPU)" "$OUT/attention-tests.log"

timeout 400 .device-bin/attn/kernels --attention-only ${SWEEP:---sweep} >"$OUT/attention-bench.md" 2>&1
echo "kernels bench: exit $?"
cat "$OUT/attention-bench.md"
