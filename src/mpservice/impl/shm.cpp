// shm: SharedMemory and its codec.

namespace mpservice::detail {

SharedMemory::Mapping::~Mapping() {
    os::shm_unmap(addr, size);
    os::close_handle(handle);
}

SharedMemory SharedMemory::create(std::size_t size) {
    if (size == 0) throw std::invalid_argument("mpservice: shared memory of size 0");
    auto m = std::make_shared<Mapping>();
    m->handle = os::shm_create(size);
    m->size = size;
    m->addr = os::shm_map(m->handle, size);  // on throw, ~Mapping closes the handle
    SharedMemory s;
    s.m_ = std::move(m);
    return s;
}

SharedMemory SharedMemory::adopt(os::handle_t h) {
    auto m = std::make_shared<Mapping>();
    m->handle = h;
    m->size = os::shm_size(h);
    if (m->size == 0) throw DecodeError("decode: shared memory handle refers to an empty block");
    m->addr = os::shm_map(h, m->size);
    SharedMemory s;
    s.m_ = std::move(m);
    return s;
}

}  // namespace mpservice::detail

namespace mpservice {

void Codec<detail::SharedMemory>::encode(Encoder& e, const detail::SharedMemory& m) {
    if (!m) throw std::invalid_argument("mpservice: cannot send an empty shared-memory handle");
    e.write(e.attach(m.handle()));
}

detail::SharedMemory Codec<detail::SharedMemory>::decode(Decoder& d) {
    auto index = d.read<std::uint32_t>();
    // The channel owns the handles that arrived; this object keeps its own copy.
    return detail::SharedMemory::adopt(detail::os::duplicate_handle(d.handle(index)));
}

}  // namespace mpservice
