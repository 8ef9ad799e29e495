#!/usr/bin/env bash
# Builds the codec's libFuzzer target (tests/fuzz/fuzz_decode.cpp) with clang++
# under ASan+UBSan and runs it for a bounded time on a seed corpus of encoded
# values of every fuzzed type.  Exits non-zero if the fuzzer finds a crash, a
# sanitizer report, an escaping exception or a non-canonical round trip; the
# reproducer is left in build-fuzz/ (crash-*, leak-*, timeout-*, oom-*).
#
#   tools/fuzz.sh            # 60 seconds (what CI runs)
#   tools/fuzz.sh 600        # ten minutes
# Longer campaigns, keeping the grown corpus between runs, on both cores:
#   tools/fuzz.sh 0          # builds only; then
#   build-fuzz/fuzz_decode -max_total_time=3600 -jobs=2 -workers=2 -max_len=4096 \
#       -timeout=10 -rss_limit_mb=2048 build-fuzz/corpus build-fuzz/seeds
# Reproduce one finding: build-fuzz/fuzz_decode build-fuzz/crash-<hash>
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
OUT=${FUZZ_BUILD_DIR:-build-fuzz}
CXX=${FUZZ_CXX:-clang++}
SRC=tests/fuzz/fuzz_decode.cpp
mkdir -p "$OUT/corpus" "$OUT/seeds"

common=(-std=c++17 -g -O1 -I. -Wall -Wextra -Werror)
echo "fuzz: building $OUT/fuzz_decode with $CXX"
"$CXX" "${common[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -fno-omit-frame-pointer "$SRC" -o "$OUT/fuzz_decode" -pthread -ldl
"$CXX" "${common[@]}" -DMPSERVICE_FUZZ_WRITE_SEEDS "$SRC" -o "$OUT/write_seeds" -pthread -ldl
"$OUT/write_seeds" "$OUT/seeds"

if [ "$SECONDS_TO_RUN" = 0 ]; then
  echo "fuzz: built; not running (0 seconds asked)"
  exit 0
fi
echo "fuzz: running for ${SECONDS_TO_RUN}s ($(ls "$OUT/seeds" | wc -l) seeds, corpus $OUT/corpus)"
# -artifact_prefix keeps reproducers in the build dir, not the repository root.
"$OUT/fuzz_decode" -max_total_time="$SECONDS_TO_RUN" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 -artifact_prefix="$OUT/" "$OUT/corpus" "$OUT/seeds" 2>&1 | tail -n 25
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED (exit $status); reproducers: $(ls "$OUT" | grep -E '^(crash|leak|timeout|oom)-' || true)"
  exit "$status"
fi
echo "fuzz: passed (${SECONDS_TO_RUN}s, no findings)"
