/* Kernels of the wire codec (psfed_robust/wire.py): the gap (Golomb-Rice) and runs encodings'
   scans, packing and decoding, and the payload concatenation on huge pages. Plain C99, no Python
   or torch headers: built with the system C compiler and loaded with ctypes by
   psfed_robust/_cpp.py (CLibrary); the wrappers and the numpy reference are in
   psfed_robust/_wire_kernels.py and psfed_robust/wire.py (same bytes, same verdicts). */
#define _DEFAULT_SOURCE /* MADV_HUGEPAGE under -std=c99 */
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Concatenate `parts` buffers into `dst` (n bytes, fresh and untouched). A large fresh
   allocation is an mmap whose 4 KiB pages fault one by one on the first write (~25 ms for
   36 MB on a VM); asking for transparent huge pages first, as numpy does for its own large
   arrays, makes that ~3x cheaper. Only a hint: without THP the copy is the same. */
void psw_join(uint8_t* dst, int64_t n, const uint8_t* const* src, const int64_t* len,
              int64_t parts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t a = ((uintptr_t)dst + huge - 1) & ~(huge - 1);
    uintptr_t b = ((uintptr_t)dst + (uintptr_t)n) & ~(huge - 1);
    if (b > a) madvise((void*)a, b - a, MADV_HUGEPAGE);
#endif
    for (int64_t i = 0; i < parts; ++i) {
        if (len[i] > 0) memcpy(dst, src[i], (size_t)len[i]);
        dst += len[i];
    }
}

/* Gaps between consecutive members of a 0/1 byte array (members: bytes equal to 1, or to 0 when
   `complement`): gap_i = idx_i - idx_{i-1} - 1 with idx_{-1} = -1. Little-endian host (checked
   by the caller). Returns the number of members, or -1 if more than `cap`. */
int64_t psw_gaps(const uint8_t* mask, int64_t size, int complement, int64_t* gaps, int64_t cap) {
    const uint64_t flip = complement ? 0x0101010101010101ULL : 0ULL;
    int64_t m = 0, prev = -1, i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t w;
        memcpy(&w, mask + i, 8);
        w ^= flip;
        while (w) {
            int64_t j = i + (__builtin_ctzll(w) >> 3);
            if (m >= cap) return -1;
            gaps[m++] = j - prev - 1;
            prev = j;
            w &= w - 1;
        }
    }
    for (; i < size; ++i) {
        if ((mask[i] != 0) != (complement != 0)) {
            if (m >= cap) return -1;
            gaps[m++] = i - prev - 1;
            prev = i;
        }
    }
    return m;
}

/* The runs of a 0/1 byte array: for each run of ones j, z[j] = zeros since the previous run
   (or the start) and o[j] = its length. Little-endian host (checked by the caller). Returns the
   number of runs, or -1 if more than `cap`. */
int64_t psw_runs(const uint8_t* x, int64_t size, int64_t* z, int64_t* o, int64_t cap) {
    /* transitions alternate rise (into z), fall (into o): no data-dependent branch on which */
    int64_t* dst[2] = {z, o};
    int64_t n = 0, last = 0, i = 0;
    uint64_t prev = 0; /* x[i-1] (0 before the start) */
    for (; i + 8 <= size; i += 8) {
        uint64_t w;
        memcpy(&w, x + i, 8);
        uint64_t t = w ^ ((w << 8) | prev); /* byte b set iff x[i+b] != x[i+b-1] */
        prev = w >> 56;
        while (t) {
            int64_t j = i + (__builtin_ctzll(t) >> 3);
            t &= t - 1;
            if ((n >> 1) >= cap) return -1;
            dst[n & 1][n >> 1] = j - last;
            last = j;
            ++n;
        }
    }
    for (; i < size; ++i) {
        if ((uint64_t)x[i] != prev) {
            if ((n >> 1) >= cap) return -1;
            dst[n & 1][n >> 1] = i - last;
            last = i;
            ++n;
            prev = x[i];
        }
    }
    if (n & 1) { o[n >> 1] = size - last; ++n; }
    return n >> 1;
}

/* Run statistics of a 0/1 byte array in one pass: out[0] runs of ones, out[1] runs of length
   one, out[2] single zeros between two ones, out[3] one past the last one (0 if none). */
void psw_run_stats(const uint8_t* x, int64_t size, int64_t* out) {
    const uint64_t ONES = 0x0101010101010101ULL;
    int64_t runs = 0, iso1 = 0, iso0 = 0, last, i = 0;
    uint64_t prev = 0; /* x[i-1] */
    for (; i + 8 <= size; i += 8) {
        uint64_t w, nxt = 0;
        memcpy(&w, x + i, 8);
        if (i + 8 < size) nxt = x[i + 8];
        uint64_t back = (w << 8) | prev, ahead = (w >> 8) | (nxt << 56);
        uint64_t rise = w & ~back & ONES;
        /* bytes are 0/1: a multiply sums them (no popcount instruction needed) */
        runs += (int64_t)((rise * ONES) >> 56);
        iso1 += (int64_t)(((rise & ~ahead & ONES) * ONES) >> 56);
        iso0 += (int64_t)(((~w & back & ahead & ONES) * ONES) >> 56);
        prev = w >> 56;
    }
    for (; i < size; ++i) {
        uint64_t b = x[i], nx = (i + 1 < size) ? x[i + 1] : 0;
        runs += (int64_t)(b & !prev);
        iso1 += (int64_t)(b & !prev & !nx);
        iso0 += (int64_t)(!b & prev & nx);
        prev = b;
    }
    /* the last one, found from the end: tracking it in the loop above was a data-dependent
       branch per word (mispredicted on sparse masks, ~2x the pass) */
    last = size;
    while (last >= 8) {
        uint64_t w;
        memcpy(&w, x + last - 8, 8);
        if (w) break;
        last -= 8;
    }
    while (last > 0 && !x[last - 1]) --last;
    out[0] = runs; out[1] = iso1; out[2] = iso0; out[3] = last;
}

