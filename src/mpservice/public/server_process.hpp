// server_process: a server process that hosts C++ objects for other processes
// (Python's managers, as mpservice reworked them), and shared memory blocks.
//
//     mp::ServerProcess server;                           // a child process, started
//     mp::Proxy<Counter> c = server.create<Counter>(10);  // Counter(10) lives in the server
//     c.call<&Counter::add>(5);                           // runs there; its result comes back
//     int v = c.call<&Counter::get>();
//     auto block = server.MemoryBlock(1 << 20);           // shared memory, zero-copy everywhere
//     block.data()[0] = 42;
//
// Nothing is registered.  As a Process target is identified by its place in
// the program, a constructor and a method are identified by the place of a
// small function the templates here instantiate for them (their "invoker"):
// the client sends the invoker's module offset, and the server - a run of the
// same build, which refuses clients of another build - checks it against the
// invokers its own static initializers announced, so a garbled request can
// never make it jump somewhere else.
//
// Proxies are handles with reference counts: copy them freely (a copy costs no
// message); pass them as Process arguments, inside Queue items or as method
// arguments and results, nested in any data the codec carries.  An encoded
// proxy is plain bytes - server address, object id, a one-use ticket - with no
// OS handle, so every channel carries it.  The object lives while a proxy in
// any process, or an encoded proxy not yet decoded, refers to it, and is
// destroyed in the server when the last one goes.  A client process that dies,
// even by SIGKILL, loses its references (the server sees its connection end).
// A ticket that is never decoded keeps its object alive until the server shuts
// down (as in Python); each encoding costs one such ticket, so the leak is
// bounded by the encodings you make and drop unread.
//
// Concurrency: each client thread has its own connection, served by its own
// server thread.  Calls from different threads or processes run concurrently in
// the server - on the same object too - so a hosted class needs its own
// locking (the hosted containers here have it).  One thread's calls run in
// order.  A call from a thread of a *forked* child opens a connection of its own.
//
// Fast path: a thread's connection also has a small shared-memory slot for
// requests and replies that carry no OS handle; both sides spin briefly on it
// before they sleep on a futex in it, so back-to-back calls cost no system
// call, and a client whose calls keep finding the server asleep asks for one
// long spin on both sides to get out of paying two wake-ups per call.
//
// The server dying makes every call fail at once with mp::ServerError naming
// it - never a hang.  A method's exception arrives as it does from a Process:
// as Remote<E>, with the server's stack at the throw.
#pragma once

#include <any>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../detail/os.hpp"
#include "../detail/shm.hpp"
#include "codec.hpp"
#include "errors.hpp"
#include "process.hpp"

