// Flash attention for XLA:CPU: forward and backward as XLA FFI handlers (float32).
//
// Built on first use by loopjax/attention/cpu_kernel.py. The mask is chunked.py's: key t is visible to query s
// iff kv_pos[b,t] <= q_pos[b,s], q_pos[b,s] - kv_pos[b,t] < window (when window > 0) and q_seg[b,s] ==
// kv_seg[b,t] (when has_seg). A query with no visible key outputs zeros and gets zero gradients.
//
// Layouts are the model's own: q / out / dout [B, S, N, H], k / v [B, T, K, H], lse [B, N, S]; query head n
// reads kv head n / (N / K). Blocks of queries and keys that no pair can see are skipped, blocks every pair
// sees are not masked. The products are a register-blocked GEMM written with GCC/Clang vector extensions
// (8 floats), so no BLAS is linked; work is spread over XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) for x <= 0 (and -inf): Cody-Waite reduction and a degree-6 polynomial, about 2 ulp; exp(-inf) = 0.
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f);
  v8 xc = x < lo ? lo : x;
  const v8 n = (xc * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
  v8 r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  v8 y = p * scale;
  return x < lo ? splat(0.0f) : y;
}

// C[MR x 16] (+)= A[MR x K] B[K x 16]. B is row-major (leading dimension ldb); A is row-major (lda) or, with
// TA, stored transposed: element (r, p) at a[p * lda + r].
template <int MR, bool TA>
inline void Micro16(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                    bool acc) {
  v8 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = acc ? load8(c + r * ldc) : splat(0.0f);
    c1[r] = acc ? load8(c + r * ldc + 8) : splat(0.0f);
  }
  for (int64_t p = 0; p < k; ++p) {
    const v8 b0 = load8(b + p * ldb), b1 = load8(b + p * ldb + 8);
    for (int r = 0; r < MR; ++r) {
      const v8 ar = splat(TA ? a[p * lda + r] : a[r * lda + p]);
      c0[r] += ar * b0;
      c1[r] += ar * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(c + r * ldc, c0[r]);
    store8(c + r * ldc + 8, c1[r]);
  }
}

template <bool TA>
inline void Rows16(int64_t m, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc, bool acc) {
  constexpr int kMR = 6;
  const int64_t row_step = TA ? 1 : lda;
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR) Micro16<kMR, TA>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, acc);
  const float* ai = a + i * row_step;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: Micro16<5, TA>(k, ai, lda, b, ldb, ci, ldc, acc); break;
    case 4: Micro16<4, TA>(k, ai, lda, b, ldb, ci, ldc, acc); break;
    case 3: Micro16<3, TA>(k, ai, lda, b, ldb, ci, ldc, acc); break;
    case 2: Micro16<2, TA>(k, ai, lda, b, ldb, ci, ldc, acc); break;
    case 1: Micro16<1, TA>(k, ai, lda, b, ldb, ci, ldc, acc); break;
    default: break;
  }
}

// C[M x N] (+)= A[M x K] B[K x N]: B and C row-major with leading dimensions; A row-major (lda), or with TA
// its transpose stored row-major ([K x M], lda).
template <bool TA = false>
void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool acc) {
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) Rows16<TA>(m, k, a, lda, b + j, ldb, c + j, ldc, acc);
  if (n16 == n) return;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = n16; j < n; ++j) {
      float s = acc ? c[i * ldc + j] : 0.0f;
      for (int64_t p = 0; p < k; ++p) s += (TA ? a[p * lda + i] : a[i * lda + p]) * b[p * ldb + j];
      c[i * ldc + j] = s;
    }
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols.
void Transpose(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16)
      for (int64_t r = r0; r < rows && r < r0 + 16; ++r)
        for (int64_t c = c0; c < cols && c < c0 + 16; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

struct Shape {
  int64_t b, s, n, h, t, kh, g, bq, bk, nq, nk;
  float scale;
  int64_t window;
  bool has_seg;
};

// Per (batch, block) min / max of positions and segment ids, to classify block pairs.
struct BlockStats {
  std::vector<int32_t> pmin, pmax, smin, smax;
  BlockStats(const int32_t* pos, const int32_t* seg, int64_t batch, int64_t len, int64_t block) {
    const int64_t nb = (len + block - 1) / block;
    pmin.resize(batch * nb), pmax.resize(batch * nb), smin.resize(batch * nb), smax.resize(batch * nb);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < nb; ++j) {
        int32_t p0 = std::numeric_limits<int32_t>::max(), p1 = std::numeric_limits<int32_t>::min(), s0 = p0,
                s1 = p1;
        for (int64_t i = j * block; i < len && i < (j + 1) * block; ++i) {
          const int32_t p = pos[b * len + i], s = seg[b * len + i];
          p0 = p < p0 ? p : p0, p1 = p > p1 ? p : p1, s0 = s < s0 ? s : s0, s1 = s > s1 ? s : s1;
        }
        pmin[b * nb + j] = p0, pmax[b * nb + j] = p1, smin[b * nb + j] = s0, smax[b * nb + j] = s1;
      }
  }
};

