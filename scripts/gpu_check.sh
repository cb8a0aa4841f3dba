#!/usr/bin/env bash
# Everything the GPU machine runs, in one script: build (the package, the kernel harness
# and the read-floor microbenchmark), SASS summary, GPU tests, compute-sanitizer, soak,
# launch stress and benchmarks. Logs go to $OUT (default /tmp/out): summary.txt collects
# one line per step, the other files the full output.
#   bash scripts/gpu_check.sh MODE [MODE...]
#     build    : install the package (CUDA on), build the harness and stream_floor, SASS
#                summary (sparse MMAs, local-memory accesses, serialized wgmmas per kernel)
#     tests    : pytest -m gpu (every GPU test: kernels, serving kernel, layer, fuzz; the
#                long checks below have marks of their own and are not part of it)
#     sanitize : pytest -m sanitize: compute-sanitizer memcheck, racecheck, initcheck,
#                synccheck on scripts/sanitize_case.py, automatic choice and each kernel
#                forced (SANITIZE_RUNS "kernel:splits ...", SANITIZE_TOOLS, SANITIZE_TIMEOUT
#                seconds per run)
#     stress   : pytest -m stress: small cases launched STRESS_LAUNCHES (default 20000)
#                times each per kernel, rare hangs (STRESS_TIMEOUT seconds per kernel)
#     soak     : pytest -m soak: the randomized soak (SOAK_SECONDS, default 150)
#     kernels  : the harness at serving and prefill shapes, every kernel (outputs compared),
#                and `floor`
#     floor    : the HBM read floor, and the read in the serving kernel's access order
#                (thread loads, and bulk tensor copies as its producer issues them)
#     ablate   : the serving kernel's blocks without parts of their work (ABLATE_SHAPES)
#     sweep    : the serving kernel's K splits forced at single-expert serving shapes
#     timeline : the serving kernel's per-block phase timeline (harness_timeline) at
#                TIMELINE_SHAPES "K:M:ROWS[:EXPERTS:GLU] ...": launch gap, prologue, first
#                stage, main loop, epilogue, busy blocks per SM
#     profile  : ncu of the serving kernel (PROFILE_SHAPES "K:M:ROWS ...", PROFILE_KERNEL):
#                throughput, occupancy, stall reasons; PROFILE_SOURCE=1 adds the stall
#                samples per SASS instruction (a CSV per shape)
#     serving  : benchmarks/bench_serving.py (single, grouped, deepseek; dense baselines)
#     backward : GPU gradient tests and benchmarks/bench_backward.py
#     layer    : benchmarks/bench_layer.py, the Mixtral-8x7B layer at 16 to 4096 tokens
#     multi    : pytest -m multi_gpu: sharded == single device on all the GPUs (2 or more;
#                MULTI_TIMEOUT seconds)
#     full     : build, kernels, then tests and sanitize side by side (correctness only, so
#                sharing the GPU is fine), then serving alone; logs packed into one file
# Every mode but `build` builds first (once). Run from the repository root.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
BIN=/tmp/samoyeds_bin
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
quiet() { grep -v "^[WI][0-9]\{4\} "; }  # absl/XLA info and warning lines
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
BUILT=0
[ -n "${SKIP_BUILD:-}" ] && BUILT=1  # the package and binaries are installed already

machine() {
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$OUT/summary.txt"
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" | tee -a "$OUT/summary.txt"
}

build() {
  [ $BUILT = 1 ] && return 0
  step "build"
  local t0=$SECONDS
  mkdir -p "$BIN"
  ( bash benchmarks/build.sh "$BIN" harness stream_floor > "$OUT/build_bench.log" 2>&1 ) &
  local bench_pid=$!
  ( bash benchmarks/build.sh "$BIN" harness_timeline > "$OUT/build_timeline.log" 2>&1 \
    || note "timeline harness failed to build" ) &
  local timeline_pid=$!
  SAMOYEDS_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v "$REPO" > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  wait $bench_pid || { note "benchmark binaries failed to build"; tail -20 "$OUT/build_bench.log"; }
  wait $timeline_pid
  note "build took $((SECONDS - t0)) s"
  grep -E "C751[0-8]|spill" "$OUT/build.log" | grep -v " 0 bytes spill" | sort | uniq -c | head -12
  cd /tmp  # import the installed package, not the source tree
  SO=$(python3 -c "import samoyeds_jax._samoyeds as m; print(m.__file__)")
  python3 -c "import samoyeds_jax._samoyeds as m; print('HAS_CUDA', m.HAS_CUDA, 'FFI', m.FFI_API_VERSION)" | tee -a "$OUT/summary.txt"
  step "sass"
  cuobjdump -sass "$SO" > /tmp/sass.txt 2>&1
  { echo "per kernel: HMMA.SP / HGMMA.SP count, local-memory (LDL/STL) count, serialized wgmmas";
    python3 "$REPO/scripts/sass_check.py" /tmp/sass.txt; } > "$OUT/sass.txt"
  grep -c "LDL/STL=0 " "$OUT/sass.txt" | sed 's/^/kernels without local memory: /' | tee -a "$OUT/summary.txt"
  grep -v "LDL/STL=0\b" "$OUT/sass.txt" | grep "LDL" | head -5
  grep -o "serialized-wgmma-pairs=[1-9][0-9]*" "$OUT/sass.txt" | sort | uniq -c | sed 's/^/SERIALIZED: /'
  cd "$REPO"
  BUILT=1
}

