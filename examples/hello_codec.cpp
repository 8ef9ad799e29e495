// hello_codec: how a value of your own type crosses a process boundary.
// Give the type a serialize() member; mpservice then encodes it (with any
// standard containers inside) to bytes and decodes it on the other side.
// Corrupt bytes give mpservice::DecodeError, never a crash.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "mpservice.hpp"

namespace mp = mpservice;

struct Order {
    std::string customer;
    std::map<std::string, int> items;  // product -> quantity
    std::vector<double> prices;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(customer, items, prices);
    }
};

int main() {
    const Order order{"Ada", {{"apples", 3}, {"pears", 2}}, {0.5, 0.75}};
    const std::string bytes = mp::encode(order);  // what a child process would receive
    const Order copy = mp::decode<Order>(bytes);
    std::printf("%s ordered %d apples (%zu bytes on the wire)\n", copy.customer.c_str(),
                copy.items.at("apples"), bytes.size());
    try {
        mp::decode<Order>(bytes.substr(0, bytes.size() - 1));  // torn message
        return 1;
    } catch (const mp::DecodeError& e) {
        std::printf("torn message rejected: %s\n", e.what());
    }
    return copy.items == order.items && copy.prices == order.prices ? 0 : 1;
}
