// Which sanitizer this test build runs under, as constants a test can branch
// on (g++ defines __SANITIZE_*__, clang answers __has_feature).  A test that
// behaves differently under one says why where it asks.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define MPSERVICE_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MPSERVICE_TEST_ASAN 1
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#define MPSERVICE_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MPSERVICE_TEST_TSAN 1
#endif
#endif

#ifdef MPSERVICE_TEST_ASAN
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#ifdef MPSERVICE_TEST_TSAN
constexpr bool kThreadSanitizer = true;
#else
constexpr bool kThreadSanitizer = false;
#endif
/// Sanitizers catch SIGSEGV/SIGABRT themselves and exit with code 1.
constexpr bool kSanitized = kAddressSanitizer || kThreadSanitizer;
