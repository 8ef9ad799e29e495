// os_posix_stacktrace: throw-site stacks and their symbolization (POSIX, ELF,
// Itanium C++ ABI: Linux with g++ or clang).  The "remote exception /
// symbolization" section of detail/os.hpp.
//
// Throw sites.  This file defines __cxa_throw, the C++ runtime function every
// `throw` expression calls - including those inside libstdc++, such as
// vector::at, because the linker exports the executable's definition when the
// C++ runtime references it.  The definition records the return addresses of
// the throwing stack (backtrace(): cheap, no symbol lookup) in a small
// per-thread table keyed by the thrown object's address, then forwards to the
// real __cxa_throw found with dlsym(RTLD_NEXT).  Names are looked up only when
// an exception is encoded to cross a process boundary.
//
// The interposition is left out when MPSERVICE_NO_THROW_HOOK is defined (e.g.
// with -static-libstdc++, where the runtime's own __cxa_throw would be a
// duplicate definition) and under MemorySanitizer (untested).  Under the
// other sanitizers it stays, checked with clang 14 and g++ 12:
//   * ThreadSanitizer does not intercept __cxa_throw;
//   * AddressSanitizer does, to un-poison the stack that the throw unwinds.
//     With clang's static runtime our definition replaces its interceptor
//     (a weak alias), so the hook calls __asan_handle_no_return() itself, as
//     the interceptor would; with g++'s shared libasan, RTLD_NEXT finds the
//     interceptor and the call is made twice, which is harmless.
// Without the hook, the traceback shows the stack where the exception was
// encoded (the catch site), and says so.
//
// Symbols.  dladdr names only exported (dynamic) symbols, so an executable
// linked without -rdynamic would show no names for its own functions.  The
// reader below loads the ELF .symtab of each module (the executable through
// /proc/self/exe), which names static and internal functions too; dladdr is
// the fallback for stripped modules.  File and line come from the
// `addr2line` program when it is installed and the module has DWARF line
// information (.debug_line), run once per module per traceback, bounded in
// time; without it frames show function+offset and module.
#if !defined(_WIN32)

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <execinfo.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

extern char** environ;

// MPSERVICE_DETAIL_ASAN: defined by os_posix.cpp, which comes first.
#if defined(__has_feature)
#if __has_feature(memory_sanitizer)
#define MPSERVICE_DETAIL_MSAN 1
#endif
#endif
#if !defined(MPSERVICE_NO_THROW_HOOK) && !defined(MPSERVICE_DETAIL_MSAN) && defined(__GLIBC__)
#define MPSERVICE_DETAIL_THROW_HOOK 1
#endif
#if defined(MPSERVICE_DETAIL_THROW_HOOK) && defined(MPSERVICE_DETAIL_ASAN)
extern "C" void __asan_handle_no_return();
#endif

