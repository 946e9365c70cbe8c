// Timing, memory and quality figures, and the report JSON (DESIGN.md's report schema, the keys
// runtime_py/verify.py writes, plus "runner": "native").
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bundle.h"
#include "npy.h"
#include "pipeline.h"

namespace adm {

inline constexpr int kReportFormatVersion = 1;  // runtime_py.verify.REPORT_FORMAT_VERSION

// {"warmup", "runs", "min_ms", "p50_ms", "p90_ms", "mean_ms"}: `warmup` untimed calls of fn, then
// `runs` timed ones; percentiles interpolate linearly, as numpy.percentile does.
nlohmann::json timed(const std::function<void()>& fn, int warmup, int runs);

// Peak resident set size of this process, MiB.
double peak_rss_mb();

// 10 log10(|ref|^2 / |ref - test|^2) in float64 (runtime_py.metrics.snr_db); +inf when equal.
double snr_db(const Array& reference, const Array& test);

// platform, machine, cpu_count, threads, runtime versions.
nlohmann::json device_info(int threads);

// Per component on its deployed shapes, then whole generations, on the first reference input:
// fills report["latency"], ["end_to_end"], ["load"].
void measure_latency(Pipeline& pipe, const Manifest& m, const Array& vocals, const Array& noise, int warmup, int runs,
                     nlohmann::json& report);

// The report skeleton runtime_py.verify starts from.
nlohmann::json empty_report(const std::string& bundle);

// Writes `report` to `path` through a temporary file and a rename.
void write_json(const std::string& path, const nlohmann::json& report);

}  // namespace adm
