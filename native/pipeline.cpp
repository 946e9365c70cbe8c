#include "pipeline.h"

#include <chrono>
#include <fstream>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/error.h>
#ifdef ADM_HAVE_ETDUMP
#include <executorch/devtools/etdump/etdump_flatcc.h>
#endif

#include "threadpool_decl.h"
#include "version.h"

namespace adm {

using executorch::aten::ScalarType;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

// The program's own record of its tensor names (targets/executorch.py IO_NAMES_METHOD).
constexpr const char* kIoNamesMethod = "io_names";

std::string error_text(Error e) {
  return std::string(executorch::runtime::to_string(e)) + " (code " + std::to_string(static_cast<int>(e)) + ")";
}

std::string shape_str(const std::vector<size_t>& s) {
  Array a;
  a.shape = s;
  return a.shape_str();
}

}  // namespace

Component::Component(const std::string& name_, const std::string& path_, const ComponentEntry& entry, bool etdump)
    : name(name_), path(path_) {
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<executorch::runtime::EventTracer> tracer;
#ifdef ADM_HAVE_ETDUMP
  if (etdump) tracer = std::make_unique<executorch::etdump::ETDumpGen>();
#else
  if (etdump) throw RuntimeFailure("--etdump: this adm-run was built without executorch::etdump");
#endif
  module_ = std::make_unique<Module>(path, Module::LoadMode::File, std::move(tracer));
  if (Error e = module_->load(); e != Error::Ok)
    throw RuntimeFailure(path + ": ExecuTorch could not load the program: " + error_text(e) +
                         " (built by a newer ExecuTorch than " ADM_EXECUTORCH_VERSION_TEXT "?)");
  auto names = module_->method_names();
  if (!names.ok() || !names->count("forward"))
    throw RuntimeFailure(path + ": the program has no 'forward' method");
  if (!names->count(kIoNamesMethod))
    throw RuntimeFailure(path + ": no '" + std::string(kIoNamesMethod) +
                         "' method; export it with targets.executorch, which records the tensor names in the program");
  auto io = module_->execute(kIoNamesMethod);
  if (!io.ok() || io->empty() || !(*io)[0].isTensor())
    throw RuntimeFailure(path + ": the '" + std::string(kIoNamesMethod) + "' method did not return a tensor");
  const auto& raw = (*io)[0].toTensor();
  const std::string text(raw.const_data_ptr<char>(), raw.nbytes());
  nlohmann::json io_names;
  try {
    io_names = nlohmann::json::parse(text);
    input_names = io_names.at("inputs").get<std::vector<std::string>>();
    const auto outputs = io_names.at("outputs").get<std::vector<std::string>>();
    if (outputs.size() != 1) throw RuntimeFailure(path + ": forward must have exactly one output, names " + text);
    output_name = outputs[0];
  } catch (const nlohmann::json::exception& e) {
    throw RuntimeFailure(path + ": the '" + std::string(kIoNamesMethod) + "' method holds no valid name list (" + e.what() + ")");
  }

  auto meta = module_->method_meta("forward");
  if (!meta.ok()) throw RuntimeFailure(path + ": no metadata for 'forward': " + error_text(meta.error()));
  if (meta->num_inputs() != input_names.size())
    throw RuntimeFailure(path + ": forward takes " + std::to_string(meta->num_inputs()) + " inputs but the program names " +
                         std::to_string(input_names.size()));
  for (size_t i = 0; i < input_names.size(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) throw RuntimeFailure(path + ": input " + input_names[i] + " is not a tensor");
    if (info->scalar_type() != ScalarType::Float && info->scalar_type() != ScalarType::Long)
      throw RuntimeFailure(path + ": input " + input_names[i] +
                           " is neither float32 nor int64; adm-run feeds float32 tensors and int64 indices");
    input_is_int64.push_back(info->scalar_type() == ScalarType::Long);
    std::vector<size_t> shape(info->sizes().begin(), info->sizes().end());
    input_shapes.push_back(shape);
  }
  auto out_info = meta->output_tensor_meta(0);
  if (!out_info.ok() || out_info->scalar_type() != ScalarType::Float)
    throw RuntimeFailure(path + ": output " + output_name + " is not a float32 tensor");
  output_shape.assign(out_info->sizes().begin(), out_info->sizes().end());

  // The manifest and the program must agree on every name and shape.
  const std::string where = "components." + name + ".";
  if (entry.inputs.size() != input_names.size())
    throw BundleError(path + ": the program takes " + std::to_string(input_names.size()) + " inputs, " + where +
                      "inputs lists " + std::to_string(entry.inputs.size()));
  for (const TensorSpec& spec : entry.inputs) {
    size_t i = 0;
    while (i < input_names.size() && input_names[i] != spec.name) ++i;
    if (i == input_names.size())
      throw BundleError(path + ": the program has no input '" + spec.name + "' (" + where + "inputs)");
    if (spec.shape != input_shapes[i])
      throw BundleError(path + ": input '" + spec.name + "' is " + shape_str(input_shapes[i]) + " in the program, " +
                        shape_str(spec.shape) + " in " + where + "inputs");
  }
  if (entry.outputs[0].name != output_name || entry.outputs[0].shape != output_shape)
    throw BundleError(path + ": output '" + output_name + "' " + shape_str(output_shape) + " in the program, '" +
                      entry.outputs[0].name + "' " + shape_str(entry.outputs[0].shape) + " in " + where + "outputs");
  if (Error e = module_->load_method("forward"); e != Error::Ok)
    throw RuntimeFailure(path + ": could not load 'forward': " + error_text(e) +
                         " (an operator or backend missing from this build?)");
  load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

Component::~Component() = default;

Array Component::run(const std::vector<std::pair<std::string, const Array*>>& inputs,
                     const std::vector<std::pair<std::string, const std::vector<int64_t>*>>& index_inputs) {
  std::vector<executorch::extension::TensorPtr> tensors;
  std::vector<EValue> values;
  for (size_t i = 0; i < input_names.size(); ++i) {
    if (input_is_int64[i]) {
      const std::vector<int64_t>* idx = nullptr;
      for (const auto& [n, v] : index_inputs)
        if (n == input_names[i]) idx = v;
      if (idx == nullptr) throw RuntimeFailure(name + ": int64 input '" + input_names[i] + "' not given");
      if (input_shapes[i].size() != 1 || input_shapes[i][0] != idx->size())
        throw RuntimeFailure(name + ": input '" + input_names[i] + "' must be " + shape_str(input_shapes[i]) + ", got (" +
                             std::to_string(idx->size()) + ",)");
      std::vector<executorch::aten::SizesType> sizes = {static_cast<executorch::aten::SizesType>(idx->size())};
      tensors.push_back(executorch::extension::from_blob(const_cast<int64_t*>(idx->data()), sizes, ScalarType::Long));
      values.emplace_back(*tensors.back());
      continue;
    }
    const Array* array = nullptr;
    for (const auto& [n, a] : inputs)
      if (n == input_names[i]) array = a;
    if (array == nullptr) throw RuntimeFailure(name + ": input '" + input_names[i] + "' not given");
    if (array->shape != input_shapes[i])
      throw RuntimeFailure(name + ": input '" + input_names[i] + "' must be " + shape_str(input_shapes[i]) + ", got " +
                           array->shape_str());
    std::vector<executorch::aten::SizesType> sizes(array->shape.begin(), array->shape.end());
    // The runtime reads the input; const_cast only because from_blob takes a mutable pointer.
    tensors.push_back(executorch::extension::from_blob(const_cast<float*>(array->data.data()), sizes, ScalarType::Float));
    values.emplace_back(*tensors.back());
  }
  auto result = module_->execute("forward", values);
  if (!result.ok()) throw RuntimeFailure(path + ": forward failed: " + error_text(result.error()));
  if (result->empty() || !(*result)[0].isTensor()) throw RuntimeFailure(path + ": forward returned no tensor");
  const auto& out = (*result)[0].toTensor();
  if (out.scalar_type() != ScalarType::Float) throw RuntimeFailure(path + ": forward returned a non-float32 tensor");
  Array a;
  a.shape.assign(out.sizes().begin(), out.sizes().end());
  a.data.assign(out.const_data_ptr<float>(), out.const_data_ptr<float>() + out.numel());
  return a;
}

bool Component::write_etdump(const std::string& out_path) {
#ifdef ADM_HAVE_ETDUMP
  auto* gen = dynamic_cast<executorch::etdump::ETDumpGen*>(module_->event_tracer());
  if (gen == nullptr) return false;
  executorch::etdump::ETDumpResult dump = gen->get_etdump_data();
  if (dump.buf == nullptr || dump.size == 0) return false;
  std::ofstream f(out_path, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(dump.buf), static_cast<std::streamsize>(dump.size));
  free(dump.buf);
  if (!f) throw RuntimeFailure(out_path + ": cannot be written");
  return true;
#else
  (void)out_path;
  return false;
#endif
}

Pipeline::Pipeline(const Manifest& m, int threads, bool etdump) : m_(m) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) throw RuntimeFailure("ExecuTorch's thread pool could not be created");
  // Like runtime_py's ExecuTorchRunner: reset the process-wide pool before loading (XNNPACK
  // takes it when a delegate initialises).
  if (threads > 0 && pool->get_thread_count() != static_cast<size_t>(threads)) {
    if (!pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads)))
      throw RuntimeFailure("ExecuTorch could not resize its thread pool to " + std::to_string(threads));
  }
  threads_ = static_cast<int>(pool->get_thread_count());
  for (const std::string& name : kComponents) {
    const ComponentEntry& entry = m.components.at(name);
    components_.push_back(std::make_unique<Component>(name, join_path(m.bundle, entry.path), entry, etdump));
  }
  const Component& den = component("denoiser");
  for (size_t i = 0; i < den.input_names.size(); ++i)
    if (den.input_is_int64[i] && !(m.compensation.enabled && den.input_names[i] == m.compensation.input))
      throw BundleError(den.path + ": the denoiser takes int64 input '" + den.input_names[i] +
                        "', which the manifest's attention.compensation does not describe; re-export the bundle");
}

