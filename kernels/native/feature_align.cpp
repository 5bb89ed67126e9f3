// Feature-alignment loss on the CPU: the native twin of kernels/feature_align.py.
//
//   L = mean over (b, n, c) of R^2,   R = T W^T + bias - F_hw     (T [B,N,D], W [C,D], F [B,C,h,w])
//
// T may also be [B, P + N, D]: the last N = h w rows are the patch tokens, the first P a ViT's prefix
// tokens (class, distillation), which get a zero gradient. dearkd_fast.ops passes the whole sequence when
// it is given x[:, P:], so the gradient is written once into x's shape instead of autograd's zero-filled
// copy of the slice.
//
// Rows of one batch element are taken in tiles of at most kRows tokens; each tile's residual R [rows, C]
// lives in a small fp32 buffer and is never written out whole, so no [B,N,C] tensor exists. The products
// run in the weight's dtype through ATen's CPU BLAS batch-reduce GEMM (bf16/fp16 x -> fp32: oneDNN's AMX
// micro-kernel where the CPU has AMX, else oneDNN's GEMM; fp32: MKL); fp32 tokens (a residual stream under
// autocast) are rounded tile by tile as they are staged. The epilogue (bias, target, square) runs in fp32
// vector lanes.
//   backward (R recomputed per tile, s = grad * 2 / (B N C)):
//     dT = s R W          (R in the products' dtype, as the Triton kernel does)
//     dW = s sum_tiles R^T T  (one fp32 partial per thread, summed in a fixed order)
//     db = s sum_m R
// The target is read through its strides (NCHW or channels_last), the tokens through theirs.
#include <ATen/native/CPUBlas.h>

#include "common.h"

namespace dearkd_native {
namespace {

constexpr int64_t kRows = 256;

// whether products of T run in oneDNN's batch-reduce micro-kernel on AMX tiles (bf16 with AMX, fp16 with
// AMX-FP16; DEARKD_NATIVE_NO_AMX=1 turns it off); otherwise ATen's CPU BLAS (oneDNN's bf16/fp16 GEMM, MKL's sgemm)
template <typename T>
bool use_amx() {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    static const bool ok = at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
    return ok && std::getenv("DEARKD_NATIVE_NO_AMX") == nullptr;
  }
}

inline int64_t even(int64_t k) { return (k + 1) / 2 * 2; }

// The B operand [K, N] of C = A B. For the AMX micro-kernel it is packed (VNNI: pairs of K rows
// interleaved) in blocks of at most 64 columns, K rounded up to even with a zero row; the A operand must
// then hold `k_pad()` columns (a zero column when K is odd). Otherwise B is used in place.
template <typename T>
struct OperandB {
  static constexpr int64_t kCols = 64;  // the micro-kernel's widest B block
  bool amx = false;
  int64_t K = 0, N = 0, ldb = 0;
  const T* plain = nullptr;
  aligned_vector<T> packed, staged;

  int64_t k_pad() const { return amx ? even(K) : K; }

  void set(const T* B, int64_t K_, int64_t N_, int64_t ldb_, bool amx_) {
    amx = amx_, K = K_, N = N_, ldb = ldb_, plain = B;
    if (!amx) return;
    const int64_t kp = even(K);
    if (kp != K) {  // stage B with a zero row
      staged.assign(kp * N, T(0));
      for (int64_t k = 0; k < K; ++k) std::copy(B + k * ldb, B + k * ldb + N, staged.data() + k * N);
      B = staged.data();
      ldb = N;
    }
    const int64_t blocks = (N + kCols - 1) / kCols;
    packed.resize(blocks * kp * kCols);
    for (int64_t j = 0; j < blocks; ++j) {
      at::native::cpublas::pack(kp, std::min(kCols, N - j * kCols), ldb, kCols, c10::CppTypeToScalarType<T>::value,
                                c10::CppTypeToScalarType<T>::value, B + j * kCols, packed.data() + j * kp * kCols);
    }
  }

  // C[M, N] (+)= A[M, k_pad()] B, fp32 C with leading dimension ldc
  void gemm(int64_t M, const T* A, int64_t lda, float* C, int64_t ldc, bool add) const {
    if (!amx) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, plain, C, false);
      return;
    }
    const int64_t kp = even(K);
    for (int64_t j = 0; j * kCols < N; ++j) {
      at::native::cpublas::brgemm(M, std::min(kCols, N - j * kCols), kp, lda, kCols, ldc, add, A,
                                  packed.data() + j * kp * kCols, C + j * kCols, true);
    }
  }
};

