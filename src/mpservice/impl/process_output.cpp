// process_output: a child's standard output and error forwarded through the
// parent's log path (Process::set_forward_output, set_output_forwarding).
//
// The parent makes two pipes per forwarding child.  The child's descriptors 1
// and 2 become their write ends (a spawn or fork-server child receives them
// with BOOT, a forked child dup2s them right after fork), so the programs the
// child execs write into them too.  The parent's reactor thread reads the read
// ends - they sit in one epoll set of their own, which the reactor's poller
// watches - splits the bytes into lines and hands each line to
// handle_log_record as a record of logger "stdout" or "stderr" carrying the
// child's name and pid.  One pipe per child and stream: lines of different
// children cannot mix, and a line becomes a record only once its '\n' has
// arrived (or its stream has ended); a '\r' before the '\n' is dropped.
//
// Nothing is lost at exit: when the child has ended, the reactor reads both
// pipes dry before it resolves the Process (everything the child wrote is in
// them by then), so join() returns after its lines were handled.  The read
// ends stay watched until every writer is gone - a grandchild that inherited
// descriptor 1 may write after the child has ended; its lines carry the
// child's name - and are closed at end of stream.

#include <atomic>
#include <map>
#include <mutex>

namespace mpservice {

namespace {
std::atomic<bool> g_output_forwarding{false};
}  // namespace

void set_output_forwarding(bool forward) noexcept { g_output_forwarding.store(forward, std::memory_order_relaxed); }
bool output_forwarding() noexcept { return g_output_forwarding.load(std::memory_order_relaxed); }

namespace detail {
namespace {

/// The parent's readers of forwarded output (owned by the reactor).
class OutputPump {
public:
    /// A line longer than this is passed on in pieces of this size.
    static constexpr std::size_t max_line = std::size_t(1) << 20;

    OutputPump() : poller_(os::poller_create()), buf_(1 << 16) {}
    OutputPump(const OutputPump&) = delete;
    OutputPump& operator=(const OutputPump&) = delete;
    /// Readable when a pipe has data (the reactor's poller watches it).
    os::handle_t poller() const noexcept { return poller_; }

    /// Takes the read ends of a child about to start (not read until arm);
    /// `key` names the child for drain_for.
    std::uint64_t open(const void* key, const std::string& name, os::handle_t out_read, os::handle_t err_read) {
        std::lock_guard<std::mutex> lk(mutex_);
        std::uint64_t id = next_id_++;
        Entry& e = entries_[id];
        e.key = key;
        e.name = name;
        e.streams[0].fd = out_read;
        e.streams[1].fd = err_read;
        return id;
    }
    /// The child runs as `pid` and the parent has closed its write ends:
    /// start reading the pipes.
    void arm(std::uint64_t id, long pid) {
        std::vector<Line> lines;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            auto it = entries_.find(id);
            if (it == entries_.end()) return;
            Entry& e = it->second;
            if (!e.pid) e.pid = pid;
            if (!e.key) {
                // The child has ended already (drain_for ran before this): its
                // pipes end now unless a grandchild holds them; close them here
                // rather than later on the reactor thread.
                for (int s = 0; s < 2; ++s) read_stream(e, s, lines);
                if (e.streams[0].eof && e.streams[1].eof) {
                    entries_.erase(it);
                    it = entries_.end();
                }
            }
            if (it != entries_.end()) {
                for (int s = 0; s < 2; ++s)
                    if (!e.streams[s].eof) os::poller_add(poller_, e.streams[s].fd, id << 1 | static_cast<unsigned>(s));
                e.armed = true;
            }
        }
        emit(lines);
    }
    /// The start failed: close the read ends, forget the child.
    void cancel(std::uint64_t id) noexcept {
        std::lock_guard<std::mutex> lk(mutex_);
        auto it = entries_.find(id);
        if (it == entries_.end()) return;
        close_entry(it->second);
        entries_.erase(it);
    }

