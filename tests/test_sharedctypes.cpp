// Value, RawValue, Array, RawArray: shared between real processes (fork()ed
// children, and children that decode the handles), exact totals under the
// lock, dead lock holders, bounds, codecs, leaks.
#include <doctest/doctest.h>

#include <cstring>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#include "fork_helpers.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;
using forktest::join;
using forktest::kill_and_join;
using forktest::spawn;
using forktest::in_child_decoded;

namespace {
struct Big {
    char bytes[8192];
};
struct alignas(64) Wide {
    double x;
    int tag;
};

}  // namespace

TEST_CASE("Value<long>: N processes x 100k increments under its lock give the exact total" * forktest::fork_only) {
    constexpr int processes = 4, increments = 100000;
    SUBCASE("with_lock") {
        mp::Value<long> v(0);
        std::vector<pid_t> children;
        for (int p = 0; p < processes; ++p)
            children.push_back(spawn([&] {
                for (int i = 0; i < increments; ++i) v.with_lock([](long& x) { ++x; });
                return 0;
            }));
        for (pid_t c : children) CHECK(join(c) == 0);
        CHECK(v.get() == long(processes) * increments);
    }
    SUBCASE("std::lock_guard on get_lock(), Value<long, Lock>, processes and threads") {
        mp::Value<long, mp::Lock> v(0);
        auto work = [&] {
            for (int i = 0; i < increments / 2; ++i) {
                std::lock_guard<mp::Lock> g(v.get_lock());
                v.get_obj() += 1;
            }
        };
        std::vector<pid_t> children;
        for (int p = 0; p < processes - 1; ++p)
            children.push_back(spawn([&] {
                std::thread t(work);
                work();
                t.join();
                return 0;
            }));
        std::thread t(work);
        work();
        t.join();
        for (pid_t c : children) CHECK(join(c) == 0);
        CHECK(v.load() == long(processes) * increments);
    }
}