namespace mpservice::detail::os {

namespace {

// ---- per-thread table of recent throw (and re-raise) sites
constexpr int kSiteFrames = 48;
constexpr int kSiteSlots = 8;

struct Site {
    const void* object;
    const std::type_info* type;
    int depth;
    void* pcs[kSiteFrames];
};
struct SiteTable {
    Site slots[kSiteSlots];
    unsigned next;
};
// Plain data, zero-initialized: no per-thread constructor or destructor.
thread_local SiteTable t_throw_sites;
thread_local SiteTable t_raise_sites;

/// Records the current stack in `table` for `object`, starting at the frame
/// whose return address is `caller` (the throw site, as seen from the hook):
/// frames of the hook itself - however many inlining and sanitizer
/// interceptors make them - are left out.
void record_site(SiteTable& table, const void* object, const std::type_info* type, const void* caller) noexcept {
    // A second throw of the same object (e.g. after a catch by reference and a
    // `throw` of a copy at the same address) replaces the old entry.
    Site* slot = nullptr;
    for (Site& s : table.slots)
        if (s.object == object) slot = &s;
    if (!slot) slot = &table.slots[table.next++ % kSiteSlots];
    slot->object = object;
    slot->type = type;
    slot->depth = capture_stack(slot->pcs, kSiteFrames, 0, caller);
}

int read_site(const SiteTable& table, const void* object, const std::type_info* type, void** pcs,
              int max) noexcept {
    for (const Site& s : table.slots) {
        if (s.object != object || !object) continue;
        if (type && s.type && *s.type != *type) continue;  // a stale entry for a reused address
        int n = std::min(s.depth, max);
        std::copy(s.pcs, s.pcs + n, pcs);
        return n;
    }
    return 0;
}

}  // namespace

namespace {
std::atomic<bool> g_capture_throw_sites{true};
}

bool throw_hook_active() noexcept {
#if defined(MPSERVICE_DETAIL_THROW_HOOK)
    return g_capture_throw_sites.load(std::memory_order_relaxed);
#else
    return false;
#endif
}

void set_throw_site_capture(bool enabled) noexcept {
    g_capture_throw_sites.store(enabled, std::memory_order_relaxed);
}

int capture_stack(void** pcs, int max, int skip, const void* from) noexcept {
    // backtrace() walks with the unwinder's tables, so it works without frame pointers.
    void* buf[kSiteFrames + 16];
    int want = std::min(max + skip + 8, static_cast<int>(sizeof buf / sizeof buf[0]));
    int n = ::backtrace(buf, want);
    int first = std::min(n, skip + 1);  // +1: this function's own frame
    if (from) {
        for (int i = 0; i < n; ++i)
            if (buf[i] == from) {
                first = i;
                break;
            }
    }
    int count = std::min(n - first, max);
    std::copy(buf + first, buf + first + count, pcs);
    return count;
}

int throw_site_stack(const void* object, const std::type_info* type, void** pcs, int max) noexcept {
    return read_site(t_throw_sites, object, type, pcs, max);
}

void note_raise_site(const void* object, const void* caller) noexcept {
    record_site(t_raise_sites, object, nullptr, caller);
}

int raise_site_stack(const void* object, void** pcs, int max) noexcept {
    return read_site(t_raise_sites, object, nullptr, pcs, max);
}

std::string demangle(const char* mangled) {
    if (!mangled) return std::string();
    int status = 0;
    char* out = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0 || !out) return mangled;
    std::string s(out);
    std::free(out);
    return s;
}

const std::type_info* current_exception_type() noexcept { return abi::__cxa_current_exception_type(); }

const void* exception_object(const std::exception_ptr& e) noexcept {
    // Itanium C++ ABI fact, true of libstdc++ and libc++: an exception_ptr is
    // one pointer, to the thrown object (the address __cxa_throw received).
    static_assert(sizeof(std::exception_ptr) == sizeof(void*), "exception_ptr is not a single pointer here");
    const void* p = nullptr;
    std::memcpy(&p, static_cast<const void*>(&e), sizeof p);
    return p;
}

// ---------------------------------------------------------------- ELF symbol tables

namespace {

/// The function symbols of one module, from its .symtab (or nothing).
struct ModuleSymbols {
    struct Sym {
        std::uintptr_t value;
        std::uintptr_t size;
        std::uint32_t name;
    };
    std::vector<Sym> syms;  // sorted by value
    std::string strtab;
    bool has_line_info = false;

