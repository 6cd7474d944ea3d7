/* The scans of scan.c for one vector width, included once per width. Before including, define:
   LANES (floats per vector: 4, 8 or 16) and NAME(f) (f with the width's suffix). Every function here is
   static; scan.c exports the dispatchers. */

typedef float NAME(vf) __attribute__((vector_size(4 * LANES)));
typedef int32_t NAME(vi) __attribute__((vector_size(4 * LANES)));
typedef int64_t NAME(vl) __attribute__((vector_size(4 * LANES)));
typedef double NAME(vd) __attribute__((vector_size(8 * LANES)));
#define vf NAME(vf)
#define vi NAME(vi)
#define vl NAME(vl)
#define vd NAME(vd)
#define BLOCK (4 * LANES)  /* values per block: a block with no value to keep costs only its comparisons */
#define INLINE static inline __attribute__((always_inline))

INLINE vf NAME(load)(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE vf NAME(splat)(float x) { return (vf){0} + x; }

INLINE int64_t NAME(hsum)(vi v)
{
    int64_t s = 0;
    for (int q = 0; q < LANES; q++) s += v[q];
    return s;
}

/* Whether any lane is set: an OR tree over 64-bit pairs of lanes (4 lanes: plain ORs, any compiler). */
INLINE int NAME(any)(vi v)
{
#if LANES == 4
    return (v[0] | v[1] | v[2] | v[3]) != 0;
#else
    vl t = (vl)v;
#if LANES == 16
    t |= __builtin_shufflevector(t, t, 4, 5, 6, 7, 0, 1, 2, 3);
    t |= __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5);
    t |= __builtin_shufflevector(t, t, 1, 0, 3, 2, 5, 4, 7, 6);
#elif LANES == 8
    t |= __builtin_shufflevector(t, t, 2, 3, 0, 1);
    t |= __builtin_shufflevector(t, t, 1, 0, 3, 2);
#endif
    return t[0] != 0;
#endif
}

/* Append the values of p[0..LANES) whose mask lane is set (-1) to dst[*k...], in order. dst has room for
   LANES values past *k (the callers stop a block early enough): the vector versions store a whole vector. */
INLINE void NAME(compact)(const float *p, vi mask, float *dst, int64_t *k)
{
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
    /* AVX-512: compress in a register, then one unaligned store (a compress straight to memory is slow on
       some CPUs) */
    const __mmask16 m = _mm512_movepi32_mask((__m512i)mask);
    _mm512_storeu_ps(dst + *k, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(p)));
    *k += __builtin_popcount((unsigned)m);
#elif LANES == 8 && defined(TERNQC_X86_LEVELS)
    /* AVX2: a permutation from a table of the 256 masks */
    const int m = _mm256_movemask_ps((__m256)mask);
    const __m256i order = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)ternqc_compact8[m]));
    _mm256_storeu_ps(dst + *k, _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), order));
    *k += __builtin_popcount((unsigned)m);
#else
    int64_t at = *k;
    for (int q = 0; q < LANES; q++) {
        dst[at] = p[q];
        at -= mask[q];
    }
    *k = at;
#endif
}

/* One bracket over x[0..n), up to where dst (room for cap >= BLOCK values) could fill: counts[0..3] gain
   #(x > lo), #(lo < x < hi), #(x < lo) if want_lt, #(x > hi) if want_gh over the values scanned; the values
   strictly inside are written in order to dst, *kept of them. Returns how many values were scanned (n, or
   fewer when dst could fill: call again for the rest). Lane counts are int32, folded every 2^24 values. */
