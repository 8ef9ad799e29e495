#!/usr/bin/env bash
# CI checks beyond the test suite (called by .ci/run when executable):
#   1. install       cmake --install into a temporary prefix
#   2. find_package  a consumer project using find_package(mpservice CONFIG REQUIRED)
#   3. add_subdirectory  a consumer project vendoring the source tree
#   4. pkg-config    compile and run the consumer with `pkg-config --cflags --libs mpservice`
#   5. fuzz          tools/fuzz.sh ${FUZZ_SECONDS:-60} (libFuzzer, ASan+UBSan)
#   6. stress        tools/stress --rounds ${STRESS_ROUNDS:-2} --known-rounds 1: the crash
#                    matrix; fails on any wrong outcome, hang or leak outside the
#                    known-defect list (tests/stress/harness.cpp)
# Ends with a ctest-style summary line: "N% tests passed, F tests failed out of T".
# Knobs: CXX (default g++), FUZZ_SECONDS, STRESS_ROUNDS, KEEP_TMP=1 to keep the temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CXX=${CXX:-g++}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mpservice-ci-extra.XXXXXX")
[ "${KEEP_TMP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
PREFIX=$TMP/prefix

planned=6  # the check calls at the bottom
total=0
failed=0
failed_names=()
check() {  # check NAME COMMAND...: runs one check, prints a ctest-like line, keeps its log
  local name=$1; shift
  total=$((total + 1))
  local log="$TMP/$name.log" t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    printf '%2d/%d Test #%d: %-20s ... Passed %5ds\n' "$total" "$planned" "$total" "$name" $((SECONDS - t0))
  else
    failed=$((failed + 1)); failed_names+=("$name")
    printf '%2d/%d Test #%d: %-20s ...***Failed %5ds\n' "$total" "$planned" "$total" "$name" $((SECONDS - t0))
    tail -n 40 "$log" | sed 's/^/    | /'
  fi
}

do_install() {
  cmake -S "$ROOT" -B "$TMP/build-install" -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_INSTALL_PREFIX="$PREFIX" \
    -DMPSERVICE_BUILD_TESTS=OFF -DMPSERVICE_BUILD_EXAMPLES=OFF -DMPSERVICE_BUILD_BENCHMARKS=OFF &&
    cmake --install "$TMP/build-install" &&
    test -f "$PREFIX/include/mpservice.hpp" &&
    cmp "$PREFIX/include/mpservice.hpp" "$ROOT/mpservice.hpp"
}

do_find_package() {
  cmake -S "$ROOT/tests/package/find_package" -B "$TMP/build-find-package" -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_PREFIX_PATH="$PREFIX" &&
    cmake --build "$TMP/build-find-package" -j 2 &&
    "$TMP/build-find-package/consumer"
}

do_add_subdirectory() {
  cmake -S "$ROOT/tests/package/add_subdirectory" -B "$TMP/build-add-subdirectory" \
    -DCMAKE_CXX_COMPILER="$CXX" -DMPSERVICE_SOURCE_DIR="$ROOT" &&
    cmake --build "$TMP/build-add-subdirectory" -j 2 &&
    "$TMP/build-add-subdirectory/consumer"
}

do_pkg_config() {
  local flags
  flags=$(PKG_CONFIG_PATH="$PREFIX/share/pkgconfig:$PREFIX/lib/pkgconfig" pkg-config --cflags --libs mpservice) &&
    echo "pkg-config: $flags" &&
    # shellcheck disable=SC2086  # the flags are meant to split
    "$CXX" -Wall -Wextra -Werror "$ROOT/tests/package/consumer/main.cpp" "$ROOT/tests/package/consumer/impl.cpp" \
      $flags -o "$TMP/pkg-config-consumer" &&
    "$TMP/pkg-config-consumer"
}

check install do_install
check find_package do_find_package
check add_subdirectory do_add_subdirectory
check pkg-config do_pkg_config
check fuzz tools/fuzz.sh "${FUZZ_SECONDS:-60}"
check stress env STRESS_BUILD_DIR="$TMP/build-stress" CXX="$CXX" tools/stress --rounds "${STRESS_ROUNDS:-2}" --known-rounds 1

passed=$((total - failed))
echo
[ "$failed" = 0 ] || echo "The following checks FAILED: ${failed_names[*]}"
echo "$((100 * passed / total))% tests passed, $failed tests failed out of $total"
[ "$failed" = 0 ]
