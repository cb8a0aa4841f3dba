#!/usr/bin/env bash
# Everything the GPU machine runs, in one call: build, SASS check, GPU tests,
# compute-sanitizer, short benchmark. Logs go to $OUT (at most 8 files come back).
#   device run: bash scripts/gpu_check.sh [quick]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONUNBUFFERED=1
MODE=${1:-full}
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/summary.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" | tee -a "$OUT/summary.txt"

step "build"
SAMOYEDS_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
grep -E "registers|spill|error" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20
cd /tmp  # import the installed package, not the source tree
SO=$(python3 -c "import samoyeds_jax._samoyeds as m; print(m.__file__)")
python3 -c "import samoyeds_jax._samoyeds as m; print('HAS_CUDA', m.HAS_CUDA, 'FFI', m.FFI_API_VERSION)" | tee -a "$OUT/summary.txt"

step "sass"
cuobjdump -sass "$SO" > /tmp/sass.txt 2>&1
{ echo "sparse MMA (HMMA.SP) per kernel / local memory (LDL/STL) per kernel:";
  awk '/Function :/ {f=$3} /HMMA.*SP|HMMA\.SP/ {sp[f]++} /LDL|STL/ {l[f]++} END {for (k in sp) print "  " k, "HMMA.SP=" sp[k], "LDL/STL=" (l[k]+0)}' /tmp/sass.txt;
  grep -c "HMMA" /tmp/sass.txt | sed 's/^/  all HMMA lines: /'; } | tee -a "$OUT/summary.txt"

if [ "$MODE" != profile ] && [ "$MODE" != bench ]; then
step "gpu tests"
python3 -m pytest -q -x "$REPO/tests/test_gpu.py" --rootdir="$REPO" -p no:cacheprovider \
  --import-mode=importlib 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
[ "$MODE" = quick ] && exit 0
if [ "$MODE" = profile ]; then
  step "ncu"
  ncu --kernel-name kns=RaggedDot --launch-count 2 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section LaunchStats --section ComputeWorkloadAnalysis --section SchedulerStats \
    python3 "$REPO/scripts/profile_case.py" > "$OUT/ncu.txt" 2>&1
  grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Stall|Warp Cycles|Issued|Block Limit|Bank" "$OUT/ncu.txt" | head -60
fi
[ "$MODE" = profile ] || [ "$MODE" = bench ] && { step "benchmark"; for proj in up; do
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=$proj \
    --tokens=16,4096 --reps=10 2>&1 | grep -v "^W0\|^I0" | tail -8; done; exit 0; }

step "compute-sanitizer"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
for tool in memcheck racecheck initcheck synccheck; do
  echo "--- $tool" >> "$OUT/sanitizer.log"
  timeout 600 compute-sanitizer --tool $tool --kernel-name kns=RaggedDot --error-exitcode 9 \
    python3 "$REPO/scripts/sanitize_case.py" >> "$OUT/sanitizer.log" 2>&1
  echo "$tool exit=$?" | tee -a "$OUT/sanitizer.log" "$OUT/summary.txt"
  [ "$MODE" = sanitize-memcheck ] && break
done
unset XLA_PYTHON_CLIENT_PREALLOCATE XLA_PYTHON_CLIENT_ALLOCATOR

step "benchmark"
for proj in up down; do
  python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --proj=$proj \
    --tokens=16,4096 --json_out="$OUT/bench_$proj.json" 2>&1 | grep -v "^W0\|^I0" | tee -a "$OUT/bench.log" | tail -12
done
python3 "$REPO/benchmarks/bench_kernel.py" --preset=mixtral-8x7b --nv=1:1 --cases=single \
  --tokens=4096 2>&1 | grep -v "^W0\|^I0" | tee -a "$OUT/bench.log" | tail -4
