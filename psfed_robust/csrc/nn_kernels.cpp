// Optional CPU accelerator of the batched NN engine's local training (psfed_robust/nn/kernels.py).
//
// psfed_mlp_sgd_f32 runs one round of local minibatch SGD with momentum / weight decay for a set
// of client rows of a multilayer perceptron (Linear layers with ReLU between them, on flattened
// inputs), float32. Its reference is the torch fused path of psfed_robust.nn.train.train_rows
// (psfed_robust.nn.fused.FusedModel.grad_blocks + torch.optim.SGD's update on parameter blocks):
// the same batches, the same weighted cross-entropy gradient (softmax - onehot, scaled by each
// example's weight over the row's weight sum), the same update g <- grad + wd w, b <- g + mu b,
// w <- w - lr b on the steps a row is active. It differs only in summation order and in a
// polynomial exp (relative error ~1e-7), so results agree within float32 rounding
// (tests/test_nn_kernels.py), not bit for bit. NaN/Inf propagate as in the reference: the
// softmax is computed as exp(z - max z) / sum exactly as the torch path does (a NaN or +Inf logit
// makes its example's whole gradient column NaN), ReLU keeps NaN, and its backward zeroes the
// gradient where the activation is <= 0 (threshold_backward).
//
// Why it exists: on small models one step of all rows in torch is ~25 kernel launches of a few
// microseconds of arithmetic each; here each row runs all of its steps with its weights, momentum
// and batch in L1/L2 cache. Layout per row and step: activations are kept transposed [features x
// batch] (batch padded to a multiple of 16 lanes) so the forward pass and the input gradient are
// register-blocked outer products of weight scalars and batch vectors; the weight gradients
// dW[o, :] = sum_i dZ[o, i] A[i, :] read the example-major activations (the input rows in place,
// hidden activations transposed once per step).
//
// The same library evaluates MLPs on the test set (psfed_mlp_eval_f32) and draws the batch
// orders of psfed_robust.nn.train.batch_plan exactly as torch.randperm does (psfed_batch_plan).
//
// Plain C-style C++ (no exceptions, no STL, no torch or Python headers) loaded with ctypes
// (psfed_robust._cpp.CLibrary): the call releases the GIL; rows (and test chunks) are split into
// parts run in parallel by run_parts below (independent, so the result does not depend on the
// split).

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i16v __attribute__((vector_size(64)));

static inline v16 ld(const float* p) { return *(const v16u*)p; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }
static inline v16 splat(float x) { return (v16){} + x; }
// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses
// it (one load per FMA), which makes the register-blocked loops load-bound.
#define in_register(v) __asm__("" : "+v"(v))

#define VL 16
#define MAX_LAYERS 16

// exp on 16 lanes (Cephes expf): x clamped to [-87.34, 88] (NaN stays NaN), round-to-nearest
// split x = n ln2 + r, a degree-6 polynomial for e^r, 2^n from the exponent bits.
static inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.3365447505531f), hi = splat(88.0f);
  x = x < lo ? lo : x;  // NaN: the comparison is false, NaN is kept
  x = x > hi ? hi : x;
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 t = x * splat(1.44269504088896341f) + magic;
  v16 n = t - magic;
  v16 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  i16v e = __builtin_convertvector(n, i16v);
  e = (e + 127) << 23;
  v16 s;
  memcpy(&s, &e, sizeof s);
  return p * s;
}

// In-register transpose of a 16 x 16 block (r[i][k] -> r[k][i]): four stages, stage b swapping
// bit b of the row index with bit b of the column index by two-source shuffles of row pairs.
static inline void transpose16(v16 r[16]) {
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    const int h = 1 << b;
    i16v m0, m1;
    for (int k = 0; k < 16; ++k) {
      m0[k] = (k & h) ? 16 + (k - h) : k;  // low row: its own k (bit clear), else partner's k-h
      m1[k] = (k & h) ? 16 + k : k + h;    // high row: own k (bit set), else low row's k+h
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & h) continue;
      const v16 lo = r[i], hi = r[i + h];
      r[i] = __builtin_shuffle(lo, hi, m0);
      r[i + h] = __builtin_shuffle(lo, hi, m1);
    }
  }
}

// dst[k * ld_dst + i] = rows[i][k] for i < n (<= 16; rows past n read as zeros), k < 16.
static inline void gather_block(const float* const* rows, int64_t n, int64_t k0, float* dst,
                                int64_t ld_dst) {
  v16 r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < n ? ld(rows[i] + k0) : splat(0.0f);
  transpose16(r);
#pragma GCC unroll 16
  for (int k = 0; k < 16; ++k) st(dst + k * ld_dst, r[k]);
}

// dst[j * ld + i] = rows[i][j] for j < m and i < n_pad (rows past n read as zeros): 16 x 16
// blocks through registers, scalar tails. The batch's feature-major copy (n examples padded to
// n_pad lanes) and the hidden activations' example-major copy (n = n_pad features) both use it.
static void transpose_rows(const float* const* rows, int64_t n, int64_t n_pad, int64_t m,
                           float* dst, int64_t ld) {
  const int64_t n16 = n_pad / VL * VL, m16 = m / VL * VL;
  for (int64_t i0 = 0; i0 < n16; i0 += VL)
    for (int64_t j0 = 0; j0 < m16; j0 += VL)
      gather_block(rows + i0, n - i0, j0, dst + j0 * ld + i0, ld);
  for (int64_t j = m16; j < m; ++j)
    for (int64_t i = 0; i < n_pad; ++i) dst[j * ld + i] = i < n ? rows[i][j] : 0.0f;
  for (int64_t i = n16; i < n_pad; ++i)
    for (int64_t j = 0; j < m16; ++j) dst[j * ld + i] = i < n ? rows[i][j] : 0.0f;
}

// ------------------------------------------------------------------ parallel parts
// run_parts(fn, ctx, parts, ...) calls fn(ctx, p) for p < parts, in parallel. torch's CPU ops run
// in libgomp's thread pool, whose idle threads spin for a while after each parallel region;
// threads of our own would compete with them for the cores, so when the caller passes libgomp's
// entry points (GOMP_parallel, the ABI of `#pragma omp parallel`, and omp_get_thread_num) the
// parts run on that same team; otherwise on POSIX threads (the calling thread takes part 0). A
// part no thread could take runs on the calling thread afterwards. Parts never share memory, so
// results do not depend on how they are spread.
typedef void (*PartFn)(void*, int64_t);
typedef void (*GompParallel)(void (*)(void*), void*, unsigned, unsigned);
typedef int (*OmpThreadNum)(void);
#define MAX_PARTS 64

