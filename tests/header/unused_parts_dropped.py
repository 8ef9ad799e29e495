#!/usr/bin/env python3
"""A program links only the parts of the library it reaches (issue 12, footprint).

    unused_parts_dropped.py CXX REPO_ROOT WORK_DIR [NM]
Two ways to leave unused code out, both checked:
1. Builds examples/hello_codec.cpp (the codec, nothing else) with the implementation
TU, every function and object in its own section, linked with --gc-sections, and
lists the symbols the program keeps.  None of the process machinery, the Pool, the
server process, the logging state or the exception registry's standard table may
be among them: the implementation's static initializers only make locks, so they
reach nothing else.  A static initializer that names a subsystem (an at-fork hook
registered before main, a table built eagerly) pulls that subsystem into every
program - this test names it.  The program must still run and exit 0.

2. Builds the implementation in its parts (MPSERVICE_IMPLEMENTATION_PART, as
many as mpservice.hpp's MPSERVICE_IMPLEMENTATION_PARTS) as a static library and
links hello_codec against it plainly: it must take only the platform part (and
the throw hook's), and
keep none of the same symbols; examples/quickstart.cpp (a Process, its
MPSERVICE_IMPLEMENTATION line left out) must take the process parts and neither
the Pool part nor the server parts, and run.

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
    (r"mpservice::detail::(\(anonymous namespace\)::)?Reactor\b", "the reactor (process starts)"),
    (r"mpservice::detail::ProcessCore\b", "Process"),
    (r"mpservice::detail::(\(anonymous namespace\)::)?WarmSpawner\b", "warm spawn"),
    (r"\bPoolCore\b", "the Pool"),
    (r"server::(\(anonymous namespace\)::)?Host\b", "the server process's host"),
    (r"\bstandard_types\b", "the exception registry's standard table"),
    (r"\bLogState\b", "the logging state"),
    (r"(\(anonymous namespace\)::|detail::)Runtime\b", "the process runtime"),
    (r"\breset_after_fork_in_child\b", "the forked child's reset hook"),
]
POOL_AND_SERVER = UNREACHED[3:5]

# The parts, as mpservice.hpp numbers them (its comment on MPSERVICE_IMPLEMENTATION_PARTS).
PART_COUNT = int(re.search(r"^#define MPSERVICE_IMPLEMENTATION_PARTS (\d+)$",
                           (root / "mpservice.hpp").read_text(), re.M).group(1))
PROCESS_PARTS = ["part5", "part6"]
POOL_AND_SERVER_PARTS = ["part7", "part8", "part9", "part11", "part12"]
# A codec-only program: the platform layer, and the throw hook (part 13, which
# defines __cxa_throw: any program whose code throws resolves it there, so that
# its exceptions carry their throw site - the codec throws DecodeError).
CODEC_PARTS = ["part1", "part13"]


def carried(program, unreached):
    symbols = subprocess.run([nm_tool, "-C", str(program)], check=True, capture_output=True, text=True).stdout
    kept = []
    for pattern, part in unreached:
        hits = [line for line in symbols.splitlines() if re.search(pattern, line)]
        if hits:
            kept.append("%s (%d symbols, e.g. %s)" % (part, len(hits), hits[0].split(" ", 2)[-1][:120]))
    return kept


def runs(program, what):
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        sys.exit("unused_parts_dropped: %s failed (%d):\n%s%s" % (what, run.returncode, run.stdout, run.stderr))


def parts_taken(link_map):
    """The archive members a link took, from its -Map file: {'part1.o', ...}."""
    return sorted(set(re.findall(r"libparts\.a\((part\d+)\.o\)", link_map.read_text())), key=lambda p: int(p[4:]))


failures = []
kept = carried(program, UNREACHED)
if kept:
    failures.append("a codec-only program linked with --gc-sections still carries:\n  " + "\n  ".join(kept))
runs(program, "hello_codec (--gc-sections)")
size = program.stat().st_size

# 2. The parts, as a static library, and plain links.
plain = [cxx, "-std=c++17", "-O0", f"-I{root}"]
objects = []
for n in range(1, PART_COUNT + 1):
    obj = work / ("part%d.o" % n)
    subprocess.run(plain + ["-DMPSERVICE_IMPLEMENTATION_PART=%d" % n, "-x", "c++", "-c", str(root / "mpservice.hpp"),
                            "-o", str(obj)], check=True)
    objects.append(str(obj))
library = work / "libparts.a"
library.unlink(missing_ok=True)
subprocess.run(["ar", "rcs", str(library)] + objects, check=True)

codec_only = work / "hello_codec_parts"
subprocess.run(plain + [str(root / "examples" / "hello_codec.cpp"), str(library), "-pthread",
                        "-Wl,-Map," + str(work / "hello_codec_parts.map"), "-o", str(codec_only)], check=True)
taken = parts_taken(work / "hello_codec_parts.map")
if taken != CODEC_PARTS:
    failures.append("hello_codec linked against the parts took %s (expected only %s, the platform layer and the "
                    "throw hook)" % (taken, CODEC_PARTS))
kept = carried(codec_only, UNREACHED)
if kept:
    failures.append("hello_codec linked against the parts carries:\n  " + "\n  ".join(kept))
runs(codec_only, "hello_codec (parts)")

quickstart = work / "quickstart_parts.cpp"
quickstart.write_text("".join(line for line in (root / "examples" / "quickstart.cpp").read_text().splitlines(True)
                              if not line.startswith("#define MPSERVICE_IMPLEMENTATION")))
process_program = work / "quickstart_parts"
subprocess.run(plain + [str(quickstart), str(library), "-pthread", "-Wl,-Map," + str(work / "quickstart_parts.map"),
                        "-o", str(process_program)], check=True)
taken = parts_taken(work / "quickstart_parts.map")
if any(p in taken for p in POOL_AND_SERVER_PARTS) or not all(p in taken for p in PROCESS_PARTS):
    failures.append("quickstart linked against the parts took %s (expected the process parts %s, "
                    "none of the Pool's and the server's %s)" % (taken, PROCESS_PARTS, POOL_AND_SERVER_PARTS))
kept = carried(process_program, POOL_AND_SERVER)
if kept:
    failures.append("quickstart linked against the parts carries:\n  " + "\n  ".join(kept))
runs(process_program, "quickstart (parts)")

if failures:
    sys.exit("unused_parts_dropped:\n" + "\n".join(failures))
print("unused_parts_dropped: hello_codec with --gc-sections keeps none of the unused parts "
      "(%d KiB unstripped, -O0); linked against the parts it takes only part1 and part13 (%d KiB), "
      "quickstart takes %s" % (size // 1024, codec_only.stat().st_size // 1024, " ".join(taken)))
