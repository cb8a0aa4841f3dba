#!/usr/bin/env bash
# Builds the CPU handlers with AddressSanitizer + UBSan and runs the CPU tests that reach
# them (format, ops, ffi, cpu). CI-optional: ./scripts/asan_check.sh [pytest args]
# Python and jaxlib are not instrumented, so the ASan runtime is preloaded and leak
# checking is off (the interpreter's own allocations would drown the report).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SITE=${ASAN_SITE:-/tmp/samoyeds_asan_site}
rm -rf "$SITE"
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
python -m pip install --no-build-isolation --no-deps --target "$SITE" . \
  -Ccmake.define.SAMOYEDS_CUDA=OFF -Ccmake.define.CMAKE_BUILD_TYPE=RelWithDebInfo \
  "-Ccmake.define.CMAKE_CXX_FLAGS=$flags" -Cbuild-dir=build/asan > /tmp/asan_build.log 2>&1 \
  || { tail -30 /tmp/asan_build.log; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd tests
PYTHONPATH="$SITE" python -m pytest -q -p no:cacheprovider test_format.py test_ops.py test_ffi.py test_cpu.py "$@"
