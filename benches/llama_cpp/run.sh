#!/usr/bin/env bash
# llama.cpp's CUDA backend on the same synthetic shape, for the comparison in BENCHMARKS.md.
# Runs ON THE DEVICE (it has the CUDA toolkit and cmake, but no network): builds llama-bench from
# the sources benches/llama_cpp/prepare.sh put in .llama/llama.cpp (carry `.llama`), writes a
# random Q4_0 GGUF of the shape with make_gguf.py, and runs llama-bench with JSON-lines output.
#
# Usage: benches/llama_cpp/run.sh build          build only (about 4 minutes with 16 cores)
#        benches/llama_cpp/run.sh model          write the GGUF only
#        benches/llama_cpp/run.sh bench OUTDIR [NAME [ARGS...]]   run llama-bench (builds / writes
#            what is missing) with -m MODEL -fa 1 -ngl LLAMA_NGL and ARGS (default: -p LLAMA_P
#            -n LLAMA_N -r LLAMA_R), writing OUTDIR/NAME.jsonl (NAME: llama_bench), NAME.stderr.log
#            and llama_gpu.txt; results.py merges the .jsonl files into one JSON list.
# Environment: SHAPE (qwen2-32b), LLAMA_BUILD (.llama-build: git-ignored and not carried, so a
# warm machine keeps it between calls), LLAMA_MODEL (/tmp/llama-<shape>-q4_0.gguf), JOBS (nproc),
# LLAMA_P (512), LLAMA_N (128), LLAMA_R (3), LLAMA_NGL (99; a list such as 99,40,32 also works).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
shape=${SHAPE:-qwen2-32b}
src=$top/.llama/llama.cpp
build=${LLAMA_BUILD:-$top/.llama-build}
model=${LLAMA_MODEL:-/tmp/llama-$shape-q4_0.gguf}
bin=$build/bin/llama-bench

find_nvcc() {
  local c
  for c in "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

do_build() {
  [ -x "$bin" ] && { echo "llama.cpp: $bin already built"; return 0; }
  [ -f "$src/CMakeLists.txt" ] || { echo "llama.cpp: no sources in $src; run benches/llama_cpp/prepare.sh here and carry .llama" >&2; return 1; }
  command -v cmake >/dev/null || { echo "llama.cpp: cmake not found on this machine" >&2; return 1; }
  local nvcc
  nvcc=$(find_nvcc) || { echo "llama.cpp: nvcc not found (PATH, /usr/local/cuda*/bin)" >&2; return 1; }
  echo "llama.cpp: building $(cat "$src/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null | sed 's/^/llama-cpp-python /') with $nvcc ($("$nvcc" --version | tail -1))"
  local start=$SECONDS
  mkdir -p "$build"
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$nvcc" -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMIT="llama-cpp-python-$(cat "$src/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null)" -DLLAMA_BUILD_NUMBER=0 \
    >"$build/configure.log" 2>&1 ||
    { tail -30 "$build/configure.log" >&2; return 1; }
  cmake --build "$build" --target llama-bench -j "${JOBS:-$(nproc)}" >"$build/build.log" 2>&1 ||
    { tail -40 "$build/build.log" >&2; return 1; }
  echo "llama.cpp: built in $((SECONDS - start)) s"
}

do_model() {
  [ -f "$model" ] && { echo "llama.cpp: $model exists"; return 0; }
  python3 benches/llama_cpp/make_gguf.py --shape "$shape" --out "$model.part" && mv "$model.part" "$model"
}

do_bench() {
  local out=${1:?usage: run.sh bench OUTDIR [NAME [llama-bench args]]} name=${2:-llama_bench}
  shift $(($# < 2 ? $# : 2))
  mkdir -p "$out"
  do_build
  do_model
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/llama_gpu.txt" 2>/dev/null || true
  local tests=("$@")
  [ ${#tests[@]} -gt 0 ] || tests=(-p "${LLAMA_P:-512}" -n "${LLAMA_N:-128}" -r "${LLAMA_R:-3}")
  local args=(-m "$model" -fa 1 -ngl "${LLAMA_NGL:-99}" "${tests[@]}")
  echo "llama.cpp: llama-bench ${args[*]}"
  # jsonl: each test's row is written when it ends, so a run cut off by its time limit keeps them.
  local rc=0
  "$bin" "${args[@]}" -o jsonl >"$out/$name.jsonl" 2>"$out/$name.stderr.log" || rc=$?
  [ "$rc" = 0 ] || { echo "llama.cpp: llama-bench exit $rc"; tail -5 "$out/$name.stderr.log"; }
  python3 "$top/benches/llama_cpp/results.py" table "$out/$name.jsonl"
  return "$rc"
}

case "${1:-}" in
  build) do_build ;;
  model) do_model ;;
  bench) shift; do_bench "${1:-${OUT:-/tmp}}" "${@:2}" ;;
  *) echo "usage: $0 build | model | bench OUTDIR" >&2; exit 2 ;;
esac