namespace mpservice {

/// A server process is gone, refused a request, or does not know an object.
class ServerError : public Error {
public:
    using Error::Error;
};

template <class T>
class Proxy;
class ServerProcess;

// ---------------------------------------------------------------- internals shared by the templates

namespace detail::server {

/// Runs a method in the server: checks that `object` is of the invoker's class
/// (`type` is the object's type tag), decodes the arguments, writes the result.
using MethodFn = void (*)(const void* type, void* object, Decoder& args, Encoder& result);

/// A newly constructed hosted object.
struct NewObject {
    void* object = nullptr;
    void (*destroy)(void*) noexcept = nullptr;
    const void* type = nullptr;   // the class's type tag (an address in this process)
    const char* type_name = "";   // typeid name (mangled)
};
/// Runs a constructor in the server.
using CreateFn = NewObject (*)(Decoder& args);

/// One address per class in each process: the identity hosted objects are checked against.
template <class T>
struct TypeTag {
    static constexpr char tag = 0;
};

/// Announces an invoker of this build with its identity (the type that
/// instantiated it); the server runs only announced invokers, and only when
/// the identity the client sent matches.
MPSERVICE_API bool announce_invoker(const void* fn, const std::type_info& identity) noexcept;
/// FNV-1a hash of a type's name: the type check of a decoded proxy.
MPSERVICE_API std::uint64_t type_hash(const char* mangled) noexcept;

class Link;

/// What every Proxy copy in one process shares for one object: the link to its
/// server, the object id and, for memory blocks, the mapping (made once).
struct Ref {
    Shared<Link> link;
    std::uint64_t id = 0;
    std::uint64_t type = 0;  // type_hash of the class
    std::mutex mapping_mutex;
    SharedMemory mapping;
    Ref() = default;
    Ref(const Ref&) = delete;
    Ref& operator=(const Ref&) = delete;
    MPSERVICE_API ~Ref();  // drops this process's reference (one message)
};
using RefPtr = Shared<Ref>;

/// The client side of a server, as ServerProcess and ServerClient hold it.
MPSERVICE_API RefPtr create_object(const Shared<Link>& link, const void* creator, std::uint64_t type,
                                   const Encoder& args);
/// Calls `method` on the object; returns the encoded result (and its handles).
MPSERVICE_API std::string call_method(const Ref& ref, const void* method, const Encoder& args,
                                      std::vector<os::handle_t>& handles);
MPSERVICE_API void encode_ref(Encoder& e, const RefPtr& ref);
MPSERVICE_API RefPtr decode_ref(Decoder& d, std::uint64_t type, const char* type_name);
/// The memory block behind a MemoryBlock proxy, mapped in this process (once).
MPSERVICE_API const SharedMemory& block_mapping(Ref& ref);
/// In a server process: a new object hosted by this server, with a reference
/// held by the returned Ref.  InvalidStateError in any other process.
MPSERVICE_API RefPtr host_here(NewObject obj, std::uint64_t type);
MPSERVICE_API bool in_server_process() noexcept;
/// Benchmark hook: whether new thread connections use the shared-memory slot
/// (default true; false measures the socket-only path).
MPSERVICE_API void set_fast_path(bool enabled) noexcept;
/// Benchmark hook: what this process's calls through a slot did so far.
struct SlotCounters {
    std::uint64_t calls = 0;        ///< requests through a slot
    std::uint64_t spun = 0;         ///< answered while the caller spun
    std::uint64_t slept = 0;        ///< the caller slept for the answer
    std::uint64_t slow = 0;         ///< ... and it came after more than 20 us (a cross-CPU wake-up)
    std::uint64_t woke_server = 0;  ///< the request found the server's thread asleep
    std::uint64_t resyncs = 0;      ///< long spins tried to leave the sleep-sleep pattern
    std::uint64_t resynced = 0;     ///< ... after which both sides spun again
};
MPSERVICE_API SlotCounters slot_counters() noexcept;

// ---- method traits: R (C::*)(P...) [const] [noexcept]
template <class M>
struct method_traits;
#define MPSERVICE_METHOD_TRAITS(QUAL)                                 \
    template <class R, class C, class... P>                           \
    struct method_traits<R (C::*)(P...) QUAL> {                       \
        using result = R;                                             \
        using cls = C;                                                \
        using params = std::tuple<P...>;                              \
        static constexpr std::size_t arity = sizeof...(P);            \
    };
MPSERVICE_METHOD_TRAITS()
MPSERVICE_METHOD_TRAITS(const)
MPSERVICE_METHOD_TRAITS(noexcept)
MPSERVICE_METHOD_TRAITS(const noexcept)
MPSERVICE_METHOD_TRAITS(&)
MPSERVICE_METHOD_TRAITS(const&)
#undef MPSERVICE_METHOD_TRAITS

[[noreturn]] MPSERVICE_API void throw_wrong_type(const char* expected_mangled);

/// The invoker of method M of class C.
template <class C, auto M>
struct Method {
    using Traits = method_traits<decltype(M)>;
    using R = typename Traits::result;
    using Params = typename Traits::params;

