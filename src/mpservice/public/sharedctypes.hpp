// sharedctypes: Value<T>, RawValue<T>, Array<T> and RawArray<T> - plain data in
// shared memory (Python's multiprocessing.Value/RawValue/Array/RawArray).
//
// T must be trivially copyable: its bytes are shared as they are, so it may
// not own memory of the process that wrote it (no std::string, no pointers
// into the heap).  Reads and writes through any handle, in any process, act
// on the same bytes at once.
//
// Value and Array carry a lock (an RLock unless you choose Lock) that lives in
// the same shared block; get()/set()/with_lock()/to_vector() take it, the raw
// access paths (get_obj(), operator[], data()) do not - use them under
// get_lock(), e.g. `std::lock_guard g(v.get_lock()); v.get_obj() += 1;`.
// The Raw variants have no lock.
//
// Handles: copies, and copies received by other processes as Process
// arguments, refer to the same memory, which is freed when the last handle in
// the last process goes (see synchronize.hpp: no names, nothing to leak).
//
// Dead lock holders: the locked operations here (get, set, with_lock,
// to_vector) take the lock and, if its previous holder died, release it again
// and throw OwnerDiedError without doing their work - the data may be
// half-updated.  The lock is usable again at once; to inspect and repair the
// data before anyone else sees it, take the lock yourself with
// get_lock().acquire_checked() and check for LockStatus::owner_died.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "synchronize.hpp"

namespace mpservice {

namespace detail {

template <class T>
inline constexpr bool shareable_v = std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> && !std::is_array_v<T>;

template <class L>
inline constexpr bool is_lock_type_v = std::is_same_v<L, Lock> || std::is_same_v<L, RLock>;

/// Takes a data lock for one of the locked operations; see the file comment.
class DataLockGuard {
public:
    explicit DataLockGuard(const LockRef& l) : l_(l) {
        if (lock_acquire(l_, os::no_deadline) == LockStatus::owner_died) {
            lock_release(l_);
            throw OwnerDiedError(
                "mpservice: a process died while holding the lock of this shared value or array, so the "
                "data may be half-updated; the operation was not done. The lock is usable again; take it "
                "with get_lock().acquire_checked() to inspect and repair the data");
        }
    }
    ~DataLockGuard() { lock_release(l_); }
    DataLockGuard(const DataLockGuard&) = delete;
    DataLockGuard& operator=(const DataLockGuard&) = delete;

private:
    const LockRef& l_;
};

/// A value together with the lock made for it, in one block.
template <class T>
struct LockedValueBlock {
    LockState lock;
    T value;
    explicit LockedValueBlock(const T& v) : value(v) {}
};

/// Layout of an array block: this header at offset 0, the lock (locked
/// arrays) right after it, the elements at data_offset.
struct ArrayHeader {
    std::uint64_t size = 0;
    std::uint64_t data_offset = 0;
};

inline constexpr std::size_t array_lock_offset = 16;
static_assert(sizeof(ArrayHeader) <= array_lock_offset && array_lock_offset % alignof(LockState) == 0);

template <class T>
constexpr std::size_t array_data_offset(bool locked) {
    std::size_t start = locked ? array_lock_offset + sizeof(LockState) : sizeof(ArrayHeader);
    std::size_t align = alignof(T) > 64 ? alignof(T) : 64;  // elements start on a cache line of their own
    return (start + align - 1) / align * align;
}

/// The block of an array of n T, with the elements value-initialized (or,
/// from `init`, copied); returns the header.
template <class T>
SharedRef<ArrayHeader> create_array(std::size_t n, bool locked, const T* init, const T* fill) {
    const std::size_t offset = array_data_offset<T>(locked);
    if (n > (SIZE_MAX - offset) / sizeof(T))
        throw std::length_error("mpservice: shared array of " + std::to_string(n) + " elements is too large");
    // Zero-filled memory: skip the elements' first touch when zero bytes are
    // already their value-initialized state.
    auto ref = SharedRef<ArrayHeader>::create_sized(offset + n * sizeof(T) + (n == 0 ? 1 : 0));
    ref->size = n;
    ref->data_offset = offset;
    if (locked) ::new (static_cast<char*>(ref.memory().data()) + array_lock_offset) LockState();
    T* data = reinterpret_cast<T*>(static_cast<char*>(ref.memory().data()) + offset);
    for (std::size_t i = 0; i < n; ++i) {
        if (init)
            ::new (data + i) T(init[i]);
        else if (fill)
            ::new (data + i) T(*fill);
        else if (!std::is_trivially_default_constructible_v<T>)
            ::new (data + i) T();
    }
    return ref;
}

/// Decodes an array block and checks that its header fits the block.
template <class T>
SharedRef<ArrayHeader> decode_array(Decoder& d, bool locked) {
    auto ref = decode_ref<ArrayHeader>(d);
    if (ref.offset() != 0) throw DecodeError("decode: shared array header is not at the start of its block");
    const std::uint64_t size = ref->size, offset = ref->data_offset;
    const std::size_t total = ref.memory().size();
    if (offset < array_data_offset<T>(locked) || offset % alignof(T) != 0 || offset > total ||
        size > (total - offset) / sizeof(T))
        throw DecodeError("decode: shared array does not fit its shared memory block");
    return ref;
}

template <class T>
T* array_data(const SharedRef<ArrayHeader>& h) noexcept {
    return reinterpret_cast<T*>(static_cast<char*>(h.memory().data()) + h->data_offset);
}

}  // namespace detail

// ============================================================================ RawValue

/// A T in shared memory, without a lock (Python's RawValue).  Accesses are
/// plain loads and stores: synchronize them yourself.
template <class T>
class RawValue {
    static_assert(detail::shareable_v<T>,
                  "mpservice::RawValue<T>: T must be trivially copyable, not a pointer, not a C array (use "
                  "RawArray) - its bytes are shared between processes as they are");

public:
    using value_type = T;

