/* ternqc's calibration scans, each one pass over the values; `runtime/calibrate/scan_kernel.py` is the only
   caller, and without this library it computes the same results with numpy.

   ternqc_scan_bracket: for a bracket (lo, hi), the counts of x > lo, lo < x < hi, x < lo, x > hi and the values
   strictly inside, in order (exact quantiles, `bracket.py`). ternqc_scan_row: over finite values >= 0, the
   count, float64 sum and max of those > cut and the values in (lo, cut] (the activation scale's band,
   `stats/threshold_state.py`). ternqc_row_sums: per row the float64 sum of the values or of their magnitudes
   in ternqc's fixed order (32 lanes), and the min and max of them all, in one pass
   (`stats/sums.py`'s per-batch sums and the block's probe).

   Portable C (GCC or Clang vector extensions). On x86-64 with GCC 12+ the scans are compiled three times, for
   AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the baseline, and the CPU picks one when the library loads;
   elsewhere once, four floats a vector. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Lanes of the fixed-order float64 sums (ternqc_row_sums): a multiple of every vector width, and enough
   independent additions to hide their latency. */
#define SUM_LANES 32

/* The AVX-512 and AVX2 versions need GCC 12 or later (`#pragma GCC target`, __builtin_shufflevector); with
   another compiler the baseline version alone is built. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TERNQC_X86_LEVELS 1
#endif

#ifdef TERNQC_X86_LEVELS
#include <immintrin.h>

/* For AVX2's compaction: per 8-bit mask, the lanes to gather, set lanes first (the rest filled with 0). */
static uint8_t ternqc_compact8[256][8];

__attribute__((constructor)) static void ternqc_compact8_init(void)
{
    for (int m = 0; m < 256; m++) {
        int j = 0;
        for (int q = 0; q < 8; q++)
            if (m & (1 << q)) ternqc_compact8[m][j++] = (uint8_t)q;
        while (j < 8) ternqc_compact8[m][j++] = 0;
    }
}

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define LANES 16
#define NAME(f) f##_v4
#include "scan_body.h"
#undef LANES
#undef NAME
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define LANES 8
#define NAME(f) f##_v3
#include "scan_body.h"
#undef LANES
#undef NAME
#pragma GCC pop_options
#endif

#define LANES 4
#define NAME(f) f##_v1
#include "scan_body.h"
#undef LANES
#undef NAME

/* The calling convention of this file's functions: scan_kernel.py refuses a library built with another
   (a stale build), and scans in numpy instead. */
int32_t ternqc_scan_abi(void) { return 6; }

/* The vector width this CPU runs: 16, 8 or 4 floats. */
int32_t ternqc_scan_lanes(void)
{
#ifdef TERNQC_X86_LEVELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return 16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
        return 8;
#endif
    return 4;
}

/* One bracket (lo < hi) over x[0..n), as far as out (room for cap >= 64 values) allows: counts[0..3] gain
   #(x > lo), #(lo < x < hi), #(x < lo) when flags & 1 and #(x > hi) when flags & 2 over the values scanned; the
   values strictly inside are written in order to out, *kept of them. NaN compares false everywhere. With
   flags & 4 (the values) or flags & 8 (their magnitudes), the same pass continues ternqc_row_sums's sums and
   min/max over x as a row (or the rest of one, from a multiple of SUM_LANES): lanes[0..SUM_LANES) and mm[0..2)
   are read and updated (start from zeros and +Inf, -Inf), and lanes[SUM_LANES] is set to the lanes added in
   order from +0 (the row's sum after the call that scans its last value). flags & 16 zeroes counts first;
   flags & 32 starts the sums afresh (lanes zero, mm +Inf and -Inf). Returns
   how many values were scanned: n, or fewer, a multiple of SUM_LANES, when out could fill (call again for the
   rest). `lanes`: ternqc_scan_lanes() or fewer. */
int64_t ternqc_scan_bracket(int32_t lanes, const float *x, int64_t n, float lo, float hi, int32_t flags,
                            int64_t *counts, float *out, int64_t cap, int64_t *kept, double *sum_lanes, float *mm)
{
    if (flags & 16) memset(counts, 0, 4 * sizeof *counts); /* a new bracket: counts from zero */
    if (flags & 32) { /* a new row: sums from +0, min and max from +Inf and -Inf */
        memset(sum_lanes, 0, (SUM_LANES + 1) * sizeof *sum_lanes);
        mm[0] = INFINITY;
        mm[1] = -INFINITY;
    }
#ifdef TERNQC_X86_LEVELS
    if (lanes >= 16) return scan_bracket_v4(x, n, lo, hi, flags, counts, out, cap, kept, sum_lanes, mm);
    if (lanes >= 8) return scan_bracket_v3(x, n, lo, hi, flags, counts, out, cap, kept, sum_lanes, mm);
#endif
    (void)lanes;
    return scan_bracket_v1(x, n, lo, hi, flags, counts, out, cap, kept, sum_lanes, mm);
}