struct PartCall {
  PartFn fn;
  void* ctx;
  int64_t part;
  int done;
};

struct TeamCall {
  PartCall* calls;
  OmpThreadNum thread_num;
  int64_t parts;
};

static void team_call(void* arg) {
  TeamCall* T = (TeamCall*)arg;
  const int t = T->thread_num();
  if (t >= 0 && t < T->parts) {
    PartCall* c = &T->calls[t];
    c->fn(c->ctx, c->part);
    c->done = 1;
  }
}

static void* thread_call(void* arg) {
  PartCall* c = (PartCall*)arg;
  c->fn(c->ctx, c->part);
  c->done = 1;
  return nullptr;
}

static void run_parts(PartFn fn, void* ctx, int64_t parts, void* gomp_parallel,
                      void* omp_thread_num) {
  if (parts > MAX_PARTS) parts = MAX_PARTS;
  PartCall calls[MAX_PARTS];
  for (int64_t p = 0; p < parts; ++p) calls[p] = PartCall{fn, ctx, p, 0};
  if (parts > 1 && gomp_parallel && omp_thread_num) {
    TeamCall team = {calls, (OmpThreadNum)omp_thread_num, parts};
    ((GompParallel)gomp_parallel)(team_call, &team, (unsigned)parts, 0u);
  } else if (parts > 1) {
    pthread_t tid[MAX_PARTS];
    int started[MAX_PARTS] = {0};
    for (int64_t p = 1; p < parts; ++p)
      started[p] = pthread_create(&tid[p], nullptr, thread_call, &calls[p]) == 0;
    thread_call(&calls[0]);
    for (int64_t p = 1; p < parts; ++p)
      if (started[p]) pthread_join(tid[p], nullptr);
  }
  for (int64_t p = 0; p < parts; ++p)
    if (!calls[p].done) thread_call(&calls[p]);
}

struct Layer {
  int64_t in, out, w_off, b_off;  // b_off < 0: no bias
  int relu;                        // ReLU after this layer's output
};

// The layers of an int64 [nl, 5] spec (in, out, weight offset, bias offset or -1, ReLU after),
// checked against P parameters and chained; returns the largest width, or -1 when invalid.
static int64_t parse_layers(int64_t nl, const int64_t* spec, int64_t P, Layer* L) {
  if (nl < 1 || nl > MAX_LAYERS) return -1;
  int64_t maxdim = 0;
  for (int64_t l = 0; l < nl; ++l) {
    const int64_t* s = spec + 5 * l;
    L[l].in = s[0];
    L[l].out = s[1];
    L[l].w_off = s[2];
    L[l].b_off = s[3];
    L[l].relu = (int)s[4];
    if (L[l].in < 1 || L[l].out < 1 || L[l].w_off < 0 || L[l].w_off + L[l].in * L[l].out > P ||
        L[l].b_off + L[l].out > P || (l > 0 && L[l].in != L[l - 1].out))
      return -1;
    if (L[l].in > maxdim) maxdim = L[l].in;
    if (L[l].out > maxdim) maxdim = L[l].out;
  }
  return maxdim;
}

// The register-blocked core of the forward pass and the input gradient:
// acc[q][c] += s[q * sq + t * st] * v[t * vs + c * 16 : +16] for t < T (OB scalars of a weight
// matrix against CB lane-vectors of a feature-major activation row, per t).
template <int OB, int CB>
static inline __attribute__((always_inline)) void outer_acc(v16 (&acc)[OB][CB], const float* s,
                                                            int64_t sq, int64_t st,
                                                            const float* v, int64_t vs,
                                                            int64_t T) {
  for (int64_t t = 0; t < T; ++t) {
    v16 a[CB];
    const float* vp = v + t * vs;
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) {
      v16 x = ld(vp + c * VL);
      in_register(x);
      a[c] = x;
    }
#pragma GCC unroll 8
    for (int q = 0; q < OB; ++q) {
      const float wq = s[q * sq + t * st];
#pragma GCC unroll 4
      for (int c = 0; c < CB; ++c) acc[q][c] += wq * a[c];
    }
  }
}

// ------------------------------------------------------------------ forward: ZT = W AT + b
// AT [in x nb], ZT [out x nb]; OB outputs x CB lane-vectors per register block.
template <int OB, int CB>
static inline void fwd_block(const float* W, const float* bias, int64_t in, const float* AT,
                             int64_t nb, float* ZT, int64_t o0, int64_t c0, int relu) {
  v16 acc[OB][CB];
#pragma GCC unroll 8
  for (int q = 0; q < OB; ++q) {
    const float b = bias ? bias[o0 + q] : 0.0f;
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) acc[q][c] = splat(b);
  }
  outer_acc<OB, CB>(acc, W + o0 * in, in, 1, AT + c0, nb, in);  // scalars W[o0 + q, t]
  const v16 zero = splat(0.0f);
#pragma GCC unroll 8
  for (int q = 0; q < OB; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) {
      v16 v = acc[q][c];
      if (relu) v = v < zero ? zero : v;  // torch.relu: NaN kept
      st(ZT + (o0 + q) * nb + c0 + c * VL, v);
    }
}

template <int CB>
static void fwd_cols(const Layer& L, const float* w, const float* AT, int64_t nb, float* ZT,
                     int64_t c0) {
  const float* W = w + L.w_off;
  const float* bias = L.b_off >= 0 ? w + L.b_off : nullptr;
  int64_t o = 0;
  for (; o + 8 <= L.out; o += 8) fwd_block<8, CB>(W, bias, L.in, AT, nb, ZT, o, c0, L.relu);
  for (; o + 4 <= L.out; o += 4) fwd_block<4, CB>(W, bias, L.in, AT, nb, ZT, o, c0, L.relu);
  for (; o < L.out; ++o) fwd_block<1, CB>(W, bias, L.in, AT, nb, ZT, o, c0, L.relu);
}

static void forward(const Layer& L, const float* w, const float* AT, int64_t nb, float* ZT) {
  int64_t c = 0;
  for (; c + 2 * VL <= nb; c += 2 * VL) fwd_cols<2>(L, w, AT, nb, ZT, c);
  for (; c < nb; c += VL) fwd_cols<1>(L, w, AT, nb, ZT, c);
}

