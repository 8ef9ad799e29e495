// server_client: the client side's links to servers (one per server per
// process: the server's own, in the server process, and over sockets), the
// per-thread connections with their slots, and the registry of links.  What
// uses the links - references, ServerProcess - is in server_process.cpp.

namespace mpservice {
namespace detail {
namespace server {

// ---------------------------------------------------------------- links

SharedMemory read_block(Decoder& d) {
    auto size = d.read<std::uint64_t>();
    auto index = d.read<std::uint32_t>();
    SharedMemory m = SharedMemory::adopt(os::duplicate_handle(d.handle(index)));
    if (m.size() != size) throw ServerError("mpservice: the memory block's size does not match");
    return m;
}

[[noreturn]] void throw_reply_error(const std::string& payload) {
    Decoder d(payload);
    std::exception_ptr e = decode_exception(d);
    detail::rethrow_exception(e);
}

RefPtr Link::make_ref(std::uint64_t id, std::uint64_t type) {
    std::lock_guard<std::mutex> lk(refs_mutex_);
    auto r = std::make_shared<Ref>();
    r->link = shared_from_this();
    r->id = id;
    r->type = type;
    refs_[id] = r;
    return r;
}

RefPtr Link::existing(std::uint64_t id) {
    std::lock_guard<std::mutex> lk(refs_mutex_);
    auto it = refs_.find(id);
    return it == refs_.end() ? nullptr : it->second.lock();
}

RefPtr Link::adopt(std::uint64_t id, std::uint64_t ticket, std::uint64_t type) {
    if (RefPtr r = existing(id)) {
        post(op_drop_ticket, bytes_of(ticket));
        return r;
    }
    Encoder e;
    e(ticket, id);
    std::vector<os::handle_t> hs;
    std::string reply = request(op_adopt, e.bytes(), {}, hs);
    HandleCloser closer{hs};
    std::lock_guard<std::mutex> lk(refs_mutex_);
    auto it = refs_.find(id);
    if (it != refs_.end())
        if (RefPtr r = it->second.lock()) {  // another thread decoded it meanwhile
            post(op_decref, decref_bytes(id));
            return r;
        }
    auto r = std::make_shared<Ref>();
    r->link = shared_from_this();
    r->id = id;
    r->type = type;
    Decoder d(reply.data(), reply.size(), &hs);
    if (!d.at_end()) r->mapping = read_block(d);
    refs_[id] = r;
    return r;
}

void Link::release(std::uint64_t id) noexcept {
    try {
        {
            std::lock_guard<std::mutex> lk(refs_mutex_);
            auto it = refs_.find(id);
            if (it != refs_.end() && it->second.expired()) refs_.erase(it);
        }
        post(op_decref, decref_bytes(id));
    } catch (...) {
    }
}

std::vector<std::uint64_t> Link::live_ids() {
    std::vector<std::uint64_t> ids;
    std::lock_guard<std::mutex> lk(refs_mutex_);
    for (auto& r : refs_)
        if (!r.second.expired()) ids.push_back(r.first);
    return ids;
}

// ---------------------------------------------------------------- links over sockets

/// This process's id without a system call per request (glibc no longer
/// caches getpid); forgotten in a forked child, which must notice that it is
/// not its parent.
std::atomic<long> g_cached_pid{0};
void forget_cached_pid() { g_cached_pid.store(0, std::memory_order_relaxed); }
long cached_pid() {
    long p = g_cached_pid.load(std::memory_order_relaxed);
    if (p != 0) return p;
    static const bool hooked = [] {
        os::at_fork_child(&forget_cached_pid);
        return true;
    }();
    (void)hooked;
    p = os::current_pid();
    g_cached_pid.store(p, std::memory_order_relaxed);
    return p;
}

std::atomic<bool>& fast_path_enabled() {
    static std::atomic<bool> on{true};
    return on;
}
void set_fast_path(bool enabled) noexcept { fast_path_enabled().store(enabled); }

/// A thread's connection to one server.
struct ThreadConn {
    std::weak_ptr<Link> link;  // entries of links gone are pruned
    os::handle_t fd = os::invalid_handle;
    long pid = 0;  // the process that made it (a forked child must not use its parent's)
    wire::FrameReader reader;
    SharedMemory slot;
    std::uint32_t seq = 0;
    std::atomic<std::uint32_t> spin_ns{0};  // how long to wait, awake, for a reply
    // Resynchronization (server_wire.cpp, slow_call_ns): the next call asks
    // for one; the call after a resync tells whether it met; slow calls still
    // to wait before the next attempt; that wait after a miss.
    bool resync_next = false, resync_check = false;
    std::uint32_t resync_wait = 0, resync_backoff = 1;
    bool slot_refused = false;
    std::mutex close_mutex;
    /// Closes the connection; by its thread at exit, or by its link when the
    /// link goes first (no request can be running on it then).
    void close() noexcept {
        std::lock_guard<std::mutex> lk(close_mutex);
        os::close_handle(fd);
        fd = os::invalid_handle;
        slot = SharedMemory();
    }
    ~ThreadConn() { close(); }
};

void forget_link(const std::string& address, const Link* link) noexcept;  // below

class RemoteLink final : public Link {
public:
    using Link::request;
    RemoteLink() : serial_(next_serial().fetch_add(1)) {}
    ~RemoteLink() override {
        os::close_handle(main_);
        // Other threads' connections to this server: closed now, not at their exit.
        std::lock_guard<std::mutex> lk(conns_mutex_);
        for (auto& w : conns_)
            if (auto c = w.lock()) c->close();
    }