/* Over a row of finite values >= 0 (of |x| with flags & 2), as far as out (room for cap >= 64 values) allows
   when keeping (flags & 1): acc[0] = the count, *sum the float64 sum (exact while n * max < 2^53 float32
   spacings of cut, and then the same in any order) and *top the max (0 with none) of the values > cut; when
   keeping, the values in (lo, cut] written in order to out, acc[1] of them. With flags & 4 (the values) or
   flags & 8 (their magnitudes) the same pass continues ternqc_row_sums's sums and the min/max of the raw
   values over x as a row, as ternqc_scan_bracket does (lanes[0..SUM_LANES], mm; flags & 32 starts them
   afresh). Returns how many values were scanned (n, or fewer, a multiple of SUM_LANES: call again). */
int64_t ternqc_scan_row(int32_t lanes, const float *x, int64_t n, float cut, float lo, int32_t flags,
                        int64_t *acc, double *sum, float *top, float *out, int64_t cap, double *sum_lanes, float *mm)
{
    if (flags & 32) {
        memset(sum_lanes, 0, (SUM_LANES + 1) * sizeof *sum_lanes);
        mm[0] = INFINITY;
        mm[1] = -INFINITY;
    }
#ifdef TERNQC_X86_LEVELS
    if (lanes >= 16) return scan_row_v4(x, n, cut, lo, flags, acc, sum, top, out, cap, sum_lanes, mm);
    if (lanes >= 8) return scan_row_v3(x, n, cut, lo, flags, acc, sum, top, out, cap, sum_lanes, mm);
#endif
    (void)lanes;
    return scan_row_v1(x, n, cut, lo, flags, acc, sum, top, out, cap, sum_lanes, mm);
}

/* Per row of the k rows of n values at x: sums[r], the float64 sum of the values (of |values| when take_abs)
   in ternqc's fixed order (value i to lane i % 32, each lane in order from +0, the lanes in order from +0);
   over them all mm[0], mm[1] the min and max of the values that are not NaN. Returns 1 when a value is NaN
   or +-Inf (its row's sum is then NaN or +-Inf, and the min/max are not to be used), else 0. */
int64_t ternqc_row_sums(int32_t lanes, const float *x, int64_t k, int64_t n, int32_t take_abs, double *sums,
                        float *mm)
{
#ifdef TERNQC_X86_LEVELS
    if (lanes >= 16) return row_sums_v4(x, k, n, take_abs, sums, mm);
    if (lanes >= 8) return row_sums_v3(x, k, n, take_abs, sums, mm);
#endif
    (void)lanes;
    return row_sums_v1(x, k, n, take_abs, sums, mm);
}

/* out[i] = the value at 0-based rank ks[i] (ascending, each < finite) among the `finite` values of x[0..n) that
   are not NaN, exactly (x is only read): brackets from samples and one counting pass each, no sort and no
   branch per value (numpy's partition mispredicts about every other comparison on fresh data: ~8 ns a value).
   Returns 0, or -1 when memory could not be had (nothing is then known). */
int32_t ternqc_select(int32_t lanes, const float *x, int64_t n, int64_t finite, const int64_t *ks, int64_t nk,
                      float *out)
{
#ifdef TERNQC_X86_LEVELS
    if (lanes >= 16) return select_v4(x, n, finite, ks, nk, out);
    if (lanes >= 8) return select_v3(x, n, finite, ks, nk, out);
#endif
    (void)lanes;
    return select_v1(x, n, finite, ks, nk, out);
}

/* ternqc_row_sums over the k rows of n values at x and, in the same pass (one read of the values instead of two),
   out[i] = the value at 0-based rank ks[i] (ascending, each < k * n, nk <= 64) among all of them, exactly, as
   ternqc_select gives them. Returns 1 when a value is NaN or +-Inf (sums and mm as ternqc_row_sums, out not
   written), -1 when memory could not be had (nothing to use), else 0. */
int32_t ternqc_row_sums_select(int32_t lanes, const float *x, int64_t k, int64_t n, int32_t take_abs, double *sums,
                               float *mm, const int64_t *ks, int64_t nk, float *out)
{
#ifdef TERNQC_X86_LEVELS
    if (lanes >= 16) return (int32_t)row_sums_select_v4(x, k, n, take_abs, sums, mm, ks, nk, out);
    if (lanes >= 8) return (int32_t)row_sums_select_v3(x, k, n, take_abs, sums, mm, ks, nk, out);
#endif
    (void)lanes;
    return (int32_t)row_sums_select_v1(x, k, n, take_abs, sums, mm, ks, nk, out);
}