    /// On the reactor thread, when the child `key` has ended: hands on every
    /// line it wrote (they are all in the pipes now).  Later writes (a
    /// grandchild's) still come through on_ready.
    void drain_for(const void* key, long pid) {
        std::vector<Line> lines;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            for (auto it = entries_.begin(); it != entries_.end(); ++it) {
                Entry& e = it->second;
                if (e.key != key) continue;
                if (!e.pid) e.pid = pid;
                for (int s = 0; s < 2; ++s) {
                    read_stream(e, s, lines);
                    // The child has ended: a last line without '\n' is complete too.
                    Stream& st = e.streams[s];
                    if (!st.partial.empty()) lines.push_back(Line{s, std::move(st.partial), e.name, e.pid});
                    st.partial.clear();
                }
                e.key = nullptr;
                if (e.streams[0].eof && e.streams[1].eof) entries_.erase(it);
                break;
            }
        }
        emit(lines);
    }

    /// On the reactor thread: some pipe is readable.
    void on_ready() {
        std::uint64_t tokens[64];
        int n = os::poller_wait(poller_, tokens, 64, 0);
        std::vector<Line> lines;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            for (int i = 0; i < n; ++i) {
                std::uint64_t id = tokens[i] >> 1;
                auto it = entries_.find(id);
                if (it == entries_.end()) continue;
                Entry& e = it->second;
                read_stream(e, static_cast<int>(tokens[i] & 1), lines);
                // Ended on both streams, and the child's own end was seen (or
                // it will not be: drain_for finds no entry and has nothing to do).
                if (e.streams[0].eof && e.streams[1].eof && !e.key) entries_.erase(it);
            }
        }
        emit(lines);
    }

private:
    struct Stream {
        os::handle_t fd = os::invalid_handle;
        std::string partial;       // bytes after the last '\n'
        bool eof = false;
    };
    struct Entry {
        const void* key = nullptr;  // the child's core until it has ended
        std::string name;
        long pid = 0;
        bool armed = false;
        Stream streams[2];  // stdout, stderr
    };
    struct Line {
        int stream;
        std::string text;
        std::string name;
        long pid;
    };

    void close_entry(Entry& e) noexcept {
        for (auto& s : e.streams) {
            if (e.armed && !s.eof) os::poller_remove(poller_, s.fd);
            os::close_handle(s.fd);
            s.fd = os::invalid_handle;
            s.eof = true;
        }
    }

    /// Reads stream `which` of `e` dry, appending its complete lines to `out`.
    void read_stream(Entry& e, int which, std::vector<Line>& out) {
        Stream& s = e.streams[which];
        while (!s.eof) {
            long n = os::pipe_read(s.fd, buf_.data(), buf_.size());
            if (n < 0) return;  // nothing more now
            if (n == 0) {
                s.eof = true;
                if (!s.partial.empty()) out.push_back(Line{which, std::move(s.partial), e.name, e.pid});
                s.partial.clear();
                if (e.armed) os::poller_remove(poller_, s.fd);
                os::close_handle(s.fd);
                s.fd = os::invalid_handle;
                return;
            }
            split_lines(e, which, buf_.data(), static_cast<std::size_t>(n), out);
        }
    }

    static void split_lines(Entry& e, int which, const char* data, std::size_t n, std::vector<Line>& out) {
        std::string& partial = e.streams[which].partial;
        std::size_t start = 0;
        for (std::size_t i = 0; i < n; ++i) {
            if (data[i] != '\n') continue;
            std::string text = std::move(partial);
            partial.clear();
            text.append(data + start, i - start);
            // "\r\n" ends a line too (as Python's universal newlines read it):
            // Windows programs a child runs (cmd's echo) write it.
            if (!text.empty() && text.back() == '\r') text.pop_back();
            out.push_back(Line{which, std::move(text), e.name, e.pid});
            start = i + 1;
        }
        partial.append(data + start, n - start);
        while (partial.size() >= max_line) {
            out.push_back(Line{which, partial.substr(0, max_line), e.name, e.pid});
            partial.erase(0, max_line);
        }
    }