// ------------------------------------------------------------------ input gradient
// dAT[k, :] = sum_o W[o, k] dZT[o, :], then ReLU's backward with the saved activation HT (the
// previous layer's output): 0 where HT <= 0 (NaN in HT keeps the gradient, as threshold_backward).
template <int KB, int CB>
static inline void dinput_block(const float* W, int64_t in, int64_t out, const float* dZT,
                                int64_t nb, const float* HT, float* dAT, int64_t k0,
                                int64_t c0) {
  v16 acc[KB][CB];
#pragma GCC unroll 8
  for (int q = 0; q < KB; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) acc[q][c] = splat(0.0f);
  outer_acc<KB, CB>(acc, W + k0, 1, in, dZT + c0, nb, out);  // scalars W[t, k0 + q]
  const v16 zero = splat(0.0f);
#pragma GCC unroll 8
  for (int q = 0; q < KB; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) {
      const int64_t off = (k0 + q) * nb + c0 + c * VL;
      const v16 h = ld(HT + off);
      st(dAT + off, h <= zero ? zero : acc[q][c]);
    }
}

template <int CB>
static void dinput_cols(const Layer& L, const float* w, const float* dZT, int64_t nb,
                        const float* HT, float* dAT, int64_t c0) {
  const float* W = w + L.w_off;
  int64_t k = 0;
  for (; k + 8 <= L.in; k += 8) dinput_block<8, CB>(W, L.in, L.out, dZT, nb, HT, dAT, k, c0);
  for (; k + 4 <= L.in; k += 4) dinput_block<4, CB>(W, L.in, L.out, dZT, nb, HT, dAT, k, c0);
  for (; k < L.in; ++k) dinput_block<1, CB>(W, L.in, L.out, dZT, nb, HT, dAT, k, c0);
}

static void dinput(const Layer& L, const float* w, const float* dZT, int64_t nb, const float* HT,
                   float* dAT) {
  int64_t c = 0;
  for (; c + 2 * VL <= nb; c += 2 * VL) dinput_cols<2>(L, w, dZT, nb, HT, dAT, c);
  for (; c < nb; c += VL) dinput_cols<1>(L, w, dZT, nb, HT, dAT, c);
}

