// server_process: the client side's entry points for the public templates
// (create an object, call a method, encode and decode a reference, map a
// memory block) and the ServerProcess, ServerClient and Namespace objects.

namespace mpservice {
namespace detail {
namespace server {

RefPtr create_object(const Shared<Link>& link, const void* creator, std::uint64_t type, const Encoder& args) {
    if (!link) throw InvalidStateError("mpservice: the server process was not started");
    Encoder e;
    write_invoker(e, invoker_of(creator));
    e.write(type);
    e.write_bytes(args.bytes().data(), args.bytes().size());
    std::vector<os::handle_t> hs;
    std::string reply = link->request(op_create, e.bytes(), args.handles(), hs);
    HandleCloser closer{hs};
    Decoder d(reply.data(), reply.size(), &hs);
    RefPtr r = link->make_ref(d.read<std::uint64_t>(), type);
    if (!d.at_end()) r->mapping = read_block(d);  // a memory block: mapped here at once
    return r;
}

std::string call_method(const Ref& ref, const void* method, const Encoder& args, std::vector<os::handle_t>& handles) {
    Encoder e;
    e.reserve(32 + args.bytes().size());
    e.write(ref.id);
    write_invoker(e, invoker_of(method));
    e.write_bytes(args.bytes().data(), args.bytes().size());
    return ref.link->request(op_call, e.bytes(), args.handles(), handles);
}

/// A ticket no other encoding, in any process, has: a per-process random
/// start (drawn again in a forked child) and a counter.
std::atomic<std::uint64_t> g_ticket{0};
void forget_ticket_seed() { g_ticket.store(0, std::memory_order_relaxed); }
std::uint64_t new_ticket() {
    static const bool hooked = [] {
        os::at_fork_child(&forget_ticket_seed);
        return true;
    }();
    (void)hooked;
    for (;;) {
        std::uint64_t t = g_ticket.load(std::memory_order_relaxed);
        if (t == 0) {
            std::uint64_t seed = 0;
            os::random_bytes(reinterpret_cast<unsigned char*>(&seed), sizeof seed);
            seed |= 1;
            if (!g_ticket.compare_exchange_strong(t, seed, std::memory_order_relaxed)) continue;
            t = seed;
        }
        if (g_ticket.compare_exchange_weak(t, t + 2, std::memory_order_relaxed)) return t;
    }
}

void encode_ref(Encoder& e, const RefPtr& ref) {
    if (!ref) {
        e.write(std::uint8_t(0));
        return;
    }
    const std::uint64_t ticket = new_ticket();
    Encoder m;
    m(ref->id, ticket);
    ref->link->send_ordered(op_mint, m.bytes());  // no reply: before this process's release of it
    const Link& l = *ref->link;
    e.write(std::uint8_t(1));
    e(proxy_magic, server_protocol, l.address, l.authkey, l.server_name, static_cast<std::int64_t>(l.server_pid),
      l.fingerprint, ref->id, ticket, ref->type);
}

RefPtr decode_ref(Decoder& d, std::uint64_t type, const char* type_name) {
    auto present = d.read<std::uint8_t>();
    if (present == 0) return nullptr;
    if (present != 1) throw DecodeError("decode: bad proxy marker");
    auto magic = d.read<std::uint32_t>();
    auto version = d.read<std::uint32_t>();
    if (magic != proxy_magic || version != server_protocol)
        throw DecodeError("decode: not an encoded proxy (or one of another server protocol)");
    LinkInfo info;
    std::int64_t pid;
    std::uint64_t id, ticket, sent_type;
    d(info.address, info.authkey, info.name, pid, info.fingerprint, id, ticket, sent_type);
    info.pid = static_cast<long>(pid);
    if (info.fingerprint != fingerprint_of(""))
        throw ServerError("mpservice: this proxy comes from a different build of the program than this process (build "
                          "fingerprints differ); its server '" + info.name + "' would refuse it");
    if (sent_type != type)
        throw DecodeError("decode: the proxy refers to an object of another class than " + os::demangle(type_name));
    if (info.address.empty() || info.address.size() > 100) throw DecodeError("decode: bad server address in a proxy");
    return link_for(info)->adopt(id, ticket, type);
}

const SharedMemory& block_mapping(Ref& ref) {
    std::lock_guard<std::mutex> lk(ref.mapping_mutex);
    if (!ref.mapping) {  // a Ref made by create/adopt has it already; this is the fallback
        Encoder e;
        e.write(ref.id);
        std::vector<os::handle_t> hs;
        std::string reply = ref.link->request(op_block, e.bytes(), {}, hs);
        HandleCloser closer{hs};
        Decoder d(reply.data(), reply.size(), &hs);
        ref.mapping = read_block(d);
    }
    return ref.mapping;
}

}  // namespace server
}  // namespace detail

// ---------------------------------------------------------------- ServerAccess, ServerProcess

namespace {
std::atomic<int>& server_counter() {
    static std::atomic<int> n{1};
    return n;
}
std::tuple<std::uint64_t, std::int64_t, std::int64_t> server_counts(const std::shared_ptr<detail::server::Link>& l) {
    if (!l) throw InvalidStateError("mpservice: the server process was not started");
    std::string reply = l->ordered_request(detail::server::op_count, std::string());
    Decoder d(reply);
    std::uint64_t n;
    std::int64_t fds, maps;
    d(n, fds, maps);
    return {n, fds, maps};
}
}  // namespace

struct Namespace::Values {
    std::map<std::string, Held> map;
};

Namespace::Namespace() : values_(new Values) {}
Namespace::~Namespace() = default;

Namespace::Held& Namespace::slot_for(std::string name) { return values_->map[std::move(name)]; }

// Out of line, here: the Method<Namespace, ...> invokers they use are
// instantiated and announced once, in the implementation, instead of by a
// static initializer in every includer.
bool Namespace::contains(const std::string& name) const {
    std::lock_guard<std::mutex> g(m_);
    return values_->map.count(name) != 0;
}

void Namespace::erase(const std::string& name) {
    Held old;
    std::lock_guard<std::mutex> g(m_);
    auto it = values_->map.find(name);
    if (it == values_->map.end()) throw std::out_of_range("namespace has no attribute '" + name + "'");
    old = std::move(it->second);
    values_->map.erase(it);
}

std::vector<std::string> Namespace::names() const {
    std::lock_guard<std::mutex> g(m_);
    std::vector<std::string> out;
    for (auto& kv : values_->map) out.push_back(kv.first);
    return out;
}

std::string Namespace::type_of(const std::string& name) const {
    std::lock_guard<std::mutex> g(m_);
    return detail::os::demangle(find(name).type_name);
}

std::size_t Namespace::len() const {
    std::lock_guard<std::mutex> g(m_);
    return values_->map.size();
}

const Namespace::Held& Namespace::find(const std::string& name) const {
    auto it = values_->map.find(name);
    if (it == values_->map.end()) throw std::out_of_range("namespace has no attribute '" + name + "'");
    return it->second;
}

void Namespace::throw_mismatch(const std::string& name, const char* held, const char* asked) {
    throw std::invalid_argument("namespace attribute '" + name + "' holds a " + detail::os::demangle(held) +
                                ", not a " + detail::os::demangle(asked));
}

bool Proxy<Namespace>::contains(const std::string& name) const { return call<&N::contains>(checked(name)); }
void Proxy<Namespace>::erase(const std::string& name) const { call<&N::erase>(checked(name)); }
std::vector<std::string> Proxy<Namespace>::names() const { return call<&N::names>(); }
std::string Proxy<Namespace>::type_of(const std::string& name) const { return call<&N::type_of>(checked(name)); }
std::size_t Proxy<Namespace>::len() const { return call<&N::len>(); }

const std::string& Proxy<Namespace>::checked(const std::string& name) {
    if (name.empty() || name[0] == '_')
        throw std::invalid_argument("mpservice: namespace attribute names must not be empty or start with '_' ('" +
                                    name + "')");
    return name;
}

ServerClient::ServerClient(detail::Shared<detail::server::Link> link) { link_ = std::move(link); }

std::size_t ServerAccess::object_count() const { return static_cast<std::size_t>(std::get<0>(server_counts(link_.shared()))); }

std::pair<long, long> ServerAccess::resource_counts() const {
    auto c = server_counts(link_.shared());
    return {static_cast<long>(std::get<1>(c)), static_cast<long>(std::get<2>(c))};
}

const std::string& ServerAccess::address() const {
    static const std::string none;
    return link_ ? link_->address : none;
}

const detail::Shared<detail::server::Link>& ServerAccess::link() const {
    if (!link_) throw InvalidStateError("mpservice: the server process was not started");
    return link_;
}

ServerProcess::ServerProcess() : ServerProcess(ServerOptions{}) {}
ServerProcess::ServerProcess(const Context& ctx) : ServerProcess([&] {
        ServerOptions o;
        o.context = &ctx;
        return o;
    }()) {}
ServerProcess::ServerProcess(ServerOptions options) : options_(std::move(options)) {
    if (options_.name.empty()) options_.name = "ServerProcess-" + std::to_string(server_counter().fetch_add(1));
    if (options_.start) start();
}

ServerProcess::~ServerProcess() { shutdown(); }

void ServerProcess::start() {
    using namespace detail::server;
    if (process_) throw InvalidStateError("mpservice: " + options_.name + " was already started");
    ServerBoot boot;
    boot.listener->fd = detail::os::listener_create(boot.address);
    unsigned char key[authkey_size];
    detail::os::random_bytes(key, sizeof key);
    boot.authkey.assign(reinterpret_cast<const char*>(key), sizeof key);
    boot.name = options_.name;
    const Context& ctx = options_.context ? *options_.context : default_context();
    process_ = detail::Owned<Process<void>>(new Process<void>(ctx, &server_main, boot));
    process_->set_name(options_.name);
    try {
        process_->start();
    } catch (...) {
        process_.reset();
        throw;
    }
    // Only the server may hold the listener now: if it dies, connecting fails
    // at once instead of waiting in the backlog of a socket nobody serves.
    boot.close();
    LinkInfo info;
    info.address = boot.address;
    info.authkey = boot.authkey;
    info.name = options_.name;
    info.pid = process_->pid();
    info.fingerprint = detail::fingerprint_of("");
    link_ = link_for(info);
}

void ServerProcess::shutdown() noexcept {
    try {
        if (!process_ || !process_->is_alive()) {
            if (link_) link_->mark_gone("it was shut down");
            return;
        }
        if (link_) link_->post(detail::server::op_shutdown, std::string());
        auto wait = [&] {
            try {
                process_->join(options_.shutdown_timeout);
            } catch (...) {
            }
            return !process_->is_alive();
        };
        if (!wait()) {
            process_->terminate();
            if (!wait()) {
                process_->kill();
                try {
                    process_->join();
                } catch (...) {
                }
            }
        }
        if (link_) link_->mark_gone("it was shut down");
    } catch (...) {
    }
}

bool ServerProcess::is_alive() const { return process_ && process_->is_alive(); }
long ServerProcess::pid() const { return process_ ? process_->pid() : 0; }
const std::string& ServerProcess::name() const { return options_.name; }
std::optional<int> ServerProcess::exitcode() const { return process_ ? process_->exitcode() : std::nullopt; }

void Codec<ServerClient>::encode(Encoder& e, const ServerClient& c) {
    const auto& l = c.link();
    e(l->address, l->authkey, l->server_name, static_cast<std::int64_t>(l->server_pid), l->fingerprint);
}

ServerClient Codec<ServerClient>::decode(Decoder& d) {
    detail::server::LinkInfo info;
    std::int64_t pid;
    d(info.address, info.authkey, info.name, pid, info.fingerprint);
    info.pid = static_cast<long>(pid);
    if (info.fingerprint != detail::fingerprint_of(""))
        throw ServerError("mpservice: this server handle comes from a different build of the program");
    return ServerClient(detail::server::link_for(info));
}

}  // namespace mpservice
