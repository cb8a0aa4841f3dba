#!/usr/bin/env bash
# Everything the GPU machine runs, in one script: build, SASS check, GPU tests,
# compute-sanitizer, soak, benchmarks and the demo. Logs go to $OUT (at most 8 files
# come back, so logs are appended to a few files).
#   bash scripts/gpu_check.sh MODE [MODE...]
#     kernel   : harness (carried .devbin/harness): both kernels timed and compared
#     split    : harness at decode shapes for each forced K split count and the automatic one
#     tests    : GPU tests (auto kernel choice, then the Hopper kernel forced everywhere)
#     sanitize : 4 compute-sanitizer tools, auto and Hopper-forced
#     soak     : GPU hypothesis fuzz test and the randomized soak
#     stress   : small cases launched 50000 times each, Hopper-forced (looks for rare hangs)
#     perf     : Mixtral demo, kernel and layer benchmarks (device time from traces)
#     glu      : the layer's kernels one by one (fused GLU vs unfused, down)
#     perflite : kernel benchmarks (up, 1:1, down) and the layer benchmark, no demo
#     suite    : the issue-6 suite: stack and memory benchmarks, plots, profiler trace
#     calib    : calibrated vs magnitude pruning on the GPU
#     multi    : several GPUs (issue 9): sharded == single device, bench_multi scaling
#     dprofile : ncu of the warp-level kernel at a decode shape (carried .devbin)
#     decode   : decode-shape block variants (carried .devbin/harness_var) and ncu stall reasons
#     floor    : the time to read N bytes (carried .devbin/stream_floor) next to the decode
#                kernel at growing K (fixed cost and streaming rate)
#     profile  : wgmma rate and ncu of the Hopper kernel (carried .devbin), NVIDIA's 2:4 for context
# Every mode but `kernel` builds and installs the package first (once).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
quiet() { grep -v "^[WI][0-9]\{4\} "; }  # absl/XLA info and warning lines
BUILT=0

machine() {
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$OUT/summary.txt"
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" | tee -a "$OUT/summary.txt"
}

build() {
  [ $BUILT = 1 ] && return 0
  step "build"
  local t0=$SECONDS
  SAMOYEDS_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v "$REPO" > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build took $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  grep -E "C751[0-8]|spill" "$OUT/build.log" | grep -v " 0 bytes spill" | sort | uniq -c | head -12
  cd /tmp  # import the installed package, not the source tree
  SO=$(python3 -c "import samoyeds_jax._samoyeds as m; print(m.__file__)")
  python3 -c "import samoyeds_jax._samoyeds as m; print('HAS_CUDA', m.HAS_CUDA, 'FFI', m.FFI_API_VERSION)" | tee -a "$OUT/summary.txt"
  step "sass"
  cuobjdump -sass "$SO" > /tmp/sass.txt 2>&1
  { echo "per kernel: HMMA.SP / HGMMA.SP count, local-memory (LDL/STL) count, serialized wgmmas";
    python3 "$REPO/scripts/sass_check.py" /tmp/sass.txt; } | tee -a "$OUT/summary.txt"
  BUILT=1
}

kernel() {
  step "kernel harness: warp-level vs Hopper, outputs compared"
  local H="timeout 30 $REPO/.devbin/harness"
  {
    $H 4096 14336 4096 1 2 128 1 20; $H 4096 14336 4096 1 1 128 1 20
    $H 4096 14336 4096 1 4 128 1 20; $H 4096 14336 4096 2 4 128 1 20
    $H 4096 14336 4096 1 2 64 1 20;  $H 4096 14336 4096 1 2 32 1 20
    $H 14336 4096 4096 1 2 128 1 20; $H 4096 14336 8192 1 2 128 8 20
    $H 4096 14336 512 1 2 128 1 20;  $H 4096 14336 128 1 2 128 1 20
    $H 4096 14336 16 1 2 128 1 20
    # tails: M with a 16-row kept tail, K not a multiple of the 128-column stage, odd T
    $H 4160 14368 1000 1 2 32 3 10;  $H 2112 1440 333 2 4 64 5 10
    $H 4096 1408 4099 1 1 128 7 10
    # fused SwiGLU (M = [gate | up] = 2 x 14336): prefill, grouped, decode with K splits
    # and the same products without the GLU (x of 4096 rows fits the L2, 8192 does not)
    for g in 1 0; do
      $H 4096 28672 4096 1 2 128 1 10 $g; $H 4096 28672 4096 1 2 128 4 10 $g
      $H 4096 28672 8192 1 2 128 8 10 $g; $H 4096 28672 16 1 2 128 1 20 $g
    done
  } 2>&1 | tee -a "$OUT/kernel.log"
  grep -c MISMATCH "$OUT/kernel.log" | sed 's/^/harness mismatches: /' | tee -a "$OUT/summary.txt"
}

