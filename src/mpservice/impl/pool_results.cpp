// pool_results: reading a pool's results - by a waiting caller or the result
// thread - and what a dead worker costs (from its slot: which item failed,
// which finished, which go to another worker).

namespace mpservice {
namespace detail {

PoolResultState::PoolResultState() { name = "AsyncResult"; }

void PoolResultState::read_from(const Shared<PoolCore>& pool) { pool_ = pool.shared(); }

bool PoolResultState::wait_until(os::Deadline deadline) const {
    if (done_relaxed()) return true;
    if (auto pool = pool_.lock())
        return pool->serve_until([this] { return done_relaxed(); }, deadline,
                                 [this](os::Deadline d) { FutureCore::wait_until(d); });
    return FutureCore::wait_until(deadline);  // the pool is gone: it resolved every result first
}

void log_callback_error(const std::exception_ptr& e) {
    std::string what = "unknown exception";
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        what = x.what();
    } catch (...) {
    }
    get_logger("mpservice.pool").error("a result callback threw: " + what);
}

namespace {
using State = PoolCore::State;


bool is_remote_error(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const RemoteError&) {
        return true;
    } catch (...) {
    }
    return false;
}

std::string error_text(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
    }
    return "unknown error";
}

/// Deliveries for items [from, to) of `c`, all failing with `e`.
void fail_items(State::Chunk& c, std::uint32_t from, std::uint32_t to, const std::exception_ptr& e,
                PoolCore::Deliveries& out) {
    for (std::uint32_t i = from; i < to; ++i) out.add(c.job, JobItem{c.job_first + i, record_error, nullptr, 0, e});
}

}  // namespace

void PoolCore::maybe_finish_locked() {
    State& s = *s_;
    if (s.phase != State::Phase::closing || !s.pending.empty()) return;
    for (auto& w : s.workers)
        if (!w.outstanding.empty()) return;
    for (auto& w : s.workers)
        if (w.proc && !w.ended && !w.ring_closed) {
            w.tasks.close();  // the worker drains its ring, finds it closed and exits
            w.ring_closed = true;
        }
}

void PoolCore::complete_locked(std::uint64_t id) {
    State& s = *s_;
    auto it = s.chunks.find(id);
    if (it == s.chunks.end()) return;
    int wi = it->second->worker;
    if (wi >= 0) {
        auto& out = s.workers[static_cast<std::size_t>(wi)].outstanding;
        out.erase(std::remove(out.begin(), out.end(), id), out.end());
    }
    s.chunks.erase(it);
}

void PoolCore::book_results(const unsigned char* p, std::size_t n, Deliveries& out) {
    State& s = *s_;
    if (n < sizeof(PoolResultHeader)) return;
    PoolResultHeader h;
    std::memcpy(&h, p, sizeof h);
    if (h.kind != pool_result_records) return;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        auto it = s.chunks.find(h.chunk);
        if (it == s.chunks.end()) return;  // terminated meanwhile
        State::Chunk& c = *it->second;
        // Count the records (their headers only); the job decodes them later,
        // outside every lock, straight from the message.
        std::uint32_t after = walk_records(p + sizeof h, n - sizeof h, h.first,
                                           [](std::uint32_t, std::uint32_t, const unsigned char*, std::size_t) {});
        std::uint32_t end = std::min<std::uint32_t>(after, c.count);
        if (end > c.next) {
            out.runs.emplace_back(c.job, JobRecords{c.job_first, h.first, c.next, end, p + sizeof h, n - sizeof h});
            c.next = end;
        }
        if (c.next >= c.count) {
            complete_locked(h.chunk);
            dispatch_locked();
            maybe_finish_locked();
            s.changed.notify_all();
        }
    }
}

std::vector<const void*> PoolCore::dead_workers() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    std::vector<const void*> dead;
    for (auto& w : s.workers)
        if (w.proc && !w.ended && w.dead->load(std::memory_order_acquire)) dead.push_back(w.dead.get());
    return dead;
}

