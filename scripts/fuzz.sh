#!/bin/sh
# The long fuzz campaign: every reader (GGUF, safetensors HF and q4wgpu, config.json, tokenizer
# and chat template) for FUZZ_EXECS executions each (default 1000000), one after another, at the
# lowest CPU priority (the machine is shared). A failing input is saved under
# target/fuzz-failures/<reader>/ and the run stops there; copy it into
# tests/fuzz_corpus/<reader>/ so every later run (and `cargo test`) replays it.
#   scripts/fuzz.sh                 # all readers, 10^6 each
#   FUZZ_EXECS=200000 FUZZ_SEED=7 scripts/fuzz.sh fuzz_gguf
set -eu
cd "$(dirname "$0")/.."
export FUZZ_EXECS="${FUZZ_EXECS:-1000000}" FUZZ_SEED="${FUZZ_SEED:-1}"
filter="${1:-fuzz_}"
exec nice -n 19 cargo test --release --test fuzz_readers -- --test-threads=1 --nocapture "$filter"
