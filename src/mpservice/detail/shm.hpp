// shm: a block of anonymous shared memory, the home of every shared object
// (locks, events, values, queues).
//
// A SharedMemory is a cheap, copyable, reference-counted view of one mapping.
// Encoding it attaches its handle to the message; decoding maps the handle that
// arrived, so a child that receives it sees the very same bytes.  The kernel
// frees the memory when the last handle and mapping in any process are gone,
// which includes processes killed by SIGKILL: there is no name to leak.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#include "../public/codec.hpp"
#include "os.hpp"

namespace mpservice::detail {

class SharedMemory {
public:
    SharedMemory() = default;

    /// New zero-filled shared memory of `size` bytes (> 0).
    static SharedMemory create(std::size_t size);
    /// Maps the memory behind `h`, taking ownership of `h`.
    static SharedMemory adopt(os::handle_t h);

    void* data() const noexcept { return m_ ? m_->addr : nullptr; }
    std::size_t size() const noexcept { return m_ ? m_->size : 0; }
    os::handle_t handle() const noexcept { return m_ ? m_->handle : os::invalid_handle; }
    explicit operator bool() const noexcept { return static_cast<bool>(m_); }
    /// Number of SharedMemory objects in *this process* sharing the mapping.
    long use_count() const noexcept { return m_.use_count(); }

    /// Declares that a robust mutex lives at `m` inside this block.  While a
    /// thread of this process holds it, the block stays mapped even after its
    /// last handle here is gone: the kernel marks a robust mutex whose owner
    /// ended by walking that thread's robust list *in the mapped memory*, so an
    /// unmapped block would leave the mutex locked forever (and its list entry
    /// pointing at nothing).  Costs nothing on lock or unlock.
    MPSERVICE_API void keep_mapped_while_held(os::RobustMutex* m) const;

private:
    /// What the inline accessors read.  The rest of the mapping (the mutexes
    /// of keep_mapped_while_held, and unmapping) is the implementation's
    /// Mapping, which derives from it - out of every includer's sight.
    struct View {
        os::handle_t handle = os::invalid_handle;
        void* addr = nullptr;
        std::size_t size = 0;
    };
    struct Mapping;
    Shared<View> m_;
};

/// A T constructed in its own block of shared memory, reached through a
/// SharedMemory; copies (and decoded copies in other processes) refer to the
/// same object.  The creator constructs it; nobody runs its destructor, since
/// no process knows it is the last one (T must be trivially destructible).
template <class T>
class SharedObject {
    static_assert(std::is_trivially_destructible_v<T>, "a shared object is never destroyed");

public:
    SharedObject() = default;
    template <class... Args>
    static SharedObject create(Args&&... args) {
        SharedObject o;
        o.mem_ = SharedMemory::create(sizeof(T));
        ::new (o.mem_.data()) T(std::forward<Args>(args)...);
        return o;
    }
    T* get() const noexcept { return static_cast<T*>(mem_.data()); }
    T* operator->() const noexcept { return get(); }
    T& operator*() const noexcept { return *get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(mem_); }
    const SharedMemory& memory() const noexcept { return mem_; }

    static void encode(Encoder& e, const SharedObject& o) { e.write(o.mem_); }
    static SharedObject decode(Decoder& d) {
        SharedObject o;
        o.mem_ = d.read<SharedMemory>();
        if (o.mem_.size() < sizeof(T)) throw DecodeError("decode: shared object is smaller than its type");
        return o;
    }

private:
    SharedMemory mem_;
};

}  // namespace mpservice::detail

namespace mpservice {

template <>
struct Codec<detail::SharedMemory> {
    static void encode(Encoder& e, const detail::SharedMemory& m);
    static detail::SharedMemory decode(Decoder& d);
};

template <class T>
struct Codec<detail::SharedObject<T>> {
    static void encode(Encoder& e, const detail::SharedObject<T>& o) { detail::SharedObject<T>::encode(e, o); }
    static detail::SharedObject<T> decode(Decoder& d) { return detail::SharedObject<T>::decode(d); }
};

}  // namespace mpservice
