#!/usr/bin/env bash
# Fetches the real checkpoints the tests and benchmarks use into ~/.cache/q4wgpu (or $Q4WGPU_CACHE),
# verified by SHA-256. Idempotent: verified files are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -- fetch "$@"
