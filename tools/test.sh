#!/usr/bin/env bash
# The whole test suite: configure, build, run every suite and example under ctest.
#   tools/test.sh                       # g++, C++17, build dir ./build
# Knobs (environment): CXX, CXX_STANDARD (17|20), WERROR (ON|OFF),
#   SANITIZE (e.g. address,undefined or thread), BENCHMARKS (ON: also build bench/), BUILD_DIR, JOBS,
#   PARTS (ON: the suites link the implementation built in its parts, mpservice::parts),
#   INSTALL (auto|no): with auto (the default), missing prerequisites are installed with apt-get when
#   this runs as root on a machine that has it; otherwise - or with INSTALL=no - the script names
#   what to install and stops before CMake does.
#
# Prerequisites: CMake >= 3.16 and make, the C++ compiler, python3 (the header checks), doctest
# (Debian: doctest-dev); with SANITIZE and clang, its runtime (Debian: libclang-rt-<version>-dev);
# optional: Boost's headers (libboost-dev) for the benchmarks' Boost.Interprocess anchors.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
CXX=${CXX:-g++}
BENCHMARKS=${BENCHMARKS:-ON}
SANITIZE=${SANITIZE:-}
INSTALL=${INSTALL:-auto}

# ---------------------------------------------------------------- prerequisites

missing=()   # Debian packages of what is missing
optional=()  # Debian packages of what would be nice
have() { command -v "$1" >/dev/null 2>&1; }
compiler_package() {  # the Debian package of a compiler command
  case "$(basename "$1")" in
    clang++*|clang*) echo clang ;;
    *) echo g++ ;;
  esac
}
# Whether the compiler finds a header (preprocessing only: fast).
finds_header() { printf '#include <%s>\n' "$1" | "$CXX" -x c++ -E - -o /dev/null >/dev/null 2>&1; }
# Whether the compiler links a program with these sanitizers.
links_sanitizer() {
  local out
  out=$(mktemp "${TMPDIR:-/tmp}/mpservice-san.XXXXXX")
  if printf 'int main() { return 0; }\n' | "$CXX" -x c++ -fsanitize="$SANITIZE" - -o "$out" >/dev/null 2>&1; then
    rm -f "$out"; return 0
  fi
  rm -f "$out"; return 1
}

check_prerequisites() {
  missing=(); optional=()
  have cmake || missing+=(cmake)
  have make || missing+=(make)
  have python3 || missing+=(python3)
  if ! have "$CXX"; then
    missing+=("$(compiler_package "$CXX")")
    return  # the checks below need the compiler
  fi
  finds_header doctest/doctest.h || missing+=(doctest-dev)
  if [ -n "$SANITIZE" ] && ! links_sanitizer; then
    if [ "$(compiler_package "$CXX")" = clang ]; then
      missing+=("libclang-rt-$("$CXX" -dumpversion | cut -d. -f1)-dev")
    else
      # g++'s sanitizer runtimes come with it on Debian (libasan8, libubsan1, libtsan2).
      echo "tools/test.sh: warning: $CXX does not link a -fsanitize=$SANITIZE program; the build will say why" >&2
    fi
  fi
  if [ "$BENCHMARKS" = ON ] && ! finds_header boost/interprocess/ipc/message_queue.hpp; then
    optional+=(libboost-dev)
  fi
}

check_prerequisites
# Two rounds: a compiler installed in the first is only then asked for its
# headers and sanitizer runtime.
for _round in 1 2; do
  if [ ${#missing[@]} -gt 0 ] || [ ${#optional[@]} -gt 0 ]; then
    if [ "$INSTALL" = auto ] && [ "$(id -u)" = 0 ] && have apt-get; then
      echo "tools/test.sh: installing with apt-get: ${missing[*]} ${optional[*]}"
      export DEBIAN_FRONTEND=noninteractive
      [ "$_round" = 1 ] && apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}" "${optional[@]}" >/dev/null || true
      check_prerequisites
    fi
  fi
done
if [ ${#optional[@]} -gt 0 ]; then
  echo "tools/test.sh: note: without ${optional[*]} the benchmarks skip their Boost.Interprocess anchors"
fi
if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "tools/test.sh: cannot run the tests; missing: ${missing[*]}"
    echo "  On Debian or Ubuntu:  sudo apt-get install ${missing[*]}"
    echo "  (run as root with apt-get and this script installs them itself)."
    if [[ " ${missing[*]} " == *" doctest-dev "* ]]; then
      echo "  doctest elsewhere: Fedora 'dnf install doctest-devel', Homebrew 'brew install doctest', or"
      echo "  build https://github.com/doctest/doctest with CMake, install it, and pass its prefix:"
      echo "  CMAKE_PREFIX_PATH=/that/prefix tools/test.sh (the compiler must find <doctest/doctest.h> too)."
    fi
  } >&2
  exit 2
fi

# ---------------------------------------------------------------- configure, build, run

configure_log=$(mktemp "${TMPDIR:-/tmp}/mpservice-configure.XXXXXX")
trap 'rm -f "$configure_log"' EXIT
if ! cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} \
  -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_CXX_STANDARD="${CXX_STANDARD:-17}" \
  -DMPSERVICE_WERROR="${WERROR:-OFF}" -DMPSERVICE_SANITIZE="$SANITIZE" \
  -DMPSERVICE_TEST_PARTS="${PARTS:-OFF}" \
  -DMPSERVICE_BUILD_BENCHMARKS="$BENCHMARKS" >"$configure_log" 2>&1; then
  cat "$configure_log" >&2
  if grep -q 'doctest' "$configure_log"; then
    echo "tools/test.sh: CMake did not find doctest's package configuration (doctestConfig.cmake)." >&2
    echo "  Debian/Ubuntu: apt-get install doctest-dev; a doctest installed elsewhere: CMAKE_PREFIX_PATH=<prefix>" >&2
  fi
  exit 2
fi
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" -j "$JOBS" --output-on-failure