split() {
  step "warp-level kernel K splits at decode shapes (SAMOYEDS_SPLIT_K; auto last)"
  local H="timeout 30 $REPO/.devbin/harness"
  {
    for s in 1 2 4 8 auto; do
      [ $s = auto ] && unset SAMOYEDS_SPLIT_K || export SAMOYEDS_SPLIT_K=$s
      echo "--- splits $s"
      $H 4096 14336 16 1 2 128 1 50; $H 14336 4096 16 1 2 128 1 50
      $H 4096 14336 1 1 2 128 1 50;  $H 4096 14336 16 1 1 128 1 50
      $H 4096 14336 32 1 2 128 8 50; $H 2048 1408 16 1 2 128 1 50
    done
    unset SAMOYEDS_SPLIT_K
    # Kernel duration alone (ncu, caches flushed before the launch), one launch each.
    for s in 1 2 4 8; do
      for shape in "4096 14336" "14336 4096"; do
        echo "ncu splits $s K M = $shape: $(SAMOYEDS_SPLIT_K=$s timeout 60 ncu --metrics \
          gpu__time_duration.sum,launch__grid_size -k regex:Warp --launch-skip 4 --launch-count 1 \
          $REPO/.devbin/harness $shape 16 1 2 128 1 2 2>&1 | grep -E "duration|grid_size" | \
          awk '{print $1, $(NF-1), $NF}' | tr '\n' ' ')"
      done
    done
  } 2>&1 | tee -a "$OUT/kernel.log"
  grep -c MISMATCH "$OUT/kernel.log" | sed 's/^/harness mismatches (kernel + split): /' | tee -a "$OUT/summary.txt"
  grep "^ncu splits" "$OUT/kernel.log" >> "$OUT/summary.txt"
}

tests() {
  build
  step "gpu tests: kernel and layer (auto kernel choice)"
  python3 -m pytest -q "$REPO/tests/test_gpu.py" "$REPO/tests/test_moe.py" --rootdir="$REPO" \
    -p no:cacheprovider --import-mode=importlib 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -8
  grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -1 | sed 's/^/auto: /' >> "$OUT/summary.txt"
  step "gpu tests: Hopper kernel forced for every shape"
  SAMOYEDS_KERNEL=hopper python3 -m pytest -q "$REPO/tests/test_gpu.py" --rootdir="$REPO" \
    -p no:cacheprovider --import-mode=importlib 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -8
  grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -1 | sed 's/^/hopper: /' >> "$OUT/summary.txt"
}

# One summary line per sanitizer run; a run cut off by its timeout (exit 124) names the
# case it had started (racecheck has stalled at random small Hopper cases: NOTES.md, v14).
sanitize_result() {
  local tail3 last
  tail3=$(tail -3 "$OUT/sanitizer.log" | grep -o 'ERROR SUMMARY.*\|RACECHECK SUMMARY.*\|cases run.*' | tr '\n' ' ')
  last=$(grep '^case' "$OUT/sanitizer.log" | tail -1)
  [ "$2" = 124 ] && tail3="TIMED OUT after starting: $last"
  echo "$1 exit=$2 $tail3" | tee -a "$OUT/summary.txt"
}

