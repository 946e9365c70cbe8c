#include "report.h"

#include <sys/resource.h>
#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <thread>

#include "version.h"

namespace adm {
using nlohmann::json;

namespace {

double percentile(std::vector<double> sorted, double q) {
  const double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = static_cast<size_t>(std::ceil(pos));
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

}  // namespace

json timed(const std::function<void()>& fn, int warmup, int runs) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  double sum = 0;
  for (double v : ms) sum += v;
  return {{"warmup", warmup}, {"runs", runs}, {"min_ms", ms.front()}, {"p50_ms", percentile(ms, 50)},
          {"p90_ms", percentile(ms, 90)}, {"mean_ms", sum / static_cast<double>(ms.size())}};
}

double peak_rss_mb() {
  // Linux and Android: the high-water mark of this process's own address space. getrusage's
  // ru_maxrss survives execve, so a runner started from a large process (a Python test or
  // benchmark) would report its parent's peak instead of its own.
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // "VmHWM:  11048 kB"
  }
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
#ifdef __APPLE__
  return static_cast<double>(usage.ru_maxrss) / (1 << 20);  // bytes
#else
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // KiB
#endif
}

double snr_db(const Array& reference, const Array& test) {
  if (reference.shape != test.shape)
    throw RuntimeFailure("snr_db: shapes differ, " + reference.shape_str() + " vs " + test.shape_str());
  double signal = 0, noise = 0;
  for (size_t i = 0; i < reference.data.size(); ++i) {
    const double r = reference.data[i], e = r - static_cast<double>(test.data[i]);
    signal += r * r, noise += e * e;
  }
  if (noise == 0.0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(std::max(signal, 1e-8) / noise);
}

json device_info(int threads) {
  struct utsname u {};
  uname(&u);
  const std::string runtime = std::string(ADM_EXECUTORCH_VERSION_TEXT) + " C++ runtime (adm-run " ADM_RUN_VERSION
#ifdef ADM_HAVE_QUANTIZED_KERNELS
                              ", optimized + quantized kernels, XNNPACK)";
#else
                              ", optimized kernels, XNNPACK)";
#endif
  return {{"platform", std::string(u.sysname) + "-" + u.release + "-" + u.machine},
          {"machine", u.machine},
          {"processor", u.machine},
          {"cpu_count", std::thread::hardware_concurrency()},
          {"threads", threads},
          {"python", nullptr},
          {"numpy", nullptr},
          {"runtime", {{"executorch", runtime}}}};
}

void measure_latency(Pipeline& pipe, const Manifest& m, const Array& vocals, const Array& noise, int warmup, int runs,
                     json& report) {
  const Array cond = pipe.encode(vocals);
  const int b = m.sampler.denoiser_batch;
  std::vector<Array> xs(b, noise), cs(b, cond);
  const Array x_b = concat0(xs), c_b = concat0(cs);
  Array t_b;
  t_b.shape = {static_cast<size_t>(b)};
  t_b.data.assign(b, static_cast<float>(m.sampler.t[0]));
  json lat;
  lat["vae_encoder"] = timed([&] { pipe.encode(vocals); }, warmup, runs);
  lat["denoiser"] = timed([&] { pipe.denoise(x_b, t_b, c_b); }, warmup, runs);
  lat["vae_decoder"] = timed([&] { pipe.decode(cond); }, warmup, runs);
  report["latency"] = lat;
  pipe.denoiser_calls = 0;
  pipe.generate(vocals, noise);
  const long calls = pipe.denoiser_calls;
  json e2e = timed([&] { pipe.generate(vocals, noise); }, warmup, runs);
  const double audio_s = static_cast<double>(m.segment_samples) / m.sample_rate;
  e2e["steps"] = m.sampler.steps;
  e2e["audio_seconds"] = audio_s;
  e2e["denoiser_calls_per_generation"] = calls;
  e2e["denoiser_calls_per_step"] = static_cast<double>(calls) / m.sampler.steps;
  e2e["real_time_factor"] = audio_s / (e2e["p50_ms"].get<double>() / 1e3);
  report["end_to_end"] = e2e;
  json load;
  for (const std::string& name : kComponents) load[name + "_ms"] = pipe.component(name).load_ms;
  report["load"] = load;
}

json empty_report(const std::string& bundle) {
  return {{"format_version", kReportFormatVersion}, {"bundle", bundle}, {"target", nullptr}, {"device", nullptr},
          {"latency", json::object()}, {"end_to_end", json::object()}, {"memory", json::object()},
          {"quality", json::object()}, {"budget", json::object()}, {"status", "fail"}, {"reason", nullptr},
          {"runner", "native"}};
}

void write_json(const std::string& path, const json& report) {
  namespace fs = std::filesystem;
  const fs::path out(path);
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  const fs::path tmp = out.parent_path() / ("." + out.filename().string() + ".tmp");
  {
    std::ofstream f(tmp, std::ios::trunc);
    // Non-finite figures (an SNR of identical arrays) become null: JSON has no Infinity.
    f << report.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    if (!f) throw RuntimeFailure(tmp.string() + ": cannot be written");
  }
  fs::rename(tmp, out);
}

}  // namespace adm
