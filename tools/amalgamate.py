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
// mpservice.hpp - Python-style multiprocessing for C++17, in one header.
//
// GENERATED FILE - DO NOT EDIT.  Made by tools/amalgamate.py from src/mpservice.hpp
// and the parts under src/mpservice/; edit those and run the tool again.
//
// Use: #include "mpservice.hpp" anywhere; in exactly one .cpp file write
//   #define MPSERVICE_IMPLEMENTATION
// before the include to compile the implementation there.
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
    return BANNER + "\n" + text.strip("\n") + "\n"


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
