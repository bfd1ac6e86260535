#!/usr/bin/env bash
# llama.cpp's Vulkan backend on the same synthetic shape as run.sh (the same random Q4_0 GGUF), for
# the comparison with q4wgpu on the same API and GPU. Runs ON THE DEVICE with the binary that
# benches/llama_cpp/prepare_vulkan.sh built here (carry `.llama-vk`) and the Vulkan loader from .gl
# (scripts/device-bench.sh unpacks it; ../shared/device/README.md).
#
# Usage: benches/llama_cpp/run_vulkan.sh unpack          unpack the binary, check its sha256
#        benches/llama_cpp/run_vulkan.sh devices         llama-bench --list-devices
#        benches/llama_cpp/run_vulkan.sh bench CONFIG OUTDIR NAME [ARGS...]
#            llama-bench -m MODEL -fa 1 -ngl 99 ARGS -o jsonl, with the GGML_VK_* switches of CONFIG:
#              coopmat2   none set (on NVIDIA: VK_NV_cooperative_matrix2)
#              khr        GGML_VK_DISABLE_COOPMAT2=1 (KHR cooperative matrix only: the path wgpu exposes)
#              none       GGML_VK_DISABLE_COOPMAT=1 GGML_VK_DISABLE_COOPMAT2=1 (no cooperative matrix)
#            Writes OUTDIR/NAME.jsonl (rows tagged by results.py with the config and the driver's
#            `ggml_vulkan: 0 = ... matrix cores: X` line), NAME.stderr.log and NAME.vkconfig.
# Environment: SHAPE (qwen2-32b), LLAMA_MODEL (/tmp/llama-<shape>-q4_0.gguf, written by
# `run.sh model` if missing), LLAMA_VK_BIN (/tmp/llama-vk/llama-bench: outside the working tree, so
# a warm machine keeps it), VK_DRIVER_FILES (set to NVIDIA's ICD when the loader finds no GPU).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
shape=${SHAPE:-qwen2-32b}
model=${LLAMA_MODEL:-/tmp/llama-$shape-q4_0.gguf}
bin=${LLAMA_VK_BIN:-/tmp/llama-vk/llama-bench}
xz_file=$top/.llama-vk/llama-bench.xz
sum_file=$top/.llama-vk/llama-bench.sha256
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json

do_unpack() {
  [ -f "$xz_file" ] && [ -f "$sum_file" ] ||
    { echo "llama.cpp Vulkan: no $xz_file; run benches/llama_cpp/prepare_vulkan.sh here and carry .llama-vk" >&2; return 1; }
  local want
  want=$(cut -d' ' -f1 "$sum_file")
  if [ -x "$bin" ] && [ "$(sha256sum "$bin" | cut -d' ' -f1)" = "$want" ]; then
    echo "llama.cpp Vulkan: $bin already unpacked ($want)"
    return 0
  fi
  mkdir -p "$(dirname "$bin")"
  if command -v xz >/dev/null; then
    xz -dc "$xz_file" >"$bin.part"
  else # Python's lzma reads .xz too
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$xz_file" >"$bin.part"
  fi
  local got
  got=$(sha256sum "$bin.part" | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "llama.cpp Vulkan: sha256 $got, expected $want; rerun prepare_vulkan.sh" >&2; return 1; }
  chmod +x "$bin.part"
  mv "$bin.part" "$bin"
  echo "llama.cpp Vulkan: unpacked $bin (sha256 $got)"
}

# The loader finds the GPU through the ICD files it knows; on the lent machine NVIDIA's lives in
# /usr/local/nvidia, which the loader from .gl may not search (q4wgpu needs the same setting).
find_gpu() {
  local list
  list=$("$bin" --list-devices 2>&1 || true)
  if ! grep -q 'Vulkan[0-9]' <<<"$list" && [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then
    export VK_DRIVER_FILES=$nvidia_icd
    echo "llama.cpp Vulkan: no device by default; VK_DRIVER_FILES=$VK_DRIVER_FILES"
    list=$("$bin" --list-devices 2>&1 || true)
  fi
  echo "$list"
  grep -q 'Vulkan[0-9]' <<<"$list" || { echo "llama.cpp Vulkan: no Vulkan device" >&2; return 1; }
}

do_bench() {
  local config=${1:?usage: run_vulkan.sh bench CONFIG OUTDIR NAME [ARGS]} out=${2:?OUTDIR} name=${3:?NAME}
  shift 3
  local env_set
  case $config in
    coopmat2) env_set=() ;;
    khr) env_set=(GGML_VK_DISABLE_COOPMAT2=1) ;;
    none) env_set=(GGML_VK_DISABLE_COOPMAT=1 GGML_VK_DISABLE_COOPMAT2=1) ;;
    *) echo "llama.cpp Vulkan: unknown config '$config' (coopmat2, khr, none)" >&2; return 2 ;;
  esac
  mkdir -p "$out"
  do_unpack
  [ -f "$model" ] || SHAPE=$shape LLAMA_MODEL=$model "$top/benches/llama_cpp/run.sh" model
  find_gpu
  local args=(-m "$model" -fa 1 -ngl 99 "$@")
  # Written first, so that rows of a run stopped by its time limit can still be tagged (merge).
  python3 -c 'import json, sys; print(json.dumps({"vk_config": sys.argv[1], "vk_env": sys.argv[2]}))' \
    "$config" "${env_set[*]}" >"$out/$name.vkconfig"
  echo "llama.cpp Vulkan $config: ${env_set[*]} llama-bench ${args[*]}"
  local rc=0
  # env -u: a switch set outside (by hand) must not change what the config's name says.
  env -u GGML_VK_DISABLE_COOPMAT -u GGML_VK_DISABLE_COOPMAT2 ${env_set[@]+"${env_set[@]}"} \
    "$bin" "${args[@]}" -o jsonl >"$out/$name.jsonl" 2>"$out/$name.stderr.log" || rc=$?
  [ "$rc" = 0 ] || { echo "llama.cpp Vulkan $config: llama-bench exit $rc"; tail -5 "$out/$name.stderr.log"; }
  python3 "$top/benches/llama_cpp/results.py" tag "$out/$name.jsonl"
  python3 "$top/benches/llama_cpp/results.py" table "$out/$name.jsonl"
  return "$rc"
}

case "${1:-}" in
  unpack) do_unpack ;;
  devices) do_unpack && find_gpu ;;
  bench) shift; do_bench "$@" ;;
  *) echo "usage: $0 unpack | devices | bench CONFIG OUTDIR NAME [ARGS...]" >&2; exit 2 ;;
esac
