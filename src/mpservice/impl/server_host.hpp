// server_host.hpp: the server side's state - the boot argument, the object
// table, sessions and tickets - which the server part (server_host.cpp) and the
// client part (server_client.cpp: the server's own proxies call it directly)
// both use.

namespace mpservice {
namespace detail {
namespace server {

// ---------------------------------------------------------------- the boot argument

/// What the parent hands the server process: its listening socket (made by the
/// parent, so clients can connect before the server runs), address, key, name.
struct ServerBoot {
    struct Owned {
        os::handle_t fd = os::invalid_handle;
        ~Owned() { os::close_handle(fd); }
    };
    std::shared_ptr<Owned> listener = std::make_shared<Owned>();
    std::string address, authkey, name;
    /// Closes this process's copy of the listener (every copy of this boot shares it).
    void close() {
        os::close_handle(listener->fd);
        listener->fd = os::invalid_handle;
    }
};

}  // namespace server
}  // namespace detail

template <>
struct Codec<detail::server::ServerBoot> {
    static void encode(Encoder& e, const detail::server::ServerBoot& b) {
        e.write(e.attach(b.listener->fd));
        e(b.address, b.authkey, b.name);
    }
    static detail::server::ServerBoot decode(Decoder& d) {
        detail::server::ServerBoot b;
        auto index = d.read<std::uint32_t>();
        b.listener->fd = detail::os::duplicate_handle(d.handle(index));
        d(b.address, b.authkey, b.name);
        return b;
    }
};

namespace detail {
namespace server {

// ---------------------------------------------------------------- the object table

struct HostedObject {
    NewObject obj;
    std::uint64_t id = 0;
    std::uint64_t type = 0;
    HostedObject() = default;
    HostedObject(const HostedObject&) = delete;
    HostedObject& operator=(const HostedObject&) = delete;
    ~HostedObject() {
        if (obj.object) obj.destroy(obj.object);
    }
};
using ObjectPtr = std::shared_ptr<HostedObject>;

/// The references one client process holds (count per object).
struct Session {
    std::unordered_map<std::uint64_t, long> refs;
    /// Objects this session took over from tickets and has neither called nor
    /// released yet (object id -> ticket).  A consumer dies inside a Queue's
    /// get after it decoded the item but before the queue took it out: the
    /// item is delivered again, and its ticket must still be good.  So a
    /// session that ends holding such a reference gives the ticket back
    /// instead of dropping it.  (A process killed after it received a proxy
    /// but before it used or dropped it thereby leaves the object in flight
    /// until the server shuts down, as an encoding never decoded does.)
    std::unordered_map<std::uint64_t, std::uint64_t> unused_adopted;
    /// The session ended (its process's main connection did).  A request that
    /// its other connections still deliver - a killed process's last request,
    /// read from its slot after the end - must not take references nobody
    /// would release.
    bool ended = false;
};
using SessionPtr = std::shared_ptr<Session>;

class Host {
public:
    std::string address, authkey, name, fingerprint;
    os::handle_t listener = os::invalid_handle;
    std::atomic<bool> stopping{false};
    SessionPtr local = std::make_shared<Session>();  // proxies inside the server itself

