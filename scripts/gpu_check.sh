#!/usr/bin/env bash
# Everything the GPU machine runs, in one script: build, SASS check, GPU tests,
# compute-sanitizer, benchmarks and the demo. Logs go to $OUT (at most 8 files come back).
#   bash scripts/gpu_check.sh [tests|perf|profile|all]
#     tests   : build, SASS, GPU tests (kernel + layer on the GPU), 4 sanitizer tools
#     perf    : build, Mixtral demo, kernel and layer benchmarks (device time from traces)
#     profile : build, ncu-free kernel harness timings (needs .devbin/harness carried)
#     all     : tests then perf (longer than one 10-minute device call)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
MODE=${1:-tests}
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
quiet() { grep -v "^[WI][0-9]\{4\} "; }  # absl/XLA info and warning lines

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/summary.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" | tee -a "$OUT/summary.txt"

step "build"
SAMOYEDS_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -12
cd /tmp  # import the installed package, not the source tree
SO=$(python3 -c "import samoyeds_jax._samoyeds as m; print(m.__file__)")
python3 -c "import samoyeds_jax._samoyeds as m; print('HAS_CUDA', m.HAS_CUDA, 'FFI', m.FFI_API_VERSION)" | tee -a "$OUT/summary.txt"

step "sass"
cuobjdump -sass "$SO" > /tmp/sass.txt 2>&1
{ echo "per kernel: HMMA.SP count, local-memory (LDL/STL) count";
  awk '/Function :/ {f=$3} /HMMA\.SP/ {sp[f]++} /LDL|STL/ {l[f]++} END {for (k in sp) printf "  %s HMMA.SP=%d LDL/STL=%d\n", substr(k, 1, 150), sp[k], l[k]+0}' /tmp/sass.txt; } \
  | sed 's/_ZN8samoyeds[^R]*RaggedDotKernel/RaggedDotKernel/' | tee -a "$OUT/summary.txt"

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  step "gpu tests: kernel and layer"
  python3 -m pytest -q "$REPO/tests/test_gpu.py" "$REPO/tests/test_moe.py" --rootdir="$REPO" \
    -p no:cacheprovider --import-mode=importlib 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
  grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -1 >> "$OUT/summary.txt"

  step "compute-sanitizer"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
  for tool in memcheck racecheck initcheck synccheck; do
    echo "--- $tool" >> "$OUT/sanitizer.log"
    timeout 400 compute-sanitizer --tool $tool --kernel-name kns=RaggedDot --error-exitcode 9 \
      python3 "$REPO/scripts/sanitize_case.py" >> "$OUT/sanitizer.log" 2>&1
    echo "$tool exit=$? $(grep -c 'RaggedDot' "$OUT/sanitizer.log") report lines" | tee -a "$OUT/summary.txt"
  done
  grep "ERROR SUMMARY\|cases run" "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
  unset XLA_PYTHON_CLIENT_PREALLOCATE XLA_PYTHON_CLIENT_ALLOCATOR
fi

if [ "$MODE" = perf ] || [ "$MODE" = all ]; then
  step "demo (Mixtral-8x7B layer, full size)"
  python3 -m samoyeds_jax.demo --preset=mixtral-8x7b --tokens=4096 2>&1 | quiet | tee "$OUT/demo.log" | tail -15
  step "kernel benchmark"
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=up --tokens=16,4096 \
    --reps=10 --json_out="$OUT/bench_kernel_up.json" 2>&1 | quiet | tee "$OUT/bench.log" | tail -12
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=up --nv=1:1 \
    --cases=single --tokens=4096 --reps=10 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -3
  step "layer benchmark"
  python3 "$REPO/benchmarks/bench_layer.py" --preset=mixtral-8x7b --tokens=16,4096 \
    --json_out="$OUT/bench_layer.json" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -14
fi

if [ "$MODE" = profile ]; then
  step "kernel harness"
  for t in 16 64 4096; do "$REPO/.devbin/harness" 4096 14336 $t 1 2 128 1 30; done
  "$REPO/.devbin/harness" 4096 14336 32 1 2 128 8 30
fi
