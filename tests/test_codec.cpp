// The value codec: round trips of every supported type, and malformed input
// that must give DecodeError (never a crash, an out-of-bounds read or a huge
// allocation).  Compile-time refusals are checked by tests/compile_fail/.
#include <doctest/doctest.h>

#include <cstring>
#include <limits>

#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

template <class T>
T round_trip(const T& value) {
    return mp::decode<T>(mp::encode(value));
}

template <class T>
std::string le_bytes(T v) {  // the codec writes native scalars; tests build input with the same layout
    std::string s(sizeof v, '\0');
    std::memcpy(&s[0], &v, sizeof v);
    return s;
}

std::string length_prefix(std::uint64_t n) { return le_bytes(n); }

// The DecodeError's message, or "" if decoding did not throw DecodeError.
template <class T>
std::string decode_error(std::string_view bytes) {
    try {
        (void)mp::decode<T>(bytes);
    } catch (const mp::DecodeError& e) {
        return e.what();
    }
    return "";
}

enum class Color : std::uint8_t { red, green, blue };
enum Plain { plain_a = 1, plain_b = 70000 };

struct Point {  // trivially copyable, no serialize: copied byte for byte
    double x, y;
    std::int32_t tag;
    bool operator==(const Point& o) const { return x == o.x && y == o.y && tag == o.tag; }
};

struct Person {  // the customization point
    std::string name;
    int age = 0;
    std::vector<std::string> emails;
    std::optional<Point> home;
    int scores[3] = {0, 0, 0};
    template <class Archive>
    void serialize(Archive& ar) {
        ar(name, age, emails, home, scores);
    }
    bool operator==(const Person& o) const {
        return name == o.name && age == o.age && emails == o.emails && home == o.home &&
               std::equal(std::begin(scores), std::end(scores), std::begin(o.scores));
    }
};

struct Tree {  // recursive: only reachable depth is bounded by the data
    int value = 0;
    std::vector<Tree> children;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(value, children);
    }
};

struct Empty {  // a serialize() that writes nothing
    template <class Archive>
    void serialize(Archive&) {}
    bool operator==(const Empty&) const { return true; }
};

struct NoDefault {  // trivially copyable without a default constructor
    explicit NoDefault(int v) : value(v) {}
    int value;
};

Tree chain(int depth) {
    Tree root;
    Tree* at = &root;
    for (int i = 1; i < depth; ++i) {
        at->children.emplace_back();
        at = &at->children.back();
        at->value = i;
    }
    return root;
}

}  // namespace

TEST_CASE("arithmetic, char and enum types round trip") {
    CHECK(round_trip(true) == true);
    CHECK(round_trip(false) == false);
    CHECK(round_trip('x') == 'x');
    CHECK(round_trip(static_cast<signed char>(-5)) == -5);
    CHECK(round_trip(static_cast<unsigned char>(250)) == 250);
    CHECK(round_trip(L'\u00e9') == L'\u00e9');
    CHECK(round_trip(u'\u20ac') == u'\u20ac');
    CHECK(round_trip(U'\U0001F600') == U'\U0001F600');
    CHECK(round_trip(std::numeric_limits<short>::min()) == std::numeric_limits<short>::min());
    CHECK(round_trip(std::numeric_limits<int>::max()) == std::numeric_limits<int>::max());
    CHECK(round_trip(std::numeric_limits<long long>::min()) == std::numeric_limits<long long>::min());
    CHECK(round_trip(std::numeric_limits<std::uint64_t>::max()) == std::numeric_limits<std::uint64_t>::max());
    CHECK(round_trip(3.25f) == 3.25f);
    CHECK(round_trip(-1e300) == -1e300);
    CHECK(round_trip(std::numeric_limits<double>::infinity()) == std::numeric_limits<double>::infinity());
    CHECK(round_trip(Color::blue) == Color::blue);
    CHECK(round_trip(plain_b) == plain_b);
    CHECK(mp::encode(true).size() == 1);
    CHECK(mp::encode(std::int16_t{7}).size() == 2);
}

