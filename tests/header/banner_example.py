#!/usr/bin/env python3
"""The ten-line example in mpservice.hpp's opening manual compiles and runs.

    banner_example.py CXX REPO_ROOT WORK_DIR
Extracts the lines under "// Ten lines" from the generated header, builds them
against that header and checks the program prints what the comment says (10.5).
"""
import pathlib
import subprocess
import sys

cxx, root, work = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
lines = (root / "mpservice.hpp").read_text().splitlines()
start = lines.index("// Ten lines") + 1
example = []
for line in lines[start:]:
    if not line.startswith("//   "):
        break
    example.append(line[5:])
if not 8 <= len(example) <= 12:
    sys.exit(f"banner_example: expected about ten lines of example, found {len(example)}")
work.mkdir(parents=True, exist_ok=True)
src, exe = work / "banner_example.cpp", work / "banner_example"
src.write_text("\n".join(example) + "\n")
subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{root}", str(src), "-o", str(exe),
                "-pthread", "-ldl"], check=True)
out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout
if out.strip() != "10.5":
    sys.exit(f"banner_example: the example printed {out!r}, its comment says 10.5")
print("banner_example: the header's example compiles and prints 10.5")
