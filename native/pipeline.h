// The whole generation on the ExecuTorch C++ runtime: encode the vocals, the DDIM loop over the
// manifest's (t, alpha, sigma) table with classifier-free or folded guidance, decode. Line for
// line runtime_py/sampler.py and runtime_py/verify.py's Pipeline, in float32.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "bundle.h"
#include "npy.h"

namespace executorch::extension::module {
class Module;
}

namespace adm {

// One .pte: forward's inputs by name (from the program's io_names method), shapes from its
// method metadata, checked against the manifest.
class Component {
 public:
  Component(const std::string& name, const std::string& path, const ComponentEntry& entry, bool etdump);
  ~Component();
  // Inputs in any order, by name (float32 arrays, and int64 index vectors such as LiteFocus's
  // compensation set); returns the one output.
  Array run(const std::vector<std::pair<std::string, const Array*>>& inputs,
            const std::vector<std::pair<std::string, const std::vector<int64_t>*>>& index_inputs = {});
  // Writes the profiler's recording (no-op without --etdump); returns false when there was none.
  bool write_etdump(const std::string& path);

  const std::string name, path;
  std::vector<std::string> input_names;
  std::vector<std::vector<size_t>> input_shapes;
  std::vector<bool> input_is_int64;  // else float32
  std::string output_name;
  std::vector<size_t> output_shape;
  double load_ms = 0;

 private:
  std::unique_ptr<executorch::extension::module::Module> module_;
};

class Pipeline {
 public:
  // Sets the thread pool (threads > 0) before any program is loaded.
  Pipeline(const Manifest& m, int threads, bool etdump);

  Array encode(const Array& vocals);                                         // (1, C, T) -> (1, D, L)
  // batch B; `call`: the call's index in the generation (the DDIM step), which LiteFocus
  // compensation draw a LiteFocus bundle's denoiser is fed (runtime_py.verify does the same).
  Array denoise(const Array& x, const Array& t, const Array& cond, long call = 0);
  Array sample(const Array& cond, const Array& noise);                       // (1, D, L) each
  Array decode(const Array& latent);                                         // (1, D, L) -> (1, C, T)
  // encode -> sample -> decode; returns (latent, audio).
  std::pair<Array, Array> generate(const Array& vocals, const Array& noise);

  Component& component(const std::string& name);
  int threads() const { return threads_; }
  long denoiser_calls = 0;

 private:
  const Manifest& m_;
  int threads_ = 0;
  std::vector<std::unique_ptr<Component>> components_;
};

}  // namespace adm
