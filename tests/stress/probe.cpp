// probe: see probe.hpp.
#include "probe.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

namespace stress {

std::string self_path() {
    char buf[4096];
    ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

pid_t exec_with_fd(const std::string& path, const std::vector<std::string>& args, int fd, int as_fd) {
    std::vector<const char*> argv;
    argv.push_back(path.c_str());
    for (auto& a : args) argv.push_back(a.c_str());
    argv.push_back(nullptr);
    pid_t pid = ::fork();
    if (pid == 0) {
        if (fd >= 0) {
            if (fd == as_fd)
                ::fcntl(fd, F_SETFD, 0);
            else
                ::dup2(fd, as_fd);  // the copy is not close-on-exec
        }
        ::execv(path.c_str(), const_cast<char* const*>(argv.data()));
        ::_exit(127);
    }
    return pid;
}

int wait_exit(pid_t pid, std::chrono::milliseconds limit) {
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd >= 0) {
        pollfd p{pidfd, POLLIN, 0};
        int r;
        do r = ::poll(&p, 1, static_cast<int>(limit.count()));
        while (r < 0 && errno == EINTR);
        ::close(pidfd);
        if (r == 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
            return -1000;
        }
    }
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid) return -2000;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return -3000;
}

std::string read_until_eof(int fd, std::chrono::milliseconds limit) {
    std::string out;
    auto until = std::chrono::steady_clock::now() + limit;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
        if (left.count() <= 0) break;
        pollfd p{fd, POLLIN, 0};
        int r = ::poll(&p, 1, static_cast<int>(left.count()));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        char buf[4096];
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
}

std::string child_marker(int fd, long parent_pid) {
    return "--mpservice-child=" + std::to_string(fd) + ":" + std::to_string(parent_pid);
}

}  // namespace stress