// ------------------------------------------------------------------ weight gradient
// dW[o, k] = sum_{i < wd} dZT[o, i] A_i[k] with A_i the i-th example's input row (rows[i]);
// db[o] = sum_{i < wd} dZT[o, i]. OB outputs x KB lane-vectors of k per register block.
template <int OB, int KB>
static inline void dweight_block(const float* dZT, int64_t nb, const float* const* rows,
                                 int64_t wd, int64_t in, float* dW, int64_t o0, int64_t k0) {
  v16 acc[OB][KB];
#pragma GCC unroll 8
  for (int q = 0; q < OB; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < KB; ++c) acc[q][c] = splat(0.0f);
  // (outer_acc's loop with the example rows as its vectors: measured 3-4 % slower on the MLP
  // point, so the weight gradient keeps its own)
  for (int64_t i = 0; i < wd; ++i) {
    v16 a[KB];
    const float* ap = rows[i] + k0;
#pragma GCC unroll 4
    for (int c = 0; c < KB; ++c) {
      v16 t = ld(ap + c * VL);
      in_register(t);
      a[c] = t;
    }
#pragma GCC unroll 8
    for (int q = 0; q < OB; ++q) {
      const float s = dZT[(o0 + q) * nb + i];
#pragma GCC unroll 4
      for (int c = 0; c < KB; ++c) acc[q][c] += s * a[c];
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < OB; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < KB; ++c) st(dW + (o0 + q) * in + k0 + c * VL, acc[q][c]);
}

template <int OB>
static void dweight_rows(const float* dZT, int64_t nb, const float* const* rows, int64_t wd,
                         int64_t in, float* dW, int64_t o0) {
  int64_t k = 0;
  for (; k + 2 * VL <= in; k += 2 * VL) dweight_block<OB, 2>(dZT, nb, rows, wd, in, dW, o0, k);
  for (; k + VL <= in; k += VL) dweight_block<OB, 1>(dZT, nb, rows, wd, in, dW, o0, k);
  for (; k < in; ++k)  // tail columns (in not a multiple of 16)
    for (int q = 0; q < OB; ++q) {
      float s = 0.0f;
      for (int64_t i = 0; i < wd; ++i) s += dZT[(o0 + q) * nb + i] * rows[i][k];
      dW[(o0 + q) * in + k] = s;
    }
}

static void dweight(const Layer& L, const float* dZT, int64_t nb, const float* const* rows,
                    int64_t wd, float* grad) {
  float* dW = grad + L.w_off;
  int64_t o = 0;
  for (; o + 8 <= L.out; o += 8) dweight_rows<8>(dZT, nb, rows, wd, L.in, dW, o);
  for (; o + 4 <= L.out; o += 4) dweight_rows<4>(dZT, nb, rows, wd, L.in, dW, o);
  for (; o < L.out; ++o) dweight_rows<1>(dZT, nb, rows, wd, L.in, dW, o);
  if (L.b_off >= 0) {
    float* db = grad + L.b_off;
    for (int64_t o2 = 0; o2 < L.out; ++o2) {
      const float* d = dZT + o2 * nb;
      float s = 0.0f;
      for (int64_t i = 0; i < wd; ++i) s += d[i];
      db[o2] = s;
    }
  }
}

// ------------------------------------------------------------------ loss gradient
// dZT[c, i] = (softmax(z_i)_c - [c == y_i]) * scale_i, as the torch path computes it:
// e = exp(z - max z); dz = e * (scale / sum e); dz[y] -= scale.
// sc: the example weights over all nb lanes (0 on padding lanes).
static void loss_grad(float* ZT, int64_t C, int64_t nb, const int64_t* y, const float* sc,
                      int64_t wd) {
  for (int64_t c0 = 0; c0 < nb; c0 += VL) {
    v16 m = ld(ZT + c0);
    for (int64_t c = 1; c < C; ++c) {
      const v16 z = ld(ZT + c * nb + c0);
      m = (z > m) | (z != z) ? z : m;  // amax: NaN wins
    }
    v16 s = splat(0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const v16 e = vexp(ld(ZT + c * nb + c0) - m);
      st(ZT + c * nb + c0, e);
      s += e;
    }
    const v16 r = ld(sc + c0) / s;
    for (int64_t c = 0; c < C; ++c) st(ZT + c * nb + c0, ld(ZT + c * nb + c0) * r);
  }
  for (int64_t i = 0; i < wd; ++i) ZT[y[i] * nb + i] -= sc[i];
}

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Job {
  const Layer* L;
  int64_t nl, maxdim, r0, r1, steps, bs, P, w_stride, m_stride, n_examples, t_stride, y_stride;
  float *w, *mom;
  const float* x;
  const int64_t *table, *pos, *y, *widths;
  const uint8_t *valid, *active;
  float lr, mu, wd_coef;
  int rc;
};

// Trains rows [r0, r1) of a validated job; its own scratch (rows never share memory).
static void train_part(Job* J) {
  const Layer* L = J->L;
  const int64_t nl = J->nl, maxdim = J->maxdim, steps = J->steps, bs = J->bs, P = J->P;
  const int64_t C = L[nl - 1].out, in0 = L[0].in;
  const float* x = J->x;
  const int64_t *table = J->table, *pos = J->pos, *ylab = J->y, *widths = J->widths;
  const uint8_t *valid = J->valid, *active = J->active;
  const float lr = J->lr, mu = J->mu, wd_coef = J->wd_coef;
  const int64_t nb_max = round_up(bs, VL);
  // scratch: per layer its output (transposed) and, for hidden outputs, the example-major copy;
  // two gradient buffers; the input transposed; the gradient vector; the example weights (the
  // batch's example ids and labels: `idy`)
  int64_t total = in0 * nb_max + 2 * maxdim * nb_max + P + nb_max;
  for (int64_t l = 0; l < nl; ++l) total += L[l].out * nb_max * (l + 1 < nl ? 2 : 1);
  float* mem = (float*)aligned_alloc(64, (size_t)round_up(total * 4, 64));
  const float** rowp = (const float**)malloc(sizeof(float*) * (size_t)(bs + maxdim));
  const float** hrows = rowp + bs;  // the hidden activations' rows (features)
  int64_t* idy = (int64_t*)malloc(sizeof(int64_t) * 2 * (size_t)nb_max);
  if (!mem || !rowp || !idy) {
    free(mem);
    free(rowp);
    free(idy);
    J->rc = -1;
    return;
  }
  memset(mem, 0, (size_t)total * 4);
  float* XT = mem;
  float* dA = XT + in0 * nb_max;
  float* dB = dA + maxdim * nb_max;
  float* grad = dB + maxdim * nb_max;
  float* sc = grad + P;
  int64_t* id = idy;
  int64_t* y = idy + nb_max;
  float* ZT[MAX_LAYERS];
  float* Hrow[MAX_LAYERS];
  float* p = sc + nb_max;
  for (int64_t l = 0; l < nl; ++l) {
    ZT[l] = p;
    p += L[l].out * nb_max;
    Hrow[l] = nullptr;
    if (l + 1 < nl) {
      Hrow[l] = p;
      p += L[l].out * nb_max;
    }
  }
  for (int64_t r = J->r0; r < J->r1; ++r) {
    float* wr = J->w + r * J->w_stride;
    float* br = J->mom + r * J->m_stride;
    for (int64_t s = 0; s < steps; ++s) {
      if (!active[r * steps + s]) continue;
      const int64_t wd = widths[s] > 0 ? widths[s] : 1;
      const int64_t nb = round_up(wd, VL);
      // the batch: ids table[r, pos], labels by id (or by position: per-row labels), weights
      // valid / max(1, count) (FusedModel's example_scale)
      const int64_t* ps = pos + (r * steps + s) * bs;
      const uint8_t* vs = valid + (r * steps + s) * bs;
      int64_t cnt = 0;
      for (int64_t i = 0; i < bs; ++i) cnt += vs[i] != 0;
      const float inv = 1.0f / (float)(cnt > 1 ? cnt : 1);
      for (int64_t i = 0; i < wd; ++i) {
        id[i] = table[r * J->t_stride + ps[i]];
        y[i] = J->y_stride ? ylab[r * J->y_stride + ps[i]] : ylab[id[i]];
        sc[i] = vs[i] ? inv : 0.0f;
      }
      for (int64_t i = wd; i < nb; ++i) sc[i] = 0.0f;  // padding lanes
      // example-major rows in place, feature-major copy padded with zeros
      for (int64_t i = 0; i < wd; ++i) rowp[i] = x + id[i] * in0;
      transpose_rows(rowp, wd, nb, in0, XT, nb);
      // forward
      const float* AT = XT;
      for (int64_t l = 0; l < nl; ++l) {
        forward(L[l], wr, AT, nb, ZT[l]);
        AT = ZT[l];
      }
      // backward
      loss_grad(ZT[nl - 1], C, nb, y, sc, wd);
      float* dZ = ZT[nl - 1];
      for (int64_t l = nl - 1; l >= 0; --l) {
        const float* const* arows = rowp;
        if (l > 0) {  // the hidden input, example-major: Hrow[i, k] = ZT[l-1][k, i]
          const int64_t hin = L[l].in;
          float* H = Hrow[l - 1];
          for (int64_t k = 0; k < hin; ++k) hrows[k] = ZT[l - 1] + k * nb;
          transpose_rows(hrows, hin, hin, wd, H, hin);
          for (int64_t i = 0; i < wd; ++i) rowp[i] = H + i * hin;
          arows = rowp;
        }
        dweight(L[l], dZ, nb, arows, wd, grad);
        if (l > 0) {
          float* next = dZ == dA ? dB : dA;
          dinput(L[l], wr, dZ, nb, ZT[l - 1], next);
          dZ = next;
          if (l - 1 == 0)  // restore the input rows for the first layer's weight gradient
            for (int64_t i = 0; i < wd; ++i) rowp[i] = x + id[i] * in0;
        }
      }
      // torch.optim.SGD (dampening 0): g = grad + wd w; b = g + mu b; w = w - lr b
      const v16 vwd = splat(wd_coef), vmu = splat(mu), vlr = splat(-lr);
      int64_t j = 0;
      if (wd_coef != 0.0f) {
        for (; j + VL <= P; j += VL) {
          const v16 wv = ld(wr + j);
          const v16 b = (ld(grad + j) + vwd * wv) + vmu * ld(br + j);
          st(br + j, b);
          st(wr + j, wv + vlr * b);
        }
        for (; j < P; ++j) {
          const float b = (grad[j] + wd_coef * wr[j]) + mu * br[j];
          br[j] = b;
          wr[j] = wr[j] + (-lr) * b;
        }
      } else {
        for (; j + VL <= P; j += VL) {
          const v16 b = ld(grad + j) + vmu * ld(br + j);
          st(br + j, b);
          st(wr + j, ld(wr + j) + vlr * b);
        }
        for (; j < P; ++j) {
          const float b = grad[j] + mu * br[j];
          br[j] = b;
          wr[j] = wr[j] + (-lr) * b;
        }
      }
    }
  }
  free(idy);
  free(rowp);
  free(mem);
  J->rc = 0;
}

static void train_part_fn(void* ctx, int64_t part) { train_part((Job*)ctx + part); }

// One round of local SGD for `rows` client rows (see the header). Returns 0; -1 for sizes or a
// batch position out of range, or no memory; -2 when an example id is outside [0, n_examples);
// -3 when a label is outside [0, classes) (checked for every active step before any row is
// touched).
//   layers: nl entries of (in, out, w_off, b_off, relu) as int64 [nl, 5]; dims chain and the
//           first layer's `in` is the example size; the last layer's `out` is the class count.
//   w, mom: [rows, P] with row strides w_stride, m_stride (momentum in/out).
//   x: [n_examples, in0]; table: each row's example ids [rows, n_tab] (row stride t_stride);
//   pos, valid: [rows, steps, bs] batch positions in the row's table and real-example flags
//   (uint8); ylab: labels by example id [n_examples] (y_stride 0) or per row by table position
//   [rows, n_tab] (row stride y_stride); active: uint8 [rows, steps]. Each step processes the
//   first `width` slots, width = the last real slot of the step in any row (at least 1).
extern "C" int psfed_mlp_sgd_f32(int64_t rows, int64_t steps, int64_t bs, int64_t nl,
                                 const int64_t* layer_spec, int64_t P, float* w,
                                 int64_t w_stride, float* mom, int64_t m_stride, const float* x,
                                 int64_t n_examples, const int64_t* table, int64_t t_stride,
                                 int64_t n_tab, const int64_t* pos, const uint8_t* valid,
                                 const int64_t* ylab, int64_t y_stride, const uint8_t* active,
                                 float lr, float mu, float wd_coef, int64_t threads,
                                 void* gomp_parallel, void* omp_thread_num) {
  if (rows < 0 || steps < 0 || bs < 1 || P < 1 || n_tab < 1 || t_stride < n_tab ||
      (y_stride != 0 && y_stride < n_tab))
    return -1;
  Layer L[MAX_LAYERS];
  const int64_t maxdim = parse_layers(nl, layer_spec, P, L);
  if (maxdim < 0) return -1;
  // each step's batch is cut after its last real example in any row (the torch path's cut)
  int64_t* widths = (int64_t*)malloc(sizeof(int64_t) * (size_t)(steps > 0 ? steps : 1));
  if (!widths) return -1;
  for (int64_t s = 0; s < steps; ++s) {
    int64_t last = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* vs = valid + (r * steps + s) * bs;
      for (int64_t i = bs; i > last; --i)
        if (vs[i - 1]) {
          last = i;
          break;
        }
    }
    widths[s] = last > 0 ? last : 1;
  }
  const int64_t C = L[nl - 1].out;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < steps; ++s) {
      if (!active[r * steps + s]) continue;
      const int64_t* ps = pos + (r * steps + s) * bs;
      for (int64_t i = 0; i < widths[s]; ++i) {
        int rc = 0;
        if (ps[i] < 0 || ps[i] >= n_tab) {
          rc = -1;
        } else {
          const int64_t e = table[r * t_stride + ps[i]];
          if (e < 0 || e >= n_examples) {
            rc = -2;
          } else {
            const int64_t yl = y_stride ? ylab[r * y_stride + ps[i]] : ylab[e];
            if (yl < 0 || yl >= C) rc = -3;
          }
        }
        if (rc) {
          free(widths);
          return rc;
        }
      }
    }
  if (threads < 1) threads = 1;
  if (threads > rows) threads = rows > 0 ? rows : 1;
  if (threads > MAX_PARTS) threads = MAX_PARTS;
  Job jobs[MAX_PARTS];
  for (int64_t t = 0; t < threads; ++t) {
    Job& J = jobs[t];
    J.L = L;
    J.nl = nl;
    J.maxdim = maxdim;
    J.r0 = rows * t / threads;
    J.r1 = rows * (t + 1) / threads;
    J.steps = steps;
    J.bs = bs;
    J.P = P;
    J.w = w;
    J.w_stride = w_stride;
    J.mom = mom;
    J.m_stride = m_stride;
    J.x = x;
    J.n_examples = n_examples;
    J.table = table;
    J.t_stride = t_stride;
    J.pos = pos;
    J.valid = valid;
    J.y = ylab;
    J.y_stride = y_stride;
    J.active = active;
    J.widths = widths;
    J.lr = lr;
    J.mu = mu;
    J.wd_coef = wd_coef;
    J.rc = 0;
  }
  run_parts(train_part_fn, jobs, threads, gomp_parallel, omp_thread_num);
  int rc = 0;
  for (int64_t t = 0; t < threads; ++t)
    if (jobs[t].rc != 0) rc = jobs[t].rc;
  free(widths);
  return rc;
}

