// A native load generator of the Inference service, written with gRPC C++ so that the load takes
// less of the CPU the server needs when both share a machine (measured on 2 cores: 18% of one core
// at 5,800 ClassifyStream messages/s, where the Python client takes 43% at 4,400). Built and run
// by bench/native.py; prints one JSON line like bench.loadgen: images_per_s, requests_per_s,
// p50_ms, p99_ms, errors.
//
//   classify_load stream ADDRESS STREAMS WINDOW SECONDS WARMUP IMAGES_FILE CHANNELS
//       the closed loop of `bench.loadgen --mode stream`: STREAMS ClassifyStream calls, each keeping
//       WINDOW messages in flight, one image per message;
//   classify_load unary ADDRESS USERS 1 SECONDS WARMUP IMAGES_FILE CHANNELS
//       the closed loop of `bench.loadgen --mode classify`: USERS callers, each making one Classify
//       call (one image) after another.
//
// The calls are spread over CHANNELS connections (0: one per 16 streams or users, as bench.loadgen
// does); several server processes sharing a port get connections, not calls, from the kernel.
// IMAGES_FILE holds the encoded images, each as a 4-byte little-endian length and its bytes.

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fashion/v1/inference.grpc.pb.h"

using Clock = std::chrono::steady_clock;
using fashion::v1::ClassifyRequest;
using fashion::v1::ClassifyResponse;
using fashion::v1::InferenceService;

namespace {

std::vector<std::string> LoadImages(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> images;
  size_t at = 0;
  while (at + 4 <= all.size()) {
    uint32_t n = static_cast<uint8_t>(all[at]) | static_cast<uint8_t>(all[at + 1]) << 8 |
                 static_cast<uint8_t>(all[at + 2]) << 16 | static_cast<uint32_t>(static_cast<uint8_t>(all[at + 3])) << 24;
    images.push_back(all.substr(at + 4, n));
    at += 4 + n;
  }
  return images;
}

// Latencies of the messages sent between the warm-up and the end (as bench.loadgen counts: in a
// steady state as many are answered in that time); answers that carry an error, and streams that
// end badly, count as errors.
struct Tally {
  std::vector<double> latencies_ms;
  int64_t errors = 0;
};

// One stream driven by gRPC's callback API: writes and reads are started from gRPC's own threads
// as earlier ones complete, so a message costs no thread hand-off of ours.
class StreamLoad : public grpc::ClientBidiReactor<ClassifyRequest, ClassifyResponse> {
 public:
  StreamLoad(InferenceService::Stub* stub, const std::vector<ClassifyRequest>& requests, size_t first, size_t step,
             int window, Clock::time_point start, Clock::time_point stop, Tally* tally)
      : requests_(requests), next_(first), step_(step), window_(window), start_(start), stop_(stop), tally_(tally) {
    // gRPC takes system_clock deadlines.
    ctx_.set_deadline(std::chrono::system_clock::now() + (stop - Clock::now()) + std::chrono::seconds(30));
    stub->async()->ClassifyStream(&ctx_, this);
    StartRead(&response_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      MaybeWrite();
    }
    StartCall();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      finished_writing_ = true;  // the stream is broken; OnDone reports why
      return;
    }
    MaybeWrite();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the server ended the stream: OnDone follows
    auto now = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      Clock::time_point began = sent_.front();  // the server answers a stream in request order
      sent_.pop_front();
      if (began >= start_) {
        if (response_.has_error() || response_.category().empty()) {
          ++tally_->errors;
        } else {
          tally_->latencies_ms.push_back(std::chrono::duration<double, std::milli>(now - began).count());
        }
      }
      MaybeWrite();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    if (!status.ok()) {
      std::fprintf(stderr, "stream ended with %d: %s\n", status.error_code(), status.error_message().c_str());
      ++tally_->errors;
    }
    std::lock_guard<std::mutex> lock(done_mu_);
    done_ = true;
    done_cv_.notify_all();
  }

  void Wait() {
    std::unique_lock<std::mutex> lock(done_mu_);
    done_cv_.wait(lock, [this] { return done_; });
  }

 private:
  void MaybeWrite() {  // with mu_ held: one write at a time, at most window_ messages unanswered
    if (writing_ || finished_writing_ || sent_.size() >= static_cast<size_t>(window_)) return;
    auto now = Clock::now();
    if (now >= stop_) {
      finished_writing_ = true;
      StartWritesDone();
      return;
    }
    writing_ = true;
    sent_.push_back(now);
    StartWrite(&requests_[next_ % requests_.size()]);
    next_ += step_;
  }

