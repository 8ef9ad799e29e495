// Rows: bad input at the boundaries (issue 13 item 4) - garbage, truncated
// and oversized frames on a child's channel in both directions, forged child
// markers, and a decoded value that would be undefined behaviour.
// (The decoder itself is fuzzed by tests/fuzz/fuzz_decode.cpp, tools/fuzz.sh.)
#include "harness.hpp"
#include "probe.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

namespace stress {
namespace {

// The channel's frame header (see src/mpservice/impl/process_wire.cpp):
// u32 kind | u32 handle count | u64 payload size.
struct Header {
    std::uint32_t kind, handles;
    std::uint64_t size;
};
constexpr std::uint32_t kind_boot = 1, kind_log = 3, kind_value = 4, kind_exception = 5, kind_end = 6;

std::string header(std::uint32_t kind, std::uint32_t handles, std::uint64_t size) {
    Header h{kind, handles, size};
    return std::string(reinterpret_cast<const char*>(&h), sizeof h);
}

std::string random_bytes(std::mt19937_64& rng, std::size_t n) {
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
}

/// The garbage of variant `v` (0..7) for the parent-to-child direction.
std::string garbage_to_child(int v, std::mt19937_64& rng) {
    switch (v) {
        case 0: return random_bytes(rng, 1 + rng() % 4096);                       // noise
        case 1: return header(kind_boot, 0, 64).substr(0, 7);                      // truncated header
        case 2: return header(kind_boot, 0, std::uint64_t(1) << 40) + "abc";       // oversized frame
        case 3: return header(kind_boot, 0, 64) + random_bytes(rng, 64);           // a BOOT of noise
        case 4: return header(kind_boot, 300, 16) + random_bytes(rng, 16);         // handles that never came
        case 5: {                                                                  // a BOOT cut short
            std::string p(4, '\0');
            std::uint32_t version = 1;
            std::memcpy(&p[0], &version, 4);
            return header(kind_boot, 0, 4 + 40) + p + random_bytes(rng, 10);
        }
        case 6: return header(kind_value, 0, 8) + random_bytes(rng, 8);            // not a BOOT
        default: return header(kind_boot, 0, 0);                                    // an empty BOOT
    }
}
constexpr int garbage_variants = 8;

bool send_all(int fd, const std::string& s) {
    std::size_t off = 0;
    while (off < s.size()) {
        ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        off += static_cast<std::size_t>(n);
    }
    return true;
}

/// Judges the exit of a would-be child given bad input: it must end, by
/// itself, with a non-zero code - not by a signal, not by running main().
void judge_refusal(Round& r, int code, const std::string& what) {
    if (code == -1000) return r.hang(what + ": the process did not end within 5 s");
    if (code == main_ran_code) return r.wrong(what + ": main() ran");
    if (code < 0) return r.wrong(what + ": the process died of signal " + std::to_string(-code));
    if (code == 0) return r.wrong(what + ": the process exited with code 0");
}

ROW("bad input: garbage frames to a child", Ending::none, [](Round& r) {
    const std::string self = self_path();
    for (int v = 0; v < garbage_variants; ++v) {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return r.wrong("socketpair failed");
        pid_t pid = exec_with_fd(self, {child_marker(10, ::getpid())}, sv[1], 10);
        ::close(sv[1]);
        send_all(sv[0], garbage_to_child(v, r.rng()));
        ::shutdown(sv[0], SHUT_WR);
        read_until_eof(sv[0], milliseconds(5000));  // whatever it answers
        int code = wait_exit(pid, milliseconds(5000));
        ::close(sv[0]);
        judge_refusal(r, code, "garbage variant " + std::to_string(v));
    }
});

// ---------------------------------------------------------------- garbage from a child

/// In a spawned child the only socket is its channel to the parent.
int channel_fd() {
    int found = -1;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (dirent* e = ::readdir(d)) {
            if (e->d_name[0] == '.') continue;
            char link[256];
            std::string path = std::string("/proc/self/fd/") + e->d_name;
            ssize_t n = ::readlink(path.c_str(), link, sizeof link - 1);
            if (n > 0 && std::string(link, static_cast<std::size_t>(n)).rfind("socket:", 0) == 0) {
                found = std::atoi(e->d_name);
                break;
            }
        }
        ::closedir(d);
    }
    return found;
}

int garbage_child(int variant, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const int ch = channel_fd();
    if (ch < 0) return 3;
    std::string bytes;
    switch (variant) {
        case 0: bytes = random_bytes(rng, 1 + rng() % 4096); break;
        case 1: bytes = header(kind_value, 0, std::uint64_t(1) << 40) + "abc"; break;
        case 2: bytes = header(99, 0, 0); break;
        case 3: bytes = header(kind_log, 100, 8) + random_bytes(rng, 8); break;
        case 4: bytes = header(kind_end, 0, 32) + random_bytes(rng, 32); break;
        case 5: bytes = header(kind_value, 0, 24) + random_bytes(rng, 24); break;
        case 6: bytes = header(kind_exception, 0, 48) + random_bytes(rng, 48); break;
        default: bytes = header(kind_log, 0, 1024).substr(0, 9); break;
    }
    send_all(ch, bytes);
    if (variant == 7) ::raise(SIGKILL);  // dies half-way through a header
    return 5;
}

ROW("bad input: garbage frames from a child", Ending::none, [](Round& r) {
    // Spawn only: a forked child shares the parent's other sockets.
    const mp::Context& spawn = mp::get_context("spawn");
    for (int v = 0; v < garbage_variants; ++v) {
        mp::Process p(spawn, garbage_child, v, static_cast<std::uint64_t>(r.uniform(0, 1L << 40)));
        p.start();
        const std::string what = "garbage variant " + std::to_string(v);
        try {
            int got = p.result(guard);
            if (got != 5) r.wrong(what + ": a wrong value arrived");
        } catch (const mp::TimeoutError&) {
            p.kill();
            r.hang(what + ": result() never resolved");
        } catch (const mp::Error&) {
            // A clear error (ProcessError, DecodeError, ...) is a right answer.
        } catch (const std::exception& e) {
            r.wrong(what + ": a non-library exception: " + e.what());
        }
    }
    // The reactor survived all of that.
    mp::Process q(spawn, +[] { return 1; });
    q.start();
    try {
        if (q.result(guard) != 1) r.wrong("after garbage, a normal child's value is wrong");
    } catch (const std::exception& e) {
        r.wrong(std::string("after garbage, a normal child failed: ") + e.what());
    }
});

// ---------------------------------------------------------------- forged child markers (issue 8 #10)

/// A BOOT-looking frame.  A program that accepts child mode reads it and
/// answers (its decoding fails, and it reports that as an EXCEPTION frame):
/// any answer means the marker was accepted.
std::string forged_boot() {
    std::string p(8, '\0');
    std::uint32_t version = 1, junk = 0xdeadbeef;
    std::memcpy(&p[0], &version, 4);
    std::memcpy(&p[4], &junk, 4);
    return header(kind_boot, 0, p.size()) + p;
}

void judge_forgery(Round& r, const std::string& answer, int code, const std::string& what) {
    if (!answer.empty()) return r.wrong(what + ": child mode was entered (the forged frame was read and answered)");
    judge_refusal(r, code, what);
}

ROW("forged marker not at argv[1]", Ending::none, [](Round& r) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return r.wrong("socketpair failed");
    pid_t pid = exec_with_fd(self_path(), {"--verbose", child_marker(10, ::getpid())}, sv[1], 10);
    ::close(sv[1]);
    send_all(sv[0], forged_boot());
    ::shutdown(sv[0], SHUT_WR);
    std::string answer = read_until_eof(sv[0], milliseconds(5000));
    int code = wait_exit(pid, milliseconds(5000));
    ::close(sv[0]);
    judge_forgery(r, answer, code, "marker at argv[2]");
});

