#include "compensation.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace adm {

namespace {
constexpr uint32_t kMix = 0x45D9F3Bu;
constexpr uint32_t kGolden = 0x9E3779B9u;
}  // namespace

uint32_t mix32(uint32_t x) {
  // Unsigned 32-bit arithmetic wraps mod 2^32, which is what numpy's `& 0xFFFFFFFF` computes.
  x ^= x >> 16;
  x *= kMix;
  x ^= x >> 16;
  x *= kMix;
  return x ^ (x >> 16);
}

uint32_t call_key(int64_t seed, int64_t call) {
  // The low 32 bits of a two's-complement int64 are what Python's `seed & 0xFFFFFFFF` keeps.
  const uint32_t s = mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed)));
  return mix32(s ^ (static_cast<uint32_t>(static_cast<uint64_t>(call)) * kGolden));
}

std::vector<int64_t> draw_indices(int64_t keys, int64_t count, int64_t seed, int64_t call) {
  if (count < 0 || count > keys)
    throw std::invalid_argument("compensation count " + std::to_string(count) + " is not in [0, " +
                                std::to_string(keys) + "]");
  const uint32_t key = call_key(seed, call);
  std::vector<std::pair<uint32_t, int64_t>> h(static_cast<size_t>(keys));
  for (int64_t j = 0; j < keys; ++j) h[j] = {mix32(static_cast<uint32_t>(j) ^ key), j};
  // mix32 is a bijection, so hashes never tie: the `count` smallest are one well-defined set.
  std::nth_element(h.begin(), h.begin() + count, h.end());
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out.push_back(h[i].second);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace adm