Component& Pipeline::component(const std::string& name) {
  for (auto& c : components_)
    if (c->name == name) return *c;
  throw std::out_of_range(name);
}

Array Pipeline::encode(const Array& vocals) { return component("vae_encoder").run({{"audio", &vocals}}); }

Array Pipeline::denoise(const Array& x, const Array& t, const Array& cond, long call) {
  ++denoiser_calls;
  if (!m_.compensation.enabled) return component("denoiser").run({{"x", &x}, {"t", &t}, {"cond", &cond}});
  const Compensation& c = m_.compensation;
  const std::vector<int64_t> idx = draw_indices(c.keys, c.count, c.seed, call);
  return component("denoiser").run({{"x", &x}, {"t", &t}, {"cond", &cond}}, {{c.input, &idx}});
}

Array Pipeline::decode(const Array& latent) { return component("vae_decoder").run({{"latent", &latent}}); }

Array Pipeline::sample(const Array& cond, const Array& noise) {
  // runtime_py/sampler.py: numpy computes each line in float32 (a Python float meets a float32
  // array as float32), so every coefficient is rounded to float first, and no a*b+c is fused.
  const SamplerTable& s = m_.sampler;
  const size_t n = noise.numel(), batch = noise.shape.at(0);
  Array z = noise;
  Array t;
  t.shape = {batch};
  for (int i = 0; i < s.steps; ++i) {
    const float ti = static_cast<float>(s.t[i]);
    t.data.assign(batch, ti);
    Array v;
    if (s.guidance_folded) {
      v = denoise(z, t, cond, i);
      if (v.numel() != n) throw RuntimeFailure("denoiser: returned " + v.shape_str() + " for x " + z.shape_str());
    } else {
      // v = v_u + w (v_c - v_u): both branches in one batch-2 call, (z, z), (t, t), (cond, 0).
      Array null = cond;
      std::fill(null.data.begin(), null.data.end(), 0.0f);
      Array tt;
      tt.shape = {2 * batch};
      tt.data.assign(2 * batch, ti);
      const Array both = denoise(concat0({z, z}), tt, concat0({cond, null}), i);
      if (both.numel() != 2 * n)
        throw RuntimeFailure("denoiser: returned " + both.shape_str() + " for the batch-2 call on x " + z.shape_str());
      v.shape = z.shape;
      v.data.resize(n);
      const float w = static_cast<float>(s.guidance);
      for (size_t k = 0; k < n; ++k) {
        const float v_cond = both.data[k], v_uncond = both.data[n + k];
        const float diff = v_cond - v_uncond;
        const float scaled = w * diff;
        v.data[k] = v_uncond + scaled;
      }
    }
    const float a = static_cast<float>(s.alpha[i]), sg = static_cast<float>(s.sigma[i]);
    const float a_next = static_cast<float>(s.alpha[i + 1]), sg_next = static_cast<float>(s.sigma[i + 1]);
    for (size_t k = 0; k < n; ++k) {
      const float zk = z.data[k], vk = v.data[k];
      const float x0 = a * zk - sg * vk;
      const float eps = sg * zk + a * vk;
      z.data[k] = a_next * x0 + sg_next * eps;
    }
  }
  return z;
}

std::pair<Array, Array> Pipeline::generate(const Array& vocals, const Array& noise) {
  Array latent = sample(encode(vocals), noise);
  Array audio = decode(latent);
  return {std::move(latent), std::move(audio)};
}

}  // namespace adm
