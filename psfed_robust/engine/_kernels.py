"""Optional compiled CPU kernels of the batched online engine, each with a torch/numpy twin.

Every kernel here has a plain fallback in the engine that gives the *same bits*, so results never
depend on whether the compiler was available (``OnlineResult.metadata["engine_kernels"]`` says
which one ran; tests compare both):

* :func:`floyd_pcg` — :func:`psfed_robust.engine.masks.floyd_indices`' CPU sampler (numpy PCG64
  raw words, 16-bit Lemire multiply-shift with rejection, Floyd's steps) replicated draw for draw
  in C++: the same picks as the numpy path, ~15x faster;
* :func:`schedule_fixed` — the ``participants`` smallest keys per run (ties to the lower client),
  ascending, as the engine's ``kthvalue`` selection;
* :func:`lms` — the LMS step of every client: RFF regressors of a cache-sized chunk of runs
  (``torch.bmm`` + ``cos_`` called from C++, i.e. torch's own kernels) then, per client, the
  a-priori error ``e = y − s·(wᵀc)`` and ``w ← w + (μ s e) c`` in one pass. The dot product uses a
  fixed summation order, :data:`LANES` lane accumulators (lane ``j`` sums the products of entries
  ``j, j + LANES, …`` in order) folded by halving (``a[:h] + a[h:2h]``, ``h = LANES/2 … 1``);
  multiplications and additions round separately (compiled with ``-ffp-contract=off``), so
  :func:`lane_dot_torch` reproduces it bit for bit with torch elementwise ops;
* :func:`merge` (downlink: the shared entries of each participant take the global values) and
  :func:`uplink_mean` (PSO-Fed's server step ``g + ω Σ_k T_k (w_k − g)``, accumulated slot by slot
  and entry by entry in order, as ``torch.scatter_add_`` does).

The kernels release the GIL (the engine runs run blocks in parallel threads) and use one thread
each. They are compiled once per machine with ``torch.utils.cpp_extension.load_inline`` (gcc and
ninja); any build failure falls back to the torch/numpy paths silently. ``PSFED_NO_CPP_KERNEL=1``
disables them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from psfed_robust._cpp import InlineExtension

__all__ = ["LANES", "available", "lane_dot_torch", "load"]

#: lane accumulators of the LMS dot product (the documented summation order)
LANES = 32

_CPP_SRC = r"""
#include <torch/extension.h>
#include <ATen/ATen.h>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace py = pybind11;
using u128 = unsigned __int128;
constexpr int64_t LANES = 32;

// ------------------------------------------------------------------ recycled output buffers
// Large int64 outputs (mask chunks, ~16 MB) come from a small free list: a fresh allocation's
// pages are zeroed by the kernel on first touch, which costs as much as drawing the masks.
struct BufPool {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free;
};
static BufPool& buf_pool() {
  static BufPool* p = new BufPool();  // never destroyed: deleters may run at exit
  return *p;
}

static torch::Tensor pooled_index(int64_t rows, int64_t cols, bool i16) {
  const size_t es = i16 ? 2 : 8;
  const size_t bytes = std::max<size_t>(64, ((size_t)(rows * cols) * es + 63) / 64 * 64);
  void* ptr = nullptr;
  BufPool& bp = buf_pool();
  {
    std::lock_guard<std::mutex> lock(bp.mu);
    for (size_t i = 0; i < bp.free.size(); ++i)
      if (bp.free[i].first == bytes) {
        ptr = bp.free[i].second;
        bp.free.erase(bp.free.begin() + i);
        break;
      }
  }
  if (!ptr) ptr = std::aligned_alloc(64, bytes);
  TORCH_CHECK(ptr != nullptr, "out of memory");
  return torch::from_blob(ptr, {rows, cols}, [bytes](void* q) {
    BufPool& b = buf_pool();
    std::lock_guard<std::mutex> lock(b.mu);
    if (b.free.size() < 8) {
      b.free.emplace_back(bytes, q);
    } else {
      std::free(q);
    }
  }, torch::TensorOptions().dtype(i16 ? torch::kInt16 : torch::kInt64));
}

// ------------------------------------------------------------------ numpy's PCG64 (XSL-RR 128/64)
struct Pcg64 {
  u128 state, inc;
  inline uint64_t next() {
    const u128 mult = ((u128)0x2360ED051FC65DA4ULL << 64) | (u128)0x4385DF649FCCF645ULL;
    state = state * mult + inc;
    const uint64_t x = (uint64_t)(state >> 64) ^ (uint64_t)state;
    const unsigned rot = (unsigned)(state >> 122);
    return (x >> rot) | (x << ((64u - rot) & 63u));
  }
  // bit_generator.random_raw((count + 3) // 4).view(np.uint16): little-endian 16-bit words
  void words(std::vector<uint16_t>& out, int64_t count) {
    const int64_t nraw = (count + 3) / 4;
    out.resize(nraw * 4);
    uint16_t* __restrict o = out.data();
    u128 st = state;  // in registers: stores to `o` cannot alias it
    const u128 mult = ((u128)0x2360ED051FC65DA4ULL << 64) | (u128)0x4385DF649FCCF645ULL;
    for (int64_t q = 0; q < nraw; ++q) {
      st = st * mult + inc;
      const uint64_t x = (uint64_t)(st >> 64) ^ (uint64_t)st;
      const unsigned rot = (unsigned)(st >> 122);
      const uint64_t r = (x >> rot) | (x << ((64u - rot) & 63u));
      o[4 * q] = (uint16_t)(r & 0xFFFF);
      o[4 * q + 1] = (uint16_t)((r >> 16) & 0xFFFF);
      o[4 * q + 2] = (uint16_t)((r >> 32) & 0xFFFF);
      o[4 * q + 3] = (uint16_t)(r >> 48);
    }
    state = st;
  }
};

