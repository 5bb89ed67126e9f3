// BatchNorm-statistics moments on the CPU: the native twin of kernels/bn_stat.py.
//
// bn_moments(xs) -> [mean_cat, var_cat]: per-channel biased moments of every x [B,C,H,W], channels of all
// layers concatenated (fp32). One pass over x as shifted sums, s_c = x[0,c,0,0]:
//     S1 = sum (x - s_c),  S2 = sum (x - s_c)^2,  mean = s_c + S1/n,  var = max(S2/n - (S1/n)^2, 0)
// so x = 1e3 + noise keeps its variance. Sums run in fp32 vector lanes over blocks of at most
// kBlock elements per lane and are added across blocks in double.
// bn_moments_backward: dx = g_mean_c / n + g_var_c * 2 (x - mean_c) / n, written in x's layout.
// All layers of a call share one parallel region (a teacher has dozens of small BN inputs).
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

// fn(offset) of every row r in [r0, r1) of a channels_last view (row r = pixel r % HW of image r / HW)
template <typename Fn>
inline void each_row(const View& v, int64_t r0, int64_t r1, const Fn& fn) {
  for (int64_t r = r0; r < r1; ++r) fn((r / v.HW) * v.sb + (r % v.HW) * v.ss);
}

// fn(c, offset) of every plane p = b C + c in [p0, p1) (each HW contiguous pixels)
template <typename Fn>
inline void each_plane(const View& v, int64_t p0, int64_t p1, const Fn& fn) {
  for (int64_t p = p0; p < p1; ++p) fn(p % v.C, (p / v.C) * v.sb + (p % v.C) * v.sc);
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
  each_row(v, r0, r1, [&](int64_t off) {
    const T* row = base + off + c0;
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      if (!kFull && n[j] == 0) break;
      const fVec d = (kFull ? load_f32(row + j * L) : load_f32(row + j * L, n[j])) - s[j];
      a[j] = a[j] + d;
      q[j] = at::vec::fmadd(d, d, q[j]);
    }
  });
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

// (S1, S2) of rows [r0, r1) of a channels_last view, added to out [C, 2]
template <typename T>
void sums_rows(const View& v, const float* shift, int64_t r0, int64_t r1, double* out) {
  const T* base = v.x.data_ptr<T>();
  const int64_t width = kVecs * fVec::size();
  for (int64_t b0 = r0; b0 < r1; b0 += kBlock) {
    const int64_t b1 = std::min(r1, b0 + kBlock);
    for (int64_t c0 = 0; c0 < v.C; c0 += width) {
      if (c0 + width <= v.C) {
        channels_last_block<T, true>(v, base, shift, b0, b1, c0, out);
      } else {
        channels_last_block<T, false>(v, base, shift, b0, b1, c0, out);
      }
    }
  }
}

// (S1, S2) of planes [p0, p1) (p = b C + c, each HW contiguous pixels), added to out [C, 2]
template <typename T>
void sums_planes(const View& v, const float* shift, int64_t p0, int64_t p1, double* out) {
  constexpr int64_t L = fVec::size();
  const T* base = v.x.data_ptr<T>();
  const int64_t HW = v.HW;
  each_plane(v, p0, p1, [&](int64_t c, int64_t off) {
    const T* plane = base + off;
    const fVec s(shift[c]);
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock * L) {
      fVec a(0.f), q(0.f), a2(0.f), q2(0.f);
      const int64_t i_end = std::min(HW, i0 + kBlock * L);
      int64_t i = i0;
      for (; i + 2 * L <= i_end; i += 2 * L) {
        fVec lo, hi;
        load2_f32(plane + i, lo, hi);
        lo = lo - s;
        hi = hi - s;
        a = a + lo;
        q = at::vec::fmadd(lo, lo, q);
        a2 = a2 + hi;
        q2 = at::vec::fmadd(hi, hi, q2);
      }
      for (; i < i_end; i += L) {
        const int64_t n = std::min<int64_t>(L, i_end - i);
        fVec d = load_f32(plane + i, n) - s;
        if (n < L) d = fVec::set(fVec(0.f), d, n);  // lanes past the tail count as zero
        a = a + d;
        q = at::vec::fmadd(d, d, q);
      }
      out[2 * c] += at::vec::vec_reduce_all<float>(std::plus<fVec>(), a + a2);
      out[2 * c + 1] += at::vec::vec_reduce_all<float>(std::plus<fVec>(), q + q2);
    }
  });
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

// dx of rows [r0, r1) of a channels_last view; dx has x's strides, so one offset addresses both
template <typename T>
void bwd_rows(const View& v, T* out, const float* mean, const float* a, const float* g, int64_t r0, int64_t r1) {
  const T* base = v.x.data_ptr<T>();
  each_row(v, r0, r1, [&](int64_t off) { bwd_row(base + off, out + off, v.C, mean, a, g); });
}

// dx of planes [p0, p1)
template <typename T>
void bwd_planes(const View& v, T* out, const float* mean, const float* gm, const float* gv, int64_t p0, int64_t p1) {
  constexpr int64_t L = fVec::size();
  const T* base = v.x.data_ptr<T>();
  const int64_t HW = v.HW;
  each_plane(v, p0, p1, [&](int64_t c, int64_t off) {
    const T* x = base + off;
    T* o = out + off;
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
  });
}

void check_input(const Tensor& x) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "dearkd_fast native bn_moments: x must be [B,C,H,W], got ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "dearkd_fast native bn_moments: x is empty");
}

// One call's work over all its layers, in one parallel region: items of about kItem elements, each a range
// of rows (channels_last) or planes of one layer. The split depends on the shapes alone, and each item's
// sums are added in item order, so the moments are the same for every thread count.
constexpr int64_t kItem = 1 << 16;