// ------------------------------------------------------------------ batch orders
// torch.randperm(n, generator=g) on the CPU for a generator just seeded with g.manual_seed(seed)
// and used in sequence: torch's CPU generator is MT19937 seeded with the seed's low 32 bits
// (at::mt19937's init_with_uint32), and randperm is Fisher-Yates with z = random() % (n - i) for
// i < n - 1 (n - 1 words). tests/test_nn_kernels.py checks equality with torch.randperm.
struct Mt19937 {
  uint32_t s[624];
  int next, left;
  int lazy;   // the first twist not yet applied: outputs j < 227 come from the initial state
  int ready;  // initial state entries computed so far
};

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
  return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

// Seeded as at::mt19937(seed): s[0] = the seed's low 32 bits, s[j] = 1812433253 (s[j-1] ^
// (s[j-1] >> 30)) + j, computed lazily (psfed_batch_orders seeds rows 8 at a time, up to what
// their draws need: the first twist's output j < 227 needs only initial entries j, j+1, j+397).
static inline void mt_init_to(Mt19937* g, int upto) {  // initial state entries [ready, upto)
  for (int j = g->ready; j < upto; ++j)
    g->s[j] = 1812433253u * (g->s[j - 1] ^ (g->s[j - 1] >> 30)) + (uint32_t)j;
  if (upto > g->ready) g->ready = upto;
}

