// server_wire: the out-of-line helpers the proxy templates call (announcing
// invokers, type hashes, the wrong-type error, slot counters); the protocol
// itself is in server_wire.hpp.

namespace mpservice {

// ---------------------------------------------------------------- public helpers of the templates

namespace detail::server {

bool announce_invoker(const void* fn, const std::type_info& identity) noexcept {
    try {
        std::uint64_t h = type_hash(identity.name());
        InvokerSet& s = invokers();
        std::lock_guard<std::mutex> lk(s.mutex);
        s.fns[fn] = h;
    } catch (...) {
    }
    return true;
}

/// The identity hash of an announced invoker; 0 if `fn` is not one.
std::uint64_t invoker_identity(const void* fn) {
    InvokerSet& s = invokers();
    std::lock_guard<std::mutex> lk(s.mutex);
    auto it = s.fns.find(fn);
    return it == s.fns.end() ? 0 : it->second;
}

std::uint64_t type_hash(const char* mangled) noexcept {
    std::uint64_t h = 1469598103934665603ull;
    for (const char* p = mangled; p && *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
    return h;
}

void throw_wrong_type(const char* expected_mangled) {
    throw ServerError("mpservice: the object is not a " + os::demangle(expected_mangled) +
                      " (the proxy's class does not match the hosted object)");
}

SlotCounters slot_counters() noexcept {
    SlotStats& s = slot_stats();
    auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    return SlotCounters{get(s.calls), get(s.spun), get(s.slept), get(s.slow), get(s.woke_server), get(s.resyncs),
                        get(s.resynced)};
}

}  // namespace detail::server

// (ServerError is one of the library's own types: in remote_exception.cpp's standard table.)

}  // namespace mpservice
