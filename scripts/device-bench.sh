#!/usr/bin/env bash
# Every end-to-end benchmark in ONE call on the GPU machine (≤ 10 minutes), so that the ratios
# between systems come from one run on one machine:
#   1. q4wgpu, 32B shape: all resident and at 24 GB; then at 12, 8 and 4 GB (streamed, fewer tokens)
#   2. q4wgpu, 70B shape at 24 GB (most of it streamed; PCIe bound ≈ 1.4 tok/s)
#   3. the CUDA path (benches/cuda_path), 32B shape, in one process: every weight cached
#      (resident), then at 12, 8 and 4 GB (an N-entry cache fed from pinned memory, fewer tokens)
#   4. llama.cpp CUDA (benches/llama_cpp/run.sh): llama-bench on a random Q4_0 GGUF of the 32B shape
#   5. llama.cpp Vulkan (benches/llama_cpp/run_vulkan.sh, the binary carried in .llama-vk) on the
#      same GGUF, three configurations: khr (KHR cooperative matrix only, the path wgpu exposes),
#      coopmat2 (the default on NVIDIA: VK_NV_cooperative_matrix2) and none (no cooperative matrix)
#   6. depth rows: tg with 4096 and 16384 positions already in the KV cache, llama.cpp CUDA, then
#      the Vulkan configurations (llama-bench fills the cache once per depth and restores it)
#   7. the CUDA path, 70B shape at 24 GB
#   8. the depth rows of Vulkan without cooperative matrices (last: the part most likely to be cut)
# The GGUF is written (about 7 s), the Vulkan binary unpacked and llama.cpp CUDA built (about 4
# minutes) in the background at nice 19 with two cores left free while parts 1–3 use the GPU;
# SERIAL=1 does that first instead (may not fit).
# Each part runs under its own time limit, cut to what is left of DEADLINE; a failed part does
# not stop the others. Times (H200, 2026-11-30 runs; "≈" estimated, from token counts and rates
# measured earlier):
#   q4wgpu 32B resident 61 s, 32B streamed 124 s, 70B 61 s                          246 s
#   CUDA path 32B ≈ 60 s (16.5 GB of pinned weights made ≈ 10 s, 132 tokens resident at ≈ 17
#     tok/s, 3 × 28 tokens at ≤ 3.4 tok/s)                                          ≈ 60 s
#   llama.cpp CUDA pp512, pp4096, tg128 (8 s measured without pp4096)               ≈ 15 s
#   llama.cpp Vulkan pp512, pp4096, tg128: khr ≈ 25 s, coopmat2 ≈ 20 s; none pp512,
#     tg128 ≈ 15 s (its pp4096 would add ≈ 25 s)                                   ≈ 60 s
#   depth tg32 @ d4096, d16384: CUDA ≈ 20 s, Vulkan khr ≈ 25 s, coopmat2 ≈ 20 s     ≈ 65 s
#   CUDA path 70B ≈ 45 s (35 GB pinned ≈ 20 s, 14 tokens at ≤ 1.6 tok/s)             ≈ 45 s
#   depth rows of Vulkan none (16384 prompt tokens without cooperative matrices)    ≈ 55 s
# Each Vulkan call: about 5 s to start and to load the 18.4 GB GGUF from the page cache; a depth
# part is mostly its two cache fills at prompt speed. In all ≈ 550 s of the 570: the last parts
# are cut first if the estimates are off (llama-bench writes JSON lines, so finished rows are
# kept). STREAMED=0 leaves ≈ 365 s.
# Only 8 files come back from $OUT, so $OUT holds the results (*.json; every llama.cpp row in
# llama_bench.json) and machine.txt only; logs are written to $WORK and packed into
# $OUT/logs.tar.gz at the end (if the run is killed before that, the output tail still shows
# device-bench's own log). Each line of a
# part's log starts with the time it was printed (epoch seconds), and while the q4wgpu parts run
# nvidia-smi samples the GPU's memory use into vram.log every 200 ms (VRAM_LOG=0: not), so the
# report can give the peak VRAM of each budget (the CUDA path's parts too). Then, here:
#   python3 scripts/bench-report.py <files_at>/ > BENCHMARKS.md
#
# Prepare here: `cargo build --release && mkdir -p .device-bin && strip -o .device-bin/q4wgpu
# target/release/q4wgpu`, `../shared/device/fetch-gl.sh` (.gl), `benches/llama_cpp/prepare.sh`
# (.llama, about 21 MB), `benches/llama_cpp/prepare_vulkan.sh` (.llama-vk, about 8 MB). Run with
# carry [".gl", ".device-bin/q4wgpu", ".llama", ".llama-vk"] (not all of .device-bin: it may hold
# test binaries; the whole carry must stay under 64 MiB) and command `scripts/device-bench.sh`.
#
# Environment: OUT (default ./bench-out), Q4WGPU (binary), DEADLINE (seconds, 570), LLAMA=0 (skip
# llama.cpp CUDA), LLAMA_VK=0 (skip llama.cpp Vulkan), LLAMA_VK_CONFIGS (which and in what order:
# "khr coopmat2 none"), LLAMA_DEPTH=0 (skip the depth rows), LLAMA_DEPTHS ("4096,16384"),
# LLAMA_PP_LONG (4096; 0: no long-prompt row), CPU_BENCH=1 (add q4wgpu CPU-only 32B rows, about
# 60 s), LLAMA_CPU=1 (add llama.cpp -ngl 0 rows on every core, about 60 s), STREAMED=0 (skip q4wgpu's streamed 32B and 70B
# parts: about 185 s), CUDA=0 (skip the CUDA path), SERIAL=1, Q4_CHUNK (--chunk for q4wgpu
# prompts), QUICK=1 (a smoke run: fewer tokens and repetitions everywhere), GIT_COMMIT and
# GIT_DIRTY (0/1: the commit measured, for a checkout without .git; else read from git here, and
# exported so that every result can record it).
set -uo pipefail
cd "$(dirname "$0")/.."
# SET: all (default, every part in one call: about 585 s, so the last parts may be cut), or the
# two halves of it for two consecutive calls on one warm machine (run budgets first: its llama.cpp
# preparations stay on the machine, so resident finds them done):
#   budgets   q4wgpu 32B at 12, 8 and 4 GB (each budget in its own process, so that each
#             nvidia-smi peak is that budget's alone), 70B at 24 GB, the CUDA path's 70B; the
#             llama.cpp preparations in the background (the GGUF is kept for the next call)
#   resident  q4wgpu 32B resident (with depth rows) and pp4096, the CUDA path's 32B (resident and
#             budgets), llama.cpp CUDA and Vulkan with their depth rows
#   offload   issue 11: q4wgpu 32B at the Q4_BUDGETS (12 8 4) and 70B at 24 GB (Q4_70B=0: not),
#             each with --cpu-layers Q4_CPU_LAYERS (0,auto: streaming only, then the hybrid
#             plan); llama.cpp CUDA -ngl at matched VRAM, one part per LLAMA_NGL_ROWS value
#             (39 23 8: on 2026-12-01 -ngl 40, 23, 8 peaked at 12.23, 7.56, 3.43 GB, about
#             1.17 GB + 0.28 GB a layer, against q4wgpu's 11.58, 7.56, 3.27), pp512 and tg32; with
#             LLAMA_70B=1 also the 70B shape at -ngl LLAMA_70B_NGL (44) after the 32B GGUF is
#             removed (disk). Run with SERIAL=1, so nothing else uses the CPU while q4wgpu's CPU
#             layers are timed (the llama.cpp build, 240-330 s, comes first, within
#             LLAMA_BUILD_LIMIT seconds, default 300; a warm machine keeps what it built). An
#             empty Q4_BUDGETS or LLAMA_NGL_ROWS runs none. The 70B parts need a call of their
#             own after the build: e.g. `Q4_BUDGETS= Q4_70B=0 LLAMA_NGL_ROWS= LLAMA_BUILD_LIMIT=420`
#             (the build alone), then on the warm machine `Q4_BUDGETS= LLAMA_NGL_ROWS=
#             LLAMA_70B=1` (q4wgpu 70B at 24 GB, then llama.cpp's 70B GGUF and -ngl row).
SET=${SET:-all}
offload=0
case $SET in
  all) q4_resident=1 q4_budgets=${STREAMED:-1} cuda_32b=${CUDA:-1} cuda_70b=${CUDA:-1} llama_rows=1 ;;
  budgets) q4_resident=0 q4_budgets=1 cuda_32b=0 cuda_70b=${CUDA:-1} llama_rows=0 ;;
  resident) q4_resident=1 q4_budgets=0 cuda_32b=${CUDA:-1} cuda_70b=0 llama_rows=1 ;;
  offload) q4_resident=0 q4_budgets=1 cuda_32b=0 cuda_70b=0 llama_rows=0 offload=1 LLAMA_VK=0
    VRAM_PARTS=${VRAM_PARTS:-q4wgpu_* llama_ngl* llama_70b_ngl*} ;;
  *) echo "device-bench: SET=$SET: use all, budgets, resident or offload" >&2; exit 2 ;;
