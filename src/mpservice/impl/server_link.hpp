// server_link: a process's link to one server, as the client side's two
// parts see it - server_client.cpp (the links themselves: the server's own,
// and over sockets) and server_process.cpp (the templates' entry points,
// references, ServerProcess).

namespace mpservice {
namespace detail {
namespace server {

/// Closes the handles a reply brought, whatever happens to the reply.
struct HandleCloser {
    std::vector<os::handle_t>& hs;
    ~HandleCloser() { wire::close_all(hs); }
};

/// A memory block attached to a reply (server_host's attach_block), mapped.
SharedMemory read_block(Decoder& d);

/// One process's side of one server: how requests reach it, and the table of
/// this process's live references (one Ref per object, shared by its proxies).
class Link : public std::enable_shared_from_this<Link> {
public:
    std::string address, authkey, server_name, fingerprint;
    long server_pid = 0;

    virtual ~Link() = default;
    /// Sends a request and waits for its reply; re-throws the server's error.
    virtual std::string request(std::uint32_t op, const std::string& payload, const std::vector<os::handle_t>& handles,
                                std::vector<os::handle_t>& reply_handles) = 0;
    /// Sends a message that has no reply (decref, drop ticket); never throws.
    virtual void post(std::uint32_t op, const std::string& payload) noexcept = 0;
    /// Sends a message that has no reply, in order with this process's releases;
    /// ServerError if the server is known to be gone.
    virtual void send_ordered(std::uint32_t op, const std::string& payload) {
        post(op, payload);
    }
    /// After this, every request fails with ServerError at once.
    virtual void mark_gone(const std::string& why) noexcept = 0;
    /// A request on the process's main connection, answered after every
    /// release this process posted before it (object_count uses it).
    virtual std::string ordered_request(std::uint32_t op, const std::string& payload) { return request(op, payload); }

    std::string request(std::uint32_t op, const std::string& payload) {
        std::vector<os::handle_t> hs;
        std::string r = request(op, payload, {}, hs);
        wire::close_all(hs);
        return r;
    }
    std::string describe() const {
        return "server process '" + server_name + "' (pid " + std::to_string(server_pid) + ")";
    }

    /// The Ref of a new reference this process now holds on `id`.
    RefPtr make_ref(std::uint64_t id, std::uint64_t type);
    /// The live Ref of `id` in this process, if there is one.
    RefPtr existing(std::uint64_t id);
    /// A decoded proxy: takes over its ticket's reference (or gives the ticket
    /// back when this process holds the object already).  One round trip; a
    /// memory block's memfd comes with the reply and is mapped at once.
    RefPtr adopt(std::uint64_t id, std::uint64_t ticket, std::uint64_t type);
    /// A Ref's destructor: this process holds one reference less.
    void release(std::uint64_t id) noexcept;
    std::vector<std::uint64_t> live_ids();

    static std::string bytes_of(std::uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), sizeof v); }
    static std::string decref_bytes(std::uint64_t id) {
        Encoder e;
        e(id, std::int64_t(1));
        return std::move(e.bytes());
    }

private:
    std::mutex refs_mutex_;
    std::unordered_map<std::uint64_t, std::weak_ptr<Ref>> refs_;
};

/// Re-throws the server's error carried by a reply.
[[noreturn]] void throw_reply_error(const std::string& payload);

/// What a link to a server is made from: a proxy's or a server handle's encoding.
struct LinkInfo {
    std::string address, authkey, name, fingerprint;
    long pid = 0;
};
/// The link of this process to the server at `info.address`: the open one, or a new one.
std::shared_ptr<Link> link_for(const LinkInfo& info);
/// The server process's own link (LocalLink, server_host.cpp), kept in the
/// registry of links (server_client.cpp) beside those over sockets.
void set_local_link(std::shared_ptr<Link> link);
std::shared_ptr<Link> local_link();
/// An invoker as the server is told of it (cached per thread).
InvokerRef invoker_of(const void* fn);

}  // namespace server
}  // namespace detail
}  // namespace mpservice
