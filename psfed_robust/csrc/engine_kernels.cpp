// Optional CPU accelerators of the batched online engine (psfed_robust/engine/kernels.py).
//
// Each function sits behind an engine function whose torch/numpy form is the reference:
//
// * psfed_floyd_pcg  — psfed_robust.engine.masks.floyd_indices' CPU sampler: numpy's PCG64 raw
//   words, 16-bit Lemire multiply-shift with rejection, Floyd's steps; the same draws and picks
//   as the numpy path (integers: equal, not merely close).
// * psfed_lms_rff_f32 — the engine's local update on P1's task (float32): per client, the random
//   Fourier regressors c = cos(omega^T x + b), the a-priori error e = y - s (w^T c), and the LMS
//   step w <- w + (mu s e [part]) c. The reference is LocalStep's torch path (baddbmm, cos_,
//   linalg.vecdot, addcmul_); this one sums the dot product in 16 lanes and uses a Cody-Waite +
//   degree-12 polynomial cosine (absolute error <= 3e-7 for |a| <= 1e4), so results agree within
//   float32 rounding (tests: 2e-5 relative per step), not bit for bit. NaN/Inf propagate as in
//   the reference: cos(+-Inf) and cos(NaN) are NaN, and a NaN or Inf in w, x or y reaches e and w.
//
// Plain C-style C++ (no exceptions, no STL, no torch or Python headers) compiled into a shared
// library loaded with ctypes (psfed_robust._cpp.CLibrary): builds in about a second, and its
// cache key is the source, the compiler and the CPU, never the Python environment. The calls
// release the GIL (ctypes) and use one thread each (the engine runs blocks in threads).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 u128;

// ------------------------------------------------------------------ numpy's PCG64 (XSL-RR 128/64)
struct Pcg64 {
  u128 state, inc;
};

// bit_generator.random_raw((count + 3) // 4).view(np.uint16)[:count]: little-endian 16-bit words
static void pcg_words(Pcg64* g, uint16_t* out, int64_t count) {
  const int64_t nraw = (count + 3) / 4;
  const u128 mult = ((u128)0x2360ED051FC65DA4ULL << 64) | (u128)0x4385DF649FCCF645ULL;
  u128 st = g->state;
  for (int64_t q = 0; q < nraw; ++q) {
    st = st * mult + g->inc;
    const uint64_t x = (uint64_t)(st >> 64) ^ (uint64_t)st;
    const unsigned rot = (unsigned)(st >> 122);
    const uint64_t r = (x >> rot) | (x << ((64u - rot) & 63u));
    out[4 * q] = (uint16_t)(r & 0xFFFF);
    out[4 * q + 1] = (uint16_t)((r >> 16) & 0xFFFF);
    out[4 * q + 2] = (uint16_t)((r >> 32) & 0xFFFF);
    out[4 * q + 3] = (uint16_t)(r >> 48);
  }
  g->state = st;
}

