#!/usr/bin/env python3
"""bench/footprint_breakdown.py - what the library's bytes and compile seconds are made of.

    bench/footprint_breakdown.py            # g++, -O2, examples/hello_codec.cpp
    CXX=clang++ bench/footprint_breakdown.py

bench/run gives the footprint figures against their anchors; this script takes them apart,
so that a cut can be aimed (issue 12, item 5: "measure what the bytes and seconds are made
of before you cut").  It builds the smallest example the way a user does (one -O2 TU with
MPSERVICE_IMPLEMENTATION, one with the example, no special flags), then prints

  1. the stripped binary's size under a few builds a user could choose (-O2; -Os; -O2 with
     -ffunction-sections -Wl,--gc-sections), against the same program without the library;
  2. the binary's sections (code, unwind tables, read-only data);
  3. its code by library area (symbols grouped by the part of the library they belong to);
  4. the implementation TU's compile time by compiler phase (g++'s -ftime-report);
  5. what a TU that only includes the header costs (what every includer pays): the code it
     emits (should be none - an inline function of the public part that instantiates a
     template with a static initializer, or a non-template constructor that instantiates a
     Process, puts code in every includer) and, with g++, its front-end time, template
     instantiation and memory against a TU with only the standard headers the public part
     includes (bench/run's includer row).

Compile times are CPU seconds (user), which a busy machine inflates less than wall time.
Standard library and binutils (nm, strip, readelf) only.  Builds into build-footprint/.
"""
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build-footprint"
CXX = os.environ.get("CXX", "g++")
EXAMPLE = ROOT / "examples" / "hello_codec.cpp"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed_compile(args):
    """Compiles; returns the compiler's user CPU seconds (children's rusage)."""
    before = os.times()
    run([CXX] + args)
    after = os.times()
    return after.children_user - before.children_user


def build(tag, flags, link_flags=()):
    """The example and the implementation TU with `flags`, linked; returns (binary, impl seconds)."""
    d = OUT / tag
    d.mkdir(parents=True, exist_ok=True)
    impl_o, ex_o, exe = d / "impl.o", d / "example.o", d / "example"
    base = ["-std=c++17", "-I", str(ROOT)] + list(flags)
    secs = timed_compile(base + ["-c", str(ROOT / "tools" / "mpservice_impl.cpp"), "-o", str(impl_o)])
    run([CXX] + base + ["-c", str(EXAMPLE), "-o", str(ex_o)])
    run([CXX] + list(flags) + [str(ex_o), str(impl_o), "-o", str(exe), "-pthread", "-ldl"] + list(link_flags))
    stripped = d / "example.stripped"
    shutil.copy(exe, stripped)
    run(["strip", str(stripped)])
    return exe, stripped, secs


def anchor_size():
    """The same program without the library: bench/run's anchor, when built; else a hello world."""
    src = OUT / "anchor.cpp"
    src.write_text('#include <cstdio>\n#include <string>\n#include <vector>\nint main() {\n'
                   '    std::vector<std::string> v{"a", "b"};\n    std::printf("%zu\\n", v.size());\n}\n')
    exe = OUT / "anchor"
    run([CXX, "-std=c++17", "-O2", str(src), "-o", str(exe)])
    run(["strip", str(exe)])
    return exe.stat().st_size


# Symbol -> library area.  Order matters: the first match wins.
AREAS = [
    ("remote exceptions (typed re-throw: Remote<T>, RemoteNested<T> per standard type)",
     r"mpservice::Remote<|mpservice::RemoteNested<|mpservice::RemoteError|exception_type_of|__dest_thunk"),
    ("exception records, symbolizer, throw-site hook",
     r"mpservice::detail::os::symbolize|make_record|format_part|encode_exception|decode_exception"
     r"|__cxa_throw|__cxa_rethrow|t_throw_sites|t_raise_sites|ModuleSymbols|addr2line|demangle|stacktrace"),
    ("server process, proxies, MemoryBlocks", r"mpservice::detail::server|ServerProcess|Proxy|MemoryBlock|Namespace"),
    ("pool, ProcessRunner", r"PoolCore|Pool\b|pool|ProcessRunner|AsyncResult|ChunkDraft"),
    ("queues", r"QueueCore|Queue|queue"),
    ("pipes and connections", r"ConnectionCore|Connection|connection"),
    ("process start, reactor, child bootstrap, warm spawn",
     r"ProcessCore|Reactor|run_bootstrapped_child|run_forked_child|fork_server|WarmSpawner|ChildTask|ChildKind"
     r"|mpservice::init|spawn|start_method|FutureCore|wait_until|AsCompleted"),
    ("logging, output forwarding", r"log|Log|redirect_standard_output|forward"),
    ("synchronization primitives, shared memory", r"sync_impl|Lock|Semaphore|Event|Condition|Barrier|SharedMemory|shm"),
    ("platform layer (os::)", r"mpservice::detail::os::"),
    ("codec", r"Codec|Encoder|Decoder|codec"),
    ("other mpservice", r"mpservice"),
    ("standard library instantiations", r"^std::|^void std::|__gnu_cxx|^bool std::|^unsigned long std::"),
]