esac
# Names of what comes back, per set (the report reads several runs' folders together).
tag=; [ "$SET" = all ] || tag=-$SET
# Before anything is written here: the commit measured, and whether the tree differed from it.
# The binary's own record first (scripts/device-prepare.sh writes it; the GPU machine's copy of
# the repository may lag the tree the binary was built from), else this copy's git state.
if [ -z "${GIT_COMMIT:-}" ] && [ -s .device-bin/COMMIT ]; then
  read -r GIT_COMMIT rest <.device-bin/COMMIT
  GIT_DIRTY=0
  [ -n "${rest:-}" ] && GIT_DIRTY=1
fi
if [ -z "${GIT_COMMIT:-}" ] && GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  GIT_DIRTY=0
  git status --porcelain 2>/dev/null | grep -q . && GIT_DIRTY=1
fi
export GIT_COMMIT=${GIT_COMMIT:-} GIT_DIRTY=${GIT_DIRTY:-}
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-bench.XXXXXX")
DEADLINE=${DEADLINE:-585}
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
  llama_depth_n=8 llama_depths=${LLAMA_DEPTHS:-4096}
else
  # 70B: 16 tokens, as the bound there is near 1.4 tok/s: 3 × 32 tokens alone would take about
  # 70 s of the part's 120.
  # The CUDA path streams every layer weight at each token whatever the budget (≤ 3.4 tok/s for
  # 32B, ≤ 1.6 for 70B here; the original reports 0.70 tok/s on a 3090): few tokens there.
  tg=128 tg_streamed=32 tg_70b=16 pp=512 reps=3 cuda_n=32 cuda_streamed_n=8 cuda_70b_n=4
  # Depth rows: 32 tokens (at 16384 positions about 0.5 s per repetition).
  llama_depth_n=$tg llama_depths=${LLAMA_DEPTHS:-4096,16384}
