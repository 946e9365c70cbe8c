#include "bundle.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "canonical.h"
#include "sha256.h"

namespace adm {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const json& field(const json& obj, const std::string& key, const std::string& where, const std::string& source) {
  if (!obj.is_object() || !obj.contains(key))
    throw BundleError(source + ": field '" + where + key + "' is missing; re-export the bundle");
  return obj.at(key);
}

template <typename T>
T as(const json& value, const std::string& name, const std::string& source) {
  try {
    return value.get<T>();
  } catch (const json::exception&) {
    throw BundleError(source + ": field '" + name + "' has the wrong type (" + value.type_name() + ")");
  }
}

std::vector<TensorSpec> tensor_specs(const json& list, const std::string& name, const std::string& source) {
  if (!list.is_array()) throw BundleError(source + ": field '" + name + "' must be a list");
  std::vector<TensorSpec> out;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string at = name + "[" + std::to_string(i) + "].";
    TensorSpec s;
    s.name = as<std::string>(field(list[i], "name", at, source), at + "name", source);
    s.shape = as<std::vector<size_t>>(field(list[i], "shape", at, source), at + "shape", source);
    s.dtype = as<std::string>(field(list[i], "dtype", at, source), at + "dtype", source);
    out.push_back(s);
  }
  return out;
}

std::string short_digest(const std::string& d) { return d.substr(0, 12) + "..."; }

}  // namespace

std::string join_path(const std::string& dir, const std::string& rel) { return (fs::path(dir) / rel).string(); }

