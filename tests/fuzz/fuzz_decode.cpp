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
// Built with -DMPSERVICE_FUZZ_WRITE_SEEDS instead of -fsanitize=fuzzer, this
// file is a small program that writes one seed file per type into a directory.
#include <cstdio>
#include <cstdlib>
#include <string>

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

struct Empty {
    template <class Archive>
    void serialize(Archive&) {}
};

// Decodes `bytes` as T.  `canonical`: the encoding has one form per value, so
// re-encoding what decoded must give the input back.
template <class T>
void fuzz_one(std::string_view bytes, bool canonical) {
    try {
        T value = mp::decode<T>(bytes);
        if (canonical && mp::encode(value) != bytes) {
            std::fprintf(stderr, "fuzz_decode: decoded value re-encodes to different bytes\n");
            std::abort();
        }
    } catch (const mp::DecodeError&) {
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
        default:
            return;
    }
}
constexpr unsigned kind_count = 22;

}  // namespace

#ifdef MPSERVICE_FUZZ_WRITE_SEEDS
int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s SEED_DIR\n", argv[0]);
        return 2;
    }
    for (unsigned kind = 0; kind < kind_count; ++kind) {
        for_kind(kind, [&](const auto& value, bool) {
            const std::string bytes = std::string(1, static_cast<char>(kind)) + mp::encode(value);
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
        fuzz_one<std::decay_t<decltype(sample)>>(bytes, canonical);
    });
    return 0;
}
#endif