sanitize() {
  build
  # Hopper-forced racecheck runs a second build without setmaxnreg (racecheck stalls at
  # random cases when warps reallocate registers: NOTES.md), importable from its own dir.
  step "build without setmaxnreg, for racecheck"
  CUDAFLAGS=-DSAMOYEDS_NO_SETMAXNREG SAMOYEDS_CUDA=ON python3 -m pip install --no-build-isolation \
    --no-deps --target /tmp/sj_no_setmaxnreg --config-settings=cmake.define.SAMOYEDS_CUDA_ARCHS=90a \
    "$REPO" > "$OUT/build_racecheck.log" 2>&1 || { tail -20 "$OUT/build_racecheck.log"; exit 1; }
  step "compute-sanitizer"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
  for kern in auto hopper; do
    for tool in memcheck racecheck initcheck synccheck; do
      local path=""
      [ $kern/$tool = hopper/racecheck ] && path=/tmp/sj_no_setmaxnreg
      echo "--- $kern $tool ${path:+(build without setmaxnreg)}" >> "$OUT/sanitizer.log"
      PYTHONPATH=$path SAMOYEDS_KERNEL=$kern timeout 150 compute-sanitizer --tool $tool \
        --kernel-name kns=RaggedDot --error-exitcode 9 \
        python3 "$REPO/scripts/sanitize_case.py" -v >> "$OUT/sanitizer.log" 2>&1
      sanitize_result "$kern $tool${path:+ (no setmaxnreg)}" $?
    done
  done
  # The warp-level kernel with every K split forced to 8 (clusters, distributed shared memory).
  for tool in memcheck racecheck synccheck; do
    echo "--- split8 $tool" >> "$OUT/sanitizer.log"
    SAMOYEDS_KERNEL=warp SAMOYEDS_SPLIT_K=8 timeout 150 compute-sanitizer --tool $tool \
      --kernel-name kns=RaggedDot --error-exitcode 9 python3 "$REPO/scripts/sanitize_case.py" -v \
      >> "$OUT/sanitizer.log" 2>&1
    sanitize_result "split8 $tool" $?
  done
  unset XLA_PYTHON_CLIENT_PREALLOCATE XLA_PYTHON_CLIENT_ALLOCATOR
}

stress() {
  build
  step "launch stress (Hopper kernel forced)"
  SAMOYEDS_KERNEL=hopper timeout 120 python3 "$REPO/scripts/launch_stress.py" 50000 2>&1 | quiet \
    | tee -a "$OUT/stress.log"
  echo "stress exit=${PIPESTATUS[0]} $(grep -c STRESS_OK "$OUT/stress.log") ok" | tee -a "$OUT/summary.txt"
}

soak() {
  build
  step "GPU hypothesis fuzz"
  python3 -m pytest -q "$REPO/tests/test_gpu_fuzz.py" --rootdir="$REPO" -p no:cacheprovider \
    --import-mode=importlib 2>&1 | tee -a "$OUT/soak.log" | tail -5
  step "soak"
  python3 "$REPO/scripts/soak.py" --seconds="${SOAK_SECONDS:-240}" --json_out="$OUT/soak.json" 2>&1 \
    | quiet | tee -a "$OUT/soak.log" | tail -6
  grep -E "SOAK|passed|failed" "$OUT/soak.log" | tail -2 >> "$OUT/summary.txt"
}

perf() {
  build
  step "demo (Mixtral-8x7B layer, full size)"
  python3 -m samoyeds_jax.demo --preset=mixtral-8x7b --tokens=4096 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -12
  step "kernel benchmark"
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=up --tokens=16,4096 \
    --reps=10 --json_out="$OUT/bench_kernel_up.json" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -12
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=up --nv=1:1 \
    --cases=single --tokens=4096 --reps=10 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -3
  step "layer benchmark"
  python3 "$REPO/benchmarks/bench_layer.py" --preset=mixtral-8x7b --tokens=16,512,4096 \
    --paths=samoyeds,xla_ragged_dot,xla_capacity_einsum,xla_all_experts,samoyeds_kernels,xla_kernels,samoyeds_gate_up,samoyeds_gate_up_unfused \
    --json_out="$OUT/bench_layer.json" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -30
}

glu() {
  build
  step "layer kernels one by one: fused GLU vs gate_up + GLU in XLA, and down"
  python3 "$REPO/benchmarks/bench_layer.py" --preset=mixtral-8x7b --tokens=16,512,4096 \
    --paths=samoyeds,samoyeds_kernels,samoyeds_gate_up,samoyeds_gate_up_unfused,samoyeds_down \
    --json_out="$OUT/bench_layer_parts.json" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -18
}

# The layer and kernel benchmarks without the demo (a shorter perf).
perflite() {
  build
  step "kernel benchmark"
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=up --tokens=16,4096 \
    --reps=10 --json_out="$OUT/bench_kernel_up.json" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -12
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=up --nv=1:1 \
    --cases=single --tokens=4096 --reps=10 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -3
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=down \
    --cases=single --tokens=4096 --reps=10 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -3
  step "layer benchmark"
  python3 "$REPO/benchmarks/bench_layer.py" --preset=mixtral-8x7b --tokens=16,512,4096 \
    --paths=samoyeds,xla_ragged_dot,xla_capacity_einsum,xla_all_experts,samoyeds_kernels,xla_kernels,samoyeds_gate_up,samoyeds_gate_up_unfused \
    --json_out="$OUT/bench_layer.json" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -30
}

