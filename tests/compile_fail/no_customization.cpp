// A class that is neither trivially copyable nor customized is refused, and the
// message names it and the customization point.
// EXPECT: mpservice_cannot_encode_this_type<Account>
#include "mpservice.hpp"

struct Account {
    std::string owner;
    long balance = 0;
};

int main() { return static_cast<int>(mpservice::encode(Account{}).size()); }
