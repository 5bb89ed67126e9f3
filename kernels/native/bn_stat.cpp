// BatchNorm-statistics moments on the CPU: the native twin of kernels/bn_stat.py.
//
// bn_moments(xs) -> [mean_cat, var_cat]: per-channel biased moments of every x [B,C,H,W], channels of all
// layers concatenated (fp32). One pass over x as shifted sums, s_c = x[0,c,0,0]:
//     S1 = sum (x - s_c),  S2 = sum (x - s_c)^2,  mean = s_c + S1/n,  var = max(S2/n - (S1/n)^2, 0)
// so x = 1e3 + noise keeps its variance. Sums run in fp32 vector lanes over blocks of at most
// kBlock elements per lane and are added across blocks in double.
// bn_moments_backward: dx = g_mean_c / n + g_var_c * 2 (x - mean_c) / n, written in x's layout.
//
// Layouts: channels_last (channel stride 1) reduces rows (b, h, w) with channels in the vector lanes;
// NCHW-like (spatial stride 1, H and W mergeable) reduces each (b, c) plane along its pixels; anything
// else is first made contiguous.
#include "common.h"

namespace dearkd_native {
namespace {

constexpr int64_t kBlock = 256;  // fp32 terms per lane before a block's sums move to double

enum class Layout { kChannelsLast, kPlanes };

// x viewed as [B, C, HW] with (batch, channel, spatial) strides, in one of the two layouts
struct View {
  Tensor x;
  int64_t B, C, HW, sb, sc, ss;
  Layout layout;
};

View view_of(const Tensor& x_in) {
  Tensor x = x_in;
  const int64_t H = x.size(2), W = x.size(3);
  auto mergeable = [&](const Tensor& t) { return H == 1 || W == 1 || t.stride(2) == W * t.stride(3); };
  auto spatial = [&](const Tensor& t) { return W > 1 ? t.stride(3) : (H > 1 ? t.stride(2) : 1); };
  if (!x.is_non_overlapping_and_dense()) x = x.contiguous(x.suggest_memory_format());
  Layout layout;
  if (mergeable(x) && x.stride(1) == 1 && x.size(1) > 1) {
    layout = Layout::kChannelsLast;
  } else if (mergeable(x) && spatial(x) == 1) {
    layout = Layout::kPlanes;
  } else {
    x = x.contiguous();
    layout = Layout::kPlanes;
  }
  return View{x, x.size(0), x.size(1), H * W, x.stride(0), x.stride(1), spatial(x), layout};
}

constexpr int kVecs = 4;  // channel vectors a channels_last row block keeps in registers

// (S1, S2) of channels [c0, c0 + kVecs * L) over rows [r0, r1), added to out[2 c], out[2 c + 1] (double)
template <typename T, bool kFull>
inline void channels_last_block(const View& v, const T* base, const float* shift, int64_t r0, int64_t r1, int64_t c0,
                                double* out) {
  constexpr int64_t L = fVec::size();
  fVec a[kVecs], q[kVecs], s[kVecs];
  int64_t n[kVecs];
  for (int j = 0; j < kVecs; ++j) {
    n[j] = kFull ? L : std::clamp<int64_t>(v.C - c0 - j * L, 0, L);
    a[j] = q[j] = fVec(0.f);
    s[j] = n[j] > 0 ? fVec::loadu(shift + c0 + j * L, n[j]) : fVec(0.f);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = base + (r / v.HW) * v.sb + (r % v.HW) * v.ss + c0;
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      if (!kFull && n[j] == 0) break;
      const fVec d = (kFull ? load_f32(row + j * L) : load_f32(row + j * L, n[j])) - s[j];
      a[j] = a[j] + d;
      q[j] = at::vec::fmadd(d, d, q[j]);
    }
  }
  for (int j = 0; j < kVecs; ++j) {
    float fa[L], fq[L];
    a[j].store(fa);
    q[j].store(fq);
    for (int64_t i = 0; i < n[j]; ++i) {
      out[2 * (c0 + j * L + i)] += fa[i];
      out[2 * (c0 + j * L + i) + 1] += fq[i];
    }
  }
}

// sums[c] += (S1, S2) of one layer; sums is [C, 2] double
template <typename T>
void moments_channels_last(const View& v, const float* shift, double* sums) {
  const T* base = v.x.data_ptr<T>();
  const int64_t R = v.B * v.HW, C = v.C, width = kVecs * fVec::size();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (R + kBlock - 1) / kBlock));
  std::vector<double> part(threads * C * 2, 0.0);
  const int64_t per = (R + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      double* out = part.data() + t * C * 2;
      const int64_t r_end = std::min(R, (t + 1) * per);
      for (int64_t r0 = t * per; r0 < r_end; r0 += kBlock) {
        const int64_t r1 = std::min(r_end, r0 + kBlock);
        for (int64_t c0 = 0; c0 < C; c0 += width) {
          if (c0 + width <= C) {
            channels_last_block<T, true>(v, base, shift, r0, r1, c0, out);
          } else {
            channels_last_block<T, false>(v, base, shift, r0, r1, c0, out);
          }
        }
      }
    }
  });
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < C * 2; ++i) sums[i] += part[t * C * 2 + i];
}

