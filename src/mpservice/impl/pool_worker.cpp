// pool_worker: the worker loop (child side) - takes chunks off its task ring,
// runs their items and writes the outcomes to its slot and the result ring.

namespace mpservice {
namespace detail {
namespace {

/// The worker's end of its slot and of the result ring.  `cur` is the write
/// position (ItemSink's inline path appends bitwise values through it too).
struct WorkerLink {
    QueueCore results;
    PoolSlot* slot = nullptr;
    SlotCursor cur;

    void attach(PoolSlot* s) {
        slot = s;
        cur.index = &s->index;
        cur.used = &s->used;
        cur.records = s->records();
    }
    /// A new message (chunk part) whose first item is `base`; the slot is empty.
    void start_message(std::uint32_t base) {
        cur.base = base;
        cur.next_local = 0;
        cur.in_slot = 0;
        cur.end = 0;
        cur.dense_at = SlotCursor::no_dense;
    }
    void commit_length() { slot->used.store(cur.end, std::memory_order_release); }

    /// One bitwise value, appended to the dense record at the end of the slot
    /// (opened if there is none of this size; the slot sent first if it is
    /// full).  Order of stores as in ItemSink::commit_bitwise.
    void append_dense(const void* value, std::uint32_t elem) {
        unsigned char* records = cur.records;
        if (cur.dense_at != SlotCursor::no_dense && cur.dense_elem == elem && cur.end + elem <= slot_record_bytes) {
            std::memcpy(records + cur.end, value, elem);
            PoolRecordHeader rh;
            std::memcpy(&rh, records + cur.dense_at, sizeof rh);
            rh.size += elem;
            std::memcpy(records + cur.dense_at, &rh, sizeof rh);
            cur.end += elem;
        } else {
            if (cur.end + sizeof(PoolRecordHeader) + elem > slot_record_bytes) flush();
            PoolRecordHeader rh{elem, dense_record_kind(elem)};
            std::memcpy(records + cur.end + sizeof rh, value, elem);
            std::memcpy(records + cur.end, &rh, sizeof rh);
            cur.dense_at = cur.end;
            cur.dense_elem = elem;
            cur.end += static_cast<std::uint32_t>(sizeof rh) + elem;
        }
        commit_length();
        ++cur.in_slot;
        if (cur.end >= slot_flush_bytes) flush();
    }

