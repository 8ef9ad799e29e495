// pool_public: the out-of-line members of the public Pool (no initializer's
// constructor: its worker start instantiated once, here, and not in every
// translation unit that includes the header).

namespace mpservice {

Pool::Pool(const Context& ctx, int processes, PoolOptions options)
    : Pool(ctx, processes, options, &detail::pool_no_initializer) {}

}  // namespace mpservice