    /// Connects the process's main connection (opens the session).
    void open() {
        std::lock_guard<std::mutex> lk(main_mutex_);
        open_locked();
    }

    std::string request(std::uint32_t op, const std::string& payload, const std::vector<os::handle_t>& handles,
                        std::vector<os::handle_t>& reply_handles) override {
        ensure_this_process();
        check_alive();
        ThreadConn& c = conn();
        if (c.slot && handles.empty() && payload.size() <= slot_capacity) return slot_call(c, op, payload, reply_handles);
        if (!send_frame(c.fd, op, payload, handles)) gone(c);
        if (c.slot) ring(slot_header(c.slot.data()));  // a server thread asleep on the slot looks at the socket
        return await_socket_reply(c, reply_handles);
    }

    void post(std::uint32_t op, const std::string& payload) noexcept override {
        try {
            ensure_this_process();
            std::lock_guard<std::mutex> lk(main_mutex_);
            if (main_ == os::invalid_handle || dead_.load()) return;
            send_frame(main_, op, payload);
        } catch (...) {
        }
    }

    void send_ordered(std::uint32_t op, const std::string& payload) override {
        ensure_this_process();
        check_alive();
        std::lock_guard<std::mutex> lk(main_mutex_);
        if (main_ == os::invalid_handle || !send_frame(main_, op, payload)) {
            dead_.store(true);
            throw ServerError("mpservice: the " + describe() + " is gone; the request did not complete");
        }
    }

    std::string ordered_request(std::uint32_t op, const std::string& payload) override {
        ensure_this_process();
        check_alive();
        std::lock_guard<std::mutex> lk(main_mutex_);
        if (!send_frame(main_, op, payload)) {
            dead_.store(true);
            throw ServerError("mpservice: the " + describe() + " is gone; the request did not complete");
        }
        wire::Frame f;
        if (!read_frame_while_server_lives(main_reader_, main_, f)) {
            dead_.store(true);
            throw ServerError("mpservice: the " + describe() + " is gone; the request did not complete");
        }
        wire::close_all(f.handles);
        if (f.kind == reply_error) throw_reply_error(f.payload);
        return std::move(f.payload);
    }

    void mark_gone(const std::string& why) noexcept override {
        try {
            std::lock_guard<std::mutex> lk(why_mutex_);
            why_ = why;
        } catch (...) {
        }
        dead_.store(true);
        forget_link(address, this);  // the caller holds the link: it is not destroyed here
    }

private:
    static std::atomic<std::uint64_t>& next_serial() {
        static std::atomic<std::uint64_t> n{1};
        return n;
    }

    [[noreturn]] void throw_gone() {
        std::string why;
        {
            std::lock_guard<std::mutex> lk(why_mutex_);
            why = why_;
        }
        throw ServerError("mpservice: the " + describe() + " is gone" + (why.empty() ? std::string() : " (" + why + ")") +
                          "; the request did not complete");
    }
    void check_alive() {
        if (dead_.load()) throw_gone();
    }
    bool server_exited() const { return server_pid > 0 && !os::process_running(server_pid); }