// a thread's AMX tile state is released when it leaves the kernel
struct AmxRelease {
  bool amx;
  ~AmxRelease() {
    if (amx) at::native::cpublas::brgemm_release(true);
  }
};

struct Problem {
  Tensor tokens, weight, wt, bias, target;  // tokens with unit stride along D; weight [C,D] and wt [D,C] contiguous
  int64_t B, N, D, C, w;
  int64_t prefix;  // rows of tokens before the N patch tokens (a ViT's class/distillation tokens)
  int64_t tiles_per_b, tiles;
};

// The products run in the weight's dtype T; tokens come in T or in fp32 (a residual stream under autocast:
// each tile is rounded to T as it is staged, as autocast's cast would, without a whole-tensor copy).
Problem make_problem(const Tensor& tokens_in, const Tensor& weight_in, const std::optional<Tensor>& bias,
                     const Tensor& target) {
  check_cpu_float(tokens_in, "tokens");
  check_cpu_float(weight_in, "weight");
  check_cpu_float(target, "target");
  TORCH_CHECK(tokens_in.dim() == 3 && weight_in.dim() == 2 && target.dim() == 4,
              "dearkd_fast native feature_align_loss: need tokens [B,N,D], weight [C,D], target [B,C,h,w]");
  Problem p;
  const auto compute = weight_in.scalar_type();
  Tensor t = tokens_in;
  if (t.scalar_type() != compute && t.scalar_type() != at::kFloat) t = t.to(at::kFloat);
  p.tokens = t.stride(2) == 1 ? t : t.contiguous();
  p.weight = weight_in.contiguous();
  p.wt = p.weight.t().contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  p.bias = has_bias ? bias->to(at::kFloat).contiguous() : at::zeros({weight_in.size(0)}, weight_in.options().dtype(at::kFloat));
  p.target = target;
  p.B = tokens_in.size(0);
  p.N = target.size(2) * target.size(3);
  p.prefix = tokens_in.size(1) - p.N;
  p.D = tokens_in.size(2);
  p.C = weight_in.size(0);
  p.w = target.size(3);
  TORCH_CHECK(weight_in.size(1) == p.D && target.size(0) == p.B && target.size(1) == p.C && p.prefix >= 0,
              "dearkd_fast native feature_align_loss: shapes do not fit");
  p.tiles_per_b = (p.N + kRows - 1) / kRows;
  p.tiles = p.B * p.tiles_per_b;
  return p;
}

// One thread's buffers, kept by the thread from call to call: a fresh allocation of this size would come
// from mmap and fault its pages in on every call (a whole op's time at the shapes of record). Everything a
// call reads is written by that call first (pad columns included).
template <typename T>
struct Scratch {
  aligned_vector<float> R, G, db;  // residual [rows, C]; dT tile [rows, D]; a tile's column sums [C]
  std::vector<int64_t> f_off;      // target offset of each row's pixel
  aligned_vector<T> a, Rc, Rt;     // staged token tile; R and R^T as T
  OperandB<T> tile_b;              // the dW product's B operand (a token tile)

  static Scratch& of_this_thread(const Problem& p) {
    static thread_local Scratch s;
    s.R.resize(std::max<size_t>(s.R.size(), kRows * p.C));
    s.f_off.resize(kRows);
    return s;
  }
};

