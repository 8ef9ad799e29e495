// Codec throughput: encoding and decoding a vector of 1M ints and a map of
// 100k strings, against a plain memcpy of the same encoded bytes (the floor)
// in this program; bench/python/codec.py measures Python's pickle on the same
// values under the same case names.
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "harness.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

// The map's keys and values; bench/python/codec.py builds the same ones.
std::map<std::string, int> make_map(int n) {
    std::map<std::string, int> m;
    for (int i = 0; i < n; ++i) m.emplace("key-" + std::to_string(i * 7919) + "-value", i);
    return m;
}

// Our encode and decode of `value`, then memcpy of the same number of bytes
// into a buffer that is reused (warm), as the floor any encoding must pay.
template <class T>
void encode_decode_case(const std::string& what, const T& value, int reps) {
    const std::string encoded = mp::encode(value);
    std::string copy(encoded.size(), '\0');
    const auto memcpy_ms = bench::time_ms(reps, [&] {
        std::memcpy(&copy[0], encoded.data(), encoded.size());
        bench::keep(copy);
    });
    const std::string memcpy_label = "memcpy of the " + std::to_string(encoded.size()) + " encoded bytes";

    const std::string enc = "codec: encode " + what;
    if (bench::wanted(enc)) {
        bench::report(enc, "ours", "mpservice::encode", "ms", bench::time_ms(reps, [&] {
                          std::string bytes = mp::encode(value);
                          bench::keep(bytes);
                      }));
        bench::report(enc, "anchor", memcpy_label, "ms", memcpy_ms);
    }
    const std::string dec = "codec: decode " + what;
    if (bench::wanted(dec)) {
        bench::report(dec, "ours", "mpservice::decode", "ms", bench::time_ms(reps, [&] {
                          T back = mp::decode<T>(encoded);
                          bench::keep(back);
                      }));
        bench::report(dec, "anchor", memcpy_label, "ms", memcpy_ms);
    }
}

}  // namespace

int main() {
    std::vector<int> ints(1'000'000);
    for (std::size_t i = 0; i < ints.size(); ++i) ints[i] = static_cast<int>(i);
    encode_decode_case("vector<int> 1M", ints, bench::reps(11));
    encode_decode_case("map<string,int> 100k", make_map(100'000), bench::reps(7));
    return 0;
}