// Floyd's algorithm for m of dim (dim <= 4096), rows in sub-chunks of 4096, exactly as
// psfed_robust.engine.masks._floyd's numpy path: all m draws of a sub-chunk first ([m, n]
// row-major words; Lemire 16-bit multiply-shift; rejected entries redrawn in rounds, in order),
// then the steps.
template <typename I>
static void floyd_run(int64_t rows, int64_t dim, int64_t m, const int64_t* sp, I* pk,
                      uint8_t* mk);

// picks [rows, m] (int64, or int16 when i16 and dim <= 32767) and, if want_masks, bool masks
std::vector<torch::Tensor> floyd_pcg(int64_t rows, int64_t dim, int64_t m, torch::Tensor st,
                                     bool want_masks, bool i16) {
  TORCH_CHECK(st.scalar_type() == torch::kInt64 && st.numel() == 4, "state: int64 [4]");
  TORCH_CHECK(dim >= 1 && dim <= 4096 && m >= 1 && m <= dim, "floyd_pcg: 1 <= m <= dim <= 4096");
  auto s = st.contiguous();
  auto picks = pooled_index(rows, m, i16);
  auto masks = torch::empty({want_masks ? rows : 0, want_masks ? dim : 0}, torch::kBool);
  uint8_t* mk = want_masks ? reinterpret_cast<uint8_t*>(masks.data_ptr<bool>()) : nullptr;
  py::gil_scoped_release nogil;
  if (i16)
    floyd_run<int16_t>(rows, dim, m, s.data_ptr<int64_t>(), picks.data_ptr<int16_t>(), mk);
  else
    floyd_run<int64_t>(rows, dim, m, s.data_ptr<int64_t>(), picks.data_ptr<int64_t>(), mk);
  return {picks, masks};
}

template <typename I>
static void floyd_run(int64_t rows, int64_t dim, int64_t m, const int64_t* sp, I* pk,
                      uint8_t* mk) {
  {
    Pcg64 g{((u128)(uint64_t)sp[0] << 64) | (u128)(uint64_t)sp[1],
            ((u128)(uint64_t)sp[2] << 64) | (u128)(uint64_t)sp[3]};
    std::vector<uint32_t> hs(m), thr(m);
    for (int64_t i = 0; i < m; ++i) {
      hs[i] = (uint32_t)(dim - m + 1 + i);
      thr[i] = (65536u - hs[i]) % hs[i];
    }
    thread_local std::vector<uint16_t> w, val;  // scratch kept between calls
    std::vector<int64_t> rej, rej2;
    std::vector<uint8_t> sel(dim), sel4(4 * dim);
    const int64_t SUB = 4096, VS = std::min(SUB, rows) + 32;
    val.resize(m * VS);
    for (int64_t s0 = 0; s0 < rows; s0 += SUB) {
      const int64_t n = std::min(SUB, rows - s0);
      g.words(w, m * n);
      rej.clear();
      // val[i * VS + j]: step i's draw for row j (rows padded by one cache line so that the m
      // draws of one row do not alias in L1); rejected entries listed in [m, n] row-major order
      for (int64_t i = 0; i < m; ++i) {
        const uint32_t h = hs[i], t = thr[i];
        const uint16_t* __restrict wi = w.data() + i * n;
        uint16_t* __restrict vi = val.data() + i * VS;
        int64_t bad = 0;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t p = (uint32_t)wi[j] * h;
          bad += (p & 0xFFFFu) < t;
          vi[j] = (uint16_t)(p >> 16);
        }
        if (bad)
          for (int64_t j = 0; j < n; ++j)
            if ((((uint32_t)wi[j] * h) & 0xFFFFu) < t) rej.push_back(i * n + j);
      }
      while (!rej.empty()) {
        g.words(w, (int64_t)rej.size());
        rej2.clear();
        for (size_t q = 0; q < rej.size(); ++q) {
          const int64_t idx = rej[q], i = idx / n, j = idx % n;
          const uint32_t p = (uint32_t)w[q] * hs[i];
          if ((p & 0xFFFFu) >= thr[i]) val[i * VS + j] = (uint16_t)(p >> 16);
          else rej2.push_back(idx);
        }
        std::swap(rej, rej2);
      }
      // raw pointers: stores to `out` must not make the compiler reload vector internals
      uint8_t* __restrict sl = sel.data();
      const uint16_t* __restrict vl = val.data();
      int64_t j = 0;
      if (!mk) {  // four rows interleaved (independent chains), each exactly as below
        uint8_t* s4 = sel4.data();
        for (; j + 4 <= n; j += 4) {
          std::memset(s4, 0, 4 * dim);
          I* __restrict o0 = pk + (s0 + j) * m;
          for (int64_t i = 0; i < m; ++i) {
            const uint16_t* v = vl + i * VS + j;
            const int64_t jj = dim - m + i;
            for (int q = 0; q < 4; ++q) {
              uint8_t* sq = s4 + q * dim;
              const int64_t t = v[q];
              const int64_t pick = sq[t] ? jj : t;
              sq[pick] = 1;
              o0[q * m + i] = (I)pick;
            }
          }
        }
      }
      for (; j < n; ++j) {
        std::memset(sl, 0, dim);
        I* __restrict out = pk + (s0 + j) * m;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t t = vl[i * VS + j];
          const int64_t pick = sl[t] ? dim - m + i : t;
          sl[pick] = 1;
          out[i] = (I)pick;
        }
        if (mk) std::memcpy(mk + (s0 + j) * dim, sl, dim);
      }
    }
  }
}