    static void invoke(const void* type, void* object, Decoder& in, Encoder& out) {
        if (type != &TypeTag<C>::tag) throw_wrong_type(typeid(C).name());
        run(*static_cast<C*>(object), in, out, std::make_index_sequence<Traits::arity>{});
    }
    template <std::size_t... I>
    static void run(C& obj, Decoder& in, Encoder& out, std::index_sequence<I...>) {
        std::tuple<std::decay_t<std::tuple_element_t<I, Params>>...> args{
            in.read<std::decay_t<std::tuple_element_t<I, Params>>>()...};  // braced: left to right
        in.expect_end("method arguments");
        if constexpr (std::is_void_v<R>) {
            (obj.*M)(static_cast<std::tuple_element_t<I, Params>&&>(std::get<I>(args))...);
            (void)out;
        } else {
            out.write<std::decay_t<R>>((obj.*M)(static_cast<std::tuple_element_t<I, Params>&&>(std::get<I>(args))...));
        }
    }
    static inline const bool announced = announce_invoker(reinterpret_cast<const void*>(&invoke), typeid(Method*));
    static const void* address() {
        (void)announced;
        return reinterpret_cast<const void*>(&invoke);
    }
};

template <class T>
void destroy_object(void* p) noexcept {
    delete static_cast<T*>(p);
}
template <class T>
NewObject new_object(T* p) {
    return NewObject{p, &destroy_object<T>, &TypeTag<T>::tag, typeid(T).name()};
}

/// The invoker of constructor T(A...).
template <class T, class... A>
struct Creator {
    static NewObject invoke(Decoder& in) {
        std::tuple<A...> args{in.read<A>()...};
        in.expect_end("constructor arguments");
        return new_object(std::apply([](A&... a) { return new T(std::move(a)...); }, args));
    }
    static inline const bool announced = announce_invoker(reinterpret_cast<const void*>(&invoke), typeid(Creator*));
    static const void* address() {
        (void)announced;
        return reinterpret_cast<const void*>(&invoke);
    }
};

template <class T>
std::uint64_t type_hash_of() {
    static const std::uint64_t h = type_hash(typeid(T).name());
    return h;
}

/// What an argument of create<T>() travels as: its decayed type, except that a
/// C string travels as std::string (a pointer means nothing in the server).
template <class A>
using arg_t = std::conditional_t<std::is_same_v<std::decay_t<A>, const char*> || std::is_same_v<std::decay_t<A>, char*>,
                                 std::string, std::decay_t<A>>;

template <class P, class A>
void write_param(Encoder& e, A&& a) {
    using D = std::decay_t<P>;
    if constexpr (std::is_same_v<std::decay_t<A>, D>)
        e.write<D>(a);
    else
        e.write<D>(D(std::forward<A>(a)));
}

}  // namespace detail::server

// ---------------------------------------------------------------- proxies

/// The common part of every Proxy<T>: the reference and call<>().
template <class T>
class ProxyBase {
public:
    ProxyBase() = default;

    /// Runs method M (a member function of T) on the object in the server with
    /// `args` (converted to M's parameter types, carried by the codec) and
    /// returns its result, decoded.  Re-throws the method's exception as
    /// Remote<E>; ServerError if the server is gone or the proxy is empty.
    template <auto M, class... A>
    auto call(A&&... args) const {
        using Inv = detail::server::Method<T, M>;
        using R = std::decay_t<typename Inv::R>;
        static_assert(std::is_base_of_v<typename Inv::Traits::cls, T>,
                      "mpservice: call<&C::method>: C must be the proxy's class (or its base)");
        static_assert(sizeof...(A) == Inv::Traits::arity, "mpservice: call<&C::method>: wrong number of arguments");
        Encoder e;
        write_all<typename Inv::Params>(e, std::index_sequence_for<A...>{}, std::forward<A>(args)...);
        std::vector<detail::os::handle_t> handles;
        std::string bytes = detail::server::call_method(ref(), Inv::address(), e, handles);
        struct Closer {
            std::vector<detail::os::handle_t>& hs;
            ~Closer() {
                for (auto h : hs) detail::os::close_handle(h);
            }
        } closer{handles};
        if constexpr (std::is_void_v<R>) {
            return;
        } else {
            Decoder d(bytes.data(), bytes.size(), &handles);
            R r = d.read<R>();
            d.expect_end("method result");
            return r;
        }
    }

    /// Whether this proxy refers to an object.
    explicit operator bool() const noexcept { return static_cast<bool>(ref_); }
    /// The object's id in its server.
    std::uint64_t id() const noexcept { return ref_ ? ref_->id : 0; }
    /// Drops this handle's reference now (as destroying it would).
    void reset() noexcept { ref_.reset(); }

