// The test suites' main.  mpservice::init comes first so that a test binary can
// be its own child: a spawned child runs its task inside init and never returns.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "mpservice.hpp"

#if defined(_WIN32)
#ifndef NOMINMAX
#define NOMINMAX
#endif
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#include <cstdint>
#include <cstdio>
// A crash must never pass as success: Wine's crash debugger can make a
// crashed process exit 0.  This filter names the test and ends the process
// with the exception code itself (0xC0000005...), which a parent reads as a
// crash (-SIGSEGV...) and a shell sees as non-zero.
static LONG WINAPI on_unhandled_exception(EXCEPTION_POINTERS* ep) {
    const doctest::detail::TestCase* tc = doctest::detail::g_cs ? doctest::detail::g_cs->currentTest : nullptr;
    const DWORD code = ep->ExceptionRecord->ExceptionCode;
    // The faulting address, as an offset into this executable's image (for addr2line).
    const auto at = reinterpret_cast<std::uintptr_t>(ep->ExceptionRecord->ExceptionAddress);
    const auto base = reinterpret_cast<std::uintptr_t>(GetModuleHandleW(nullptr));
    if (tc)  // in a test (not in a child process the test started)
        std::fprintf(stderr, "FATAL: unhandled SEH exception 0x%08lx at image offset 0x%llx in test case \"%s\" (%s:%d)\n",
                     static_cast<unsigned long>(code), static_cast<unsigned long long>(at - base), tc->m_name,
                     tc->m_file.c_str(), tc->m_line);
    std::fflush(nullptr);
    TerminateProcess(GetCurrentProcess(), code);
    return EXCEPTION_EXECUTE_HANDLER;
}
#endif

int main(int argc, char** argv) {
#if defined(_WIN32)
    SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);
    SetUnhandledExceptionFilter(on_unhandled_exception);
#endif
    mpservice::init(argc, argv);
    doctest::Context context(argc, argv);
    return context.run();
}
