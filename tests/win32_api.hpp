// The Win32 API for the tests that call it directly (Windows builds only):
// <windows.h> without its min/max macros (they break std::min) and without the
// rarely used parts.  Include it instead of <windows.h>.
#pragma once

#if defined(_WIN32)
#ifndef NOMINMAX
#define NOMINMAX
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
#endif
