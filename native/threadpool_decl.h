// The two calls of ExecuTorch's thread pool that adm-run makes. The executorch wheel ships
// libexecutorch_threadpool.so but not its header (extension/threadpool/threadpool.h); these
// declarations match that header's (executorch 1.x) for the symbols the library exports:
//   executorch::extension::threadpool::get_threadpool()
//   executorch::extension::threadpool::ThreadPool::get_thread_count() const
//   executorch::extension::threadpool::ThreadPool::_unsafe_reset_threadpool(unsigned int)
// Only non-virtual member functions are called through a pointer, so no layout is assumed.
#pragma once

#include <cstddef>
#include <cstdint>

namespace executorch::extension::threadpool {

class ThreadPool {
 public:
  size_t get_thread_count() const;
  // Replaces the pool with one of `num_threads` threads; not thread safe: call before loading.
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};

ThreadPool* get_threadpool();

}  // namespace executorch::extension::threadpool
