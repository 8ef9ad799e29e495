#!/usr/bin/env python3
"""The public part of mpservice.hpp (everything before the implementation
guard) must include only standard C++ headers: no <windows.h>, <unistd.h>,
<pthread.h>, <sys/...>, <linux/...>, <dlfcn.h> or other platform headers, so
that including the library costs little and breaks nothing (min/max macros,
namespace pollution).  Exit status 1 lists the offenders."""
import pathlib
import re
import sys

STANDARD = set("""
algorithm any array atomic bitset cassert cctype cerrno cfloat charconv chrono cinttypes climits
cmath complex condition_variable csignal cstdarg cstddef cstdint cstdio cstdlib cstring ctime
deque exception functional future initializer_list iomanip ios iosfwd iostream istream iterator
limits list map memory mutex new numeric optional ostream queue random ratio set shared_mutex
sstream stack stdexcept streambuf string string_view system_error thread tuple type_traits
typeindex typeinfo unordered_map unordered_set utility valarray variant vector
""".split())

path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent / "mpservice.hpp")
text = path.read_text()
guard = text.find("#if defined(MPSERVICE_IMPLEMENTATION)")
if guard < 0:
    sys.exit(f"{path}: implementation guard not found")
public = text[:guard]
bad = [m.group(1) for m in re.finditer(r"^\s*#\s*include\s*<([^>]+)>", public, re.M) if m.group(1) not in STANDARD]
if bad:
    print(f"{path.name}: the public part includes non-standard headers: " + ", ".join(sorted(set(bad))))
    sys.exit(1)
print(f"{path.name}: public part includes only standard headers")
