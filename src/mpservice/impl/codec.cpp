// codec: the out-of-line part of the encoder (public/codec.hpp).
//
// In the platform part of the implementation: shared memory (shm.cpp) is the
// first user of handle attachment, and a program that encodes values without
// starting a process must not link the process part for it.

#include <cstdint>
#include <vector>

namespace mpservice {

std::uint32_t Encoder::attach(detail::os::handle_t h) {
    handles_.push_back(h);
    return static_cast<std::uint32_t>(handles_.size() - 1);
}

}  // namespace mpservice
