#!/usr/bin/env python3
"""A program links only the parts of the library it reaches (issue 12, footprint).

    unused_parts_dropped.py CXX REPO_ROOT WORK_DIR [NM]
Builds examples/hello_codec.cpp (the codec, nothing else) with the implementation
TU, every function and object in its own section, linked with --gc-sections, and
lists the symbols the program keeps.  None of the process machinery, the Pool, the
server process, the logging state or the exception registry's standard table may
be among them: the implementation's static initializers only make locks, so they
reach nothing else.  A static initializer that names a subsystem (an at-fork hook
registered before main, a table built eagerly) pulls that subsystem into every
program - this test names it.  The program must still run and exit 0.

-O0 keeps the compile short; the references, and so what the linker keeps, do
not depend on the optimization level.
"""
import pathlib
import re
import subprocess
import sys

cxx, root, work = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
nm_tool = sys.argv[4] if len(sys.argv) > 4 else "nm"
work.mkdir(parents=True, exist_ok=True)
flags = [cxx, "-std=c++17", "-O0", "-ffunction-sections", "-fdata-sections", f"-I{root}"]
impl, program = work / "impl.o", work / "hello_codec_gc"
subprocess.run(flags + ["-c", str(root / "tools" / "mpservice_impl.cpp"), "-o", str(impl)], check=True)
subprocess.run(flags + [str(root / "examples" / "hello_codec.cpp"), str(impl), "-pthread", "-Wl,--gc-sections",
                        "-o", str(program)], check=True)

# Each: a pattern over `nm -C` lines, and the part of the library it stands for.
UNREACHED = [
    (r"mpservice::detail::Reactor\b", "the reactor (process starts)"),
    (r"mpservice::detail::ProcessCore\b", "Process"),
    (r"mpservice::detail::WarmSpawner\b", "warm spawn"),
    (r"\bPoolCore\b", "the Pool"),
    (r"server::(\(anonymous namespace\)::)?Host\b", "the server process's host"),
    (r"\bstandard_types\b", "the exception registry's standard table"),
    (r"\bLogState\b", "the logging state"),
    (r"(\(anonymous namespace\)::|detail::)Runtime\b", "the process runtime"),
    (r"\breset_after_fork_in_child\b", "the forked child's reset hook"),
]
symbols = subprocess.run([nm_tool, "-C", str(program)], check=True, capture_output=True, text=True).stdout
kept = []
for pattern, part in UNREACHED:
    hits = [line for line in symbols.splitlines() if re.search(pattern, line)]
    if hits:
        kept.append("%s (%d symbols, e.g. %s)" % (part, len(hits), hits[0].split(" ", 2)[-1][:120]))
if kept:
    sys.exit("unused_parts_dropped: a codec-only program linked with --gc-sections still carries:\n  " +
             "\n  ".join(kept))
run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
if run.returncode != 0:
    sys.exit("unused_parts_dropped: the program failed (%d):\n%s%s" % (run.returncode, run.stdout, run.stderr))
size = program.stat().st_size
print("unused_parts_dropped: hello_codec with --gc-sections keeps none of the unused parts "
      "(%d KiB unstripped, -O0)" % (size // 1024))