template <typename T>
void moments_planes(const View& v, const float* shift, double* sums) {
  const T* base = v.x.data_ptr<T>();
  const int64_t P = v.B * v.C, HW = v.HW;
  std::vector<double> part(P * 2);  // (b, c) plane sums
  at::parallel_for(0, P, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / v.C, c = p % v.C;
      const T* plane = base + b * v.sb + c * v.sc;
      const fVec s(shift[c]);
      double d1 = 0, d2 = 0;
      for (int64_t i0 = 0; i0 < HW; i0 += kBlock * fVec::size()) {
        fVec a(0.f), q(0.f), a2(0.f), q2(0.f);
        const int64_t i_end = std::min(HW, i0 + kBlock * fVec::size());
        int64_t i = i0;
        for (; i + 2 * fVec::size() <= i_end; i += 2 * fVec::size()) {
          fVec lo, hi;
          load2_f32(plane + i, lo, hi);
          lo = lo - s;
          hi = hi - s;
          a = a + lo;
          q = at::vec::fmadd(lo, lo, q);
          a2 = a2 + hi;
          q2 = at::vec::fmadd(hi, hi, q2);
        }
        for (; i < i_end; i += fVec::size()) {
          const int64_t n = std::min<int64_t>(fVec::size(), i_end - i);
          fVec d = load_f32(plane + i, n) - s;
          if (n < fVec::size()) d = fVec::set(fVec(0.f), d, n);  // lanes past the tail count as zero
          a = a + d;
          q = at::vec::fmadd(d, d, q);
        }
        a = a + a2;
        q = q + q2;
        d1 += at::vec::vec_reduce_all<float>(std::plus<fVec>(), a);
        d2 += at::vec::vec_reduce_all<float>(std::plus<fVec>(), q);
      }
      part[2 * p] = d1;
      part[2 * p + 1] = d2;
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    const int64_t c = p % v.C;
    sums[2 * c] += part[2 * p];
    sums[2 * c + 1] += part[2 * p + 1];
  }
}

// dx = a_c + g_c (x - mean_c) over `n` contiguous channels [c, c + n) of one row (channels_last)
template <typename T>
inline void bwd_row(const T* x, T* out, int64_t n, const float* mean, const float* a, const float* g) {
  constexpr int64_t L = fVec::size();
  int64_t c = 0;
  for (; c + 2 * L <= n; c += 2 * L) {  // whole pairs of vectors: one full bf16/fp16 store
    fVec lo, hi;
    load2_f32(x + c, lo, hi);
    lo = at::vec::fmadd(fVec::loadu(g + c), lo - fVec::loadu(mean + c), fVec::loadu(a + c));
    hi = at::vec::fmadd(fVec::loadu(g + c + L), hi - fVec::loadu(mean + c + L), fVec::loadu(a + c + L));
    store2_from_f32(out + c, lo, hi);
  }
  for (; c < n; c += L) {
    const int64_t k = std::min<int64_t>(L, n - c);
    const fVec d = load_f32(x + c, k) - fVec::loadu(mean + c, k);
    store_from_f32(out + c, at::vec::fmadd(fVec::loadu(g + c, k), d, fVec::loadu(a + c, k)), k);
  }
}

template <typename T>
void moments_bwd_channels_last(const View& v, const Tensor& dx, const float* mean, const float* gm, const float* gv) {
  const T* base = v.x.data_ptr<T>();
  T* out = dx.data_ptr<T>();
  const int64_t R = v.B * v.HW, C = v.C;
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = (r / v.HW) * v.sb + (r % v.HW) * v.ss;
      bwd_row(base + off, out + off, C, mean, gm, gv);
    }
  });
}