tests() {
  build
  # TEST_SHARDS pytest processes share the GPU (the references and compiles are CPU work).
  local n=${TEST_SHARDS:-4} pids=() i
  step "gpu tests (pytest -m gpu, $n processes)"
  for ((i = 0; i < n; i++)); do
    (cd /tmp && SAMOYEDS_TEST_SHARD=$i/$n XLA_PYTHON_CLIENT_PREALLOCATE=false \
      timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -q -m gpu "$REPO/tests" --rootdir="$REPO" \
      -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1) | quiet > "$OUT/pytest_gpu_$i.log" &
    pids+=($!)
  done
  wait "${pids[@]}"
  for ((i = 0; i < n; i++)); do
    cat "$OUT/pytest_gpu_$i.log" >> "$OUT/pytest_gpu.log"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu_$i.log" | head -20
    grep -E "passed|failed|error|no tests ran" "$OUT/pytest_gpu_$i.log" | tail -1 | sed "s/^/gpu tests shard $i: /" \
      | tee -a "$OUT/summary.txt"
    rm -f "$OUT/pytest_gpu_$i.log"
  done
}

# The long GPU checks: pytest -m MARK over tests/ (their settings reach the tests as
# SAMOYEDS_* variables, documented in each test module). The output, the scripts' too
# (-s), is appended to $OUT/LOG as it comes (a run cut off keeps what it did); the
# summary gets each test's outcome and the totals.
marked() {
  local mark=$1 log=$2 part
  part=$(mktemp)
  (cd /tmp && COLUMNS=200 python3 -m pytest -v -s -rA \
    -m "$mark" "$REPO/tests" --rootdir="$REPO" -p no:cacheprovider 2>&1) | quiet \
    | tee "$part" >> "$OUT/$log"
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED) " "$part" | sed -E "s# [^ ]*/tests/# tests/#" \
    | tee -a "$OUT/summary.txt"
  grep -E "^[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran" "$part" | tail -1 \
    | sed "s/^/pytest -m $mark: /" | tee -a "$OUT/summary.txt"
  rm -f "$part"
}

sanitize() {
  build
  # Racecheck of the prefill kernel runs a build without setmaxnreg (racecheck stalls at
  # random cases when warps reallocate registers), importable from its own directory.
  # Unset SANITIZE_TOOLS / SANITIZE_RUNS mean the test's defaults, which need it.
  if [[ " ${SANITIZE_TOOLS:-racecheck}" == *racecheck* && ( -z "${SANITIZE_RUNS:-}" ||
        " $SANITIZE_RUNS" == *" auto:"* || " $SANITIZE_RUNS" == *" hopper:"* ) ]]; then
    step "build without setmaxnreg, for racecheck of the prefill kernel"
    CUDAFLAGS=-DSAMOYEDS_NO_SETMAXNREG SAMOYEDS_CUDA=ON python3 -m pip install --no-build-isolation \
      --no-deps --target /tmp/sj_no_setmaxnreg --config-settings=cmake.define.SAMOYEDS_CUDA_ARCHS=90a \
      "$REPO" > "$OUT/build_racecheck.log" 2>&1 || { tail -20 "$OUT/build_racecheck.log"; exit 1; }
  fi
  local racecheck_path=""
  [ -d /tmp/sj_no_setmaxnreg ] && racecheck_path=/tmp/sj_no_setmaxnreg
  step "compute-sanitizer (pytest -m sanitize)"
  SAMOYEDS_SANITIZE_RUNS=${SANITIZE_RUNS:-} SAMOYEDS_SANITIZE_TOOLS=${SANITIZE_TOOLS:-} \
    SAMOYEDS_SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-} SAMOYEDS_SANITIZE_RACECHECK_PATH=$racecheck_path \
    marked sanitize sanitizer.log
}

stress() {
  build
  step "launch stress (pytest -m stress)"
  SAMOYEDS_STRESS_LAUNCHES=${STRESS_LAUNCHES:-} SAMOYEDS_STRESS_TIMEOUT=${STRESS_TIMEOUT:-} \
    marked stress stress.log
}