  const std::vector<ClassifyRequest>& requests_;
  size_t next_, step_;
  int window_;
  Clock::time_point start_, stop_;
  Tally* tally_;
  grpc::ClientContext ctx_;
  ClassifyResponse response_;
  std::mutex mu_;
  std::deque<Clock::time_point> sent_;
  bool writing_ = false, finished_writing_ = false;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  bool done_ = false;
};

// One closed-loop caller of Classify: each call starts from the completion of the one before, on
// gRPC's own threads. A call's context is freed at the next completion, never inside its own.
class UnaryLoad {
 public:
  UnaryLoad(InferenceService::Stub* stub, const std::vector<ClassifyRequest>& requests, size_t first, size_t step,
            Clock::time_point start, Clock::time_point stop, Tally* tally)
      : stub_(stub), requests_(requests), next_(first), step_(step), start_(start), stop_(stop), tally_(tally) {
    Next();
  }

  void Wait() {
    std::unique_lock<std::mutex> lock(done_mu_);
    done_cv_.wait(lock, [this] { return done_; });
  }

 private:
  void Next() {
    auto now = Clock::now();
    if (now >= stop_) {
      std::lock_guard<std::mutex> lock(done_mu_);
      done_ = true;
      done_cv_.notify_all();
      return;
    }
    previous_ = std::move(context_);
    context_ = std::make_unique<grpc::ClientContext>();
    context_->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    response_.Clear();
    began_ = now;
    const ClassifyRequest* request = &requests_[next_ % requests_.size()];
    next_ += step_;
    stub_->async()->Classify(context_.get(), request, &response_, [this](grpc::Status status) {
      if (began_ >= start_) {
        if (!status.ok() || response_.category().empty()) {
          if (!status.ok() && tally_->errors == 0) {
            std::fprintf(stderr, "call failed with %d: %s\n", status.error_code(), status.error_message().c_str());
          }
          ++tally_->errors;
        } else {
          tally_->latencies_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - began_).count());
        }
      }
      Next();
    });
  }

  InferenceService::Stub* stub_;
  const std::vector<ClassifyRequest>& requests_;
  size_t next_, step_;
  Clock::time_point start_, stop_, began_;
  Tally* tally_;
  std::unique_ptr<grpc::ClientContext> context_, previous_;
  ClassifyResponse response_;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  bool done_ = false;
};

double Percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0.0;
  size_t k = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 9 ? argv[1] : "";
  if (mode != "stream" && mode != "unary") {
    std::fprintf(stderr, "usage: %s stream|unary ADDRESS CONCURRENCY WINDOW SECONDS WARMUP IMAGES_FILE CHANNELS\n",
                 argv[0]);
    return 2;
  }
  const std::string address = argv[2];
  const int concurrency = std::stoi(argv[3]);
  const int window = std::stoi(argv[4]);
  const double seconds = std::stod(argv[5]);
  const double warmup = std::stod(argv[6]);
  std::vector<ClassifyRequest> requests;
  for (auto& image : LoadImages(argv[7])) {
    requests.emplace_back();
    requests.back().set_image(image);
  }
  if (requests.empty()) {
    std::fprintf(stderr, "no images in %s\n", argv[7]);
    return 2;
  }
  int channels = std::stoi(argv[8]);
  if (channels <= 0) channels = std::max(1, concurrency / 16);

  std::vector<std::unique_ptr<InferenceService::Stub>> stubs;
  for (int i = 0; i < channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("grpc.channel_id", i);  // distinct arguments: a connection of its own
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    stubs.push_back(InferenceService::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args)));
  }
  auto start = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(warmup));
  auto stop = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<Tally> tallies(concurrency);
  if (mode == "stream") {
    std::vector<std::unique_ptr<StreamLoad>> loads;
    for (int s = 0; s < concurrency; ++s) {
      loads.push_back(std::make_unique<StreamLoad>(stubs[s % stubs.size()].get(), requests, s, concurrency, window,
                                                   start, stop, &tallies[s]));
    }
    for (auto& load : loads) load->Wait();
  } else {
    std::vector<std::unique_ptr<UnaryLoad>> loads;
    for (int s = 0; s < concurrency; ++s) {
      loads.push_back(std::make_unique<UnaryLoad>(stubs[s % stubs.size()].get(), requests, s, concurrency, start,
                                                  stop, &tallies[s]));
    }
    for (auto& load : loads) load->Wait();
  }

  std::vector<double> all;
  int64_t errors = 0;
  for (auto& t : tallies) {
    all.insert(all.end(), t.latencies_ms.begin(), t.latencies_ms.end());
    errors += t.errors;
  }
  double rate = all.size() / seconds;
  double p50 = Percentile(all, 0.50), p99 = Percentile(all, 0.99);
  std::printf("{\"images_per_s\": %.1f, \"requests_per_s\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
              "\"errors\": %lld}\n", rate, rate, p50, p99, static_cast<long long>(errors));
  return 0;
}