// ------------------------------------------------------------------ schedule: P smallest keys
template <typename T>
static void sched_impl(const T* keys, int64_t B, int64_t K, int64_t P, int64_t* out) {
  std::vector<int64_t> order(K);
  for (int64_t b = 0; b < B; ++b) {
    const T* kb = keys + b * K;
    for (int64_t k = 0; k < K; ++k) order[k] = k;
    auto less = [kb](int64_t a, int64_t c) { return kb[a] < kb[c] || (kb[a] == kb[c] && a < c); };
    if (P < K) std::nth_element(order.begin(), order.begin() + (P - 1), order.end(), less);
    std::sort(order.begin(), order.begin() + P);
    std::memcpy(out + b * P, order.data(), P * sizeof(int64_t));
  }
}

// float32 keys: (order-preserving key bits << 32 | client) are distinct 64-bit integers whose
// order is (key, client); the P-th smallest is the threshold, and a scan in client order lists
// the participants ascending
static void sched_f32(const float* keys, int64_t B, int64_t K, int64_t P, int64_t* out) {
  // radix-style select: 256 buckets by a monotone map of the order-preserving key bits, then
  // an exact select among the (few) keys of the bucket that holds the P-th smallest
  std::vector<uint32_t> u(K);
  std::vector<uint8_t> bk(K);
  std::vector<uint64_t> cand;
  for (int64_t b = 0; b < B; ++b) {
    uint32_t lo = 0xFFFFFFFFu, hi = 0;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t v;
      std::memcpy(&v, keys + b * K + k, 4);
      v = (v & 0x80000000u) ? ~v : (v | 0x80000000u);
      u[k] = v;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    const double sc = 256.0 / ((double)(hi - lo) + 1.0);
    int32_t cnt[256] = {0};
    for (int64_t k = 0; k < K; ++k) {
      const int32_t q = std::min<int32_t>(255, (int32_t)((double)(u[k] - lo) * sc));
      bk[k] = (uint8_t)q;
      ++cnt[q];
    }
    int32_t cum = 0, sel = 0;
    while (cum + cnt[sel] < P) cum += cnt[sel++];
    const int64_t need = P - cum;  // taken from bucket `sel`, smallest (key, client) first
    cand.clear();
    for (int64_t k = 0; k < K; ++k)
      if (bk[k] == sel) cand.push_back(((uint64_t)u[k] << 32) | (uint64_t)k);
    std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end());
    const uint64_t thr = cand[need - 1];
    int64_t* o = out + b * P;
    for (int64_t k = 0, q = 0; k < K; ++k)
      if (bk[k] < sel || (bk[k] == sel && (((uint64_t)u[k] << 32) | (uint64_t)k) <= thr))
        o[q++] = k;
  }
}

torch::Tensor schedule_fixed(torch::Tensor keys, int64_t P);

// keys = torch.rand((B, K), generator=gen, dtype) then schedule_fixed (one call, no GIL)
torch::Tensor schedule_draw(at::Generator gen, int64_t B, int64_t K, int64_t P, bool dbl) {
  torch::Tensor keys;
  {
    py::gil_scoped_release nogil;
    keys = at::rand({B, K}, gen, torch::TensorOptions().dtype(dbl ? torch::kFloat64
                                                                  : torch::kFloat32));
  }
  return schedule_fixed(keys, P);
}

torch::Tensor schedule_fixed(torch::Tensor keys, int64_t P) {
  TORCH_CHECK(keys.dim() == 2 && keys.is_contiguous(), "keys: contiguous [B, K]");
  const int64_t B = keys.size(0), K = keys.size(1);
  TORCH_CHECK(P >= 1 && P <= K, "1 <= P <= K");
  auto out = torch::empty({B, P}, torch::kInt64);
  py::gil_scoped_release nogil;
  if (keys.scalar_type() == torch::kFloat32 && K < (int64_t(1) << 31))
    sched_f32(keys.data_ptr<float>(), B, K, P, out.data_ptr<int64_t>());
  else
    sched_impl<double>(keys.data_ptr<double>(), B, K, P, out.data_ptr<int64_t>());
  return out;
}

// ------------------------------------------------------------------ LMS step
// Four rows at a time: lane j of row q sums w[q][s + j] * c[q][s + j] over s = 0, LANES, ...
template <typename T, int R>
static inline void lane_dots(const T* const* w, const T* const* c, int64_t D, T* res) {
  T acc[R][LANES];
  for (int q = 0; q < R; ++q)
    for (int64_t j = 0; j < LANES; ++j) acc[q][j] = T(0);
  int64_t s = 0;
  for (; s + LANES <= D; s += LANES) {
    for (int q = 0; q < R; ++q) {
      const T* __restrict wq = w[q] + s;
      const T* __restrict cq = c[q] + s;
#pragma GCC ivdep
      for (int64_t j = 0; j < LANES; ++j) acc[q][j] += wq[j] * cq[j];
    }
  }
  const int64_t rem = D - s;
  for (int q = 0; q < R; ++q)
    for (int64_t j = 0; j < rem; ++j) acc[q][j] += w[q][s + j] * c[q][s + j];
  for (int q = 0; q < R; ++q) {
    for (int64_t h = LANES / 2; h >= 1; h /= 2)
      for (int64_t j = 0; j < h; ++j) acc[q][j] = acc[q][j] + acc[q][j + h];
    res[q] = acc[q][0];
  }
}

struct NoHook {
  inline void operator()(int64_t) const {}
};