    /// Hands lines on as records (outside the lock: a handler may start processes).
    static void emit(std::vector<Line>& lines) {
        for (Line& l : lines) {
            LogRecord r;
            r.level = l.stream == 0 ? Level::info : Level::warning;
            r.logger = l.stream == 0 ? "stdout" : "stderr";
            r.message = std::move(l.text);
            r.time = std::chrono::system_clock::now();
            r.pid = l.pid;
            r.process_name = std::move(l.name);
            try {
                handle_log_record(r);
            } catch (...) {
                // A failing handler must not cost the other lines or the child's outcome.
            }
        }
    }

    os::handle_t poller_;
    std::vector<char> buf_;  // read into under mutex_
    std::mutex mutex_;
    std::uint64_t next_id_ = 1;
    std::map<std::uint64_t, Entry> entries_;
};

/// The output pipes of one start(): made before the child, given to it, and
/// handed to the pump once the child has them.  Destroyed uncommitted (the
/// start failed), it closes everything.
class OutputCapture {
public:
    OutputCapture(OutputPump& pump, const ProcessCore& core, bool forward) : pump_(pump) {
        if (!forward) return;
        try {
            os::output_pipe(read_[0], write_[0]);
            os::output_pipe(read_[1], write_[1]);
        } catch (...) {
            close_all_ends();
            throw;
        }
        try {
            id_ = pump_.open(&core, core.name, read_[0], read_[1]);  // the pump owns the read ends now
        } catch (...) {
            close_all_ends();
            throw;
        }
    }
    ~OutputCapture() {
        if (!id_) return;
        for (auto& w : write_) os::close_handle(w);
        if (!committed_) pump_.cancel(id_);
    }
    OutputCapture(const OutputCapture&) = delete;
    OutputCapture& operator=(const OutputCapture&) = delete;

    /// BOOT's part: whether output is forwarded, and the two write ends.
    void encode(Encoder& e) const {
        e.write(id_ != 0);
        if (id_) e(e.attach(write_[0]), e.attach(write_[1]));
    }
    /// In a forked child, right after fork: descriptors 1 and 2 become the pipes.
    void redirect_in_forked_child() noexcept {
        if (!id_) return;
        try {
            os::redirect_standard_output(write_[0], write_[1]);
        } catch (...) {
            os::exit_now(1);  // cannot happen short of a descriptor table in ruins
        }
        for (int s = 0; s < 2; ++s) {
            os::close_handle(write_[s]);
            os::close_handle(read_[s]);  // the parent's
        }
    }
    /// The child holds the write ends (inherited, or sent with BOOT): close
    /// ours, so the pipes end when the child's writers do; start reading.
    void commit(long pid) {
        if (!id_) return;
        for (auto& w : write_) {
            os::close_handle(w);
            w = os::invalid_handle;
        }
        committed_ = true;
        pump_.arm(id_, pid);
    }

private:
    void close_all_ends() noexcept {
        for (int s = 0; s < 2; ++s) {
            os::close_handle(read_[s]);
            os::close_handle(write_[s]);
            read_[s] = write_[s] = os::invalid_handle;
        }
    }
    OutputPump& pump_;
    std::uint64_t id_ = 0;
    os::handle_t read_[2] = {os::invalid_handle, os::invalid_handle};
    os::handle_t write_[2] = {os::invalid_handle, os::invalid_handle};
    bool committed_ = false;
};

}  // namespace

// The handles belong to BOOT (closed with it).
void adopt_forwarded_output(Decoder& d) {
    bool forward = d.read<bool>();
    if (!forward) return;
    std::uint32_t out = 0, err = 0;
    d(out, err);
    os::redirect_standard_output(d.handle(out), d.handle(err));
}

}  // namespace detail
}  // namespace mpservice
