// remote_exception: implementation.
//
// Wire form of one exception (a "record"), all through the codec:
//   u8   tag 0xE1 (format version 1)
//   str  type name (demangled), what(), process name;  i64 pid
//   str  traceback text (complete, causes first)
//   str  registry key (mangled name of the registered type that rebuilds it; "" = none)
//   str  that type's extra fields (bytes, so an unknown key can be skipped)
//   u8   cause marker: 0 none; 1 an earlier part of the story; 2 the nested
//        exception (std::throw_with_nested); 3 an earlier part whose nested
//        exception is also this one's - then the cause's record
#include <algorithm>
#include <cstdio>
#include <deque>
#include <functional>
#include <future>
#include <ios>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <system_error>
#include <typeinfo>
#include <variant>

namespace mpservice::detail {

// ---------------------------------------------------------------- process name

namespace {
std::string& process_name_storage() {
    static std::string* name = new std::string("MainProcess");  // outlives static destructors
    return *name;
}
}  // namespace

const std::string& process_name() { return process_name_storage(); }
void set_process_name(std::string name) { process_name_storage() = std::move(name); }

// ---------------------------------------------------------------- the registry

namespace {

// Error codes travel as value + category; these are the categories a receiver
// can name again.  Any other category arrives as generic (the value kept).
enum class Category : std::uint8_t { generic, system, iostream, future };

Category category_id(const std::error_category& c) {
    if (c == std::system_category()) return Category::system;
    if (c == std::iostream_category()) return Category::iostream;
    if (c == std::future_category()) return Category::future;
    return Category::generic;
}
const std::error_category& category_of(Category c) {
    switch (c) {
        case Category::system: return std::system_category();
        case Category::iostream: return std::iostream_category();
        case Category::future: return std::future_category();
        default: return std::generic_category();
    }
}

void write_code(Encoder& out, const std::error_code& ec) {
    out.write(static_cast<std::int32_t>(ec.value()));
    out.write(static_cast<std::uint8_t>(category_id(ec.category())));
}
std::error_code read_code(Decoder& in) {
    auto value = in.read<std::int32_t>();
    auto cat = in.read<std::uint8_t>();
    if (cat > static_cast<std::uint8_t>(Category::future)) throw DecodeError("decode: bad error category");
    return std::error_code(value, category_of(static_cast<Category>(cat)));
}

/// A registry entry for E whose extra fields are an error_code, rebuilt by `make`.
template <class E, class Make>
ExceptionType coded_type(Make) {
    ExceptionType t = {};
    t.type = &typeid(E);
    t.matches = [](const std::exception& e) { return dynamic_cast<const E*>(&e) != nullptr; };
    t.encode_fields = [](Encoder& out, const std::exception& e) { write_code(out, dynamic_cast<const E&>(e).code()); };
    t.rebuild = [](Decoder& in, RemoteInfo&& info) -> std::exception_ptr {
        std::error_code ec = read_code(in);
        return make_remote<E>(Make()(ec, info.message), std::move(info));
    };
    return t;
}

ExceptionType process_error_type() {
    ExceptionType t = {};
    t.type = &typeid(ProcessError);
    t.matches = [](const std::exception& e) { return dynamic_cast<const ProcessError*>(&e) != nullptr; };
    t.encode_fields = [](Encoder& out, const std::exception& e) {
        out.write(static_cast<std::int32_t>(dynamic_cast<const ProcessError&>(e).exitcode()));
    };
    t.rebuild = [](Decoder& in, RemoteInfo&& info) -> std::exception_ptr {
        auto code = in.read<std::int32_t>();
        return make_remote<ProcessError>(ProcessError(info.message, code), std::move(info));
    };
    return t;
}

/// The standard and library types, most derived first: the first entry whose
/// type the object has is the nearest known base of an unregistered type.
std::vector<ExceptionType> standard_types() {
    struct MakeSystemError {
        std::system_error operator()(std::error_code ec, const std::string&) const { return std::system_error(ec); }
    };
    struct MakeIosFailure {
        std::ios_base::failure operator()(std::error_code ec, const std::string& what) const {
            return std::ios_base::failure(what, ec);
        }
    };
    struct MakeFutureError {
        std::future_error operator()(std::error_code ec, const std::string&) const {
            if (ec.category() != std::future_category()) ec = std::make_error_code(std::future_errc::broken_promise);
            return std::future_error(static_cast<std::future_errc>(ec.value()));
        }
    };
    return {
        // the library's own errors (all runtime_errors)
        exception_type_of<DecodeError>(),
        exception_type_of<TimeoutError>(),
        exception_type_of<InvalidStateError>(),
        process_error_type(),
        exception_type_of<BrokenBarrierError>(),
        exception_type_of<OwnerDiedError>(),
        exception_type_of<Empty>(),
        exception_type_of<Full>(),
        exception_type_of<QueueClosed>(),
        exception_type_of<ServerError>(),
        exception_type_of<Error>(),
        // runtime_error family (ios_base::failure is a system_error in the C++11 ABI)
        coded_type<std::ios_base::failure>(MakeIosFailure()),
        coded_type<std::system_error>(MakeSystemError()),
        exception_type_of<std::range_error>(),
        exception_type_of<std::overflow_error>(),
        exception_type_of<std::underflow_error>(),
        exception_type_of<std::runtime_error>(),
        // logic_error family
        coded_type<std::future_error>(MakeFutureError()),
        exception_type_of<std::domain_error>(),
        exception_type_of<std::invalid_argument>(),
        exception_type_of<std::length_error>(),
        exception_type_of<std::out_of_range>(),
        exception_type_of<std::logic_error>(),
        // the bad_* family
        exception_type_of<std::bad_array_new_length>(),
        exception_type_of<std::bad_alloc>(),
        exception_type_of<std::bad_cast>(),
        exception_type_of<std::bad_typeid>(),
        exception_type_of<std::bad_optional_access>(),
        exception_type_of<std::bad_variant_access>(),
        exception_type_of<std::bad_function_call>(),
        exception_type_of<std::bad_weak_ptr>(),
        exception_type_of<std::bad_exception>(),
    };
}

/// The standard types' table, built at its first use (an exception encoded or
/// decoded): a program that never sends one - or links with --gc-sections and
/// never starts a process - does not carry the 32 types' codecs.
const std::vector<ExceptionType>& standard_table() {
    static const auto* t = new std::vector<ExceptionType>(standard_types());  // never destroyed
    return *t;
}

struct Registry {
    std::mutex mu;
    std::vector<ExceptionType> user;  // in registration order
    const std::vector<ExceptionType>& standard() const { return standard_table(); }
};

Registry& registry() {
    static Registry* r = [] {
        auto* p = new Registry;  // used by static initializers of other parts; never destroyed
        os::at_fork_protect(&p->mu, 20);
        return p;
    }();
    return *r;
}
[[maybe_unused]] const bool g_registry_fork_safe = (registry(), true);  // before any thread exists

const ExceptionType* find_entry_by_key(const std::string& key) {
    Registry& r = registry();
    {
        std::lock_guard<std::mutex> lock(r.mu);
        for (auto it = r.user.rbegin(); it != r.user.rend(); ++it)
            if (key == it->type->name()) return &*it;
    }
    for (const auto& t : r.standard())
        if (key == t.type->name()) return &t;
    return nullptr;
}

/// The registered type that rebuilds `e`: its exact type if registered, else
/// its nearest registered base (the latest user registration among several),
/// else its nearest standard base; null for a plain std::exception.
const ExceptionType* find_entry_for(const std::exception& e) {
    Registry& r = registry();
    const std::type_info& dynamic = typeid(e);
    const ExceptionType* found = nullptr;
    {
        std::lock_guard<std::mutex> lock(r.mu);
        for (auto it = r.user.rbegin(); it != r.user.rend() && !found; ++it)
            if (*it->type == dynamic) found = &*it;
        for (auto it = r.user.rbegin(); it != r.user.rend() && !found; ++it)
            if (it->matches(e)) found = &*it;
    }
    if (found) return found;
    for (const auto& t : r.standard())
        if (*t.type == dynamic) return &t;
    for (const auto& t : r.standard())
        if (t.matches(e)) return &t;
    return nullptr;
}

}  // namespace

void register_exception_type(const ExceptionType& t) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.user.push_back(t);
}