    // ---- objects and references; every function takes the lock itself.
    // Objects whose last reference went are handed back, so the caller drops
    // them (runs their destructors) with no lock held: a destructor may hold
    // proxies and release them in turn.
    std::uint64_t add(NewObject obj, std::uint64_t type, Session& s) {
        auto h = std::make_shared<HostedObject>();
        h->obj = obj;
        h->type = type;
        std::lock_guard<std::mutex> lk(mutex_);
        check_open(s);  // (h, declared first, destroys the object after the lock)
        h->id = next_id_++;
        objects_[h->id] = Entry{h, 1};
        s.refs[h->id] += 1;
        return h->id;
    }
    ObjectPtr get(std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        return find(id).object;
    }
    /// The object of a call by session `s` (which has now used it).
    ObjectPtr get_for_call(Session& s, std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!s.unused_adopted.empty()) s.unused_adopted.erase(id);
        return find(id).object;
    }
    void incref(Session& s, std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        check_open(s);
        find(id).refs += 1;
        s.refs[id] += 1;
    }
    ObjectPtr decref(Session& s, std::uint64_t id, long n = 1) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto it = s.refs.find(id);
        if (it == s.refs.end()) return nullptr;  // not this session's: ignored, as Python ignores decref errors
        if (!s.unused_adopted.empty()) s.unused_adopted.erase(id);
        n = std::min(n, it->second);
        if ((it->second -= n) == 0) s.refs.erase(it);
        return drop(id, n);
    }
    /// An encoded proxy's ticket: a reference in flight.  The ticket is the
    /// encoding client's choice, and the MINT that announces it is a message
    /// without a reply on that client's main connection - ahead of its
    /// releases, so the object is alive when it arrives.  A decoder in another
    /// process may be quicker than the MINT: its ADOPT (or DROP) then leaves a
    /// mark that cancels the MINT when it comes.
    void mint(std::uint64_t id, std::uint64_t ticket) {
        std::lock_guard<std::mutex> lk(mutex_);
        if (early_.erase(ticket) != 0) return;
        auto it = objects_.find(id);
        if (it == objects_.end() || tickets_.count(ticket) != 0) return;  // garbage: ignored
        it->second.refs += 1;
        tickets_[ticket] = id;
    }
    /// The ticket's reference becomes the session's.  A ticket already used
    /// (the same bytes decoded twice), or not minted yet, takes a new reference
    /// if the object lives.  Returns the object (a memory block's memfd goes back).
    ObjectPtr adopt(Session& s, std::uint64_t ticket, std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        check_open(s);
        auto t = tickets_.find(ticket);
        Entry& entry = find(id);
        if (t != tickets_.end() && t->second == id) {
            tickets_.erase(t);
        } else {
            entry.refs += 1;
            mark_early(ticket);
        }
        s.refs[id] += 1;
        s.unused_adopted[id] = ticket;
        return entry.object;
    }
    ObjectPtr drop_ticket(std::uint64_t ticket) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto t = tickets_.find(ticket);
        if (t == tickets_.end()) {
            mark_early(ticket);
            return nullptr;
        }
        std::uint64_t id = t->second;
        tickets_.erase(t);
        return drop(id, 1);
    }
    std::vector<ObjectPtr> end_session(Session& s) {
        std::vector<ObjectPtr> gone;
        std::lock_guard<std::mutex> lk(mutex_);
        for (auto& u : s.unused_adopted) {  // back in flight (see Session)
            auto r = s.refs.find(u.first);
            if (r == s.refs.end() || r->second <= 0 || tickets_.count(u.second) != 0) continue;
            if (early_.erase(u.second) != 0) continue;  // decoded again meanwhile: that took a reference of its own
            r->second -= 1;
            tickets_[u.second] = u.first;
        }
        s.unused_adopted.clear();
        s.ended = true;
        for (auto& r : s.refs)
            if (r.second > 0)
                if (auto o = drop(r.first, r.second)) gone.push_back(std::move(o));
        s.refs.clear();
        return gone;
    }
    std::size_t count() {
        std::lock_guard<std::mutex> lk(mutex_);
        return objects_.size();
    }
    std::vector<ObjectPtr> take_all() {
        std::vector<ObjectPtr> all;
        std::lock_guard<std::mutex> lk(mutex_);
        for (auto& o : objects_) all.push_back(std::move(o.second.object));
        objects_.clear();
        tickets_.clear();
        early_.clear();
        return all;
    }

    // ---- sessions
    SessionPtr open_session(const std::string& key) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto& s = sessions_[key];
        if (!s) s = std::make_shared<Session>();
        return s;
    }
    SessionPtr find_session(const std::string& key) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto it = sessions_.find(key);
        return it == sessions_.end() ? nullptr : it->second;
    }
    void close_session(const std::string& key) {
        SessionPtr s;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            auto it = sessions_.find(key);
            if (it == sessions_.end()) return;
            s = it->second;
            sessions_.erase(it);
        }
        auto gone = end_session(*s);
        gone.clear();  // destructors run here, unlocked
    }

    // ---- connections (for shutdown)
    void add_connection(os::handle_t fd) {
        std::lock_guard<std::mutex> lk(mutex_);
        connections_.insert(fd);
    }
    void remove_connection(os::handle_t fd) {
        std::lock_guard<std::mutex> lk(mutex_);
        connections_.erase(fd);
    }
    void shut_connections() {
        std::lock_guard<std::mutex> lk(mutex_);
        for (auto fd : connections_) os::socket_shutdown(fd);
    }