// LMS rows [0, rows): pre(r) runs before row r's dot product, post(r) after its update.
template <typename T, typename Pre = NoHook, typename Post = NoHook>
static void lms_rows(T* W, const T* C, const T* y, T* e, const T* part, int64_t rows, int64_t D,
                     T mu_s, T scale, bool scaled, Pre pre = Pre(), Post post = Post()) {
  int64_t r = 0;
  T dot[4];
  auto finish = [&](int64_t row, T d) {
    T* __restrict w = W + row * D;
    const T* __restrict c = C + row * D;
    const T pred = scaled ? d * scale : d;
    const T er = y[row] - pred;
    e[row] = er;
    T coef = er * mu_s;
    if (part) coef = coef * part[row];
#pragma GCC ivdep
    for (int64_t j = 0; j < D; ++j) w[j] = w[j] + coef * c[j];
    post(row);
  };
  for (; r + 4 <= rows; r += 4) {
    for (int q = 0; q < 4; ++q) pre(r + q);
    const T* wp[4] = {W + r * D, W + (r + 1) * D, W + (r + 2) * D, W + (r + 3) * D};
    const T* cp[4] = {C + r * D, C + (r + 1) * D, C + (r + 2) * D, C + (r + 3) * D};
    lane_dots<T, 4>(wp, cp, D, dot);
    for (int q = 0; q < 4; ++q) finish(r + q, dot[q]);
  }
  for (; r < rows; ++r) {
    pre(r);
    const T* wp[1] = {W + r * D};
    const T* cp[1] = {C + r * D};
    lane_dots<T, 1>(wp, cp, D, dot);
    finish(r, dot[0]);
  }
}

// ------------------------------------------------------------------ downlink merge / server step
// Run b: W[b, idx[b, p], S[b, p, :]] = g[b, S[b, p, :]] for the valid slots p.
template <typename T, typename I>
static inline void merge_run(T* Wb, const T* gb, const int64_t* ib, const I* sb,
                             const bool* vb, int64_t P, int64_t M, int64_t D) {
  for (int64_t p = 0; p < P; ++p) {
    if (vb && !vb[p]) continue;
    T* w = Wb + ib[p] * D;
    const I* sp = sb + p * M;
    for (int64_t m = 0; m < M; ++m) w[sp[m]] = gb[sp[m]];
  }
}

// Run b: out = g + om * sum_p T_p (w_p - g), accumulated slot by slot, entry by entry (the order
// of torch's scatter_add_ over [P * M] columns).
template <typename T, typename I>
static inline void uplink_run(const T* Wb, const T* gb, const int64_t* ib, const I* tb,
                              const bool* vb, T om, int64_t P, int64_t M, int64_t D, T* acc,
                              T* out) {
  for (int64_t d = 0; d < D; ++d) acc[d] = T(0);
  for (int64_t p = 0; p < P; ++p) {
    if (vb && !vb[p]) continue;
    const T* w = Wb + ib[p] * D;
    const I* tp = tb + p * M;
    for (int64_t m = 0; m < M; ++m) acc[tp[m]] += w[tp[m]] - gb[tp[m]];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = gb[d] + acc[d] * om;
}

static inline bool given(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

// prev_slot[b, :] = -1, then prev_slot[b, idx[b, p]] = b * P + p
static void set_slots_impl(torch::Tensor& prev_slot, const torch::Tensor& idx) {
  TORCH_CHECK(prev_slot.is_contiguous() && idx.is_contiguous(), "contiguous inputs");
  const int64_t B = idx.size(0), P = idx.size(1), K = prev_slot.size(1);
  int64_t* ps = prev_slot.data_ptr<int64_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) ps[b * K + k] = -1;
    for (int64_t p = 0; p < P; ++p) ps[b * K + ip[b * P + p]] = b * P + p;
  }
}

// RFF arguments of nb runs: z[b, k, :] = ((bias + x_0 om_0) + x_1 om_1) + ... (the order of
// psfed_robust.engine.data.rff_args; every product and sum rounded on its own)
// The float32 cosine of psfed_robust.engine.data.rff_cos, operation for operation.
static inline float cos_pso(float a) {
  const float INV_PI = (float)0.318309886183790671537767526745028724;
  const float MAGIC = (float)12582912.0;
  const float PA = (float)3.140625, PB = (float)9.67502593994140625e-4,
              PC = (float)1.509957990978376432e-7;
  const float C6 = (float)(1.0 / 479001600), C5 = (float)(-1.0 / 3628800),
              C4 = (float)(1.0 / 40320), C3 = (float)(-1.0 / 720), C2 = (float)(1.0 / 24),
              C1 = (float)(-1.0 / 2);
  float q = a * INV_PI;
  q = q + MAGIC;
  q = q - MAGIC;
  float r = a - q * PA;
  r = r - q * PB;
  r = r - q * PC;
  const float r2 = r * r;
  float c = r2 * C6;
  c = c + C5; c = c * r2;
  c = c + C4; c = c * r2;
  c = c + C3; c = c * r2;
  c = c + C2; c = c * r2;
  c = c + C1; c = c * r2;
  c = c + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &c, 4);
  bits ^= ((uint32_t)(int32_t)q & 1u) << 31;  // (-1)^q
  std::memcpy(&c, &bits, 4);
  return c;
}

template <typename F>
static inline F engine_cos(F a) { return a; }  // unused for double (torch's cos_ runs there)
template <>
inline float engine_cos<float>(float a) { return cos_pso(a); }

