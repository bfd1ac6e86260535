#!/usr/bin/env bash
# The decode step's small kernels on the GPU machine in one call: their kernel tests (attention,
# int8 activations), then the kernel bench's activation quantizer rows (serial against four-lane
# kernel at several workgroup sizes) and attention rows (legacy against grouped kernel, split pass
# alone, int8-output combine, V tail loads, and with SWEEP the split settings), each against the
# streaming read measured in the same run.
#
#   here:   scripts/device-attention.sh prepare     (builds .device-bin/attn/{kernels_attention,kernels_q8,kernels})
#   device: carry [".gl", ".device-bin/attn"], command: scripts/device-attention.sh
# Logs go to $OUT (attention-tests.log, attention-bench.md).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p .device-bin/attn
  for target in "test kernels_attention" "test kernels_q8" "bench kernels"; do
    set -- $target
    exe=$(cargo test --release --no-run --message-format=json --"$1" "$2" 2>/dev/null |
      python3 -c '
import json, sys
kind, name = sys.argv[1:3]
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("name") == name and t.get("kind") == [kind]:
        print(m["executable"])
' "$1" "$2" | tail -1)
    [ -n "$exe" ] || { echo "prepare: no executable for $target" >&2; exit 1; }
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
if [ -x .device-bin/attn/kernels_q8 ]; then
  timeout 200 .device-bin/attn/kernels_q8 >"$OUT/q8-tests.log" 2>&1
  echo "kernels_q8: exit $?"
  grep -E "^(test |test result|test GPU)|panicked" "$OUT/q8-tests.log"
fi

timeout 400 .device-bin/attn/kernels --attention-only ${SWEEP---sweep} >"$OUT/attention-bench.md" 2>&1
echo "kernels bench: exit $?"
cat "$OUT/attention-bench.md"
