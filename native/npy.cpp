#include "npy.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace adm {
namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot be opened");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

uint16_t le16(const std::string& b, size_t at) {
  return uint16_t(uint8_t(b[at])) | uint16_t(uint8_t(b[at + 1])) << 8;
}
uint32_t le32(const std::string& b, size_t at) {
  return uint32_t(le16(b, at)) | uint32_t(le16(b, at + 2)) << 16;
}
uint64_t le64(const std::string& b, size_t at) {
  return uint64_t(le32(b, at)) | uint64_t(le32(b, at + 4)) << 32;
}

// The value text of `'key': value` in a .npy header dict (up to the next top-level comma).
std::string header_value(const std::string& header, const std::string& key, const std::string& source) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw InputError(source + ": .npy header has no '" + key + "' field");
  at = header.find(':', at);
  if (at == std::string::npos) throw InputError(source + ": .npy header field '" + key + "' is malformed");
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end = at;
  if (end < header.size() && header[end] == '(') {
    end = header.find(')', end);
    if (end == std::string::npos) throw InputError(source + ": .npy header 'shape' is not closed");
    return header.substr(at, end - at + 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  return header.substr(at, end - at);
}

}  // namespace

size_t Array::numel() const {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  return n;
}

std::string Array::shape_str() const {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

Array Array::slice0(size_t i) const {
  if (shape.empty() || i >= shape[0]) throw std::out_of_range("slice0: index out of range");
  Array out;
  out.shape.assign(shape.begin() + 1, shape.end());
  size_t stride = out.numel();
  out.data.assign(data.begin() + i * stride, data.begin() + (i + 1) * stride);
  return out;
}

Array stack(const std::vector<Array>& parts) {
  if (parts.empty()) throw std::invalid_argument("stack: no arrays");
  Array out;
  out.shape = parts[0].shape;
  out.shape.insert(out.shape.begin(), parts.size());
  for (const Array& p : parts) {
    if (p.shape != parts[0].shape) throw std::invalid_argument("stack: shapes differ");
    out.data.insert(out.data.end(), p.data.begin(), p.data.end());
  }
  return out;
}

Array concat0(const std::vector<Array>& parts) {
  if (parts.empty()) throw std::invalid_argument("concat0: no arrays");
  Array out = parts[0];
  for (size_t i = 1; i < parts.size(); ++i) {
    const Array& p = parts[i];
    if (p.shape.empty() || p.shape.size() != out.shape.size() ||
        !std::equal(p.shape.begin() + 1, p.shape.end(), out.shape.begin() + 1))
      throw std::invalid_argument("concat0: trailing shapes differ");
    out.shape[0] += p.shape[0];
    out.data.insert(out.data.end(), p.data.begin(), p.data.end());
  }
  return out;
}

Array parse_npy(const std::string& b, const std::string& source) {
  if (b.size() < 10 || b.compare(0, 6, "\x93NUMPY") != 0)
    throw InputError(source + ": not a .npy array (no \\x93NUMPY magic)");
  const int major = uint8_t(b[6]);
  size_t header_len, header_at;
  if (major == 1) {
    header_len = le16(b, 8), header_at = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) throw InputError(source + ": truncated .npy header");
    header_len = le32(b, 8), header_at = 12;
  } else {
    throw InputError(source + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  if (header_at + header_len > b.size()) throw InputError(source + ": truncated .npy header");
  const std::string header = b.substr(header_at, header_len);
  const std::string descr = header_value(header, "descr", source);
  if (descr != "'<f4'" && descr != "'=f4'")
    throw InputError(source + ": dtype " + descr + " is not float32 ('<f4'); adm-run reads float32 arrays");
  if (header_value(header, "fortran_order", source) != "False")
    throw InputError(source + ": Fortran-ordered array; write it C-contiguous (np.ascontiguousarray)");
  Array a;
  std::string shape = header_value(header, "shape", source);
  for (size_t i = 1; i + 1 < shape.size();) {
    while (i + 1 < shape.size() && (shape[i] == ' ' || shape[i] == ',')) ++i;
    if (i + 1 >= shape.size()) break;
    size_t used = 0;
    unsigned long long d = std::stoull(shape.substr(i), &used);
    a.shape.push_back(static_cast<size_t>(d));
    i += used;
  }
  const size_t data_at = header_at + header_len;
  const size_t nbytes = a.numel() * sizeof(float);
  if (b.size() - data_at != nbytes)
    throw InputError(source + ": holds " + std::to_string(b.size() - data_at) + " data bytes, shape " +
                             a.shape_str() + " needs " + std::to_string(nbytes));
  a.data.resize(a.numel());
  std::memcpy(a.data.data(), b.data() + data_at, nbytes);  // little-endian hosts only (all targets)
  return a;
}

Array read_npy(const std::string& path) { return parse_npy(read_file(path), path); }

void write_npy(const std::string& path, const Array& a) {
  std::string shape = "(";
  for (size_t i = 0; i < a.shape.size(); ++i) shape += std::to_string(a.shape[i]) + ", ";
  if (a.shape.size() > 1) shape.resize(shape.size() - 2);
  else if (a.shape.size() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad with spaces so that magic + length + header + '\n' is a multiple of 64 (format 1.0).
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw InputError(path + ": cannot be written");
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  out.write(magic, 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char len_le[2] = {char(len & 0xff), char(len >> 8)};
  out.write(len_le, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(a.data.data()), static_cast<std::streamsize>(a.data.size() * sizeof(float)));
  if (!out) throw InputError(path + ": write failed");
}

std::map<std::string, Array> read_npz(const std::string& path) {
  const std::string z = read_file(path);
  // End of central directory: 22 bytes plus a comment of up to 64 KiB, at the end.
  size_t eocd = std::string::npos;
  if (z.size() >= 22) {
    const size_t lowest = z.size() > 22 + 65535 ? z.size() - 22 - 65535 : 0;
    for (size_t i = z.size() - 22 + 1; i-- > lowest;) {
      if (le32(z, i) == 0x06054b50) {
        eocd = i;
        break;
      }
    }
  }
  if (eocd == std::string::npos) throw InputError(path + ": not a zip archive (no end of central directory)");
  uint64_t entries = le16(z, eocd + 10);
  uint64_t cd_offset = le32(z, eocd + 16);
  if ((entries == 0xffff || cd_offset == 0xffffffff) && eocd >= 20 && le32(z, eocd - 20) == 0x07064b50) {
    const uint64_t z64 = le64(z, eocd - 20 + 8);  // zip64 end of central directory record
    if (z64 + 56 > z.size() || le32(z, z64) != 0x06064b50) throw InputError(path + ": broken zip64 record");
    entries = le64(z, z64 + 32);
    cd_offset = le64(z, z64 + 48);
  }
  std::map<std::string, Array> arrays;
  size_t at = cd_offset;
  for (uint64_t e = 0; e < entries; ++e) {
    if (at + 46 > z.size() || le32(z, at) != 0x02014b50) throw InputError(path + ": broken zip central directory");
    const uint16_t method = le16(z, at + 10);
    uint64_t comp_size = le32(z, at + 20), size = le32(z, at + 24);
    const uint16_t name_len = le16(z, at + 28), extra_len = le16(z, at + 30), comment_len = le16(z, at + 32);
    uint64_t local = le32(z, at + 42);
    const std::string name = z.substr(at + 46, name_len);
    // Zip64 extended information: the 64-bit values of the fields that read 0xffffffff, in order.
    for (size_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint16_t id = le16(z, x), len = le16(z, x + 2);
      if (id == 0x0001) {
        size_t v = x + 4;
        if (size == 0xffffffff) size = le64(z, v), v += 8;
        if (comp_size == 0xffffffff) comp_size = le64(z, v), v += 8;
        if (local == 0xffffffff) local = le64(z, v);
      }
      x += 4 + len;
    }
    at += 46 + name_len + extra_len + comment_len;
    if (method != 0)
      throw InputError(path + ": member " + name + " is compressed (method " + std::to_string(method) +
                               "); the bundle reference is written with np.savez (stored), not np.savez_compressed");
    if (local + 30 > z.size() || le32(z, local) != 0x04034b50)
      throw InputError(path + ": broken local header of member " + name);
    const size_t data_at = local + 30 + le16(z, local + 26) + le16(z, local + 28);
    if (data_at + size > z.size() || comp_size != size) throw InputError(path + ": member " + name + " is truncated");
    std::string key = name;
    if (key.size() > 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
    arrays[key] = parse_npy(z.substr(data_at, size), path + ":" + name);
  }
  return arrays;
}

}  // namespace adm
