// parts: what one part of the implementation uses of another.
//
// The implementation is compiled either whole (MPSERVICE_IMPLEMENTATION, one
// translation unit) or part by part (MPSERVICE_IMPLEMENTATION_PART=1..N, one
// translation unit each, see mpservice.hpp).  Within a part, its files share
// unnamed-namespace helpers freely; what crosses a part's border is declared
// here, with external linkage, so that both ways build the same program.  This
// file comes first in every part.

#include <cstddef>
#include <mutex>
#include <string>

#include "process_wire.cpp"  // the channel frames: spoken by the process part and the server part

namespace mpservice {
namespace detail {

/// The build fingerprint of `module` ("" = the main program), cached (process_runtime.cpp).
std::string fingerprint_of(const std::string& module);
/// Builds the table of standard exception types before a fork (remote_exception.cpp).
void prepare_exception_types_for_fork();

}  // namespace detail
}  // namespace mpservice

#if defined(MPSERVICE_POSIX)
struct dl_phdr_info;  // <link.h>
namespace mpservice::detail::os {
/// The lock of the library's loader calls, taken around fork (os_posix.cpp).
std::recursive_mutex& loader_calls_mutex();
/// dl_iterate_phdr under that lock (os_posix.cpp).
int walk_loaded_modules(int (*visit)(dl_phdr_info*, std::size_t, void*), void* data);
}  // namespace mpservice::detail::os
#endif
