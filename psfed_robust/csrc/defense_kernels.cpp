// Column kernels of the coordinate-wise defenses (median, trimmed mean, Bulyan): a vectorised
// Batcher odd-even merge sorting network applied to 64 adjacent columns at a time (SIMD
// compare-exchange in L1), optionally reduced to the mean of a rank window in the same pass.
// Python side, the torch reference and the NaN/Inf policy: defenses/_kernels.py. Built by
// psfed_robust/_cpp.py (TorchExtension), which defines TORCH_EXTENSION_NAME.
//
// NaN/Inf policy (the torch reference's, torch.sort): -inf < finite < +inf < NaN, every NaN
// (either sign) above +inf. std::min/std::max are not a total order with NaN (both return their
// first argument), so a tile holding a NaN is sorted with a comparator that orders NaN last.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
#include <vector>

// NanAware: the compare-exchange orders NaN last (a blend per element); without NaN in the
// tile, plain min/max (about 1.5x faster) give the same result.
template <typename T, int64_t B, bool NanAware>
static inline void sort_block(T* __restrict buf, int64_t stride, const int32_t* pairs,
                              int64_t P) {
  for (int64_t p = 0; p < P; ++p) {
    T* __restrict pa = buf + (int64_t)pairs[2 * p] * stride;
    T* __restrict pb = buf + (int64_t)pairs[2 * p + 1] * stride;
#pragma omp simd
    for (int64_t j = 0; j < B; ++j) {
      const T a = pa[j], b = pb[j];
      if constexpr (NanAware) {
        const bool swap = (b < a) | (a != a);  // a NaN goes up; b NaN (or a <= b) stays
        pa[j] = swap ? b : a;
        pb[j] = swap ? a : b;
      } else {
        pa[j] = std::min(a, b);
        pb[j] = std::max(a, b);
      }
    }
  }
}

// Whether the K rows x w live columns of a tile hold a NaN.
template <typename T>
static inline bool tile_has_nan(const T* tile, int64_t stride, int64_t K, int64_t w) {
  int any = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T* row = tile + k * stride;
#pragma omp simd reduction(| : any)
    for (int64_t j = 0; j < w; ++j) any |= (row[j] != row[j]);
  }
  return any != 0;
}

// mode 0: write the sorted columns to out[R, K, D]
// mode 1: write mean of sorted ranks [lo, hi) per column to out[R, D]
// Columns are read in tiles of TB (long contiguous row segments, L2-resident; the row stride is
// padded by one cache line so the K rows of a block do not alias in L1), then sorted in place in
// blocks of B columns (a [K, B] block stays in L1; every comparator is SIMD over B columns).
template <typename T, int64_t B>
static void run(const T* in, T* out, int64_t R, int64_t K, int64_t D, const int32_t* pairs,
                int64_t P, int mode, const int32_t* lo, const int32_t* hi, bool lo_scalar) {
  constexpr int64_t TB = 16 * B;
  constexpr int64_t TS = TB + 64 / sizeof(T);
  const int64_t nt = (D + TB - 1) / TB;
  const int64_t ntasks = R * nt;
  // Dynamic scheduling over tiles: on a shared (busy) machine a thread that gets less CPU time
  // simply takes fewer tiles instead of stalling the whole call (static halves would).
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> tile_store(K * TS, T(0));
    T* tile = tile_store.data();
    T acc[B];
    int32_t lb[B], hb[B];
#pragma omp for schedule(dynamic, 2)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t r = t / nt, t0 = (t % nt) * TB, tw = std::min(TB, D - t0);
      const T* src = in + r * K * D + t0;
      for (int64_t k = 0; k < K; ++k) std::memcpy(tile + k * TS, src + k * D, tw * sizeof(T));
      const bool nan = tile_has_nan(tile, TS, K, tw);
      for (int64_t b0 = 0; b0 < tw; b0 += B) {
        const int64_t w = std::min(B, tw - b0);
        T* buf = tile + b0;  // columns past tw hold stale values: sorted, never written out
        if (nan)
          sort_block<T, B, true>(buf, TS, pairs, P);
        else
          sort_block<T, B, false>(buf, TS, pairs, P);
        const int64_t c0 = t0 + b0;
        if (mode == 0) {
          T* dst = out + r * K * D + c0;
          for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * D, buf + k * TS, w * sizeof(T));
        } else {
          const int64_t ls = lo_scalar ? 0 : 1;  // lo/hi: one value, or one per column
          const int32_t* l = lo + (r * D + c0) * ls;
          const int32_t* h = hi + (r * D + c0) * ls;
          int32_t kmin = (int32_t)K, kmax = 0;
          for (int64_t j = 0; j < B; ++j) {
            lb[j] = j < w ? l[j * ls] : 0;
            hb[j] = j < w ? h[j * ls] : 1;
            acc[j] = T(0);
            kmin = std::min(kmin, lb[j]);
            kmax = std::max(kmax, hb[j]);
          }
          for (int64_t k = std::max<int32_t>(kmin, 0); k < std::min<int64_t>(kmax, K); ++k) {
            const T* row = buf + k * TS;
#pragma omp simd
            for (int64_t j = 0; j < B; ++j) {
              acc[j] += (k >= lb[j] && k < hb[j]) ? row[j] : T(0);
            }
          }
          T* dst = out + r * D + c0;
          for (int64_t j = 0; j < w; ++j) dst[j] = acc[j] / T(hb[j] - lb[j]);
        }
      }
    }
  }
}

template <typename T>
static void dispatch(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& pairs,
                     int mode, const int32_t* lo, const int32_t* hi, bool lo_scalar) {
  const int64_t R = x.size(0), K = x.size(1), D = x.size(2), P = pairs.size(0);
  run<T, 64>(x.data_ptr<T>(), out.data_ptr<T>(), R, K, D, pairs.data_ptr<int32_t>(), P, mode,
             lo, hi, lo_scalar);
}

static void check(const torch::Tensor& x, const torch::Tensor& pairs) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous [R, K, D] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64,
              "x must be float32 or float64");
  TORCH_CHECK(pairs.scalar_type() == torch::kInt32 && pairs.is_contiguous(), "pairs: int32");
}

torch::Tensor sort_columns(torch::Tensor x, torch::Tensor pairs) {
  check(x, pairs);
  auto out = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat32)
    dispatch<float>(x, out, pairs, 0, nullptr, nullptr, false);
  else
    dispatch<double>(x, out, pairs, 0, nullptr, nullptr, false);
  return out;
}

torch::Tensor window_mean(torch::Tensor x, torch::Tensor pairs, torch::Tensor lo,
                          torch::Tensor hi) {
  check(x, pairs);
  TORCH_CHECK(lo.scalar_type() == torch::kInt32 && hi.scalar_type() == torch::kInt32 &&
              lo.is_contiguous() && hi.is_contiguous(), "lo/hi: contiguous int32");
  const bool sc = lo.numel() == 1 && hi.numel() == 1;
  TORCH_CHECK(sc || (lo.numel() == x.size(0) * x.size(2) && hi.numel() == lo.numel()),
              "lo/hi: one value or [R, D]");
  auto out = torch::empty({x.size(0), x.size(2)}, x.options());
  if (x.scalar_type() == torch::kFloat32)
    dispatch<float>(x, out, pairs, 1, lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), sc);
  else
    dispatch<double>(x, out, pairs, 1, lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), sc);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sort_columns", &sort_columns, "sort each column of x[R, K, D] along K (NaN last)");
  m.def("window_mean", &window_mean, "per column, mean of the sorted ranks [lo, hi)");
}
