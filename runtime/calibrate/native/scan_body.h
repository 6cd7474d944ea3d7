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
/* values per block: a block with no value to keep costs only its comparisons; whole groups of the sums' lanes */
#define BLOCK (4 * LANES > SUM_LANES ? 4 * LANES : SUM_LANES)
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

/* Append the values of p[0..LANES) strictly between l and h (NaN never) to dst[*k...], in order; room as for
   compact. AVX-512: the compares stay masks, straight into the compress. */
INLINE void NAME(keep_between)(const float *p, vf l, vf h, float *dst, int64_t *k)
{
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
    const __m512 v = _mm512_loadu_ps(p);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(v, (__m512)l, _CMP_GT_OQ), v, (__m512)h,
                                                _CMP_LT_OQ);
    _mm512_storeu_ps(dst + *k, _mm512_maskz_compress_ps(m, v));
    *k += __builtin_popcount((unsigned)m);
#else
    const vf v = NAME(load)(p);
    const vi inside = (vi)(v > l) & (vi)(v < h);
#if LANES == 4
    if (NAME(any)(inside))
#endif
        NAME(compact)(p, inside, dst, k); /* vector widths: no branch to mispredict */
#endif
}

/* acc + 1 in the lanes where a < b (a <= b for count_le); false where either is NaN. AVX-512: one masked
   subtraction of the compare's mask (the generic form materialises the mask as a vector first). */
INLINE vi NAME(count_lt)(vi acc, vf a, vf b)
{
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
    const __mmask16 m = _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LT_OQ);
    return (vi)_mm512_mask_sub_epi32((__m512i)acc, m, (__m512i)acc, _mm512_set1_epi32(-1));
#else
    return acc - (vi)(a < b);
#endif
}

INLINE vi NAME(count_le)(vi acc, vf a, vf b)
{
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
    const __mmask16 m = _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LE_OQ);
    return (vi)_mm512_mask_sub_epi32((__m512i)acc, m, (__m512i)acc, _mm512_set1_epi32(-1));
#else
    return acc - (vi)(a <= b);
#endif
}

#if (LANES == 16 || LANES == 8) && defined(TERNQC_X86_LEVELS)
/* One vector of a bracket scan, read once: its values strictly between l and h appended to dst[*k...] (room as
   for compact) and c[0..3] gaining #(v > l), #(l < v < h), #(v < l) when want_lt and #(v > h) when want_gh
   (NaN compares false). The compares stay masks (AVX-512) or sign bits (AVX2), counted by popcount on the
   integer units; the values kept are compressed (AVX-512) or permuted by the table (AVX2) at every vector,
   without asking first whether any is kept. Returns the vector (for the min and max). */
INLINE vf NAME(bracket_vector)(const float *p, vf l, vf h, float *dst, int64_t *k, int64_t *c, int want_lt,
                               int want_gh)
{
#if LANES == 16
    const __m512 v = _mm512_loadu_ps(p);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, (__m512)l, _CMP_GT_OQ);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(gt, v, (__m512)h, _CMP_LT_OQ);
    _mm512_storeu_ps(dst + *k, _mm512_maskz_compress_ps(in, v));
    const int kept = __builtin_popcount((unsigned)in);
    *k += kept;
    const unsigned below = want_lt ? (unsigned)_mm512_cmp_ps_mask(v, (__m512)l, _CMP_LT_OQ) : 0u;
    const unsigned above = want_gh ? (unsigned)_mm512_cmp_ps_mask(v, (__m512)h, _CMP_GT_OQ) : 0u;
#else
    const __m256 v = _mm256_loadu_ps(p);
    const __m256 gtv = _mm256_cmp_ps(v, (__m256)l, _CMP_GT_OQ);
    const __m256 in = _mm256_and_ps(gtv, _mm256_cmp_ps(v, (__m256)h, _CMP_LT_OQ));
    const int64_t before = *k;
    NAME(compact)(p, (vi)in, dst, k); /* moves *k on */
    const int kept = (int)(*k - before);
    const unsigned gt = (unsigned)_mm256_movemask_ps(gtv);
    const unsigned below = want_lt ? (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, (__m256)l, _CMP_LT_OQ)) : 0u;
    const unsigned above = want_gh ? (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, (__m256)h, _CMP_GT_OQ)) : 0u;
#endif
    c[0] += __builtin_popcount((unsigned)gt);
    c[1] += kept;
    c[2] += __builtin_popcount(below);
    c[3] += __builtin_popcount(above);
    return (vf)v;
}
#endif

/* min(v, m) and max(v, m) lane by lane, keeping m where v is NaN (x86's min/max take the second operand then) */
INLINE vf NAME(min)(vf v, vf m)
{
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
    return (vf)_mm512_min_ps((__m512)v, (__m512)m);
#elif LANES == 8 && defined(TERNQC_X86_LEVELS)
    return (vf)_mm256_min_ps((__m256)v, (__m256)m);
#else
    const vi take = (vi)(v < m);
    return (vf)(((vi)v & take) | ((vi)m & ~take));
#endif
}

INLINE vf NAME(max)(vf v, vf m)
{
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
    return (vf)_mm512_max_ps((__m512)v, (__m512)m);
#elif LANES == 8 && defined(TERNQC_X86_LEVELS)
    return (vf)_mm256_max_ps((__m256)v, (__m256)m);
#else
    const vi take = (vi)(v > m);
    return (vf)(((vi)v & take) | ((vi)m & ~take));
#endif
}