    /// Reads the next frame from the server on `fd`; false when the stream
    /// ended or the server process is gone.  It waits in slices, and between
    /// them asks whether the server process is still there: its death closes
    /// its end of a socket only when no other process holds a copy (a process
    /// it forked inherits every descriptor, its listener too, which then
    /// queues new connections that no one accepts), and under Wine a killed
    /// server's socket was seen never to report its end.
    bool read_frame_while_server_lives(wire::FrameReader& reader, os::handle_t fd, wire::Frame& f) {
        const int slice_ms = static_cast<int>(client_check.count());
        while (!reader.next(f)) {
            if (os::wait_io(fd, os::io_readable, slice_ms) == 0) {
                if (server_exited()) return false;
                continue;
            }
            if (reader.fill(fd, true) == 0) return false;  // the end of the stream
        }
        return true;
    }
    [[noreturn]] void gone(ThreadConn& c) {
        (void)c;
        mark_gone("it exited or was killed");
        throw_gone();
    }

    /// Opens a connection and says HELLO; the server's refusal is thrown.
    os::handle_t connect_and_hello(bool main) {
        os::handle_t fd;
        try {
            fd = os::unix_connect(address);
        } catch (const std::system_error& e) {
            mark_gone(std::string("cannot connect: ") + e.what());
            throw_gone();
        }
        Encoder e;
        e(server_protocol, authkey, session_, static_cast<std::int64_t>(os::current_pid()), fingerprint_of(""), main);
        wire::FrameReader reader;
        wire::Frame f;
        if (!send_frame(fd, op_hello, e.bytes()) || !read_frame_while_server_lives(reader, fd, f)) {
            os::close_handle(fd);
            mark_gone("it closed the connection");
            throw_gone();
        }
        wire::close_all(f.handles);
        if (f.kind != reply_ok) {
            os::close_handle(fd);
            if (f.kind == reply_error) throw_reply_error(f.payload);
            throw ServerError("mpservice: the " + describe() + " answered HELLO with garbage");
        }
        return fd;
    }

    void open_locked() {
        unsigned char token[16];
        os::random_bytes(token, sizeof token);
        session_.assign(reinterpret_cast<const char*>(token), sizeof token);
        pid_ = cached_pid();
        main_ = connect_and_hello(true);
    }

    /// In a forked child: the inherited connections are the parent's.  Open a
    /// session of our own and take a reference for each proxy we inherited.
    void ensure_this_process() {
        if (pid_.load() == cached_pid()) return;
        std::vector<std::uint64_t> ids;
        {
            std::lock_guard<std::mutex> lk(main_mutex_);
            if (pid_.load() == cached_pid()) return;
            os::close_handle(main_);  // our copy only; the parent's connection stays
            main_ = os::invalid_handle;
            dead_.store(false);
            open_locked();
        }
        for (auto id : live_ids()) {
            try {
                Encoder e;
                e.write(id);
                request(op_incref, e.bytes());
            } catch (...) {
            }
        }
    }

    /// This thread's connections, by link serial: closed when the thread ends.
    struct ThreadConns {
        std::unordered_map<std::uint64_t, std::shared_ptr<ThreadConn>> by_serial;
    };
    ThreadConn& conn() {
        auto& conns = os::thread_object<ThreadConns>().by_serial;
        auto& c = conns[serial_];
        long me = cached_pid();
        if (c && c->pid != me) {
            c->slot = SharedMemory();  // the parent's slot: never touched again here
            c.reset();
        }
        if (!c) {
            // A new connection: first drop this thread's connections to links that are gone.
            for (auto it = conns.begin(); it != conns.end();)
                if (it->second && it->second->link.expired() && it->first != serial_)
                    it = conns.erase(it);
                else
                    ++it;
            auto fresh = std::make_shared<ThreadConn>();
            fresh->link = weak_from_this();
            fresh->pid = me;
            fresh->fd = connect_and_hello(false);
            {
                std::lock_guard<std::mutex> lk(conns_mutex_);
                conns_.erase(std::remove_if(conns_.begin(), conns_.end(),
                                            [](const std::weak_ptr<ThreadConn>& w) { return w.expired(); }),
                             conns_.end());
                conns_.push_back(fresh);
            }
            c = std::move(fresh);
            offer_slot(*c);
        }
        return *c;
    }

