// bench_exception: what remote exceptions cost, in-process.
//
//   exception: encode+decode        encode_exception + decode_exception of a thrown
//                                   std::invalid_argument (throw-site stack symbolized,
//                                   ~10 frames) vs encoding + decoding a plain int result
//   exception: throw+catch          a throw through the library's __cxa_throw hook
//                                   (records the stack) vs the C++ runtime's own
//                                   __cxa_throw called directly, 10 frames deep
// (The cross-process round trip - child throws, parent catches - is measured
// with the process benchmarks.)
#include <cxxabi.h>
#include <dlfcn.h>

#include <new>
#include <stdexcept>
#include <typeinfo>

#include "harness.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

constexpr int kDepth = 10;

[[gnu::noinline]] void throw_hooked(int depth) {
    if (depth > 0) {
        throw_hooked(depth - 1);
        bench::keep(depth);
        return;
    }
    throw std::invalid_argument("bench");
}

using RealThrow = void (*)(void*, std::type_info*, void (*)(void*));

[[gnu::noinline]] void throw_unhooked(int depth, RealThrow real) {
    if (depth > 0) {
        throw_unhooked(depth - 1, real);
        bench::keep(depth);
        return;
    }
    void* obj = abi::__cxa_allocate_exception(sizeof(std::invalid_argument));
    ::new (obj) std::invalid_argument("bench");
    real(obj, const_cast<std::type_info*>(&typeid(std::invalid_argument)),
         [](void* p) { static_cast<std::invalid_argument*>(p)->~invalid_argument(); });
}

std::vector<double> per_op_us(const std::vector<double>& ms, int ops) {
    std::vector<double> out;
    for (double t : ms) out.push_back(t * 1000.0 / ops);
    return out;
}

}  // namespace

int main() {
    const int reps = bench::reps(7);
    mp::set_traceback_source_lines(false);  // Release build: no line info anyway

    if (bench::wanted("exception: encode+decode")) {
        std::exception_ptr thrown;
        try {
            throw_hooked(kDepth);
        } catch (...) {
            thrown = std::current_exception();
        }
        constexpr int kOps = 200;
        auto ours = bench::time_ms(reps, [&] {
            for (int i = 0; i < kOps; ++i) {
                mp::Encoder e;
                mp::detail::encode_exception(e, thrown);
                mp::Decoder d(e.bytes());
                bench::keep(mp::detail::decode_exception(d));
            }
        });
        constexpr int kIntOps = 100000;
        auto anchor = bench::time_ms(reps, [&] {
            for (int i = 0; i < kIntOps; ++i) {
                mp::Encoder e;
                e.write(i);
                mp::Decoder d(e.bytes());
                bench::keep(d.read<int>());
            }
        });
        bench::report("exception: encode+decode", "ours", "exception with traceback", "us", per_op_us(ours, kOps));
        bench::report("exception: encode+decode", "anchor", "int result", "us", per_op_us(anchor, kIntOps));
    }

    if (bench::wanted("exception: throw+catch")) {
        auto real = reinterpret_cast<RealThrow>(::dlsym(RTLD_NEXT, "__cxa_throw"));
        if (!real) return 1;
        constexpr int kOps = 5000;
        auto ours = bench::time_ms(reps, [&] {
            for (int i = 0; i < kOps; ++i) {
                try {
                    throw_hooked(kDepth);
                } catch (const std::invalid_argument& e) {
                    bench::keep(e);
                }
            }
        });
        auto anchor = bench::time_ms(reps, [&] {
            for (int i = 0; i < kOps; ++i) {
                try {
                    throw_unhooked(kDepth, real);
                } catch (const std::invalid_argument& e) {
                    bench::keep(e);
                }
            }
        });
        const char* label = mp::detail::os::throw_hook_active() ? "throw, hook records stack" : "throw (no hook)";
        bench::report("exception: throw+catch", "ours", label, "us", per_op_us(ours, kOps));
        bench::report("exception: throw+catch", "anchor", "throw, runtime's __cxa_throw", "us",
                      per_op_us(anchor, kOps));
    }
}