    /// (internal)
    const detail::server::RefPtr& ref_ptr() const noexcept { return ref_; }
    explicit ProxyBase(detail::server::RefPtr r) : ref_(std::move(r)) {}

protected:
    detail::server::Ref& ref() const {
        if (!ref_) throw ServerError("mpservice: call on an empty proxy (released or default-constructed)");
        return *ref_;
    }

private:
    template <class Params, std::size_t... I, class... A>
    static void write_all(Encoder& e, std::index_sequence<I...>, A&&... a) {
        (detail::server::write_param<std::tuple_element_t<I, Params>>(e, std::forward<A>(a)), ...);
    }
    detail::server::RefPtr ref_;
};

/// A handle to an object of class T hosted by a server process.
template <class T>
class Proxy : public ProxyBase<T> {
public:
    using ProxyBase<T>::ProxyBase;
};

/// Proxies travel through the codec as plain bytes (see the top of this file).
template <class T>
struct Codec<Proxy<T>> {
    static void encode(Encoder& e, const Proxy<T>& p) { detail::server::encode_ref(e, p.ref_ptr()); }
    static Proxy<T> decode(Decoder& d) {
        return Proxy<T>(detail::server::decode_ref(d, detail::server::type_hash_of<T>(), typeid(T).name()));
    }
};

// ---------------------------------------------------------------- objects made inside the server

/// Inside a server process (in a hosted object's method or constructor): hosts
/// a new T(args...) in this server and returns a proxy to it, which the method
/// can return - alone or nested in other data - to its caller (SPEC §4.4
/// `managed`).  InvalidStateError in any other process.
template <class T, class... A>
Proxy<T> managed(A&&... args) {
    if (!detail::server::in_server_process())
        throw InvalidStateError("mpservice: managed<T>() works only inside a server process (in a hosted method)");
    T* p = new T(std::forward<A>(args)...);
    detail::server::NewObject obj;
    try {
        obj = detail::server::new_object(p);
    } catch (...) {
        delete p;
        throw;
    }
    return Proxy<T>(detail::server::host_here(obj, detail::server::type_hash_of<T>()));
}

// ---------------------------------------------------------------- shared memory blocks

/// A block of shared memory hosted by a server (anonymous memory: no name in
/// /dev/shm, freed by the kernel when the server object and every mapping of
/// it are gone, whoever dies).  Made by server.MemoryBlock(n) or, in a hosted
/// method, by managed<MemoryBlock>(n); used through Proxy<MemoryBlock>.
class MemoryBlock {
public:
    /// size > 0, else std::invalid_argument.
    explicit MemoryBlock(std::size_t size) : mem_(detail::SharedMemory::create(checked(size))) {}
    std::size_t size() const noexcept { return mem_.size(); }
    unsigned char* data() const noexcept { return static_cast<unsigned char*>(mem_.data()); }
    /// (internal) the memory, for the proxies' mapping.
    const detail::SharedMemory& memory() const noexcept { return mem_; }

private:
    static std::size_t checked(std::size_t size) {
        if (size == 0) throw std::invalid_argument("mpservice: MemoryBlock of size 0");
        return size;
    }
    detail::SharedMemory mem_;
};

/// A view of bytes (C++17 has no std::span).
struct ByteSpan {
    unsigned char* ptr = nullptr;
    std::size_t len = 0;
    unsigned char* data() const noexcept { return ptr; }
    std::size_t size() const noexcept { return len; }
    unsigned char* begin() const noexcept { return ptr; }
    unsigned char* end() const noexcept { return ptr + len; }
    unsigned char& operator[](std::size_t i) const noexcept { return ptr[i]; }
};

/// A memory block, mapped in this process at first use (once per process,
/// whatever the number of proxies); writes are visible to every process at once.
template <>
class Proxy<MemoryBlock> : public ProxyBase<MemoryBlock> {
public:
    using ProxyBase<MemoryBlock>::ProxyBase;
    unsigned char* data() const { return static_cast<unsigned char*>(mapping().data()); }
    std::size_t size() const { return mapping().size(); }
    ByteSpan bytes() const { return ByteSpan{data(), size()}; }
    unsigned char& operator[](std::size_t i) const { return data()[i]; }

private:
    const detail::SharedMemory& mapping() const { return detail::server::block_mapping(ref()); }
};

// ---------------------------------------------------------------- hosted standard containers

/// A std::vector<T> hosted by a server, with its own lock (server.list<T>()).
template <class T>
class List {
public:
    List() = default;
    explicit List(std::vector<T> items) : items_(std::move(items)) {}
    void append(T v) {
        std::lock_guard<std::mutex> g(m_);
        items_.push_back(std::move(v));
    }
    void extend(std::vector<T> vs) {
        std::lock_guard<std::mutex> g(m_);
        for (auto& v : vs) items_.push_back(std::move(v));
    }
    void insert(std::int64_t i, T v) {
        std::lock_guard<std::mutex> g(m_);
        auto n = static_cast<std::int64_t>(items_.size());
        if (i < 0) i = std::max<std::int64_t>(0, i + n);
        if (i > n) i = n;
        items_.insert(items_.begin() + i, std::move(v));
    }
    T get(std::int64_t i) const {
        std::lock_guard<std::mutex> g(m_);
        return items_[index(i)];
    }
    void set(std::int64_t i, T v) {
        std::lock_guard<std::mutex> g(m_);
        items_[index(i)] = std::move(v);
    }
    T pop(std::int64_t i) {
        std::lock_guard<std::mutex> g(m_);
        std::size_t k = index(i);
        T v = std::move(items_[k]);
        items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(k));
        return v;
    }
    std::size_t len() const {
        std::lock_guard<std::mutex> g(m_);
        return items_.size();
    }
    void clear() {
        std::lock_guard<std::mutex> g(m_);
        items_.clear();
    }
    std::vector<T> copy() const {
        std::lock_guard<std::mutex> g(m_);
        return items_;
    }

private:
    std::size_t index(std::int64_t i) const {
        auto n = static_cast<std::int64_t>(items_.size());
        if (i < 0) i += n;
        if (i < 0 || i >= n)
            throw std::out_of_range("list index " + std::to_string(i) + " out of range (size " + std::to_string(n) + ")");
        return static_cast<std::size_t>(i);
    }
    mutable std::mutex m_;
    std::vector<T> items_;
};

