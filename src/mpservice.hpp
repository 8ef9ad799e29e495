// mpservice - Python-style multiprocessing for C++17.
//
// This umbrella file is the table of contents of the library and the input of
// tools/amalgamate.py, which inlines every part below into the single header
// mpservice.hpp at the repository root.  It can also be included directly
// (with -I src) while working on the parts.
//
// Order: configuration, then the public parts, then - once per program, in the
// translation unit that defines MPSERVICE_IMPLEMENTATION - the implementation.

#ifndef MPSERVICE_HPP_INCLUDED
#define MPSERVICE_HPP_INCLUDED

#include "mpservice/public/config.hpp"
#include "mpservice/public/errors.hpp"
#include "mpservice/public/codec.hpp"
#include "mpservice/detail/os.hpp"
#include "mpservice/detail/shm.hpp"
#include "mpservice/public/remote_exception.hpp"
#include "mpservice/public/logging.hpp"
#include "mpservice/public/process.hpp"
#include "mpservice/public/threading.hpp"
#include "mpservice/public/futures.hpp"
#include "mpservice/public/synchronize.hpp"
#include "mpservice/public/sharedctypes.hpp"
#include "mpservice/public/queues.hpp"
#include "mpservice/public/connection.hpp"
#include "mpservice/public/pool.hpp"
#include "mpservice/public/runner.hpp"
#include "mpservice/public/server_process.hpp"

#endif  // MPSERVICE_HPP_INCLUDED

// The implementation is outside the include guard so that a second inclusion
// with MPSERVICE_IMPLEMENTATION defined still emits it, and its own guard makes
// sure it is emitted only once per translation unit.
#if defined(MPSERVICE_IMPLEMENTATION) && !defined(MPSERVICE_IMPLEMENTATION_INCLUDED)
#define MPSERVICE_IMPLEMENTATION_INCLUDED

#include "mpservice/impl/os_posix.cpp"
#include "mpservice/impl/os_win32.cpp"
#if defined(MPSERVICE_POSIX)
#include "mpservice/impl/os_posix_stacktrace.cpp"
#endif
#include "mpservice/impl/shm.cpp"
#include "mpservice/impl/remote_exception.cpp"
#include "mpservice/impl/logging.cpp"
#include "mpservice/impl/process_wire.cpp"
#include "mpservice/impl/process_runtime.cpp"
#include "mpservice/impl/process_output.cpp"
#include "mpservice/impl/process_child.cpp"
#include "mpservice/impl/process_reactor.cpp"
#include "mpservice/impl/process_fork.cpp"
#include "mpservice/impl/process_warm.cpp"
#include "mpservice/impl/process_core.cpp"
#include "mpservice/impl/threading.cpp"
#include "mpservice/impl/synchronize.cpp"
#include "mpservice/impl/queues.cpp"
#include "mpservice/impl/connection.cpp"
#include "mpservice/impl/pool.cpp"
#include "mpservice/impl/server_wire.cpp"
#include "mpservice/impl/server_host.cpp"
#include "mpservice/impl/server_client.cpp"

#endif  // MPSERVICE_IMPLEMENTATION
