// remote_exception: implementation - TEMPORARY STUB (branch process) until
// branch `remote` delivers the real part: keeps a few standard types and what().
#include <new>
#include <system_error>

namespace mpservice::detail {

namespace {
std::string& stub_name() {
    static auto* n = new std::string("MainProcess");
    return *n;
}
}  // namespace

const std::string& process_name() { return stub_name(); }
void set_process_name(std::string name) { stub_name() = std::move(name); }

void encode_exception(Encoder& out, const std::exception_ptr& e) {
    std::uint8_t kind = 0;
    std::string what = "unknown exception";
    try {
        std::rethrow_exception(e);
    } catch (const std::invalid_argument& x) {
        kind = 1, what = x.what();
    } catch (const std::out_of_range& x) {
        kind = 2, what = x.what();
    } catch (const std::logic_error& x) {
        kind = 3, what = x.what();
    } catch (const std::runtime_error& x) {
        kind = 4, what = x.what();
    } catch (const std::exception& x) {
        kind = 5, what = x.what();
    } catch (...) {
    }
    out(kind, what, process_name());
}

std::exception_ptr decode_exception(Decoder& in) {
    std::uint8_t kind;
    std::string what, from;
    in(kind, what, from);
    switch (kind) {
        case 1: return std::make_exception_ptr(std::invalid_argument(what));
        case 2: return std::make_exception_ptr(std::out_of_range(what));
        case 3: return std::make_exception_ptr(std::logic_error(what));
        default: return std::make_exception_ptr(std::runtime_error(what));
    }
}

}  // namespace mpservice::detail
