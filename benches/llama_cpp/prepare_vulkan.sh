#!/usr/bin/env bash
# Builds llama.cpp's llama-bench with the Vulkan backend, here (the GPU machine has no network and
# no compiler for it), as ../shared/device/llama-vulkan.md describes: the llama.cpp tree vendored in
# the llama-cpp-python sdist; Vulkan headers, SPIRV-Headers and glslc from Debian sid (bookworm's
# are too old for vk::LayerSettingEXT and for the cooperative-matrix / integer-dot shaders), glslc
# run through trixie's loader and libraries; everything extracted with dpkg -x into a private
# prefix, nothing installed system-wide. libstdc++, libgcc and libgomp are linked statically, so the
# binary needs only glibc >= 2.36 and libvulkan.so.1 (the device gets that loader from .gl).
#
# Writes .llama-vk/llama-bench.xz (git-ignored; carry `.llama-vk`; about 8 MB) and
# .llama-vk/llama-bench.sha256 (of the uncompressed, stripped binary). Everything else is cached in
# ~/.cache/q4wgpu (the sdist, the .debs, the toolchain prefix, the build tree), so a second run
# does nothing and an interrupted build resumes. The build takes 13+ minutes at -j2.
#
# Built so on 2026-11-30 (llama-cpp-python 0.3.36 = llama.cpp 0c1e570; sid glslc 2026.4-1 / glslang
# 16.4.0, libvulkan-dev and spirv-headers 1.4.363.0; trixie libc6 2.41-12+deb13u5; gcc 12.2.0,
# cmake 3.31 from a wheel): 1839 s at -j2 on the shared 2-core machine; stripped binary 56,148,432
# bytes, sha256 04587c12c33f73b053a1c64a6efd61aa632a60987db128684f4eea35747c599c; .xz 8,051,972
# bytes. Needs libvulkan.so.1 and glibc >= 2.36 only. The sha256 depends on the build paths
# (assertion messages hold source file names), so another prefix gives another sum; sid moves on,
# so a later run may get newer .debs (their names are printed).
#
# Usage: benches/llama_cpp/prepare_vulkan.sh [llama-cpp-python version]
# Environment: JOBS (2), VKPREFIX (~/.cache/q4wgpu/llama-vulkan)
set -euo pipefail
version=${1:-0.3.36}
top=$(git rev-parse --show-toplevel)
cd "$top"
cache=${HOME}/.cache/q4wgpu
P=${VKPREFIX:-$cache/llama-vulkan}
out=.llama-vk
mkdir -p "$cache/llama-cpp-python" "$P" "$out"

if [ -f "$out/llama-bench.xz" ] && [ -f "$out/llama-bench.sha256" ] &&
   [ "$(xz -dc "$out/llama-bench.xz" | sha256sum | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$out/llama-bench.sha256")" ]; then
  echo "prepare_vulkan: $out/llama-bench.xz is up to date ($(cut -d' ' -f1 "$out/llama-bench.sha256"))"
  exit 0
fi

# cmake: bookworm's machine here has none; a wheel into a private venv (no system change).
cmake=$(command -v cmake || true)
if [ -z "$cmake" ]; then
  if [ ! -x "$P/venv/bin/cmake" ]; then
    python3 -m venv "$P/venv"
    "$P/venv/bin/pip" install -q 'cmake>=3.25,<4'
  fi
  cmake=$P/venv/bin/cmake
fi

# The llama.cpp sources (the same cache as prepare.sh uses).
sdist=$cache/llama-cpp-python/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ]; then
  pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$cache/llama-cpp-python"
fi
src=$P/src/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$src/CMakeLists.txt" ]; then
  rm -rf "$P/src"; mkdir -p "$P/src"
  tar xzf "$sdist" -C "$P/src"
fi