fi
llama_n=${LLAMA_N:-128} llama_r=${LLAMA_R:-3}
llama_pp=${LLAMA_P:-512}
[ "${LLAMA_PP_LONG:-4096}" != 0 ] && llama_pp_long=$llama_pp,${LLAMA_PP_LONG:-4096} || llama_pp_long=$llama_pp

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
  echo "# start $1 $(now)" >>"$WORK/vram$tag.log"
  local buf=()
  command -v stdbuf >/dev/null && buf=(stdbuf -oL)
  TZ=UTC ${buf[@]+"${buf[@]}"} nvidia-smi --query-gpu=timestamp,memory.used,memory.total --format=csv,noheader,nounits \
    -lms 200 >>"$WORK/vram$tag.log" 2>&1 &
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
  echo "# end $1 $(now)" >>"$WORK/vram$tag.log"
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
  # All llama.cpp rows in one file (8 files come back); the .jsonl files stay in the logs. Here,
  # so that rows measured before an early exit come back too.
  if compgen -G "$WORK/llama_*.jsonl" >/dev/null; then
    python3 benches/llama_cpp/results.py merge "$OUT/llama_bench.json" "$WORK"/llama_*.jsonl 2>&1 |
      tee -a "$WORK/device-bench.log"
  fi
  log "done; results in $OUT"
  local f keep=0
  # Anything else in $OUT joins the logs; so do results beyond 7 (the tarball is the 8th file).
  for f in "$OUT"/*; do
    [ -f "$f" ] || continue
    case ${f##*/} in
      logs.tar.gz) ;;
      machine*.txt | *.json)
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
  echo "command: SET=$SET DEADLINE=$DEADLINE QUICK=${QUICK:-0} LLAMA=${LLAMA:-1} LLAMA_VK=${LLAMA_VK:-1} LLAMA_VK_CONFIGS='${LLAMA_VK_CONFIGS:-khr coopmat2 none}' LLAMA_DEPTH=${LLAMA_DEPTH:-1} STREAMED=${STREAMED:-1} CPU_BENCH=${CPU_BENCH:-0} LLAMA_CPU=${LLAMA_CPU:-0} CUDA=${CUDA:-1} SERIAL=${SERIAL:-0} Q4_CHUNK=${Q4_CHUNK:-} $0"
} >"$OUT/machine$tag.txt"
cat "$OUT/machine$tag.txt"

