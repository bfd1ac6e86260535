#!/usr/bin/env bash
# Every end-to-end benchmark in ONE call on the GPU machine (≤ 10 minutes), so that the ratios
# between systems come from one run on one machine:
#   1. q4wgpu, 32B shape: all resident and at 24 GB; then at 12, 8 and 4 GB (streamed, fewer tokens)
#   2. q4wgpu, 70B shape at 24 GB (most of it streamed; PCIe bound ≈ 1.4 tok/s)
#   3. the CUDA path (benches/cuda_path), 32B shape, in one process: every weight cached
#      (resident), then at 12, 8 and 4 GB (an N-entry cache fed from pinned memory, fewer tokens)
#   4. llama.cpp CUDA (benches/llama_cpp/run.sh): llama-bench on a random Q4_0 GGUF of the 32B shape
#   5. the CUDA path, 70B shape at 24 GB (last: the part most likely to be cut by the deadline)
# llama.cpp is built (about 4 minutes) and its GGUF written in the background at nice 19 with
# two cores left free while parts 1–3 use the GPU; SERIAL=1 builds first instead (may not fit).
# Each part runs under its own time limit, cut to what is left of DEADLINE; a failed part does
# not stop the others. Times (H200, 2026-11-30 runs; the CUDA parts estimated from their token
# counts): q4wgpu 32B resident 61 s, 32B streamed 124 s, 70B 61 s; CUDA path 32B ≈ 60 s (16.5 GB
# of pinned weights made ≈ 10 s, 132 tokens resident at ≈ 17 tok/s, 3 × 28 tokens at ≤ 3.4 tok/s);
# llama-bench ≈ 10 s; CUDA path 70B ≈ 45 s (35 GB pinned ≈ 20 s, 14 tokens at ≤ 1.6 tok/s).
# In all ≈ 370 s of the 570. Only 8 files come back from $OUT, so $OUT holds the results (*.json) and
# machine.txt only; logs are written to $WORK and packed into $OUT/logs.tar.gz at the end (if the
# run is killed before that, the output tail still shows device-bench's own log). Each line of a
# part's log starts with the time it was printed (epoch seconds), and while the q4wgpu parts run
# nvidia-smi samples the GPU's memory use into vram.log every 200 ms (VRAM_LOG=0: not), so the
# report can give the peak VRAM of each budget (the CUDA path's parts too). Then, here:
#   python3 scripts/bench-report.py <files_at>/ > BENCHMARKS.md
#
# Prepare here: `cargo build --release && mkdir -p .device-bin && strip -o .device-bin/q4wgpu
# target/release/q4wgpu`, `../shared/device/fetch-gl.sh` (.gl), `benches/llama_cpp/prepare.sh`
# (.llama, about 21 MB). Run with carry [".gl", ".device-bin/q4wgpu", ".llama"] (not all of
# .device-bin: it may hold test binaries; the whole carry must stay under 64 MiB) and command
# `scripts/device-bench.sh`.
#
# Environment: OUT (default ./bench-out), Q4WGPU (binary), DEADLINE (seconds, 570), LLAMA=0 (skip
# llama.cpp), CUDA=0 (skip the CUDA path), SERIAL=1, Q4_CHUNK (--chunk for q4wgpu prompts),
# QUICK=1 (a smoke run: fewer tokens and repetitions everywhere), GIT_COMMIT and GIT_DIRTY (0/1:
# the commit measured, for a checkout without .git; else read from git here, and exported so that
# every result can record it).
set -uo pipefail
cd "$(dirname "$0")/.."
# Before anything is written here: the commit measured, and whether the tree differed from it.
if [ -z "${GIT_COMMIT:-}" ] && GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  GIT_DIRTY=0
  git status --porcelain 2>/dev/null | grep -q . && GIT_DIRTY=1
fi
export GIT_COMMIT=${GIT_COMMIT:-} GIT_DIRTY=${GIT_DIRTY:-}
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-bench.XXXXXX")
DEADLINE=${DEADLINE:-570}
start=$SECONDS
export PYTHONUNBUFFERED=1

Q4WGPU=${Q4WGPU:-}
if [ -z "$Q4WGPU" ]; then
  for c in .device-bin/q4wgpu target/release/q4wgpu; do
    [ -x "$c" ] && { Q4WGPU=$c; break; }
  done
fi
chunk=()
[ -n "${Q4_CHUNK:-}" ] && chunk=(--chunk "$Q4_CHUNK")
if [ "${QUICK:-0}" = 1 ]; then
  tg=16 tg_streamed=4 tg_70b=4 pp=128 reps=2 cuda_n=8 cuda_streamed_n=2 cuda_70b_n=2
  export LLAMA_N=32 LLAMA_R=2