    /// A new shared T holding `initial`.
    explicit RawValue(const T& initial = T{}) : value_(detail::SharedRef<T>::create_sized(sizeof(T), initial)) {}

    T get() const noexcept { return *value_; }
    void set(const T& v) const noexcept { *value_ = v; }
    T load() const noexcept { return get(); }
    void store(const T& v) const noexcept { set(v); }
    RawValue& operator=(const T& v) noexcept {
        set(v);
        return *this;
    }
    /// The shared T itself.
    T& get_obj() const noexcept { return *value_; }
    T& operator*() const noexcept { return *value_; }
    T* operator->() const noexcept { return value_.get(); }

    /// Internal.
    explicit RawValue(detail::SharedRef<T> ref) : value_(std::move(ref)) {}
    const detail::SharedRef<T>& ref() const noexcept { return value_; }

private:
    detail::SharedRef<T> value_;
};

// ============================================================================ Value

/// A T in shared memory guarded by a lock (Python's Value): an RLock of its own
/// by default, or Lock with Value<T, mp::Lock>, or a lock you pass in.
template <class T, class L = RLock>
class Value {
    static_assert(detail::shareable_v<T>,
                  "mpservice::Value<T>: T must be trivially copyable, not a pointer, not a C array - its bytes are "
                  "shared between processes as they are");
    static_assert(detail::is_lock_type_v<L>, "mpservice::Value<T, L>: L must be mpservice::Lock or RLock");

public:
    using value_type = T;
    using lock_type = L;

    /// A new shared T holding `initial`, with a new lock in the same block.
    explicit Value(const T& initial = T{}) {
        auto block = detail::SharedRef<detail::LockedValueBlock<T>>::create_sized(
            sizeof(detail::LockedValueBlock<T>), initial);
        value_ = block.alias(&block->value);
        lock_ = L(block.alias(&block->lock));
    }
    /// A new shared T guarded by `lock`, which may guard other objects too.
    Value(const T& initial, L lock)
        : value_(detail::SharedRef<T>::create_sized(sizeof(T), initial)), lock_(std::move(lock)) {}