/* The float64 lanes of the sums in registers of the width: HALF doubles each (the floats of half a vector),
   NACC of them for the SUM_LANES lanes; accumulator m holds lanes m*HALF .. m*HALF+HALF-1. Named variables, not an
   array, so that they stay in registers: LANE_VARS declares them, LANE_LOAD / LANE_STORE move them from / to
   an array of SUM_LANES doubles, LANE_ADD(p, take_abs) adds the SUM_LANES floats at p (their magnitudes). */
typedef float NAME(fh) __attribute__((vector_size(2 * LANES)));
typedef int32_t NAME(ih) __attribute__((vector_size(2 * LANES)));
typedef double NAME(dh) __attribute__((vector_size(4 * LANES)));
#define fh NAME(fh)
#define ih NAME(ih)
#define dh NAME(dh)
#define HALF (LANES / 2)
#define NACC (SUM_LANES / HALF)

/* half a vector of floats to doubles in one instruction (GCC splits the generic conversion at 16 lanes) */
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
#define TO_DOUBLE(f) ((dh)_mm512_cvtps_pd((__m256)(f)))
#elif LANES == 8 && defined(TERNQC_X86_LEVELS)
#define TO_DOUBLE(f) ((dh)_mm256_cvtps_pd((__m128)(f)))
#else
#define TO_DOUBLE(f) __builtin_convertvector((f), dh)
#endif
#define LANE_EACH(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11) F(12) F(13) F(14) F(15)
#define LANE_VARS dh a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}, a8 = {0}, \
    a9 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0}, a14 = {0}, a15 = {0}
#define LANE_LOAD1(m) if ((m) < NACC) memcpy(&a##m, lanes_ + (m) * HALF, sizeof a##m);
#define LANE_STORE1(m) if ((m) < NACC) memcpy(lanes_ + (m) * HALF, &a##m, sizeof a##m);
#define LANE_ADD1(m)                                                                                             \
    if ((m) < NACC) {                                                                                            \
        fh f;                                                                                                    \
        memcpy(&f, p_ + (m) * HALF, sizeof f);                                                                   \
        if (abs_) f = (fh)((ih)f & half_magnitude);                                                              \
        a##m += TO_DOUBLE(f);                                                                                    \
    }
#define LANE_LOAD(lanes) do { const double *lanes_ = (lanes); LANE_EACH(LANE_LOAD1) } while (0)
#define LANE_STORE(lanes) do { double *lanes_ = (lanes); LANE_EACH(LANE_STORE1) } while (0)
#define LANE_ADD(p, take_abs) do { const float *p_ = (p); const int abs_ = (take_abs); LANE_EACH(LANE_ADD1) } while (0)

/* The end of a call that sums along: the lanes back to lanes[0..SUM_LANES), their sum in order from +0 to
   lanes[SUM_LANES] (the row's sum once it is all scanned), the min and max to mm. */
INLINE void NAME(sums_done)(const double *lane, double *lanes, float *mm, float smin, float smax)
{
    memcpy(lanes, lane, SUM_LANES * sizeof *lane);
    double total = 0.0;
    for (int j = 0; j < SUM_LANES; j++) total += lane[j];
    lanes[SUM_LANES] = total;
    mm[0] = smin;
    mm[1] = smax;
}

/* One bracket over x[0..n), up to where dst (room for cap >= BLOCK values) could fill: counts[0..3] gain
   #(x > lo), #(lo < x < hi), #(x < lo) if want_lt, #(x > hi) if want_gh over the values scanned; the values
   strictly inside are written in order to dst, *kept of them. With sums (1: of the values, 2: of their
   magnitudes) the same pass continues the fixed-order sums of row_sums: lanes[0..SUM_LANES) (x[0] is lane 0)
   and mm[0], mm[1] (min and max of the values not NaN) are read and updated. Returns how many values were
   scanned (n, or fewer, a multiple of BLOCK, when dst could fill: call again for the rest). Lane counts are
   int32, folded every 2^24 values. */
