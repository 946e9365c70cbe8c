// A bundle on the device: manifest.json read and checked the way runtime_py/bundle.py checks it,
// and the sha256 of every file compared with the manifest before any program is loaded.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "compensation.h"
#include "errors.h"

namespace adm {

inline constexpr int kFormatVersion = 1;  // runtime_py.bundle.FORMAT_VERSION
inline constexpr const char* kManifest = "manifest.json";
inline const std::vector<std::string> kComponents = {"vae_encoder", "denoiser", "vae_decoder"};

struct TensorSpec {
  std::string name;
  std::vector<size_t> shape;
  std::string dtype;
};

struct ComponentEntry {
  std::string path;  // relative to the bundle
  std::vector<TensorSpec> inputs, outputs;
};

struct SamplerTable {
  std::vector<double> t, alpha, sigma;  // steps + 1 rows
  double guidance = 1.0;
  bool guidance_folded = false;
  int steps = 0;
  int denoiser_batch = 1;
};

struct Manifest {
  std::string bundle;  // the directory
  std::string source;  // bundle/manifest.json, for messages
  nlohmann::json raw;  // every field, unknown ones included (they are ignored, not refused)
  std::string target, model, precision_label;
  SamplerTable sampler;
  int sample_rate = 0, channels = 0;
  long segment_samples = 0;
  std::map<std::string, ComponentEntry> components;
  std::map<std::string, std::string> files;  // relative path -> sha256
  std::string reference_inputs, reference_outputs;
  nlohmann::json quality_budget;
  // attention.compensation of a LiteFocus bundle: the denoiser's index input, drawn per call.
  Compensation compensation;
};

// Reads and validates bundle/manifest.json (required fields, the three components, a consistent
// sampler table). Does not hash; see check_files.
Manifest load_manifest(const std::string& bundle);

// Refuses a bundle that is not an ExecuTorch bundle (target != "executorch").
void require_executorch(const Manifest& m);

// Every file the manifest lists exists and has its sha256; no file is unlisted. Throws
// BundleError naming the first offending file.
void check_files(const Manifest& m);

std::string join_path(const std::string& dir, const std::string& rel);

}  // namespace adm