def areas(exe):
    nm = run(["nm", "-C", "-S", "--size-sort", str(exe)]).stdout
    sizes = collections.Counter()
    for line in nm.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4 or parts[2].lower() not in ("t", "w"):
            continue
        size, name = int(parts[1], 16), parts[3]
        for area, pattern in AREAS:
            if re.search(pattern, name):
                sizes[area] += size
                break
        else:
            sizes["other (runtime, startup)"] += size
    return sizes


def sections(exe):
    out = run(["readelf", "-SW", str(exe)]).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m:
            found[m.group(1)] = int(m.group(2), 16)
    return found


def phases():
    with tempfile.TemporaryDirectory() as t:
        r = subprocess.run([CXX, "-std=c++17", "-O2", "-I", str(ROOT), "-ftime-report", "-c",
                            str(ROOT / "tools" / "mpservice_impl.cpp"), "-o", os.path.join(t, "i.o")],
                           capture_output=True, text=True)
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"\s*(phase [^:]+?)\s*:\s*([\d.]+)\s*\(\s*(\d+)%\)", line)
        if m:
            rows.append((m.group(1), float(m.group(2)), int(m.group(3))))
    return rows


def includer():
    """(code the includer emits, [(label, cpu s, instantiation s, GGC MiB)] for includer and std only)."""
    headers = []
    for line in (ROOT / "mpservice.hpp").read_text().splitlines():
        if line.startswith("#if defined(MPSERVICE_IMPLEMENTATION)"):
            break
        if line.strip().startswith("#include <"):
            h = line.strip()[len("#include "):].split()[0]
            if h not in headers:
                headers.append(h)
    srcs = {"includes mpservice.hpp": '#include "mpservice.hpp"\nint main() { return 0; }\n',
            "only its %d std headers" % len(headers): "".join("#include %s\n" % h for h in headers) +
            "int main() { return 0; }\n"}
    rows, emitted = [], []
    with tempfile.TemporaryDirectory() as t:
        for i, (label, text) in enumerate(srcs.items()):
            src, obj = os.path.join(t, "i%d.cpp" % i), os.path.join(t, "i%d.o" % i)
            Path(src).write_text(text)
            args = ["-std=c++17", "-O2", "-I", str(ROOT), "-c", src, "-o", obj]
            r = subprocess.run([CXX] + args + (["-ftime-report"] if "g++" in os.path.basename(CXX) else []),
                               capture_output=True, text=True, check=True)
            cpu = inst = mem = None
            for line in r.stderr.splitlines():
                m = re.match(r"\s*template instantiation\s*:\s*([\d.]+)", line)
                if m:
                    inst = float(m.group(1))
                m = re.match(r"\s*TOTAL\s*:\s*([\d.]+)\s+([\d.]+)\s+[\d.]+\s+(\d+)([kM])", line)
                if m:
                    cpu = float(m.group(1)) + float(m.group(2))
                    mem = int(m.group(3)) / (1024 if m.group(4) == "k" else 1)
            rows.append((label, cpu, inst, mem))
            if i == 0:
                for line in run(["nm", "-C", "--defined-only", obj]).stdout.splitlines():
                    parts = line.split(" ", 2)
                    if len(parts) == 3 and parts[1] not in ("r", "n", "N") and parts[2] != "main":
                        emitted.append(parts[1] + " " + parts[2])
    return emitted, rows


def main():
    OUT.mkdir(exist_ok=True)
    kib = lambda b: b / 1024
    anchor = anchor_size()
    builds = [("O2", ["-O2"], []),
              ("Os", ["-Os"], []),
              ("O2-gc", ["-O2", "-ffunction-sections", "-fdata-sections"], ["-Wl,--gc-sections"])]
    print("1. stripped %s (%s), against a program without the library (%.0f KiB)" % (EXAMPLE.name, CXX, kib(anchor)))
    results = {}
    for tag, flags, link in builds:
        exe, stripped, secs = build(tag, flags, link)
        results[tag] = (exe, stripped)
        print("   %-6s %7.0f KiB   implementation TU %5.1f s CPU   (%s %s)" %
              (tag, kib(stripped.stat().st_size), secs, " ".join(flags), " ".join(link)))
    exe, stripped = results["O2"]
    print("\n2. sections of the stripped -O2 binary")
    for name, size in sorted(sections(stripped).items(), key=lambda kv: -kv[1])[:8]:
        print("   %-20s %7.0f KiB" % (name, kib(size)))
    print("\n3. code (function symbols) of the -O2 binary by library area")
    sizes = areas(exe)
    total = sum(sizes.values())
    for area, size in sizes.most_common():
        print("   %7.0f KiB %4.0f%%  %s" % (kib(size), 100.0 * size / total, area))
    print("   %7.0f KiB        in all" % kib(total))
    if "g++" in os.path.basename(CXX):
        print("\n4. implementation TU at -O2 by compiler phase (-ftime-report, CPU s)")
        for name, secs, pct in phases():
            print("   %-28s %6.1f s %3d%%" % (name, secs, pct))
    emitted, rows = includer()
    print("\n5. a TU that only includes the header (-O2): %d symbols emitted besides main" % len(emitted))
    for name in emitted[:20]:
        print("   " + name[:150])
    for label, cpu, inst, mem in rows:
        if cpu is not None:
            print("   %-26s %5.2f s CPU (user+sys)  template instantiation %4.2f s  memory %4.0f MiB" %
                  (label, cpu, inst or 0.0, mem or 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