static void mt_full_twist(Mt19937* g) {
  uint32_t* p = g->s;
  g->left = 624;
  for (int j = 624 - 397 + 1; --j; p++) *p = p[397] ^ mt_twist(p[0], p[1]);
  for (int j = 397; --j; p++) *p = p[397 - 624] ^ mt_twist(p[0], p[1]);
  *p = p[397 - 624] ^ mt_twist(p[0], g->s[0]);
}

static inline uint32_t mt_temper(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= (y >> 18);
  return y;
}

static inline uint32_t mt_next(Mt19937* g) {
  if (g->lazy) {
    const int j = g->next;
    if (j < 227 && j + 398 <= g->ready) {
      g->next = j + 1;
      return mt_temper(g->s[j + 397] ^ mt_twist(g->s[j], g->s[j + 1]));
    }
    mt_init_to(g, 624);  // more outputs than planned: apply the whole first twist
    mt_full_twist(g);
    g->lazy = 0;
    g->left = 624 - j;  // outputs 0..j-1 were already handed out
  }
  if (g->left == 0) {
    mt_full_twist(g);
    g->next = 0;
  }
  --g->left;
  return mt_temper(g->s[g->next++]);
}

// r % m for 32-bit r and 1 <= m < 2^32 without a division: Lemire's fastmod with
// M = 2^64 / m rounded up (exact for every 32-bit r); fm[m] holds M, shared by all rows.
static inline uint32_t fastmod(uint32_t r, uint64_t M, uint32_t m) {
  const uint64_t low = M * r;
  return (uint32_t)(((unsigned __int128)low * m) >> 64);
}

static void mt_randperm(Mt19937* g, int64_t n, int64_t* out, const uint64_t* fm,
                        uint32_t* words) {
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  if (n < 2) return;
  const int64_t d = n - 1;  // the shuffle's draws
  int64_t k = 0;
  if (g->lazy && g->next == 0 && d <= 227 && d + 397 < g->ready) {
    // a fresh generator: the first d outputs in one vectorisable pass over the initial state
    const uint32_t* s = g->s;
    for (int64_t j = 0; j < d; ++j) words[j] = mt_temper(s[j + 397] ^ mt_twist(s[j], s[j + 1]));
    g->next = (int)d;
    k = d;
  }
  for (int64_t j = k; j < d; ++j) words[j] = mt_next(g);
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t r = words[i];
    const int64_t m = n - i;
    const int64_t z = fm ? (int64_t)fastmod(r, fm[m], (uint32_t)m)
                         : (int64_t)((uint64_t)r % (uint64_t)m);
    const int64_t t = out[i];
    out[i] = out[z + i];
    out[z + i] = t;
  }
}

// The shuffled batch positions of psfed_robust.nn.train.batch_plan: pos [rows, steps, bs] (zeroed
// by the caller). Epoch mode (local_steps == 0): epoch e of row i is a permutation of its
// counts[i] examples written from slot e * ceil(n / bs) * bs of the row. Step mode: each step a
// fresh permutation, its first min(bs, n) entries. Returns 0, or -1 for sizes out of range.
extern "C" int psfed_batch_orders(int64_t rows, int64_t steps, int64_t bs, const int64_t* counts,
                                  const uint64_t* seeds, int64_t epochs, int64_t local_steps,
                                  int64_t* pos) {
  if (rows < 0 || steps < 0 || bs < 1 || epochs < 1 || local_steps < 0) return -1;
  int64_t nmax = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = counts[i];
    if (n < 0) return -1;
    if (local_steps == 0 && epochs * ((n + bs - 1) / bs) > steps) return -1;
    if (n > nmax) nmax = n;
  }
  if (local_steps > 0 && local_steps > steps) return -1;
  const int G = 8;  // rows seeded together: 8 independent initialisation chains (latency-bound
                   // alone: each state entry depends on the previous one)
  Mt19937* g = (Mt19937*)malloc(sizeof(Mt19937) * G);
  int64_t* tmp = (int64_t*)malloc(sizeof(int64_t) * (size_t)(nmax > 0 ? nmax : 1));
  uint32_t* words = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)(nmax > 0 ? nmax : 1));
  // fastmod constants for every modulus a row's shuffle uses (n - i <= nmax), if 32-bit
  uint64_t* fm = nmax < 0xffffffffLL ? (uint64_t*)malloc(sizeof(uint64_t) * (size_t)(nmax + 1))
                                     : nullptr;
  if (!g || !tmp || !words || (nmax < 0xffffffffLL && !fm)) {
    free(g);
    free(tmp);
    free(words);
    free(fm);
    return -1;
  }
  if (fm) {
    fm[0] = 0;
    for (int64_t m = 1; m <= nmax; ++m) fm[m] = UINT64_MAX / (uint64_t)m + 1;
  }
  for (int64_t i0 = 0; i0 < rows; i0 += G) {
    const int m = rows - i0 < G ? (int)(rows - i0) : G;
    int upto = 1;
    for (int q = 0; q < G; ++q) {
      const int64_t n = q < m ? counts[i0 + q] : 0;
      const int64_t draws = local_steps > 0 ? local_steps * (n > 1 ? n - 1 : 0)
                                            : epochs * (n > 1 ? n - 1 : 0);
      const int need = draws < 227 ? (int)draws + 397 + 1 : 624;
      if (need > upto) upto = need;
      g[q].s[0] = (uint32_t)((q < m ? seeds[i0 + q] : 0) & 0xffffffffu);  // mt_seed's state,
      g[q].next = 0;                                                     // initialised below
      g[q].left = 624;
      g[q].lazy = 1;
    }
    for (int j = 1; j < upto; ++j)
#pragma GCC unroll 8
      for (int q = 0; q < G; ++q)
        g[q].s[j] = 1812433253u * (g[q].s[j - 1] ^ (g[q].s[j - 1] >> 30)) + (uint32_t)j;
    for (int q = 0; q < m; ++q) {
      g[q].ready = upto;
      const int64_t n = counts[i0 + q];
      int64_t* row = pos + (i0 + q) * steps * bs;
      if (local_steps > 0) {
        const int64_t take = n < bs ? n : bs;
        for (int64_t s = 0; s < local_steps; ++s) {
          mt_randperm(&g[q], n, tmp, fm, words);
          memcpy(row + s * bs, tmp, sizeof(int64_t) * (size_t)take);
        }
      } else {
        const int64_t per_epoch = (n + bs - 1) / bs;
        for (int64_t e = 0; e < epochs; ++e)
          mt_randperm(&g[q], n, row + e * per_epoch * bs, fm, words);
      }
    }
  }
  free(fm);
  free(words);
  free(tmp);
  free(g);
  return 0;
}