template <typename T>
void moments_bwd_planes(const View& v, const Tensor& dx, const float* mean, const float* gm, const float* gv) {
  constexpr int64_t L = fVec::size();
  const T* base = v.x.data_ptr<T>();
  T* out = dx.data_ptr<T>();
  const int64_t P = v.B * v.C, HW = v.HW;
  // dx has x's strides (empty_like of a dense x), so the same offsets address both
  at::parallel_for(0, P, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / v.C, c = p % v.C;
      const T* x = base + b * v.sb + c * v.sc;
      T* o = out + b * v.sb + c * v.sc;
      const fVec m(mean[c]), a(gm[c]), g(gv[c]);
      int64_t i = 0;
      for (; i + 2 * L <= HW; i += 2 * L) {
        fVec lo, hi;
        load2_f32(x + i, lo, hi);
        store2_from_f32(o + i, at::vec::fmadd(g, lo - m, a), at::vec::fmadd(g, hi - m, a));
      }
      for (; i < HW; i += L) {
        const int64_t k = std::min<int64_t>(L, HW - i);
        store_from_f32(o + i, at::vec::fmadd(g, load_f32(x + i, k) - m, a), k);
      }
    }
  });
}

void check_input(const Tensor& x) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "dearkd_fast native bn_moments: x must be [B,C,H,W], got ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "dearkd_fast native bn_moments: x is empty");
}

}  // namespace

std::vector<Tensor> bn_moments(at::TensorList xs) {
  TORCH_CHECK(!xs.empty(), "dearkd_fast native bn_moments: no inputs");
  int64_t total_c = 0;
  for (const auto& x : xs) {
    check_input(x);
    total_c += x.size(1);
  }
  auto opts = xs[0].options().dtype(at::kFloat);
  Tensor mean = at::empty({total_c}, opts), var = at::empty({total_c}, opts);
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  int64_t col0 = 0;
  for (const auto& x_in : xs) {
    View v = view_of(x_in);
    std::vector<float> shift(v.C);
    std::vector<double> sums(v.C * 2, 0.0);
    DEARKD_DISPATCH(v.x.scalar_type(), "bn_moments", [&] {
      const scalar_t* base = v.x.data_ptr<scalar_t>();
      for (int64_t c = 0; c < v.C; ++c) shift[c] = static_cast<float>(base[c * v.sc]);
      if (v.layout == Layout::kChannelsLast) {
        moments_channels_last<scalar_t>(v, shift.data(), sums.data());
      } else {
        moments_planes<scalar_t>(v, shift.data(), sums.data());
      }
    });
    const double n = static_cast<double>(v.B * v.HW);
    for (int64_t c = 0; c < v.C; ++c) {
      const double d = sums[2 * c] / n;
      mp[col0 + c] = static_cast<float>(shift[c] + d);
      vp[col0 + c] = static_cast<float>(std::max(sums[2 * c + 1] / n - d * d, 0.0));
    }
    col0 += v.C;
  }
  return {mean, var};
}

std::vector<Tensor> bn_moments_backward(at::TensorList xs, const Tensor& mean, const Tensor& grad_mean,
                                        const Tensor& grad_var) {
  Tensor m = mean.to(at::kFloat).contiguous(), gm = grad_mean.to(at::kFloat).contiguous(),
         gv = grad_var.to(at::kFloat).contiguous();
  std::vector<Tensor> dxs;
  int64_t col0 = 0;
  for (const auto& x_in : xs) {
    check_input(x_in);
    View v = view_of(x_in);
    const double n = static_cast<double>(v.B * v.HW);
    // per-channel coefficients: dx = a_c + g_c (x - mean_c)
    std::vector<float> a(v.C), g(v.C);
    for (int64_t c = 0; c < v.C; ++c) {
      a[c] = static_cast<float>(gm.data_ptr<float>()[col0 + c] / n);
      g[c] = static_cast<float>(2.0 * gv.data_ptr<float>()[col0 + c] / n);
    }
    Tensor dx = at::empty_like(v.x);  // v.x is dense: dx gets its strides, so one offset addresses both
    DEARKD_DISPATCH(v.x.scalar_type(), "bn_moments_backward", [&] {
      if (v.layout == Layout::kChannelsLast) {
        moments_bwd_channels_last<scalar_t>(v, dx, m.data_ptr<float>() + col0, a.data(), g.data());
      } else {
        moments_bwd_planes<scalar_t>(v, dx, m.data_ptr<float>() + col0, a.data(), g.data());
      }
    });
    dxs.push_back(dx);
    col0 += v.C;
  }
  return dxs;
}

TORCH_LIBRARY_IMPL(dearkd_fast_native, CPU, m) {
  m.impl("bn_moments", &bn_moments);
  m.impl("bn_moments_backward", &bn_moments_backward);
}

}  // namespace dearkd_native
