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
/* Big-endian 64-bit load: the next 64 bits of a bit stream, most significant first. */
static inline uint64_t be64(const uint8_t* p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return __builtin_bswap64(w);
}

int64_t psw_rice_decode(const uint8_t* rem, int64_t rem_len, const uint8_t* un, int64_t un_len,
                        int64_t m, int k, int64_t size, uint8_t val, uint8_t* out,
                        int64_t* found) {
    /* Bit positions (from the start of each stream, most significant bit of byte 0 first). Fast
       paths read 64-bit windows while 8 bytes remain; the tails read byte by byte. */
    int64_t rbit = 0, ubit = 0, prev = -1;
    const int64_t qmax = size >> k;
    const int64_t rfast = (rem_len - 8) * 8, ufast = (un_len - 8) * 8;
    for (int64_t i = 0; i < m; ++i) {
        uint64_t r = 0;
        if (k > 0) {
            if (k <= 56 && rbit <= rfast) {
                r = (be64(rem + (rbit >> 3)) << (rbit & 7)) >> (64 - k);
                rbit += k;
            } else {
                for (int j = 0; j < k; ++j, ++rbit)
                    r = (r << 1) | ((rem[rbit >> 3] >> (7 - (rbit & 7))) & 1u);
            }
        }
        /* q = zeros before the next one bit of the unary stream */
        int64_t one = -1;
        if (ubit <= ufast) {
            const uint64_t w = be64(un + (ubit >> 3)) << (ubit & 7);
            if (w) one = ubit + __builtin_clzll(w);
        }
        if (one < 0) {  /* tail, or no one in the window: scan bytes */
            int64_t byte = ubit >> 3, base = ubit;  /* base: the bit at b's most significant */
            if (byte >= un_len) { *found = i; return 2; }
            unsigned b = (uint8_t)(un[byte] << (ubit & 7));
            while (b == 0) {
                if (++byte >= un_len) { *found = i; return 2; }
                b = un[byte];
                base = byte * 8;
            }
            one = base + (__builtin_clz(b) - 24);
        }
        const int64_t q = one - ubit;
        ubit = one + 1;
        if (q > qmax) return 4;
        const int64_t gap = (int64_t)(((uint64_t)q << k) | r);
        if (gap >= size) return 4;
        const int64_t idx = prev + gap + 1;
        if (idx >= size) return 5;
        out[idx] = val;
        prev = idx;
    }
    /* remainder stream: exactly ceil(m k / 8) bytes (the caller checks), zero padding bits */
    if ((rbit & 7) && (rem[rbit >> 3] & (0xFFu >> (rbit & 7)))) return 1;
    if ((rbit + 7) >> 3 != rem_len) return 1;
    /* after the m-th one: only zero padding to the end of its byte, and no further bytes */
    const int64_t upos = ubit >> 3;
    const int uoff = (int)(ubit & 7);
    const int64_t last_byte = uoff == 0 ? upos - 1 : upos;
    if (uoff != 0 && (uint8_t)(un[upos] << uoff) != 0) return 6;
    for (int64_t j = last_byte + 1; j < un_len; ++j) if (un[j]) return 6;
    if (last_byte != un_len - 1) return 3;
    return 0;
}
