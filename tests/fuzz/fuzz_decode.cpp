// libFuzzer target for the codec's decoder (built and run by tools/fuzz.sh).
//
// The first input byte picks one of many types; the rest is decoded as that
// type.  Decoding may only succeed or throw mpservice::DecodeError: any other
// exception (std::length_error, std::bad_alloc, ...) escapes and libFuzzer
// reports it, as do ASan/UBSan findings.  For types whose encoding is
// canonical (no hash or ordered containers) a successful decode must re-encode
// to exactly the input bytes (structs with padding are not canonical: a copy
// need not keep the padding bytes).
//
// Exceptions (std::exception_ptr, alone and nested in containers) and the
// library's handles (Lock, Queue, Value, Array, ...) are fuzzed too.  Handles
// decode against a fixed table of descriptors that "arrived with the bytes":
// the shared-memory blocks of real objects of every kind, plus descriptors a
// malicious peer could send instead (/dev/null, a pipe, a 1-byte memfd).  A
// handle kind's seed refers to its own object's slot in that table; the
// fuzzer mutates the slot numbers and offsets from there.
//
// Built with -DMPSERVICE_FUZZ_WRITE_SEEDS instead of -fsanitize=fuzzer, this
// file is a small program that writes one seed file per type into a directory.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

// The handle kinds need the library's implementation (shared memory, locks).
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

enum class Kind : std::uint16_t { a, b, c };

struct Point {
    double x, y;
    std::int32_t tag;
};

struct Person {
    std::string name;
    int age = 0;
    std::vector<std::string> emails;
    std::optional<Point> home;
    Kind kind = Kind::a;
    short codes[2] = {0, 0};
    template <class Archive>
    void serialize(Archive& ar) {
        ar(name, age, emails, home, kind, codes);
    }
};

struct Tree {
    int value = 0;
    std::vector<Tree> children;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(value, children);
    }
};

// A trivially copyable struct with a bool: decoding must never produce a
// bool that is neither true nor false (issue 8 #11).  The fuzzer reads the
// field after a successful decode so that UBSan sees such a value.  Off until
// the fix of #11 lands on main (it fails today); then make it unconditional.
struct Flags {
    std::int32_t n;
    bool on;
};

struct Empty {
    template <class Archive>
    void serialize(Archive&) {}
};

/// The descriptors handle kinds decode against, and the objects that own them.
struct HandleTable {
    mp::Lock lock;
    mp::RLock rlock;
    mp::Event event;
    mp::Semaphore semaphore{3};
    mp::Condition condition;
    mp::Barrier barrier{2};
    mp::Value<int> value{5};
    mp::Array<double> array{1.0, 2.0, 3.0};
    mp::RawValue<long> raw_value{7};
    mp::RawArray<int> raw_array{1, 2};
    mp::Queue<int> queue{0, 4096};
    mp::JoinableQueue<std::string> joinable{0, 4096};
    mp::SimpleQueue<int> simple{4096};
    std::vector<int> fds;  // every object's descriptors, then the foreign ones

    HandleTable() {
        add(lock);
        add(rlock);
        add(event);
        add(semaphore);
        add(condition);
        add(barrier);
        add(value);
        add(array);
        add(raw_value);
        add(raw_array);
        add(queue);
        add(joinable);
        add(simple);
        // What a peer could send instead of shared memory.
        fds.push_back(::open("/dev/null", O_RDWR | O_CLOEXEC));
        int p[2];
        if (::pipe2(p, O_CLOEXEC) == 0) fds.push_back(p[0]);
        int tiny = ::memfd_create("fuzz-tiny", MFD_CLOEXEC);
        if (tiny >= 0 && ::ftruncate(tiny, 1) == 0) fds.push_back(tiny);
    }
    /// The slot where `obj`'s descriptors start.
    template <class T>
    int slot_of(const T& obj) const {
        mp::Encoder e;
        e.write(obj);
        for (std::size_t i = 0; i < fds.size(); ++i)
            if (fds[i] == e.handles()[0]) return static_cast<int>(i);
        std::abort();
    }

private:
    template <class T>
    void add(const T& obj) {
        mp::Encoder e;
        e.write(obj);
        for (int h : e.handles()) fds.push_back(h);  // owned by obj, which lives as long as the table
    }
};

