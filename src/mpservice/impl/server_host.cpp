// server_host: the server side - the object table, sessions and tickets, one
// thread per connection, the slot fast path, shutdown.

namespace mpservice {
namespace detail {
namespace server {

bool host_running() noexcept { return g_host.load() != nullptr; }

/// A memory block's size and memfd, attached to a reply (create, adopt,
/// block): whoever receives a block's proxy maps it without another round trip.
void attach_block(Encoder& e, const HostedObject& o, Outcome& out) {
    const auto& mem = static_cast<MemoryBlock*>(o.obj.object)->memory();
    e.write(static_cast<std::uint64_t>(mem.size()));
    e.write(e.attach(mem.handle()));
    out.keep.push_back(mem);
}

/// The current thread serves a request: proxies made while encoding its
/// result are minted by the host directly.
void run_request(Host& host, Session& session, CodeCache& codes, std::uint32_t op, const std::string& payload,
                 const std::vector<os::handle_t>& handles, Outcome& out) {
    Decoder d(payload.data(), payload.size(), &handles);
    Encoder e;
    switch (op) {
        case op_create: {
            InvokerRef c = read_invoker(d);
            auto type = d.read<std::uint64_t>();
            auto fn = reinterpret_cast<CreateFn>(reinterpret_cast<std::uintptr_t>(codes.resolve(c)));
            NewObject obj = fn(d);
            std::uint64_t id = host.add(obj, type, session);
            e.write(id);
            if (obj.type == &TypeTag<MemoryBlock>::tag) attach_block(e, *host.get(id), out);
            break;
        }
        case op_call: {
            auto id = d.read<std::uint64_t>();
            InvokerRef c = read_invoker(d);
            auto fn = reinterpret_cast<MethodFn>(reinterpret_cast<std::uintptr_t>(codes.resolve(c)));
            ObjectPtr o = host.get_for_call(session, id);  // keeps it alive through the call
            fn(o->obj.type, o->obj.object, d, e);
            break;
        }
        case op_adopt: {
            auto ticket = d.read<std::uint64_t>();
            ObjectPtr o = host.adopt(session, ticket, d.read<std::uint64_t>());
            if (o->obj.type == &TypeTag<MemoryBlock>::tag) attach_block(e, *o, out);
            break;
        }
        case op_incref: host.incref(session, d.read<std::uint64_t>()); break;
        case op_block: {
            ObjectPtr o = host.get(d.read<std::uint64_t>());
            if (o->obj.type != &TypeTag<MemoryBlock>::tag) throw_wrong_type(typeid(MemoryBlock).name());
            attach_block(e, *o, out);
            break;
        }
        case op_count:
            e(static_cast<std::uint64_t>(host.count()), static_cast<std::int64_t>(os::open_handle_count()),
              static_cast<std::int64_t>(os::mapping_count()));
            break;
        case op_shutdown: out.shutdown_after = true; break;
        default: throw ServerError("mpservice: unknown request " + std::to_string(op) + " (a corrupt message?)");
    }
    out.bytes = std::move(e.bytes());
    out.handles = e.handles();
}

/// Runs a request; any exception becomes an error reply.
void serve_one(Host& host, Session& session, CodeCache& codes, std::uint32_t op, const std::string& payload,
               const std::vector<os::handle_t>& handles, Outcome& out) {
    try {
        run_request(host, session, codes, op, payload, handles, out);
    } catch (...) {
        out = Outcome();
        out.kind = reply_error;
        Encoder e;
        try {
            encode_exception(e, std::current_exception());
        } catch (...) {
            e = Encoder();
            encode_exception(e, std::make_exception_ptr(ServerError("mpservice: the server's exception could not be encoded")));
        }
        out.bytes = std::move(e.bytes());
    }
}

// ---------------------------------------------------------------- one connection

class Connection {
public:
    Connection(Host& host, os::handle_t fd) : host_(host), fd_(fd) {}