# The .debs, with a private apt state/cache/sources list per suite.
fetch_debs() {  # suite dest packages...
  local suite=$1 dest=$2; shift 2
  local a=$P/apt-$suite
  if [ ! -f "$dest/.done" ]; then
    mkdir -p "$a/state/lists/partial" "$a/cache/archives/partial" "$a/etc" "$a/debs" "$dest"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" >"$a/etc/sources.list"
    local o=(-o "Dir::State=$a/state" -o "Dir::Cache=$a/cache" -o "Dir::Etc::SourceList=$a/etc/sources.list"
             -o "Dir::Etc::SourceParts=/nonexistent" -o "Debug::NoLocking=1"
             -o "APT::Architecture=amd64" -o "APT::Architectures=amd64")
    apt-get "${o[@]}" update -qq
    rm -f "$a/debs"/*.deb
    (cd "$a/debs" && apt-get "${o[@]}" download "$@")
    for f in "$a/debs"/*.deb; do dpkg -x "$f" "$dest"; done
    ls "$a/debs" >"$dest/.done"
  fi
}
fetch_debs sid "$P/sid" glslc libshaderc1 libvulkan-dev spirv-headers
fetch_debs trixie "$P/root" libc6 libstdc++6 libgcc-s1
echo "prepare_vulkan: sid $(tr '\n' ' ' <"$P/sid/.done")"
echo "prepare_vulkan: trixie $(tr '\n' ' ' <"$P/root/.done")"

mkdir -p "$P/bin" "$P/staticlibs"
cat >"$P/bin/glslc-sid" <<EOF
#!/bin/sh
exec $P/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \\
  --library-path $P/sid/usr/lib/x86_64-linux-gnu:$P/root/usr/lib/x86_64-linux-gnu \\
  $P/sid/usr/bin/glslc "\$@"
EOF
chmod +x "$P/bin/glslc-sid"
"$P/bin/glslc-sid" --version | head -3
ln -sf "$(gcc -print-file-name=libgomp.a)" "$P/staticlibs/libgomp.a"

# The loader bookworm has: only libvulkan.so.1 without libvulkan-dev. ggml uses vulkan.hpp's
# dynamic dispatcher, so it links just a handful of Vulkan 1.1 entry points from it.
vklib=/usr/lib/x86_64-linux-gnu/libvulkan.so
[ -e "$vklib" ] || vklib=/usr/lib/x86_64-linux-gnu/libvulkan.so.1
[ -e "$vklib" ] || { echo "prepare_vulkan: no libvulkan.so.1 here (apt-get install libvulkan1)" >&2; exit 1; }

S=$P/sid/usr
build=$P/build-$version
nice -n 19 "$cmake" -S "$src" -B "$build" \
  -DGGML_VULKAN=ON -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DCMAKE_BUILD_TYPE=Release \
  -DVulkan_INCLUDE_DIR="$S/include" -DVulkan_LIBRARY="$vklib" \
  -DVulkan_GLSLC_EXECUTABLE="$P/bin/glslc-sid" \
  -DSPIRV-Headers_DIR="$S/share/cmake/SPIRV-Headers" \
  -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc -L$P/staticlibs" \
  >"$P/configure.log" 2>&1 || { tail -30 "$P/configure.log" >&2; exit 1; }
grep -E 'supported by glslc|Found Vulkan' "$P/configure.log" || true
start=$SECONDS
nice -n 19 "$cmake" --build "$build" --target llama-bench -j "${JOBS:-2}" >"$P/build.log" 2>&1 ||
  { tail -40 "$P/build.log" >&2; exit 1; }
echo "prepare_vulkan: built in $((SECONDS - start)) s"

strip -o "$P/llama-bench" "$build/bin/llama-bench"
xz -9 -T1 -c "$P/llama-bench" >"$out/llama-bench.xz.part"
mv "$out/llama-bench.xz.part" "$out/llama-bench.xz"
(cd "$P" && sha256sum llama-bench) >"$out/llama-bench.sha256"
ls -l "$P/llama-bench" "$out/llama-bench.xz"
cat "$out/llama-bench.sha256"