void PoolCore::handle_deaths(const std::vector<const void*>& dead, Deliveries& out) {
    State& s = *s_;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        for (std::size_t i = 0; i < s.workers.size(); ++i) {
            State::WorkerRec& w = s.workers[i];
            // Only deaths seen before the ring was drained: a worker that died
            // since may have sent outcomes that are not taken yet (its death
            // rang the bell again, so it is handled next round).
            if (!w.proc || w.ended || std::find(dead.begin(), dead.end(), w.dead.get()) == dead.end()) continue;
            w.ended = true;
            reconcile_locked(i, out);
        }
        dispatch_locked();
        maybe_finish_locked();
        s.changed.notify_all();
    }
}

void PoolCore::reconcile_locked(std::size_t wi, Deliveries& out) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[wi];
    int code = w.proc->exitcode().value_or(0);
    std::exception_ptr werr = w.proc->core().error();
    auto* slot = static_cast<PoolSlot*>(w.slot.data());
    bool was_ready = slot->ready.load(std::memory_order_acquire) != 0;
    std::uint64_t running = slot->chunk.load(std::memory_order_acquire);
    std::uint32_t index = slot->index.load(std::memory_order_acquire);
    std::uint32_t used = std::min(slot->used.load(std::memory_order_acquire), slot_record_bytes);

    std::string how = werr ? error_text(werr)
                           : (w.proc->name() + " (pid " + std::to_string(w.proc->pid()) + ") exited with code " +
                              std::to_string(code));
    auto task_error = std::make_exception_ptr(
        ProcessError("mpservice: the " + settings_.kind + " worker died while running this task: " + how, code));

    std::vector<std::uint64_t> resend;
    for (std::uint64_t id : w.outstanding) {
        auto it = s.chunks.find(id);
        if (it == s.chunks.end()) continue;
        State::Chunk& c = *it->second;
        c.worker = -1;
        if (id == running) {
            // The outcomes of the finished items still in the slot...
            const std::string& kept =
                out.keep.emplace_back(reinterpret_cast<const char*>(slot->records()), used);
            walk_records(reinterpret_cast<const unsigned char*>(kept.data()), kept.size(), slot->header.first,
                         [&](std::uint32_t i, std::uint32_t kind, const unsigned char* data, std::size_t size) {
                                if (i < c.next || i >= c.count) return;
                                out.add(c.job, JobItem{c.job_first + i, kind, data, size, nullptr});
                                c.next = i + 1;
                            });
            // ...and the one that was running when the worker died fails, once.
            if (index != no_item && index == c.next && c.next < c.count) {
                fail_items(c, c.next, c.next + 1, task_error, out);
                ++c.next;
            }
        }
        if (c.next < c.count) {
            resend.push_back(id);
        } else {
            s.chunks.erase(it);
        }
    }
    w.outstanding.clear();
    s.pending.insert(s.pending.begin(), resend.begin(), resend.end());

    // Should the worker be replaced?
    bool init_failed = !was_ready && werr != nullptr;
    s.failed_starts = init_failed ? s.failed_starts + 1 : 0;
    if (!s.broken && s.phase != State::Phase::terminated) {
        if (init_failed && is_remote_error(werr)) {
            // The initializer (a runner's constructor) threw: every new
            // worker would fail the same way.
            s.broken = werr;
        } else if (!settings_.replace_dead_workers && !(s.phase == State::Phase::closing && code == 0 && !werr)) {
            s.broken = std::make_exception_ptr(ProcessError(
                "mpservice: the " + settings_.kind + "'s process has died (" + how + "); it serves no more calls",
                code));
        } else if (init_failed && s.failed_starts >= 3) {
            s.broken = werr;  // the workers keep dying before they are ready
        }
    }
    if (s.broken) {
        fail_all_locked(s.broken, out);
        return;
    }
    if (s.phase == State::Phase::terminated || !settings_.replace_dead_workers) return;
    if (s.phase == State::Phase::closing && s.pending.empty()) return;
    try {
        start_worker(wi, true);
    } catch (...) {
        s.broken = std::current_exception();
        fail_all_locked(s.broken, out);
    }
}