suite() {
  build
  step "benchmark suite (issue 6)"
  [ -f "$REPO/scripts/bench_suite.sh" ] && bash "$REPO/scripts/bench_suite.sh" "$OUT" 2>&1 | quiet | tee -a "$OUT/suite.log" | tail -30
}

calib() {
  build
  step "calibrated vs magnitude pruning (GPU)"
  python3 -m samoyeds_jax.calibrate --help > /dev/null 2>&1
  python3 - <<'EOF' 2>&1 | quiet | tee -a "$OUT/calib.log"
import jax, numpy as np, jax.numpy as jnp, time
import samoyeds_jax as sj
from samoyeds_jax.calibrate import prune_calibrated, reconstruction_error
rng = np.random.default_rng(0)
k, m, n_cal = 4096, 1408, 2048
# Realistic structure: correlated features with a few outlier channels.
mix = rng.standard_normal((k, 64)) @ rng.standard_normal((64, k)) / 8
x = rng.standard_normal((n_cal, k)) @ (np.eye(k) + 0.3 * mix)
x[:, rng.choice(k, 16, replace=False)] *= 20
x = jnp.asarray(x, jnp.float32)
w = jnp.asarray(rng.standard_normal((k, m)) / np.sqrt(k), jnp.float32)
print("device", jax.devices()[0].device_kind, "K", k, "M", m, "calibration rows", n_cal)
for nv in sj.format.SUPPORTED_NV:
    cfg = sj.SparsityConfig(*nv, sub_row=128)
    t = time.perf_counter()
    wc = jax.block_until_ready(prune_calibrated(w, x, cfg))
    dt = time.perf_counter() - t
    em = float(reconstruction_error(x, w, sj.prune(w, cfg)))
    ec = float(reconstruction_error(x, w, wc))
    print(f"{nv[0]}:{nv[1]}  magnitude {em:.4f}  calibrated {ec:.4f}  ratio {ec / em:.3f}  ({dt:.1f} s)")
EOF
}

profile() {
  local H="$REPO/.devbin/harness"
  step "wgmma issue rate from shared memory, no loads (carried .devbin/wgmma_rate)"
  "$REPO/.devbin/wgmma_rate" 2>&1 | tee -a "$OUT/summary.txt"
  for nv in "1 1" "1 2"; do
    step "ncu: Hopper kernel, Mixtral up-projection, 4096 tokens, N:V ${nv/ /:}"
    ncu --clock-control none --set full -k regex:Hopper --launch-count 1 \
      $H 4096 14336 4096 $nv 128 1 1 > "$OUT/ncu_${nv/ /_}.txt" 2>&1
    grep -E "Duration|Throughput|Pipe|Tensor|L2 Hit|Registers|Warp Cycles|Issued Ipc|Stall" \
      "$OUT/ncu_${nv/ /_}.txt" | head -40
  done
  step "PyTorch dense vs 2:4 (cuSPARSELt, CUTLASS), same sizes"
  python3 "$REPO/benchmarks/torch_semistructured.py" 2>&1 | tee -a "$OUT/summary.txt"
}

dprofile() {
  # The decode kernel (warp-level, 1 Mixtral expert, 16 tokens) with its automatic K split.
  step "ncu: warp-level kernel, Mixtral up-projection, 16 tokens"
  ncu --clock-control none --set full -k regex:Warp --launch-skip 4 --launch-count 1 \
    "$REPO/.devbin/harness" 4096 14336 16 1 2 128 1 2 > "$OUT/ncu_decode.txt" 2>&1
  grep -E "Duration|Throughput|Occupancy|Registers|Block Limit|Warp Cycles|Issued Ipc|Stall|Waves|Shared Memory Config|Dynamic Shared|L2 Hit|Mem Busy|Max Bandwidth|DRAM" \
    "$OUT/ncu_decode.txt" | head -60
}