HandleTable& handle_table() {
    static HandleTable* t = new HandleTable;  // never destroyed: the fuzzer exits without unwinding
    return *t;
}

/// A value that holds handles: the sample object and its slot in the table.
template <class T>
struct WithHandles {
    const T& sample;
    int slot;
};
template <class T>
WithHandles<T> handles_of(const T& obj) {
    return WithHandles<T>{obj, handle_table().slot_of(obj)};
}
template <class T>
struct is_with_handles : std::false_type {};
template <class T>
struct is_with_handles<WithHandles<T>> : std::true_type {};

// Decodes `bytes` as T.  `canonical`: the encoding has one form per value, so
// re-encoding what decoded must give the input back.
template <class T>
void fuzz_one(std::string_view bytes, bool canonical) {
    try {
        T value = mp::decode<T>(bytes);
        if constexpr (std::is_same_v<T, std::vector<Flags>>) {
            int on = 0;
            for (const Flags& f : value) on += f.on ? 1 : 0;  // UBSan: a bool must be 0 or 1
            if (on < 0) std::abort();
        }
        if (canonical && mp::encode(value) != bytes) {
            std::fprintf(stderr, "fuzz_decode: decoded value re-encodes to different bytes\n");
            std::abort();
        }
    } catch (const mp::DecodeError&) {
    }
}

// Decodes `bytes` as T against the handle table (never canonical: a handle
// re-encodes as a new slot number).
template <class T>
void fuzz_one_with_handles(std::string_view bytes) {
    try {
        mp::Decoder d(bytes, &handle_table().fds);
        T value = d.read<T>();
        d.expect_end();
    } catch (const mp::DecodeError&) {
    }
}

/// The bytes of a handle kind's seed: `obj` encoded with its descriptors at
/// their slots in the table.
template <class T>
std::string seed_with_handles(const WithHandles<T>& w) {
    mp::Encoder e;
    for (int i = 0; i < w.slot; ++i) e.attach(-1);  // placeholders: the slot numbers match the table
    e.write(w.sample);
    return e.bytes();
}

std::exception_ptr sample_exception() {
    try {
        try {
            throw std::system_error(std::make_error_code(std::errc::no_such_file_or_directory), "inner");
        } catch (...) {
            std::throw_with_nested(std::invalid_argument("outer"));
        }
    } catch (...) {
        return std::current_exception();
    }
}

using Variant = std::variant<std::monostate, int, std::string, std::vector<double>, bool>;
using Nested =
    std::map<std::string, std::vector<std::optional<std::tuple<int, std::set<std::string>, Variant>>>>;

