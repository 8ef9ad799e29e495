// config: version and the few switches a user may set before including.
#pragma once

#define MPSERVICE_VERSION_MAJOR 0
#define MPSERVICE_VERSION_MINOR 1
#define MPSERVICE_VERSION_PATCH 0
#define MPSERVICE_VERSION "0.1.0"

#if __cplusplus < 201703L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 201703L)
#error "mpservice.hpp needs C++17 or later"
#endif

#if defined(_WIN32)
#define MPSERVICE_WIN32 1
#else
#define MPSERVICE_POSIX 1
#endif

// Linkage of the non-template functions defined in the implementation part.
#ifndef MPSERVICE_API
#define MPSERVICE_API
#endif

// Keeps a function out of its callers in the implementation TU, where its
// definition is visible: for code every template instance would otherwise
// copy (the footprint - bench/footprint_breakdown.py).
#if defined(__GNUC__) || defined(__clang__)
#define MPSERVICE_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define MPSERVICE_NOINLINE __declspec(noinline)
#else
#define MPSERVICE_NOINLINE
#endif