else
  # 70B: 16 tokens, as the bound there is near 1.4 tok/s: 3 × 32 tokens alone would take about
  # 70 s of the part's 120.
  # The CUDA path streams every layer weight at each token whatever the budget (≤ 3.4 tok/s for
  # 32B, ≤ 1.6 for 70B here; the original reports 0.70 tok/s on a 3090): few tokens there.
  tg=128 tg_streamed=32 tg_70b=16 pp=512 reps=3 cuda_n=32 cuda_streamed_n=8 cuda_70b_n=4
fi

log() { echo "[device-bench $((SECONDS - start)) s] $*" | tee -a "$WORK/device-bench.log"; }

now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }

# stamp FILE: copies standard input to standard output, and to FILE with each line prefixed by the
# time it arrived (programs here print their result rows as they are measured).
stamp() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line"
    printf '%s %s\n' "$(now)" "$line" >>"$1"
  done
}

# The GPU memory sampler (nvidia-smi every 200 ms into $WORK/vram.log), around the parts named in
# VRAM_PARTS (shell patterns). Samples carry nvidia-smi's timestamp in UTC; each run of the
# sampler is framed by '# start NAME EPOCH' and '# end NAME EPOCH' lines, written while it is stopped.
VRAM_PARTS=${VRAM_PARTS:-q4wgpu_* cuda_path_*}
vram_pid=
vram_start() {
  [ "${VRAM_LOG:-1}" = 0 ] && return 0
  command -v nvidia-smi >/dev/null || return 0
  local pat pats match=0
  read -ra pats <<<"$VRAM_PARTS" # not a bare $VRAM_PARTS: that would expand q4wgpu_* against file names
  for pat in "${pats[@]}"; do
    # shellcheck disable=SC2254
    case $1 in $pat) match=1 ;; esac
  done
  [ "$match" = 1 ] || return 0
  echo "# start $1 $(now)" >>"$WORK/vram.log"
  local buf=()
  command -v stdbuf >/dev/null && buf=(stdbuf -oL)
  TZ=UTC ${buf[@]+"${buf[@]}"} nvidia-smi --query-gpu=timestamp,memory.used,memory.total --format=csv,noheader,nounits \
    -lms 200 >>"$WORK/vram.log" 2>&1 &
  vram_pid=$!
}
vram_stop() {
  [ -n "$vram_pid" ] || return 0
  # TERM, not INT: background jobs of a script ignore SIGINT. Lines are flushed one by one (stdbuf).
  kill -TERM "$vram_pid" 2>/dev/null
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 "$vram_pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$vram_pid" 2>/dev/null
  wait "$vram_pid" 2>/dev/null
  vram_pid=
  echo "# end $1 $(now)" >>"$WORK/vram.log"
}

# part NAME LIMIT_SECONDS COMMAND...: runs under min(LIMIT, time left); output on stdout and, with
# each line's time, in $WORK/NAME.log.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - (SECONDS - start) - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, ${left} s left"
    return 0
  fi
  log "$name: $* (limit $limit s)"
  local t0=$SECONDS
  echo "$(now) # part $name start: $*" >"$WORK/$name.log"
  vram_start "$name"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | stamp "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  vram_stop "$name"
  echo "$(now) # part $name end: exit $rc" >>"$WORK/$name.log"
  log "$name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (time limit)')"
  return "$rc"
}

# At most 8 files come back from $OUT: the results (*.json) and machine.txt stay there, everything
# else goes into logs.tar.gz. Runs once, at the end or on an early exit.
finished=0
finish() {
  [ "$finished" = 1 ] && return 0
  finished=1
  vram_stop sampler
  if [ -n "${llama_pid:-}" ] && kill -0 "$llama_pid" 2>/dev/null; then
    kill -- -"$llama_pid" 2>/dev/null
  fi
  log "done; results in $OUT"
  local f keep=0
  # Anything else in $OUT joins the logs; so do results beyond 7 (the tarball is the 8th file).
  for f in "$OUT"/*; do
    [ -f "$f" ] || continue
    case ${f##*/} in
      logs.tar.gz) ;;
      machine.txt | *.json)
        keep=$((keep + 1))
        [ "$keep" -gt 7 ] && mv "$f" "$WORK/" ;;
      *) mv "$f" "$WORK/" ;;
    esac
  done
  tar czf "$OUT/logs.tar.gz" -C "$WORK" . && rm -rf "$WORK"
  ls -la "$OUT"
  echo "device-bench: $(find "$OUT" -type f | wc -l) files in $OUT (at most 8 come back)"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# The Vulkan loader the machine lacks (shared/device/README.md).
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null || true
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "host: $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  # MemTotal grows as memory is used on these machines: at the start it says less than there is.
  echo "memory: MemTotal $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1e6}' /proc/meminfo) at the start"
  echo "kernel: $(uname -r)"
  echo "python: $(python3 -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1)"
  case $GIT_DIRTY in
    1) state=' (with uncommitted changes)' ;;
    0) state='' ;;
    *) state=' (tree state unknown)' ;;
  esac
  echo "git: ${GIT_COMMIT:-unknown}${GIT_COMMIT:+$state}"
  echo "command: DEADLINE=$DEADLINE QUICK=${QUICK:-0} LLAMA=${LLAMA:-1} CUDA=${CUDA:-1} SERIAL=${SERIAL:-0} Q4_CHUNK=${Q4_CHUNK:-} $0"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