INLINE int64_t NAME(scan_one)(const float *x, int64_t n, float l, float h, int want_lt, int want_gh,
                              int64_t *counts, float *dst, int64_t cap, int64_t *kept)
{
    const vf lv = NAME(splat)(l), hv = NAME(splat)(h);
    vi gt = {0}, ge = {0}, lt = {0}, gh = {0};
    int64_t c_gt = 0, c_ge = 0, c_lt = 0, c_gh = 0, k = 0;
    int64_t i = 0;
    for (; i + BLOCK <= n && k + BLOCK <= cap; i += BLOCK) {
        const float *p = x + i;
        vi bgt = {0}, bge = {0};
        for (int j = 0; j < BLOCK; j += LANES) {
            const vf v = NAME(load)(p + j);
            bgt -= (vi)(v > lv);
            bge -= (vi)(v >= hv);
            if (want_lt) lt -= (vi)(v < lv);
            if (want_gh) gh -= (vi)(v > hv);
        }
        if (NAME(any)(bgt - bge)) {  /* some lo < x < hi: x > lo and not x >= hi */
            for (int j = 0; j < BLOCK; j += LANES) {
                const vf v = NAME(load)(p + j);
                const vi inside = (vi)(v > lv) & (vi)(v < hv);
                if (NAME(any)(inside)) NAME(compact)(p + j, inside, dst, &k);
            }
        }
        gt += bgt;
        ge += bge;
        if (((i + BLOCK) & ((1 << 24) - 1)) == 0) {
            c_gt += NAME(hsum)(gt), c_ge += NAME(hsum)(ge), c_lt += NAME(hsum)(lt), c_gh += NAME(hsum)(gh);
            gt = ge = lt = gh = (vi){0};
        }
    }
    c_gt += NAME(hsum)(gt), c_ge += NAME(hsum)(ge), c_lt += NAME(hsum)(lt), c_gh += NAME(hsum)(gh);
    if (i + BLOCK <= n || k + (n - i) > cap) n = i; /* dst may fill: the rest in the next call */
    for (; i < n; i++) {
        const float v = x[i];
        c_gt += v > l;
        c_ge += v >= h;
        c_lt += want_lt && v < l;
        c_gh += want_gh && v > h;
        if (v > l && v < h) dst[k++] = v;
    }
    counts[0] += c_gt;
    counts[1] += l < h ? c_gt - c_ge : 0; /* lo < hi: x >= hi implies x > lo (NaN is neither); else none */
    counts[2] += c_lt;
    counts[3] += c_gh;
    *kept = k;
    return n;
}

static int64_t NAME(scan_bracket)(const float *x, int64_t n, float lo, float hi, int32_t flags,
                                  int64_t *counts, float *out, int64_t cap, int64_t *kept)
{
    switch (flags & 3) { /* constant flags: each case compiles without the comparisons it skips */
    case 0: return NAME(scan_one)(x, n, lo, hi, 0, 0, counts, out, cap, kept);
    case 1: return NAME(scan_one)(x, n, lo, hi, 1, 0, counts, out, cap, kept);
    case 2: return NAME(scan_one)(x, n, lo, hi, 0, 1, counts, out, cap, kept);
    default: return NAME(scan_one)(x, n, lo, hi, 1, 1, counts, out, cap, kept);
    }
}

INLINE int64_t NAME(scan_row_body)(const float *x, int64_t n, float cut, float lo, int keep,
                                   int64_t *acc, double *sum, float *top, float *out, int64_t cap)
{
    const vf cv = NAME(splat)(cut), lv = NAME(splat)(lo);
    vd s = {0};
    vf mx = {0};
    vi cc = {0};
    int64_t c = 0, k = 0;
    int64_t i = 0;
    for (; i + BLOCK <= n && (!keep || k + BLOCK <= cap); i += BLOCK) {
        const float *p = x + i;
        vi seen = {0};
        for (int j = 0; j < BLOCK; j += LANES) {
            const vf v = NAME(load)(p + j);
            const vi a = (vi)(v > cv);
            const vf w = (vf)((vi)v & a); /* v where v > cut, else +0 */
            cc -= a;
            const vi bigger = (vi)(w > mx);
            mx = (vf)(((vi)w & bigger) | ((vi)mx & ~bigger));
            s += __builtin_convertvector(w, vd);
            if (keep) seen |= (vi)(v > lv) & ~a;
        }
        if (keep && NAME(any)(seen)) {
            for (int j = 0; j < BLOCK; j += LANES) {
                const vf v = NAME(load)(p + j);
                const vi inside = (vi)(v > lv) & ~(vi)(v > cv);
                if (NAME(any)(inside)) NAME(compact)(p + j, inside, out, &k);
            }
        }
        if (((i + BLOCK) & ((1 << 24) - 1)) == 0) {
            c += NAME(hsum)(cc);
            cc = (vi){0};
        }
    }
    c += NAME(hsum)(cc);
    double total = 0.0;
    float m = 0.0f;
    for (int q = 0; q < LANES; q++) {
        total += s[q];
        m = mx[q] > m ? mx[q] : m;
    }
    if (i + BLOCK <= n || (keep && k + (n - i) > cap)) n = i; /* out may fill: the rest in the next call */
    for (; i < n; i++) {
        const float v = x[i];
        if (v > cut) {
            c++;
            total += v;
            m = v > m ? v : m;
        } else if (keep && v > lo) {
            out[k++] = v;
        }
    }
    acc[0] = c;
    acc[1] = k;
    *sum = total;
    *top = m;
    return n;
}

static int64_t NAME(scan_row)(const float *x, int64_t n, float cut, float lo, int32_t keep,
                              int64_t *acc, double *sum, float *top, float *out, int64_t cap)
{
    if (keep) return NAME(scan_row_body)(x, n, cut, lo, 1, acc, sum, top, out, cap);
    return NAME(scan_row_body)(x, n, cut, lo, 0, acc, sum, top, out, cap);
}

#undef vf
#undef vi
#undef vl
#undef vd
#undef BLOCK
#undef INLINE