Manifest load_manifest(const std::string& bundle) {
  Manifest m;
  m.bundle = bundle;
  m.source = join_path(bundle, kManifest);
  const std::string& src = m.source;
  if (!fs::is_directory(bundle)) throw BundleError(bundle + ": not a directory; pass a bundle written by `toolkit export`");
  if (!fs::is_regular_file(src)) throw BundleError(src + ": not found; is " + bundle + " a bundle written by `toolkit export`?");
  std::ifstream in(src);
  std::stringstream text;
  text << in.rdbuf();
  try {
    m.raw = parse_python_json(text.str());  // json.dumps may write NaN / Infinity
  } catch (const json::parse_error& e) {
    throw BundleError(src + ": not valid JSON (" + e.what() + ")");
  }
  const json& r = m.raw;
  if (!r.is_object()) throw BundleError(src + ": the manifest must be a JSON object");
  for (const char* key : {"format_version", "toolkit_version", "model", "target", "precision", "runtime", "sampler",
                          "audio", "components", "files", "quality_budget", "reference"})
    field(r, key, "", src);
  const json& version = r.at("format_version");
  if (!version.is_number_integer() || version.get<int>() != kFormatVersion)
    throw BundleError(src + ": field 'format_version' is " + version.dump() + "; this runner reads " +
                      std::to_string(kFormatVersion));
  m.target = as<std::string>(r.at("target"), "target", src);
  m.model = as<std::string>(r.at("model"), "model", src);
  m.precision_label = r.at("precision").is_string() ? r.at("precision").get<std::string>() : r.at("precision").dump();

  const json& comps = r.at("components");
  if (!comps.is_object()) throw BundleError(src + ": field 'components' must be an object");
  for (const std::string& name : kComponents) {
    if (!comps.contains(name)) throw BundleError(src + ": components." + name + " is missing");
    const json& c = comps.at(name);
    const std::string at = "components." + name + ".";
    for (const char* key : {"path", "inputs", "outputs", "precision"})
      if (!c.is_object() || !c.contains(key)) throw BundleError(src + ": " + at + key + " is missing");
    ComponentEntry e;
    e.path = as<std::string>(c.at("path"), at + "path", src);
    e.inputs = tensor_specs(c.at("inputs"), at + "inputs", src);
    e.outputs = tensor_specs(c.at("outputs"), at + "outputs", src);
    if (e.outputs.size() != 1) throw BundleError(src + ": " + at + "outputs must name exactly one tensor");
    m.components[name] = e;
  }

  const json& s = r.at("sampler");
  for (const char* key : {"t", "alpha", "sigma", "guidance", "guidance_folded", "steps", "denoiser_batch"})
    if (!s.is_object() || !s.contains(key)) throw BundleError(src + ": sampler." + std::string(key) + " is missing");
  m.sampler.t = as<std::vector<double>>(s.at("t"), "sampler.t", src);
  m.sampler.alpha = as<std::vector<double>>(s.at("alpha"), "sampler.alpha", src);
  m.sampler.sigma = as<std::vector<double>>(s.at("sigma"), "sampler.sigma", src);
  m.sampler.guidance = as<double>(s.at("guidance"), "sampler.guidance", src);
  m.sampler.guidance_folded = as<bool>(s.at("guidance_folded"), "sampler.guidance_folded", src);
  m.sampler.steps = as<int>(s.at("steps"), "sampler.steps", src);
  m.sampler.denoiser_batch = as<int>(s.at("denoiser_batch"), "sampler.denoiser_batch", src);
  const size_t rows = static_cast<size_t>(m.sampler.steps) + 1;
  if (m.sampler.steps < 1 || m.sampler.t.size() != rows || m.sampler.alpha.size() != rows || m.sampler.sigma.size() != rows)
    throw BundleError(src + ": sampler table lengths disagree with sampler.steps=" + std::to_string(m.sampler.steps));
  for (size_t i = 0; i < rows; ++i) {
    const double a = m.sampler.alpha[i], sg = m.sampler.sigma[i];
    if (std::fabs(a * a + sg * sg - 1.0) > 1e-6)
      throw BundleError(src + ": sampler row " + std::to_string(i) + ": alpha^2 + sigma^2 = " + std::to_string(a * a + sg * sg) + " != 1");
  }
  if (m.sampler.denoiser_batch != (m.sampler.guidance_folded ? 1 : 2))
    throw BundleError(src + ": sampler.denoiser_batch is " + std::to_string(m.sampler.denoiser_batch) + " but guidance is " +
                      (m.sampler.guidance_folded ? "folded (batch 1)" : "classifier-free (batch 2)"));

  const json& audio = r.at("audio");
  m.sample_rate = as<int>(field(audio, "sample_rate", "audio.", src), "audio.sample_rate", src);
  m.channels = as<int>(field(audio, "channels", "audio.", src), "audio.channels", src);
  m.segment_samples = as<long>(field(audio, "segment_samples", "audio.", src), "audio.segment_samples", src);

  const json& files = r.at("files");
  if (!files.is_object()) throw BundleError(src + ": field 'files' must map paths to sha256 digests");
  for (auto it = files.begin(); it != files.end(); ++it)
    m.files[it.key()] = as<std::string>(it.value(), "files." + it.key(), src);
  for (const auto& [name, c] : m.components)
    if (!m.files.count(c.path)) throw BundleError(src + ": components." + name + ".path " + c.path + " is not listed in 'files'");

  // LiteFocus (manifest 'attention'): the denoiser takes the compensation indices as an input,
  // drawn per call by the hash runtime_py/compensation.py names; absent or "dense": nothing to draw.
  if (r.contains("attention")) {
    const json& att = r.at("attention");
    const std::string mode = as<std::string>(field(att, "mode", "attention.", src), "attention.mode", src);
    if (mode == "litefocus") {
      const json& c = field(att, "compensation", "attention.", src);
      const std::string at = "attention.compensation.";
      const std::string hash = as<std::string>(field(c, "hash", at, src), at + "hash", src);
      if (hash != kCompensationHash)
        throw BundleError(src + ": field '" + at + "hash' is '" + hash + "'; this adm-run draws '" +
                          kCompensationHash + "' only (rebuild adm-run from this toolkit or re-export the bundle)");
      Compensation& comp = m.compensation;
      comp.enabled = true;
      comp.input = as<std::string>(field(c, "input", at, src), at + "input", src);
      comp.keys = as<int64_t>(field(c, "keys", at, src), at + "keys", src);
      comp.count = as<int64_t>(field(c, "count", at, src), at + "count", src);
      comp.seed = as<int64_t>(field(c, "seed", at, src), at + "seed", src);
      if (as<std::string>(field(c, "dtype", at, src), at + "dtype", src) != "int64")
        throw BundleError(src + ": field '" + at + "dtype' must be int64");
      if (comp.count < 1 || comp.count > comp.keys)
        throw BundleError(src + ": field '" + at + "count' = " + std::to_string(comp.count) + " must be in [1, keys=" +
                          std::to_string(comp.keys) + "]");
      bool found = false;
      for (const TensorSpec& spec : m.components.at("denoiser").inputs)
        if (spec.name == comp.input) {
          found = spec.dtype == "int64" && spec.shape == std::vector<size_t>{static_cast<size_t>(comp.count)};
          if (!found) break;
        }
      if (!found)
        throw BundleError(src + ": field '" + at + "input' names '" + comp.input +
                          "', which is not an int64 [count] input of components.denoiser.inputs");
    } else if (mode != "dense") {
      throw BundleError(src + ": field 'attention.mode' is '" + mode + "'; this adm-run runs dense or litefocus bundles");
    }
  }

  const json& ref = r.at("reference");
  m.reference_inputs = as<std::string>(field(ref, "inputs", "reference.", src), "reference.inputs", src);
  m.reference_outputs = as<std::string>(field(ref, "outputs", "reference.", src), "reference.outputs", src);
  m.quality_budget = r.at("quality_budget");
  if (!m.quality_budget.is_object()) throw BundleError(src + ": field 'quality_budget' must be an object");

  // The seal (runtime_py.bundle.manifest_digest): a manifest edited after export is refused.
  if (!r.contains(kDigestField))
    throw BundleError(src + ": field '" + std::string(kDigestField) +
                      "' is missing; re-export the bundle with this toolkit (older bundles are not sealed)");
  if (!r.at(kDigestField).is_string() || r.at(kDigestField).get<std::string>() != manifest_digest(r))
    throw BundleError(src + ": field '" + std::string(kDigestField) +
                      "' does not match the manifest's content; the manifest was edited or corrupted after export "
                      "- re-copy or re-export the bundle");
  return m;
}