    void offer_slot(ThreadConn& c) {
        if (!fast_path_enabled().load(std::memory_order_relaxed)) return;
        try {
            SharedMemory m = SharedMemory::create(slot_bytes);
            new (m.data()) SlotHeader();
            if (!send_frame(c.fd, op_slot, std::string(), {m.handle()})) gone(c);
            std::vector<os::handle_t> hs;
            await_socket_reply(c, hs);
            wire::close_all(hs);
            c.slot = m;
        } catch (const ServerError&) {
            throw;
        } catch (...) {
            c.slot_refused = true;  // the socket alone still works
        }
    }

    /// The next reply frame on the socket (wake-ups skipped).
    std::string await_socket_reply(ThreadConn& c, std::vector<os::handle_t>& reply_handles) {
        wire::Frame f;
        for (;;) {
            if (!read_frame_while_server_lives(c.reader, c.fd, f)) gone(c);
            if (f.kind == op_wake) continue;
            break;
        }
        if (f.kind == reply_ok) {
            for (auto h : f.handles) reply_handles.push_back(h);
            return std::move(f.payload);
        }
        wire::close_all(f.handles);
        if (f.kind == reply_error) throw_reply_error(f.payload);
        throw ServerError("mpservice: the " + describe() + " sent a reply of unknown kind");
    }

    static void ring(SlotHeader* h) {
        h->doorbell.fetch_add(1, std::memory_order_seq_cst);
        if (h->server_sleeping.load(std::memory_order_seq_cst)) {
            slot_stats().woke_server.fetch_add(1, std::memory_order_relaxed);
            os::futex_wake(&h->doorbell, 1);
        }
    }

    std::string slot_call(ThreadConn& c, std::uint32_t op, const std::string& payload,
                          std::vector<os::handle_t>& reply_handles) {
        SlotHeader* h = slot_header(c.slot.data());
        SlotStats& stats = slot_stats();
        stats.calls.fetch_add(1, std::memory_order_relaxed);
        std::memcpy(slot_data(c.slot.data()), payload.data(), payload.size());
        h->request_op = op;
        h->request_size = static_cast<std::uint32_t>(payload.size());
        const bool resync = c.resync_next;
        c.resync_next = false;
        if (resync) {
            stats.resyncs.fetch_add(1, std::memory_order_relaxed);
            h->resync_ns.store(resync_ns, std::memory_order_relaxed);  // published by request_seq
        }
        const std::uint32_t seq = ++c.seq;
        h->request_seq.store(seq, std::memory_order_seq_cst);
        ring(h);
        auto answered = [&] { return h->reply_seq.load(std::memory_order_acquire) == seq; };
        const bool spun = resync ? spin_for(answered, std::chrono::nanoseconds(resync_ns)) : spin_until(answered, c.spin_ns);
        if (spun) {
            stats.spun.fetch_add(1, std::memory_order_relaxed);
            if (resync) c.spin_ns.store(spin_max_ns, std::memory_order_relaxed);  // and see the next call
            if (c.resync_check) {
                stats.resynced.fetch_add(1, std::memory_order_relaxed);
                c.resync_backoff = 1;
            }
        } else {
            // Asleep on the reply word, in slices: between them, the socket
            // tells whether the server is still there.
            const auto asleep = os::Clock::now();
            h->client_sleeping.store(1, std::memory_order_seq_cst);
            while (!answered()) {
                std::uint32_t now = h->reply_seq.load(std::memory_order_seq_cst);
                if (now != seq) os::futex_wait(&h->reply_seq, now, os::Clock::now() + client_check);
                if (answered()) break;
                long n = c.reader.fill(c.fd, true);  // a reply on the socket stays buffered for below
                // The socket's end is the usual sign of the server's death; the
                // process itself is the sure one (under Wine a killed server's
                // socket was seen never to report its end: the call slept on).
                if (n == 0 || server_exited()) {
                    h->client_sleeping.store(0, std::memory_order_relaxed);
                    if (answered()) break;  // it replied just before it went
                    gone(c);
                }
            }
            h->client_sleeping.store(0, std::memory_order_relaxed);
            stats.slept.fetch_add(1, std::memory_order_relaxed);
            if (os::Clock::now() - asleep > std::chrono::nanoseconds(slow_call_ns)) note_slow_call(c);
        }
        c.resync_check = resync;
        std::uint32_t kind = h->reply_kind;
        if (kind == 0) return await_socket_reply(c, reply_handles);  // written before reply_seq
        std::uint32_t size = h->reply_size;
        if (size > slot_capacity) throw ServerError("mpservice: garbled reply in the slot");
        std::string reply(slot_data(c.slot.data()), size);
        if (kind == reply_error) throw_reply_error(reply);
        return reply;
    }