/// A std::map<K, V> hosted by a server, with its own lock (server.dict<K, V>()).
/// get() of a missing key throws std::out_of_range (Python's KeyError).
template <class K, class V>
class Dict {
public:
    Dict() = default;
    explicit Dict(std::map<K, V> items) : items_(std::move(items)) {}
    void set(K k, V v) {
        std::lock_guard<std::mutex> g(m_);
        items_[std::move(k)] = std::move(v);
    }
    V get(const K& k) const {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        if (it == items_.end()) throw std::out_of_range("dict: key not found");
        return it->second;
    }
    std::optional<V> find(const K& k) const {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        if (it == items_.end()) return std::nullopt;
        return it->second;
    }
    V get_or(const K& k, V fallback) const {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        return it == items_.end() ? fallback : it->second;
    }
    bool contains(const K& k) const {
        std::lock_guard<std::mutex> g(m_);
        return items_.count(k) != 0;
    }
    V pop(const K& k) {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        if (it == items_.end()) throw std::out_of_range("dict: key not found");
        V v = std::move(it->second);
        items_.erase(it);
        return v;
    }
    V setdefault(K k, V v) {
        std::lock_guard<std::mutex> g(m_);
        return items_.emplace(std::move(k), std::move(v)).first->second;
    }
    void update(std::map<K, V> more) {
        std::lock_guard<std::mutex> g(m_);
        for (auto& kv : more) items_[kv.first] = std::move(kv.second);
    }
    std::size_t len() const {
        std::lock_guard<std::mutex> g(m_);
        return items_.size();
    }
    void clear() {
        std::lock_guard<std::mutex> g(m_);
        items_.clear();
    }
    std::vector<K> keys() const {
        std::lock_guard<std::mutex> g(m_);
        std::vector<K> out;
        for (auto& kv : items_) out.push_back(kv.first);
        return out;
    }
    std::vector<V> values() const {
        std::lock_guard<std::mutex> g(m_);
        std::vector<V> out;
        for (auto& kv : items_) out.push_back(kv.second);
        return out;
    }
    std::vector<std::pair<K, V>> items() const {
        std::lock_guard<std::mutex> g(m_);
        return std::vector<std::pair<K, V>>(items_.begin(), items_.end());
    }
    std::map<K, V> copy() const {
        std::lock_guard<std::mutex> g(m_);
        return items_;
    }

private:
    mutable std::mutex m_;
    std::map<K, V> items_;
};

