// adm-run: run and verify an adm-edge ExecuTorch bundle with the ExecuTorch C++ runtime only.
//
//   adm-run verify BUNDLE [--out REPORT.json] [--outputs DIR] [options]
//   adm-run run BUNDLE --vocals VOCALS.npy --noise NOISE.npy --out-dir DIR [options]
//   adm-run check BUNDLE
//   adm-run draw --keys N --count K --seed S --call C
//
// Exit status: 0 success / pass, 1 verify ran and the quality budget failed, 2 the bundle or the
// command line is wrong (the message names the file and the field), 3 ExecuTorch failed.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <functional>
#include <limits>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "bundle.h"
#include "canonical.h"
#include "compensation.h"
#include "npy.h"
#include "pipeline.h"
#include "report.h"
#include "version.h"

namespace {

using adm::Array;
using adm::BundleError;
using nlohmann::json;
namespace fs = std::filesystem;

constexpr int kExitFail = 1, kExitBadInput = 2, kExitRuntime = 3;

const char* kUsage = R"(usage:
  adm-run verify BUNDLE [--out REPORT.json] [--outputs DIR] [options]
      run the bundle's reference inputs, compare with its full-precision reference (latent and
      audio SNR, the budget's latent SNR floor), time it, write the report (default:
      BUNDLE/../<name>.report.json) and, with --outputs, vocal_latent.npy, latents.npy, audio.npy
  adm-run run BUNDLE --vocals VOCALS.npy --noise NOISE.npy --out-dir DIR [options]
      generate from float32 vocals (N, C, T) and initial noise (N, D, L); writes vocal_latent.npy,
      latents.npy, audio.npy and timing.json to DIR
  adm-run check BUNDLE
      the manifest (fields, seal) and the sha256 of every file, nothing loaded
  adm-run digest MANIFEST.json
      print the manifest's seal as computed here (runtime_py.bundle.manifest_digest)
  adm-run draw --keys N --count K --seed S --call C
      print, as a JSON list, the LiteFocus compensation indices a LiteFocus bundle's denoiser is fed
      on call C (runtime_py.compensation.draw_indices; the tests compare the two)
options:
  --threads N   ExecuTorch thread pool size (default: the runtime's, one per core)
  --runs N      timed runs after warm-up, per component and end to end (0: no timing; default 5)
  --warmup N    untimed runs first (default 1)
  --etdump DIR  record an ExecuTorch profile of every call: DIR/<component>.etdp
exit status: 0 pass, 1 quality budget failed, 2 bad bundle or arguments, 3 ExecuTorch failed
)";

struct Args {
  std::string verb, bundle, out, outputs, vocals, noise, out_dir, etdump;
  int threads = 0, runs = 5, warmup = 1;
};

