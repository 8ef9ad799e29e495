// The test suites' main.  mpservice::init comes first so that a test binary can
// be its own child: a spawned child runs its task inside init and never returns.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "mpservice.hpp"

#if defined(_WIN32)
#include "win32_api.hpp"
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
    if (tc) {
        // Where it happened: the faulting module, and the stack through the
        // exception dispatcher to the faulting frame and its callers, each
        // frame as module+offset (for addr2line on our image; a system DLL's
        // name tells at least whose code it was).
        auto where = [](const void* a) {
            HMODULE mod = nullptr;
            wchar_t path[MAX_PATH] = L"?";
            if (GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                                   static_cast<LPCWSTR>(a), &mod))
                GetModuleFileNameW(mod, path, MAX_PATH);
            const wchar_t* name = path;
            for (const wchar_t* c = path; *c; ++c)
                if (*c == L'\\' || *c == L'/') name = c + 1;
            std::fprintf(stderr, "  %ls+0x%llx\n", name,
                         static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(a) -
                                                         reinterpret_cast<std::uintptr_t>(mod)));
        };
        std::fprintf(stderr, "FATAL: faulting address in:\n");
        where(ep->ExceptionRecord->ExceptionAddress);
        void* frames[48];
        const USHORT n = RtlCaptureStackBackTrace(0, 48, frames, nullptr);
        std::fprintf(stderr, "FATAL: stack (from this filter):\n");
        for (USHORT i = 0; i < n; ++i) where(frames[i]);
    }
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
