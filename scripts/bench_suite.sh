#!/usr/bin/env bash
# The issue-6 benchmark suite on one GPU: memory (largest batch per budget), whole-stack
# speed, kernel and layer speedup plots, one profiler trace. Needs the installed package
# (scripts/gpu_check.sh suite builds it, then calls this); run from outside the repo so
# that the installed package is imported:
#   cd /tmp && bash /path/to/repo/scripts/bench_suite.sh OUT_DIR
# Parts and presets can be split across calls (one device call runs <= 10 minutes):
#   SUITE_PARTS="memory stack kernel layer profile"   (default: all of them)
#   SUITE_PRESETS="mixtral-8x7b mixtral-8x22b qwen2-moe deepseek-moe openmoe-8b minicpm-moe-8x2b"
#   SUITE_TOKENS=16,128,1024,8192   SUITE_LAYERS=4   SUITE_REPS=5 (wall-clock samples;
#   device time always comes from a 5-forward trace)
#   SUITE_MODEL=mixtral-8x7b   (the preset of the kernel, layer and profile parts)
# Everything lands in a work folder that is packed into OUT_DIR/suite_<parts>.tgz, the
# profiler trace into OUT_DIR/suite_profile.tgz (the device tool returns at most 8 files
# of <= 16 MiB); the tables go to stdout. Plots need matplotlib;
# without it they are skipped and can be drawn later from the JSON files:
#   python benchmarks/_report.py --json=stack_mixtral-8x7b.json,... --plot=stack.png
set -uo pipefail
OUT=${1:?usage: bench_suite.sh OUT_DIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARTS=${SUITE_PARTS:-memory stack kernel layer profile}
PRESETS=${SUITE_PRESETS:-mixtral-8x7b mixtral-8x22b qwen2-moe deepseek-moe openmoe-8b minicpm-moe-8x2b}
TOKENS=${SUITE_TOKENS:-16,128,1024,8192}
LAYERS=${SUITE_LAYERS:-4}
REPS=${SUITE_REPS:-5}
MODEL=${SUITE_MODEL:-mixtral-8x7b}
B="$REPO/benchmarks"
WORK=$(mktemp -d /tmp/bench_suite.XXXXXX)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { echo; echo "=== $* ($(date +%T))"; }
has_mpl() { python3 -c "import matplotlib" 2>/dev/null; }
plot() { has_mpl && echo "--plot=$WORK/$1.png"; }  # the flag only where matplotlib exists
name="suite_$(echo $PARTS | tr ' ' '_').tgz"
# Re-packed after every run: a call killed at its time limit still returns what finished.
pack() { tar czf "$OUT/$name" -C "$WORK" . ; }
has_mpl || echo "matplotlib missing: no PNGs here; redraw them from the JSON files"

for part in $PARTS; do
  t0=$SECONDS
  case $part in
    memory)
      for p in $PRESETS; do
        step "memory: $p, $LAYERS layers"
        python3 "$B/bench_memory.py" --preset="$p" --layers="$LAYERS" \
          --json_out="$WORK/memory_$p.json" --csv_out="$WORK/memory_$p.csv"
        pack
      done ;;
    stack)
      for p in $PRESETS; do
        step "stack: $p, $LAYERS layers, T=$TOKENS"
        python3 "$B/bench_stack.py" --preset="$p" --layers="$LAYERS" --tokens="$TOKENS" \
          --reps="$REPS" --json_out="$WORK/stack_$p.json" --csv_out="$WORK/stack_$p.csv" \
          $(plot "stack_$p")
        pack
      done
      if has_mpl; then  # all presets in one plot, too
        python3 "$B/_report.py" --plot="$WORK/stack_all.png" \
          --json="$(ls "$WORK"/stack_*.json | paste -sd, -)" --title="MoE stack, $LAYERS layers"
      fi ;;
    kernel)
      for proj in up down; do
        step "kernel: $MODEL $proj"
        python3 "$B/bench_kernel.py" --preset="$MODEL" --proj=$proj \
          --tokens=16,128,1024,4096 --reps="$REPS" --json_out="$WORK/kernel_$proj.json" \
          --csv_out="$WORK/kernel_$proj.csv" $(plot "kernel_$proj")
        pack
      done ;;
    layer)
      step "layer: $MODEL"
      python3 "$B/bench_layer.py" --preset="$MODEL" --tokens=16,128,1024,4096 \
        --reps="$REPS" --json_out="$WORK/layer.json" --csv_out="$WORK/layer.csv" \
        $(plot layer) ;;
    profile)
      step "profile: $MODEL stack, T=4096 (named scopes per layer)"
      python3 "$B/bench_stack.py" --preset="$MODEL" --layers="$LAYERS" --tokens=4096 \
        --reps=3 --paths=samoyeds,xla_capacity_einsum --profile_dir="$WORK/trace" \
        --json_out="$WORK/profile.json"
      tar czf "$OUT/suite_profile.tgz" -C "$WORK" trace && rm -rf "$WORK/trace"
      ls -la "$OUT/suite_profile.tgz" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  pack
  echo "--- $part took $((SECONDS - t0)) s"
done
ls -la "$OUT"
