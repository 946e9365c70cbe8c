// LiteFocus's compensation set C (seed 002 eq. 6), drawn exactly as runtime_py/compensation.py
// draws it (hash "adm-counter-hash-v1"): a LiteFocus bundle's denoiser takes C as an int64 input,
// and call k of a generation must get the indices the bundle's reference was sampled with.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace adm {

inline constexpr const char* kCompensationHash = "adm-counter-hash-v1";

// The bijective 32-bit mix (runtime_py.compensation.mix32).
uint32_t mix32(uint32_t x);

// mix(mix(seed mod 2^32) ^ (call * 0x9E3779B9 mod 2^32)).
uint32_t call_key(int64_t seed, int64_t call);

// The `count` keys j in [0, keys) of smallest mix(j ^ call_key(seed, call)), ascending.
std::vector<int64_t> draw_indices(int64_t keys, int64_t count, int64_t seed, int64_t call);

// A bundle's attention.compensation record (absent: dense attention, nothing to draw).
struct Compensation {
  bool enabled = false;
  std::string input;  // the denoiser input that takes the indices
  int64_t keys = 0, count = 0;
  int64_t seed = 0;  // only its low 32 bits enter the hash (seed mod 2^32, as numpy masks it)
};

}  // namespace adm