TEST_CASE("strings round trip, including embedded zeros and wide strings") {
    CHECK(round_trip(std::string()).empty());
    CHECK(round_trip(std::string("hello")) == "hello");
    const std::string zeros("a\0b\0", 4);
    CHECK(round_trip(zeros) == zeros);
    const std::string big(3'000'000, 'z');
    CHECK(round_trip(big) == big);
    CHECK(round_trip(std::wstring(L"w\u00e9de")) == L"w\u00e9de");
    CHECK(round_trip(std::u32string(U"\U0001F600!")) == U"\U0001F600!");
}

TEST_CASE("sequences round trip") {
    CHECK(round_trip(std::vector<int>{}).empty());
    std::vector<int> ints(1'000'000);
    for (std::size_t i = 0; i < ints.size(); ++i) ints[i] = static_cast<int>(i * 7919);
    CHECK(round_trip(ints) == ints);
    CHECK(mp::encode(ints).size() == 8 + 4 * ints.size());  // one block, no per-element overhead

    const std::vector<std::string> words{"", "one", std::string(1000, 'x')};
    CHECK(round_trip(words) == words);
    const std::vector<Point> points{{1, 2, 3}, {-4.5, 6, 7}};
    CHECK(round_trip(points) == points);
    const std::vector<Color> colors{Color::red, Color::blue};
    CHECK(round_trip(colors) == colors);

    for (std::size_t n : {0, 1, 7, 8, 9, 64, 1001}) {
        std::vector<bool> bits(n);
        for (std::size_t i = 0; i < n; ++i) bits[i] = (i * 37) % 5 < 2;
        CHECK(round_trip(bits) == bits);
        CHECK(mp::encode(bits).size() == 8 + (n + 7) / 8);
    }

    const std::deque<std::string> dq{"a", "b"};
    CHECK(round_trip(dq) == dq);
    const std::list<double> lst{1.5, 2.5, 3.5};
    CHECK(round_trip(lst) == lst);
    CHECK(round_trip(std::list<int>{}).empty());

    const std::array<int, 4> arr{1, 2, 3, 4};
    CHECK(round_trip(arr) == arr);
    CHECK(mp::encode(arr).size() == 16);
    const std::array<std::string, 2> sarr{"x", "yy"};
    CHECK(round_trip(sarr) == sarr);
    CHECK(round_trip(std::array<int, 0>{}).empty());
    const std::vector<std::array<int, 3>> varr{{1, 2, 3}, {4, 5, 6}};
    CHECK(round_trip(varr) == varr);
}

TEST_CASE("pair, tuple, optional, variant round trip") {
    const std::pair<int, std::string> p{4, "four"};
    CHECK(round_trip(p) == p);
    const std::tuple<int, std::string, double, Color> t{1, "one", 1.0, Color::green};
    CHECK(round_trip(t) == t);
    CHECK(round_trip(std::tuple<>{}) == std::tuple<>{});
    CHECK(mp::encode(std::tuple<>{}).empty());

    CHECK(round_trip(std::optional<int>{}) == std::nullopt);
    CHECK(round_trip(std::optional<int>{0}) == 0);
    CHECK(round_trip(std::optional<std::string>{"s"}) == "s");

    using V = std::variant<std::monostate, int, std::string, std::vector<double>>;
    for (const V& v : {V{}, V{42}, V{std::string("str")}, V{std::vector<double>{1, 2}}})
        CHECK(round_trip(v) == v);
    using Same = std::variant<int, int>;
    const Same second(std::in_place_index<1>, 9);
    CHECK(round_trip(second).index() == 1);
}