template <typename F, int L, bool COS>
static void rff_args_l(const F* x, const F* om, const F* bias, F* z, int64_t nb, int64_t K,
                       int64_t D) {  // one pass, the L terms in registers
  for (int64_t b = 0; b < nb; ++b) {
    const F* ob = om + b * L * D;
    const F* bb = bias + b * D;
    for (int64_t k = 0; k < K; ++k) {
      const F* xk = x + (b * K + k) * L;
      F* __restrict zk = z + (b * K + k) * D;
      F xl[L];
      for (int l = 0; l < L; ++l) xl[l] = xk[l];
#pragma GCC ivdep
      for (int64_t d = 0; d < D; ++d) {
        F a = bb[d] + xl[0] * ob[d];
        for (int l = 1; l < L; ++l) a = a + xl[l] * ob[l * D + d];
        zk[d] = COS ? engine_cos<F>(a) : a;
      }
    }
  }
}

// returns whether the cosine was applied too (float32, common L)
template <typename F>
static bool rff_args(const F* x, const F* om, const F* bias, F* z, int64_t nb, int64_t K,
                     int64_t L, int64_t D) {
  constexpr bool C = std::is_same<F, float>::value;
  switch (L) {
    case 4: rff_args_l<F, 4, C>(x, om, bias, z, nb, K, D); return C;
    case 5: rff_args_l<F, 5, C>(x, om, bias, z, nb, K, D); return C;
    case 6: rff_args_l<F, 6, C>(x, om, bias, z, nb, K, D); return C;
    case 8: rff_args_l<F, 8, C>(x, om, bias, z, nb, K, D); return C;
    default: break;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const F* ob = om + b * L * D;
    const F* bb = bias + b * D;
    for (int64_t k = 0; k < K; ++k) {
      const F* xk = x + (b * K + k) * L;
      F* __restrict zk = z + (b * K + k) * D;
      const F x0 = xk[0];
      for (int64_t d = 0; d < D; ++d) zk[d] = bb[d] + x0 * ob[d];
      for (int64_t l = 1; l < L; ++l) {
        const F xl = xk[l];
        const F* __restrict ol = ob + l * D;
        for (int64_t d = 0; d < D; ++d) zk[d] = zk[d] + xl * ol[d];
      }
      if (C)
        for (int64_t d = 0; d < D; ++d) zk[d] = engine_cos<F>(zk[d]);
    }
  }
  return C;
}

