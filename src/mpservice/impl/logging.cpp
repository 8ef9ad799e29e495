// logging: implementation - TEMPORARY STUB (branch process) until branch
// `remote` delivers the real logging part.
#include <mutex>

namespace mpservice::detail {
namespace {
std::mutex& stub_mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
}
std::function<void(const LogRecord&)>& stub_forwarder() {
    static auto* f = new std::function<void(const LogRecord&)>;
    return *f;
}
std::function<void(const LogRecord&)>& stub_handler() {
    static auto* f = new std::function<void(const LogRecord&)>;
    return *f;
}
}  // namespace

void set_log_forwarder(std::function<void(const LogRecord&)> forward) {
    std::lock_guard<std::mutex> lk(stub_mutex());
    stub_forwarder() = std::move(forward);
}

void handle_log_record(const LogRecord& record) {
    std::function<void(const LogRecord&)> h;
    {
        std::lock_guard<std::mutex> lk(stub_mutex());
        h = stub_handler();
    }
    if (h) h(record);
}

void stub_emit(const LogRecord& record) {
    std::function<void(const LogRecord&)> f;
    {
        std::lock_guard<std::mutex> lk(stub_mutex());
        f = stub_forwarder();
    }
    if (f) f(record);
    else handle_log_record(record);
}

void stub_set_handler(std::function<void(const LogRecord&)> handler) {
    std::lock_guard<std::mutex> lk(stub_mutex());
    stub_handler() = std::move(handler);
}

}  // namespace mpservice::detail
