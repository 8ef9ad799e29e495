// Rows: security (issue 13 item 5).  As root, each round creates a throwaway
// unprivileged user (useradd), probes as that user, and removes it (userdel).
// Not root: the rows are skipped, and the table says so.
#include "harness.hpp"
#include "probe.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

namespace stress {
namespace {

class ThrowawayUser {
public:
    ThrowawayUser() : name_("mpstress" + std::to_string(::getpid())) {
        std::string cmd = "useradd --system --no-create-home --shell /usr/sbin/nologin " + name_ + " >/dev/null 2>&1";
        if (std::system(cmd.c_str()) != 0) return;
        if (passwd* pw = ::getpwnam(name_.c_str())) {
            uid_ = pw->pw_uid;
            gid_ = pw->pw_gid;
            made_ = true;
        }
    }
    ~ThrowawayUser() {
        std::string cmd = "userdel " + name_ + " >/dev/null 2>&1";
        if (made_ && std::system(cmd.c_str()) != 0) std::fprintf(stderr, "stress: userdel %s failed\n", name_.c_str());
    }
    explicit operator bool() const { return made_; }
    /// In a forked child: become the user (single-threaded there, so plain syscalls).
    bool become() const {
        return ::syscall(SYS_setgroups, 0, nullptr) == 0 && ::syscall(SYS_setgid, gid_) == 0 &&
               ::syscall(SYS_setuid, uid_) == 0;
    }

private:
    std::string name_;
    uid_t uid_ = 0;
    gid_t gid_ = 0;
    bool made_ = false;
};

/// Runs `probe` in a forked child as `user`; returns its exit code (or -signal, -1000 on hang).
template <class Probe>
int as_user(const ThrowawayUser& user, Probe probe) {
    pid_t pid = ::fork();
    if (pid == 0) {
        if (!user.become()) ::_exit(250);
        ::_exit(probe());
    }
    return wait_exit(pid, milliseconds(8000));
}

std::vector<long> children_of(long pid) {
    std::vector<long> out;
    DIR* d = ::opendir("/proc");
    if (!d) return out;
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        std::ifstream in(std::string("/proc/") + e->d_name + "/stat");
        std::string stat;
        std::getline(in, stat);
        auto close = stat.rfind(')');
        if (close != std::string::npos && close + 4 < stat.size() && std::atol(stat.c_str() + close + 4) == pid)
            out.push_back(std::atol(e->d_name));
    }
    ::closedir(d);
    return out;
}

/// /proc/PID/fd/N paths of `pid` whose link contains `what`.
std::vector<std::string> fds_matching(long pid, const std::string& what, std::vector<std::string>* links = nullptr) {
    std::vector<std::string> out;
    std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    if (DIR* d = ::opendir(dir.c_str())) {
        while (dirent* e = ::readdir(d)) {
            if (e->d_name[0] == '.') continue;
            std::string path = dir + "/" + e->d_name;
            char link[512];
            ssize_t n = ::readlink(path.c_str(), link, sizeof link - 1);
            if (n <= 0) continue;
            std::string l(link, static_cast<std::size_t>(n));
            if (l.find(what) != std::string::npos) {
                out.push_back(path);
                if (links) links->push_back(l);
            }
        }
        ::closedir(d);
    }
    return out;
}

int blocked_holder(mp::Lock, mp::Queue<int>, mp::Value<long> v, mp::Event go) {
    v.set(1);
    go.wait(std::chrono::seconds(30));
    return 0;
}

/// The processes of this round: this one, its children (the fork server, the holder).
std::vector<long> our_processes() {
    std::vector<long> pids{static_cast<long>(::getpid())};
    for (long c : children_of(::getpid())) pids.push_back(c);
    return pids;
}

ROW("security: shared memory, another user", Ending::none, [](Round& r) {
    ThrowawayUser user;
    if (!user) return r.skip("useradd failed");
    mp::Lock l;
    mp::Queue<int> q;
    mp::Value<long> v(0);
    mp::Event go;
    mp::Process p(r.context(), blocked_holder, l, q, v, go);
    p.start();
    if (!await([&] { return v.get() == 1; })) return r.hang("the holder never started");
    std::vector<std::string> paths;
    for (long pid : our_processes())
        for (auto& path : fds_matching(pid, "memfd:mpservice")) paths.push_back(path);
    go.set();
    if (paths.empty()) return r.wrong("found no shared-memory descriptor to probe");
    // Sanity: the owner can open them this way, so the probe is meaningful.
    int mine = ::open(paths[0].c_str(), O_RDONLY | O_CLOEXEC);
    if (mine < 0) return r.wrong("even the owner cannot open " + paths[0]);
    ::close(mine);
    int opened = as_user(user, [&] {
        int n = 0;
        for (auto& path : paths) {
            int fd = ::open(path.c_str(), O_RDONLY);
            if (fd >= 0) ++n;
        }
        return n;
    });
    if (opened == 250) return r.skip("could not become the throwaway user");
    if (opened != 0)
        r.wrong("another user opened " + std::to_string(opened) + " of " + std::to_string(paths.size()) +
                " shared-memory descriptors");
    check_ending(r, p, Ending::ret, 0, "the holder");
}, Setup::none, 20, true);

int sleeper(mp::Event go) {
    go.wait(std::chrono::seconds(30));
    return 0;
}

ROW("security: sockets and processes, another user", Ending::none, [](Round& r) {
    ThrowawayUser user;
    if (!user) return r.skip("useradd failed");
    mp::Event go;
    mp::Process p(r.context(), sleeper, go);
    p.start();
    // Socket inodes of our processes, and which of them have a name.
    std::set<std::string> inodes;
    const auto pids = our_processes();
    for (long pid : pids) {
        std::vector<std::string> links;
        fds_matching(pid, "socket:[", &links);
        for (auto& l : links) inodes.insert(l.substr(8, l.size() - 9));
    }
    std::vector<std::string> names;
    std::ifstream unix_sockets("/proc/net/unix");
    std::string line;
    std::getline(unix_sockets, line);
    while (std::getline(unix_sockets, line)) {
        std::istringstream in(line);
        std::string num, refs, proto, flags, type, st, inode, path;
        in >> num >> refs >> proto >> flags >> type >> st >> inode >> path;
        if (inodes.count(inode) && !path.empty()) names.push_back(path);
    }
    int reached = as_user(user, [&] {
        int n = 0;
        for (auto& name : names) {
            int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
            sockaddr_un a{};
            a.sun_family = AF_UNIX;
            std::size_t len = std::min(name.size(), sizeof a.sun_path - 1);
            std::memcpy(a.sun_path, name.data(), len);
            if (name[0] == '@') a.sun_path[0] = '\0';  // abstract
            if (::connect(s, reinterpret_cast<sockaddr*>(&a), static_cast<socklen_t>(sizeof a.sun_family + len)) == 0)
                ++n;
            ::close(s);
        }
        for (long pid : pids)  // signal or trace our processes: refused
            if (::kill(static_cast<pid_t>(pid), 0) == 0) n += 10;
        return n;
    });
    go.set();
    if (reached == 250) return r.skip("could not become the throwaway user");
    if (reached % 10) r.wrong(std::to_string(reached % 10) + " named socket(s) of ours accepted another user");
    if (reached >= 10) r.wrong("another user may signal our processes");
    check_ending(r, p, Ending::ret, 0, "the sleeper");
}, Setup::none, 20, true);

// ---------------------------------------------------------------- a setuid copy (issue 8 #10)

ROW("security: setuid copy refuses child mode", Ending::none, [](Round& r) {
    ThrowawayUser user;
    if (!user) return r.skip("useradd failed");
    char dir_template[] = "/var/tmp/mpstress.XXXXXX";
    if (!::mkdtemp(dir_template)) return r.wrong("mkdtemp failed");
    const std::string dir = dir_template, copy = dir + "/setuid-copy";
    ::chmod(dir.c_str(), 0755);
    {
        std::ifstream in(self_path(), std::ios::binary);
        std::ofstream out(copy, std::ios::binary);
        out << in.rdbuf();
    }
    ::chmod(copy.c_str(), 04755);
    char marker[64];
    std::string boot;
    {
        // The frame a forger would send (see rows_input.cpp): any answer = child mode.
        std::uint32_t h[4] = {1, 0, 8, 0};
        std::uint32_t payload[2] = {1, 0xdeadbeef};
        boot.assign(reinterpret_cast<const char*>(h), sizeof h);
        boot.append(reinterpret_cast<const char*>(payload), sizeof payload);
    }
    const char* copy_c = copy.c_str();
    int code = as_user(user, [&] {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 30;
        std::snprintf(marker, sizeof marker, "--mpservice-child=10:%ld", static_cast<long>(::syscall(SYS_getpid)));
        const char* argv[] = {copy_c, marker, nullptr};
        pid_t t = ::vfork();
        if (t == 0) {
            ::dup2(sv[1], 10);
            ::execv(copy_c, const_cast<char* const*>(argv));
            ::_exit(127);
        }
        ::close(sv[1]);
        if (::send(sv[0], boot.data(), boot.size(), MSG_NOSIGNAL) < 0) {
        }
        ::shutdown(sv[0], SHUT_WR);
        pollfd pf{sv[0], POLLIN, 0};
        char buf[256];
        bool answered = ::poll(&pf, 1, 5000) > 0 && ::read(sv[0], buf, sizeof buf) > 0;
        int status = 0;
        ::waitpid(t, &status, 0);
        if (answered) return 1;
        if (!WIFEXITED(status)) return 3;
        if (WEXITSTATUS(status) == main_ran_code) return 2;
        if (WEXITSTATUS(status) == 0) return 4;
        if (WEXITSTATUS(status) == 127) return 5;
        return 0;
    });
    ::unlink(copy.c_str());
    ::rmdir(dir.c_str());
    switch (code) {
        case 0: break;
        case 1: r.wrong("a setuid copy run by another user entered child mode"); break;
        case 2: r.wrong("a setuid copy given a child marker ran main()"); break;
        case 3: r.wrong("the setuid copy died of a signal"); break;
        case 4: r.wrong("the setuid copy exited 0"); break;
        case 5: r.skip("the copy could not be executed by the other user"); break;
        case 250: r.skip("could not become the throwaway user"); break;
        case -1000: r.hang("the setuid probe did not finish"); break;
        default: r.wrong("the setuid probe failed (" + std::to_string(code) + ")"); break;
    }
}, Setup::none, 20, true);

}  // namespace
}  // namespace stress