enum class Pair { kSkip, kFull, kPartial };

Pair Classify(const Shape& sh, const BlockStats& qs, const BlockStats& ks, int64_t b, int64_t i, int64_t j) {
  const int64_t qi = b * sh.nq + i, kj = b * sh.nk + j;
  const int64_t qmin = qs.pmin[qi], qmax = qs.pmax[qi], kmin = ks.pmin[kj], kmax = ks.pmax[kj];
  if (kmin > qmax) return Pair::kSkip;
  if (sh.window > 0 && qmin - kmax >= sh.window) return Pair::kSkip;
  if (sh.has_seg && (qs.smax[qi] < ks.smin[kj] || qs.smin[qi] > ks.smax[kj])) return Pair::kSkip;
  bool full = kmax <= qmin;
  if (sh.window > 0) full = full && qmax - kmin < sh.window;
  if (sh.has_seg) full = full && qs.smin[qi] == qs.smax[qi] && ks.smin[kj] == ks.smax[kj] && qs.smin[qi] == ks.smin[kj];
  return full ? Pair::kFull : Pair::kPartial;
}

inline bool Visible(const Shape& sh, int32_t qp, int32_t kp, int32_t qsg, int32_t ksg) {
  if (kp > qp) return false;
  if (sh.window > 0 && static_cast<int64_t>(qp) - kp >= sh.window) return false;
  return !sh.has_seg || qsg == ksg;
}

// row[c] = row[c] * scale for the visible keys of one query (all of them unless `partial`), -inf for the rest;
// returns the row's maximum (-inf when nothing is visible).
float ScaleMaskRow(const Shape& sh, float* row, int64_t cols, bool partial, int32_t qp, int32_t qsg,
                   const int32_t* kpos, const int32_t* kseg) {
  const v8 sv = splat(sh.scale), ninf = splat(-kInf);
  v8 mx8 = ninf;
  int64_t c = 0;
  if (!partial) {
    for (; c + 8 <= cols; c += 8) {
      const v8 x = load8(row + c) * sv;
      store8(row + c, x);
      mx8 = x > mx8 ? x : mx8;
    }
  } else {
    const v8i qpv = v8i{} + qp, qsv = v8i{} + qsg;
    const v8i wv = v8i{} + static_cast<int32_t>(sh.window > INT32_MAX ? INT32_MAX : sh.window);
    for (; c + 8 <= cols; c += 8) {
      v8i kp, ks;
      std::memcpy(&kp, kpos + c, sizeof(kp));
      v8i vis = kp <= qpv;
      if (sh.window > 0) vis &= (qpv - kp) < wv;
      if (sh.has_seg) {
        std::memcpy(&ks, kseg + c, sizeof(ks));
        vis &= ks == qsv;
      }
      const v8 x = vis ? load8(row + c) * sv : ninf;
      store8(row + c, x);
      mx8 = x > mx8 ? x : mx8;
    }
  }
  float mx = -kInf;
  for (int e = 0; e < 8; ++e) mx = mx8[e] > mx ? mx8[e] : mx;
  for (; c < cols; ++c) {
    const bool vis = !partial || Visible(sh, qp, kpos[c], qsg, kseg[c]);
    row[c] = vis ? row[c] * sh.scale : -kInf;
    mx = row[c] > mx ? row[c] : mx;
  }
  return mx;
}