// ------------------------------------------------------------------ batch seeds
// psfed_robust.core.seeding.stable_seed("experiments.flower.batches", run_seed, client, round):
// SHA-256 (FIPS 180-4) of the parts' encoding — `prefix` (the encoded name and separator, from
// Python), then "i<decimal>" + 0x1e for each integer — its first 8 bytes little-endian, top bit
// cleared. tests/test_nn_kernels.py compares it with stable_seed.
static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(uint32_t h[8], const uint8_t* p) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 |
           (uint32_t)p[4 * i + 3];
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                        SHA_K[i] + w[i];
    const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    hh = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h[0] += a;
  h[1] += b;
  h[2] += c;
  h[3] += d;
  h[4] += e;
  h[5] += f;
  h[6] += g;
  h[7] += hh;
}

// The first 8 digest bytes of SHA-256(msg[0:n]), little-endian.
static uint64_t sha256_head(const uint8_t* msg, int64_t n) {
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  int64_t off = 0;
  for (; off + 64 <= n; off += 64) sha256_block(h, msg + off);
  uint8_t tail[128];
  const int64_t rest = n - off;
  memcpy(tail, msg + off, (size_t)rest);
  tail[rest] = 0x80;
  const int64_t len = rest + 1 + 8 <= 64 ? 64 : 128;
  memset(tail + rest + 1, 0, (size_t)(len - rest - 1));
  const uint64_t bits = (uint64_t)n * 8;
  for (int i = 0; i < 8; ++i) tail[len - 1 - i] = (uint8_t)(bits >> (8 * i));
  sha256_block(h, tail);
  if (len == 128) sha256_block(h, tail + 64);
  uint64_t out = 0;  // digest bytes 0..7 = h[0], h[1] big-endian; read little-endian
  for (int i = 0; i < 4; ++i) out |= (uint64_t)((h[0] >> (24 - 8 * i)) & 0xff) << (8 * i);
  for (int i = 0; i < 4; ++i) out |= (uint64_t)((h[1] >> (24 - 8 * i)) & 0xff) << (8 * (4 + i));
  return out;
}

