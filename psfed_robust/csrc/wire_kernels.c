/* Kernels of the wire codec (psfed_robust/wire.py) that earn at least 3x over its numpy path
   (benchmarks/wire.py --kernels-only): the Rice gap-section decoder and the payload
   concatenation on huge pages. (The gap scan, the Rice cost, the Rice packer, the run scan and
   the run statistics were removed: numpy was as fast, or within 3x.) Plain C99, no Python
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