void require_executorch(const Manifest& m) {
  if (m.target != "executorch")
    throw BundleError(m.source + ": field 'target' is '" + m.target +
                      "'; adm-run runs ExecuTorch bundles only (verify this one with `python -m runtime_py verify`)");
}

void check_files(const Manifest& m) {
  for (const auto& [rel, digest] : m.files) {
    const std::string path = join_path(m.bundle, rel);
    if (!fs::is_regular_file(path)) throw BundleError(path + ": listed in the manifest but missing; re-copy the bundle");
    const std::string actual = sha256_file(path);
    if (actual != digest)
      throw BundleError(path + ": sha256 mismatch (manifest " + short_digest(digest) + ", file " + short_digest(actual) +
                        "); the file was altered or corrupted in transit; refusing to load it");
  }
  std::vector<std::string> extra;
  for (const auto& entry : fs::recursive_directory_iterator(m.bundle)) {
    if (!entry.is_regular_file() || entry.path().filename() == kManifest) continue;
    const std::string rel = fs::relative(entry.path(), m.bundle).generic_string();
    if (!m.files.count(rel)) extra.push_back(rel);
  }
  if (!extra.empty()) {
    std::sort(extra.begin(), extra.end());
    throw BundleError(join_path(m.bundle, extra[0]) + ": not listed in the manifest (" + std::to_string(extra.size()) + " unlisted)");
  }
}

}  // namespace adm