    void run() {
        try {
            if (hello()) loop();
        } catch (...) {
            // A broken connection ends; the others go on.
        }
        if (main_) host_.close_session(session_key_);
        host_.remove_connection(fd_);
        os::close_handle(fd_);
    }

private:
    bool refuse(const std::string& why) {
        Encoder e;
        encode_exception(e, std::make_exception_ptr(ServerError(why)));
        send_frame(fd_, reply_error, e.bytes());
        return false;
    }

    bool hello() {
        if (os::peer_user(fd_) != os::current_user()) return false;  // another user: not a word
        wire::Frame f;
        if (reader_.read(fd_, f, 4096) != BoundedReader::got || f.kind != op_hello)
            return refuse("mpservice: the server expected a HELLO first");
        wire::close_all(f.handles);
        try {
            Decoder d(f.payload);
            auto version = d.read<std::uint32_t>();
            auto key = d.read<std::string>();
            auto session = d.read<std::string>();
            auto pid = d.read<std::int64_t>();
            auto fingerprint = d.read<std::string>();
            main_ = d.read<bool>();
            (void)pid;
            if (version != server_protocol)
                return refuse("mpservice: the client speaks server protocol " + std::to_string(version) +
                              ", this server " + std::to_string(server_protocol));
            if (key != host_.authkey) return refuse("mpservice: authentication with the server failed");
            if (fingerprint != host_.fingerprint)
                return refuse("mpservice: server '" + host_.name +
                              "' runs a different build of the program than this client (build fingerprints differ)");
            session_key_ = session;
            session_ = main_ ? host_.open_session(session) : host_.find_session(session);
            if (!session_) return refuse("mpservice: the client's session with the server has ended");
        } catch (const DecodeError& e) {
            return refuse(std::string("mpservice: malformed HELLO: ") + e.what());
        }
        return send_frame(fd_, reply_ok, std::string());
    }

    void loop() {
        wire::Frame f;
        for (;;) {
            BoundedReader::Status status;
            if (!slot_) {
                status = reader_.read(fd_, f, max_request);
            } else {
                serve_slot();
                // Nothing in the slot for a while: look at the socket, then sleep
                // on the doorbell.  The bell is read first, so a request made
                // after that rings a value we do not wait on.
                SlotHeader* h = slot_header(slot_.data());
                std::uint32_t bell = h->doorbell.load(std::memory_order_seq_cst);
                status = reader_.read(fd_, f, max_request, true);
                if (status == BoundedReader::nothing) {
                    if (host_.stopping.load()) return;
                    h->server_sleeping.store(1, std::memory_order_seq_cst);
                    if (h->request_seq.load(std::memory_order_seq_cst) == last_seq_)
                        os::futex_wait(&h->doorbell, bell, os::Clock::now() + server_check);
                    h->server_sleeping.store(0, std::memory_order_relaxed);
                    continue;
                }
            }
            if (status == BoundedReader::eof) return;
            if (status == BoundedReader::too_big) {
                refuse("mpservice: the server refused a request larger than 1 GiB (a corrupt message?)");
                return;
            }
            if (!on_frame(f)) return;
        }
    }

