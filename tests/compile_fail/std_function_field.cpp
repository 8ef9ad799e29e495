// A nested field the codec cannot carry is named too, however deep it sits.
// EXPECT: mpservice_cannot_encode_this_type<std::function<int ?\(\)> ?>
#include <functional>

#include "mpservice.hpp"

int main() {
    std::vector<std::map<int, std::function<int()>>> v;
    return static_cast<int>(mpservice::encode(v).size());
}