/* sum_i (gaps_i >> k): the unary part of the Rice cost. */
int64_t psw_rice_sum(const int64_t* gaps, int64_t m, int k) {
    int64_t s = 0;
    for (int64_t i = 0; i < m; ++i) s += gaps[i] >> k;
    return s;
}

typedef struct { uint8_t* out; int64_t pos, cap; uint64_t acc; int n; int overflow; } bitw;

static inline void put(bitw* w, uint64_t v, int nb) { /* nb <= 32, v < 2^nb, MSB first */
    w->acc = (w->acc << nb) | v;
    w->n += nb;
    while (w->n >= 8) {
        w->n -= 8;
        if (w->pos >= w->cap) { w->overflow = 1; return; }
        w->out[w->pos++] = (uint8_t)(w->acc >> w->n);
    }
}

static inline void flush(bitw* w) {
    if (w->n > 0) {
        if (w->pos >= w->cap) { w->overflow = 1; return; }
        w->out[w->pos++] = (uint8_t)(w->acc << (8 - w->n));
        w->n = 0;
    }
}

/* Rice section body: the remainders (k bits each, MSB first, zero padded to a byte), then the
   quotients in unary (q zeros then a one, zero padded). Returns the bytes written, or -1 if
   they would exceed `cap`. */
int64_t psw_rice_pack(const int64_t* gaps, int64_t m, int k, uint8_t* out, int64_t cap) {
    bitw w = {out, 0, cap, 0, 0, 0};
    if (k > 0) {
        const uint64_t lo = (k >= 32) ? 0xFFFFFFFFULL : ((1ULL << k) - 1);
        for (int64_t i = 0; i < m; ++i) {
            uint64_t r = (uint64_t)gaps[i] & ((k >= 64) ? ~0ULL : ((1ULL << k) - 1));
            if (k > 32) put(&w, r >> 32, k - 32);
            put(&w, r & lo, k > 32 ? 32 : k);
        }
        flush(&w);
    }
    for (int64_t i = 0; i < m; ++i) {
        uint64_t q = (uint64_t)gaps[i] >> k;
        while (q >= 32) { put(&w, 0, 32); q -= 32; }
        put(&w, 1, (int)q + 1);
        if (w.overflow) return -1;
    }
    flush(&w);
    return w.overflow ? -1 : w.pos;
}

/* Decode a Rice section into the 0/1 byte array `out` (pre-filled with the non-member value):
   member i at idx_i gets `val`. 0 on success, else an error code (see the Python wrapper).
   `rem_len` must be exactly ceil(m*k/8) (checked by the caller); m >= 1. */
int64_t psw_rice_decode(const uint8_t* rem, int64_t rem_len, const uint8_t* un, int64_t un_len,
                        int64_t m, int k, int64_t size, uint8_t val, uint8_t* out,
                        int64_t* found) {
    uint64_t racc = 0;
    int rn = 0;
    int64_t rpos = 0, upos = 0, prev = -1;
    int uoff = 0;
    const int64_t qmax = size >> k;
    for (int64_t i = 0; i < m; ++i) {
        uint64_t r = 0;
        int need = k;
        while (need > 0) {
            int nb = need > 32 ? 32 : need;
            while (rn < nb) { racc = (racc << 8) | rem[rpos++]; rn += 8; }
            r = (r << nb) | ((racc >> (rn - nb)) & ((1ULL << nb) - 1));
            rn -= nb;
            need -= nb;
        }
        /* next one bit of the unary stream at or after (upos, uoff) */
        if (upos >= un_len) { *found = i; return 2; }
        unsigned b = (uint8_t)(un[upos] << uoff);
        int64_t start = upos * 8 + uoff;
        while (b == 0) {
            if (++upos >= un_len) { *found = i; return 2; }
            b = un[upos];
            uoff = 0;
        }
        int64_t one = upos * 8 + uoff + (__builtin_clz(b) - 24);
        int64_t q = one - start;
        upos = (one + 1) >> 3;
        uoff = (int)((one + 1) & 7);
        if (q > qmax) return 4;
        int64_t gap = (int64_t)(((uint64_t)q << k) | r);
        if (gap >= size) return 4;
        int64_t idx = prev + gap + 1;
        if (idx >= size) return 5;
        out[idx] = val;
        prev = idx;
    }
    if (rn > 0 && (racc & ((1ULL << rn) - 1))) return 1;
    if (rpos != rem_len) return 1;
    /* after the m-th one: only zero padding to the end of its byte, and no further bytes */
    int64_t last_byte = uoff == 0 ? upos - 1 : upos;
    if (uoff != 0 && (uint8_t)(un[upos] << uoff) != 0) return 6;
    for (int64_t j = last_byte + 1; j < un_len; ++j) if (un[j]) return 6;
    if (last_byte != un_len - 1) return 3;
    return 0;
}