    void append(std::uint32_t kind, const std::string& payload) {
        cur.dense_at = SlotCursor::no_dense;  // a dense record after this one is a new one
        auto size = static_cast<std::uint32_t>(sizeof(PoolRecordHeader) + payload.size());
        if (cur.end + size > slot_record_bytes) flush();
        PoolRecordHeader rh{static_cast<std::uint32_t>(payload.size()), kind};
        if (size > slot_record_bytes) {
            // Too big for the slot: it travels alone (a crash while it is sent loses it).
            std::string msg;
            PoolResultHeader h{pool_result_records, slot->header.first, slot->header.chunk};
            msg.append(reinterpret_cast<const char*>(&h), sizeof h);
            msg.append(reinterpret_cast<const char*>(&rh), sizeof rh);
            msg.append(payload);
            results.put(msg.data(), msg.size(), os::no_deadline);
            slot->header.first += 1;
            return;
        }
        unsigned char* at = cur.records + cur.end;
        std::memcpy(at, &rh, sizeof rh);
        if (!payload.empty()) std::memcpy(at + sizeof rh, payload.data(), payload.size());
        cur.end += size;
        commit_length();
        ++cur.in_slot;
        if (cur.end >= slot_flush_bytes) flush();
    }
    /// Sends the slot's records, then empties it.
    void flush() {
        if (!cur.end) return;
        slot->header.kind = pool_result_records;
        results.put(&slot->header, sizeof(PoolResultHeader) + cur.end, os::no_deadline);
        cur.end = 0;
        commit_length();
        slot->header.first += cur.in_slot;
        cur.in_slot = 0;
        cur.dense_at = SlotCursor::no_dense;
    }
};

const void* resolve_code(const os::CodeRef& ref) {
    static std::map<std::pair<std::uint64_t, std::uint64_t>, const void*> cache;
    auto key = std::make_pair(ref.module, ref.offset);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    const void* p = os::code_ref_resolve(ref);
    if (!p)
        throw Error("mpservice: the pool worker cannot find the task's function in its program (a different "
                    "build, or a library loaded only in the parent?)");
    cache.emplace(key, p);
    return p;
}

void read_lane_handles(os::handle_t lane, std::uint32_t n, std::vector<os::handle_t>& out) {
    while (out.size() < n) {
        char byte;
        long got = os::channel_read(lane, &byte, 1, &out, false);
        if (got <= 0) throw Error("mpservice: the pool's handle channel closed");
    }
}

}  // namespace

void ItemSink::begin(std::uint32_t local) {
    auto* l = static_cast<WorkerLink*>(link);
    l->slot->index.store(l->cur.base + local, std::memory_order_release);
    if (!out_.handles().empty()) out_ = Encoder();
    out_.bytes().clear();
}

void ItemSink::commit_value() {
    auto* l = static_cast<WorkerLink*>(link);
    if (!out_.handles().empty()) {
        commit_error(std::make_exception_ptr(std::invalid_argument(
            "mpservice: a pool task's result cannot hold OS handles (a Queue, Lock, Value, ...)")));
        return;
    }
    l->append(record_value, out_.bytes());
    ++l->cur.next_local;
}

void ItemSink::commit_dense(const void* value, std::uint32_t size) {
    auto* l = static_cast<WorkerLink*>(link);
    l->append_dense(value, size);
    ++l->cur.next_local;
}

void ItemSink::commit_error(const std::exception_ptr& e) {
    auto* l = static_cast<WorkerLink*>(link);
    Encoder enc;
    try {
        encode_exception(enc, e);
    } catch (...) {
        enc = Encoder();
        encode_exception(enc, std::make_exception_ptr(Error("mpservice: the task's exception could not be encoded")));
    }
    l->append(record_error, enc.bytes());
    ++l->cur.next_local;
}

PoolWorkerParts::~PoolWorkerParts() { os::close_handle(lane); }

const void* resolve_initializer(const PoolWorkerBoot& b) { return resolve_code(b.p->initializer); }

void serve_pool_tasks(const PoolWorkerBoot& b, void* state) {
    const PoolWorkerParts& boot = *b.p;
    WorkerLink link;
    link.results = boot.results;
    link.attach(static_cast<PoolSlot*>(boot.slot.data()));
    PoolSlot& slot = *link.slot;
    slot.ready.store(1, std::memory_order_release);
    QueueCore tasks = boot.tasks;
    std::string msg;
    for (std::uint64_t done = 0; boot.maxtasks == 0 || done < boot.maxtasks; ++done) {
        spin_for_item(tasks, worker_spin, [&] { return tasks.closed(); });
        if (tasks.get(&copy_item, &msg, os::no_deadline) != QueueCore::Status::ok) break;  // closed: the pool is done
        if (msg.size() < sizeof(PoolTaskHeader)) throw Error("mpservice: a torn pool task");
        PoolTaskHeader th;
        std::memcpy(&th, msg.data(), sizeof th);
        std::vector<os::handle_t> handles;
        if (th.nhandles) read_lane_handles(boot.lane, th.nhandles, handles);

        // Start of the chunk: the slot says which one, and that no item runs yet.
        slot.used.store(0, std::memory_order_relaxed);
        slot.header.chunk = th.chunk;
        slot.header.first = th.base;
        slot.index.store(no_item, std::memory_order_relaxed);
        slot.chunk.store(th.chunk, std::memory_order_release);
        link.start_message(th.base);

        ItemSink sink;
        sink.link = &link;
        sink.cur = &link.cur;
        try {
            const void* fn = th.fn_module ? resolve_code(os::CodeRef{th.fn_module, th.fn_offset}) : nullptr;
            auto runner = reinterpret_cast<ChunkRunner>(
                reinterpret_cast<std::uintptr_t>(resolve_code(os::CodeRef{th.runner_module, th.runner_offset})));
            Decoder d(msg.data() + sizeof th, msg.size() - sizeof th, &handles);
            runner(fn, state, d, th.count, sink);
        } catch (...) {
            // The arguments could not be decoded (or the function found): the
            // items without an outcome fail with that error.
            auto e = std::current_exception();
            for (std::uint32_t i = link.cur.next_local; i < th.count; ++i) {
                sink.begin(i);
                sink.commit_error(e);
            }
        }
        link.flush();
        wire::close_all(handles);
    }
}

}  // namespace detail

void Codec<detail::PoolWorkerBoot>::encode(Encoder& e, const detail::PoolWorkerBoot& boot) {
    const detail::PoolWorkerParts& b = *boot.p;
    e.write(b.tasks.memory());
    e.write(b.results.memory());
    e.write(b.slot);
    e.write(e.attach(b.lane));
    e(b.initializer.module, b.initializer.offset, b.maxtasks);
}

detail::PoolWorkerBoot Codec<detail::PoolWorkerBoot>::decode(Decoder& d) {
    detail::PoolWorkerBoot boot;
    detail::PoolWorkerParts& b = *boot.p;
    b.tasks = detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple, detail::task_tag);
    b.results =
        detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple, detail::result_tag);
    b.slot = d.read<detail::SharedMemory>();
    if (b.slot.size() < sizeof(detail::PoolSlot)) throw DecodeError("decode: pool slot too small");
    b.lane = detail::os::duplicate_handle(d.handle(d.read<std::uint32_t>()));
    d(b.initializer.module, b.initializer.offset, b.maxtasks);
    return boot;
}


}  // namespace mpservice