/// One value hosted by a server, with its own lock (server.value<T>(v)).
template <class T>
class ValueBox {
public:
    ValueBox() = default;
    explicit ValueBox(T v) : v_(std::move(v)) {}
    T get() const {
        std::lock_guard<std::mutex> g(m_);
        return v_;
    }
    void set(T v) {
        std::lock_guard<std::mutex> g(m_);
        v_ = std::move(v);
    }
    /// Stores v and returns the previous value (one round trip).
    T exchange(T v) {
        std::lock_guard<std::mutex> g(m_);
        std::swap(v, v_);
        return v;
    }

private:
    mutable std::mutex m_;
    T v_{};
};

/// Named values of any types the codec carries, hosted by a server, with its
/// own lock (server.Namespace(); Python's Manager().Namespace()).  Python's
/// NamespaceProxy forwards attribute get, set and delete; here they are typed:
/// Proxy<Namespace>::set(name, v), get<T>(name), erase(name).  Values live in
/// the server as the T that was set (decoded there: a stored proxy keeps its
/// object alive, as one in a hosted list does); get<T> of another type than
/// the one stored is std::invalid_argument naming both, a missing name
/// std::out_of_range (Python's AttributeError).
class Namespace {
public:
    MPSERVICE_API Namespace();
    MPSERVICE_API ~Namespace();
    Namespace(const Namespace&) = delete;
    Namespace& operator=(const Namespace&) = delete;

    template <class T>
    void store(std::string name, T value) {
        Held old;  // a replaced value is destroyed unlocked (it may hold proxies)
        std::lock_guard<std::mutex> g(m_);
        Held& slot = slot_for(std::move(name));
        old = std::move(slot);
        slot.value = std::move(value);
        slot.type_name = typeid(T).name();
    }
    template <class T>
    T load(const std::string& name) const {
        std::lock_guard<std::mutex> g(m_);
        const Held& h = find(name);
        const T* v = std::any_cast<T>(&h.value);
        if (!v) throw_mismatch(name, h.type_name, typeid(T).name());
        return *v;
    }
    MPSERVICE_API bool contains(const std::string& name) const;
    /// Python's `del ns.name`: std::out_of_range if it is not there.
    MPSERVICE_API void erase(const std::string& name);
    MPSERVICE_API std::vector<std::string> names() const;
    /// The (readable) type of the value stored under `name`.
    MPSERVICE_API std::string type_of(const std::string& name) const;
    MPSERVICE_API std::size_t len() const;

private:
    struct Held {
        std::any value;
        const char* type_name = "";
    };
    MPSERVICE_API const Held& find(const std::string& name) const;
    /// The slot of `name`, made empty if there is none (under m_).
    MPSERVICE_API Held& slot_for(std::string name);
    [[noreturn]] MPSERVICE_API static void throw_mismatch(const std::string& name, const char* held, const char* asked);
    mutable std::mutex m_;
    struct Values;  // the implementation's std::map<std::string, Held>
    detail::Owned<Values> values_;
};

template <class T>
class Proxy<List<T>> : public ProxyBase<List<T>> {
    using L = List<T>;

public:
    using ProxyBase<L>::ProxyBase;
    void append(const T& v) const { this->template call<&L::append>(v); }
    void extend(const std::vector<T>& vs) const { this->template call<&L::extend>(vs); }
    void insert(std::int64_t i, const T& v) const { this->template call<&L::insert>(i, v); }
    /// Negative indices count from the end; std::out_of_range past it.
    T get(std::int64_t i) const { return this->template call<&L::get>(i); }
    T operator[](std::int64_t i) const { return get(i); }
    void set(std::int64_t i, const T& v) const { this->template call<&L::set>(i, v); }
    T pop(std::int64_t i = -1) const { return this->template call<&L::pop>(i); }
    std::size_t len() const { return this->template call<&L::len>(); }
    std::size_t size() const { return len(); }
    void clear() const { this->template call<&L::clear>(); }
    /// The whole list, copied here.
    std::vector<T> copy() const { return this->template call<&L::copy>(); }
};

