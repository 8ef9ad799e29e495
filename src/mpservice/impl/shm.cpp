// shm: SharedMemory and its codec.

namespace mpservice::detail {

namespace shm_impl {
/// Mappings whose last handle is gone while a thread of this process held a
/// robust mutex inside (see SharedMemory::keep_mapped_while_held).
struct ParkedMapping {
    void* addr;
    std::size_t size;
    std::vector<os::RobustMutex*> mutexes;
};

bool any_held(const std::vector<os::RobustMutex*>& mutexes) noexcept {
    for (os::RobustMutex* m : mutexes)
        if (os::robust_mutex_held_in_this_process(m)) return true;
    return false;
}

class ParkedMappings {
public:
    /// Keeps the mapping; unmaps the parked ones whose mutexes are all free
    /// now (their holders ended, so the kernel has marked them, or released).
    void park(void* addr, std::size_t size, std::vector<os::RobustMutex*> mutexes) {
        std::lock_guard<std::mutex> g(guard_);
        parked_.push_back(ParkedMapping{addr, size, std::move(mutexes)});
    }
    void sweep() noexcept {
        std::lock_guard<std::mutex> g(guard_);
        for (std::size_t i = 0; i < parked_.size();) {
            if (any_held(parked_[i].mutexes)) {
                ++i;
                continue;
            }
            os::shm_unmap(parked_[i].addr, parked_[i].size);
            parked_[i] = std::move(parked_.back());
            parked_.pop_back();
        }
    }
    bool empty() noexcept {
        std::lock_guard<std::mutex> g(guard_);
        return parked_.empty();
    }

private:
    std::mutex guard_;
    std::vector<ParkedMapping> parked_;
};

/// Never destroyed: a mapping may be released during static destruction.
ParkedMappings& parked_mappings() {
    static ParkedMappings* p = new ParkedMappings();
    return *p;
}
}  // namespace shm_impl

/// The block mapped in this process, unmapped when its last SharedMemory here
/// is gone (or parked, while a thread here holds a robust mutex inside it).
struct SharedMemory::Mapping : SharedMemory::View {
    std::mutex guard;                       // for `mutexes`
    std::vector<os::RobustMutex*> mutexes;  // see keep_mapped_while_held
    Mapping() = default;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping();
};

SharedMemory::Mapping::~Mapping() {
    os::close_handle(handle);  // the mapping, not the descriptor, keeps the memory
    if (!mutexes.empty() && shm_impl::any_held(mutexes)) {
        try {
            shm_impl::parked_mappings().park(addr, size, std::move(mutexes));
            return;
        } catch (...) {
            // Out of memory: unmapping is all that is left (the old behaviour).
        }
    }
    os::shm_unmap(addr, size);
    if (!mutexes.empty()) shm_impl::parked_mappings().sweep();
}

void SharedMemory::keep_mapped_while_held(os::RobustMutex* m) const {
    if (!m_) return;
    Mapping& mapping = *static_cast<Mapping*>(m_.get());  // every View here is a Mapping
    std::lock_guard<std::mutex> g(mapping.guard);
    for (os::RobustMutex* known : mapping.mutexes)
        if (known == m) return;
    mapping.mutexes.push_back(m);
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