// Every type the fuzzer exercises, with whether its encoding is canonical.
// The seed writer and the fuzz entry point both walk this one list.
template <class Visit>
void for_kind(unsigned kind, Visit&& visit) {
    switch (kind) {
        case 0:
            return visit(std::int32_t{-7}, true);
        case 1:
            return visit(true, true);
        case 2:
            return visit(std::string("hello"), true);
        case 3:
            return visit(std::vector<int>{1, 2, 3}, true);
        case 4:
            return visit(std::vector<bool>{true, false, true, true, false, false, true, false, true}, true);
        case 5:
            return visit(std::vector<std::string>{"a", "", "bcd"}, true);
        case 6:
            return visit(std::map<std::string, int>{{"one", 1}, {"two", 2}}, false);
        case 7:
            return visit(std::unordered_map<int, std::string>{{1, "x"}, {2, "y"}}, false);
        case 8:
            return visit(std::set<int>{3, 1, 2}, false);
        case 9:
            return visit(std::optional<std::string>("opt"), true);
        case 10:
            return visit(Variant(std::vector<double>{1.5}), true);
        case 11:
            return visit(
                std::tuple<char, std::u16string, std::array<std::string, 3>>{'c', u"w", {"p", "q", "r"}},
                true);
        case 12: {
            Person p;
            p.name = "Ann";
            p.emails = {"a@b"};
            p.home = Point{1, 2, 3};
            return visit(p, false);  // Point has padding bytes
        }
        case 13: {
            Tree t;
            t.children.resize(2);
            t.children[1].children.resize(1);
            return visit(t, true);
        }
        case 14:
            return visit(std::deque<std::list<std::u32string>>{{U"a", U"bc"}, {}}, true);
        case 15:
            return visit(std::multimap<int, std::vector<bool>>{{1, {true}}, {1, {}}}, false);
        case 16:
            return visit(std::vector<Empty>(3), true);
        case 17:
            return visit(std::pair<Point, bool>{{1, 2, 3}, true}, false);
        case 18:
            return visit(std::vector<Point>{{1, 2, 3}}, false);
        case 19: {
            Nested n;
            n["k"] = {std::nullopt, std::make_tuple(1, std::set<std::string>{"s"}, Variant(true))};
            return visit(n, false);
        }
        case 20:
            return visit(std::unordered_multiset<std::string>{"x", "x"}, false);
        case 21:
            return visit(std::vector<std::vector<std::vector<std::int8_t>>>{{{1}, {}}, {}}, true);
        case 22:
            return visit(sample_exception(), false);
        case 23:
            return visit(std::vector<std::exception_ptr>{std::make_exception_ptr(std::runtime_error("a")),
                                                         std::exception_ptr(),
                                                         std::make_exception_ptr(mp::ProcessError("p", -9))},
                         false);
        case 24: return visit(handles_of(handle_table().lock), false);
        case 25: return visit(handles_of(handle_table().rlock), false);
        case 26: return visit(handles_of(handle_table().event), false);
        case 27: return visit(handles_of(handle_table().semaphore), false);
        case 28: return visit(handles_of(handle_table().condition), false);
        case 29: return visit(handles_of(handle_table().barrier), false);
        case 30: return visit(handles_of(handle_table().value), false);
        case 31: return visit(handles_of(handle_table().array), false);
        case 32: return visit(handles_of(handle_table().raw_value), false);
        case 33: return visit(handles_of(handle_table().raw_array), false);
        case 34: return visit(handles_of(handle_table().queue), false);
        case 35: return visit(handles_of(handle_table().joinable), false);
        case 36: return visit(handles_of(handle_table().simple), false);
        case 37: return visit(std::vector<Flags>{{1, true}, {2, false}}, false);  // bools checked (issue 8 #11)
        default:
            return;
    }
}
constexpr unsigned kind_count = 38;

}  // namespace

#ifdef MPSERVICE_FUZZ_WRITE_SEEDS
int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s SEED_DIR\n", argv[0]);
        return 2;
    }
    for (unsigned kind = 0; kind < kind_count; ++kind) {
        for_kind(kind, [&](const auto& value, bool) {
            std::string encoded;
            if constexpr (is_with_handles<std::decay_t<decltype(value)>>::value)
                encoded = seed_with_handles(value);
            else
                encoded = mp::encode(value);
            const std::string bytes = std::string(1, static_cast<char>(kind)) + encoded;
            const std::string path = std::string(argv[1]) + "/seed_" + std::to_string(kind);
            std::FILE* f = std::fopen(path.c_str(), "wb");
            if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) std::exit(1);
            std::fclose(f);
        });
    }
    return 0;
}
#else
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
    for_kind(data[0] % kind_count, [&](const auto& sample, bool canonical) {
        using S = std::decay_t<decltype(sample)>;
        if constexpr (is_with_handles<S>::value)
            fuzz_one_with_handles<std::decay_t<decltype(sample.sample)>>(bytes);
        else
            fuzz_one<S>(bytes, canonical);
    });
    return 0;
}
#endif