    const char* find(std::uintptr_t addr, std::uintptr_t* start) const {
        auto it = std::upper_bound(syms.begin(), syms.end(), addr,
                                   [](std::uintptr_t a, const Sym& s) { return a < s.value; });
        if (it == syms.begin()) return nullptr;
        --it;
        if (it->size != 0 && addr >= it->value + it->size) return nullptr;
        if (it->name >= strtab.size()) return nullptr;
        *start = it->value;
        return strtab.c_str() + it->name;
    }
};

/// Reads exactly n bytes at `offset`, refusing anything outside the file.
bool read_at(int fd, std::uint64_t file_size, std::uint64_t offset, std::uint64_t n, void* out) {
    if (offset > file_size || n > file_size - offset) return false;
    auto* p = static_cast<char*>(out);
    while (n > 0) {
        ssize_t k = ::pread(fd, p, n, static_cast<off_t>(offset));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        p += k;
        offset += static_cast<std::uint64_t>(k);
        n -= static_cast<std::uint64_t>(k);
    }
    return true;
}

/// A short, bounds-checked reader of an ELF file's section headers, .symtab and
/// its string table (native class and byte order only: it reads modules of
/// this very process).
void load_symbols(const char* path, ModuleSymbols& out) {
    constexpr std::uint64_t kMaxTable = 256u << 20;  // refuse absurd sizes (corrupt file)
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct Closer {
        int fd;
        ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st;
    if (::fstat(fd, &st) != 0) return;
    auto size = static_cast<std::uint64_t>(st.st_size);

    ElfW(Ehdr) eh;
    if (!read_at(fd, size, 0, sizeof eh, &eh)) return;
    if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) return;
#if __SIZEOF_POINTER__ == 8
    if (eh.e_ident[EI_CLASS] != ELFCLASS64) return;
#else
    if (eh.e_ident[EI_CLASS] != ELFCLASS32) return;
#endif
    if (eh.e_shentsize != sizeof(ElfW(Shdr)) || eh.e_shnum == 0 || eh.e_shstrndx >= eh.e_shnum) return;
    std::vector<ElfW(Shdr)> sh(eh.e_shnum);
    if (!read_at(fd, size, eh.e_shoff, std::uint64_t(eh.e_shnum) * sizeof(ElfW(Shdr)), sh.data())) return;

    // Section names, to see whether DWARF line information is there.
    const ElfW(Shdr)& names = sh[eh.e_shstrndx];
    if (names.sh_size < kMaxTable) {
        std::string shstr(names.sh_size, '\0');
        if (read_at(fd, size, names.sh_offset, names.sh_size, shstr.data())) {
            for (const auto& s : sh)
                if (s.sh_name < shstr.size() && std::strcmp(shstr.c_str() + s.sh_name, ".debug_line") == 0)
                    out.has_line_info = true;
        }
    }

    for (const auto& s : sh) {
        if (s.sh_type != SHT_SYMTAB) continue;
        if (s.sh_entsize != sizeof(ElfW(Sym)) || s.sh_link >= sh.size()) return;
        const ElfW(Shdr)& str = sh[s.sh_link];
        if (s.sh_size > kMaxTable || str.sh_size > kMaxTable) return;
        std::vector<ElfW(Sym)> raw(s.sh_size / sizeof(ElfW(Sym)));
        out.strtab.assign(str.sh_size, '\0');
        if (!read_at(fd, size, s.sh_offset, raw.size() * sizeof(ElfW(Sym)), raw.data()) ||
            !read_at(fd, size, str.sh_offset, str.sh_size, out.strtab.data())) {
            out.strtab.clear();
            return;
        }
        for (const auto& y : raw) {
            if (ELF64_ST_TYPE(y.st_info) != STT_FUNC || y.st_value == 0 || y.st_shndx == SHN_UNDEF) continue;
            out.syms.push_back({static_cast<std::uintptr_t>(y.st_value), static_cast<std::uintptr_t>(y.st_size),
                                y.st_name});
        }
        std::sort(out.syms.begin(), out.syms.end(),
                  [](const ModuleSymbols::Sym& a, const ModuleSymbols::Sym& b) { return a.value < b.value; });
        return;
    }
}

// The symbolizer's caches.  Their locks are never destroyed (exceptions are
// symbolized during static destruction too) and are registered as fork locks
// before main(): a thread symbolizing while another forks must not leave the
// child with a held lock (issue 8, defect 12).
std::mutex& symbols_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
std::mutex& line_cache_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
[[maybe_unused]] const bool g_symbolizer_fork_safe =
    (at_fork_protect(&symbols_mutex(), 30), at_fork_protect(&line_cache_mutex(), 31), true);

const ModuleSymbols& module_symbols(const std::string& path) {
    static auto* cache = new std::map<std::string, std::unique_ptr<ModuleSymbols>>;  // lives to the end
    std::lock_guard<std::mutex> lock(symbols_mutex());
    auto& slot = (*cache)[path];
    if (!slot) {
        slot = std::make_unique<ModuleSymbols>();
        load_symbols(path.c_str(), *slot);
    }
    return *slot;
}

/// The module (loaded object) holding `pc`: its file path and load bias.
struct ModuleOf {
    std::uintptr_t pc;
    std::string path;
    std::uintptr_t bias = 0;
    bool found = false;
};

int find_module(struct dl_phdr_info* info, size_t, void* data) {
    auto* m = static_cast<ModuleOf*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const auto& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        std::uintptr_t start = info->dlpi_addr + ph.p_vaddr;
        if (m->pc >= start && m->pc < start + ph.p_memsz) {
            m->found = true;
            m->bias = info->dlpi_addr;
            // The main program has an empty name; its file is /proc/self/exe
            // (right even if argv[0] was relative and the directory changed).
            m->path = (info->dlpi_name && info->dlpi_name[0]) ? info->dlpi_name : "/proc/self/exe";
            return 1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------- file:line through addr2line

/// Source position of one address, with the functions inlined at it:
/// innermost first, the last one being the function the code belongs to.
struct SourcePlace {
    std::string function;
    std::string file;
    int line = 0;
};
using InlineChain = std::vector<SourcePlace>;

/// Starts `tool` with `argv`, its stdout on `out` (stdin and stderr on
/// /dev/null), killed by the kernel if the calling thread ends first: the
/// tool must not outlive a process that is SIGKILLed while symbolizing (a
/// parent SIGKILLed with its children gone in 1 s left addr2line running).
/// posix_spawn cannot ask for PR_SET_PDEATHSIG, so this is its vfork form:
/// signals blocked around it; in the child, only system calls, default signal
/// dispositions, then exec.  -1 on failure.
pid_t spawn_dying_with_caller(const char* tool, char* const* argv, int out) {
    const pid_t caller = ::getpid();
    const int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0) return -1;
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    const pid_t pid = ::vfork();
    if (pid == 0) {
#if defined(__linux__)
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
        if (::getppid() != caller) ::_exit(127);  // the caller died already
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        for (int sig = 1; sig < NSIG; ++sig)
            if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
        ::sigprocmask(SIG_SETMASK, &old, nullptr);
        if (::dup2(out, STDOUT_FILENO) < 0 || ::dup2(devnull, STDIN_FILENO) < 0 ||
            ::dup2(devnull, STDERR_FILENO) < 0)
            ::_exit(127);
        ::execve(tool, argv, environ);
        ::_exit(127);
    }
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::close(devnull);
    return pid;
}

/// Runs `addr2line -a -f -i -C -e module addr...` (bounded in time) and returns
/// one chain per address (empty where nothing was found).  Best effort.
std::vector<InlineChain> run_addr2line(const std::string& module, const std::vector<std::uintptr_t>& offsets) {
    std::vector<InlineChain> result(offsets.size());
    static const char* const candidates[] = {"/usr/bin/addr2line", "/bin/addr2line", "/usr/local/bin/addr2line"};
    const char* tool = nullptr;
    for (const char* c : candidates)
        if (!tool && ::access(c, X_OK) == 0) tool = c;
    if (!tool || offsets.empty()) return result;

    // "/proc/self/exe" would name addr2line itself in the child: name our pid.
    std::string file = module == "/proc/self/exe" ? "/proc/" + std::to_string(::getpid()) + "/exe" : module;
    std::vector<std::string> args = {tool, "-a", "-f", "-i", "-C", "-e", file};
    for (std::uintptr_t off : offsets) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(off));
        args.push_back(buf);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return result;
    pid_t pid = spawn_dying_with_caller(tool, argv.data(), out[1]);
    ::close(out[1]);
    if (pid < 0) {
        ::close(out[0]);
        return result;
    }
    // Read everything, giving up after 5 s in all (a huge binary, a hung tool).
    std::string text;
    auto deadline = Clock::now() + std::chrono::seconds(5);
    bool complete = false;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0) break;
        pollfd p{out[0], POLLIN, 0};
        int k = ::poll(&p, 1, static_cast<int>(left));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        char buf[4096];
        ssize_t r = ::read(out[0], buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) break;
        if (r == 0) {
            complete = true;
            break;
        }
        text.append(buf, static_cast<std::size_t>(r));
    }
    ::close(out[0]);
    if (!complete) ::kill(pid, SIGKILL);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!complete) return result;

    // Output: per address a line "0x<addr>", then pairs "function" / "file:line"
    // (possibly followed by " (discriminator n)"; "??" where unknown).
    std::vector<std::string> lines;
    for (std::size_t pos = 0; pos < text.size();) {
        std::size_t end = text.find('\n', pos);
        if (end == std::string::npos) end = text.size();
        lines.push_back(text.substr(pos, end - pos));
        pos = end + 1;
    }
    int index = -1;
    for (std::size_t i = 0; i < lines.size(); ++i) {
        if (lines[i].compare(0, 2, "0x") == 0) {
            ++index;
            continue;
        }
        if (index < 0 || index >= static_cast<int>(result.size()) || i + 1 >= lines.size()) break;
        SourcePlace place;
        place.function = lines[i] == "??" ? std::string() : lines[i];
        std::string where = lines[++i];
        std::size_t paren = where.find(" (");
        if (paren != std::string::npos) where.resize(paren);
        std::size_t colon = where.rfind(':');
        if (colon != std::string::npos && where.compare(0, 2, "??") != 0) {
            int n = std::atoi(where.c_str() + colon + 1);
            if (n > 0) {
                place.file = where.substr(0, colon);
                place.line = n;
            }
        }
        result[index].push_back(std::move(place));
    }
    return result;
}

}  // namespace