INLINE int64_t NAME(scan_one)(const float *x, int64_t n, float l, float h, int want_lt, int want_gh,
                              int64_t *counts, float *dst, int64_t cap, int64_t *kept, int sums,
                              double *lanes, float *mm)
{
    const vf lv = NAME(splat)(l), hv = NAME(splat)(h);
    const ih half_magnitude = (ih){0} + 0x7fffffff;
    int64_t c_gt = 0, c_ge = 0, c_lt = 0, c_gh = 0, k = 0;
    LANE_VARS;
    vf mn = NAME(splat)(INFINITY), mx = NAME(splat)(-INFINITY);
    if (sums) LANE_LOAD(lanes);
    int64_t i = 0;
#if (LANES == 16 || LANES == 8) && defined(TERNQC_X86_LEVELS)
    /* each vector read and compared once (`bracket_vector`), where the generic loop below compares twice and
       reads a block twice when it keeps a value (about half the blocks with a 1% bracket): 32 MiB from memory
       in 1.9 ms against 3.1 with AVX-512 */
    {
        int64_t c[4] = {0, 0, 0, 0};
        for (; i + BLOCK <= n && k + BLOCK <= cap; i += BLOCK) {
            const float *p = x + i;
            for (int j = 0; j < BLOCK; j += LANES) {
                const vf v = NAME(bracket_vector)(p + j, lv, hv, dst, &k, c, want_lt, want_gh);
                if (sums) {
                    mn = NAME(min)(v, mn);
                    mx = NAME(max)(v, mx);
                }
            }
            if (sums)
                for (int j = 0; j < BLOCK; j += SUM_LANES) LANE_ADD(p + j, sums == 2);
        }
        /* x >= hi is x > lo and not lo < x < hi (NaN is neither); with lo >= hi nothing is inside and the
           difference is not used (counts[1]) */
        c_gt += c[0], c_ge += c[0] - c[1], c_lt += c[2], c_gh += c[3];
    }
#else
    vi gt = {0}, ge = {0}, lt = {0}, gh = {0};
    for (; i + BLOCK <= n && k + BLOCK <= cap; i += BLOCK) {
        const float *p = x + i;
        vi bgt = {0}, bge = {0};
        for (int j = 0; j < BLOCK; j += LANES) {
            const vf v = NAME(load)(p + j);
            bgt = NAME(count_lt)(bgt, lv, v);
            bge = NAME(count_le)(bge, hv, v);
            if (want_lt) lt = NAME(count_lt)(lt, v, lv);
            if (want_gh) gh = NAME(count_lt)(gh, hv, v);
            if (sums) {
                mn = NAME(min)(v, mn);
                mx = NAME(max)(v, mx);
            }
        }
        if (sums)
            for (int j = 0; j < BLOCK; j += SUM_LANES) LANE_ADD(p + j, sums == 2);
        if (NAME(any)(bgt - bge)) {  /* some lo < x < hi: x > lo and not x >= hi */
            for (int j = 0; j < BLOCK; j += LANES) NAME(keep_between)(p + j, lv, hv, dst, &k);
        }
        gt += bgt;
        ge += bge;
        if (((i + BLOCK) & ((1 << 24) - 1)) == 0) {
            c_gt += NAME(hsum)(gt), c_ge += NAME(hsum)(ge), c_lt += NAME(hsum)(lt), c_gh += NAME(hsum)(gh);
            gt = ge = lt = gh = (vi){0};
        }
    }
    c_gt += NAME(hsum)(gt), c_ge += NAME(hsum)(ge), c_lt += NAME(hsum)(lt), c_gh += NAME(hsum)(gh);
#endif
    if (i + BLOCK <= n || k + (n - i) > cap) n = i; /* dst may fill: the rest in the next call */
    double lane[SUM_LANES];
    float smin = sums ? mm[0] : 0.0f, smax = sums ? mm[1] : 0.0f;
    if (sums) {
        LANE_STORE(lane);
        for (int q = 0; q < LANES; q++) {
            smin = mn[q] < smin ? mn[q] : smin;
            smax = mx[q] > smax ? mx[q] : smax;
        }
    }
    for (; i < n; i++) {
        const float v = x[i];
        c_gt += v > l;
        c_ge += v >= h;
        c_lt += want_lt && v < l;
        c_gh += want_gh && v > h;
        if (v > l && v < h) dst[k++] = v;
        if (sums) { /* i is past a whole number of lane groups from x: lane i % SUM_LANES */
            smin = v < smin ? v : smin;
            smax = v > smax ? v : smax;
            lane[i % SUM_LANES] += sums == 2 ? fabsf(v) : v;
        }
    }
    if (sums) NAME(sums_done)(lane, lanes, mm, smin, smax);
    counts[0] += c_gt;
    counts[1] += l < h ? c_gt - c_ge : 0; /* lo < hi: x >= hi implies x > lo (NaN is neither); else none */
    counts[2] += c_lt;
    counts[3] += c_gh;
    *kept = k;
    return n;
}

static int64_t NAME(scan_bracket)(const float *x, int64_t n, float lo, float hi, int32_t flags,
                                  int64_t *counts, float *out, int64_t cap, int64_t *kept, double *lanes, float *mm)
{
    /* constant flags: each case compiles without the work it skips */
#define SCAN(lt, gh, sums) return NAME(scan_one)(x, n, lo, hi, lt, gh, counts, out, cap, kept, sums, lanes, mm)
#define SCAN_SUMS(lt, gh)                                                                                        \
    switch ((flags >> 2) & 3) {                                                                                  \
    case 0: SCAN(lt, gh, 0);                                                                                     \
    case 1: SCAN(lt, gh, 1);                                                                                     \
    default: SCAN(lt, gh, 2);                                                                                    \
    }
    switch (flags & 3) {
    case 0: SCAN_SUMS(0, 0)
    case 1: SCAN_SUMS(1, 0)
    case 2: SCAN_SUMS(0, 1)
    default: SCAN_SUMS(1, 1)
    }
#undef SCAN_SUMS
#undef SCAN
}

/* scan_row over x (over |x| with magnitudes); with sums (1: of the values, 2: of their magnitudes) the same pass
   continues the fixed-order sums and min/max of the raw values, as scan_one does (lanes, mm). */
