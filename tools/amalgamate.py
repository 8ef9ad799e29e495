#!/usr/bin/env python3
"""Build the single header mpservice.hpp from the split sources under src/.

The umbrella file src/mpservice.hpp lists the parts: first the public parts
(src/mpservice/public/*.hpp, plus internal declarations in src/mpservice/detail/),
then, inside the implementation guard, the implementation parts
(src/mpservice/impl/*.cpp).  Each local include ("...") is inlined once, at the
place of its first inclusion, after the parts it includes itself, so every part
follows its dependencies.  System includes (<...>) are kept where they are.

    tools/amalgamate.py           write mpservice.hpp at the repository root
    tools/amalgamate.py --check   exit 1 if the committed mpservice.hpp is stale
"""
import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
UMBRELLA = ROOT / "src" / "mpservice.hpp"
OUTPUT = ROOT / "mpservice.hpp"

LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*(//.*)?$')
PRAGMA_ONCE = re.compile(r'^\s*#\s*pragma\s+once\s*$')

BANNER = """\
// mpservice.hpp - Python's multiprocessing for C++17, in one header (MIT license).
//
// GENERATED FILE - DO NOT EDIT.  Made by tools/amalgamate.py from src/mpservice.hpp
// and the parts under src/mpservice/; edit those and run the tool again.
//
// What it is
//   Child processes you use like futures (spawned by default: a fresh exec of
//   the same program; fork and a fork server on request), shared-memory locks,
//   events, queues and values that survive a crashed owner, child log records
//   handled by the parent, and child exceptions re-thrown in the parent with
//   their type and the child's stack.  Standard library and POSIX; Linux.
//
// How to include it
//   #include "mpservice.hpp" anywhere.  In exactly ONE .cpp of the program write
//       #define MPSERVICE_IMPLEMENTATION
//       #include "mpservice.hpp"
//   to compile the implementation there.  Link with -pthread -ldl.  Call
//   mpservice::init(argc, argv) first in main(): a spawned child runs its task
//   inside it and never returns.
//   Or compile it in parts: PARTS .cpp files, the n-th with
//       #define MPSERVICE_IMPLEMENTATION_PART n    (n = 1..PARTS)
//       #include "mpservice.hpp"
//   made into a static library (CMake: link mpservice::parts).  The linker then
//   keeps only the parts the program uses, and the parts compile in parallel.
//
// Configuration macros (define before the include)
//   MPSERVICE_IMPLEMENTATION  emit the implementation in this translation unit
//   MPSERVICE_IMPLEMENTATION_PART  1..PARTS: emit only that part of it
//   MPSERVICE_NO_THROW_HOOK   leave out the __cxa_throw hook that records throw
//                             sites (tracebacks then show where the exception
//                             was sent from); only matters with the implementation
//   MPSERVICE_API             linkage of the implementation's functions (default:
//                             empty), e.g. for a shared library's export attribute
//
// Ten lines
//   #define MPSERVICE_IMPLEMENTATION
//   #include "mpservice.hpp"
//   #include <iostream>
//   namespace mp = mpservice;
//   double work(int n) { if (n < 0) throw std::invalid_argument("negative"); return n * 0.5; }
//   int main(int argc, char** argv) {
//       mp::init(argc, argv);
//       mp::Process p(work, 21);            // spawned child; CTAD gives Process<double>
//       p.start();
//       std::cout << p.result() << "\\n";   // 10.5; a child's exception is re-thrown here
//   }
//
// Read more
//   README.md of the project (the API table, semantics and deviations from
//   Python), examples/*.cpp, and the comment at the top of each part below
//   ("---- begin part: public/process.hpp" and so on).
// SPDX-License-Identifier: MIT
"""


class Amalgamator:
    def __init__(self):
        self.seen = set()

    def expand(self, path: pathlib.Path, out: list):
        path = path.resolve()
        if path in self.seen:
            return
        self.seen.add(path)
        rel = path.relative_to(ROOT / "src").as_posix()
        is_umbrella = path == UMBRELLA.resolve()
        if not is_umbrella:
            out.append(f"// ---- begin part: {rel} " + "-" * max(0, 80 - 21 - len(rel)))
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if PRAGMA_ONCE.match(line):
                continue
            m = LOCAL_INCLUDE.match(line)
            if m:
                target = (path.parent / m.group(1))
                if not target.exists():
                    sys.exit(f"amalgamate: {rel}:{lineno}: included file not found: {m.group(1)}")
                self.expand(target, out)
                continue
            out.append(line)
        if not is_umbrella:
            out.append(f"// ---- end part: {rel}")


def render() -> str:
    out = []
    Amalgamator().expand(UMBRELLA, out)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)  # parts joined: no long runs of blank lines
    parts = re.search(r"^#define MPSERVICE_IMPLEMENTATION_PARTS (\d+)$", text, re.M)
    if not parts:
        sys.exit("amalgamate: the umbrella header does not define MPSERVICE_IMPLEMENTATION_PARTS")
    banner = BANNER.replace("PARTS", parts.group(1))  # the count is written once, in the umbrella
    return banner + "\n" + text.strip("\n") + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if mpservice.hpp differs from the parts")
    ap.add_argument("-o", "--output", type=pathlib.Path, default=OUTPUT)
    args = ap.parse_args()
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            sys.stderr.write(
                f"amalgamate: {args.output.name} is stale: it differs from what src/ produces.\n"
                "Run tools/amalgamate.py and commit the result.\n")
            return 1
        print(f"amalgamate: {args.output.name} is up to date")
        return 0
    args.output.write_text(text)
    print(f"amalgamate: wrote {args.output} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