void prepare_exception_types_for_fork() { (void)standard_table(); }

// ---------------------------------------------------------------- building records

namespace {

constexpr std::uint8_t kRecordTag = 0xE1;
constexpr int kMaxCauseDepth = 32;
constexpr int kMaxFrames = 48;
const char* const kCauseSeparator = "\nThe above exception was the direct cause of the following exception:\n\n";

struct Record {
    RemoteInfo info;  // info.cause unused here: see `cause`
    std::string fields;
    std::unique_ptr<Record> cause;
    std::uint8_t cause_kind = 1;  // the wire's cause marker when `cause` is set
};

/// The user's type inside the standard library's wrapper for
/// std::throw_with_nested (libstdc++ std::_Nested_exception<T>, libc++
/// std::__nested<T>): remote_type() names T, as the user wrote it.
std::string without_nested_wrapper(const std::string& name) {
    static const char* const wrappers[] = {"std::_Nested_exception<", "std::__1::__nested<", "std::__nested<"};
    for (const char* w : wrappers) {
        std::size_t n = std::char_traits<char>::length(w);
        if (name.size() > n + 1 && name.compare(0, n, w) == 0 && name.back() == '>') {
            std::string inner = name.substr(n, name.size() - n - 1);
            while (!inner.empty() && inner.back() == ' ') inner.pop_back();
            return inner;
        }
    }
    return name;
}

/// The nested exception of a (decoded) exception, or null.
std::exception_ptr nested_of(const std::exception_ptr& p) {
    if (!p) return nullptr;
    try {
        std::rethrow_exception(p);
    } catch (const std::nested_exception& n) {
        return n.nested_ptr();
    } catch (...) {
    }
    return nullptr;
}

/// What the thrown object is, found by re-throwing it inside a try block.
struct Inspected {
    const std::exception* ex = nullptr;  // null for non-std::exception throws
    const RemoteError* remote = nullptr;
    const std::type_info* type = nullptr;
    std::string type_name;
    std::string message;
    std::exception_ptr nested;
};

template <class T>
bool describe_value(const std::exception_ptr& p, std::string& out) {
    try {
        std::rethrow_exception(p);
    } catch (std::conditional_t<std::is_class_v<T>, const T&, T> v) {
        // (Scalars are caught by value: clang binds a reference to a caught
        // pointer in a place libstdc++'s re-thrown exceptions do not have.)
        if constexpr (std::is_same_v<T, std::string>) {
            out = v;
        } else if constexpr (std::is_same_v<T, const char*>) {
            out = v ? v : "(null)";
        } else if constexpr (std::is_same_v<T, bool>) {
            out = v ? "true" : "false";
        } else {
            out = std::to_string(v);
        }
        return true;
    } catch (...) {
        return false;
    }
}

Inspected inspect(const std::exception_ptr& p) {
    Inspected r;
    try {
        std::rethrow_exception(p);
    } catch (const std::exception& e) {
        r.ex = &e;  // stays valid: `p` owns the object
        r.type = &typeid(e);
        r.remote = dynamic_cast<const RemoteError*>(&e);
        r.type_name = r.remote ? r.remote->remote_type() : without_nested_wrapper(os::demangle(r.type->name()));
        r.message = e.what();
        if (auto* n = dynamic_cast<const std::nested_exception*>(&e)) r.nested = n->nested_ptr();
        return r;
    } catch (...) {
        r.type = os::current_exception_type();
    }
    r.type_name = r.type ? os::demangle(r.type->name()) : std::string("unknown type");
    std::string value;
    bool known = describe_value<const char*>(p, value) || describe_value<std::string>(p, value) ||
                 describe_value<int>(p, value) || describe_value<long>(p, value) ||
                 describe_value<long long>(p, value) || describe_value<unsigned>(p, value) ||
                 describe_value<unsigned long>(p, value) || describe_value<unsigned long long>(p, value) ||
                 describe_value<double>(p, value) || describe_value<bool>(p, value);
    r.message = "non-exception thrown: " + r.type_name + (known ? " " + value : std::string());
    return r;
}

std::string hex(std::uintptr_t v) {
    char buf[2 + 2 * sizeof v + 1];
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
    return buf;
}

/// Whether a frame is the library calling a Process or Thread target.
bool is_target_runner(const std::string& function) {
    static const char* const runners[] = {"mpservice::detail::trampoline<", "mpservice::detail::call_and_store<",
                                          "mpservice::detail::ChildTaskOf<", "::call_and_store<",
                                          "::make_body<"};
    for (const char* r : runners)
        if (function.find(r) != std::string::npos) return true;
    return false;
}

/// Whether a frame is the standard library forwarding a call (std::apply,
/// std::invoke and their helpers, inlined between a runner and the target).
bool is_call_forwarding(const std::string& function) {
    static const char* const forwarders[] = {"std::__invoke", "std::invoke", "std::__apply_impl", "std::apply",
                                             "std::_Function_handler", "std::function<"};
    for (const char* f : forwarders)
        if (function.find(f) != std::string::npos && function.find("mpservice") == std::string::npos)
            return true;
    return false;
}

/// Whether a frame is the library's own code (or the standard library's
/// re-throw under it).
bool is_library_frame(const std::string& function) {
    return function.rfind("mpservice::", 0) == 0 || function.rfind("std::rethrow_exception", 0) == 0;
}

/// Above the user's code there may be the library's frames that raised the
/// exception again in this process (Process<R>::result_at, ...) or threw it
/// (Queue::get throwing Empty): the user's call is the place to show first.
/// A stack of library frames only is kept as it is.
bool trim_innermost_library_frames(std::vector<os::StackFrame>& frames) {
    std::size_t first_user = 0;
    // An unnamed frame counts as the library's only inside a run of library
    // frames (an inlined helper); alone it may be e.g. libstdc++ throwing.
    auto in_library_run = [&](std::size_t i) {
        if (is_library_frame(frames[i].function)) return true;
        return frames[i].function.empty() && i + 1 < frames.size() && is_library_frame(frames[i + 1].function);
    };
    while (first_user < frames.size() && in_library_run(first_user)) ++first_user;
    if (first_user == 0 || first_user == frames.size()) return false;
    frames.erase(frames.begin(), frames.begin() + static_cast<std::ptrdiff_t>(first_user));
    return true;
}

/// A traceback is about the user's code: below the frame that runs the
/// target there is only the library's child start-up (and main), so cut the
/// stack there, with the std::invoke plumbing just above it.  Returns whether
/// anything was cut.
bool trim_library_frames(std::vector<os::StackFrame>& frames) {
    bool cut = trim_innermost_library_frames(frames);
    std::size_t runner = 0;
    while (runner < frames.size() && !is_target_runner(frames[runner].function)) ++runner;
    if (runner == 0 || runner == frames.size()) return cut;  // not thrown under a target
    std::size_t keep = runner;
    while (keep > 1 && is_call_forwarding(frames[keep - 1].function)) --keep;
    frames.resize(keep);
    return true;
}

/// Whether nothing below a frame is shown: a target's runner (the trim cuts
/// there) or main (the listing stops there).
bool ends_shown_stack(const std::string& function) {
    return is_target_runner(function) || function == "main" || function.rfind("main.", 0) == 0;
}

/// "[name:pid] type: what" then the frames, innermost first, stopping at main.
std::string format_part(const std::string& type_name, const std::string& message, const char* where,
                        void* const* pcs, int n) {
    std::string s = "[" + process_name() + ":" + std::to_string(os::current_pid()) + "] " + type_name + ": " +
                    message + "\n";
    if (n == 0) return s + "  (no stack available)\n";
    s += std::string("  ") + where + " (innermost call first):\n";
    std::vector<os::StackFrame> frames = os::symbolize(pcs, n, ends_shown_stack);
    bool trimmed = trim_library_frames(frames);
    for (std::size_t i = 0; i < frames.size(); ++i) {
        const os::StackFrame& f = frames[i];
        s += "    #" + std::to_string(i) + " " + (f.function.empty() ? std::string("??") : f.function);
        if (!f.file.empty()) s += " at " + f.file + ":" + std::to_string(f.line);
        if (f.inlined)
            s += " (inlined)";
        else if (!f.module.empty())
            s += " [" + f.module + "+" + hex(f.offset) + "]";
        else
            s += " [" + hex(reinterpret_cast<std::uintptr_t>(f.pc)) + "]";
        s += "\n";
        // Below main there is only the C runtime's start-up.
        if (!f.inlined && (f.function == "main" || f.function.rfind("main.", 0) == 0)) break;
    }
    if (trimmed) s += "    (the library's own frames are left out)\n";
    return s;
}

Record make_record(const std::exception_ptr& p, bool being_handled, int depth);

// ---- throw sites kept across threads (the hook's table is per thread)

struct KeptSite {
    std::exception_ptr exception;  // keeps the object - and so its address - alive
    int depth = 0;
    void* pcs[kMaxFrames];
};
struct KeptSites {
    std::mutex mutex;
    std::deque<KeptSite> sites;
};
constexpr std::size_t kKeptSites = 16;
KeptSites& kept_sites() {
    static KeptSites* k = [] {
        auto* p = new KeptSites;  // never destroyed: threads may still use it at exit
        // A fork child that sends an exception another thread threw looks here
        // too: the lock must not be copied held by a thread the child lacks.
        os::at_fork_protect(&p->mutex, 21);
        return p;
    }();
    return *k;
}
[[maybe_unused]] const bool g_kept_sites_fork_safe = (kept_sites(), true);  // before any thread exists

int kept_throw_site(const void* object, void** pcs, int max) {
    KeptSites& k = kept_sites();
    std::lock_guard<std::mutex> lk(k.mutex);
    for (auto it = k.sites.rbegin(); it != k.sites.rend(); ++it) {
        if (os::exception_object(it->exception) != object) continue;
        int n = std::min(it->depth, max);
        std::copy(it->pcs, it->pcs + n, pcs);
        return n;
    }
    return 0;
}

/// Registry key and extra fields of an exception object.
void fill_type(Record& rec, const Inspected& x) {
    if (!x.ex) return;
    const ExceptionType* t = nullptr;
    if (x.remote && !x.remote->remote_info().registry_key.empty())
        t = find_entry_by_key(x.remote->remote_info().registry_key);
    if (!t && !x.remote) t = find_entry_for(*x.ex);
    if (!t) return;
    rec.info.registry_key = t->type->name();
    Encoder fields;
    t->encode_fields(fields, *x.ex);
    rec.fields = std::move(fields.bytes());
}

Record make_record(const std::exception_ptr& p, bool being_handled, int depth) {
    Inspected x = inspect(p);
    Record rec;
    rec.info.type_name = x.type_name;
    rec.info.message = x.message;
    fill_type(rec, x);

    if (x.remote && !being_handled) {
        // Passed on without being raised here: the story is unchanged (SPEC §3).
        const RemoteInfo& old = x.remote->remote_info();
        rec.info.process_name = old.process_name;
        rec.info.pid = old.pid;
        rec.info.traceback = old.traceback;
        if (old.cause && depth < kMaxCauseDepth) {
            rec.cause = std::make_unique<Record>(make_record(old.cause, false, depth + 1));
            rec.cause_kind = old.cause_kind ? old.cause_kind : 1;
        }
        return rec;
    }

    rec.info.process_name = process_name();
    rec.info.pid = os::current_pid();
    void* pcs[kMaxFrames];
    int n = 0;
    const char* where = nullptr;
    const void* object = os::exception_object(p);
    if (x.remote) {
        // Raised again in this process: its old story becomes the cause.
        n = os::raise_site_stack(object, pcs, kMaxFrames);
        where = "re-raised at";
        if (depth < kMaxCauseDepth) {
            rec.cause = std::make_unique<Record>(make_record(p, false, depth + 1));
            rec.cause_kind = x.nested ? 3 : 1;  // its nested exception stays reachable
        }
    } else {
        n = os::throw_site_stack(object, x.type, pcs, kMaxFrames);
        if (n == 0) n = kept_throw_site(object, pcs, kMaxFrames);  // thrown by another thread
        where = "thrown at";
        if (x.nested && depth < kMaxCauseDepth) {
            rec.cause = std::make_unique<Record>(make_record(x.nested, false, depth + 1));
            rec.cause_kind = 2;
        }
    }
    if (n == 0) {
        // No recorded site (no throw hook in this build, or a foreign thread):
        // the stack of the code that sends the exception is the next best thing.
        n = os::capture_stack(pcs, kMaxFrames, 2);
        where = os::throw_hook_active() ? "sent from (throw site not recorded)"
                                        : "sent from (throw sites are not being recorded)";
    }
    std::string own = format_part(x.type_name, x.message, where, pcs, n);
    rec.info.traceback = rec.cause ? rec.cause->info.traceback + kCauseSeparator + own : own;
    return rec;
}

void write_record(Encoder& out, const Record& rec) {
    out.write(kRecordTag);
    out.write(rec.info.type_name);
    out.write(rec.info.message);
    out.write(rec.info.process_name);
    out.write(static_cast<std::int64_t>(rec.info.pid));
    out.write(rec.info.traceback);
    out.write(rec.info.registry_key);
    out.write(rec.fields);
    out.write(static_cast<std::uint8_t>(rec.cause ? rec.cause_kind : 0));
    if (rec.cause) write_record(out, *rec.cause);
}

std::exception_ptr read_record(Decoder& in, int depth) {
    if (depth > kMaxCauseDepth) throw DecodeError("decode: exception cause chain is too deep");
    if (in.read<std::uint8_t>() != kRecordTag) throw DecodeError("decode: not an encoded exception");
    RemoteInfo info;
    info.type_name = in.read<std::string>();
    info.message = in.read<std::string>();
    info.process_name = in.read<std::string>();
    info.pid = static_cast<long>(in.read<std::int64_t>());
    info.traceback = in.read<std::string>();
    info.registry_key = in.read<std::string>();
    std::string fields = in.read<std::string>();
    auto has_cause = in.read<std::uint8_t>();
    if (has_cause > 3) throw DecodeError("decode: bad exception cause marker");
    info.cause_kind = has_cause;
    if (has_cause) info.cause = read_record(in, depth + 1);
    if (has_cause == 2) info.nested = info.cause;
    if (has_cause == 3) info.nested = nested_of(info.cause);

    if (const ExceptionType* t = info.registry_key.empty() ? nullptr : find_entry_by_key(info.registry_key)) {
        Decoder fd(fields);
        std::exception_ptr p = t->rebuild(fd, std::move(info));
        fd.expect_end("exception fields");
        return p;
    }
    // No type to rebuild (unknown family, non-exception, or a key this
    // process does not know): a library Error that says what it was.
    info.registry_key.clear();
    Error base(info.message);
    return make_remote<Error>(std::move(base), std::move(info));
}

}  // namespace

