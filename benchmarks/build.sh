#!/usr/bin/env bash
# Builds the CUDA microbenchmarks (sm_90a) into DIR, from the repository root:
#   bash benchmarks/build.sh DIR [harness] [harness_timeline] [stream_floor]
#     harness           kernel_harness.cu with the block-shape variants (HARNESS_VARIANTS)
#     harness_timeline  kernel_harness.cu with the phase timeline of the serving kernel and its variants
#     stream_floor      stream_floor.cu, the HBM read floor
# (all three without names). scripts/gpu_check.sh and tests/test_build.py build with it.
set -euo pipefail
dir=$1
shift
mkdir -p "$dir"
nv=(nvcc -O3 -std=c++17 --expt-relaxed-constexpr -diag-suppress=940,2473
    -gencode=arch=compute_90a,code=sm_90a -DSAMOYEDS_SM90A -Iffi -Ibenchmarks)
for name in "${@:-harness harness_timeline stream_floor}"; do
  for n in $name; do
    case $n in
      harness) "${nv[@]}" -DHARNESS_VARIANTS benchmarks/kernel_harness.cu -o "$dir/harness" ;;
      harness_timeline) "${nv[@]}" -DSAMOYEDS_TIMELINE -DHARNESS_VARIANTS benchmarks/kernel_harness.cu -o "$dir/harness_timeline" ;;
      stream_floor) "${nv[@]}" benchmarks/stream_floor.cu -o "$dir/stream_floor" ;;
      *) echo "unknown benchmark binary $n" >&2; exit 2 ;;
    esac
  done
done