struct Item {
  int64_t layer, begin, end;
};

std::vector<Item> split(const std::vector<View>& views) {
  std::vector<Item> items;
  for (int64_t l = 0; l < static_cast<int64_t>(views.size()); ++l) {
    const View& v = views[l];
    const bool rows = v.layout == Layout::kChannelsLast;
    const int64_t count = rows ? v.B * v.HW : v.B * v.C, unit = rows ? v.C : v.HW;
    const int64_t per = std::max<int64_t>(1, kItem / std::max<int64_t>(unit, 1));
    for (int64_t b = 0; b < count; b += per) items.push_back({l, b, std::min(count, b + per)});
  }
  return items;
}

std::vector<View> views_of(at::TensorList xs) {
  TORCH_CHECK(!xs.empty(), "dearkd_fast native bn_moments: no inputs");
  std::vector<View> views;
  for (const auto& x : xs) {
    check_input(x);
    views.push_back(view_of(x));
  }
  return views;
}

}  // namespace

std::vector<Tensor> bn_moments(at::TensorList xs) {
  const std::vector<View> views = views_of(xs);
  int64_t total_c = 0;
  std::vector<int64_t> col0;  // each layer's first concatenated channel
  for (const View& v : views) {
    col0.push_back(total_c);
    total_c += v.C;
  }
  std::vector<float> shift(total_c);  // s_c = x[0, c, 0, 0]
  for (size_t l = 0; l < views.size(); ++l) {
    const View& v = views[l];
    DEARKD_DISPATCH(v.x.scalar_type(), "bn_moments", [&] {
      const scalar_t* base = v.x.data_ptr<scalar_t>();
      for (int64_t c = 0; c < v.C; ++c) shift[col0[l] + c] = static_cast<float>(base[c * v.sc]);
    });
  }
  const std::vector<Item> items = split(views);
  std::vector<int64_t> slot(items.size());  // each item's [C, 2] sums in `part`
  int64_t size = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    slot[i] = size;
    size += views[items[i].layer].C * 2;
  }
  std::vector<double> part(size, 0.0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const View& v = views[it.layer];
      const float* sh = shift.data() + col0[it.layer];
      DEARKD_DISPATCH(v.x.scalar_type(), "bn_moments", [&] {
        if (v.layout == Layout::kChannelsLast) {
          sums_rows<scalar_t>(v, sh, it.begin, it.end, part.data() + slot[i]);
        } else {
          sums_planes<scalar_t>(v, sh, it.begin, it.end, part.data() + slot[i]);
        }
      });
    }
  });
  std::vector<double> sums(total_c * 2, 0.0);
  for (size_t i = 0; i < items.size(); ++i) {  // in item order
    const int64_t l = items[i].layer;
    for (int64_t k = 0; k < views[l].C * 2; ++k) sums[col0[l] * 2 + k] += part[slot[i] + k];
  }
  auto opts = xs[0].options().dtype(at::kFloat);
  Tensor mean = at::empty({total_c}, opts), var = at::empty({total_c}, opts);
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  for (size_t l = 0; l < views.size(); ++l) {
    const double n = static_cast<double>(views[l].B * views[l].HW);
    for (int64_t c = col0[l]; c < col0[l] + views[l].C; ++c) {
      const double d = sums[2 * c] / n;
      mp[c] = static_cast<float>(shift[c] + d);
      vp[c] = static_cast<float>(std::max(sums[2 * c + 1] / n - d * d, 0.0));
    }
  }
  return {mean, var};
}

std::vector<Tensor> bn_moments_backward(at::TensorList xs, const Tensor& mean, const Tensor& grad_mean,
                                        const Tensor& grad_var) {
  const std::vector<View> views = views_of(xs);
  Tensor m = mean.to(at::kFloat).contiguous();
  Tensor gm = grad_mean.to(at::kFloat).contiguous(), gv = grad_var.to(at::kFloat).contiguous();
  const int64_t total_c = m.numel();
  // per-channel coefficients of every layer: dx = a_c + g_c (x - mean_c)
  std::vector<float> a(total_c), g(total_c);
  std::vector<int64_t> col0;
  std::vector<Tensor> dxs;
  int64_t c0 = 0;
  for (const View& v : views) {
    col0.push_back(c0);
    const double n = static_cast<double>(v.B * v.HW);
    for (int64_t c = c0; c < c0 + v.C; ++c) {
      a[c] = static_cast<float>(gm.data_ptr<float>()[c] / n);
      g[c] = static_cast<float>(2.0 * gv.data_ptr<float>()[c] / n);
    }
    dxs.push_back(at::empty_like(v.x));  // v.x is dense: dx gets its strides, so one offset addresses both
    c0 += v.C;
  }
  TORCH_CHECK(c0 == total_c, "dearkd_fast native bn_moments_backward: ", total_c, " means for ", c0, " channels");
  const std::vector<Item> items = split(views);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const View& v = views[it.layer];
      const int64_t k = col0[it.layer];
      DEARKD_DISPATCH(v.x.scalar_type(), "bn_moments_backward", [&] {
        scalar_t* out = dxs[it.layer].data_ptr<scalar_t>();
        if (v.layout == Layout::kChannelsLast) {
          bwd_rows<scalar_t>(v, out, m.data_ptr<float>() + k, a.data() + k, g.data() + k, it.begin, it.end);
        } else {
          bwd_planes<scalar_t>(v, out, m.data_ptr<float>() + k, a.data() + k, g.data() + k, it.begin, it.end);
        }
      });
    }
  });
  return dxs;
}

TORCH_LIBRARY_IMPL(dearkd_fast_native, CPU, m) {
  m.impl("bn_moments", &bn_moments);
  m.impl("bn_moments_backward", &bn_moments_backward);
}

}  // namespace dearkd_native