private:
    struct Entry {
        ObjectPtr object;
        long refs = 0;
    };
    Entry& find(std::uint64_t id) {
        auto it = objects_.find(id);
        if (it == objects_.end())
            throw ServerError("mpservice: server '" + name + "' has no object " + std::to_string(id) +
                              " (it was released, or the id is not one of this server's)");
        return it->second;
    }
    void check_open(const Session& s) const {
        if (s.ended) throw ServerError("mpservice: the client's session with server '" + name + "' has ended");
    }
    /// A ticket used before its MINT arrived.  A mark that is never cancelled
    /// (bytes decoded twice, a forged ticket) costs 8 bytes; the set is bounded
    /// so garbage cannot grow it for ever.
    void mark_early(std::uint64_t ticket) {
        if (early_.size() >= (1u << 16)) early_.clear();
        early_.insert(ticket);
    }
    ObjectPtr drop(std::uint64_t id, long n) {
        auto it = objects_.find(id);
        if (it == objects_.end()) return nullptr;
        if ((it->second.refs -= n) > 0) return nullptr;
        ObjectPtr o = std::move(it->second.object);
        objects_.erase(it);
        return o;
    }
    std::mutex mutex_;
    std::unordered_map<std::uint64_t, Entry> objects_;
    std::unordered_map<std::uint64_t, std::uint64_t> tickets_;
    std::unordered_set<std::uint64_t> early_;  // tickets adopted or dropped before their MINT
    std::map<std::string, SessionPtr> sessions_;
    std::set<os::handle_t> connections_;
    std::uint64_t next_id_ = 1;
};

/// The server of this process, if it is one.
inline std::atomic<Host*> g_host{nullptr};

// ---------------------------------------------------------------- requests

/// A request's outcome: reply kind, bytes, handles to send (closed after).
struct Outcome {
    std::uint32_t kind = reply_ok;
    std::string bytes;
    std::vector<os::handle_t> handles;       // sent, not owned
    std::vector<SharedMemory> keep;          // keeps sent handles open until sent
    bool close_after = false;                // the stream is not trustworthy any more
    bool shutdown_after = false;
};

/// Resolves invokers sent as code references, once per connection.
class CodeCache {
public:
    const void* resolve(const InvokerRef& r) {
        auto key = std::make_tuple(r.code.module, r.code.offset, r.identity);
        auto it = cache_.find(key);
        if (it != cache_.end()) return it->second;
        const void* fn = os::code_ref_resolve(r.code);
        if (!fn || r.identity == 0 || invoker_identity(fn) != r.identity)
            throw ServerError(
                "mpservice: the server does not know this constructor or method (not one of this build's "
                "invokers: a different build, or a corrupt request)");
        if (cache_.size() > 4096) cache_.clear();  // garbage should not grow it forever
        cache_[key] = fn;
        return fn;
    }

private:
    std::map<std::tuple<std::uint64_t, std::uint64_t, std::uint64_t>, const void*> cache_;
};

/// Whether this process is a server process, with its host running (server_host.cpp).
bool host_running() noexcept;
/// Runs a request; any exception becomes an error reply (server_host.cpp).
void serve_one(Host& host, Session& session, CodeCache& codes, std::uint32_t op, const std::string& payload,
               const std::vector<os::handle_t>& handles, Outcome& out);
/// The target of the server process (server_host.cpp).
void server_main(ServerBoot boot);
/// Lets the server's own proxies call it directly (server_client.cpp).
void install_local_link(Host& host);

}  // namespace server
}  // namespace detail
}  // namespace mpservice