// Floyd's algorithm for m of dim (1 <= m <= dim <= 4096), rows in sub-chunks of 4096, exactly as
// the numpy path of psfed_robust.engine.masks._floyd: all m draws of a sub-chunk first ([m, n]
// row-major words; Lemire 16-bit multiply-shift; rejected entries redrawn in rounds, in order),
// then the m steps of each row. state: the PCG64 (state hi, state lo, inc hi, inc lo).
// picks: int64 [rows, m]; masks: NULL or uint8 [rows, dim]. Returns 0, or -1 when out of memory
// or the sizes are out of range.
extern "C" int psfed_floyd_pcg(int64_t rows, int64_t dim, int64_t m, const uint64_t* state,
                               int64_t* picks, uint8_t* masks) {
  if (dim < 1 || dim > 4096 || m < 1 || m > dim || rows < 0) return -1;
  Pcg64 g;
  g.state = ((u128)state[0] << 64) | (u128)state[1];
  g.inc = ((u128)state[2] << 64) | (u128)state[3];
  const int64_t SUB = 4096;
  const int64_t n_max = rows < SUB ? rows : SUB;
  const int64_t words_cap = m * n_max + 4;
  // val[i * VS + j]: step i's draw for row j; rows padded by 32 entries so that the m draws of
  // one row do not fall into the same L1 set (a stride of 4096 uint16 would)
  const int64_t VS = n_max + 32;
  uint32_t* hs = (uint32_t*)malloc(sizeof(uint32_t) * m);
  uint32_t* thr = (uint32_t*)malloc(sizeof(uint32_t) * m);
  uint16_t* w = (uint16_t*)malloc(sizeof(uint16_t) * words_cap);
  uint16_t* val = (uint16_t*)malloc(sizeof(uint16_t) * (m * VS + 1));
  int64_t* rej = (int64_t*)malloc(sizeof(int64_t) * (m * n_max + 1));
  int64_t* rej2 = (int64_t*)malloc(sizeof(int64_t) * (m * n_max + 1));
  uint8_t* sel = (uint8_t*)malloc((size_t)(4 * dim));
  int rc = 0;
  if (!hs || !thr || !w || !val || !rej || !rej2 || !sel) {
    rc = -1;
    goto done;
  }
  for (int64_t i = 0; i < m; ++i) {
    hs[i] = (uint32_t)(dim - m + 1 + i);
    thr[i] = (65536u - hs[i]) % hs[i];
  }
  for (int64_t s0 = 0; s0 < rows; s0 += SUB) {
    const int64_t n = rows - s0 < SUB ? rows - s0 : SUB;
    pcg_words(&g, w, m * n);
    int64_t nrej = 0;
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t h = hs[i], t = thr[i];
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t p = (uint32_t)w[i * n + j] * h;
        val[i * VS + j] = (uint16_t)(p >> 16);
        if ((p & 0xFFFFu) < t) rej[nrej++] = i * n + j;
      }
    }
    while (nrej) {  // rejected entries in [m, n] row-major order, one fresh word each, in rounds
      pcg_words(&g, w, nrej);
      int64_t nrej2 = 0;
      for (int64_t q = 0; q < nrej; ++q) {
        const int64_t idx = rej[q], i = idx / n, j = idx % n;
        const uint32_t p = (uint32_t)w[q] * hs[i];
        if ((p & 0xFFFFu) >= thr[i]) val[i * VS + j] = (uint16_t)(p >> 16);
        else rej2[nrej2++] = idx;
      }
      int64_t* tmp = rej;
      rej = rej2;
      rej2 = tmp;
      nrej = nrej2;
    }
    int64_t j = 0;
    if (!masks) {  // four rows interleaved (independent chains), each exactly as below
      for (; j + 4 <= n; j += 4) {
        memset(sel, 0, (size_t)(4 * dim));
        int64_t* o0 = picks + (s0 + j) * m;
        for (int64_t i = 0; i < m; ++i) {
          const uint16_t* v = val + i * VS + j;
          const int64_t jj = dim - m + i;
          for (int q = 0; q < 4; ++q) {
            uint8_t* sq = sel + q * dim;
            const int64_t t = v[q];
            const int64_t pick = sq[t] ? jj : t;
            sq[pick] = 1;
            o0[q * m + i] = pick;
          }
        }
      }
    }
    for (; j < n; ++j) {
      memset(sel, 0, (size_t)dim);
      int64_t* out = picks + (s0 + j) * m;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t t = val[i * VS + j];
        const int64_t pick = sel[t] ? dim - m + i : t;  // t taken: pick j = dim - m + i
        sel[pick] = 1;
        out[i] = pick;
      }
      if (masks) memcpy(masks + (s0 + j) * dim, sel, (size_t)dim);
    }
  }
done:
  free(hs);
  free(thr);
  free(w);
  free(val);
  free(rej);
  free(rej2);
  free(sel);
  return rc;
}

// ------------------------------------------------------------------ LMS step on RFF regressors
// cos(a): q = round(a / pi), r = a - q pi (three-part Cody-Waite), even Taylor polynomial of
// degree 12 in r, sign (-1)^q. Branch-free so that the compiler vectorizes the loop over d.
static inline float cos_rff(float a) {
  const float INV_PI = 0.318309886183790671537767526745028724f;
  const float MAGIC = 12582912.0f;  // 1.5 * 2^23: (t + MAGIC) - MAGIC rounds t to an integer
  const float PA = 3.140625f, PB = 9.67502593994140625e-4f, PC = 1.509957990978376432e-7f;
  float q = a * INV_PI + MAGIC;
  q = q - MAGIC;
  float r = a - q * PA;
  r = r - q * PB;
  r = r - q * PC;
  const float r2 = r * r;
  float c = r2 * (1.0f / 479001600.0f) + (-1.0f / 3628800.0f);
  c = c * r2 + (1.0f / 40320.0f);
  c = c * r2 + (-1.0f / 720.0f);
  c = c * r2 + (1.0f / 24.0f);
  c = c * r2 + (-0.5f);
  c = c * r2 + 1.0f;
  int32_t qi = (int32_t)q;
  uint32_t bits;
  memcpy(&bits, &c, 4);
  bits ^= ((uint32_t)qi & 1u) << 31;
  memcpy(&c, &bits, 4);
  return c;
}

#define PSFED_LANES 16