llama_pid=
llama_ok=1
if [ "${LLAMA:-1}" != 0 ]; then
  jobs=$(($(nproc) - 2))
  [ "$jobs" -lt 1 ] && jobs=1
  if [ "${SERIAL:-0}" = 1 ]; then
    part llama_build 300 env JOBS="$(nproc)" benches/llama_cpp/run.sh build &&
      part llama_model 60 benches/llama_cpp/run.sh model || llama_ok=0
  else
    log "llama.cpp: build and GGUF in the background (nice 19, $jobs jobs)"
    # Job control on: the background job gets its own process group, which can be stopped whole.
    set -m
    JOBS=$jobs nice -n 19 bash -c "benches/llama_cpp/run.sh build && benches/llama_cpp/run.sh model" \
      >"$WORK/llama_build.log" 2>&1 &
    llama_pid=$!
    set +m
  fi
fi

if [ -z "$Q4WGPU" ]; then
  log "q4wgpu: no binary (.device-bin/q4wgpu or target/release/q4wgpu); set Q4WGPU"
else
  # Not `info | grep -q`: under pipefail, grep leaving early can fail the pipeline.
  info=$("$Q4WGPU" info 2>&1)
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if ! grep -qi nvidia <<<"$info" && [ -f "$icd" ]; then
    export VK_DRIVER_FILES=$icd
    log "q4wgpu: no NVIDIA adapter by default; VK_DRIVER_FILES=$VK_DRIVER_FILES"
    info=$("$Q4WGPU" info 2>&1)
  fi
  echo "$info" >"$WORK/q4wgpu_info.log"
  grep -qi nvidia <<<"$info" || log "q4wgpu: still no NVIDIA adapter: $(tail -3 <<<"$info")"
  bench=("$Q4WGPU" bench --adapter nvidia --bandwidth-buffer 1GiB ${chunk[@]+"${chunk[@]}"})
  part q4wgpu_32b_resident 120 "${bench[@]}" --synthetic qwen2-32b -p "$pp" -n "$tg" -r "$reps" \
    --vram-budget all,24GB --json "$OUT/q4wgpu_32b_resident.json"
  part q4wgpu_32b_streamed 150 "${bench[@]}" --synthetic qwen2-32b -p "$pp" -n "$tg_streamed" -r 2 \
    --vram-budget 12GB,8GB,4GB --json "$OUT/q4wgpu_32b_streamed.json"
  part q4wgpu_70b_streamed 120 "${bench[@]}" --synthetic llama-70b -p 128 -n "$tg_70b" -r 2 \
    --vram-budget 24GB --json "$OUT/q4wgpu_70b_streamed.json"
fi

if [ "${CUDA:-1}" != 0 ]; then
  part cuda_path_32b 120 python3 benches/cuda_path/cuda_path.py --shape qwen2-32b --vram-budget all,12GB,8GB,4GB \
    -n "$cuda_n" -r "$reps" --streamed-n "$cuda_streamed_n" --streamed-r 2 --json "$OUT/cuda_path_32b.json"
fi

if [ -n "$llama_pid" ]; then
  left=$((DEADLINE - (SECONDS - start) - 60))
  log "llama.cpp: waiting for the background build (up to $left s)"
  while kill -0 "$llama_pid" 2>/dev/null && [ $((DEADLINE - (SECONDS - start))) -gt 60 ]; do sleep 2; done
  if kill -0 "$llama_pid" 2>/dev/null; then
    log "llama.cpp: build not finished in time; stopping it (a warm machine keeps .llama-build for the next call)"
    kill -- -"$llama_pid" 2>/dev/null
    llama_ok=0
  else
    wait "$llama_pid"
    rc=$?
    log "llama.cpp: background build exit $rc"
    [ "$rc" = 0 ] || llama_ok=0
  fi
  tail -5 "$WORK/llama_build.log"
fi
if [ "${LLAMA:-1}" != 0 ] && [ "$llama_ok" = 1 ]; then
  # run.sh writes llama_bench.json, llama_gpu.txt and llama_bench.stderr.log into the folder given.
  part llama_bench 150 benches/llama_cpp/run.sh bench "$WORK"
  [ -s "$WORK/llama_bench.json" ] && mv "$WORK/llama_bench.json" "$OUT/"
  rm -f /tmp/llama-*-q4_0.gguf
fi

if [ "${CUDA:-1}" != 0 ]; then
  part cuda_path_70b 90 python3 benches/cuda_path/cuda_path.py --shape llama-70b --vram-budget 24GB --prompt 2 \
    -n "$cuda_70b_n" -r 2 --json "$OUT/cuda_path_70b.json"
fi
finish
