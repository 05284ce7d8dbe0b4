// The CPU binding's allocator for large outputs: a freed output buffer is kept and
// handed to the next output of the same size, so steady-state training (the same
// shapes every step) writes into memory that is already mapped. A fresh buffer's
// first touch costs page faults and the kernel zeroing every page, more than the
// kernel itself on a 64 MB tensor (docs/kernels.md, "Output buffers"). Buffers are
// kept up to a byte limit (FEDHQ_OUTPUT_CACHE_MB, default 256; 0: keep none).
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fedhq::binding {

class OutputPool final : public c10::Allocator {
 public:
  // Outputs below this size are left to torch's allocator: their faults are few.
  static constexpr size_t kMinBytes = size_t(1) << 20;

  c10::DataPtr allocate(size_t nbytes) override {
    void* data = take(nbytes);
    if (data == nullptr) data = fresh(nbytes);
    return {data, new Block{data, nbytes}, &OutputPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  int64_t held_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return int64_t(held_);
  }

  // Frees every kept buffer; returns the bytes freed.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t freed = held_;
    for (auto& [nbytes, data] : free_) std::free(data);
    free_.clear();
    held_ = 0;
    return int64_t(freed);
  }

  // Sets the byte limit (kept buffers beyond it are freed); returns the old one.
  int64_t set_limit(int64_t limit) {
    TORCH_CHECK_VALUE(limit >= 0, "output cache limit must be >= 0 bytes, got ", limit);
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t old = limit_;
    limit_ = size_t(limit);
    while (held_ > limit_ && !free_.empty()) {
      auto largest = std::prev(free_.end());
      held_ -= largest->first;
      std::free(largest->second);
      free_.erase(largest);
    }
    return int64_t(old);
  }

  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();  // never destroyed: outputs may outlive static destructors
    return *pool;
  }

 private:
  struct Block {
    void* data;
    size_t nbytes;
  };

  OutputPool() {
    const char* mb = std::getenv("FEDHQ_OUTPUT_CACHE_MB");
    limit_ = (mb != nullptr && *mb != '\0') ? size_t(std::stoull(mb)) << 20 : size_t(256) << 20;
  }

  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = free_.find(nbytes);
    if (found == free_.end()) return nullptr;
    void* data = found->second;
    free_.erase(found);
    held_ -= nbytes;
    return data;
  }

  // A new buffer, 2 MiB-aligned so that transparent huge pages can back all of it.
  static void* fresh(size_t nbytes) {
    constexpr size_t kHuge = size_t(2) << 20;
    void* data = nullptr;
    if (posix_memalign(&data, kHuge, nbytes == 0 ? 1 : nbytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t whole = nbytes & ~(kHuge - 1);
    if (whole > 0) madvise(data, whole, MADV_HUGEPAGE);  // advice only: ignore errors
#endif
    return data;
  }

  static void give_back(void* context) {
    auto* block = static_cast<Block*>(context);
    OutputPool& pool = instance();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (pool.held_ + block->nbytes <= pool.limit_) {
        pool.free_.emplace(block->nbytes, block->data);
        pool.held_ += block->nbytes;
        block->data = nullptr;
      }
    }
    std::free(block->data);  // nullptr when kept
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> kept buffers of that size
  size_t held_ = 0;
  size_t limit_ = 0;
};

}  // namespace fedhq::binding