TEST_CASE("maps and sets round trip") {
    std::map<std::string, int> m;
    for (int i = 0; i < 1000; ++i) m["key" + std::to_string(i)] = i;
    CHECK(round_trip(m) == m);
    CHECK(round_trip(std::map<int, int>{}).empty());

    std::unordered_map<int, std::string> um{{1, "a"}, {2, "b"}, {-3, ""}};
    CHECK(round_trip(um) == um);
    const std::multimap<int, int> mm{{1, 1}, {1, 2}, {2, 3}};
    CHECK(round_trip(mm) == mm);
    const std::unordered_multimap<std::string, int> umm{{"a", 1}, {"a", 2}};
    CHECK(round_trip(umm) == umm);

    const std::set<std::string> s{"x", "y", "z"};
    CHECK(round_trip(s) == s);
    const std::multiset<int> ms{1, 1, 2};
    CHECK(round_trip(ms) == ms);
    const std::unordered_set<long> us{5, 6, 7};
    CHECK(round_trip(us) == us);
    const std::unordered_multiset<char> ums{'a', 'a'};
    CHECK(round_trip(ums) == ums);
}

TEST_CASE("nested types round trip") {
    using Deep = std::map<
        std::string,
        std::vector<std::optional<std::tuple<int, std::set<std::string>, std::variant<int, std::string>>>>>;
    Deep d;
    d["a"] = {std::nullopt,
              std::make_tuple(1, std::set<std::string>{"p", "q"}, std::variant<int, std::string>("v"))};
    d["b"] = {};
    CHECK(round_trip(d) == d);

    const std::vector<std::vector<std::vector<int>>> cube{{{1}, {}}, {}, {{2, 3}}};
    CHECK(round_trip(cube) == cube);
    const std::pair<std::map<int, std::pair<int, int>>, std::array<std::vector<char>, 2>> mix{{{1, {2, 3}}},
                                                                                              {{{'a'}, {}}}};
    CHECK(round_trip(mix) == mix);
}

TEST_CASE("user types with serialize() and trivially copyable structs round trip") {
    Person ann;
    ann.name = "Ann";
    ann.age = 41;
    ann.emails = {"ann@example.org", "a@b.c"};
    ann.home = Point{1.5, -2, 9};
    ann.scores[0] = 7;
    ann.scores[2] = -1;
    CHECK(round_trip(ann) == ann);
    CHECK(round_trip(Person{}) == Person{});
    const std::vector<Person> people{ann, Person{}, ann};
    CHECK(round_trip(people) == people);
    const std::map<std::string, Person> by_name{{"ann", ann}};
    CHECK(round_trip(by_name) == by_name);

    CHECK(round_trip(Point{3, 4, 5}) == Point{3, 4, 5});
    CHECK(mp::encode(Point{}).size() == sizeof(Point));
    CHECK(round_trip(NoDefault(17)).value == 17);

    // Empty classes carry nothing: zero bytes, yet containers of them still round trip.
    struct Tag {};
    CHECK(mp::encode(Tag{}).empty());
    CHECK(mp::encode(std::monostate{}).empty());
    CHECK(round_trip(std::vector<Tag>(5)).size() == 5);
    // Empty serialize(): zero bytes per element, still bounded and still round trips.
    CHECK(mp::encode(Empty{}).empty());
    CHECK(round_trip(std::vector<Empty>(1000)).size() == 1000);

    // A recursive type up to the nesting limit (each Tree level is two levels: Tree + vector).
    const Tree t = chain(100);
    const Tree back = round_trip(t);
    const Tree* at = &back;
    int depth = 1;
    while (!at->children.empty()) {
        at = &at->children.front();
        ++depth;
    }
    CHECK(depth == 100);
    CHECK(at->value == 99);
}

TEST_CASE("the Encoder and Decoder work piece by piece, with serialize-style calls") {
    mp::Encoder e;
    e(1, std::string("two"), 3.0);
    e.write(std::vector<int>{4});
    mp::Decoder d(e.bytes());
    int one = 0;
    std::string two;
    double three = 0;
    d(one, two, three);
    CHECK(one == 1);
    CHECK(two == "two");
    CHECK(three == 3.0);
    CHECK(d.read<std::vector<int>>() == std::vector<int>{4});
    CHECK(d.at_end());
    CHECK_NOTHROW(d.expect_end());
}

// ---------------------------------------------------------------------------
// Malformed input: each kind gives DecodeError with a message saying what.