template <class K, class V>
class Proxy<Dict<K, V>> : public ProxyBase<Dict<K, V>> {
    using D = Dict<K, V>;

public:
    using ProxyBase<D>::ProxyBase;
    void set(const K& k, const V& v) const { this->template call<&D::set>(k, v); }
    /// std::out_of_range if the key is missing.
    V get(const K& k) const { return this->template call<&D::get>(k); }
    std::optional<V> find(const K& k) const { return this->template call<&D::find>(k); }
    V get_or(const K& k, const V& fallback) const { return this->template call<&D::get_or>(k, fallback); }
    bool contains(const K& k) const { return this->template call<&D::contains>(k); }
    V pop(const K& k) const { return this->template call<&D::pop>(k); }
    V setdefault(const K& k, const V& v) const { return this->template call<&D::setdefault>(k, v); }
    void update(const std::map<K, V>& more) const { this->template call<&D::update>(more); }
    std::size_t len() const { return this->template call<&D::len>(); }
    std::size_t size() const { return len(); }
    void clear() const { this->template call<&D::clear>(); }
    std::vector<K> keys() const { return this->template call<&D::keys>(); }
    std::vector<V> values() const { return this->template call<&D::values>(); }
    std::vector<std::pair<K, V>> items() const { return this->template call<&D::items>(); }
    std::map<K, V> copy() const { return this->template call<&D::copy>(); }
};

template <class T>
class Proxy<ValueBox<T>> : public ProxyBase<ValueBox<T>> {
    using B = ValueBox<T>;

public:
    using ProxyBase<B>::ProxyBase;
    T get() const { return this->template call<&B::get>(); }
    void set(const T& v) const { this->template call<&B::set>(v); }
    T exchange(const T& v) const { return this->template call<&B::exchange>(v); }
};

/// A hosted Namespace.  Names starting with '_' are refused: Python keeps
/// those on the proxy object itself, and a C++ proxy has no attributes of its own.
template <>
class Proxy<Namespace> : public ProxyBase<Namespace> {
    using N = Namespace;

public:
    using ProxyBase<N>::ProxyBase;
    /// ns.name = v (a C string is stored as std::string).
    template <class T>
    void set(const std::string& name, T&& v) const {
        using V = detail::server::arg_t<T>;
        this->template call<&N::template store<V>>(checked(name), V(std::forward<T>(v)));
    }
    /// ns.name, as the type it was stored as: std::invalid_argument if it is
    /// another, std::out_of_range if there is no such name.
    template <class T>
    T get(const std::string& name) const {
        return this->template call<&N::template load<T>>(checked(name));
    }
    /// ns.name, or `fallback` if there is no such name (one round trip).
    template <class T>
    T get_or(const std::string& name, T fallback) const {
        try {
            return get<T>(name);
        } catch (const std::out_of_range&) {
            return fallback;
        }
    }
    MPSERVICE_API bool contains(const std::string& name) const;
    /// del ns.name: std::out_of_range if there is no such name.
    MPSERVICE_API void erase(const std::string& name) const;
    MPSERVICE_API std::vector<std::string> names() const;
    MPSERVICE_API std::string type_of(const std::string& name) const;
    MPSERVICE_API std::size_t len() const;

private:
    /// `name`, or std::invalid_argument if it is empty or starts with '_'.
    MPSERVICE_API static const std::string& checked(const std::string& name);
};

// ---------------------------------------------------------------- the server process

/// How a ServerProcess is made (all optional).
struct ServerOptions {
    std::string name;                     ///< default "ServerProcess-N"
    const Context* context = nullptr;     ///< default: the spawn context
    bool start = true;                    ///< start in the constructor
    std::chrono::milliseconds shutdown_timeout{1000};  ///< per step of shutdown()
};