void encode_exception(Encoder& out, const std::exception_ptr& e) {
    if (!e) throw std::invalid_argument("mpservice: encode_exception of a null exception_ptr");
    // "Being handled" = we are inside the catch clause that caught this very
    // exception; that is how a remote exception raised again here is told from
    // one merely passed on (SPEC §3).
    bool being_handled = std::current_exception() == e;
    write_record(out, make_record(e, being_handled, 0));
}

std::exception_ptr decode_exception(Decoder& in) { return read_record(in, 0); }

void keep_throw_site(const std::exception_ptr& e) noexcept {
    if (!e) return;
    try {
        KeptSite site;
        site.depth = os::throw_site_stack(os::exception_object(e), nullptr, site.pcs, kMaxFrames);
        if (site.depth == 0) return;
        site.exception = e;
        KeptSites& k = kept_sites();
        std::lock_guard<std::mutex> lk(k.mutex);
        k.sites.push_back(std::move(site));
        if (k.sites.size() > kKeptSites) k.sites.pop_front();
    } catch (...) {
        // Out of memory: the traceback will show the sending stack instead.
    }
}

}  // namespace mpservice::detail

namespace mpservice {
// (noinline is on the declarations: the definitions come after the Remote<E> that use them.)
RemoteError::~RemoteError() = default;
RemoteError::RemoteError(detail::RemoteInfo info) : info_(std::move(info)) {}
RemoteError::RemoteError(const RemoteError&) = default;
void set_traceback_source_lines(bool enabled) noexcept { detail::os::set_line_lookup(enabled); }
void set_throw_site_capture(bool enabled) noexcept { detail::os::set_throw_site_capture(enabled); }
}  // namespace mpservice

namespace mpservice::detail {

void rethrow_exception(const std::exception_ptr& e) {
    if (!e) throw std::invalid_argument("mpservice: rethrow_exception of a null exception_ptr");
#if defined(__GNUC__) || defined(__clang__)
    os::note_raise_site(os::exception_object(e), __builtin_return_address(0));
#else
    os::note_raise_site(os::exception_object(e), nullptr);
#endif
    std::rethrow_exception(e);
}

}  // namespace mpservice::detail
