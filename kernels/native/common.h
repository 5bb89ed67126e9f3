// Shared pieces of the native CPU backend (dearkd_fast.ops backend="native").
//
// The library is built on the machine that runs it (python -m dearkd_fast.native), with -march=native:
// ATen's Vectorized<float> is then the widest vector the compiler may use (AVX-512, AVX2 or scalar).
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace dearkd_native {

using at::Tensor;
using fVec = at::vec::Vectorized<float>;

// fVec::size() elements at p as fp32 (bf16/fp16 widened, float loaded); count < size loads a tail.
template <typename T>
inline fVec load_f32(const T* p, int64_t count = fVec::size()) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, count);
  } else {
    if (count == fVec::size()) {
      fVec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
    float tmp[fVec::size()] = {0};
    for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<float>(p[i]);
    return fVec::loadu(tmp);
  }
}

// store fp32 vector v as T at p (count < size stores a tail)
template <typename T>
inline void store_from_f32(T* p, const fVec& v, int64_t count = fVec::size()) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, count);  // the first `count` of the rounded lanes
  }
}

// 2 fVec::size() elements at p as two fp32 vectors (one bf16/fp16 vector widened)
template <typename T>
inline void load2_f32(const T* p, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + fVec::size());
  } else {
    at::vec::load_to_float<T>(p, lo, hi);
  }
}

// two fp32 vectors stored as 2 fVec::size() elements of T at p (one full bf16/fp16 vector)
template <typename T>
inline void store2_from_f32(T* p, const fVec& lo, const fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// dst[N, M] = src[M, N]^T (leading dimensions ld_src, ld_dst) with ATen's vector transposes (blocks of at
// most 32 x 32 for bf16/fp16, as their vector kernels take)
template <typename T>
inline void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(M), static_cast<int>(N));
  } else {
    for (int64_t i = 0; i < M; i += 32)
      for (int64_t j = 0; j < N; j += 32)
        at::vec::transpose_mxn<T>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                  static_cast<int>(std::min<int64_t>(32, M - i)), static_cast<int>(std::min<int64_t>(32, N - j)));
  }
}

// 64-byte aligned storage, as torch aligns its tensors: a BLAS may pick its code path by operand alignment
// (MKL does), so scratch matrices are aligned alike in every run and results repeat bit for bit.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, Aligned64<T>>;

// run the lambda with scalar_t = float, at::BFloat16 or at::Half (the dtypes the native ops take)
#define DEARKD_DISPATCH(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline void check_cpu_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "dearkd_fast native: ", what, " must be a CPU tensor, got ", t.device());
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "dearkd_fast native: ", what,
              " must be float32, bfloat16 or float16, got ", s);
}

}  // namespace dearkd_native