TEST_CASE("malformed: truncated scalar") {
    CHECK(decode_error<int>(std::string(3, '\0')).find("truncated") != std::string::npos);
    CHECK(decode_error<double>("").find("truncated") != std::string::npos);
    CHECK(decode_error<bool>("").find("truncated") != std::string::npos);
}

TEST_CASE("malformed: truncated string and string length beyond the input") {
    std::string bytes = mp::encode(std::string("hello world"));
    bytes.resize(bytes.size() - 3);
    CHECK(decode_error<std::string>(bytes).find("string length 11") != std::string::npos);
    CHECK(decode_error<std::string>(length_prefix(5) + "abc").find("cannot fit") != std::string::npos);
    CHECK(decode_error<std::string>(std::string(5, '\0')).find("truncated") !=
          std::string::npos);  // cut length
}

TEST_CASE("malformed: container length larger than the input") {
    CHECK(decode_error<std::vector<int>>(length_prefix(3) + std::string(8, '\0')).find("vector length 3") !=
          std::string::npos);
    CHECK(!decode_error<std::vector<std::string>>(length_prefix(2) + length_prefix(0)).empty());
    CHECK(!decode_error<std::map<int, int>>(length_prefix(2) + std::string(8, '\0')).empty());
    CHECK(!decode_error<std::list<int>>(length_prefix(1)).empty());
    CHECK(!decode_error<std::vector<bool>>(length_prefix(9) + std::string(1, '\0')).empty());
}

TEST_CASE("malformed: absurd lengths (2^63, 2^64-1) are refused before any allocation") {
    for (std::uint64_t n : {std::uint64_t(1) << 63, ~std::uint64_t(0), std::uint64_t(1) << 40}) {
        const std::string bytes = length_prefix(n) + std::string(16, 'x');
        CHECK(decode_error<std::string>(bytes).find("cannot fit") != std::string::npos);
        CHECK(!decode_error<std::vector<double>>(bytes).empty());
        CHECK(!decode_error<std::vector<std::vector<int>>>(bytes).empty());
        CHECK(!decode_error<std::unordered_map<int, int>>(bytes).empty());
        CHECK(!decode_error<std::vector<bool>>(bytes).empty());
        CHECK(decode_error<std::vector<Empty>>(bytes).find("take no bytes") != std::string::npos);
        CHECK(!decode_error<std::u32string>(bytes).empty());
    }
}

TEST_CASE("malformed: a bool byte other than 0 or 1") {
    CHECK(decode_error<bool>(std::string(1, '\x02')).find("bool byte is 2") != std::string::npos);
    CHECK(!decode_error<std::vector<bool>>(length_prefix(3) + std::string(1, '\x0f')).empty());  // stray bits
    CHECK(!decode_error<std::pair<int, bool>>(le_bytes(1) + std::string(1, '\xff')).empty());
}

TEST_CASE("malformed: variant index out of range") {
    using V = std::variant<int, std::string>;
    CHECK(decode_error<V>(le_bytes(std::uint32_t(2)) + le_bytes(0)).find("variant index 2") !=
          std::string::npos);
    CHECK(!decode_error<V>(le_bytes(std::uint32_t(0xffffffff))).empty());
}

TEST_CASE("malformed: optional flag other than 0 or 1") {
    CHECK(decode_error<std::optional<int>>(std::string(1, '\x05') + le_bytes(1)).find("optional flag") !=
          std::string::npos);
}

TEST_CASE("malformed: trailing bytes after the value") {
    CHECK(decode_error<int>(mp::encode(5) + "x").find("trailing") != std::string::npos);
    CHECK(decode_error<std::vector<int>>(mp::encode(std::vector<int>{1}) + std::string(4, '\0'))
              .find("trailing") != std::string::npos);
}