// The token tile of `tile` as the A operand [rows, k] of type T: in place when the tokens are T and no pad
// column is needed, else staged (rounded to T, zero-padded to k columns). Returns (pointer, leading dimension).
template <typename T, typename TT>
std::pair<const T*, int64_t> token_tile(const Problem& p, int64_t b, int64_t n0, int64_t rows, int64_t k,
                                        Scratch<T>& s) {
  const TT* src = p.tokens.data_ptr<TT>() + b * p.tokens.stride(0) + (p.prefix + n0) * p.tokens.stride(1);
  const int64_t ld = p.tokens.stride(1), D = p.D;
  if constexpr (std::is_same_v<T, TT>) {
    if (k == D) return {src, ld};
  }
  s.a.resize(rows * k);
  for (int64_t i = 0; i < rows; ++i) {
    T* dst = s.a.data() + i * k;
    const TT* row = src + i * ld;
    if constexpr (std::is_same_v<T, TT>) {
      std::copy(row, row + D, dst);
    } else {  // fp32 tokens rounded to T: two vectors at a time (one full T vector), then the tail
      constexpr int64_t L = fVec::size();
      int64_t d = 0;
      for (; d + 2 * L <= D; d += 2 * L) store2_from_f32(dst + d, fVec::loadu(row + d), fVec::loadu(row + d + L));
      for (; d < D; ++d) dst[d] = static_cast<T>(row[d]);
    }
    for (int64_t d = D; d < k; ++d) dst[d] = T(0);
  }
  return {s.a.data(), k};
}

// One tile's rows: the first token index m0 = b N + n0, the row count, and the token tile as the product
// read it (A [rows, >= D] of type T, leading dimension lda; valid until the next tile).
template <typename T>
struct Tile {
  int64_t m0, rows;
  const T* A;
  int64_t lda;
};

// R[rows, C] = T_tile W^T + bias - F_tile for tile `tile` (wt: W^T [D, C]) into s.R
template <typename T, typename TT, typename F>
Tile<T> residual(const Problem& p, const OperandB<T>& wt, int64_t tile, Scratch<T>& s) {
  const int64_t b = tile / p.tiles_per_b, n0 = (tile % p.tiles_per_b) * kRows;
  const int64_t rows = std::min(kRows, p.N - n0), C = p.C;
  auto [A, lda] = token_tile<T, TT>(p, b, n0, rows, wt.k_pad(), s);
  float* R = s.R.data();
  wt.gemm(rows, A, lda, R, C, false);
  const F* tgt = p.target.data_ptr<F>() + b * p.target.stride(0);
  const int64_t sfc = p.target.stride(1), sfh = p.target.stride(2), sfw = p.target.stride(3);
  const float* bias = p.bias.data_ptr<float>();
  int64_t* f_off = s.f_off.data();
  for (int64_t i = 0; i < rows; ++i) f_off[i] = ((n0 + i) / p.w) * sfh + ((n0 + i) % p.w) * sfw;
  if (sfc == 1) {  // channels_last target: a row's channels are contiguous
    for (int64_t i = 0; i < rows; ++i) {
      float* r = R + i * C;
      const F* f = tgt + f_off[i];
      for (int64_t c = 0; c < C; c += fVec::size()) {
        const int64_t n = std::min<int64_t>(fVec::size(), C - c);
        (fVec::loadu(r + c, n) + fVec::loadu(bias + c, n) - load_f32(f + c, n)).store(r + c, n);
      }
    }
  } else {  // NCHW target: a channel's pixels are contiguous
    for (int64_t c = 0; c < C; ++c) {
      const F* f = tgt + c * sfc;
      const float bc = bias[c];
      for (int64_t i = 0; i < rows; ++i) R[i * C + c] += bc - static_cast<float>(f[f_off[i]]);
    }
  }
  return {b * p.N + n0, rows, A, lda};
}

// [0, tiles) in one contiguous range per thread, a fixed assignment (the sums are deterministic)
int64_t thread_count(int64_t tiles) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles)); }

template <typename Fn>
void per_thread(int64_t tiles, const Fn& fn) {
  const int64_t threads = thread_count(tiles);
  const int64_t per = (tiles + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, t * per, std::min(tiles, (t + 1) * per));
  });
}

// fn(T{}, TT{}, F{}) with T = the weight's dtype, TT = the tokens' (T or float), F = the target's
template <typename Fn>
void dispatch(const Problem& p, const Fn& fn) {
  DEARKD_DISPATCH(p.weight.scalar_type(), "feature_align_loss", [&] {
    using T = scalar_t;
    DEARKD_DISPATCH(p.target.scalar_type(), "feature_align_loss", [&] {
      using F = scalar_t;
      if (p.tokens.scalar_type() == p.weight.scalar_type()) {
        fn(T{}, T{}, F{});
      } else {
        fn(T{}, float{}, F{});
      }
    });
  });
}

}  // namespace