/// Creation of hosted objects, for a ServerProcess and for a ServerClient
/// passed on to other processes.
class ServerAccess {
public:
    /// Constructs T(args...) in the server; the arguments travel by the codec.
    template <class T, class... A>
    Proxy<T> create(A&&... args) const {
        using C = detail::server::Creator<T, detail::server::arg_t<A>...>;
        Encoder e;
        (detail::server::write_param<detail::server::arg_t<A>>(e, std::forward<A>(args)), ...);
        return Proxy<T>(detail::server::create_object(link(), C::address(), detail::server::type_hash_of<T>(), e));
    }
    /// A hosted std::vector<T>.
    template <class T>
    Proxy<List<T>> list(std::vector<T> items = {}) const {
        return create<List<T>>(std::move(items));
    }
    /// A hosted std::map<K, V>.
    template <class K, class V>
    Proxy<Dict<K, V>> dict(std::map<K, V> items = {}) const {
        return create<Dict<K, V>>(std::move(items));
    }
    /// A hosted value.
    template <class T>
    Proxy<ValueBox<T>> value(T v = T{}) const {
        return create<ValueBox<T>>(std::move(v));
    }
    /// A hosted Namespace (Python's Manager().Namespace()).
    /// (Templates only so that their invokers are compiled, announced and
    /// linked only where they are called, not in every includer.)
    template <class N = mpservice::Namespace>
    Proxy<N> Namespace() const {
        return create<N>();
    }
    /// A shared memory block of `size` bytes (> 0), zero-filled.
    template <class B = mpservice::MemoryBlock>
    Proxy<B> MemoryBlock(std::size_t size) const {
        if (size == 0) throw std::invalid_argument("mpservice: MemoryBlock of size 0");
        return create<B>(size);
    }
    /// Objects alive in the server (diagnostics; includes objects kept by tickets in flight).
    MPSERVICE_API std::size_t object_count() const;
    /// Open descriptors and memory mappings of the server process (diagnostics).
    MPSERVICE_API std::pair<long, long> resource_counts() const;
    /// The server's address (an abstract-namespace socket name).
    MPSERVICE_API const std::string& address() const;

    /// (internal)
    MPSERVICE_API const detail::Shared<detail::server::Link>& link() const;

protected:
    ServerAccess() = default;
    detail::Shared<detail::server::Link> link_;
};

/// A handle to a running server that can be passed to other processes (as a
/// Process argument, in a queue item) to create objects there; it holds no
/// process and must not outlive its ServerProcess's use.
class ServerClient : public ServerAccess {
public:
    ServerClient() = default;
    MPSERVICE_API explicit ServerClient(detail::Shared<detail::server::Link> link);
};

/// A server process hosting objects (see the top of this file).  Started by
/// its constructor unless options.start is false; destroyed -> shut down.
class ServerProcess : public ServerAccess {
public:
    MPSERVICE_API ServerProcess();
    MPSERVICE_API explicit ServerProcess(const Context& ctx);
    MPSERVICE_API explicit ServerProcess(ServerOptions options);
    ServerProcess(const ServerProcess&) = delete;
    ServerProcess& operator=(const ServerProcess&) = delete;
    /// shutdown().
    MPSERVICE_API ~ServerProcess();

    /// Starts the server; InvalidStateError if it was started already.
    MPSERVICE_API void start();
    /// Asks the server to end, waits up to shutdown_timeout, then terminates
    /// it, waits again, then kills it.  Proxies fail with ServerError after it.
    /// Idempotent.
    MPSERVICE_API void shutdown() noexcept;
    MPSERVICE_API bool is_alive() const;
    MPSERVICE_API long pid() const;
    MPSERVICE_API const std::string& name() const;
    MPSERVICE_API std::optional<int> exitcode() const;
    /// The server's process (to join, kill, or watch it).
    Process<void>& process() { return *process_; }
    /// A handle for other processes to create objects on this server.
    ServerClient client() const { return ServerClient(link()); }

private:
    ServerOptions options_;
    detail::Owned<Process<void>> process_;  // empty until start()
};

/// The seed's name for it.
using Manager = ServerProcess;

template <>
struct Codec<ServerClient> {
    MPSERVICE_API static void encode(Encoder& e, const ServerClient& c);
    MPSERVICE_API static ServerClient decode(Decoder& d);
};

}  // namespace mpservice