// Runs fn(task) for task in [0, count) on the calling thread and XLA's intra-op pool; returns when all are done.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  // Helpers that start after the tasks ran out return at once; the caller waits only for claimed tasks.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, count, &fn, work]() mutable {
      if (state->next.load() < count) work();
    });
  work();
  // A helper may outlive this frame only once no task is left to claim, so it never calls `fn` after return.
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

struct Inputs {
  const int32_t *qpos, *kpos, *qseg, *kseg;
};

void ForwardTask(const Shape& sh, const Inputs& in, const BlockStats& qs, const BlockStats& ks, const float* q,
                 const float* k, const float* v, float* out, float* lse, int64_t task) {
  const int64_t i = task % sh.nq, n = (task / sh.nq) % sh.n, b = task / (sh.nq * sh.n);
  const int64_t kh = n / sh.g, h = sh.h, q0 = i * sh.bq, rows = std::min(sh.bq, sh.s - q0);
  const int64_t ldq = sh.n * h, ldk = sh.kh * h;
  const float* q_blk = q + (b * sh.s + q0) * ldq + n * h;
  std::vector<float> kt(h * sh.bk), sc(sh.bq * sh.bk), o(sh.bq * h, 0.0f), m(sh.bq, -kInf), l(sh.bq, 0.0f);
  const int32_t* qpos = in.qpos + b * sh.s + q0;
  const int32_t* qseg = in.qseg + b * sh.s + q0;
  for (int64_t j = 0; j < sh.nk; ++j) {
    const Pair pair = Classify(sh, qs, ks, b, i, j);
    if (pair == Pair::kSkip) continue;
    const int64_t k0 = j * sh.bk, cols = std::min(sh.bk, sh.t - k0);
    const float* k_blk = k + (b * sh.t + k0) * ldk + kh * h;
    const float* v_blk = v + (b * sh.t + k0) * ldk + kh * h;
    Transpose(cols, h, k_blk, ldk, kt.data(), sh.bk);
    Gemm(rows, cols, h, q_blk, ldq, kt.data(), sh.bk, sc.data(), sh.bk, false);
    const int32_t *kpos = in.kpos + b * sh.t + k0, *kseg = in.kseg + b * sh.t + k0;
    for (int64_t r = 0; r < rows; ++r) {
      float* s_row = sc.data() + r * sh.bk;
      const float mx = ScaleMaskRow(sh, s_row, cols, pair == Pair::kPartial, qpos[r], qseg[r], kpos, kseg);
      const float m_new = mx > m[r] ? mx : m[r];
      if (m_new == -kInf) {  // nothing visible to this row yet
        for (int64_t c = 0; c < cols; ++c) s_row[c] = 0.0f;
        continue;
      }
      const float alpha = m[r] == -kInf ? 0.0f : std::exp(m[r] - m_new);
      const v8 mv = splat(m_new);
      v8 sum8 = splat(0.0f);
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) {
        const v8 p = exp8(load8(s_row + c) - mv);
        store8(s_row + c, p);
        sum8 += p;
      }
      float sum = 0.0f;
      for (int e = 0; e < 8; ++e) sum += sum8[e];
      for (; c < cols; ++c) {
        s_row[c] = s_row[c] == -kInf ? 0.0f : std::exp(s_row[c] - m_new);
        sum += s_row[c];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      if (alpha != 1.0f)
        for (int64_t e = 0; e < h; ++e) o[r * h + e] *= alpha;
    }
    Gemm(rows, h, cols, sc.data(), sh.bk, v_blk, ldk, o.data(), h, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + (b * sh.s + q0 + r) * ldq + n * h;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t e = 0; e < h; ++e) dst[e] = o[r * h + e] * inv;
    lse[(b * sh.n + n) * sh.s + q0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kInf;
  }
}

void BackwardTask(const Shape& sh, const Inputs& in, const BlockStats& qs, const BlockStats& ks, const float* q,
                  const float* k, const float* v, const float* out, const float* lse, const float* dout, float* dq,
                  float* dk, float* dv, int64_t task) {
  const int64_t kh = task % sh.kh, b = task / sh.kh, h = sh.h, ldq = sh.n * h, ldk = sh.kh * h;
  // This task owns dq[b, :, heads of kv head kh, :] and dk / dv[b, :, kh, :].
  for (int64_t gi = 0; gi < sh.g; ++gi)
    for (int64_t s = 0; s < sh.s; ++s) std::memset(dq + (b * sh.s + s) * ldq + (kh * sh.g + gi) * h, 0, h * 4);
  for (int64_t t = 0; t < sh.t; ++t) {
    std::memset(dk + (b * sh.t + t) * ldk + kh * h, 0, h * 4);
    std::memset(dv + (b * sh.t + t) * ldk + kh * h, 0, h * 4);
  }
  std::vector<float> delta(sh.g * sh.s);
  for (int64_t gi = 0; gi < sh.g; ++gi)
    for (int64_t s = 0; s < sh.s; ++s) {
      const int64_t off = (b * sh.s + s) * ldq + (kh * sh.g + gi) * h;
      float acc = 0.0f;
      for (int64_t e = 0; e < h; ++e) acc += out[off + e] * dout[off + e];
      delta[gi * sh.s + s] = acc;
    }
  std::vector<float> kt(h * sh.bk), vt(h * sh.bk), p(sh.bq * sh.bk), dp(sh.bq * sh.bk);
  for (int64_t j = 0; j < sh.nk; ++j) {
    const int64_t k0 = j * sh.bk, cols = std::min(sh.bk, sh.t - k0);
    const float* k_blk = k + (b * sh.t + k0) * ldk + kh * h;
    const float* v_blk = v + (b * sh.t + k0) * ldk + kh * h;
    float* dk_blk = dk + (b * sh.t + k0) * ldk + kh * h;
    float* dv_blk = dv + (b * sh.t + k0) * ldk + kh * h;
    bool packed = false;
    for (int64_t i = 0; i < sh.nq; ++i) {
      const Pair pair = Classify(sh, qs, ks, b, i, j);
      if (pair == Pair::kSkip) continue;
      if (!packed) {
        Transpose(cols, h, k_blk, ldk, kt.data(), sh.bk);
        Transpose(cols, h, v_blk, ldk, vt.data(), sh.bk);
        packed = true;
      }
      const int64_t q0 = i * sh.bq, rows = std::min(sh.bq, sh.s - q0);
      for (int64_t gi = 0; gi < sh.g; ++gi) {
        const int64_t n = kh * sh.g + gi;
        const float* q_blk = q + (b * sh.s + q0) * ldq + n * h;
        const float* do_blk = dout + (b * sh.s + q0) * ldq + n * h;
        float* dq_blk = dq + (b * sh.s + q0) * ldq + n * h;
        const float* lse_blk = lse + (b * sh.n + n) * sh.s + q0;
        const float* delta_blk = delta.data() + gi * sh.s + q0;
        Gemm(rows, cols, h, q_blk, ldq, kt.data(), sh.bk, p.data(), sh.bk, false);
        const int32_t *qpos = in.qpos + b * sh.s + q0, *qseg = in.qseg + b * sh.s + q0;
        const int32_t *kpos = in.kpos + b * sh.t + k0, *kseg = in.kseg + b * sh.t + k0;
        for (int64_t r = 0; r < rows; ++r) {
          float* row = p.data() + r * sh.bk;
          const float lse_r = lse_blk[r];
          if (lse_r == kInf) {  // no visible key: zero probabilities
            for (int64_t c = 0; c < cols; ++c) row[c] = 0.0f;
            continue;
          }
          ScaleMaskRow(sh, row, cols, pair == Pair::kPartial, qpos[r], qseg[r], kpos, kseg);
          const v8 lv = splat(lse_r);
          int64_t c = 0;
          for (; c + 8 <= cols; c += 8) store8(row + c, exp8(load8(row + c) - lv));
          for (; c < cols; ++c) row[c] = row[c] == -kInf ? 0.0f : std::exp(row[c] - lse_r);
        }
        // dV += P^T dO
        Gemm<true>(cols, h, rows, p.data(), sh.bk, do_blk, ldq, dv_blk, ldk, true);
        // dP = dO V^T; dS = P (dP - delta) scale
        Gemm(rows, cols, h, do_blk, ldq, vt.data(), sh.bk, dp.data(), sh.bk, false);
        for (int64_t r = 0; r < rows; ++r) {
          const float d = delta_blk[r];
          float* dp_row = dp.data() + r * sh.bk;
          const float* p_row = p.data() + r * sh.bk;
          for (int64_t c = 0; c < cols; ++c) dp_row[c] = p_row[c] * (dp_row[c] - d) * sh.scale;
        }
        // dQ += dS K; dK += dS^T Q
        Gemm(rows, h, cols, dp.data(), sh.bk, k_blk, ldk, dq_blk, ldq, true);
        Gemm<true>(cols, h, rows, dp.data(), sh.bk, q_blk, ldq, dk_blk, ldk, true);
      }
    }
  }
}

Shape MakeShape(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, float scale, int64_t window, bool has_seg,
                int64_t bq, int64_t bk) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Shape sh{qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], qd[2] / kd[2], bq, bk, 0, 0, scale, window, has_seg};
  sh.nq = (sh.s + bq - 1) / bq;
  sh.nk = (sh.t + bk - 1) / bk;
  return sh;
}

