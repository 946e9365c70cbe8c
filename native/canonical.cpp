#include "canonical.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "sha256.h"

namespace adm {
using nlohmann::json;

namespace {

// A string no manifest holds (it starts with a NUL), standing for a bare non-finite token.
const std::string kNonFinite = std::string("\0", 1) + "adm-non-finite:";

}  // namespace

json parse_python_json(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) out += text[++i];
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
      out += c;
      continue;
    }
    bool replaced = false;
    for (const char* token : {"-Infinity", "Infinity", "NaN"}) {
      const size_t n = std::strlen(token);
      if (text.compare(i, n, token) == 0) {
        out += "\"\\u0000adm-non-finite:" + std::string(token) + "\"";
        i += n - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += c;
  }
  return json::parse(out);
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v < 0 ? "-Infinity" : "Infinity";
  char buf[64];
  // Shortest digits that round-trip, in scientific form: "-1.2345e+02".
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') sign = "-", sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exponent = std::stoi(sci.substr(e + 1));
  const int decpt = exponent + 1;  // digits d1 d2 ... mean 0.d1d2... x 10^decpt
  const int n = static_cast<int>(digits.size());
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) return sign + "0." + std::string(-decpt, '0') + digits;
    if (decpt >= n) return sign + digits + std::string(decpt - n, '0') + ".0";
    return sign + digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  std::string mantissa = digits.substr(0, 1) + (n > 1 ? "." + digits.substr(1) : "");
  const int x = decpt - 1;
  std::string exp_text = std::to_string(std::abs(x));
  if (exp_text.size() < 2) exp_text = "0" + exp_text;
  return sign + mantissa + "e" + (x < 0 ? "-" : "+") + exp_text;
}

std::string canonical_json(const json& value) {
  switch (value.type()) {
    case json::value_t::object: {
      std::string out = "{";
      bool first = true;
      for (auto it = value.begin(); it != value.end(); ++it) {  // std::map: sorted by UTF-8 bytes
        out += (first ? "" : ",") + json(it.key()).dump(-1, ' ', true) + ":" + canonical_json(it.value());
        first = false;
      }
      return out + "}";
    }
    case json::value_t::array: {
      std::string out = "[";
      for (size_t i = 0; i < value.size(); ++i) out += (i ? "," : "") + canonical_json(value[i]);
      return out + "]";
    }
    case json::value_t::string: {
      const auto& s = value.get_ref<const std::string&>();
      if (s.rfind(kNonFinite, 0) == 0) return s.substr(kNonFinite.size());
      return value.dump(-1, ' ', true);
    }
    case json::value_t::number_float:
      return python_float_repr(value.get<double>());
    default:  // null, booleans, integers
      return value.dump();
  }
}

std::string manifest_digest(const json& manifest) {
  json body = manifest;
  body.erase(kDigestField);
  return sha256_bytes(canonical_json(body));
}

}  // namespace adm