    /// A call answered only after a long sleep: maybe the sleep-sleep pattern
    /// of two CPUs; try a resync now and then (exponential backoff on misses).
    static void note_slow_call(ThreadConn& c) {
        slot_stats().slow.fetch_add(1, std::memory_order_relaxed);
        if (c.resync_check) c.resync_backoff = std::min(c.resync_backoff * 2, resync_backoff_max);  // it missed
        if (c.resync_wait > 0) {
            --c.resync_wait;
            return;
        }
        c.resync_next = true;
        c.resync_wait = c.resync_backoff;
    }

    const std::uint64_t serial_;
    std::mutex conns_mutex_;
    std::vector<std::weak_ptr<ThreadConn>> conns_;  // every thread's connection to this server
    std::mutex main_mutex_;
    os::handle_t main_ = os::invalid_handle;
    wire::FrameReader main_reader_;
    std::string session_;
    std::atomic<long> pid_{0};
    std::atomic<bool> dead_{false};
    // Why the server is gone; its own lock, because opening the main
    // connection (under main_mutex_) marks the link gone when it fails.
    std::mutex why_mutex_;
    std::string why_;
};

// ---------------------------------------------------------------- the registry of links

struct Registry {
    std::mutex mutex;
    std::map<std::string, std::weak_ptr<Link>> links;
    /// Links kept open after their last proxy went, until their server is
    /// found gone or shut down: a process that receives proxies one at a time
    /// (from a Queue, say) would otherwise connect, say HELLO and hand over a
    /// slot for each.  An idle link costs two sockets and a 64 KiB slot.
    std::map<std::string, std::shared_ptr<Link>> kept;
    std::shared_ptr<Link> local;  // in a server process: its own
};
Registry& registry() {
    static Registry* r = new Registry;  // never destroyed: proxies may be released during exit
    return *r;
}


/// Set while this thread holds the registry's lock in link_for (a link that
/// fails to open marks itself gone, and must not take the lock again).
thread_local bool t_in_link_for = false;

std::shared_ptr<Link> link_for(const LinkInfo& info) {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.mutex);
    if (reg.local && reg.local->address == info.address) return reg.local;
    auto& slot = reg.links[info.address];
    if (auto l = slot.lock()) return l;
    for (auto it = reg.links.begin(); it != reg.links.end();)  // forget links that are gone
        if (it->second.expired() && it->first != info.address)
            it = reg.links.erase(it);
        else
            ++it;
    auto l = std::make_shared<RemoteLink>();
    l->address = info.address;
    l->authkey = info.authkey;
    l->server_name = info.name;
    l->server_pid = info.pid;
    l->fingerprint = info.fingerprint;
    struct Opening {
        Opening() { t_in_link_for = true; }
        ~Opening() { t_in_link_for = false; }
    } opening;
    l->open();
    slot = l;
    reg.kept[info.address] = l;
    return l;
}

void forget_link(const std::string& address, const Link* link) noexcept {
    if (t_in_link_for) return;  // not kept yet
    std::shared_ptr<Link> last;  // released after the registry's lock
    try {
        Registry& reg = registry();
        std::lock_guard<std::mutex> lk(reg.mutex);
        auto it = reg.kept.find(address);
        if (it != reg.kept.end() && it->second.get() == link) {
            last = std::move(it->second);
            reg.kept.erase(it);
        }
    } catch (...) {
    }
}

void set_local_link(std::shared_ptr<Link> link) {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.mutex);
    reg.local = std::move(link);
}

std::shared_ptr<Link> local_link() {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.mutex);
    return reg.local;
}

/// An invoker as the server is told of it, cached per thread (finding the
/// module is a walk of the loaded modules).
struct ThreadInvokers {
    std::unordered_map<const void*, InvokerRef> by_function;
};
InvokerRef invoker_of(const void* fn) {
    auto& cache = os::thread_object<ThreadInvokers>().by_function;
    auto it = cache.find(fn);
    if (it != cache.end()) return it->second;
    InvokerRef r;
    r.code = os::code_ref_of(fn);
    r.identity = invoker_identity(fn);
    return cache[fn] = r;
}

Ref::~Ref() {
    if (link) link->release(id);
}

}  // namespace server
}  // namespace detail
}  // namespace mpservice
