// A raw pointer means nothing in another process: refused at compile time.
// EXPECT: mpservice_cannot_encode_this_type<(const )?int ?\*>
#include "mpservice.hpp"

int main() {
    int x = 0;
    return static_cast<int>(mpservice::encode(&x).size());
}