namespace {
std::atomic<bool> g_line_lookup{true};
bool line_lookup_enabled() { return g_line_lookup.load(std::memory_order_relaxed); }
}  // namespace

void set_line_lookup(bool enabled) noexcept { g_line_lookup.store(enabled, std::memory_order_relaxed); }

std::vector<StackFrame> symbolize(void* const* pcs, int n, bool (*last_line_frame)(const std::string& function)) {
    std::vector<StackFrame> frames(static_cast<std::size_t>(std::max(n, 0)));
    std::map<std::string, std::vector<int>> want_lines;  // module -> frames to ask addr2line about
    bool past_last_line_frame = false;
    for (int i = 0; i < n; ++i) {
        StackFrame& f = frames[i];
        f.pc = pcs[i];
        // A return address points after the call; look up the call itself.
        auto lookup = reinterpret_cast<std::uintptr_t>(pcs[i]) - 1;
        ModuleOf m;
        m.pc = lookup;
        walk_loaded_modules(find_module, &m);
        bool has_line_info = false;
        if (m.found) {
            f.module = m.path;
            f.offset = lookup + 1 - m.bias;
            const ModuleSymbols& syms = module_symbols(m.path);
            std::uintptr_t start = 0;
            if (const char* name = syms.find(lookup - m.bias, &start)) f.function = demangle(name);
            has_line_info = syms.has_line_info;
        }
        if (f.function.empty()) {
            Dl_info info;
            bool named;
            {
                std::lock_guard<std::recursive_mutex> lock(loader_calls_mutex());  // dladdr takes the loader's lock
                named = ::dladdr(reinterpret_cast<void*>(lookup), &info) && info.dli_sname;
            }
            if (named) f.function = demangle(info.dli_sname);
        }
        // addr2line's time grows with the compile units it reads: frames the
        // caller will not show (below the target's runner, below main) cost
        // most of it (the library's own big unit) and are not asked about.
        if (has_line_info && !past_last_line_frame) want_lines[f.module].push_back(i);
        if (last_line_frame && last_line_frame(f.function)) past_last_line_frame = true;
    }
    if (want_lines.empty() || !line_lookup_enabled()) return frames;

    // Add file:line, and the functions inlined at each address as frames of
    // their own (marked inlined), innermost first.  Answers are cached, so an
    // exception thrown again from the same place costs no second addr2line run.
    std::mutex& cache_mu = line_cache_mutex();
    static auto* cache = new std::map<std::pair<std::string, std::uintptr_t>, InlineChain>;
    std::vector<InlineChain> chains(frames.size());
    for (auto& [module, which] : want_lines) {
        std::vector<std::uintptr_t> offsets;
        std::vector<int> asked;
        {
            std::lock_guard<std::mutex> lock(cache_mu);
            for (int i : which) {
                auto it = cache->find({module, frames[i].offset});
                if (it != cache->end()) {
                    chains[i] = it->second;
                } else {
                    offsets.push_back(frames[i].offset - 1);
                    asked.push_back(i);
                }
            }
        }
        if (asked.empty()) continue;
        std::vector<InlineChain> found = run_addr2line(module, offsets);
        std::lock_guard<std::mutex> lock(cache_mu);
        if (cache->size() > 8192) cache->clear();
        for (std::size_t k = 0; k < asked.size(); ++k) {
            chains[asked[k]] = found[k];
            (*cache)[{module, frames[asked[k]].offset}] = std::move(found[k]);
        }
    }
    std::vector<StackFrame> out;
    for (std::size_t i = 0; i < frames.size(); ++i) {
        const InlineChain& chain = chains[i];
        for (std::size_t j = 0; j + 1 < chain.size(); ++j) {
            StackFrame inl;
            inl.pc = frames[i].pc;
            // addr2line names the innermost inlined function of a split-off
            // ".cold" part after the containing symbol: that name is wrong.
            inl.function = chain[j].function == frames[i].function ? std::string() : chain[j].function;
            inl.file = chain[j].file;
            inl.line = chain[j].line;
            inl.inlined = true;
            out.push_back(std::move(inl));
        }
        StackFrame f = std::move(frames[i]);
        if (!chain.empty()) {
            f.file = chain.back().file;
            f.line = chain.back().line;
            if (f.function.empty()) f.function = chain.back().function;
        }
        out.push_back(std::move(f));
    }
    return out;
}

}  // namespace mpservice::detail::os

