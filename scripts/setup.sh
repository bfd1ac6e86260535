#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and run q4wgpu: the Vulkan loader and
# Mesa's Vulkan drivers (lavapipe, the CPU driver, lets everything run without a GPU; a GPU's own
# driver is used when present), Python's pip (the model fetcher downloads wheels from PyPI).
# Idempotent: does nothing when everything is there.
set -euo pipefail

need=()
dpkg -s libvulkan1 >/dev/null 2>&1 || need+=(libvulkan1)
dpkg -s mesa-vulkan-drivers >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)

if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: please install a Vulkan driver and loader (${need[*]}) with your package manager" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