soak() {
  build
  step "soak (pytest -m soak)"
  SAMOYEDS_SOAK_SECONDS=${SOAK_SECONDS:-150} SAMOYEDS_SOAK_JSON="$OUT/soak.json" marked soak soak.log
  grep -E "^SOAK (PASSED|FAILED)" "$OUT/soak.log" | tail -1 | tee -a "$OUT/summary.txt"
}

kernels() {
  build
  step "kernel harness: every kernel, outputs compared against the warp-level kernel"
  local H="timeout 60 $BIN/harness"
  {
    for t in 1 16 64 256; do
      $H 4096 14336 $t 1 2 128 1 20; $H 14336 4096 $t 1 2 128 1 20
    done
    $H 4096 14336 16 1 1 128 1 20; $H 4096 14336 16 1 4 128 1 20; $H 4096 14336 16 2 4 128 1 20
    $H 4096 14336 64 1 1 128 1 20; $H 4096 14336 64 1 4 128 1 20
    # grouped fused gate_up (8 experts, top-2 of T tokens: 2T rows), SwiGLU
    for t in 16 128 512; do $H 4096 28672 $((2 * t)) 1 2 128 8 10 1; done
    # DeepSeek-MoE gate_up (64 experts, top-6), SwiGLU
    for t in 16 512; do $H 2048 2816 $((6 * t)) 1 2 128 64 10 1; done
    # prefill, for the record
    $H 4096 14336 4096 1 2 128 1 10
  } 2>&1 | tee -a "$OUT/kernel.log" | grep -E "median|MISMATCH"
  grep -c MISMATCH "$OUT/kernel.log" | sed 's/^/harness mismatches: /' | tee -a "$OUT/summary.txt"
  floor
}

floor() {
  build
  step "HBM read floor"
  timeout 120 "$BIN/stream_floor" 4 8 16 33 66 117 235 2>&1 | tee -a "$OUT/floor.log" | tail -9
  step "HBM read in the serving kernel's order (1:2 values: up 7168 x 4096 B, 2 splits; down 2048 x 14336 B, 6)"
  for mode in tiled tma; do
    timeout 60 "$BIN/stream_floor" $mode 7168 4096 2; timeout 60 "$BIN/stream_floor" $mode 2048 14336 6
  done 2>&1 | tee -a "$OUT/floor.log"
}

# The serving kernel's ablations (harness with HARNESS_ABLATE: no metadata, no routed
# rows, no MMAs, no K-split sum, combinations; outputs not compared) at ABLATE_SHAPES
# "K:M:ROWS[:EXPERTS:GLU] ...".
ablate() {
  build
  step "serving kernel ablations"
  for shape in ${ABLATE_SHAPES:-4096:14336:16 14336:4096:16 4096:14336:64 14336:4096:64 4096:28672:64:8:1 2048:2816:96:64:1}; do
    IFS=: read -r k m rows e glu <<< "$shape"
    HARNESS_ABLATE=1 timeout 120 "$BIN/harness" "$k" "$m" "$rows" 1 2 128 "${e:-1}" 10 "${glu:-0}" 2>&1 \
      | grep -E "^(stream|[nw]-).*median|MISMATCH"
  done 2>&1 | tee -a "$OUT/ablate.log"
}