// One engine iteration, `chunk` runs at a time (the chunk's models stay in cache):
//   merge (S given): the participants' shared entries take the global values;
//   LMS at every client: regressors c = cos(rff_args(x, om, bias)) (RFF: x [B, K, L],
//     om [B, L, D], bias [B, D]; torch's cos; into z [chunk, K, D]) or c [B, K, D];
//     e = y - s (w^T c) (lane order),
//     w <- w + (mu_s e part) c;
//   server (T given): returns g + omega[b] sum_p T_p (w_p - g); otherwise returns g itself.
// W [B, K, D] is updated in place; e [B, K] is written; part [B, K] or empty; valid [B, P] or
// empty; idx [B, P]; S, T [B, P, M] int64.
torch::Tensor step(torch::Tensor W, torch::Tensor g, torch::Tensor idx, torch::Tensor S,
                   torch::Tensor T, torch::Tensor omega, torch::Tensor valid, torch::Tensor x,
                   torch::Tensor om, torch::Tensor bias, torch::Tensor c, torch::Tensor y,
                   torch::Tensor e,
                   torch::Tensor part, torch::Tensor z, double mu_s, double scale,
                   int64_t chunk, torch::Tensor l_acc, torch::Tensor prev_slot) {
  TORCH_CHECK(W.dim() == 3 && W.is_contiguous() && y.is_contiguous() && e.is_contiguous() &&
              g.is_contiguous(), "step: contiguous W [B, K, D], g, y, e");
  const int64_t B = W.size(0), K = W.size(1), D = W.size(2);
  const bool rff = given(x), has_part = given(part), scaled = scale != 1.0;
  TORCH_CHECK(!rff || (x.is_contiguous() && om.is_contiguous() && bias.is_contiguous() &&
                       z.is_contiguous() && x.size(0) == B && x.size(1) == K &&
                       om.size(1) == x.size(2) && om.size(2) == D), "step: RFF inputs");
  const int64_t L = rff ? x.size(2) : 0;
  const bool do_merge = given(S), do_up = given(T);
  TORCH_CHECK(rff || (c.is_contiguous() && c.numel() == W.numel()), "step: regressors like W");
  TORCH_CHECK(!(do_merge || do_up) || (idx.is_contiguous() && idx.size(0) == B),
              "step: idx [B, P] contiguous");
  TORCH_CHECK(!do_merge || S.is_contiguous(), "step: S contiguous");
  TORCH_CHECK(!do_up || (T.is_contiguous() && omega.is_contiguous() && omega.numel() == B),
              "step: T contiguous, omega [B]");
  const int64_t P = (do_merge || do_up) ? idx.size(1) : 0;
  const int64_t MS = do_merge ? S.size(2) : 0, MT = do_up ? T.size(2) : 0;
  const int64_t* ip = (do_merge || do_up) ? idx.data_ptr<int64_t>() : nullptr;
  // index lists: int64, or int16 (the engine's compact masks); S and T of one dtype
  const torch::Tensor& st0 = do_merge ? S : T;
  const bool i16 = st0.defined() && st0.scalar_type() == torch::kInt16;
  TORCH_CHECK(!(do_merge && do_up) || S.scalar_type() == T.scalar_type(), "step: S, T dtypes");
  const void* sv = do_merge ? S.data_ptr() : nullptr;
  const void* tv = do_up ? T.data_ptr() : nullptr;
  const bool* vp = given(valid) ? valid.data_ptr<bool>() : nullptr;
  auto gout = do_up ? torch::empty_like(g) : g;
  py::gil_scoped_release nogil;
  if (given(prev_slot)) set_slots_impl(prev_slot, idx);  // uplink 'next' bookkeeping
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "step", [&] {
    using F = scalar_t;
    const F mu = (F)mu_s, sc = (F)scale;
    F* Wp = W.data_ptr<F>();
    const F* gp = g.data_ptr<F>();
    F* gop = gout.data_ptr<F>();
    const F* op = do_up ? omega.data_ptr<F>() : nullptr;
    const F* yp = y.data_ptr<F>();
    F* ep = e.data_ptr<F>();
    const F* pp = has_part ? part.data_ptr<F>() : nullptr;
    std::vector<F> acc(D);
    std::vector<int64_t> slot(K);
    auto body = [&](const auto* sp, const auto* tp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(sp)>>;
    for (int64_t r0 = 0; r0 < B; r0 += chunk) {
      const int64_t nb = std::min(chunk, B - r0);
      if (do_merge && !do_up)
        for (int64_t b = r0; b < r0 + nb; ++b)
          merge_run<F, I>(Wp + b * K * D, gp + b * D, ip + b * P, sp + b * P * MS,
                       vp ? vp + b * P : nullptr, P, MS, D);
      const F* cp;
      if (rff) {
        auto zc = z.narrow(0, 0, nb);
        if (!rff_args<F>(x.data_ptr<F>() + r0 * K * L, om.data_ptr<F>() + r0 * L * D,
                         bias.data_ptr<F>() + r0 * D, zc.data_ptr<F>(), nb, K, L, D))
          zc.cos_();  // float64: torch's cosine
        cp = zc.data_ptr<F>();
      } else {
        cp = c.data_ptr<F>() + r0 * K * D;
      }
      if (!(do_merge && do_up)) {
        lms_rows<F>(Wp + r0 * K * D, cp, yp + r0 * K, ep + r0 * K,
                    pp ? pp + r0 * K : nullptr, nb * K, D, mu, sc, scaled);
        if (do_up)
          for (int64_t b = r0; b < r0 + nb; ++b)
            uplink_run<F, I>(Wp + b * K * D, gp + b * D, ip + b * P, tp + b * P * MT,
                          vp ? vp + b * P : nullptr, op[b], P, MT, D, acc.data(), gop + b * D);
        continue;
      }
      // merge and uplink row by row, while each model row is in L1: run b's rows in client
      // order, which is slot order whenever the valid slots list clients ascending (the
      // engine's schedules do); otherwise a separate pass per run
      for (int64_t b = r0; b < r0 + nb; ++b) {
        const int64_t* ib = ip + b * P;
        const bool* vb = vp ? vp + b * P : nullptr;
        std::fill(slot.begin(), slot.end(), -1);
        bool ascending = true;
        int64_t last = -1;
        for (int64_t p = 0; p < P; ++p) {
          if (vb && !vb[p]) continue;
          ascending = ascending && ib[p] > last;
          last = ib[p];
          slot[ib[p]] = p;
        }
        F* Wb = Wp + b * K * D;
        const F* gb = gp + b * D;
        const F* cb = cp + (b - r0) * K * D;
        const I* sb = sp + b * P * MS;
        const I* tb = tp + b * P * MT;
        if (!ascending) {
          lms_rows<F>(Wb, cb, yp + b * K, ep + b * K, pp ? pp + b * K : nullptr, K, D, mu, sc,
                      scaled);
          uplink_run<F, I>(Wb, gb, ib, tb, vb, op[b], P, MT, D, acc.data(), gop + b * D);
          continue;
        }
        F* ac = acc.data();
        for (int64_t d = 0; d < D; ++d) ac[d] = F(0);
        auto pre = [&](int64_t k) {
          const int64_t p = slot[k];
          if (p < 0) return;
          F* w = Wb + k * D;
          const I* s = sb + p * MS;
          for (int64_t m = 0; m < MS; ++m) w[s[m]] = gb[s[m]];
        };
        auto post = [&](int64_t k) {
          const int64_t p = slot[k];
          if (p < 0) return;
          const F* w = Wb + k * D;
          const I* t = tb + p * MT;
          for (int64_t m = 0; m < MT; ++m) ac[t[m]] += w[t[m]] - gb[t[m]];
        };
        lms_rows<F>(Wb, cb, yp + b * K, ep + b * K, pp ? pp + b * K : nullptr, K, D, mu, sc,
                    scaled, pre, post);
        const F om = op[b];
        F* go = gop + b * D;
        for (int64_t d = 0; d < D; ++d) go[d] = gb[d] + ac[d] * om;
      }
    }
    };
    if (i16)
      body(static_cast<const int16_t*>(sv), static_cast<const int16_t*>(tv));
    else
      body(static_cast<const int64_t*>(sv), static_cast<const int64_t*>(tv));
  });
  if (given(l_acc)) l_acc.add_((e * e).mean(-1, false, torch::kFloat64));  // as the engine
  return gout;
}

// merge alone (all runs)
void merge(torch::Tensor W, torch::Tensor g, torch::Tensor idx, torch::Tensor S,
           torch::Tensor valid) {
  TORCH_CHECK(W.is_contiguous() && g.is_contiguous() && idx.is_contiguous() && S.is_contiguous(),
              "merge: contiguous inputs");
  const int64_t B = W.size(0), K = W.size(1), D = W.size(2), P = S.size(1), M = S.size(2);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* sp = S.data_ptr<int64_t>();
  const bool* vp = given(valid) ? valid.data_ptr<bool>() : nullptr;
  py::gil_scoped_release nogil;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "merge", [&] {
    for (int64_t b = 0; b < B; ++b)
      merge_run<scalar_t, int64_t>(W.data_ptr<scalar_t>() + b * K * D,
                                   g.data_ptr<scalar_t>() + b * D,
                          ip + b * P, sp + b * P * M, vp ? vp + b * P : nullptr, P, M, D);
  });
}