    /// A frame from the socket; false ends the connection.
    bool on_frame(wire::Frame& f) {
        struct Closer {
            std::vector<os::handle_t>& hs;
            ~Closer() { wire::close_all(hs); }
        } closer{f.handles};
        switch (f.kind) {
            case op_wake: return true;
            case op_decref: {
                Decoder d(f.payload);
                while (!d.at_end()) {
                    auto id = d.read<std::uint64_t>();
                    auto n = d.read<std::int64_t>();
                    ObjectPtr gone = host_.decref(*session_, id, static_cast<long>(n));
                }
                return true;
            }
            case op_drop_ticket: {
                Decoder d(f.payload);
                ObjectPtr gone = host_.drop_ticket(d.read<std::uint64_t>());
                return true;
            }
            case op_mint: {
                Decoder d(f.payload);
                auto id = d.read<std::uint64_t>();
                host_.mint(id, d.read<std::uint64_t>());
                return true;
            }
            case op_slot: {
                Outcome out;
                try {
                    if (f.handles.size() != 1) throw ServerError("mpservice: SLOT without its memory");
                    SharedMemory m = SharedMemory::adopt(os::duplicate_handle(f.handles[0]));
                    if (m.size() != slot_bytes) throw ServerError("mpservice: SLOT of the wrong size");
                    slot_ = m;
                    last_seq_ = slot_header(slot_.data())->request_seq.load(std::memory_order_acquire);
                } catch (...) {
                    out.kind = reply_error;
                    Encoder e;
                    encode_exception(e, std::current_exception());
                    out.bytes = e.bytes();
                }
                return send_frame(fd_, out.kind, out.bytes);
            }
            default: break;
        }
        if (f.kind < op_hello || f.kind >= op_last || f.kind == op_hello) {
            refuse("mpservice: the server received garbage (unknown frame " + std::to_string(f.kind) + ")");
            return false;
        }
        Outcome out;
        serve_one(host_, *session_, codes_, f.kind, f.payload, f.handles, out);
        if (!send_frame(fd_, out.kind, out.bytes, out.handles)) return false;
        if (out.shutdown_after) request_shutdown();
        return true;
    }

    /// Serves requests arriving in the slot while they keep coming; false once
    /// none came for the spin budget.
    bool serve_slot() {
        SlotHeader* h = slot_header(slot_.data());
        bool any = false;
        std::uint32_t hold_ns = 0;  // a client's resync: stay awake this long for its next request
        for (;;) {
            auto requested = [&] { return h->request_seq.load(std::memory_order_acquire) != last_seq_; };
            const bool got = hold_ns ? spin_for(requested, std::chrono::nanoseconds(hold_ns)) : spin_until(requested, spin_ns_);
            if (hold_ns && got) spin_ns_.store(spin_max_ns, std::memory_order_relaxed);  // we meet again
            if (!got) break;
            if (host_.stopping.load()) return false;
            any = true;
            std::uint32_t seq = h->request_seq.load(std::memory_order_acquire);
            last_seq_ = seq;
            hold_ns = std::min(h->resync_ns.exchange(0, std::memory_order_relaxed), resync_ns);
            std::uint32_t size = h->request_size;
            std::uint32_t op = h->request_op;
            Outcome out;
            if (size > slot_capacity || op == op_hello || op == op_slot || op == op_decref || op == op_drop_ticket ||
                op == op_mint) {
                out.kind = reply_error;
                Encoder e;
                encode_exception(e, std::make_exception_ptr(ServerError("mpservice: the server received a garbled slot request")));
                out.bytes = e.bytes();
            } else {
                std::string payload(slot_data(slot_.data()), size);
                serve_one(host_, *session_, codes_, op, payload, {}, out);
            }
            if (out.handles.empty() && out.bytes.size() <= slot_capacity) {
                std::memcpy(slot_data(slot_.data()), out.bytes.data(), out.bytes.size());
                h->reply_size = static_cast<std::uint32_t>(out.bytes.size());
                h->reply_kind = out.kind;
            } else {
                h->reply_kind = 0;  // on the socket, which is written first
                if (!send_frame(fd_, out.kind, out.bytes, out.handles)) return false;
            }
            h->reply_seq.store(seq, std::memory_order_seq_cst);
            if (h->client_sleeping.load(std::memory_order_seq_cst)) os::futex_wake(&h->reply_seq, 1);
            if (out.shutdown_after) {
                request_shutdown();
                return false;
            }
        }
        (void)any;
        return false;
    }

    void request_shutdown() {
        host_.stopping.store(true);
        os::listener_shutdown(host_.listener);
    }