static int64_t put_int(uint8_t* dst, int64_t v) {  // "i" + str(v) + "\x1e"
  int64_t n = 0;
  dst[n++] = 'i';
  uint64_t u = (uint64_t)v;
  if (v < 0) {
    dst[n++] = '-';
    u = (uint64_t)0 - u;
  }
  char buf[24];
  int k = 0;
  do {
    buf[k++] = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  while (k) dst[n++] = (uint8_t)buf[--k];
  dst[n++] = 0x1e;
  return n;
}

// seeds[i] = stable_seed(<prefix part>, run_seeds[i], clients[i], round) for i < rows.
extern "C" int psfed_batch_seeds(int64_t rows, const uint8_t* prefix, int64_t prefix_len,
                                 const int64_t* run_seeds, const int64_t* clients, int64_t round,
                                 uint64_t* seeds) {
  if (rows < 0 || prefix_len < 0 || prefix_len > 512) return -1;
  uint8_t msg[512 + 3 * 24];
  memcpy(msg, prefix, (size_t)prefix_len);
  for (int64_t i = 0; i < rows; ++i) {
    int64_t n = prefix_len;
    n += put_int(msg + n, run_seeds[i]);
    n += put_int(msg + n, clients[i]);
    n += put_int(msg + n, round);
    seeds[i] = sha256_head(msg, n) & 0x7fffffffffffffffULL;
  }
  return 0;
}

// batch_plan's positions in one call: the rows' seeds as psfed_batch_seeds derives them, then
// the draws of psfed_batch_orders, rows spread over `threads` parts (as the training kernel).
struct PlanJob {
  int64_t rows, steps, bs, prefix_len, round, epochs, local_steps, parts;
  const int64_t *counts, *run_seeds, *clients;
  const uint8_t* prefix;
  uint64_t* seeds;
  int64_t* pos;
  int rc[MAX_PARTS];
};

static void plan_part(void* ctx, int64_t part) {
  PlanJob* J = (PlanJob*)ctx;
  const int64_t r0 = J->rows * part / J->parts, r1 = J->rows * (part + 1) / J->parts;
  int rc = psfed_batch_seeds(r1 - r0, J->prefix, J->prefix_len, J->run_seeds + r0,
                             J->clients + r0, J->round, J->seeds + r0);
  if (rc == 0)
    rc = psfed_batch_orders(r1 - r0, J->steps, J->bs, J->counts + r0, J->seeds + r0, J->epochs,
                            J->local_steps, J->pos + r0 * J->steps * J->bs);
  J->rc[part] = rc;
}

extern "C" int psfed_batch_plan(int64_t rows, int64_t steps, int64_t bs, const int64_t* counts,
                                const uint8_t* prefix, int64_t prefix_len,
                                const int64_t* run_seeds, const int64_t* clients, int64_t round,
                                int64_t epochs, int64_t local_steps, int64_t* pos,
                                int64_t threads, void* gomp_parallel, void* omp_thread_num) {
  if (rows < 0) return -1;
  uint64_t* seeds = (uint64_t*)malloc(sizeof(uint64_t) * (size_t)(rows > 0 ? rows : 1));
  if (!seeds) return -1;
  if (threads < 1) threads = 1;
  if (threads > rows) threads = rows > 0 ? rows : 1;
  if (threads > MAX_PARTS) threads = MAX_PARTS;
  PlanJob J;
  J.rows = rows;
  J.steps = steps;
  J.bs = bs;
  J.prefix_len = prefix_len;
  J.round = round;
  J.epochs = epochs;
  J.local_steps = local_steps;
  J.parts = threads;
  J.counts = counts;
  J.run_seeds = run_seeds;
  J.clients = clients;
  J.prefix = prefix;
  J.seeds = seeds;
  J.pos = pos;
  run_parts(plan_part, &J, threads, gomp_parallel, omp_thread_num);
  int rc = 0;
  for (int64_t p = 0; p < threads; ++p)
    if (J.rc[p] != 0) rc = J.rc[p];
  free(seeds);
  return rc;
}

// ------------------------------------------------------------------ evaluation
// Test-set sums of `models` MLPs (rows of w) on n examples x [n, in0] with labels y: out [3,
// models] float64 = (sum of cross-entropy losses, correct predictions, predictions equal to
// aimed[i]) divided by (div_loss, div_hits, div_flips),
// as psfed_robust.nn.engine's torch evaluation: loss_i = log sum_c exp(z_c - max z) + max z -
// z_{y_i} (NaN when a logit is NaN or +Inf), prediction = the first maximum (a NaN logit is the
// maximum, as torch.max). aimed: the label-flip target per example, -1 where none (never equal).
// Examples go in chunks of 32 (each transposed once for every model); chunks are spread over
// `threads` parts and their per-chunk sums added in chunk order, so the result does not depend
// on the thread count. Returns 0, -1 for sizes out of range or no memory, -3 for a label outside
// [0, classes).
#define EVAL_NB (2 * VL)

struct EvalJob {
  const Layer* L;
  int64_t nl, models, P, w_stride, n, chunks, parts;
  const float *w, *x;
  const int64_t *y, *aimed;
  double* partial;  // [chunks, models, 3]
  int rc;
};

static void eval_part(void* ctx, int64_t part) {
  EvalJob* J = (EvalJob*)ctx;
  const Layer* L = J->L;
  const int64_t nl = J->nl, C = L[nl - 1].out, in0 = L[0].in, NB = EVAL_NB;
  int64_t total = in0 * NB;
  for (int64_t l = 0; l < nl; ++l) total += L[l].out * NB;
  float* mem = (float*)aligned_alloc(64, (size_t)round_up(total * 4, 64));
  if (!mem) {
    J->rc = -1;
    return;
  }
  float* XT = mem;
  float* ZT[MAX_LAYERS];
  float* p = XT + in0 * NB;
  for (int64_t l = 0; l < nl; ++l) {
    ZT[l] = p;
    p += L[l].out * NB;
  }
  const float* rowp[EVAL_NB];
  const int64_t k0 = J->chunks * part / J->parts, k1 = J->chunks * (part + 1) / J->parts;
  for (int64_t ch = k0; ch < k1; ++ch) {
    const int64_t i0 = ch * NB;
    const int64_t wd = J->n - i0 < NB ? J->n - i0 : NB;
    for (int64_t i = 0; i < wd; ++i) rowp[i] = J->x + (i0 + i) * in0;
    transpose_rows(rowp, wd, NB, in0, XT, NB);
    for (int64_t b = 0; b < J->models; ++b) {
      const float* wb = J->w + b * J->w_stride;
      const float* AT = XT;
      for (int64_t l = 0; l < nl; ++l) {
        forward(L[l], wb, AT, NB, ZT[l]);
        AT = ZT[l];
      }
      const float* Z = ZT[nl - 1];
      double loss = 0.0, hits = 0.0, flips = 0.0;
      for (int64_t c0 = 0; c0 < NB && c0 < wd; c0 += VL) {  // 16 examples at a time
        v16 m = ld(Z + c0);
        v16 best = splat(0.0f);  // class index of the first maximum (a NaN wins)
        for (int64_t c = 1; c < C; ++c) {
          const v16 z = ld(Z + c * NB + c0);
          const auto take = (z > m) | ((z != z) & (m == m));
          m = take ? z : m;
          best = take ? splat((float)c) : best;
        }
        v16 s = splat(0.0f);
        for (int64_t c = 0; c < C; ++c) s += vexp(ld(Z + c * NB + c0) - m);
        for (int64_t j = 0; j < VL && c0 + j < wd; ++j) {
          const int64_t i = c0 + j;
          loss += (double)(logf(s[j]) + m[j] - Z[J->y[i0 + i] * NB + i]);
          const int64_t pred = (int64_t)best[j];
          hits += pred == J->y[i0 + i];
          flips += pred == J->aimed[i0 + i];
        }
      }
      double* o = J->partial + (ch * J->models + b) * 3;
      o[0] = loss;
      o[1] = hits;
      o[2] = flips;
    }
  }
  free(mem);
}

extern "C" int psfed_mlp_eval_f32(int64_t models, int64_t nl, const int64_t* layer_spec,
                                  int64_t P, const float* w, int64_t w_stride, const float* x,
                                  int64_t n, const int64_t* y, const int64_t* aimed, double* out,
                                  double div_loss, double div_hits, double div_flips,
                                  int64_t threads, void* gomp_parallel, void* omp_thread_num) {
  if (models < 0 || n < 0 || P < 1) return -1;
  Layer L[MAX_LAYERS];
  if (parse_layers(nl, layer_spec, P, L) < 0) return -1;
  const int64_t C = L[nl - 1].out;
  for (int64_t i = 0; i < n; ++i)
    if (y[i] < 0 || y[i] >= C) return -3;
  const int64_t chunks = (n + EVAL_NB - 1) / EVAL_NB;
  double* partial = (double*)malloc(sizeof(double) * 3 * (size_t)(chunks * models + 1));
  if (!partial) return -1;
  if (threads < 1) threads = 1;
  if (threads > chunks) threads = chunks > 0 ? chunks : 1;
  if (threads > MAX_PARTS) threads = MAX_PARTS;
  EvalJob J = {L, nl, models, P, w_stride, n, chunks, threads, w, x, y, aimed, partial, 0};
  run_parts(eval_part, &J, threads, gomp_parallel, omp_thread_num);
  if (J.rc == 0)
    for (int64_t b = 0; b < models; ++b) {
      double acc[3] = {0.0, 0.0, 0.0};
      for (int64_t ch = 0; ch < chunks; ++ch)
        for (int k = 0; k < 3; ++k) acc[k] += partial[(ch * models + b) * 3 + k];
      out[b] = acc[0] / div_loss;  // [3, models]: the engine's layout, divided as it divides
      out[models + b] = acc[1] / div_hits;
      out[2 * models + b] = acc[2] / div_flips;
    }
  free(partial);
  return J.rc;
}