ffi::Error CheckShape(const Shape& sh) {
  if (sh.kh <= 0 || sh.n % sh.kh != 0) return ffi::Error::InvalidArgument("N must be a multiple of K");
  if (sh.bq <= 0 || sh.bk <= 0) return ffi::Error::InvalidArgument("block sizes must be positive");
  return ffi::Error::Success();
}

ffi::Error FlashFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                    ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg, float scale, int64_t window,
                    bool has_seg, int64_t block_q, int64_t block_k, ffi::ResultBuffer<ffi::F32> out,
                    ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = MakeShape(q, k, scale, window, has_seg, block_q, block_k);
  if (auto err = CheckShape(sh); err.failure()) return err;
  const Inputs in{qpos.typed_data(), kpos.typed_data(), qseg.typed_data(), kseg.typed_data()};
  const BlockStats qs(in.qpos, in.qseg, sh.b, sh.s, sh.bq), ks(in.kpos, in.kseg, sh.b, sh.t, sh.bk);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, sh.b * sh.n * sh.nq,
              [&](int64_t task) { ForwardTask(sh, in, qs, ks, qp, kp, vp, op, lp, task); });
  return ffi::Error::Success();
}

ffi::Error FlashBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                    ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg, float scale, int64_t window,
                    bool has_seg, int64_t block_q, int64_t block_k, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = MakeShape(q, k, scale, window, has_seg, block_q, block_k);
  if (auto err = CheckShape(sh); err.failure()) return err;
  const Inputs in{qpos.typed_data(), kpos.typed_data(), qseg.typed_data(), kseg.typed_data()};
  const BlockStats qs(in.qpos, in.qseg, sh.b, sh.s, sh.bq), ks(in.kpos, in.kseg, sh.b, sh.t, sh.bk);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data(),
              *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, sh.b * sh.kh, [&](int64_t task) {
    BackwardTask(sh, in, qs, ks, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, task);
  });
  return ffi::Error::Success();
}

}  // namespace

// The two bindings are written out: xla::ffi::Binding's move constructor is private, so a chain cannot be built
// in a helper function and shared.

// q, k, v, q / kv positions, q / kv segment ids -> out, lse
XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopjaxFlashFwd, FlashFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("has_seg")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// q, k, v, out, lse, dout, q / kv positions, q / kv segment ids -> dq, dk, dv
XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopjaxFlashBwd, FlashBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("has_seg")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