void PoolCore::fail_all_locked(const std::exception_ptr& e,
                               Deliveries& out) {
    State& s = *s_;
    for (auto& [id, c] : s.chunks) fail_items(*c, c->next, c->count, e, out);
    s.chunks.clear();
    s.pending.clear();
    for (auto& w : s.workers) w.outstanding.clear();
}

bool PoolCore::read_results(os::Deadline deadline, Deliveries& out) {
    State& s = *s_;
    PoolDoorbell& bell = *s.bell;
    auto take = [&](os::Deadline d) {
        // Read into a string the deliveries keep: their items point into it.
        std::string& msg = out.keep.emplace_back();
        if (bell.results.get(&copy_item, &msg, d) != QueueCore::Status::ok) {
            out.keep.pop_back();
            return false;
        }
        book_results(reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out);
        return true;
    };
    auto deaths = [&] {
        if (!bell.deaths.exchange(0, std::memory_order_acq_rel)) return;
        // Whatever the dead workers sent before they died is in the ring: book it first.
        auto dead = dead_workers();
        while (take(os::Clock::now())) {
        }
        handle_deaths(dead, out);
    };
    deaths();
    bool got = take(deadline);
    deaths();  // a death's bell may be what woke the get
    return got;
}

bool PoolCore::serve_until(const std::function<bool()>& done, os::Deadline deadline,
                           const std::function<void(os::Deadline)>& sleep) {
    State& s = *s_;
    struct Waiting {
        std::atomic<int>& n;
        explicit Waiting(std::atomic<int>& c) : n(c) { n.fetch_add(1, std::memory_order_acq_rel); }
        ~Waiting() { n.fetch_sub(1, std::memory_order_acq_rel); }
    } waiting{s.waiting};
    while (!done()) {
        auto now = os::Clock::now();
        if (now >= deadline) return done();
        if (s.reader.try_lock()) {
            Deliveries out;
            {
                std::lock_guard<std::mutex> role(s.reader, std::adopt_lock);
                try {
                    spin_for_item(s.bell->results, caller_spin, [&] {
                        return done() || s.bell->deaths.load(std::memory_order_relaxed) != 0;
                    });
                    // In slices: what we wait for may also be resolved by
                    // terminate() in another thread.
                    read_results(std::min(deadline, now + reader_slice), out);
                } catch (...) {
                    log_callback_error(std::current_exception());
                }
            }
            deliver(out);
        } else {
            // Another thread reads and delivers (to us as well); look again soon.
            sleep(std::min(deadline, now + follower_slice));
        }
    }
    return true;
}

void PoolCore::result_loop() {
    State& s = *s_;
    PoolDoorbell& bell = *s.bell;
    for (;;) {
        // Callers that wait read their own results; this thread takes what
        // nobody waits for (callbacks, imap buffers, deaths) on a tick.
        bool busy;
        {
            std::lock_guard<std::mutex> lk(s.mutex);
            busy = !s.chunks.empty();
        }
        auto tick = busy && s.waiting.load(std::memory_order_acquire) == 0 ? busy_tick : idle_tick;
        {
            std::unique_lock<std::mutex> lk(bell.tick_mutex);
            bell.tick.wait_for(lk, tick, [&] {
                return s.stop.load(std::memory_order_acquire) || bell.deaths.load(std::memory_order_acquire) != 0;
            });
        }
        if (s.stop.load(std::memory_order_acquire)) return;
        if (!s.reader.try_lock()) continue;  // a caller reads
        Deliveries out;
        {
            std::lock_guard<std::mutex> role(s.reader, std::adopt_lock);
            try {
                for (int i = 0; i < 256 && read_results(os::Clock::now(), out); ++i) {
                }
            } catch (...) {
                log_callback_error(std::current_exception());
            }
        }
        try {
            deliver(out);
        } catch (...) {
            log_callback_error(std::current_exception());
        }
    }
}

}  // namespace detail
}  // namespace mpservice
