// NumPy arrays on disk: .npy (format 1.0-3.0, little-endian float32, C order) and the stored
// (uncompressed) zip archives that np.savez writes, which is how a bundle keeps its reference.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "errors.h"

namespace adm {

struct Array {
  std::vector<size_t> shape;
  std::vector<float> data;

  size_t numel() const;
  // Shape as "(2, 1, 8000)", the way numpy prints it.
  std::string shape_str() const;
  // Elements [i * stride, (i + 1) * stride) of the leading axis, as an array of shape shape[1:].
  Array slice0(size_t i) const;
};

// Stack equally shaped arrays along a new leading axis.
Array stack(const std::vector<Array>& parts);

// Concatenate arrays along their leading axis (numpy.concatenate, axis 0).
Array concat0(const std::vector<Array>& parts);

// Parse one .npy image; `source` names it in errors (a file, or "archive.npz:name").
Array parse_npy(const std::string& bytes, const std::string& source);
Array read_npy(const std::string& path);
void write_npy(const std::string& path, const Array& array);

// Every member of an np.savez archive, keyed by array name (the member name without ".npy").
// Only stored members are read (np.savez; np.savez_compressed archives are refused by name).
std::map<std::string, Array> read_npz(const std::string& path);

}  // namespace adm