    /// Reads under the lock.
    T get() const {
        detail::DataLockGuard g(lock_.lock_ref());
        return *value_;
    }
    /// Writes under the lock.
    void set(const T& v) const {
        detail::DataLockGuard g(lock_.lock_ref());
        *value_ = v;
    }
    T load() const { return get(); }
    void store(const T& v) const { set(v); }
    Value& operator=(const T& v) {
        set(v);
        return *this;
    }
    /// Calls f(T&) on the shared T under the lock; returns what f returns.
    template <class F>
    decltype(auto) with_lock(F&& f) const {
        detail::DataLockGuard g(lock_.lock_ref());
        return std::forward<F>(f)(*value_);
    }

    /// The lock: `std::lock_guard g(v.get_lock());` then use get_obj().
    L& get_lock() const noexcept { return lock_; }
    /// The shared T itself, unsynchronized.
    T& get_obj() const noexcept { return *value_; }

    /// Internal.
    Value(detail::SharedRef<T> value, L lock) : value_(std::move(value)), lock_(std::move(lock)) {}
    const detail::SharedRef<T>& ref() const noexcept { return value_; }

private:
    detail::SharedRef<T> value_;
    mutable L lock_{detail::SharedRef<detail::LockState>()};
};

// ============================================================================ RawArray

/// A fixed-size array of T in shared memory, without a lock (Python's RawArray).
/// Contiguous; span-like access.  Elements start value-initialized.
template <class T>
class RawArray {
    static_assert(detail::shareable_v<T>,
                  "mpservice::RawArray<T>: T must be trivially copyable, not a pointer, not a C array - its bytes are "
                  "shared between processes as they are");

public:
    using value_type = T;
    using size_type = std::size_t;
    using iterator = T*;
    using const_iterator = const T*;

    /// n value-initialized elements.  (Note: RawArray<int>{5} is one element, 5.)
    explicit RawArray(std::size_t n) : header_(detail::create_array<T>(n, false, nullptr, nullptr)) {}
    RawArray(std::size_t n, const T& fill) : header_(detail::create_array<T>(n, false, nullptr, &fill)) {}
    RawArray(std::initializer_list<T> init)
        : header_(detail::create_array<T>(init.size(), false, init.begin(), nullptr)) {}
    explicit RawArray(const std::vector<T>& init)
        : header_(detail::create_array<T>(init.size(), false, init.data(), nullptr)) {}

    std::size_t size() const noexcept { return static_cast<std::size_t>(header_->size); }
    bool empty() const noexcept { return size() == 0; }
    T* data() const noexcept { return detail::array_data<T>(header_); }
    T& operator[](std::size_t i) const noexcept { return data()[i]; }
    /// Bounds-checked element access; throws std::out_of_range.
    T& at(std::size_t i) const {
        if (i >= size())
            throw std::out_of_range("mpservice: array index " + std::to_string(i) + " out of range (size " +
                                    std::to_string(size()) + ")");
        return data()[i];
    }
    T* begin() const noexcept { return data(); }
    T* end() const noexcept { return data() + size(); }
    std::vector<T> to_vector() const { return std::vector<T>(begin(), end()); }

    /// Internal.
    explicit RawArray(detail::SharedRef<detail::ArrayHeader> header) : header_(std::move(header)) {}
    const detail::SharedRef<detail::ArrayHeader>& ref() const noexcept { return header_; }

private:
    detail::SharedRef<detail::ArrayHeader> header_;
};

// ============================================================================ Array

/// A fixed-size array of T in shared memory with a lock in the same block
/// (Python's Array).  Element access is unsynchronized; take get_lock() around
/// it, or use with_lock()/to_vector().
template <class T, class L = RLock>
class Array {
    static_assert(detail::shareable_v<T>,
                  "mpservice::Array<T>: T must be trivially copyable, not a pointer, not a C array - its bytes are "
                  "shared between processes as they are");
    static_assert(detail::is_lock_type_v<L>, "mpservice::Array<T, L>: L must be mpservice::Lock or RLock");

public:
    using value_type = T;
    using size_type = std::size_t;
    using iterator = T*;
    using const_iterator = const T*;
    using lock_type = L;