TEST_CASE("malformed: duplicate keys in a map or set") {
    const std::string two_same = length_prefix(2) + le_bytes(1) + le_bytes(10) + le_bytes(1) + le_bytes(20);
    CHECK(decode_error<std::map<int, int>>(two_same).find("duplicate key") != std::string::npos);
    CHECK(decode_error<std::unordered_map<int, int>>(two_same).find("duplicate key") != std::string::npos);
    const std::string set_same = length_prefix(2) + le_bytes(3) + le_bytes(3);
    CHECK(decode_error<std::set<int>>(set_same).find("duplicate key") != std::string::npos);
    CHECK(decode_error<std::unordered_set<int>>(set_same).find("duplicate key") != std::string::npos);
    // Multi-containers take repeats as they are.
    CHECK(mp::decode<std::multimap<int, int>>(two_same).size() == 2);
    CHECK(mp::decode<std::multiset<int>>(set_same).size() == 2);
}

TEST_CASE("malformed: nesting deeper than the limit") {
    // Hand-made input for a chain of 300 Trees: value, then one child, ... (the last has none).
    std::string bytes;
    for (int i = 0; i < 300; ++i) bytes += le_bytes(i) + length_prefix(i + 1 < 300 ? 1 : 0);
    CHECK(decode_error<Tree>(bytes).find("nests deeper than 256") != std::string::npos);
    // The encoder refuses what the decoder would refuse.
    CHECK_THROWS_AS(mp::encode(chain(300)), mp::Error);
    // A Tree level is two nesting levels (the Tree and its vector): 120 Trees are 240 levels, fine.
    CHECK(round_trip(chain(120)).children.size() == 1);
}

TEST_CASE("malformed: truncated inside nested containers and user types") {
    Person ann;
    ann.name = "Ann";
    ann.emails = {"x@y"};
    ann.home = Point{1, 2, 3};
    const std::string full = mp::encode(std::vector<Person>{ann, ann});
    for (std::size_t cut = 0; cut < full.size(); ++cut)
        CHECK_THROWS_AS(mp::decode<std::vector<Person>>(std::string_view(full).substr(0, cut)),
                        mp::DecodeError);

    const std::map<std::string, std::vector<std::string>> m{{"k", {"v1", "v2"}}, {"l", {}}};
    const std::string mb = mp::encode(m);
    for (std::size_t cut = 0; cut < mb.size(); ++cut)
        CHECK_THROWS_AS((mp::decode<std::map<std::string, std::vector<std::string>>>(mb.substr(0, cut))),
                        mp::DecodeError);
}

TEST_CASE("malformed: random bytes never crash, only throw DecodeError") {
    std::uint64_t state = 0x9e3779b97f4a7c15ull;
    auto next = [&state] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state;
    };
    using Mixed = std::tuple<std::vector<std::string>, std::map<int, std::optional<bool>>,
                             std::variant<int, std::set<std::string>>, Person>;
    int decoded = 0;
    for (int round = 0; round < 3000; ++round) {
        std::string bytes(next() % 64, '\0');
        for (auto& c : bytes) c = static_cast<char>(next() % 4 == 0 ? next() : next() % 3);
        try {
            (void)mp::decode<Mixed>(bytes);
            ++decoded;
        } catch (const mp::DecodeError&) {
        }
    }
    CHECK(decoded < 3000);  // almost all random inputs are rejected; none crashed
}

TEST_CASE("library handles need a channel that carries them") {
    mp::Encoder e;
    e.write(std::uint32_t{0});
    mp::Decoder d(e.bytes());
    CHECK_THROWS_AS(d.handle(0), mp::DecodeError);
    const std::vector<mp::detail::os::handle_t> one{3};
    mp::Decoder d2(e.bytes(), &one);
    CHECK(d2.handle(0) == 3);
    CHECK_THROWS_AS(d2.handle(1), mp::DecodeError);
}

namespace {
struct EncoderOnlyOverloads {  // serialize() that is not a template: no size probe, still works
    int a = 0;
    void serialize(mp::Encoder& e) { e(a); }
    void serialize(mp::Decoder& d) { d(a); }
};
}  // namespace

TEST_CASE("a serialize() written as two overloads instead of a template also works") {
    const std::vector<EncoderOnlyOverloads> v{{1}, {2}};
    const auto back = round_trip(v);
    REQUIRE(back.size() == 2);
    CHECK(back[1].a == 2);
    CHECK(!decode_error<std::vector<EncoderOnlyOverloads>>(length_prefix(1000)).empty());
}
