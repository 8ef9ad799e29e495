// pipeline: a producer process feeds jobs through a JoinableQueue to worker
// processes, which send results back on a second queue; the parent waits for
// every job to be done.  Items are user types with a serialize() member.
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"

#include <cstdio>
#include <optional>
#include <string>

namespace mp = mpservice;

struct Job {
    int id = 0;
    std::string text;
    template <class Archive>
    void serialize(Archive& ar) { ar(id, text); }
};

struct Result {
    int id = 0;
    std::size_t length = 0;
    template <class Archive>
    void serialize(Archive& ar) { ar(id, length); }
};

void produce(mp::JoinableQueue<std::optional<Job>> jobs, int count, int workers) {
    for (int i = 0; i < count; ++i) jobs.put(Job{i, std::string(static_cast<std::size_t>(i % 50), 'x')});
    for (int w = 0; w < workers; ++w) jobs.put(std::nullopt);  // one stop marker per worker
}

int work(mp::JoinableQueue<std::optional<Job>> jobs, mp::Queue<Result> results) {
    int handled = 0;
    while (std::optional<Job> job = jobs.get()) {
        results.put(Result{job->id, job->text.size()});
        jobs.task_done();
        ++handled;
    }
    jobs.task_done();  // the stop marker
    mp::get_logger("pipeline").info("worker handled " + std::to_string(handled) + " jobs");
    return handled;
}

int main(int argc, char** argv) {
    mp::init(argc, argv);
    constexpr int count = 1000, nworkers = 3;
    mp::JoinableQueue<std::optional<Job>> jobs;
    mp::Queue<Result> results;

    mp::Process producer(produce, jobs, count, nworkers);
    std::vector<mp::Process<int>> workers;
    for (int w = 0; w < nworkers; ++w) workers.emplace_back(work, jobs, results);
    producer.start();
    for (auto& w : workers) w.start();

    std::size_t total_length = 0;
    for (int i = 0; i < count; ++i) total_length += results.get(std::chrono::seconds(60)).length;
    jobs.join();  // every job (and stop marker) was task_done()
    int handled = 0;
    for (auto& w : workers) handled += w.result();
    producer.join();

    std::size_t expected = 0;
    for (int i = 0; i < count; ++i) expected += static_cast<std::size_t>(i % 50);
    std::printf("%d jobs handled by %d workers, total length %zu\n", handled, nworkers, total_length);
    return handled == count && total_length == expected ? 0 : 1;
}
