// std::string_view holds an address: refused (send a std::string).
// EXPECT: mpservice_cannot_encode_this_type<std::basic_string_view<char
#include "mpservice.hpp"

int main() { return static_cast<int>(mpservice::encode(std::string_view("x")).size()); }
