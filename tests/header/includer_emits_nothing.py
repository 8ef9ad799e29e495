#!/usr/bin/env python3
"""A translation unit that only includes mpservice.hpp emits no code (issue 12, footprint).

    includer_emits_nothing.py CXX REPO_ROOT WORK_DIR [NM]
Compiles `#include "mpservice.hpp"` plus an empty main() at -O2 and lists the
symbols the object file defines: anything besides main means an inline function
of the public part instantiates a template with a static initializer (an
invoker's announcement) or emits code every includer compiles and links - the
cost bench/footprint_breakdown.py section 5 takes apart.  Also checks that the
Pool constructors without initializer stay usable the way they were declared.
"""
import pathlib
import subprocess
import sys

cxx, root, work = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
nm_tool = sys.argv[4] if len(sys.argv) > 4 else "nm"
work.mkdir(parents=True, exist_ok=True)
src, obj = work / "includer.cpp", work / "includer.o"
src.write_text('#include "mpservice.hpp"\n'
               '#include <type_traits>\n'
               'static_assert(std::is_default_constructible_v<mpservice::Pool>);\n'
               'static_assert(std::is_constructible_v<mpservice::Pool, int>);\n'
               'static_assert(!std::is_convertible_v<int, mpservice::Pool>);  // explicit\n'
               'static_assert(std::is_constructible_v<mpservice::Pool, const mpservice::Context&, int>);\n'
               'static_assert(std::is_constructible_v<mpservice::Pool, const mpservice::Context&, int,'
               ' mpservice::PoolOptions>);\n'
               'int main() { return 0; }\n')
subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{root}", "-c", str(src), "-o", str(obj)],
               check=True)
nm = subprocess.run([nm_tool, "-C", "--defined-only", str(obj)], check=True, capture_output=True, text=True).stdout
extra = []
for line in nm.splitlines():
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1] not in ("r", "n", "N") and parts[2] != "main":
        extra.append(parts[1] + " " + parts[2])
if extra:
    sys.exit("includer_emits_nothing: a TU that only includes the header defines %d symbols besides main:\n  %s"
             % (len(extra), "\n  ".join(extra[:30])))
print("includer_emits_nothing: a TU that only includes mpservice.hpp defines only main")
