// SHA-256 (FIPS 180-4) of a file, streamed; the bundle manifest lists one per file.
#pragma once

#include <string>

namespace adm {

// Lower-case hex digest of the file at `path`; throws std::runtime_error naming the file when it
// cannot be read.
std::string sha256_file(const std::string& path);

// Lower-case hex digest of a byte string (tests of the implementation use the FIPS vectors).
std::string sha256_bytes(const std::string& data);

}  // namespace adm