    Host& host_;
    os::handle_t fd_;
    BoundedReader reader_;
    CodeCache codes_;
    bool main_ = false;
    std::string session_key_;
    SessionPtr session_;
    SharedMemory slot_;
    std::uint32_t last_seq_ = 0;
    std::atomic<std::uint32_t> spin_ns_{0};  // how long to wait, awake, for the next request
};

// ---------------------------------------------------------------- the server's main loop

/// The target of the server process.
void server_main(ServerBoot boot) {
    auto* host = new Host;  // never destroyed: connection threads may outlive this function's return
    host->address = boot.address;
    host->authkey = boot.authkey;
    host->name = boot.name;
    host->fingerprint = fingerprint_of("");
    host->listener = boot.listener->fd;
    install_local_link(*host);
    g_host.store(host);

    struct Worker {
        std::thread thread;
        std::shared_ptr<std::atomic<bool>> done;
    };
    std::vector<Worker> workers;
    for (;;) {
        os::handle_t fd = os::listener_accept(host->listener);
        if (fd == os::invalid_handle || host->stopping.load()) {
            os::close_handle(fd);
            break;
        }
        // Reap the threads of connections that ended.
        workers.erase(std::remove_if(workers.begin(), workers.end(),
                                     [](Worker& w) {
                                         if (!w.done->load()) return false;
                                         w.thread.join();
                                         return true;
                                     }),
                      workers.end());
        host->add_connection(fd);
        auto done = std::make_shared<std::atomic<bool>>(false);
        try {
            workers.push_back(Worker{std::thread([host, fd, done] {
                                         Connection(*host, fd).run();
                                         done->store(true);
                                     }),
                                     done});
        } catch (...) {
            host->remove_connection(fd);
            os::close_handle(fd);
        }
    }
    // Shutting down: end every connection, wait for their threads, then destroy
    // what is left (its destructors run; memory blocks go with the process).
    host->stopping.store(true);
    host->shut_connections();
    for (auto& w : workers) w.thread.join();
    auto rest = host->take_all();
    rest.clear();
    host->local->refs.clear();
}

// ---------------------------------------------------------------- the server's own link (server_link.hpp)

/// Proxies inside the server process reach the host directly: no socket.
class LocalLink final : public Link {
public:
    using Link::request;
    explicit LocalLink(Host& host) : host_(host) {}
    std::string request(std::uint32_t op, const std::string& payload, const std::vector<os::handle_t>& handles,
                        std::vector<os::handle_t>& reply_handles) override {
        Outcome out;
        serve_one(host_, *host_.local, codes(), op, payload, handles, out);
        if (out.kind == reply_error) throw_reply_error(out.bytes);
        for (auto h : out.handles) reply_handles.push_back(os::duplicate_handle(h));
        return std::move(out.bytes);
    }
    void post(std::uint32_t op, const std::string& payload) noexcept override {
        try {
            Decoder d(payload);
            ObjectPtr gone;
            if (op == op_decref) {
                auto id = d.read<std::uint64_t>();
                gone = host_.decref(*host_.local, id, static_cast<long>(d.read<std::int64_t>()));
            } else if (op == op_drop_ticket) {
                gone = host_.drop_ticket(d.read<std::uint64_t>());
            } else if (op == op_mint) {
                auto id = d.read<std::uint64_t>();
                host_.mint(id, d.read<std::uint64_t>());
            }
        } catch (...) {
        }
    }
    void mark_gone(const std::string&) noexcept override {}

private:
    /// Per thread (a server's threads each have one).
    struct ThreadCodes {
        CodeCache cache;
    };
    CodeCache& codes() { return os::thread_object<ThreadCodes>().cache; }
    Host& host_;
};

void install_local_link(Host& host) {
    auto l = std::make_shared<LocalLink>(host);
    l->address = host.address;
    l->authkey = host.authkey;
    l->server_name = host.name;
    l->server_pid = os::current_pid();
    l->fingerprint = host.fingerprint;
    set_local_link(std::move(l));
}

bool in_server_process() noexcept { return host_running(); }

RefPtr host_here(NewObject obj, std::uint64_t type) {
    Host* host = g_host.load();
    if (!host) {
        obj.destroy(obj.object);
        throw InvalidStateError("mpservice: managed<T>() works only inside a server process (in a hosted method)");
    }
    std::shared_ptr<Link> local = local_link();
    std::uint64_t id = host->add(obj, type, *host->local);
    return local->make_ref(id, type);
}

}  // namespace server
}  // namespace detail
}  // namespace mpservice