// One row, multi-pass: c = omega^T x + b, c = cos(c), returns w . c (16 lanes). Any L.
static inline float rff_row_any(int64_t L, int64_t D, const float* __restrict xk,
                                const float* __restrict om, const float* __restrict bb,
                                const float* __restrict wk, float* __restrict cc) {
  for (int64_t d = 0; d < D; ++d) cc[d] = bb[d] + xk[0] * om[d];
  for (int64_t l = 1; l < L; ++l) {
    const float xl = xk[l];
    const float* __restrict ol = om + l * D;
    for (int64_t d = 0; d < D; ++d) cc[d] += xl * ol[d];
  }
  for (int64_t d = 0; d < D; ++d) cc[d] = cos_rff(cc[d]);
  float acc[PSFED_LANES];
  for (int j = 0; j < PSFED_LANES; ++j) acc[j] = 0.0f;
  int64_t d = 0;
  for (; d + PSFED_LANES <= D; d += PSFED_LANES)
    for (int j = 0; j < PSFED_LANES; ++j) acc[j] += wk[d + j] * cc[d + j];
  for (int j = 0; d + j < D; ++j) acc[j] += wk[d + j] * cc[d + j];
  for (int h = PSFED_LANES / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) acc[j] += acc[j + h];
  return acc[0];
}

// The same row in one pass over d for a compile-time L (the regressors stay in registers; about
// 15% faster at P1's L = 4). The same operations in the same order: bit-identical results.
template <int LC>
static inline float rff_row(int64_t D, const float* __restrict xk, const float* __restrict om,
                            const float* __restrict bb, const float* __restrict wk,
                            float* __restrict cc) {
  float xs[LC];
  for (int l = 0; l < LC; ++l) xs[l] = xk[l];
  float acc[PSFED_LANES];
  for (int j = 0; j < PSFED_LANES; ++j) acc[j] = 0.0f;
  int64_t d = 0;
  for (; d + PSFED_LANES <= D; d += PSFED_LANES)
    for (int j = 0; j < PSFED_LANES; ++j) {
      float a = bb[d + j] + xs[0] * om[d + j];
      for (int l = 1; l < LC; ++l) a += xs[l] * om[l * D + d + j];
      const float cv = cos_rff(a);
      cc[d + j] = cv;
      acc[j] += wk[d + j] * cv;
    }
  for (int j = 0; d + j < D; ++j) {
    float a = bb[d + j] + xs[0] * om[d + j];
    for (int l = 1; l < LC; ++l) a += xs[l] * om[l * D + d + j];
    const float cv = cos_rff(a);
    cc[d + j] = cv;
    acc[j] += wk[d + j] * cv;
  }
  for (int h = PSFED_LANES / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) acc[j] += acc[j + h];
  return acc[0];
}

template <int LC>
static void lms_rff_rows(int64_t B, int64_t K, int64_t L, int64_t D, float* W, const float* x,
                         const float* omega, const float* bias, const float* y,
                         const float* part, float mu_s, float scale, float* e, float* c) {
  for (int64_t r = 0; r < B; ++r) {
    const float* om = omega + r * L * D;
    const float* bb = bias + r * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = r * K + k;
      float* __restrict wk = W + row * D;
      const float* xk = x + row * L;
      const float dot = LC > 0 ? rff_row<(LC > 0 ? LC : 1)>(D, xk, om, bb, wk, c)
                               : rff_row_any(L, D, xk, om, bb, wk, c);
      const float er = y[row] - dot * scale;
      e[row] = er;
      float coef = er * mu_s;
      if (part) coef *= part[row];
      for (int64_t q = 0; q < D; ++q) wk[q] += coef * c[q];
    }
  }
}

// W [B, K, D] (updated in place), x [B, K, L], omega [B, L, D], b [B, D], y [B, K],
// part NULL or [B, K] (0/1 factors of the step), e [B, K] (the a-priori errors, written).
// All contiguous float32. w <- w + (mu_s e part) c with e = y - scale (w^T c).
extern "C" void psfed_lms_rff_f32(int64_t B, int64_t K, int64_t L, int64_t D, float* W,
                                  const float* x, const float* omega, const float* bias,
                                  const float* y, const float* part, float mu_s, float scale,
                                  float* e) {
  float* c = (float*)malloc(sizeof(float) * (size_t)(D + PSFED_LANES));
  if (!c) abort();  // 1 KB: no recovery path worth having
  switch (L) {  // P1's task: L = 4 inputs
    case 4: lms_rff_rows<4>(B, K, L, D, W, x, omega, bias, y, part, mu_s, scale, e, c); break;
    default: lms_rff_rows<0>(B, K, L, D, W, x, omega, bias, y, part, mu_s, scale, e, c);
  }
  free(c);
}