Tensor feature_align_loss(const Tensor& tokens, const Tensor& weight, const std::optional<Tensor>& bias,
                          const Tensor& target) {
  Problem p = make_problem(tokens, weight, bias, target);
  std::vector<double> part(thread_count(p.tiles), 0.0);
  dispatch(p, [&](auto t_, auto tt_, auto f_) {
    using T = decltype(t_);
    using TT = decltype(tt_);
    using F = decltype(f_);
    OperandB<T> wt;
    wt.set(p.wt.data_ptr<T>(), p.D, p.C, p.C, use_amx<T>());
    per_thread(p.tiles, [&](int64_t t, int64_t first, int64_t last) {
      AmxRelease release{wt.amx};
      Scratch<T>& s = Scratch<T>::of_this_thread(p);
      double acc = 0;
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t n = residual<T, TT, F>(p, wt, tile, s).rows * p.C;
        const float* R = s.R.data();
        fVec sq(0.f);
        int64_t i = 0;
        for (; i + fVec::size() <= n; i += fVec::size()) {
          const fVec r = fVec::loadu(R + i);
          sq = at::vec::fmadd(r, r, sq);
        }
        double tail = 0;
        for (; i < n; ++i) tail += double(R[i]) * R[i];
        acc += at::vec::vec_reduce_all<float>(std::plus<fVec>(), sq) + tail;
      }
      part[t] = acc;
    });
  });
  double total = 0;
  for (double v : part) total += v;
  return at::scalar_tensor(total / double(p.B * p.N * p.C), tokens.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor, Tensor> feature_align_loss_backward(const Tensor& grad, const Tensor& tokens,
                                                               const Tensor& weight, const std::optional<Tensor>& bias,
                                                               const Tensor& target) {
  Problem p = make_problem(tokens, weight, bias, target);
  const float scale = grad.item<float>() * 2.0f / float(p.B * p.N * p.C);
  const int64_t threads = thread_count(p.tiles), C = p.C, D = p.D;
  // the tokens' dtype (fp32 for an fp32 stream) and shape: prefix rows get a zero gradient
  Tensor dt = at::empty({p.B, p.prefix + p.N, D}, p.tokens.options());  // prefix rows zeroed by their image's first tile
  // one fp32 dW partial [C, D] per range of tiles, kept by the calling thread from call to call (a range's
  // partial must outlive the range, and two ranges may share a worker thread); nullptr: an empty range
  static thread_local std::vector<aligned_vector<float>> dw_pool;
  if (dw_pool.size() < static_cast<size_t>(threads)) dw_pool.resize(threads);
  std::vector<float*> dw_slot(threads);
  for (int64_t t = 0; t < threads; ++t) {
    dw_pool[t].resize(std::max<size_t>(dw_pool[t].size(), C * D));
    dw_slot[t] = dw_pool[t].data();
  }
  std::vector<const float*> dw_part(threads, nullptr);
  std::vector<double> db_part(threads * C, 0.0);
  float dw_post = scale;  // what the dW partials still need (set by the dtype's path)
  dispatch(p, [&](auto t_, auto tt_, auto f_) {
    using T = decltype(t_);
    using TT = decltype(tt_);
    using F = decltype(f_);
    const bool amx = use_amx<T>();
    OperandB<T> wt, w;
    wt.set(p.wt.data_ptr<T>(), D, C, C, amx);
    w.set(p.weight.data_ptr<T>(), C, D, D, amx);
    // the scale goes into R before the products (dT and dW come out scaled; an fp32 dT is the product's own
    // output), except for fp16, whose range would turn scale * R (about 1e-6 here) into subnormals (and for
    // a zero or non-finite scale, which is applied after the products as before)
    const float pre = (std::is_same_v<T, at::Half> || scale == 0.f || !std::isfinite(scale)) ? 1.f : scale;
    dw_post = scale / pre;
    per_thread(p.tiles, [&](int64_t t, int64_t first, int64_t last) {
      AmxRelease release{amx};
      Scratch<T>& s = Scratch<T>::of_this_thread(p);
      const int64_t cp = w.k_pad(), rp = amx ? even(kRows) : kRows;
      s.G.resize(std::max<size_t>(s.G.size(), kRows * D));
      s.db.resize(std::max<size_t>(s.db.size(), C));
      s.Rc.resize(std::max<size_t>(s.Rc.size(), kRows * cp));
      s.Rt.resize(std::max<size_t>(s.Rt.size(), C * rp));
      float *G = s.G.data(), *db_tile = s.db.data();
      T *Rc = s.Rc.data(), *Rt = s.Rt.data();
      OperandB<T>& tile_b = s.tile_b;
      float* dw = dw_slot[t];
      dw_part[t] = first < last ? dw : nullptr;
      double* db = db_part.data() + t * C;
      for (int64_t tile = first; tile < last; ++tile) {
        const Tile<T> tl = residual<T, TT, F>(p, wt, tile, s);
        const int64_t m0 = tl.m0, rows = tl.rows;
        const float* R = s.R.data();
        const int64_t ldt = amx ? even(rows) : rows;  // R^T's leading dimension: the dW product's K
        if (ldt != rows)
          for (int64_t c = 0; c < C; ++c) Rt[c * ldt + rows] = T(0);
        // db += colsum R (fp32 over the tile, double across tiles); Rc = pre R as T
        std::fill(db_tile, db_tile + C, 0.f);
        const fVec pv(pre);
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t c = 0; c < C; c += fVec::size()) {
            const int64_t n = std::min<int64_t>(fVec::size(), C - c);
            const fVec r = fVec::loadu(R + i * C + c, n);
            (fVec::loadu(db_tile + c, n) + r).store(db_tile + c, n);
            store_from_f32(Rc + i * cp + c, r * pv, n);
          }
          for (int64_t c = C; c < cp; ++c) Rc[i * cp + c] = T(0);  // the pad column of an odd C
        }
        for (int64_t c = 0; c < C; ++c) db[c] += db_tile[c];
        transpose(Rc, cp, Rt, ldt, rows, C);  // Rt = R^T
        // dT_tile = scale R W in the tokens' dtype: written by the product itself when both are fp32-scaled
        TT* out = dt.data_ptr<TT>() + ((m0 / p.N) * (p.prefix + p.N) + p.prefix + m0 % p.N) * D;
        if (m0 % p.N == 0) std::fill(out - p.prefix * D, out, TT(0));
        if constexpr (std::is_same_v<TT, float>) {
          if (pre == scale) {
            w.gemm(rows, Rc, cp, out, D, false);
          }
        }
        if (!std::is_same_v<TT, float> || pre != scale) {
          w.gemm(rows, Rc, cp, G, D, false);
          const fVec sv(scale / pre);
          for (int64_t i = 0; i < rows * D; i += fVec::size()) {
            const int64_t n = std::min<int64_t>(fVec::size(), rows * D - i);
            store_from_f32(out + i, fVec::loadu(G + i, n) * sv, n);
          }
        }
        // dW += R^T T_tile, the token tile as the residual's product read it (in place, or staged in s.a)
        tile_b.set(tl.A, rows, D, tl.lda, amx);
        tile_b.gemm(C, Rt, ldt, dw, D, /*add=*/tile != first);
      }
    });
  });
  Tensor dw32 = at::zeros({C, D}, tokens.options().dtype(at::kFloat));  // sum of the partials in thread order
  float* dwp = dw32.data_ptr<float>();
  for (const float* part : dw_part) {
    if (part == nullptr) continue;
    for (int64_t i = 0; i < C * D; i += fVec::size()) {
      const int64_t n = std::min<int64_t>(fVec::size(), C * D - i);
      (fVec::loadu(dwp + i, n) + fVec::loadu(part + i, n)).store(dwp + i, n);
    }
  }
  Tensor dw = (dw_post == 1.f ? dw32 : dw32 * dw_post).to(weight.scalar_type());
  Tensor db = at::empty({C}, tokens.options().dtype(at::kDouble));
  double* dbp = db.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double v = 0;
    for (int64_t t = 0; t < threads; ++t) v += db_part[t * C + c];
    dbp[c] = v * scale;
  }
  const auto db_type = (bias.has_value() && bias->defined()) ? bias->scalar_type() : weight.scalar_type();
  return {dt.to(tokens.scalar_type()), dw, db.to(db_type)};
}

TORCH_LIBRARY_IMPL(dearkd_fast_native, CPU, m) {
  m.impl("feature_align_loss", &feature_align_loss);
  m.impl("feature_align_loss_backward", &feature_align_loss_backward);
}

}  // namespace dearkd_native