int parse_int(const std::string& flag, const std::string& text, int lowest) {
  try {
    size_t used = 0;
    const int v = std::stoi(text, &used);
    if (used == text.size() && v >= lowest) return v;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(flag + " takes an integer >= " + std::to_string(lowest) + ", got '" + text + "'");
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> rest(argv + 1, argv + argc);
  if (rest.empty()) throw std::invalid_argument("no command given");
  a.verb = rest[0];
  if (a.verb != "verify" && a.verb != "run" && a.verb != "check" && a.verb != "digest")
    throw std::invalid_argument("unknown command '" + a.verb + "'; choose verify, run, check or digest");
  std::map<std::string, std::string*> text_flags = {{"--out", &a.out},       {"--outputs", &a.outputs},
                                                    {"--vocals", &a.vocals}, {"--noise", &a.noise},
                                                    {"--out-dir", &a.out_dir}, {"--etdump", &a.etdump}};
  for (size_t i = 1; i < rest.size(); ++i) {
    const std::string& flag = rest[i];
    if (flag.rfind("--", 0) != 0) {
      if (!a.bundle.empty()) throw std::invalid_argument("unexpected argument '" + flag + "'");
      a.bundle = flag;
      continue;
    }
    if (i + 1 >= rest.size()) throw std::invalid_argument(flag + " needs a value");
    const std::string& value = rest[++i];
    if (text_flags.count(flag)) *text_flags[flag] = value;
    else if (flag == "--threads") a.threads = parse_int(flag, value, 1);
    else if (flag == "--runs") a.runs = parse_int(flag, value, 0);
    else if (flag == "--warmup") a.warmup = parse_int(flag, value, 0);
    else throw std::invalid_argument("unknown option '" + flag + "'");
  }
  if (a.bundle.empty()) throw std::invalid_argument(a.verb + ": BUNDLE (a bundle directory) is required");
  while (a.bundle.size() > 1 && a.bundle.back() == '/') a.bundle.pop_back();
  if (a.verb == "digest") return a;
  if (a.verb == "run" && (a.vocals.empty() || a.noise.empty() || a.out_dir.empty()))
    throw std::invalid_argument("run needs --vocals, --noise and --out-dir");
  return a;
}

// The reference arrays, checked against the manifest's shapes.
struct Reference {
  Array vocals, noise, vocal_latent, latents, audio;
};

const Array& member(const std::map<std::string, Array>& arrays, const std::string& key, const std::string& file,
                    size_t rank) {
  auto it = arrays.find(key);
  if (it == arrays.end()) throw BundleError(file + ": array '" + key + "' is missing");
  if (it->second.shape.size() != rank)
    throw BundleError(file + ": array '" + key + "' has shape " + it->second.shape_str() + ", expected rank " +
                      std::to_string(rank));
  return it->second;
}

Reference load_reference(const adm::Manifest& m) {
  const std::string in_path = adm::join_path(m.bundle, m.reference_inputs);
  const std::string out_path = adm::join_path(m.bundle, m.reference_outputs);
  const auto inputs = adm::read_npz(in_path);
  const auto outputs = adm::read_npz(out_path);
  Reference r{member(inputs, "vocals", in_path, 3), member(inputs, "noise", in_path, 4),
              member(outputs, "vocal_latent", out_path, 3), member(outputs, "latents", out_path, 4),
              member(outputs, "audio", out_path, 4)};
  const size_t e = r.vocals.shape[0], s = r.noise.shape[1];
  if (r.noise.shape[0] != e || r.latents.shape[0] != e || r.latents.shape[1] != s || r.audio.shape[0] != e ||
      r.audio.shape[1] != s || r.vocal_latent.shape[0] != e)
    throw BundleError(out_path + ": reference outputs do not match " + in_path + "'s " + std::to_string(e) +
                      " examples x " + std::to_string(s) + " seeds");
  return r;
}

Array first(const Array& a) {  // a[0:1]
  Array out = a.slice0(0);
  out.shape.insert(out.shape.begin(), 1);
  return out;
}

Array row(const Array& a, size_t i) {  // a[i:i+1]
  Array out = a.slice0(i);
  out.shape.insert(out.shape.begin(), 1);
  return out;
}

void print_latency(const json& report) {
  if (report["latency"].empty()) return;
  std::printf("%-14s %10s %10s %10s\n", "latency (ms)", "min", "p50", "p90");
  for (const auto& name : adm::kComponents) {
    const json& l = report["latency"][name];
    std::printf("%-14s %10.2f %10.2f %10.2f\n", name.c_str(), l["min_ms"].get<double>(), l["p50_ms"].get<double>(),
                l["p90_ms"].get<double>());
  }
  const json& e = report["end_to_end"];
  std::printf("%-14s %10.2f %10.2f %10.2f  (%d steps, %ld denoiser calls, real-time factor %.2f)\n", "end_to_end",
              e["min_ms"].get<double>(), e["p50_ms"].get<double>(), e["p90_ms"].get<double>(), e["steps"].get<int>(),
              e["denoiser_calls_per_generation"].get<long>(), e["real_time_factor"].get<double>());
}

void write_etdumps(adm::Pipeline& pipe, const std::string& dir, json& report) {
  if (dir.empty()) return;
  fs::create_directories(dir);
  json written = json::object();
  for (const auto& name : adm::kComponents) {
    const std::string path = (fs::path(dir) / (name + ".etdp")).string();
    if (pipe.component(name).write_etdump(path)) written[name] = path;
  }
  report["etdump"] = written;
}

adm::Manifest open_bundle(const std::string& bundle) {
  adm::Manifest m = adm::load_manifest(bundle);
  adm::require_executorch(m);
  adm::check_files(m);  // before any program is loaded
  return m;
}

int verify_bundle(const Args& a, const adm::Manifest& m, json& report, const std::function<int(int)>& finish);

int verify(const Args& a) {
  json report = adm::empty_report(a.bundle);
  // Default: BUNDLE/../<name>.report.json, as runtime_py writes it (also for BUNDLE = ".").
  fs::path dir = fs::absolute(a.bundle).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();
  const std::string out = a.out.empty() ? (dir.parent_path() / (dir.filename().string() + ".report.json")).string() : a.out;
  const std::function<int(int)> finish = [&](int code) {
    adm::write_json(out, report);
    json summary = {{"status", report["status"]}, {"reason", report["reason"]}, {"report", out}, {"runner", "native"}};
    if (report["quality"].contains("aggregate")) summary["latent_snr_db"] = report["quality"]["aggregate"]["latent_snr_db"];
    if (report["end_to_end"].contains("p50_ms")) summary["e2e_p50_ms"] = report["end_to_end"]["p50_ms"];
    std::cout << summary.dump(2, ' ', false, json::error_handler_t::replace) << std::endl;
    return code;
  };
  adm::Manifest m;
  try {
    m = adm::load_manifest(a.bundle);
    report["target"] = m.target;
    report["model"] = m.model;
    report["precision"] = m.raw["precision"];
    report["budget"] = {{"limits", m.quality_budget}};
    adm::require_executorch(m);
    adm::check_files(m);
  } catch (const BundleError& e) {
    report["reason"] = e.what();
    std::cerr << "adm-run: error: " << e.what() << std::endl;
    return finish(kExitBadInput);
  }
  try {
    return verify_bundle(a, m, report, finish);
  } catch (const std::exception& e) {
    // Whatever stops the run, the report says why before adm-run exits non-zero.
    report["status"] = "fail";
    report["reason"] = e.what();
    adm::write_json(out, report);
    throw;
  }
}

int verify_bundle(const Args& a, const adm::Manifest& m, json& report, const std::function<int(int)>& finish) {
  const Reference ref = load_reference(m);
  adm::Pipeline pipe(m, a.threads, !a.etdump.empty());
  report["device"] = adm::device_info(pipe.threads());

  // Quality: every reference example x seed, as runtime_py.verify.quality_against_reference.
  const size_t examples = ref.vocals.shape[0], seeds = ref.noise.shape[1];
  std::vector<Array> vocal_latents, latents, audios;
  json per_example = json::array();
  double worst_latent = 1e300, worst_audio = 1e300, worst_vocal = 1e300, sum_latent = 0, sum_audio = 0;
  for (size_t i = 0; i < examples; ++i) {
    const Array cond = pipe.encode(row(ref.vocals, i));
    const double vocal_snr = adm::snr_db(ref.vocal_latent.slice0(i), cond.slice0(0));
    std::vector<Array> lat_i, aud_i;
    for (size_t j = 0; j < seeds; ++j) {
      const Array latent = pipe.sample(cond, row(ref.noise.slice0(i), j));
      const Array audio = pipe.decode(latent);
      const double latent_snr = adm::snr_db(ref.latents.slice0(i).slice0(j), latent.slice0(0));
      const double audio_snr = adm::snr_db(ref.audio.slice0(i).slice0(j), audio.slice0(0));
      per_example.push_back({{"example", i}, {"seed_index", j}, {"vocal_latent_snr_db", vocal_snr},
                             {"latent_snr_db", latent_snr}, {"audio_snr_db", audio_snr}});
      worst_latent = std::min(worst_latent, latent_snr), worst_audio = std::min(worst_audio, audio_snr);
      worst_vocal = std::min(worst_vocal, vocal_snr);
      sum_latent += std::min(latent_snr, 200.0), sum_audio += std::min(audio_snr, 200.0);
      lat_i.push_back(latent.slice0(0));
      aud_i.push_back(audio.slice0(0));
    }
    vocal_latents.push_back(cond.slice0(0));
    latents.push_back(adm::stack(lat_i));
    audios.push_back(adm::stack(aud_i));
  }
  const double n = static_cast<double>(per_example.size());
  report["quality"] = {
      {"per_example", per_example},
      {"aggregate",
       {{"latent_snr_db", worst_latent}, {"latent_snr_db_mean", sum_latent / n}, {"audio_snr_db", worst_audio},
        {"audio_snr_db_mean", sum_audio / n}, {"vocal_latent_snr_db", worst_vocal}}},
      {"computed_by", "adm-run (float64 SNR against the bundle's PyTorch fp32 reference)"}};
  if (!a.outputs.empty()) {
    fs::create_directories(a.outputs);
    adm::write_npy((fs::path(a.outputs) / "vocal_latent.npy").string(), adm::stack(vocal_latents));
    adm::write_npy((fs::path(a.outputs) / "latents.npy").string(), adm::stack(latents));
    adm::write_npy((fs::path(a.outputs) / "audio.npy").string(), adm::stack(audios));
  }

  if (a.runs > 0)
    adm::measure_latency(pipe, m, first(ref.vocals), row(ref.noise.slice0(0), 0), a.warmup, a.runs, report);
  report["memory"] = {{"peak_rss_mb", adm::peak_rss_mb()},
                      {"note", "peak RSS of the adm-run process (ExecuTorch runtime, programs and arrays)"}};
  write_etdumps(pipe, a.etdump, report);

  // Budget: the latent SNR floor. The paired audio distances relative to the seed spread need
  // runtime_py's numpy metrics (`python -m runtime_py verify --runner native` computes them).
  json lines = json::array(), skipped = json::array();
  const json& budget = m.quality_budget;
  if (budget.contains("latent_snr_db_min")) {
    if (!budget["latent_snr_db_min"].is_number())
      throw BundleError(m.source + ": field 'quality_budget.latent_snr_db_min' must be a number");
    const double floor = budget["latent_snr_db_min"].get<double>();
    char limit[64];
    std::snprintf(limit, sizeof limit, ">= %g", floor);
    lines.push_back({{"metric", "latent_snr_db (worst example)"}, {"value", worst_latent}, {"limit", limit},
                     {"pass", worst_latent >= floor}});
  }
  for (auto it = budget.begin(); it != budget.end(); ++it)
    if (it.key() != "latent_snr_db_min")
      skipped.push_back({{"limit", it.key()}, {"why", "needs runtime_py's numpy metrics; run python -m runtime_py verify "
                                                      "--runner native where Python is present"}});
  report["budget"]["lines"] = lines;
  report["budget"]["not_evaluated"] = skipped;
  bool passed = true;
  std::string failed;
  for (const json& line : lines)
    if (!line["pass"].get<bool>()) passed = false, failed += (failed.empty() ? "" : ", ") + line["metric"].get<std::string>();
  report["status"] = passed ? "pass" : "fail";
  report["reason"] = passed ? json(nullptr) : json("quality budget exceeded: " + failed);
  print_latency(report);
  return finish(passed ? 0 : kExitFail);
}

int run(const Args& a) {
  const adm::Manifest m = open_bundle(a.bundle);
  const Array vocals = adm::read_npy(a.vocals), noise = adm::read_npy(a.noise);
  adm::Pipeline pipe(m, a.threads, !a.etdump.empty());
  const auto& enc_in = pipe.component("vae_encoder").input_shapes[0];
  const auto& dec_in = pipe.component("vae_decoder").input_shapes[0];
  Array want_v, want_n;
  want_v.shape = enc_in, want_n.shape = dec_in;
  if (vocals.shape.size() != 3 || !std::equal(enc_in.begin() + 1, enc_in.end(), vocals.shape.begin() + 1))
    throw BundleError(a.vocals + ": shape " + vocals.shape_str() + "; the encoder takes (N, " +
                      std::to_string(enc_in[1]) + ", " + std::to_string(enc_in[2]) + ")");
  if (noise.shape.size() != 3 || noise.shape[0] != vocals.shape[0] ||
      !std::equal(dec_in.begin() + 1, dec_in.end(), noise.shape.begin() + 1))
    throw BundleError(a.noise + ": shape " + noise.shape_str() + "; the sampler takes (" + std::to_string(vocals.shape[0]) +
                      ", " + std::to_string(dec_in[1]) + ", " + std::to_string(dec_in[2]) + ")");
  std::vector<Array> vocal_latents, latents, audios;
  for (size_t i = 0; i < vocals.shape[0]; ++i) {
    const Array cond = pipe.encode(row(vocals, i));
    const Array latent = pipe.sample(cond, row(noise, i));
    vocal_latents.push_back(cond.slice0(0));
    latents.push_back(latent.slice0(0));
    audios.push_back(pipe.decode(latent).slice0(0));
  }
  fs::create_directories(a.out_dir);
  adm::write_npy((fs::path(a.out_dir) / "vocal_latent.npy").string(), adm::stack(vocal_latents));
  adm::write_npy((fs::path(a.out_dir) / "latents.npy").string(), adm::stack(latents));
  adm::write_npy((fs::path(a.out_dir) / "audio.npy").string(), adm::stack(audios));
  json timing = {{"bundle", a.bundle}, {"runner", "native"}, {"device", adm::device_info(pipe.threads())},
                 {"latency", json::object()}, {"end_to_end", json::object()}};
  if (a.runs > 0) adm::measure_latency(pipe, m, row(vocals, 0), row(noise, 0), a.warmup, a.runs, timing);
  timing["memory"] = {{"peak_rss_mb", adm::peak_rss_mb()}};
  write_etdumps(pipe, a.etdump, timing);
  adm::write_json((fs::path(a.out_dir) / "timing.json").string(), timing);
  print_latency(timing);
  std::printf("peak RSS %.1f MiB; outputs in %s\n", adm::peak_rss_mb(), a.out_dir.c_str());
  return 0;
}

long long parse_long(const std::string& flag, const std::string& text, long long lowest) {
  try {
    size_t used = 0;
    const long long v = std::stoll(text, &used);
    if (used == text.size() && v >= lowest) return v;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(flag + " takes an integer >= " + std::to_string(lowest) + ", got '" + text + "'");
}

int draw(int argc, char** argv) {
  std::map<std::string, long long> v = {{"--keys", -1}, {"--count", -1}, {"--seed", 0}, {"--call", -1}};
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (!v.count(flag)) throw std::invalid_argument("draw: unknown option '" + flag + "'");
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    v[flag] = parse_long(flag, argv[i + 1], flag == "--seed" ? std::numeric_limits<long long>::min() : 0);
  }
  for (const char* flag : {"--keys", "--count", "--call"})
    if (v[flag] < 0) throw std::invalid_argument(std::string("draw needs ") + flag);
  std::cout << json(adm::draw_indices(v["--keys"], v["--count"], v["--seed"], v["--call"])).dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::cout << kUsage;
    return 0;
  }
  if (argc >= 2 && std::string(argv[1]) == "--version") {
    std::cout << "adm-run " ADM_RUN_VERSION " (" ADM_EXECUTORCH_VERSION_TEXT ")" << std::endl;
    return 0;
  }
  try {
    if (argc >= 2 && std::string(argv[1]) == "draw") return draw(argc, argv);
    const Args a = parse_args(argc, argv);
    if (a.verb == "verify") return verify(a);
    if (a.verb == "run") return run(a);
    if (a.verb == "digest") {
      std::ifstream in(a.bundle);
      if (!in) throw adm::InputError(a.bundle + ": cannot be read");
      std::stringstream text;
      text << in.rdbuf();
      std::cout << adm::manifest_digest(adm::parse_python_json(text.str())) << std::endl;
      return 0;
    }
    open_bundle(a.bundle);
    std::cout << a.bundle << ": manifest and sha256 of every file check out" << std::endl;
    return 0;
  } catch (const std::invalid_argument& e) {
    std::cerr << "adm-run: error: " << e.what() << "\n\n" << kUsage;
    return kExitBadInput;
  } catch (const nlohmann::json::exception& e) {
    std::cerr << "adm-run: error: " << e.what() << std::endl;
    return kExitBadInput;
  } catch (const adm::InputError& e) {
    std::cerr << "adm-run: error: " << e.what() << std::endl;
    return kExitBadInput;
  } catch (const adm::RuntimeFailure& e) {
    std::cerr << "adm-run: ExecuTorch error: " << e.what() << std::endl;
    return kExitRuntime;
  } catch (const std::exception& e) {
    std::cerr << "adm-run: error: " << e.what() << std::endl;
    return kExitRuntime;
  }
}
