#!/usr/bin/env bash
# The whole test suite: configure, build, run every suite and example under ctest.
#   tools/test.sh                       # g++, C++17, build dir ./build
# Knobs (environment): CXX, CXX_STANDARD (17|20), WERROR (ON|OFF),
#   SANITIZE (e.g. address,undefined or thread), BENCHMARKS (ON: also build bench/), BUILD_DIR, JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} \
  -DCMAKE_CXX_COMPILER="${CXX:-g++}" -DCMAKE_CXX_STANDARD="${CXX_STANDARD:-17}" \
  -DMPSERVICE_WERROR="${WERROR:-OFF}" -DMPSERVICE_SANITIZE="${SANITIZE:-}" \
  -DMPSERVICE_BUILD_BENCHMARKS="${BENCHMARKS:-ON}" >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" -j "$JOBS" --output-on-failure
