#!/usr/bin/env bash
# Prepares the llama.cpp sources for the comparison benchmark, here (the GPU machine has no
# network): downloads the llama-cpp-python sdist, which vendors llama.cpp, and keeps only what
# llama-bench with the CUDA backend needs (ggml base, ggml-cpu, ggml-cuda, src, common, vendor,
# tools/llama-bench, gguf-py, CMake files) in .llama/llama.cpp, and extracts Qwen2's tokenizer
# from the GGUF the project already has into .llama/qwen2-tokenizer.json.gz (make_gguf.py needs
# numpy here for that step). .llama is git-ignored, about 21 MB: carry it to the device.
# The sdist is cached in ~/.cache/q4wgpu/llama-cpp-python. Idempotent.
#
# Usage: benches/llama_cpp/prepare.sh [llama-cpp-python version]
set -euo pipefail
version=${1:-0.3.36}
top=$(git rev-parse --show-toplevel)
cd "$top"
cache=${HOME}/.cache/q4wgpu/llama-cpp-python
mkdir -p "$cache" .llama
sdist=$cache/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ]; then
  # Only this package as source: its build dependencies may come as wheels (building cmake from
  # source would take an hour).
  pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$cache"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$sdist" -C "$tmp"
src=$tmp/llama_cpp_python-$version/vendor/llama.cpp
dst=.llama/llama.cpp
rm -rf "$dst"
mkdir -p "$dst/ggml/src" "$dst/tools"
cp -r "$src"/{CMakeLists.txt,LICENSE,cmake,include,src,common,vendor,gguf-py} "$dst"/
cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$dst/ggml/"
# ggml base sources, then the two backends we build.
find "$src/ggml/src" -maxdepth 1 -type f -exec cp {} "$dst/ggml/src/" \;
cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$dst/ggml/src/"
cp -r "$src/tools/llama-bench" "$dst/tools/"
# Only llama-bench among the tools; miniaudio is for the audio tools we do not build.
printf 'llama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' > "$dst/tools/CMakeLists.txt"
rm -rf "$dst/vendor/miniaudio"
sed -i '/add_subdirectory(miniaudio)/d' "$dst/vendor/CMakeLists.txt"
echo "$version" > "$dst/LLAMA_CPP_PYTHON_VERSION"
tok=.llama/qwen2-tokenizer.json.gz
gguf_src=${HOME}/.cache/q4wgpu/models/qwen2.5-coder-0.5b-instruct.gguf
if [ ! -f "$tok" ] && [ -f "$gguf_src" ]; then
  python3 benches/llama_cpp/make_gguf.py --extract-tokenizer "$gguf_src" --out "$tok" ||
    echo "prepare: tokenizer extraction failed (numpy missing?); make_gguf.py will use a minimal vocabulary" >&2
fi
du -sh .llama
