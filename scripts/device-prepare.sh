#!/usr/bin/env bash
# Prepares, here, what the GPU machine runs (it has no Rust toolchain and no network):
#   .device-bin/q4wgpu          the release binary, stripped
#   .device-bin/tests.tar.xz    the GPU test executables of `cargo test --release`, stripped, the
#                               kernel bench and the driver's kernel statistics (shader-stats)
#   .mparts/part-NN             the default real model's GGUF cut into parts under the 64 MiB a call
#                               may carry, plus its .verified marker (with MODEL_PARTS=1)
# The GPU machine joins the parts with one call per part while it stays warm:
#   carry [".mparts/part-NN", ".mparts/marker"], command
#   mkdir -p $C/models && cat .mparts/part-NN >> $C/models/FILE && cp .mparts/marker $C/models/FILE.verified
# (C=/root/q4wgpu-cache, the Q4WGPU_CACHE of scripts/device-tests.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device-bin/tests
cargo build --release
strip -o .device-bin/q4wgpu target/release/q4wgpu

# The test binaries that use the GPU or the real model.
gpu_tests="gpu_device kv_slots kernels_matmul kernels_q8 kernels_attention kernels_elementwise kernels_sample model_gpu bench real_model"
rm -f .device-bin/tests/*
cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
wanted = set(sys.argv[1].split())
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"] and m["target"]["name"] in wanted:
        print(m["target"]["name"], m["executable"])
' "$gpu_tests" | while read -r name exe; do
  strip -o ".device-bin/tests/$name" "$exe"
done
# The kernel microbenchmarks (benches/kernels.rs) and the driver's statistics of each kernel
# (benches/shader_stats.rs), as .device-bin/tests/kernels-bench and .device-bin/tests/shader-stats.
cargo bench --benches --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
names = {"kernels": "kernels-bench", "shader_stats": "shader-stats"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in names:
        print(names[m["target"]["name"]], m["executable"])
' | while read -r name exe; do strip -o ".device-bin/tests/$name" "$exe"; done
# The commit the binaries were built from (and whether the tree had changes).
echo "$(git rev-parse --short HEAD)$(git status --porcelain | grep -q . && echo ' (with uncommitted changes)')" >.device-bin/COMMIT
# Compressed, they travel in a fraction of the 64 MiB (device-tests.sh unpacks them).
tar -C .device-bin -cf - tests | xz -T0 -6 >.device-bin/tests.tar.xz
du -sh .device-bin/q4wgpu .device-bin/tests.tar.xz | sed 's/^/prepare: /'

if [ "${MODEL_PARTS:-0}" = 1 ]; then
  cache=${Q4WGPU_CACHE:-$HOME/.cache/q4wgpu}
  file=qwen2.5-coder-0.5b-instruct.gguf
  [ -f "$cache/models/$file.verified" ] || ./target/release/q4wgpu fetch qwen2.5-coder-0.5b-instruct
  grep -qx '/.mparts/' .git/info/exclude 2>/dev/null || echo '/.mparts/' >>.git/info/exclude
  rm -rf .mparts && mkdir -p .mparts
  split -b 58M -d -a 2 "$cache/models/$file" .mparts/part-
  cp "$cache/models/$file.verified" .mparts/marker
  ls -la .mparts | sed 's/^/prepare: /'
fi
