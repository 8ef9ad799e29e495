// config: version and the few switches a user may set before including.
#pragma once

#define MPSERVICE_VERSION_MAJOR 0
#define MPSERVICE_VERSION_MINOR 1
#define MPSERVICE_VERSION_PATCH 0
#define MPSERVICE_VERSION "0.1.0"

#if __cplusplus < 201703L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 201703L)
#error "mpservice.hpp needs C++17 or later"
#endif

#include <memory>

#if defined(_WIN32)
#define MPSERVICE_WIN32 1
#else
#define MPSERVICE_POSIX 1
#endif

// Linkage of the non-template functions defined in the implementation part.
#ifndef MPSERVICE_API
#define MPSERVICE_API
#endif

// Keeps a function out of its callers in the implementation TU, where its
// definition is visible: for code every template instance would otherwise
// copy (the footprint - bench/footprint_breakdown.py).
#if defined(__GNUC__) || defined(__clang__)
#define MPSERVICE_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define MPSERVICE_NOINLINE __declspec(noinline)
#else
#define MPSERVICE_NOINLINE
#endif

namespace mpservice::detail {

/// The owning pointer of a pimpl (a class defined in the implementation part):
/// std::unique_ptr<T>'s job, without its cost to every includer - each
/// unique_ptr<T> member instantiates some 150 class templates where the owner
/// is declared (bench/footprint_breakdown.py, includer).  Move-only; deletes
/// its object, so the owner's destructor must be out of line (as it must be
/// with unique_ptr).
template <class T>
class Owned {
public:
    Owned() noexcept = default;
    explicit Owned(T* p) noexcept : p_(p) {}
    Owned(Owned&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
    Owned& operator=(Owned&& o) noexcept {
        if (this != &o) {
            delete p_;
            p_ = o.p_;
            o.p_ = nullptr;
        }
        return *this;
    }
    Owned(const Owned&) = delete;
    Owned& operator=(const Owned&) = delete;
    ~Owned() { delete p_; }
    T* get() const noexcept { return p_; }
    T& operator*() const noexcept { return *p_; }
    T* operator->() const noexcept { return p_; }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    /// Deletes the object now.
    void reset() noexcept {
        T* old = p_;
        p_ = nullptr;
        delete old;
    }

private:
    T* p_ = nullptr;
};

/// A shared owning pointer to a T, held as a std::shared_ptr<void>: the
/// library's classes keep their internal state this way.  Why: each distinct
/// std::shared_ptr<T> a class holds costs every includer some 60-150 class
/// instantiations (its converting constructors' constraints, __shared_ptr,
/// the traits) where the class is declared, while shared_ptr<void> is
/// instantiated once for all.  The conversions from and to std::shared_ptr<T>
/// instantiate shared_ptr<T> only where they are used - in the
/// implementation.  The stored pointer is the T* of the shared_ptr<T> it was
/// made from, so get() is a plain cast; ownership is the shared_ptr's.
template <class T>
class Shared {
public:
    Shared() noexcept = default;
    Shared(std::nullptr_t) noexcept {}
    template <class U>
    Shared(std::shared_ptr<U> p) noexcept : p_(std::shared_ptr<T>(std::move(p))) {}
    T* get() const noexcept { return static_cast<T*>(p_.get()); }
    T& operator*() const noexcept { return *get(); }
    T* operator->() const noexcept { return get(); }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    /// As the std::shared_ptr<T> it is (sharing the ownership).
    std::shared_ptr<T> shared() const noexcept { return std::static_pointer_cast<T>(p_); }
    void reset() noexcept { p_.reset(); }
    long use_count() const noexcept { return p_.use_count(); }
    friend bool operator==(const Shared& a, const Shared& b) noexcept { return a.p_ == b.p_; }
    friend bool operator!=(const Shared& a, const Shared& b) noexcept { return a.p_ != b.p_; }

private:
    std::shared_ptr<void> p_;
};

}  // namespace mpservice::detail