#if defined(MPSERVICE_DETAIL_THROW_HOOK)
// The interposed C++ runtime entry point (see the top of this file).  Its
// signature is the one <cxxabi.h> declares.
namespace __cxxabiv1 {
extern "C" void __cxa_throw(void* object, std::type_info* type, void (*destroy)(void*)) {
    using Real = void (*)(void*, std::type_info*, void (*)(void*));
    static Real real = reinterpret_cast<Real>(::dlsym(RTLD_NEXT, "__cxa_throw"));
    if (!real) {
        static const char msg[] = "mpservice: cannot find the C++ runtime's __cxa_throw; "
                                  "build with -DMPSERVICE_NO_THROW_HOOK\n";
        mpservice::detail::os::write_stderr(msg, sizeof msg - 1);
        std::abort();
    }
    if (mpservice::detail::os::g_capture_throw_sites.load(std::memory_order_relaxed))
        mpservice::detail::os::record_site(mpservice::detail::os::t_throw_sites, object, type,
                                           __builtin_return_address(0));
#if defined(MPSERVICE_DETAIL_ASAN)
    __asan_handle_no_return();
#endif
    real(object, type, destroy);
    __builtin_unreachable();
}

// `throw;` inside a catch clause: noted as a re-raise site (used for remote
// exceptions passed on from this process, A -> B -> C).
extern "C" void __cxa_rethrow() {
    using Real = void (*)();
    static Real real = reinterpret_cast<Real>(::dlsym(RTLD_NEXT, "__cxa_rethrow"));
    if (!real) std::abort();
    if (mpservice::detail::os::g_capture_throw_sites.load(std::memory_order_relaxed)) {
        std::exception_ptr current = std::current_exception();
        mpservice::detail::os::record_site(mpservice::detail::os::t_raise_sites,
                                           mpservice::detail::os::exception_object(current), nullptr,
                                           __builtin_return_address(0));
    }
    real();
    __builtin_unreachable();
}
}  // namespace __cxxabiv1
#endif

#endif  // !_WIN32
