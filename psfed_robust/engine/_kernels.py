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

import os
import threading
from typing import Any

import torch
from torch import Tensor

__all__ = ["LANES", "available", "lane_dot_torch", "load"]

#: lane accumulators of the LMS dot product (the documented summation order)
LANES = 32

_CPP_SRC = r"""
#include <torch/extension.h>
#include <ATen/ATen.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;
using u128 = unsigned __int128;
constexpr int64_t LANES = 32;

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
    for (int64_t q = 0; q < nraw; ++q) {
      const uint64_t r = next();
      out[4 * q] = (uint16_t)(r & 0xFFFF);
      out[4 * q + 1] = (uint16_t)((r >> 16) & 0xFFFF);
      out[4 * q + 2] = (uint16_t)((r >> 32) & 0xFFFF);
      out[4 * q + 3] = (uint16_t)(r >> 48);
    }
  }
};

// Floyd's algorithm for m of dim (dim <= 4096), rows in sub-chunks of 4096, exactly as
// psfed_robust.engine.masks._floyd's numpy path: all m draws of a sub-chunk first ([m, n]
// row-major words; Lemire 16-bit multiply-shift; rejected entries redrawn in rounds, in order),
// then the steps.
std::vector<torch::Tensor> floyd_pcg(int64_t rows, int64_t dim, int64_t m, torch::Tensor st,
                                     bool want_masks) {
  TORCH_CHECK(st.scalar_type() == torch::kInt64 && st.numel() == 4, "state: int64 [4]");
  TORCH_CHECK(dim >= 1 && dim <= 4096 && m >= 1 && m <= dim, "floyd_pcg: 1 <= m <= dim <= 4096");
  auto s = st.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  auto picks = torch::empty({rows, m}, torch::kInt64);
  auto masks = torch::empty({want_masks ? rows : 0, want_masks ? dim : 0}, torch::kBool);
  int64_t* pk = picks.data_ptr<int64_t>();
  uint8_t* mk = want_masks ? reinterpret_cast<uint8_t*>(masks.data_ptr<bool>()) : nullptr;
  {
    py::gil_scoped_release nogil;
    Pcg64 g{((u128)(uint64_t)sp[0] << 64) | (u128)(uint64_t)sp[1],
            ((u128)(uint64_t)sp[2] << 64) | (u128)(uint64_t)sp[3]};
    std::vector<uint32_t> hs(m), thr(m);
    for (int64_t i = 0; i < m; ++i) {
      hs[i] = (uint32_t)(dim - m + 1 + i);
      thr[i] = (65536u - hs[i]) % hs[i];
    }
    std::vector<uint16_t> w;
    std::vector<uint16_t> val;
    std::vector<int64_t> rej, rej2;
    std::vector<uint8_t> sel(dim);
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
        const uint16_t* wi = w.data() + i * n;
        uint16_t* vi = val.data() + i * VS;
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
      for (int64_t j = 0; j < n; ++j) {
        std::memset(sel.data(), 0, dim);
        int64_t* out = pk + (s0 + j) * m;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t t = val[i * VS + j];
          const int64_t pick = sel[t] ? dim - m + i : t;
          sel[pick] = 1;
          out[i] = pick;
        }
        if (mk) std::memcpy(mk + (s0 + j) * dim, sel.data(), dim);
      }
    }
  }
  return {picks, masks};
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

torch::Tensor schedule_fixed(torch::Tensor keys, int64_t P) {
  TORCH_CHECK(keys.dim() == 2 && keys.is_contiguous(), "keys: contiguous [B, K]");
  const int64_t B = keys.size(0), K = keys.size(1);
  TORCH_CHECK(P >= 1 && P <= K, "1 <= P <= K");
  auto out = torch::empty({B, P}, torch::kInt64);
  py::gil_scoped_release nogil;
  if (keys.scalar_type() == torch::kFloat32)
    sched_impl<float>(keys.data_ptr<float>(), B, K, P, out.data_ptr<int64_t>());
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

template <typename T>
static void lms_rows(T* W, const T* C, const T* y, T* e, const T* part, int64_t rows, int64_t D,
                     T mu_s, T scale, bool scaled) {
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
  };
  for (; r + 4 <= rows; r += 4) {
    const T* wp[4] = {W + r * D, W + (r + 1) * D, W + (r + 2) * D, W + (r + 3) * D};
    const T* cp[4] = {C + r * D, C + (r + 1) * D, C + (r + 2) * D, C + (r + 3) * D};
    lane_dots<T, 4>(wp, cp, D, dot);
    for (int q = 0; q < 4; ++q) finish(r + q, dot[q]);
  }
  for (; r < rows; ++r) {
    const T* wp[1] = {W + r * D};
    const T* cp[1] = {C + r * D};
    lane_dots<T, 1>(wp, cp, D, dot);
    finish(r, dot[0]);
  }
}

// W [B, K, D] (updated in place), y [B, K], e [B, K] (out), part [B, K] or empty.
// RFF (xa [B, K, L+1], ob [B, L+1, D] given): regressors cos(xa @ ob) of `chunk` runs at a time
// into z [chunk, K, D], with torch's bmm and cos. Otherwise c [B, K, D] are the regressors.
void lms(torch::Tensor W, torch::Tensor xa, torch::Tensor ob, torch::Tensor c, torch::Tensor y,
         torch::Tensor e, torch::Tensor part, torch::Tensor z, double mu_s, double scale,
         int64_t chunk) {
  TORCH_CHECK(W.dim() == 3 && W.is_contiguous() && y.is_contiguous() && e.is_contiguous(),
              "lms: contiguous W [B, K, D], y, e");
  const int64_t B = W.size(0), K = W.size(1), D = W.size(2);
  const bool rff = xa.defined() && xa.numel() > 0;
  const bool has_part = part.defined() && part.numel() > 0;
  const bool scaled = scale != 1.0;
  py::gil_scoped_release nogil;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "lms", [&] {
    using T = scalar_t;
    const T mu = (T)mu_s, sc = (T)scale;
    T* Wp = W.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    T* ep = e.data_ptr<T>();
    const T* pp = has_part ? part.data_ptr<T>() : nullptr;
    if (rff) {
      for (int64_t r0 = 0; r0 < B; r0 += chunk) {
        const int64_t nb = std::min(chunk, B - r0);
        auto zc = z.narrow(0, 0, nb);
        at::bmm_out(zc, xa.narrow(0, r0, nb), ob.narrow(0, r0, nb));
        zc.cos_();
        lms_rows<T>(Wp + r0 * K * D, zc.data_ptr<T>(), yp + r0 * K, ep + r0 * K,
                    pp ? pp + r0 * K : nullptr, nb * K, D, mu, sc, scaled);
      }
    } else {
      TORCH_CHECK(c.is_contiguous() && c.numel() == W.numel(), "lms: regressors like W");
      lms_rows<T>(Wp, c.data_ptr<T>(), yp, ep, pp, B * K, D, mu, sc, scaled);
    }
  });
}

// ------------------------------------------------------------------ downlink merge / server step
// valid: [B, P] bool or empty (every slot a participant)
void merge(torch::Tensor W, torch::Tensor g, torch::Tensor idx, torch::Tensor S,
           torch::Tensor valid) {
  const int64_t B = W.size(0), K = W.size(1), D = W.size(2), P = S.size(1), M = S.size(2);
  TORCH_CHECK(W.is_contiguous() && g.is_contiguous() && idx.is_contiguous() && S.is_contiguous(),
              "merge: contiguous inputs");
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* sp = S.data_ptr<int64_t>();
  const bool* vp = valid.numel() ? valid.data_ptr<bool>() : nullptr;
  py::gil_scoped_release nogil;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "merge", [&] {
    scalar_t* Wp = W.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* gb = gp + b * D;
      for (int64_t p = 0; p < P; ++p) {
        if (vp && !vp[b * P + p]) continue;
        scalar_t* w = Wp + (b * K + ip[b * P + p]) * D;
        const int64_t* s = sp + (b * P + p) * M;
        for (int64_t m = 0; m < M; ++m) w[s[m]] = gb[s[m]];
      }
    }
  });
}

// g + omega[b] * sum_p T_p (w_p - g), accumulated slot by slot, entry by entry; returns a new g.
torch::Tensor uplink_mean(torch::Tensor W, torch::Tensor g, torch::Tensor idx, torch::Tensor T,
                          torch::Tensor omega, torch::Tensor valid) {
  const int64_t B = W.size(0), K = W.size(1), D = W.size(2), P = T.size(1), M = T.size(2);
  TORCH_CHECK(W.is_contiguous() && g.is_contiguous() && idx.is_contiguous() && T.is_contiguous()
              && omega.is_contiguous() && omega.numel() == B, "uplink_mean: inputs");
  auto out = torch::empty_like(g);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* tp = T.data_ptr<int64_t>();
  const bool* vp = valid.numel() ? valid.data_ptr<bool>() : nullptr;
  py::gil_scoped_release nogil;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "uplink_mean", [&] {
    using S = scalar_t;
    const S* Wp = W.data_ptr<S>();
    const S* gp = g.data_ptr<S>();
    const S* op = omega.data_ptr<S>();
    S* outp = out.data_ptr<S>();
    std::vector<S> acc(D);
    for (int64_t b = 0; b < B; ++b) {
      const S* gb = gp + b * D;
      std::fill(acc.begin(), acc.end(), S(0));
      for (int64_t p = 0; p < P; ++p) {
        if (vp && !vp[b * P + p]) continue;
        const S* w = Wp + (b * K + ip[b * P + p]) * D;
        const int64_t* t = tp + (b * P + p) * M;
        for (int64_t m = 0; m < M; ++m) acc[t[m]] += w[t[m]] - gb[t[m]];
      }
      const S om = op[b];
      S* ob = outp + b * D;
      for (int64_t d = 0; d < D; ++d) ob[d] = gb[d] + acc[d] * om;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("floyd_pcg", &floyd_pcg);
  mod.def("schedule_fixed", &schedule_fixed);
  mod.def("lms", &lms);
  mod.def("merge", &merge);
  mod.def("uplink_mean", &uplink_mean);
}
"""

_lock = threading.Lock()
_module: Any = None
_failed = False


def load() -> Any:
    """The compiled module, or ``None`` (disabled, no compiler, or the build failed)."""
    global _module, _failed
    if os.environ.get("PSFED_NO_CPP_KERNEL", "") not in ("", "0"):
        return None
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        try:
            from torch.utils.cpp_extension import load_inline

            _module = load_inline(
                name="psfed_engine_kernels_v1",
                cpp_sources=_CPP_SRC,
                extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512",
                              "-ffp-contract=off", "-fno-fast-math"],
                verbose=False,
            )
        except Exception:  # no compiler, no ninja, sandbox...: the torch paths are always there
            _failed = True
            _module = None
    return _module


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