ROW("forged marker, channel from a non-parent", Ending::none, [](Round& r) {
    // The socket pair is made here; the would-be child's parent is an
    // intermediate process: its channel's peer is not its parent.
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return r.wrong("socketpair failed");
    const std::string self = self_path();
    // Everything the intermediate needs is prepared before the fork (it may
    // only make async-signal-safe calls: this process has threads).
    pid_t mid = ::fork();
    if (mid == 0) {
        const long mid_pid = ::syscall(SYS_getpid);
        char marker[64];
        std::snprintf(marker, sizeof marker, "--mpservice-child=10:%ld", mid_pid);
        const char* argv[] = {self.c_str(), marker, nullptr};
        pid_t t = ::vfork();  // no fork handlers run in this copy of a threaded process
        if (t == 0) {
            ::dup2(sv[1], 10);
            ::execv(self.c_str(), const_cast<char* const*>(argv));
            ::_exit(127);
        }
        ::close(sv[0]);
        ::close(sv[1]);
        int status = 0;
        ::waitpid(t, &status, 0);
        ::_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 200);
    }
    ::close(sv[1]);
    send_all(sv[0], forged_boot());
    ::shutdown(sv[0], SHUT_WR);
    std::string answer = read_until_eof(sv[0], milliseconds(5000));
    int code = wait_exit(mid, milliseconds(5000));
    ::close(sv[0]);
    if (code == 200) return r.wrong("the would-be child died of a signal");
    judge_forgery(r, answer, code, "channel made by a grandparent");
});

// ---------------------------------------------------------------- issue 8 #11: a bool from any byte

struct WithBool {
    std::int32_t a;
    bool b;
};

ROW("decode: bool in a struct from byte 0xff", Ending::none, [](Round& r) {
    std::string t = mp::encode(WithBool{1, true}), f = mp::encode(WithBool{1, false});
    std::size_t at = std::string::npos;
    for (std::size_t i = 0; i < t.size() && i < f.size(); ++i)
        if (t[i] != f[i]) at = i;
    if (at == std::string::npos || t.size() != f.size()) return r.wrong("cannot find the bool's byte");
    t[at] = static_cast<char>(0xff);
    try {
        WithBool v = mp::decode<WithBool>(t);
        unsigned char raw;
        std::memcpy(&raw, &v.b, 1);
        r.wrong("decoded a bool whose byte is " + std::to_string(raw) + " (undefined behaviour on use)");
    } catch (const mp::DecodeError&) {
    }
});

}  // namespace
}  // namespace stress
