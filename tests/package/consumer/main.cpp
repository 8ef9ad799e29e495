// A consumer of the installed (or vendored) library: includes the header
// without the implementation macro and uses the codec; impl.cpp compiles the
// implementation once, as the README tells users to do.
#include <cstdio>
#include <map>
#include <string>

#include "mpservice.hpp"

int main() {
    const std::map<std::string, int> sent{{"answer", 42}};
    const auto received = mpservice::decode<std::map<std::string, int>>(mpservice::encode(sent));
    std::printf("consumer: mpservice %s, answer = %d\n", MPSERVICE_VERSION, received.at("answer"));
    return received == sent ? 0 : 1;
}
