// The manifest's seal: runtime_py.bundle.manifest_digest in C++. The digest is the sha256 of the
// manifest's canonical JSON without its digest field, canonical meaning what Python's
// json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True) writes: keys sorted,
// no whitespace, non-ASCII escaped as \uXXXX, floats as Python's repr, NaN / Infinity as bare
// tokens.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace adm {

inline constexpr const char* kDigestField = "manifest_sha256";

// Parses JSON text that may hold Python's bare NaN / Infinity / -Infinity tokens (json.dumps
// writes them; strict JSON has none): they become marker strings that canonical_json writes back
// as the bare tokens. Throws nlohmann::json::parse_error on malformed text.
nlohmann::json parse_python_json(const std::string& text);

// Python's json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).
std::string canonical_json(const nlohmann::json& value);

// Python's repr(float): shortest round-trip digits, exponent form below 1e-4 and from 1e16.
std::string python_float_repr(double value);

// sha256 of canonical_json(manifest without kDigestField).
std::string manifest_digest(const nlohmann::json& manifest);

}  // namespace adm