TEST_CASE("Value: get/set/load/store/operator=, RLock re-entry, shared external lock" * forktest::fork_only) {
    mp::Value<double> d(1.5);
    CHECK(d.get() == 1.5);
    d = 2.5;
    CHECK(d.load() == 2.5);
    d.store(-1);
    CHECK(d.get_obj() == -1);
    {
        std::lock_guard<mp::RLock> g(d.get_lock());
        d.set(d.get() + 10);  // re-enters its RLock
    }
    CHECK(d.get() == 9);
    CHECK(d.with_lock([](double& x) { return x * 2; }) == 18);

    mp::Value<int> defaulted;
    CHECK(defaulted.get() == 0);

    mp::Lock shared;
    mp::Value<int, mp::Lock> a(1, shared), b(2, shared);
    {
        std::lock_guard<mp::Lock> g(a.get_lock());
        CHECK(b.get_lock().is_mine());  // the same lock guards both
        a.get_obj() += b.get_obj();
    }
    CHECK(a.get() == 3);

    mp::Value<Wide> w(Wide{1.0, 7});
    pid_t child = spawn([&] {
        w.set(Wide{2.0, 8});
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK(w.get().x == 2.0);
    CHECK(w.get().tag == 8);

    mp::Value<int> copy_of = defaulted;  // a handle: the same value
    copy_of = 5;
    CHECK(defaulted.get() == 5);
}

TEST_CASE("RawValue: no lock, visible across processes" * forktest::fork_only) {
    mp::RawValue<int> r(3);
    CHECK(*r == 3);
    pid_t child = spawn([&] {
        if (r.get() != 3) return 1;
        r = 4;
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK(r.get() == 4);
    r.store(9);
    CHECK(r.load() == 9);
    mp::RawValue<Wide> w;
    w->tag = 3;
    CHECK(w.get_obj().tag == 3);
    CHECK(reinterpret_cast<std::uintptr_t>(&w.get_obj()) % 64 == 0);
}

TEST_CASE("Array: span-like access, bounds, initializers, lock, across processes" * forktest::fork_only) {
    mp::Array<int> a(10);
    CHECK(a.size() == 10);
    CHECK_FALSE(a.empty());
    for (int x : a) CHECK(x == 0);
    a[3] = 7;
    a.at(9) = 1;
    CHECK_THROWS_AS(a.at(10), std::out_of_range);
    CHECK(std::accumulate(a.begin(), a.end(), 0) == 8);
    CHECK(a.data() == &a[0]);
    CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % 64 == 0);

    pid_t child = spawn([&] {
        std::lock_guard<mp::RLock> g(a.get_lock());
        for (std::size_t i = 0; i < a.size(); ++i) a[i] += int(i);
        return 0;
    });
    CHECK(join(child) == 0);
    std::vector<int> expect{0, 1, 2, 10, 4, 5, 6, 7, 8, 10};
    CHECK(a.to_vector() == expect);
    CHECK(a.with_lock([](const mp::Array<int>& arr) { return arr[3]; }) == 10);

    mp::Array<double> filled(4, 0.5);
    CHECK(filled.to_vector() == std::vector<double>(4, 0.5));
    mp::Array<int> listed{1, 2, 3};
    CHECK(listed.size() == 3);
    CHECK(listed[2] == 3);
    mp::Array<int> from_vector(std::vector<int>{4, 5});
    CHECK(from_vector.to_vector() == std::vector<int>{4, 5});
    mp::Array<int> none(0);
    CHECK(none.empty());
    CHECK(none.begin() == none.end());
    CHECK_THROWS_AS(none.at(0), std::out_of_range);
    CHECK_THROWS_AS(mp::Array<double>(std::size_t(-1) / 4), std::length_error);

    mp::Array<Wide, mp::Lock> wide(3, Wide{1.0, 2});
    CHECK(wide[2].tag == 2);
    CHECK(reinterpret_cast<std::uintptr_t>(&wide[1]) % 64 == 0);
}

TEST_CASE("Array<long>: processes increment disjoint and shared elements exactly" * forktest::fork_only) {
    constexpr int processes = 3, rounds = 20000;
    mp::Array<long> a(processes + 1);
    std::vector<pid_t> children;
    for (int p = 0; p < processes; ++p)
        children.push_back(spawn([&, p] {
            for (int i = 0; i < rounds; ++i) {
                a[std::size_t(p)] += 1;  // own element: no lock needed
                std::lock_guard<mp::RLock> g(a.get_lock());
                a[processes] += 1;
            }
            return 0;
        }));
    for (pid_t c : children) CHECK(join(c) == 0);
    for (int p = 0; p < processes; ++p) CHECK(a[std::size_t(p)] == rounds);
    CHECK(a[processes] == long(processes) * rounds);
}

TEST_CASE("RawArray: no lock, visible across processes" * forktest::fork_only) {
    mp::RawArray<unsigned char> bytes(1 << 20);
    pid_t child = spawn([&] {
        std::memset(bytes.data(), 0xab, bytes.size());
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK(bytes[0] == 0xab);
    CHECK(bytes[bytes.size() - 1] == 0xab);
    CHECK_THROWS_AS(bytes.at(bytes.size()), std::out_of_range);
    mp::RawArray<int> listed{5, 6};
    CHECK(listed.to_vector() == std::vector<int>{5, 6});
}

TEST_CASE("Value and Array: a lock holder that dies is reported once; the data stays usable" * forktest::fork_only) {
    mp::Value<long> v(41);
    mp::Event held;
    pid_t child = spawn([&] {
        v.get_lock().acquire();
        v.get_obj() = 42;  // the update completes; the process dies holding the lock
        held.set();
        forktest::pause_forever();
        return 0;
    });
    CHECK(held.wait(30s));
    CHECK(kill_and_join(child) == forktest::killed);
    CHECK_THROWS_AS(v.get(), mp::OwnerDiedError);
    CHECK_FALSE(v.get_lock().is_mine());  // released again
    CHECK(v.get() == 42);                 // and usable at once
    v.set(43);
    CHECK(v.get() == 43);

    // The repair path: take the lock yourself and look.
    child = spawn([&] {
        v.get_lock().acquire();
        v.get_obj() = -1;  // "half-updated"
        return 0;          // exits holding the lock
    });
    CHECK(join(child) == 0);
    CHECK(v.get_lock().acquire_checked() == mp::LockStatus::owner_died);
    v.get_obj() = 0;  // repaired
    v.get_lock().make_consistent();
    v.get_lock().release();
    CHECK(v.get() == 0);

    mp::Array<int> a(4);
    child = spawn([&] {
        a.get_lock().acquire();
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK_THROWS_AS(a.to_vector(), mp::OwnerDiedError);
    CHECK(a.to_vector() == std::vector<int>(4, 0));
}

TEST_CASE("Codec: decoded Value/Array/RawValue/RawArray handles share memory and lock" * forktest::fork_only) {
    mp::Value<long> v(1);
    {
        mp::Encoder e;
        e.write(v);
        CHECK(e.handles().size() == 1);  // the lock travels in the value's block
    }
    v.get_lock().acquire();
    CHECK(in_child_decoded(v, [](mp::Value<long> c) {
              if (c.get_lock().try_lock()) return 1;  // the same lock: held by the parent
              c.get_obj() = 2;
              return 0;
          }) == 0);
    v.get_lock().release();
    CHECK(v.get() == 2);

    mp::Lock external;
    mp::Value<int, mp::Lock> guarded(0, external);
    {
        mp::Encoder e;
        e.write(guarded);
        CHECK(e.handles().size() == 2);
    }
    external.acquire();
    CHECK(in_child_decoded(guarded, [](mp::Value<int, mp::Lock> c) { return c.get_lock().try_lock() ? 1 : 0; }) ==
          0);
    external.release();

    mp::Array<int> a{1, 2, 3};
    CHECK(in_child_decoded(a, [](mp::Array<int> c) {
              if (c.size() != 3) return 1;
              c.with_lock([](const mp::Array<int>& arr) { arr[0] = 10; });
              return 0;
          }) == 0);
    CHECK(a[0] == 10);

    mp::RawArray<double> ra(5, 1.0);
    CHECK(in_child_decoded(ra, [](mp::RawArray<double> c) {
              c[4] = 2.0;
              return c.size() == 5 ? 0 : 1;
          }) == 0);
    CHECK(ra[4] == 2.0);

    mp::RawValue<int> rv(1);
    CHECK(in_child_decoded(rv, [](mp::RawValue<int> c) {
              c = 3;
              return 0;
          }) == 0);
    CHECK(rv.get() == 3);

    // Decoding as the wrong kind, or a block too small for the type, is a DecodeError.
    mp::Encoder e;
    e.write(ra);
    mp::Decoder as_locked(e.bytes(), &e.handles());
    CHECK_THROWS_AS(as_locked.read<mp::Array<double>>(), mp::DecodeError);
    mp::Encoder small;
    small.write(rv);
    mp::Decoder too_big(small.bytes(), &small.handles());
    CHECK_THROWS_AS(too_big.read<mp::RawValue<Big>>(), mp::DecodeError);
    mp::Encoder wrong_lock;
    wrong_lock.write(v);
    mp::Decoder as_lock(wrong_lock.bytes(), &wrong_lock.handles());
    CHECK_THROWS_AS((as_lock.read<mp::Value<long, mp::Lock>>()), mp::DecodeError);
}

#if !defined(_WIN32)
TEST_CASE("No descriptor, mapping or /dev/shm leak after 1,000 Value/Array create/use/destroy cycles") {
    auto fds = forktest::open_fds();
    auto shm = forktest::dev_shm_entries();
    auto maps = forktest::mapping_count();
#else
// Windows: the process's handle count and the library's own count of views.
TEST_CASE("No handle or mapping leak after 1,000 Value/Array create/use/destroy cycles") {
    namespace os = mp::detail::os;
    {
        // One cycle first: what the system opens once for the first use (under
        // Wine a handle of its own) is not a leak of the cycles.
        mp::Value<long> v(0);
        v.set(v.get() + 1);
        mp::Array<int> a(100);
        a[5] = a.to_vector()[4] + 1;
    }
    const long handles = os::open_handle_count(), maps = os::mapping_count();
#endif
    for (int i = 0; i < 1000; ++i) {
        mp::Value<long> v(i);
        mp::RawValue<int> rv(i);
        mp::Array<int> a(100);
        mp::RawArray<char> ra(5000);
        v.set(v.get() + 1);
        a[5] = a.to_vector()[4] + 1;
        mp::Encoder e;
        e.write(a);
        mp::Decoder d(e.bytes(), &e.handles());
        auto copy = d.read<mp::Array<int>>();
        copy[0] = 1;
    }
#if !defined(_WIN32)
    CHECK(forktest::open_fds() == fds);
    CHECK(forktest::dev_shm_entries() == shm);
    CHECK(forktest::mapping_count() == maps);
#else
    CHECK(os::open_handle_count() == handles);
    CHECK(os::mapping_count() == maps);
#endif
}

// ============================================================================ as Process arguments

namespace {
int add_under_lock(mp::Value<long> v, mp::Array<long> a, int n) {
    for (int i = 0; i < n; ++i) {
        v.with_lock([](long& x) { ++x; });
        std::lock_guard<mp::RLock> g(a.get_lock());
        a[0] += 1;
    }
    return 0;
}
int die_holding_value_lock(mp::Value<long> v, mp::Event held) {
    v.get_lock().acquire();
    v.get_obj() = 42;  // the update completes; the process dies holding the lock
    held.set();
    forktest::die_hard();
    return 0;
}
int exit_holding_value_lock(mp::Value<long> v) {
    v.get_lock().acquire();
    v.get_obj() = -1;  // "half-updated"
    return 0;          // exits holding the lock
}
int exit_holding_array_lock(mp::Array<int> a) {
    a.get_lock().acquire();
    return 0;
}
}  // namespace

// The dead-owner story of the fork()ed case above, with spawned children that
// get the objects as arguments (so it runs on Windows too).
TEST_CASE_TEMPLATE("Process arguments: a Value/Array lock holder that dies is reported once; the data stays usable",
                   Ctx, mp::SpawnContext, mp::ForkServerContext) {
    mp::Value<long> v(41);
    mp::Event held;
    mp::Process<int> killed(Ctx{}, die_holding_value_lock, v, held);
    killed.start();
    CHECK(held.wait(30s));
    CHECK_THROWS_AS(killed.join(), mp::ProcessError);
    CHECK_THROWS_AS(v.get(), mp::OwnerDiedError);
    CHECK_FALSE(v.get_lock().is_mine());  // released again
    CHECK(v.get() == 42);                 // and usable at once

    mp::Process<int> exits(Ctx{}, exit_holding_value_lock, v);
    exits.start();
    CHECK(exits.result(30s) == 0);
    CHECK(v.get_lock().acquire_checked() == mp::LockStatus::owner_died);
    v.get_obj() = 0;  // repaired
    v.get_lock().make_consistent();
    v.get_lock().release();
    CHECK(v.get() == 0);

    mp::Array<int> a(4);
    mp::Process<int> array_holder(Ctx{}, exit_holding_array_lock, a);
    array_holder.start();
    CHECK(array_holder.result(30s) == 0);
    CHECK_THROWS_AS(a.to_vector(), mp::OwnerDiedError);
    CHECK(a.to_vector() == std::vector<int>(4, 0));
}

TEST_CASE_TEMPLATE("Process arguments: N processes x 100k increments of a Value<long> and an Array<long>", Ctx,
                   mp::SpawnContext, mp::ForkServerContext) {
    constexpr int processes = 3, increments = 100000;
    mp::Value<long> v(0);
    mp::Array<long> a(2);
    std::vector<mp::Process<int>> ps;
    for (int i = 0; i < processes; ++i) ps.emplace_back(Ctx{}, add_under_lock, v, a, increments);
    for (auto& p : ps) p.start();
    for (auto& p : ps) CHECK(p.result(60s) == 0);
    CHECK(v.get() == long(processes) * increments);
    CHECK(a[0] == long(processes) * increments);
}