INLINE int64_t NAME(scan_row_body)(const float *x, int64_t n, float cut, float lo, int keep,
                                   int64_t *acc, double *sum, float *top, float *out, int64_t cap,
                                   int magnitudes, int sums, double *lanes, float *mm)
{
    const vf cv = NAME(splat)(cut), lv = NAME(splat)(lo);
    const vi magnitude = (vi){0} + 0x7fffffff;
    const ih half_magnitude = (ih){0} + 0x7fffffff;
    vd s = {0};
    vf mx = {0};
    vi cc = {0};
    int64_t c = 0, k = 0;
    LANE_VARS;
    vf rmn = NAME(splat)(INFINITY), rmx = NAME(splat)(-INFINITY);
    if (sums) LANE_LOAD(lanes);
    int64_t i = 0;
    for (; i + BLOCK <= n && (!keep || k + BLOCK <= cap); i += BLOCK) {
        const float *p = x + i;
        vi seen = {0};
        for (int j = 0; j < BLOCK; j += LANES) {
            vf v = NAME(load)(p + j);
            if (sums) {
                rmn = NAME(min)(v, rmn);
                rmx = NAME(max)(v, rmx);
            }
            if (magnitudes) v = (vf)((vi)v & magnitude);
            const vi a = (vi)(v > cv);
            const vf w = (vf)((vi)v & a); /* v where v > cut, else +0 */
            cc -= a;
            const vi bigger = (vi)(w > mx);
            mx = (vf)(((vi)w & bigger) | ((vi)mx & ~bigger));
            s += __builtin_convertvector(w, vd);
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
            if (keep) { /* lo < v <= cut: the compares stay masks, straight into the compress (as keep_between) */
                const __mmask16 m = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask((__m512)v, (__m512)lv, _CMP_GT_OQ),
                                                            (__m512)v, (__m512)cv, _CMP_LE_OQ);
                _mm512_storeu_ps(out + k, _mm512_maskz_compress_ps(m, (__m512)v));
                k += __builtin_popcount((unsigned)m);
            }
#else
            if (keep) seen |= (vi)(v > lv) & ~a;
#endif
        }
        if (sums)
            for (int j = 0; j < BLOCK; j += SUM_LANES) LANE_ADD(p + j, sums == 2);
        if (LANES < 16 && keep && NAME(any)(seen)) {
            for (int j = 0; j < BLOCK; j += LANES) {
                vf v = NAME(load)(p + j);
                if (magnitudes) v = (vf)((vi)v & magnitude);
                const vi inside = (vi)(v > lv) & ~(vi)(v > cv);
                if (NAME(any)(inside)) {
                    float held[LANES]; /* the magnitudes, for the compaction (which reads memory) */
                    memcpy(held, &v, sizeof held);
                    NAME(compact)(held, inside, out, &k);
                }
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
    double lane[SUM_LANES];
    float smin = sums ? mm[0] : 0.0f, smax = sums ? mm[1] : 0.0f;
    if (sums) {
        LANE_STORE(lane);
        for (int q = 0; q < LANES; q++) {
            smin = rmn[q] < smin ? rmn[q] : smin;
            smax = rmx[q] > smax ? rmx[q] : smax;
        }
    }
    for (; i < n; i++) {
        const float r = x[i];
        const float v = magnitudes ? fabsf(r) : r;
        if (sums) { /* i is past a whole number of lane groups from x: lane i % SUM_LANES */
            smin = r < smin ? r : smin;
            smax = r > smax ? r : smax;
            lane[i % SUM_LANES] += sums == 2 ? fabsf(r) : r;
        }
        if (v > cut) {
            c++;
            total += v;
            m = v > m ? v : m;
        } else if (keep && v > lo) {
            out[k++] = v;
        }
    }
    if (sums) NAME(sums_done)(lane, lanes, mm, smin, smax);
    acc[0] = c;
    acc[1] = k;
    *sum = total;
    *top = m;
    return n;
}

static int64_t NAME(scan_row)(const float *x, int64_t n, float cut, float lo, int32_t flags,
                              int64_t *acc, double *sum, float *top, float *out, int64_t cap, double *lanes, float *mm)
{
    /* constant flags: each case compiles without the work it skips */
#define ROW(keep, mag, sums) return NAME(scan_row_body)(x, n, cut, lo, keep, acc, sum, top, out, cap, mag, sums, lanes, mm)
    switch (flags & 15) {
    case 0: ROW(0, 0, 0);
    case 1: ROW(1, 0, 0);
    case 2 | 1: ROW(1, 1, 0);
    case 2 | 1 | 4: ROW(1, 1, 1);
    case 2 | 1 | 8: ROW(1, 1, 2);
    case 2 | 4: ROW(0, 1, 1);
    case 2 | 8: ROW(0, 1, 2);
    case 2: ROW(0, 1, 0);
    case 1 | 4: ROW(1, 0, 1);
    case 1 | 8: ROW(1, 0, 2);
    case 4: ROW(0, 0, 1);
    default: ROW(0, 0, 2);
    }
#undef ROW
}

/* Per row r of the k rows of n values at x (row r at x + r*n): sums[r] = the float64 sum of the row's values
   (their magnitudes when take_abs) in the fixed order that defines ternqc's sums: value i goes to lane
   i % SUM_LANES, each lane adds its values in order starting from +0, and the lanes are added in order
   starting from +0 (every width gives the same bits: a lane is never split or reassociated). Over every row:
   mm[0] and mm[1] the min and max of the values that are not NaN. Returns 1 when a value is NaN or +-Inf
   (its row's sum is then not finite), else 0. */
INLINE int64_t NAME(row_sums_body)(const float *x, int64_t k, int64_t n, int take_abs, double *sums, float *mm)
{
    const ih half_magnitude = (ih){0} + 0x7fffffff;
    vf lo = NAME(splat)(INFINITY), hi = NAME(splat)(-INFINITY);
    float slo = INFINITY, shi = -INFINITY;
    int64_t bad = 0;
    for (int64_t r = 0; r < k; r++) {
        const float *row = x + r * n;
        LANE_VARS;
        int64_t i = 0;
        for (; i + SUM_LANES <= n; i += SUM_LANES) {
            for (int j = 0; j < SUM_LANES; j += LANES) {
                const vf v = NAME(load)(row + i + j);
                lo = NAME(min)(v, lo);
                hi = NAME(max)(v, hi);
            }
            LANE_ADD(row + i, take_abs);
        }
        double lane[SUM_LANES];
        LANE_STORE(lane);
        for (; i < n; i++) { /* the last n % SUM_LANES values: lane i % SUM_LANES */
            const float v = row[i];
            slo = v < slo ? v : slo;
            shi = v > shi ? v : shi;
            lane[i % SUM_LANES] += take_abs ? fabsf(v) : v;
        }
        double total = 0.0;
        for (int j = 0; j < SUM_LANES; j++) total += lane[j];
        sums[r] = total;
        bad |= !(fabs(total) <= DBL_MAX); /* a NaN or +-Inf value makes its row's sum NaN or +-Inf */
    }
    for (int q = 0; q < LANES; q++) {
        slo = lo[q] < slo ? lo[q] : slo;
        shi = hi[q] > shi ? hi[q] : shi;
    }
    mm[0] = slo;
    mm[1] = shi;
    return bad;
}

static int64_t NAME(row_sums)(const float *x, int64_t k, int64_t n, int32_t take_abs, double *sums, float *mm)
{
    if (take_abs) return NAME(row_sums_body)(x, k, n, 1, sums, mm);
    return NAME(row_sums_body)(x, k, n, 0, sums, mm);
}

/* --- Exact selection: the values at given ranks, by brackets from a sample and one counting pass each --- */

/* At most this many values are sorted (insertion sort) instead of bracketed. */
#define SELECT_SMALL 48

/* The smallest prime >= n (1 for n <= 1). */
static int64_t NAME(prime_at_least)(int64_t n)
{
    if (n <= 2) return n < 1 ? 1 : n;
    for (int64_t c = n | 1;; c += 2) {
        int prime = 1;
        for (int64_t p = 3; p * p <= c; p += 2)
            if (c % p == 0) { prime = 0; break; }
        if (prime) return c;
    }
}

/* The selection's pass over x[0..n): counts[0] = #(x > l), counts[1] = #(x < h), and when want_lt / want_gh
   counts[2] = #(x < l), counts[3] = #(x > h) (NaN in none); the values strictly between l and h written in order
   to dst (room for n + LANES values), *kept of them. Two comparisons a vector in the common case (the two extra
   counts only tell an atom at l or h from the values beyond it, rarely needed), no branch on the data. Lane
   counts are int32, folded every 2^24 values. */
static void NAME(select_count)(const float *x, int64_t n, float l, float h, int want_lt, int want_gh,
                               int64_t *counts, float *dst, int64_t *kept)
{
    const vf lv = NAME(splat)(l), hv = NAME(splat)(h);
    int64_t c_gt = 0, c_lh = 0, c_lt = 0, c_gh = 0, k = 0, i = 0;
    while (i + LANES <= n) {
        const int64_t end = i + (((n - i) / LANES) * LANES < (1 << 24) ? ((n - i) / LANES) * LANES : (1 << 24));
        vi gt = {0}, lh = {0}, lt = {0}, gh = {0};
#if LANES == 16 && defined(TERNQC_X86_LEVELS)
        for (; i < end; i += LANES) {
            const __m512 v = _mm512_loadu_ps(x + i);
            const __mmask16 g = _mm512_cmp_ps_mask(v, (__m512)lv, _CMP_GT_OQ);
            const __mmask16 s = _mm512_cmp_ps_mask(v, (__m512)hv, _CMP_LT_OQ);
            gt = (vi)_mm512_mask_sub_epi32((__m512i)gt, g, (__m512i)gt, _mm512_set1_epi32(-1));
            lh = (vi)_mm512_mask_sub_epi32((__m512i)lh, s, (__m512i)lh, _mm512_set1_epi32(-1));
            if (want_lt) lt = NAME(count_lt)(lt, (vf)v, lv);
            if (want_gh) gh = NAME(count_lt)(gh, hv, (vf)v);
            const __mmask16 in = g & s;
            _mm512_storeu_ps(dst + k, _mm512_maskz_compress_ps(in, v));
            k += __builtin_popcount((unsigned)in);
        }
#else
        for (; i < end; i += LANES) {
            const vf v = NAME(load)(x + i);
            const vi g = (vi)(v > lv), s = (vi)(v < hv);
            gt -= g;
            lh -= s;
            if (want_lt) lt -= (vi)(v < lv);
            if (want_gh) gh -= (vi)(v > hv);
            NAME(compact)(x + i, g & s, dst, &k);
        }
#endif
        c_gt += NAME(hsum)(gt), c_lh += NAME(hsum)(lh), c_lt += NAME(hsum)(lt), c_gh += NAME(hsum)(gh);
    }
    for (; i < n; i++) {
        const float v = x[i];
        c_gt += v > l;
        c_lh += v < h;
        c_lt += want_lt && v < l;
        c_gh += want_gh && v > h;
        if (v > l && v < h) dst[k++] = v;
    }
    counts[0] = c_gt, counts[1] = c_lh, counts[2] = c_lt, counts[3] = c_gh;
    *kept = k;
}

/* select_count into *dst, made here (room for every value): 0, or -1 when memory could not be had. */
static int NAME(select_pass)(const float *x, int64_t n, float l, float h, int want_lt, int want_gh,
                             int64_t *counts, float **dst, int64_t *kept)
{
    *dst = malloc((size_t)(n + LANES) * sizeof **dst);
    if (*dst == NULL) return -1;
    NAME(select_count)(x, n, l, h, want_lt, want_gh, counts, *dst, kept);
    return 0;
}

/* The counts a rank at or beyond a bracket end [lo, hi] needs and the bracket's pass did not make (-1): *lt_lo =
   #(x < lo) when the first rank ks[0] is below le_lo = #(x <= lo), *le_hi = n_finite - #(x > hi) when the last rank
   is at or past lt_hi = #(x < hi); each by a counting pass of its own over x[0..n), which keeps nothing. */
static void NAME(far_counts)(const float *x, int64_t n, int64_t finite, float lo, float hi, const int64_t *ks,
                             int64_t nk, int64_t le_lo, int64_t lt_hi, int64_t *lt_lo, int64_t *le_hi)
{
    float none[LANES]; /* the destination of a counting pass over (v, v): nothing is strictly inside */
    int64_t c[4], zero;
    if (*lt_lo < 0 && ks[0] < le_lo) {
        NAME(select_count)(x, n, lo, lo, 1, 0, c, none, &zero);
        *lt_lo = c[2];
    }
    if (*le_hi < 0 && ks[nk - 1] >= lt_hi) {
        NAME(select_count)(x, n, hi, hi, 0, 1, c, none, &zero);
        *le_hi = finite - c[3];
    }
}

/* How many of the s values of sample equal v. */
static int64_t NAME(count_equal)(const float *sample, int64_t s, float v)
{
    int64_t c = 0;
    for (int64_t i = 0; i < s; i++) c += sample[i] == v;
    return c;
}

static int NAME(select)(const float *x, int64_t n, int64_t finite, const int64_t *ks, int64_t nk, float *out);

/* select's bracket for the ranks ks[0..nk) (ascending) among the `finite` values of x[0..n) that are not NaN: a
   sample of every stride-th value (stride a prime >= n / want: no aliasing with a tensor's layout; the first
   values in order when NaN hide too many), its order statistics around the ranks' positions, 3 standard
   deviations of a sample rank (at most sqrt(s)/2) + 4 away, as [*lo, *hi] (-inf / +inf past the sample's ends),
   and whether the sample holds lo, hi more than once (*atom_lo, *atom_hi: an atom the pass should count beyond).
   Returns 0; 1 when fewer than 32 values could be sampled (nothing set); -1 when memory could not be had. */
static int NAME(sample_bracket)(const float *x, int64_t n, int64_t finite, const int64_t *ks, int64_t nk, float *lo,
                                float *hi, int *atom_lo, int *atom_hi)
{
    int64_t want = finite / 8;
    want = want < 32 ? 32 : want > 2048 ? 2048 : want;
    float *sample = malloc((size_t)want * sizeof *sample);
    if (sample == NULL) return -1;
    const int64_t stride = NAME(prime_at_least)(n / want);
    int64_t s = 0;
    for (int64_t i = 0; i < n && s < want; i += stride)
        if (x[i] == x[i]) sample[s++] = x[i];
    if (s < 32)
        for (int64_t i = s = 0; i < n && s < want; i++)
            if (x[i] == x[i]) sample[s++] = x[i];
    if (s < 32) {
        free(sample);
        return 1;
    }
    const int64_t d = (int64_t)(1.5 * sqrt((double)s)) + 4;
    const int64_t i_lo = (int64_t)floor((double)ks[0] / (double)(finite - 1) * (double)(s - 1)) - d;
    const int64_t i_hi = (int64_t)ceil((double)ks[nk - 1] / (double)(finite - 1) * (double)(s - 1)) + d;
    int64_t pk[2];
    float pv[2];
    int np = 0;
    if (i_lo >= 0) pk[np++] = i_lo;
    if (i_hi < s) pk[np++] = i_hi;
    if (np && NAME(select)(sample, s, s, pk, np, pv)) {
        free(sample);
        return -1;
    }
    *lo = i_lo >= 0 ? pv[0] : -INFINITY;
    *hi = i_hi < s ? pv[np - 1] : INFINITY;
    *atom_lo = *lo > -INFINITY && NAME(count_equal)(sample, s, *lo) > 1;
    *atom_hi = *hi < INFINITY && NAME(count_equal)(sample, s, *hi) > 1;
    free(sample);
    return 0;
}

/* out[i] = the value at 0-based rank ks[i] (ascending, each < finite) among the `finite` values of x[0..n) that
   are not NaN (x is only read). Each round: a strided sample of the values, its order statistics around the
   ranks (by this selection, on the sample) as a bracket [lo, hi], one pass that counts the values <= lo and
   < hi (and < lo, <= hi when the sample shows an atom there; else in a pass of their own when a rank needs
   them) and copies those strictly between; a rank between the counts is selected among the copies, a
   rank at lo or hi (an atom) is lo or hi, and a rank outside (the sample misled) among the values below lo or
   above hi (a second pass). Every round leaves out at least one value, so it ends; a few dozen values are
   sorted. Returns 0, or -1 when memory could not be had. */
static int NAME(select)(const float *x, int64_t n, int64_t finite, const int64_t *ks, int64_t nk, float *out)
{
    if (nk <= 0) return 0;
    if (finite <= SELECT_SMALL) {
        float a[SELECT_SMALL];
        int64_t m = 0;
        for (int64_t i = 0; i < n && m < SELECT_SMALL; i++)
            if (x[i] == x[i]) a[m++] = x[i];
        for (int64_t i = 1; i < m; i++) {
            const float v = a[i];
            int64_t j = i - 1;
            while (j >= 0 && a[j] > v) {
                a[j + 1] = a[j];
                j--;
            }
            a[j + 1] = v;
        }
        for (int64_t i = 0; i < nk; i++) out[i] = a[ks[i]];
        return 0;
    }
    if (nk > 1 && ks[nk - 1] - ks[0] > finite / 8) { /* far apart: one bracket each side */
        const int64_t h = nk / 2;
        if (NAME(select)(x, n, finite, ks, h, out)) return -1;
        return NAME(select)(x, n, finite, ks + h, nk - h, out + h);
    }
    float lo, hi;
    int atom_lo, atom_hi;
    if (NAME(sample_bracket)(x, n, finite, ks, nk, &lo, &hi, &atom_lo, &atom_hi)) return -1; /* finite > 48 */
    /* the counts beyond an atom at lo or hi, in the same pass when the sample shows the atom */
    const int want_lt = atom_lo && lo < hi, want_gh = atom_hi && lo < hi;
    int64_t c[4], kept;
    float *mid;
    if (NAME(select_pass)(x, n, lo, hi, want_lt, want_gh, c, &mid, &kept)) return -1;
    /* ranks [lt_lo, le_lo) are lo, [le_lo, lt_hi) among the copies, [lt_hi, le_hi) are hi; lt_lo and le_hi only
       matter for a rank below le_lo or from lt_hi on: counted now when not known (lo = hi: from the others) */
    const int64_t le_lo = finite - c[0], lt_hi = c[1] > le_lo ? c[1] : le_lo;
    int64_t lt_lo = lo == -INFINITY ? 0 : lo >= hi ? c[1] : want_lt ? c[2] : -1;
    int64_t le_hi = hi == INFINITY ? finite : lo >= hi ? le_lo : want_gh ? finite - c[3] : -1;
    NAME(far_counts)(x, n, finite, lo, hi, ks, nk, le_lo, lt_hi, &lt_lo, &le_hi);
    int64_t rel[64];
    int rc = 0;
    int64_t i = 0;
    while (i < nk && rc == 0) { /* runs of ranks in the same place, at most 64 at a time */
        const int64_t k = ks[i];
        if (lt_lo <= k && k < le_lo) { out[i++] = lo; continue; }
        if (lt_hi <= k && k < le_hi) { out[i++] = hi; continue; }
        int64_t j = i, m = 0;
        if (le_lo <= k && k < lt_hi) { /* between: among the copies */
            while (j < nk && m < 64 && le_lo <= ks[j] && ks[j] < lt_hi) rel[m++] = ks[j++] - le_lo;
            rc = NAME(select)(mid, kept, kept, rel, m, out + i);
        } else if (k < lt_lo) { /* below lo: among the values in (-inf, lo), -inf itself by its count */
            float *below;
            int64_t cb[4], nb;
            if (NAME(select_pass)(x, n, -INFINITY, lo, 0, 0, cb, &below, &nb)) { rc = -1; break; }
            const int64_t ninf = finite - cb[0];
            while (j < nk && m < 64 && ks[j] < lt_lo) { /* lt_lo = ninf + nb */
                if (ks[j] < ninf) out[j] = -INFINITY;
                rel[m++] = ks[j] < ninf ? -1 : ks[j] - ninf;
                j++;
            }
            int64_t r2[64], q = 0;
            for (int64_t t = 0; t < m; t++) if (rel[t] >= 0) r2[q++] = rel[t];
            float v2[64];
            rc = NAME(select)(below, nb, nb, r2, q, v2);
            for (int64_t t = 0, u = 0; t < m; t++) if (rel[t] >= 0) out[i + t] = v2[u++];
            free(below);
        } else { /* above hi: among the values in (hi, +inf), +inf itself by its count */
            float *above;
            int64_t ca[4], na;
            if (NAME(select_pass)(x, n, hi, INFINITY, 0, 0, ca, &above, &na)) { rc = -1; break; }
            while (j < nk && m < 64 && ks[j] >= le_hi) {
                rel[m++] = ks[j] - le_hi < na ? ks[j] - le_hi : -1;
                j++;
            }
            int64_t r2[64], q = 0;
            for (int64_t t = 0; t < m; t++) if (rel[t] >= 0) r2[q++] = rel[t];
            float v2[64];
            rc = NAME(select)(above, na, na, r2, q, v2);
            for (int64_t t = 0, u = 0; t < m; t++) out[i + t] = rel[t] >= 0 ? v2[u++] : INFINITY;
            free(above);
        }
        i = j;
    }
    free(mid);
    return rc;
}

/* row_sums over the k rows of n values at x and, in the same pass, out[i] = the value at 0-based rank ks[i]
   (ascending, each < k * n, nk <= 64) among all of them, when every value is finite: a bracket from a strided
   sample (as select places it), and the pass that reads the values for the sums also counts them against it
   and copies those inside; a rank inside is selected among the copies, a rank at an end is that end, and a
   rank the sample misled (outside) by select over all the values. Ranks far apart, or too few values to
   sample: the sums, then select. Returns 1 when a value is NaN or +-Inf (sums and mm as row_sums gives them,
   out not written), -1 when memory could not be had (nothing to use), else 0. */
static int64_t NAME(row_sums_select)(const float *x, int64_t k, int64_t n, int take_abs, double *sums, float *mm,
                                     const int64_t *ks, int64_t nk, float *out)
{
    const int64_t total = k * n;
    if (nk <= 0 || nk > 64 || total <= 8 * SELECT_SMALL || (nk > 1 && ks[nk - 1] - ks[0] > total / 8)) {
        if (NAME(row_sums)(x, k, n, take_abs, sums, mm)) return 1;
        return nk > 0 && NAME(select)(x, total, total, ks, nk, out) ? -1 : 0;
    }
    /* the sample and its bracket, as select's first round (a NaN among the values: the pass tells) */
    float lo, hi;
    int atom_lo, atom_hi;
    const int placed = NAME(sample_bracket)(x, total, total, ks, nk, &lo, &hi, &atom_lo, &atom_hi);
    if (placed < 0) return -1;
    if (placed > 0) { /* NaN nearly everywhere: no fusing */
        if (NAME(row_sums)(x, k, n, take_abs, sums, mm)) return 1;
        return NAME(select)(x, total, total, ks, nk, out) ? -1 : 0;
    }
    /* the counts beyond an atom at lo or hi in the same pass when the sample shows it (or lo = hi) */
    const int want_lt = lo > -INFINITY && (lo >= hi || atom_lo), want_gh = hi < INFINITY && (lo >= hi || atom_hi);
    float *mid = malloc((size_t)(total + BLOCK) * sizeof *mid);
    if (mid == NULL) return -1;
    int64_t c[4] = {0, 0, 0, 0}, kept = 0, bad = 0;
    double lanes[SUM_LANES + 1];
    float range[2] = {INFINITY, -INFINITY};
    for (int64_t r = 0; r < k; r++) { /* each row's sums from +0, as row_sums */
        int64_t row_kept = 0;
        memset(lanes, 0, sizeof lanes);
        NAME(scan_one)(x + r * n, n, lo, hi, want_lt, want_gh, c, mid + kept, total + BLOCK - kept, &row_kept,
                       take_abs ? 2 : 1, lanes, range);
        kept += row_kept;
        sums[r] = lanes[SUM_LANES];
        bad |= !(fabs(sums[r]) <= DBL_MAX);
    }
    mm[0] = range[0];
    mm[1] = range[1];
    if (bad) {
        free(mid);
        return 1;
    }
    /* ranks [lt_lo, le_lo) are lo, [le_lo, lt_hi) among the copies, [lt_hi, le_hi) are hi */
    const int64_t le_lo = total - c[0], lt_hi = le_lo + c[1];
    int64_t lt_lo = lo == -INFINITY ? 0 : want_lt ? c[2] : -1;
    int64_t le_hi = hi == INFINITY ? total : want_gh ? total - c[3] : -1;
    NAME(far_counts)(x, total, total, lo, hi, ks, nk, le_lo, lt_hi, &lt_lo, &le_hi);
    int64_t rel[64], m = 0, first = -1;
    int outside = 0;
    for (int64_t i = 0; i < nk; i++) {
        const int64_t r = ks[i];
        if (lt_lo <= r && r < le_lo) out[i] = lo;
        else if (lt_hi <= r && r < le_hi) out[i] = hi;
        else if (le_lo <= r && r < lt_hi) { /* ascending: one run */
            if (first < 0) first = i;
            rel[m++] = r - le_lo;
        } else outside = 1;
    }
    int rc = 0;
    if (outside) /* the sample misled: every rank by select over all the values */
        rc = NAME(select)(x, total, total, ks, nk, out);
    else if (m)
        rc = NAME(select)(mid, kept, kept, rel, m, out + first);
    free(mid);
    return rc ? -1 : 0;
}

#undef SELECT_SMALL

#undef HALF
#undef NACC
#undef LANE_EACH
#undef LANE_VARS
#undef LANE_LOAD1
#undef LANE_STORE1
#undef LANE_ADD1
#undef LANE_LOAD
#undef LANE_STORE
#undef LANE_ADD
#undef TO_DOUBLE

#undef fh
#undef ih
#undef dh
#undef vf
#undef vi
#undef vl
#undef vd
#undef BLOCK
#undef INLINE