# llama.cpp's preparations, each leaving its exit status in $WORK/NAME.rc: the GGUF (both
# backends), the Vulkan binary, the CUDA build.
llama_steps=()
if [ "${LLAMA:-1}" != 0 ] || [ "${LLAMA_VK:-1}" != 0 ]; then
  llama_steps+=("llama_model benches/llama_cpp/run.sh model")
fi
[ "${LLAMA_VK:-1}" != 0 ] && llama_steps+=("llama_vk_unpack benches/llama_cpp/run_vulkan.sh unpack")
llama_pid=
if [ ${#llama_steps[@]} -gt 0 ]; then
  jobs=$(($(nproc) - 2))
  [ "$jobs" -lt 1 ] && jobs=1
  [ "${SERIAL:-0}" = 1 ] && jobs=$(nproc) # nothing else runs then
  [ "${LLAMA:-1}" != 0 ] && llama_steps+=("llama_build env JOBS=$jobs benches/llama_cpp/run.sh build")
  if [ "${SERIAL:-0}" = 1 ]; then
    for step in "${llama_steps[@]}"; do
      read -r name cmd <<<"$step"
      # shellcheck disable=SC2086  # cmd is a word list written above
      part "$name" "${LLAMA_BUILD_LIMIT:-300}" $cmd
      echo $? >"$WORK/$name.rc"
    done
  else
    log "llama.cpp: in the background (nice 19, $jobs jobs): $(printf '%s; ' "${llama_steps[@]}")"
    script=
    for step in "${llama_steps[@]}"; do
      read -r name cmd <<<"$step"
      script+="echo '# $name'; $cmd; echo \$? >'$WORK/$name.rc'; "
    done
    # Job control on: the background job gets its own process group, which can be stopped whole.
    set -m
    nice -n 19 bash -c "$script" >"$WORK/llama_build.log" 2>&1 &
    llama_pid=$!
    set +m
  fi
fi
# step_ok NAME: the preparation NAME ended with exit 0.
step_ok() { [ "$(cat "$WORK/$1.rc" 2>/dev/null)" = 0 ]; }

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
  # All resident (24 GB holds the whole 32B model too: the same plan), and with 4096 and 16384
  # positions already in the KV cache (-d, as llama-bench's).
  if [ "$q4_resident" = 1 ]; then
    part q4wgpu_32b_resident 150 "${bench[@]}" --synthetic qwen2-32b -p "$pp" -n "$tg" -r "$reps" \
      -d "0,${LLAMA_DEPTHS:-4096,16384}" --vram-budget all --json "$OUT/q4wgpu_32b_resident.json"
    [ "${QUICK:-0}" = 1 ] || part q4wgpu_32b_pp4096 80 "${bench[@]}" --synthetic qwen2-32b -p 4096 -n 0 -r 2 \
      --vram-budget all --json "$OUT/q4wgpu_32b_pp4096.json"
    # The portable GEMM on this GPU (issue 10: against llama.cpp Vulkan without cooperative matrices).
    part q4wgpu_32b_nocoop 60 "${bench[@]}" --no-coop --synthetic qwen2-32b -p "$pp" -n 0 -r 2 \
      --vram-budget all --json "$OUT/q4wgpu_32b_nocoop.json"
  fi
  if [ "$q4_budgets" = 1 ]; then
    # One process per budget: a process's peak then holds nothing left over from a larger budget.
    # Decode rows per setting of the CPU layers (streaming only, then the hybrid plan: offload).
    cpu_layers=(--cpu-layers "${Q4_CPU_LAYERS:-auto}")
    [ "$offload" = 1 ] && cpu_layers=(--cpu-layers "${Q4_CPU_LAYERS:-0,auto}")
    for b in ${Q4_BUDGETS-12 8 4}; do
      part "q4wgpu_32b_${b}gb" 110 "${bench[@]}" --synthetic qwen2-32b -p "$pp" -n "$tg_streamed" -r 2 \
        --vram-budget "${b}GB" "${cpu_layers[@]}" --json "$OUT/q4wgpu_32b_${b}gb.json"
    done
    [ "${Q4_70B:-1}" = 1 ] && part q4wgpu_70b_streamed 150 "${bench[@]}" --synthetic llama-70b -p 128 \
      -n "$tg_70b" -r 2 --vram-budget 24GB "${cpu_layers[@]}" --json "$OUT/q4wgpu_70b_streamed.json"
  fi
fi

if [ "$cuda_32b" = 1 ]; then
  part cuda_path_32b 120 python3 benches/cuda_path/cuda_path.py --shape qwen2-32b --vram-budget all,12GB,8GB,4GB \
    -n "$cuda_n" -r "$reps" --streamed-n "$cuda_streamed_n" --streamed-r 2 --json "$OUT/cuda_path_32b.json"
fi

if [ -n "$llama_pid" ]; then
  left=$((DEADLINE - (SECONDS - start) - 60))
  log "llama.cpp: waiting for the background preparations (up to $left s)"
  while kill -0 "$llama_pid" 2>/dev/null && [ $((DEADLINE - (SECONDS - start))) -gt 60 ]; do sleep 2; done
  if kill -0 "$llama_pid" 2>/dev/null; then
    log "llama.cpp: preparations not finished in time; stopping them (a warm machine keeps .llama-build for the next call)"
    kill -- -"$llama_pid" 2>/dev/null
  fi
  wait "$llama_pid" 2>/dev/null
  tail -8 "$WORK/llama_build.log"
fi
if [ ${#llama_steps[@]} -gt 0 ]; then
  log "llama.cpp: preparations (exit status): $(for f in "$WORK"/llama_*.rc; do [ -f "$f" ] && printf '%s %s; ' "$(basename "$f" .rc)" "$(cat "$f")"; done)"
fi
# Issue 11: llama.cpp's CPU offload at matched VRAM, each -ngl in a part of its own (its own peak).
if [ "$offload" = 1 ] && step_ok llama_model && step_ok llama_build; then
  for n in ${LLAMA_NGL_ROWS-39 23 8}; do
    part "llama_ngl$n" 90 env LLAMA_NGL="$n" benches/llama_cpp/run.sh bench "$WORK" "llama_ngl$n" \
      -p 512 -n 32 -r 2
  done
  if [ "${LLAMA_70B:-0}" = 1 ]; then
    rm -f "/tmp/llama-qwen2-32b-q4_0.gguf" # 18 GB; the 70B GGUF takes 38 of the 64 GB of disk
    part llama_70b_model 120 env SHAPE=llama-70b benches/llama_cpp/run.sh model
    n=${LLAMA_70B_NGL:-44}
    part "llama_70b_ngl$n" 150 env SHAPE=llama-70b LLAMA_NGL="$n" benches/llama_cpp/run.sh bench "$WORK" \
      "llama_70b_ngl$n" -p 128 -n 16 -r 2
    rm -f /tmp/llama-llama-70b-q4_0.gguf
  fi
fi
# Which llama.cpp backends can run: the GGUF is written and the binary is there.
cuda_go=0 vk_go=0
[ "$llama_rows" = 1 ] && [ "${LLAMA:-1}" != 0 ] && step_ok llama_model && step_ok llama_build && cuda_go=1
[ "$llama_rows" = 1 ] && [ "${LLAMA_VK:-1}" != 0 ] && step_ok llama_model && step_ok llama_vk_unpack && vk_go=1
vk_configs=${LLAMA_VK_CONFIGS:-khr coopmat2 none}
# pp4096 without cooperative matrices would cost about 25 s: only with the matrix paths.
vk_pp() { [ "$1" = none ] && echo "$llama_pp" || echo "$llama_pp_long"; }
# Short context first (the comparisons issues 9 and 10 are about), then the depth rows.
# run.sh / run_vulkan.sh write NAME.jsonl and NAME.stderr.log into $WORK; finish() merges them.
if [ "$cuda_go" = 1 ]; then
  part llama_bench 90 benches/llama_cpp/run.sh bench "$WORK" llama_bench \
    -p "$llama_pp_long" -n "$llama_n" -r "$llama_r"
fi
# CPU only, every core (issue 11 item 3); the JSON goes with the logs ($OUT holds 8 files). After
# the background llama.cpp build has finished: on 2026-11-30 this part ran beside that build and
# measured 0.99 tok/s, against 4.76 on the idle host (benchmarks/runs/2026-11-30-h200-cpu16*).
if [ "${CPU_BENCH:-0}" = 1 ] && [ "$SET" != budgets ]; then
  part q4wgpu_cpu_32b 120 env RAYON_NUM_THREADS="$(nproc)" "$Q4WGPU" bench --cpu --synthetic qwen2-32b \
    -p 64 -n 16 -r 2 --json "$WORK/q4wgpu_cpu_32b.json"
fi
# llama.cpp's CPU backend on the same cores and tests as q4wgpu_cpu_32b (CUDA devices hidden, so
# no prompt matmul is offloaded); its rows join llama_bench.json.
if [ "${LLAMA_CPU:-0}" = 1 ] && [ "$cuda_go" = 1 ]; then
  part llama_cpu 120 env CUDA_VISIBLE_DEVICES= LLAMA_NGL=0 benches/llama_cpp/run.sh bench "$WORK" llama_cpu \
    -p 64 -n 16 -r 2 -t "$(nproc)"
fi
if [ "$vk_go" = 1 ]; then
  for c in $vk_configs; do
    part "llama_vk_$c" 90 benches/llama_cpp/run_vulkan.sh bench "$c" "$WORK" "llama_vk_$c" \
      -p "$(vk_pp "$c")" -n "$llama_n" -r "$llama_r"
  done
fi
# Depth rows: CUDA, then the Vulkan configurations with cooperative matrices; without them the
# cache fills are slowest, so that configuration comes after the CUDA path's 70B part.
depth=(-p 0 -n "$llama_depth_n" -d "$llama_depths" -r "$llama_r")
vk_depth() {
  part "llama_vk_${1}_depth" 120 benches/llama_cpp/run_vulkan.sh bench "$1" "$WORK" "llama_vk_${1}_depth" "${depth[@]}"
}
if [ "${LLAMA_DEPTH:-1}" != 0 ]; then
  [ "$cuda_go" = 1 ] && part llama_depth 90 benches/llama_cpp/run.sh bench "$WORK" llama_depth "${depth[@]}"
  if [ "$vk_go" = 1 ]; then
    for c in $vk_configs; do
      [ "$c" = none ] || vk_depth "$c"
    done
  fi
fi

if [ "$cuda_70b" = 1 ]; then
  part cuda_path_70b 90 python3 benches/cuda_path/cuda_path.py --shape llama-70b --vram-budget 24GB --prompt 2 \
    -n "$cuda_70b_n" -r 2 --json "$OUT/cuda_path_70b.json"
fi

if [ "${LLAMA_DEPTH:-1}" != 0 ] && [ "$vk_go" = 1 ]; then
  for c in $vk_configs; do
    [ "$c" = none ] && vk_depth none
  done
fi
# The 18 GB GGUF this run wrote (not one given in LLAMA_MODEL).
[ ${#llama_steps[@]} -gt 0 ] && [ -z "${LLAMA_MODEL:-}" ] && [ "$SET" != budgets ] && rm -f "/tmp/llama-${SHAPE:-qwen2-32b}-q4_0.gguf"
finish