decode() {
  step "decode shapes: default kernels and variants (harness_var)"
  local H="timeout 40 $REPO/.devbin/harness_var" B="$REPO/.devbin/harness_base"
  {
    if [ -x "$B" ]; then  # a build of the previous code, for a same-run baseline
      echo "--- baseline build"
      timeout 40 "$B" 4096 14336 16 1 2 128 1 50; timeout 40 "$B" 14336 4096 16 1 2 128 1 50
      timeout 40 "$B" 4096 14336 32 1 2 128 8 50
    fi
    for s in auto 1 4; do
      [ $s = auto ] && unset SAMOYEDS_SPLIT_K || export SAMOYEDS_SPLIT_K=$s
      echo "--- splits $s"
      $H 4096 14336 16 1 2 128 1 50; $H 14336 4096 16 1 2 128 1 50
      [ $s = auto ] && { $H 4096 14336 32 1 2 128 8 50; $H 4096 14336 64 1 2 128 1 50; }
    done
    unset SAMOYEDS_SPLIT_K
  } 2>&1 | tee -a "$OUT/decode.log"
  grep -c MISMATCH "$OUT/decode.log" | sed 's/^/decode mismatches: /' | tee -a "$OUT/summary.txt"
  step "ncu stall reasons: warp-level decode kernel"
  local M='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,smsp__cycles_active.avg'
  local S="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis"
  timeout 120 ncu --clock-control none $S --metrics "$M" -k regex:Warp --launch-skip 4 --launch-count 1 \
    "$REPO/.devbin/harness_var" 4096 14336 16 1 2 128 1 2 > "$OUT/ncu_decode.txt" 2>&1
  grep -E "RaggedDot|Duration|DRAM Throughput|Warp Cycles Per Issued|Eligible Warps|Achieved Occ|stalled_(long|short|barrier|wait|mio|lg|math|no_inst|branch|dispatch|selected|not_sel|sleep|membar|drain|imc)|inst_executed" \
    "$OUT/ncu_decode.txt" | head -80
  local fn
  fn=$(cuobjdump -sass "$REPO/.devbin/harness_var" | grep -o "Function : .*RaggedDotWarpKernelI13__nv_bfloat16Li1ELi2ENS0_7TileCfgILi32ELi16ELi4ELi2ELi2E[^ ]*" | head -1 | sed 's/Function : //')
  cuobjdump -sass -fun "$fn" "$REPO/.devbin/harness_var" > "$OUT/sass_decode.txt" 2>&1
  echo "decode kernel SASS lines: $(wc -l < "$OUT/sass_decode.txt")"
}

floor() {
  step "streaming floor vs the decode kernel (1 expert, 16 tokens, M = 14336, K growing)"
  {
    timeout 120 "$REPO/.devbin/stream_floor" 4 8 16 33 66 117 235
    for k in 1024 2048 4096 8192 16384; do
      timeout 40 "$REPO/.devbin/harness" $k 14336 16 1 2 128 1 50 | grep "^warp .*median"
    done
    timeout 40 "$REPO/.devbin/harness" 4096 14336 32 1 2 128 8 50 | grep "^warp .*median"
  } 2>&1 | tee -a "$OUT/floor.log"
}

multi() {
  # Issue 9: several GPUs of one host. NVLink multicast stays off.
  build
  export NCCL_NVLS_ENABLE=0
  step "sharded layer == single-device layer on $(nvidia-smi -L | wc -l) GPUs"
  timeout 240 python3 "$REPO/scripts/multi_gpu_equal.py" 2>&1 | quiet | tee -a "$OUT/multi.log"
  grep "failures" "$OUT/multi.log" | tail -1 >> "$OUT/summary.txt"
  local B="$REPO/benchmarks/bench_multi.py" P="${MULTI_PRESETS:-mixtral-8x7b mixtral-8x22b}"
  for p in $P; do
    step "bench_multi $p strong (T=4096) and weak (2048 per GPU), sparse and dense EP"
    local prof=""
    [ "$p" = mixtral-8x7b ] && prof="--profile_dir=/tmp/multi_trace"
    timeout 200 python3 "$B" --preset=$p --tokens=4096 --scaling=strong --reps=5 $prof \
      --json_out="$OUT/multi_${p}_strong.json" 2>&1 | quiet | tee -a "$OUT/multi.log" | tail -14
    timeout 150 python3 "$B" --preset=$p --tokens=2048 --scaling=weak --reps=5 \
      --json_out="$OUT/multi_${p}_weak.json" 2>&1 | quiet | tee -a "$OUT/multi.log" | tail -6
  done
}

machine
for mode in "$@"; do
  case $mode in
    kernel|split|tests|sanitize|stress|soak|perf|perflite|glu|suite|calib|multi|profile|dprofile|decode|floor) $mode ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
step "summary"
cat "$OUT/summary.txt"
