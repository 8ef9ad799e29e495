// A reference (here inside a tuple) is refused rather than silently copied.
// EXPECT: mpservice_cannot_encode_this_type<int ?&>
#include "mpservice.hpp"

int main() {
    int x = 1;
    std::tuple<int&> t(x);
    return static_cast<int>(mpservice::encode(t).size());
}