// ------------------------------------------------------------------ P1 data: AR(1) step, target
// The operations of psfed_robust.engine.data.RFFStream.advance in their order, each rounded on
// its own; sin, exp and sqrt are torch's, on contiguous [B, K] tensors as there. x [B, K, L] is
// updated in place; returns y [B, K].
torch::Tensor advance_rff(torch::Tensor x, torch::Tensor u, torch::Tensor nu, torch::Tensor sd,
                          torch::Tensor mean, torch::Tensor innov, torch::Tensor theta,
                          torch::Tensor noise_std);

// the draws too: u = randn(x.shape), nu = randn(x.shape[:-1]) from gen, in that order
torch::Tensor advance_rff_draw(at::Generator gen, torch::Tensor x, torch::Tensor sd,
                               torch::Tensor mean, torch::Tensor innov, torch::Tensor theta,
                               torch::Tensor noise_std) {
  torch::Tensor u, nu;
  {
    py::gil_scoped_release nogil;
    u = at::randn(x.sizes(), gen, x.options());
    nu = at::randn({x.size(0), x.size(1)}, gen, x.options());
  }
  return advance_rff(x, u, nu, sd, mean, innov, theta, noise_std);
}

torch::Tensor advance_rff(torch::Tensor x, torch::Tensor u, torch::Tensor nu, torch::Tensor sd,
                          torch::Tensor mean, torch::Tensor innov, torch::Tensor theta,
                          torch::Tensor noise_std) {
  for (const auto& t : {x, u, nu, sd, mean, innov, theta, noise_std})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == x.scalar_type(), "advance_rff: inputs");
  const int64_t B = x.size(0), K = x.size(1), L = x.size(2), n = B * K;
  TORCH_CHECK(L >= 4 && u.numel() == x.numel() && nu.numel() == n, "advance_rff: shapes");
  auto y = torch::empty({B, K}, x.options());
  auto s4 = torch::empty({B, K}, x.options());
  auto e2 = torch::empty({B, K}, x.options());
  py::gil_scoped_release nogil;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "advance_rff", [&] {
    using F = scalar_t;
    F* xp = x.data_ptr<F>();
    const F* up = u.data_ptr<F>();
    const F *sp = sd.data_ptr<F>(), *mp = mean.data_ptr<F>(), *ip = innov.data_ptr<F>(),
            *tp = theta.data_ptr<F>();
    F* s4p = s4.data_ptr<F>();
    F* e2p = e2.data_ptr<F>();
    const F pi = (F)3.14159265358979323846;
    for (int64_t r = 0; r < n; ++r) {
      F* xr = xp + r * L;
      const F* ur = up + r * L;
      for (int64_t l = 0; l < L; ++l) {
        F v = ur[l] * sp[r];
        v = v + mp[r];
        v = v * ip[r];
        F w = xr[l] * tp[r];
        xr[l] = w + v;
      }
      s4p[r] = xr[3] * pi;
      const F x2 = xr[1];
      e2p[r] = -(x2 * x2);
    }
    s4.sin_();
    e2.exp_();
    F* yp = y.data_ptr<F>();
    for (int64_t r = 0; r < n; ++r) {
      const F x1 = xp[r * L], sv = s4p[r];
      const F a = x1 * x1;
      yp[r] = a + sv * sv;
    }
    y.sqrt_();  // torch's square root (not always correctly rounded)
    const F* np = nu.data_ptr<F>();
    const F* nsp = noise_std.data_ptr<F>();
    const F c08 = (F)0.8, c05 = (F)0.5;
    for (int64_t r = 0; r < n; ++r) {
      const F x3 = xp[r * L + 2];
      const F a = yp[r];
      F h = c05 * e2p[r];
      h = c08 - h;
      h = h * x3;
      F v = a + h;
      F noise = np[r] * nsp[r];
      yp[r] = v + noise;
    }
  });
  return y;
}

// ------------------------------------------------------------------ uplink 'next' bookkeeping
// Downlink masks of the slots idx [B, P]: the pending uplink mask prev_T[prev_slot[b, k]] of a
// client that sent one, else the next fresh row (fresh [n, M], taken in slot order).
int64_t count_missing(torch::Tensor prev_slot, torch::Tensor idx) {
  TORCH_CHECK(prev_slot.is_contiguous() && idx.is_contiguous(), "contiguous inputs");
  const int64_t B = idx.size(0), P = idx.size(1), K = prev_slot.size(1);
  const int64_t* ps = prev_slot.data_ptr<int64_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) n += ps[b * K + ip[b * P + p]] < 0;
  return n;
}