    /// n value-initialized elements.  (Note: Array<int>{5} is one element, 5.)
    explicit Array(std::size_t n) : Array(detail::create_array<T>(n, true, nullptr, nullptr)) {}
    Array(std::size_t n, const T& fill) : Array(detail::create_array<T>(n, true, nullptr, &fill)) {}
    Array(std::initializer_list<T> init) : Array(detail::create_array<T>(init.size(), true, init.begin(), nullptr)) {}
    explicit Array(const std::vector<T>& init)
        : Array(detail::create_array<T>(init.size(), true, init.data(), nullptr)) {}

    std::size_t size() const noexcept { return static_cast<std::size_t>(header_->size); }
    bool empty() const noexcept { return size() == 0; }
    T* data() const noexcept { return detail::array_data<T>(header_); }
    T& operator[](std::size_t i) const noexcept { return data()[i]; }
    /// Bounds-checked element access; throws std::out_of_range.
    T& at(std::size_t i) const {
        if (i >= size())
            throw std::out_of_range("mpservice: array index " + std::to_string(i) + " out of range (size " +
                                    std::to_string(size()) + ")");
        return data()[i];
    }
    T* begin() const noexcept { return data(); }
    T* end() const noexcept { return data() + size(); }

    /// A copy of the elements, taken under the lock.
    std::vector<T> to_vector() const {
        detail::DataLockGuard g(lock_.lock_ref());
        return std::vector<T>(begin(), end());
    }
    /// Calls f(*this) under the lock; returns what f returns.
    template <class F>
    decltype(auto) with_lock(F&& f) const {
        detail::DataLockGuard g(lock_.lock_ref());
        return std::forward<F>(f)(*this);
    }
    L& get_lock() const noexcept { return lock_; }

    /// Internal.
    explicit Array(detail::SharedRef<detail::ArrayHeader> header)
        : header_(std::move(header)),
          lock_(header_.alias(reinterpret_cast<detail::LockState*>(static_cast<char*>(header_.memory().data()) +
                                                                   detail::array_lock_offset))) {}
    const detail::SharedRef<detail::ArrayHeader>& ref() const noexcept { return header_; }

private:
    detail::SharedRef<detail::ArrayHeader> header_;
    mutable L lock_;
};

// ============================================================================ codecs

template <class T>
struct Codec<RawValue<T>> {
    static void encode(Encoder& e, const RawValue<T>& v) { detail::encode_ref(e, v.ref()); }
    static RawValue<T> decode(Decoder& d) { return RawValue<T>(detail::decode_ref<T>(d)); }
};

template <class T, class L>
struct Codec<Value<T, L>> {
    static void encode(Encoder& e, const Value<T, L>& v) {
        detail::encode_ref(e, v.ref());
        detail::encode_lock_beside(e, v.ref().memory(), v.get_lock().lock_ref());
    }
    static Value<T, L> decode(Decoder& d) {
        auto value = detail::decode_ref<T>(d);
        auto lock = detail::decode_lock_beside(d, value.memory());
        if (lock.recursive != std::is_same_v<L, RLock>) throw DecodeError("decode: Value lock kind differs");
        return Value<T, L>(std::move(value), L(std::move(lock.state)));
    }
};

template <class T>
struct Codec<RawArray<T>> {
    static void encode(Encoder& e, const RawArray<T>& a) { detail::encode_ref(e, a.ref()); }
    static RawArray<T> decode(Decoder& d) { return RawArray<T>(detail::decode_array<T>(d, false)); }
};

template <class T, class L>
struct Codec<Array<T, L>> {
    static void encode(Encoder& e, const Array<T, L>& a) { detail::encode_ref(e, a.ref()); }
    static Array<T, L> decode(Decoder& d) { return Array<T, L>(detail::decode_array<T>(d, true)); }
};

}  // namespace mpservice
