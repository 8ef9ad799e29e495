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
//
// It comes whole (MPSERVICE_IMPLEMENTATION) or in parts: a translation unit
// that defines MPSERVICE_IMPLEMENTATION_PART=n (1 <= n <= MPSERVICE_IMPLEMENTATION_PARTS)
// compiles part n only.  A static library of the parts gives the same program,
// and its link keeps only the parts a program uses (and each part compiles
// alone, in parallel with the others):
//    1 the platform layer, the codec,     8 server process: the host, and
//      shared memory                        the server's own link
//    2 remote exceptions
//    3 logging, threads                   9 server process: the clients' links
//    4 locks, queues (shared state)      10 connections (Pipe, connection_wait)
//    5 processes: the runtime, the       11 Pool: reading results, dead
//      child's side, the fork server,       workers
//      the warm spawner                  12 server process: references,
//    6 processes: the parent's side         ServerProcess, Namespace
//      (output capture, the reactor,     13 throw-site stacks and their
//      Process objects)                     symbols (POSIX; empty on Windows,
//    7 Pool: the workers' loop, starting    where part 1 has them)
//      and feeding the workers
// Parts are cut so that each compiles in a few seconds.  The count is here,
// once: the CMake build, the tools and the benches read it.
#define MPSERVICE_IMPLEMENTATION_PARTS 13
#if defined(MPSERVICE_IMPLEMENTATION) && !defined(MPSERVICE_IMPLEMENTATION_PART)
#define MPSERVICE_IMPLEMENTATION_PART 0  // 0: every part
#endif
#if defined(MPSERVICE_IMPLEMENTATION_PART) && !defined(MPSERVICE_IMPLEMENTATION_INCLUDED)
#define MPSERVICE_IMPLEMENTATION_INCLUDED
#if MPSERVICE_IMPLEMENTATION_PART < 0 || MPSERVICE_IMPLEMENTATION_PART > MPSERVICE_IMPLEMENTATION_PARTS
#error "MPSERVICE_IMPLEMENTATION_PART must be 1..MPSERVICE_IMPLEMENTATION_PARTS (or undefined, with MPSERVICE_IMPLEMENTATION: every part)"
#endif
#define MPSERVICE_PART_(n) (MPSERVICE_IMPLEMENTATION_PART == 0 || MPSERVICE_IMPLEMENTATION_PART == n)

#include "mpservice/impl/parts.hpp"

#if MPSERVICE_PART_(1)
#include "mpservice/impl/os_posix.cpp"
#include "mpservice/impl/os_win32.cpp"
#include "mpservice/impl/codec.cpp"
#include "mpservice/impl/shm.cpp"
#endif
#if MPSERVICE_PART_(2)
#include "mpservice/impl/remote_exception.cpp"
#endif
#if MPSERVICE_PART_(3)
#include "mpservice/impl/logging.cpp"
#include "mpservice/impl/threading.cpp"
#endif
#if MPSERVICE_PART_(4)
#include "mpservice/impl/synchronize.cpp"
#include "mpservice/impl/queues.cpp"
#endif
#if MPSERVICE_PART_(5) || MPSERVICE_PART_(6) || MPSERVICE_PART_(10)
#include "mpservice/impl/process_internal.hpp"  // what parts 5, 6 and 10 share
#endif
#if MPSERVICE_PART_(5)
#include "mpservice/impl/process_runtime.cpp"
#include "mpservice/impl/process_child.cpp"
#include "mpservice/impl/process_fork.cpp"
#include "mpservice/impl/process_warm.cpp"
#endif
#if MPSERVICE_PART_(6)
#include "mpservice/impl/process_output.cpp"
#include "mpservice/impl/process_reactor.cpp"
#include "mpservice/impl/process_core.cpp"
#endif
#if MPSERVICE_PART_(7) || MPSERVICE_PART_(11)
#include "mpservice/impl/pool_internal.hpp"  // what parts 7 and 11 share
#endif
#if MPSERVICE_PART_(7)
#include "mpservice/impl/pool_worker.cpp"
#include "mpservice/impl/pool.cpp"
#endif
#if MPSERVICE_PART_(8) || MPSERVICE_PART_(9) || MPSERVICE_PART_(12)
#include "mpservice/impl/server_wire.hpp"  // what parts 8, 9 and 12 share
#include "mpservice/impl/server_link.hpp"
#endif
#if MPSERVICE_PART_(8) || MPSERVICE_PART_(12)
#include "mpservice/impl/server_host.hpp"  // what parts 8 and 12 share
#endif
#if MPSERVICE_PART_(8)
#include "mpservice/impl/server_wire.cpp"
#include "mpservice/impl/server_host.cpp"
#endif
#if MPSERVICE_PART_(9)
#include "mpservice/impl/server_client.cpp"
#endif
#if MPSERVICE_PART_(10)
#include "mpservice/impl/connection.cpp"
#endif
#if MPSERVICE_PART_(11)
#include "mpservice/impl/pool_results.cpp"
#endif
#if MPSERVICE_PART_(12)
#include "mpservice/impl/server_process.cpp"
#endif
#if MPSERVICE_PART_(13) && defined(MPSERVICE_POSIX)
#include "mpservice/impl/os_posix_stacktrace.cpp"
#endif

#undef MPSERVICE_PART_
#endif  // MPSERVICE_IMPLEMENTATION