void resolve_downlink(torch::Tensor prev_T, torch::Tensor prev_slot, torch::Tensor idx,
                      torch::Tensor fresh, torch::Tensor out) {
  TORCH_CHECK(prev_T.is_contiguous() && prev_slot.is_contiguous() && idx.is_contiguous() &&
              fresh.is_contiguous() && out.is_contiguous(), "contiguous inputs");
  const int64_t B = idx.size(0), P = idx.size(1), K = prev_slot.size(1), M = prev_T.size(1);
  TORCH_CHECK(prev_T.scalar_type() == out.scalar_type() &&
              (!fresh.numel() || fresh.scalar_type() == out.scalar_type()), "index dtypes");
  const int64_t es = (int64_t)out.element_size();  // int64 or int16 index lists
  const char* pt = static_cast<const char*>(prev_T.data_ptr());
  const int64_t* ps = prev_slot.data_ptr<int64_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const char* fr = fresh.numel() ? static_cast<const char*>(fresh.data_ptr()) : nullptr;
  const int64_t nf = fresh.numel() ? fresh.size(0) : 0;
  char* op = static_cast<char*>(out.data_ptr());
  int64_t q = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t src = ps[b * K + ip[b * P + p]];
      const char* row;
      if (src >= 0) {
        row = pt + src * M * es;
      } else {
        TORCH_CHECK(q < nf, "resolve_downlink: not enough fresh rows");
        row = fr + (q++) * M * es;
      }
      std::memcpy(op + (b * P + p) * M * es, row, M * es);
    }
}

void set_slots(torch::Tensor prev_slot, torch::Tensor idx) { set_slots_impl(prev_slot, idx); }

// ------------------------------------------------------------------ round-robin index lists
// out[b, p, j] = (offsets[b, idx[b, p]] + shift + j) mod D, j < M (int64 or int16)
torch::Tensor rr_masks(torch::Tensor offsets, torch::Tensor idx, int64_t shift, int64_t M,
                       int64_t D, bool i16) {
  TORCH_CHECK(offsets.is_contiguous() && idx.is_contiguous() &&
              offsets.scalar_type() == torch::kInt64, "rr_masks: inputs");
  const int64_t B = idx.size(0), P = idx.size(1), K = offsets.size(1);
  auto out = torch::empty({B, P, M}, i16 ? torch::kInt16 : torch::kInt64);
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  py::gil_scoped_release nogil;
  auto fill = [&](auto* o) {
    using I = std::remove_pointer_t<decltype(o)>;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t start = ((op[b * K + ip[b * P + p]] + shift) % D + D) % D;
        I* row = o + (b * P + p) * M;
        for (int64_t j = 0, v = start; j < M; ++j) {
          row[j] = (I)v;
          v = v + 1 == D ? 0 : v + 1;
        }
      }
  };
  if (i16)
    fill(out.data_ptr<int16_t>());
  else
    fill(out.data_ptr<int64_t>());
  return out;
}

// ------------------------------------------------------------------ global test MSE
// per run: pred_j = lane dot(tf[b, j, :], g[b, :]); returns mean((ty - pred)^2) in float64 with
// torch's ops for the difference, the conversion and the mean (as the engine's torch path)
torch::Tensor test_mse(torch::Tensor tf, torch::Tensor ty, torch::Tensor g) {
  TORCH_CHECK(tf.is_contiguous() && ty.is_contiguous() && g.is_contiguous(), "test_mse: inputs");
  const int64_t B = tf.size(0), N = tf.size(1), D = tf.size(2);
  auto pred = torch::empty({B, N}, tf.options());
  py::gil_scoped_release nogil;
  AT_DISPATCH_FLOATING_TYPES(tf.scalar_type(), "test_mse", [&] {
    using F = scalar_t;
    const F* tp = tf.data_ptr<F>();
    const F* gp = g.data_ptr<F>();
    F* pp = pred.data_ptr<F>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t j = 0;
      const F* gb = gp + b * D;
      for (; j + 4 <= N; j += 4) {
        const F* wp[4] = {gb, gb, gb, gb};
        const F* cp[4] = {tp + (b * N + j) * D, tp + (b * N + j + 1) * D,
                          tp + (b * N + j + 2) * D, tp + (b * N + j + 3) * D};
        lane_dots<F, 4>(wp, cp, D, pp + b * N + j);
      }
      for (; j < N; ++j) {
        const F* wp[1] = {gb};
        const F* cp[1] = {tp + (b * N + j) * D};
        lane_dots<F, 1>(wp, cp, D, pp + b * N + j);
      }
    }
  });
  auto r = (ty - pred).to(torch::kFloat64);
  return (r * r).mean(-1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("test_mse", &test_mse);
  mod.def("rr_masks", &rr_masks);
  mod.def("advance_rff", &advance_rff);
  mod.def("advance_rff_draw", &advance_rff_draw);
  mod.def("schedule_draw", &schedule_draw);
  mod.def("count_missing", &count_missing);
  mod.def("resolve_downlink", &resolve_downlink);
  mod.def("set_slots", &set_slots);
  mod.def("floyd_pcg", &floyd_pcg);
  mod.def("schedule_fixed", &schedule_fixed);
  mod.def("step", &step);
  mod.def("merge", &merge);
}
"""

_EXT = InlineExtension(
    "psfed_engine_kernels_v8", _CPP_SRC,
    extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off",
                  "-fno-fast-math"],
)


def load() -> Any:
    """The compiled module, or ``None`` (disabled, no compiler, or the build failed)."""
    return _EXT.get()


def available() -> bool:
    """Whether the compiled engine kernels can be used (builds them on first call)."""
    return load() is not None


def lane_dot_torch(w: Tensor, c: Tensor) -> Tensor:
    """``(w * c)`` summed over the last dim in the kernels' order (:data:`LANES` lanes, halving).

    Bit for bit what the compiled LMS step computes, with torch elementwise ops.
    """
    prod = w * c
    D = prod.shape[-1]
    acc = torch.zeros((*prod.shape[:-1], LANES), dtype=prod.dtype, device=prod.device)
    for s in range(0, D, LANES):
        width = min(LANES, D - s)
        acc[..., :width] += prod[..., s : s + width]
    h = LANES // 2
    while h >= 1:
        acc = acc[..., :h] + acc[..., h : 2 * h]
        h //= 2
    return acc[..., 0]
