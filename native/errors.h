// The two kinds of failure adm-run reports: bad input (exit 2) and a runtime failure (exit 3).
#pragma once

#include <stdexcept>

namespace adm {

// A file or argument is wrong: the message names the file and the field (exit status 2).
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The bundle is incomplete, altered or malformed (an InputError).
class BundleError : public InputError {
 public:
  using InputError::InputError;
};

// ExecuTorch or the runner failed after the inputs checked out (exit status 3).
class RuntimeFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace adm