# K splits forced on the serving kernel at the single-expert serving shapes: where the
# automatic count (StreamSplitsFor) stands against its neighbours. Shapes are K:M:ROWS.
sweep() {
  build
  step "K-split sweep of the serving kernel"
  for shape in ${SWEEP_SHAPES:-4096:14336:16 14336:4096:16 4096:14336:64 14336:4096:64}; do
    shape=${shape//:/ }
    for s in ${SWEEP_SPLITS:-0 1 2 3 4 6 8}; do
      echo "splits=$s $(HARNESS_SPLITS=$s timeout 60 "$BIN/harness" $shape 1 2 128 1 20 2>&1 | grep -E "^stream .*median|MISMATCH" | head -2)"
    done
  done 2>&1 | tee -a "$OUT/sweep.log"
}

timeline() {
  build
  step "serving kernel timeline"
  for shape in ${TIMELINE_SHAPES:-4096:14336:16 14336:4096:16 4096:14336:64 14336:4096:64 4096:28672:32:8:1}; do
    IFS=: read -r k m rows e glu <<< "$shape"
    echo "--- K M ROWS = $k $m $rows, experts ${e:-1}, glu ${glu:-0}"
    timeout 120 "$BIN/harness_timeline" "$k" "$m" "$rows" 1 2 128 "${e:-1}" 10 "${glu:-0}" 2>&1 \
      | grep -E "^(stream|s[0-9]+[a-z]).*median|^timeline|MISMATCH"
  done 2>&1 | tee -a "$OUT/timeline.log"
}

# The backward: GPU gradient tests, then benchmarks/bench_backward.py.
backward() {
  build
  step "gpu gradient tests"
  (cd /tmp && timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu "$REPO/tests/test_grad.py" \
    $(ls "$REPO"/tests/test_gpu_grad.py 2>/dev/null) --rootdir="$REPO" -p no:cacheprovider 2>&1) | quiet \
    | tee -a "$OUT/pytest_grad.log" | tail -8
  grep -E "passed|failed|error" "$OUT/pytest_grad.log" | tail -1 | sed 's/^/gpu grad tests: /' >> "$OUT/summary.txt"
  [ -f "$REPO/benchmarks/bench_backward.py" ] || return 0
  step "backward benchmark"
  (cd /tmp && timeout ${BACKWARD_TIMEOUT:-240} python3 "$REPO/benchmarks/bench_backward.py" \
    --json_out="$OUT/bench_backward.json" ${BACKWARD_ARGS:-}) 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -20
}

profile() {
  build
  local M='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum'
  local S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
  for shape in ${PROFILE_SHAPES:-4096:14336:16 4096:14336:256}; do
    shape=${shape//:/ }
    step "ncu: serving kernel, K M T = $shape (1:2, L = 128)"
    local f="$OUT/ncu_${shape// /_}.txt"
    timeout 180 ncu --clock-control none $S --metrics "$M" -k regex:${PROFILE_KERNEL:-Stream} --launch-skip 3 \
      --launch-count 1 "$BIN/harness" $shape 1 2 128 1 2 > "$f" 2>&1
    grep -E "RaggedDot|Duration|Elapsed Cycles|SM Active Cycles|DRAM Throughput|Memory Throughput|L2 Hit|Achieved Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Eligible Warps|Issued Warp|stalled_(long|short|barrier|wait|mio|lg|math|no_inst|branch|sleep|membar|drain|imc|dispatch|tex)|inst_executed|Grid Size|Waves" "$f" | head -45
    if [ -n "${PROFILE_SOURCE:-}" ]; then
      # Stall samples per SASS instruction: where the issue slots go.
      local rep="/tmp/ncu_src_${shape// /_}"
      timeout 180 ncu --clock-control none --section SourceCounters --section WarpStateStats \
        -k regex:${PROFILE_KERNEL:-Stream} --launch-skip 3 --launch-count 1 -f -o "$rep" \
        "$BIN/harness" $shape 1 2 128 1 2 > "$f.source.log" 2>&1
      ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "${f%.txt}_sass.csv" 2>> "$f.source.log" \
        || echo "ncu source page failed: $(tail -2 "$f.source.log")"
    fi
  done
}

serving() {
  build
  step "serving benchmark"
  (cd /tmp && timeout ${SERVING_TIMEOUT:-480} python3 "$REPO/benchmarks/bench_serving.py" \
    --json_out="$OUT/bench_serving.json" ${SERVING_ARGS:-}) 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -40
}

layer() {
  build
  step "layer benchmark"
  (cd /tmp && python3 "$REPO/benchmarks/bench_layer.py" --preset=mixtral-8x7b --tokens=${LAYER_TOKENS:-16,128,512,4096} \
    --paths=samoyeds,xla_ragged_dot,xla_capacity_einsum,xla_all_experts \
    --json_out="$OUT/bench_layer.json") 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -24
}

multi() {
  build
  step "sharded layer == single-device layer on $(nvidia-smi -L | wc -l) GPUs (pytest -m multi_gpu)"
  SAMOYEDS_MULTI_TIMEOUT=${MULTI_TIMEOUT:-} marked multi_gpu multi.log
  grep "^sharded == single-device" "$OUT/multi.log" | tail -1 | tee -a "$OUT/summary.txt"
}

full() {
  build
  kernels
  local self="$REPO/scripts/gpu_check.sh"
  SKIP_BUILD=1 bash "$self" tests > "$OUT/tests.out" 2>&1 &
  local tests_pid=$!
  SKIP_BUILD=1 bash "$self" sanitize > "$OUT/sanitize.out" 2>&1
  wait $tests_pid
  tail -12 "$OUT/tests.out"
  serving
}

# The device returns at most 8 files: everything but the summary goes into one archive.
pack() {
  (cd "$OUT" && tar czf /tmp/logs.tgz --exclude=summary.txt --exclude=logs.tgz . && mv /tmp/logs.tgz "$OUT/" \
    && find . -maxdepth 1 -type f ! -name summary.txt ! -name logs.tgz -delete)
}

machine
for mode in "$@"; do
  case $mode in
    build|tests|sanitize|stress|soak|kernels|floor|ablate|sweep|timeline|profile|serving|backward|layer|multi|full|pack) $mode ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
step "summary"
cat "$OUT/summary.txt"
