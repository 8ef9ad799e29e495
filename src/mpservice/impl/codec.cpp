// codec: the out-of-line part of the encoder (public/codec.hpp).
//
// In the platform part of the implementation: shared memory (shm.cpp) is the
// first user of handle attachment, and a program that encodes values without
// starting a process must not link the process part for it.

#include <cstdint>
#include <string>
#include <vector>

namespace mpservice {

std::uint32_t Encoder::attach(detail::os::handle_t h) {
    handles_.push_back(h);
    return static_cast<std::uint32_t>(handles_.size() - 1);
}

// ---- Decoder's failures

namespace detail {
void throw_duplicate_key(bool is_map) {
    throw DecodeError(std::string("decode: duplicate key in ") + (is_map ? "map" : "set"));
}
}  // namespace detail

void Decoder::throw_truncated(std::size_t n, const char* what) const {
    throw DecodeError(std::string("decode: truncated input: needed ") + std::to_string(n) + " " + what + ", " +
                      std::to_string(remaining()) + " left");
}

void Decoder::throw_bad_length(std::uint64_t n, std::size_t min_bytes_each, const char* what) const {
    if (min_bytes_each == 0)
        throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) +
                          " of elements that take no bytes exceeds the limit of " +
                          std::to_string(max_empty_elements));
    throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) + " cannot fit in the " +
                      std::to_string(remaining()) + " bytes left (each element takes at least " +
                      std::to_string(min_bytes_each) + ")");
}

void Decoder::throw_bad_handle(std::uint32_t index) const {
    if (!handles_)
        throw DecodeError(
            "decode: this value holds an OS handle (a Lock, Queue, Value, ...) but it arrived over a channel "
            "that carries no handles; pass such objects as Process arguments");
    throw DecodeError("decode: handle index " + std::to_string(index) + " out of range (" +
                      std::to_string(handles_->size()) + " handles arrived)");
}

void Decoder::throw_trailing(const char* what) const {
    throw DecodeError(std::string("decode: ") + std::to_string(remaining()) + " unexpected trailing bytes after " +
                      what);
}

}  // namespace mpservice
