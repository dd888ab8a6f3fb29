"""This package's CPU kernels, AVX-512 C built at run time with the host's C compiler and loaded with ctypes: the
int8 / int4 decode GEMV and dequantize of quantization.py's ``cpu-avx512`` backend (:class:`Avx512`), the bf16 decode
GEMV of linear.py's Linear (:func:`linear_bf16`) and the one-token decode attention of modeling_chatglm.py's SDPA
path (:func:`decode_attention`).

Imported the first time a layer is bound to the CPU (``pack_weights``; linear.cpu_kernel). :class:`Avx512` takes the
published storage format (``weight`` int8 [out, in*bits/8], int4 element 2j in the high nibble) and the
``weight_scale`` tensor, and offers the interface of quantization.py's kernels: ``usable``, ``matmul``, ``pack`` /
``unpack`` / ``scales``.
"""
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .quantization import FLOAT_DTYPES, in_row_chunks, pack_int4, unpack_int4

logger = logging.get_logger(__name__)

_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------------
# This package's kernels (x86-64 with AVX-512): readable C, compiled at run time, loaded with ctypes
# ---------------------------------------------------------------------------------------------------------------------
CPU_SOURCE = r"""
/* Weight-only int8 / int4 matmul and dequantize for x86-64 CPUs with AVX-512 (F, BW, VNNI), compiled at run time
 * with the host's C compiler (-O3 -march=native, plus -fopenmp when available) by cpu_kernels.py.
 *
 * Weight layout ("codes"): each weight q is stored as the unsigned code u = q + OFFSET (OFFSET = 128 for int8, 8 for
 * int4), in chunks of 128 columns of one row (128 bytes for int8, 64 for int4), with the rows taken in groups of
 * GROUP_ROWS whose chunks are interleaved: [N / GROUP_ROWS][K / 128][GROUP_ROWS rows][chunk].
 *   int8: byte j of chunk t of a row is the code of column 128t + j (the stored weight with its sign bit flipped);
 *   int4: byte j (0..63) of chunk t holds column 128t + 64 + j in its high nibble and column 128t + j in its low one.
 * The decode kernel reads 4 rows together: one sequential stream with GROUP_ROWS 4 (1.2-1.5x faster on AMD EPYCs),
 * 4 row-major streams with GROUP_ROWS 1 (1.07-1.23x faster on the Intel Xeon; see benchmarks/README.md).
 *
 * Decode (few input rows): each input row x is first written as fixed-point integers in groups of 128 columns,
 * x[c] ~= s_g * v[c] with |v| < 2^15 (2 pieces: bf16 / fp16 inputs) or < 2^23 (3 pieces: fp32 inputs), and v
 * split into int8 pieces, v = hi * 256 + lo (or hi * 65536 + mid * 256 + lo). The dot products of the unsigned
 * weight codes with each piece are exact int32 VNNI sums (vpdpbusd, 64 multiply-adds per instruction); their
 * combination is scaled by s_g and accumulated in fp32. The offset term OFFSET * sum(v) is the same for every
 * output row and is subtracted once. The rounding of x to 16 (24) bits per group is finer than the input's own
 * rounding for every element within 2^-7 (2^-0) of its group's largest magnitude.
 * out[m][n] = scale[n] * (sum_g s_g * sum_{c in g} u[n][c] * v[m][c] - OFFSET * sum_g s_g * sum_{c in g} v[m][c]).
 */
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "these kernels need AVX-512 F, BW and VNNI"
#endif

#define ROWS 8          /* rows per block of output rows (one task of the thread split) */
#define CHUNK 128       /* columns per chunk */
#define GROUP CHUNK     /* columns per activation scale (one chunk) */
/* Set by the build per CPU (-D, see cpu_tuning() in cpu_kernels.py): software prefetch distances in bytes (0: none,
 * the hardware prefetchers alone), PREFETCH_INT8 / PREFETCH_INT4 ahead in the quantized stream, PREFETCH_ROW ahead
 * of each bf16 row; GROUP_ROWS (1 or 4), the layout's rows per group. */
#if !defined(PREFETCH_INT8) || !defined(PREFETCH_INT4) || !defined(PREFETCH_ROW) || !defined(GROUP_ROWS)
#error "build with the -D flags of cpu_kernels.compile_flags (PREFETCH_INT8/INT4/ROW, GROUP_ROWS)"
#endif

enum { TYPE_F32 = 0, TYPE_BF16 = 1, TYPE_F16 = 2 };

/* 16 values of type `type` at x[i] -> fp32 */
static inline __m512 load16(const void *x, int type, int64_t i) {
    if (type == TYPE_F32) return _mm512_loadu_ps((const float *)x + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    if (type == TYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* fp32 -> one value of type `type` at dst[i] (round to nearest even) */
static inline void store1(void *dst, int type, int64_t i, float v) {
    if (type == TYPE_F32) {
        ((float *)dst)[i] = v;
    } else if (type == TYPE_F16) {
        ((uint16_t *)dst)[i] = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        union { float f; uint32_t u; } b = { .f = v };
        if ((b.u & 0x7fffffffu) > 0x7f800000u) ((uint16_t *)dst)[i] = (uint16_t)((b.u >> 16) | 0x40);  /* NaN */
        else ((uint16_t *)dst)[i] = (uint16_t)((b.u + 0x7fffu + ((b.u >> 16) & 1)) >> 16);
    }
}

/* 16 fp32 -> 16 values of type `type` at dst[i] */
static inline void store16(void *dst, int type, int64_t i, __m512 v) {
    if (type == TYPE_F32) {
        _mm512_storeu_ps((float *)dst + i, v);
    } else if (type == TYPE_F16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  /* the values are finite here: |q * scale| <= 128 * max|scale| */
        __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    }
}

#ifdef __GFNI__  /* the high nibble of every byte, in one affine byte transform (bits 4..7 -> 0..3) */
#define HIGH_NIBBLE(b) _mm512_gf2p8affine_epi64_epi8((b), _mm512_set1_epi64((long long)0x1020408000000000ull), 0)
#else
#define HIGH_NIBBLE(b) _mm512_and_si512(_mm512_srli_epi16((b), 4), _mm512_set1_epi8(0x0f))
#endif

/* Chunk t of row `row` of a block in the codes layout: [row / GROUP_ROWS][t][row % GROUP_ROWS][chunk] (see the top) */
static inline __attribute__((always_inline)) const uint8_t *chunk_at(const uint8_t *block, int64_t row, int64_t t,
                                                                    int64_t k, int bits) {
    return block + (row / GROUP_ROWS) * GROUP_ROWS * k * bits / 8
           + (t * GROUP_ROWS + row % GROUP_ROWS) * CHUNK * bits / 8;
}

static inline __m512i low_byte(__m512i v) { return _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24); }
static inline void store_bytes(int8_t *dst, __m512i v) { _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(v)); }

/* One input row -> its int8 pieces (piece p at q + p * k), per group g the scales applied to the combined first
 * two pieces (gs[2g]) and to the third (gs[2g + 1]), and the return value sum_g s_g * sum(v in g). */
static double prepare_row(const void *x, int type, int64_t k, int pieces, int8_t *q, float *gs) {
    const int32_t vmax = pieces == 2 ? 32639 : 8323072;  /* so that the top piece stays within [-127, 127] */
    double total = 0;
    for (int64_t g = 0; g < k / GROUP; g++) {
        __m512 v[GROUP / 16], amax = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int j = 0; j < GROUP / 16; j++) {
            v[j] = load16(x, type, g * GROUP + 16 * j);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
            nan |= _mm512_cmp_ps_mask(v[j], v[j], _CMP_UNORD_Q);
        }
        const float mx = _mm512_reduce_max_ps(amax);
        float s = mx / (float)vmax, inv = mx > 0 ? (float)vmax / mx : 0.0f;
        if (nan || isinf(mx)) s = NAN, inv = 0.0f;  /* non-finite inputs give non-finite outputs */
        __m512i sum = _mm512_setzero_si512();
        for (int j = 0; j < GROUP / 16; j++) {
            __m512i iv = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[j], _mm512_set1_ps(inv)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            iv = _mm512_min_epi32(_mm512_max_epi32(iv, _mm512_set1_epi32(-vmax)), _mm512_set1_epi32(vmax));
            sum = _mm512_add_epi32(sum, iv);
            const int64_t c = g * GROUP + 16 * j;
            const __m512i lo = low_byte(iv), rest = _mm512_srai_epi32(_mm512_sub_epi32(iv, lo), 8);
            store_bytes(q + (pieces - 1) * k + c, lo);
            if (pieces == 2) {
                store_bytes(q + c, rest);
            } else {
                const __m512i mid = low_byte(rest);
                store_bytes(q + k + c, mid);
                store_bytes(q + c, _mm512_srai_epi32(_mm512_sub_epi32(rest, mid), 8));
            }
        }
        gs[2 * g] = pieces == 2 ? s : s * 256.0f;
        gs[2 * g + 1] = s;
        total += (double)s * (double)_mm512_reduce_add_epi32(sum);
    }
    return total;
}

/* acc += the scaled dot product of one chunk's 128 unsigned weight codes (w0: columns 0..63, w1: 64..127) with
 * group t of one prepared row. Per lane the int32 sums stay below 2^27 (8 products of codes <= 255 and pieces). */
static inline __attribute__((always_inline)) __m512 dot_group(__m512 acc, __m512i w0, __m512i w1, const int8_t *q,
                                                             const float *gs, int64_t t, int64_t k, int pieces) {
    const int8_t *p = q + t * GROUP;
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(p));
    s = _mm512_slli_epi32(_mm512_dpbusd_epi32(s, w1, _mm512_loadu_si512(p + 64)), 8);
    s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, w0, _mm512_loadu_si512(p + k)), w1, _mm512_loadu_si512(p + k + 64));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(gs[2 * t]), acc);
    if (pieces == 3) {
        __m512i s2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(p + 2 * k));
        s2 = _mm512_dpbusd_epi32(s2, w1, _mm512_loadu_si512(p + 2 * k + 64));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(gs[2 * t + 1]), acc);
    }
    return acc;
}

/* Rows r0 .. r0+R-1 of one block against MC prepared input rows: out[i * n + r] (before the offset and scale). */
static inline __attribute__((always_inline)) void block_pass(const uint8_t *block, int bits, int pieces, int64_t k,
                                                            const int8_t *q, const float *gs, int R, int r0, int MC,
                                                            float *sums) {
    const int64_t qstride = pieces * k, gstride = 2 * (k / GROUP);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    __m512 acc[8][4];  /* R * MC <= 16 are used */
    for (int r = 0; r < R; r++)
        for (int i = 0; i < MC; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < k / CHUNK; t++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *chunk = chunk_at(block, r0 + r, t, k, bits);
            __m512i w0, w1;
            if (bits == 8) {
                if (PREFETCH_INT8) {
                    _mm_prefetch((const char *)chunk + PREFETCH_INT8, _MM_HINT_T0);
                    _mm_prefetch((const char *)chunk + 64 + PREFETCH_INT8, _MM_HINT_T0);
                }
                w0 = _mm512_loadu_si512(chunk);
                w1 = _mm512_loadu_si512(chunk + 64);
            } else {
                if (PREFETCH_INT4) _mm_prefetch((const char *)chunk + PREFETCH_INT4, _MM_HINT_T0);
                const __m512i b = _mm512_loadu_si512(chunk);
                w0 = _mm512_and_si512(b, nibble);
                w1 = HIGH_NIBBLE(b);
            }
            for (int i = 0; i < MC; i++)
                acc[r][i] = dot_group(acc[r][i], w0, w1, q + i * qstride, gs + i * gstride, t, k, pieces);
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < MC; i++) sums[i * ROWS + r0 + r] = _mm512_reduce_add_ps(acc[r][i]);
}

/* one block of 8 rows against up to 4 prepared rows, with compile-time shapes (so the loops unroll into registers) */
#define PASS(BITS, PIECES, R, R0, MC) block_pass(block, BITS, PIECES, k, q, gs, R, R0, MC, sums)
#define BLOCK_CASES(BITS, PIECES)                                                                   \
    switch (mc) {                                                                                   \
    case 1: PASS(BITS, PIECES, 4, 0, 1); PASS(BITS, PIECES, 4, 4, 1); break;                       \
    case 2: PASS(BITS, PIECES, 8, 0, 2); break;                                                     \
    case 3: PASS(BITS, PIECES, 4, 0, 3); PASS(BITS, PIECES, 4, 4, 3); break;                       \
    default: PASS(BITS, PIECES, 4, 0, 4); PASS(BITS, PIECES, 4, 4, 4); break;                      \
    }
static void block_dot(const uint8_t *block, int bits, int pieces, int64_t k, const int8_t *q, const float *gs,
                      int mc, float *sums) {
    if (bits == 8 && pieces == 2) { BLOCK_CASES(8, 2) }
    else if (bits == 8) { BLOCK_CASES(8, 3) }
    else if (pieces == 2) { BLOCK_CASES(4, 2) }
    else { BLOCK_CASES(4, 3) }
}

/* out [m, n] (out_type) = x [m, k] (x_type) @ dequantized(w)^T, for m <= 16; n % 8 == 0, k % 128 == 0.
 * pieces: 2 or 3 (see the top); scratch: m * (pieces * k + 8 * k / GROUP) bytes. */
void chatglm_cpu_matmul(const void *x, int x_type, int64_t m, const uint8_t *w, int bits, const float *scale,
                        void *out, int out_type, int64_t n, int64_t k, int pieces, void *scratch, int threads) {
    int8_t *q = (int8_t *)scratch;
    float *gs = (float *)(q + m * pieces * k);
    double offset_term[16];
    const double offset = bits == 8 ? 128.0 : 8.0;
    for (int64_t i = 0; i < m; i++)
        offset_term[i] = offset * prepare_row((const char *)x + i * k * (x_type == TYPE_F32 ? 4 : 2), x_type, k,
                                              pieces, q + i * pieces * k, gs + i * 2 * (k / GROUP));
    const int64_t block_bytes = ROWS * k * bits / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n / ROWS; b++) {
        float sums[4 * ROWS];
        for (int64_t i = 0; i < m; i += 4) {  /* input rows in groups of up to 4 */
            const int mc = m - i < 4 ? (int)(m - i) : 4;
            block_dot(w + b * block_bytes, bits, pieces, k, q + i * pieces * k, gs + i * 2 * (k / GROUP), mc, sums);
            for (int j = 0; j < mc; j++)
                for (int r = 0; r < ROWS; r++) {
                    const int64_t row = b * ROWS + r;
                    store1(out, out_type, (i + j) * n + row,
                           scale[row] * (float)((double)sums[j * ROWS + r] - offset_term[i + j]));
                }
        }
    }
}

/* ---- bf16 weights (unquantized models) ------------------------------------------------------------------------ */

/* acc + the products of the bf16 pairs in a and b, summed per 32-bit lane (vdpbf16ps where the CPU has it) */
static inline __m512 dp_bf16(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else  /* bf16 -> fp32 is a 16-bit shift: even and odd elements separately */
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                          acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)),
                           acc);
#endif
}

/* 32 bf16 of x and w at column c (fewer at the row end: masked to zero), multiplied in pairs and added to acc */
static inline __m512 dot32_bf16(__m512 acc, const uint16_t *w, const uint16_t *x, int64_t c, __mmask32 mask) {
    return dp_bf16(acc, _mm512_maskz_loadu_epi16(mask, w + c), _mm512_maskz_loadu_epi16(mask, x + c));
}

/* Row w of a row-major bf16 weight against MC bf16 input rows, each weight vector loaded once; two accumulator chains
 * per input (columns c and c + 32): one sequential stream per pass, the fastest on every CPU measured. */
static inline __attribute__((always_inline)) void row_bf16(const uint16_t *x, int MC, const uint16_t *w, int64_t k,
                                                           const uint16_t *bias, uint16_t *out, int64_t n) {
    __m512 acc[4][2];
    for (int i = 0; i < MC; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 64)
        for (int h = 0; h < 2; h++) {
            const int64_t left = k - c - 32 * h;  /* the row end: masked (a zero mask loads nothing) */
            const __mmask32 m = left >= 32 ? 0xffffffffu : left <= 0 ? 0 : (__mmask32)((1u << left) - 1);
            if (PREFETCH_ROW) _mm_prefetch((const char *)(w + c + 32 * h) + PREFETCH_ROW, _MM_HINT_T0);
            for (int i = 0; i < MC; i++) acc[i][h] = dot32_bf16(acc[i][h], w, x + i * k, c + 32 * h, m);
        }
    for (int i = 0; i < MC; i++) {
        float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
        if (bias != NULL) {
            union { uint32_t u; float f; } b = { .u = (uint32_t)bias[0] << 16 };
            v += b.f;
        }
        store1(out, TYPE_BF16, i * n, v);
    }
}

/* out [m, n] = x [m, k] @ w [n, k]^T (+ bias [n]), all bf16, w row-major as stored (no layout of its own); m <= 4.
 * fp32 accumulation, one rounding. Each thread takes a contiguous range of rows. */
void chatglm_cpu_linear_bf16(const uint16_t *x, int64_t m, const uint16_t *w, const uint16_t *bias, uint16_t *out,
                             int64_t n, int64_t k, int threads) {
#define ROWS_BF16(MC)                                                                                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                         \
    for (int64_t r = 0; r < n; r++) row_bf16(x, MC, w + r * k, k, bias == NULL ? NULL : bias + r, out + r, n);
    switch (m) {
    case 1: { ROWS_BF16(1) } break;
    case 2: { ROWS_BF16(2) } break;
    case 3: { ROWS_BF16(3) } break;
    default: { ROWS_BF16(4) } break;
    }
#undef ROWS_BF16
}

/* ---- decode attention (one query row per head) ---------------------------------------------------------------- */

/* e^x for x <= 0 (softmax after subtracting the max): 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by its
 * Taylor series to degree 6 (relative error < 2e-7); 0 below -87, NaN for NaN. */
static inline __m512 exp_nonpositive(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    const float c[6] = {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 6; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    const __mmask16 above = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ);
    const __m512 e = _mm512_maskz_mov_ps(above, _mm512_scalef_ps(p, n));
    return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  /* NaN stays NaN (as in SDPA) */
}

#define KEY_BLOCK 64  /* keys whose values are widened to fp32 at a time (64 * d * 4 bytes: stays in L1) */

/* out [nb][nh][g][d] = softmax(q k^T * scale) v for the g <= 16 query rows that share each key/value head; all bf16,
 * d % 64 == 0, d <= 256; k and v rows of d contiguous values at element strides (batch, head, row); mask: NULL, or
 * per batch row (stride ms) one byte per key, 0 = masked out. fp32 scores, softmax and accumulation, one rounding.
 * scratch: nb * nh * (16 * len + (KEY_BLOCK + 16) * d) floats. */
void chatglm_cpu_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                                  int64_t nb, int64_t nh, int64_t g, int64_t len, int64_t d, int64_t kb, int64_t kh,
                                  int64_t kr, int64_t vb, int64_t vh, int64_t vr, const uint8_t *mask, int64_t ms,
                                  float scale, float *scratch, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < nb * nh; task++) {
        const int64_t b = task / nh, h = task % nh;
        const uint16_t *qt = q + task * g * d, *kt = k + b * kb + h * kh, *vt = v + b * vb + h * vh;
        float *s = scratch + task * (16 * len + (KEY_BLOCK + 16) * d), *vf = s + 16 * len, *acc = vf + KEY_BLOCK * d;
        __m512i qp[128];  /* the queries transposed: qp[p] = dims (2p, 2p + 1) of the g rows, row i in lane i */
        for (int64_t p = 0; p < d / 2; p++) {
            uint32_t lanes[16] = {0};
            for (int64_t i = 0; i < g; i++) lanes[i] = ((const uint32_t *)(qt + i * d))[p];
            qp[p] = _mm512_loadu_si512(lanes);
        }
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t l = 0; l < len; l++) {  /* the scores of key l for all rows: one vector, no reduction */
            const uint32_t *kl = (const uint32_t *)(kt + l * kr);
            __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t p = 0; p < d / 2; p += 4)  /* (four independent sums) */
                for (int c = 0; c < 4; c++)
                    a[c] = dp_bf16(a[c], _mm512_set1_epi32((int)kl[p + c]), qp[p + c]);
            __m512 sc = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                                      _mm512_set1_ps(scale));
            if (mask != NULL && !mask[b * ms + l]) sc = _mm512_set1_ps(-INFINITY);
            _mm512_storeu_ps(s + 16 * l, sc);
            mx = _mm512_max_ps(mx, sc);
        }
        for (int64_t l = 0; l < len; l++) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * l), mx));
            _mm512_storeu_ps(s + 16 * l, e);
            sum = _mm512_add_ps(sum, e);
        }
        float inv[16];
        _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
        for (int64_t i = 0; i < 16 * d; i++) acc[i] = 0.0f;
        for (int64_t l0 = 0; l0 < len; l0 += KEY_BLOCK) {
            const int64_t n = len - l0 < KEY_BLOCK ? len - l0 : KEY_BLOCK;
            for (int64_t l = 0; l < n; l++)
                for (int64_t j = 0; j < d; j += 16)
                    _mm512_storeu_ps(vf + l * d + j, load16(vt + (l0 + l) * vr, TYPE_BF16, j));
            for (int64_t i = 0; i < g; i += 2)  /* acc[i] += sum_l p[i][l] v[l], two rows and 64 columns at a time */
                for (int64_t j = 0; j < d; j += 64) {
                    const int64_t i1 = i + 1 < g ? i + 1 : i;  /* (an odd last row is computed twice) */
                    __m512 a[2][4];
                    for (int c = 0; c < 4; c++) {
                        a[0][c] = _mm512_loadu_ps(acc + i * d + j + 16 * c);
                        a[1][c] = _mm512_loadu_ps(acc + i1 * d + j + 16 * c);
                    }
                    for (int64_t l = 0; l < n; l++) {
                        const float *pl = s + 16 * (l0 + l);
                        const __m512 p0 = _mm512_set1_ps(pl[i]), p1 = _mm512_set1_ps(pl[i1]);
                        for (int c = 0; c < 4; c++) {
                            const __m512 x = _mm512_loadu_ps(vf + l * d + j + 16 * c);
                            a[0][c] = _mm512_fmadd_ps(p0, x, a[0][c]);
                            a[1][c] = _mm512_fmadd_ps(p1, x, a[1][c]);
                        }
                    }
                    for (int c = 0; c < 4; c++) {
                        _mm512_storeu_ps(acc + i * d + j + 16 * c, a[0][c]);
                        _mm512_storeu_ps(acc + i1 * d + j + 16 * c, a[1][c]);
                    }
                }
        }
        for (int64_t i = 0; i < g; i++)
            for (int64_t j = 0; j < d; j++) store1(out, TYPE_BF16, task * g * d + i * d + j, acc[i * d + j] * inv[i]);
    }
}

/* out [n, k] (row-major, out_type) = q * scale, rounded once: the same as torch's q.to(T) * scale for a model-dtype
 * scale (given here widened to fp32; q * scale is then exact in fp32). */
void chatglm_cpu_dequantize(const uint8_t *w, int bits, const float *scale, void *out, int out_type,
                            int64_t n, int64_t k, int threads) {
    const int64_t block_bytes = ROWS * k * bits / 8;
    const int cb = CHUNK * bits / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n / ROWS; b++) {
        const __m512i offset = _mm512_set1_epi32(bits == 8 ? 128 : 8), nibble = _mm512_set1_epi32(0x0f);
        for (int64_t t = 0; t < k / CHUNK; t++) {
            for (int r = 0; r < ROWS; r++) {
                const uint8_t *chunk = chunk_at(w + b * block_bytes, r, t, k, bits);
                const int64_t row = b * ROWS + r, c = t * CHUNK;
                const __m512 s = _mm512_set1_ps(scale[row]);
                for (int j = 0; j < cb; j += 16) {
                    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(chunk + j)));
                    if (bits == 8) {
                        store16(out, out_type, row * k + c + j,
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(u, offset)), s));
                    } else {
                        const __m512i lo = _mm512_and_si512(u, nibble), hi = _mm512_srli_epi32(u, 4);
                        store16(out, out_type, row * k + c + j,
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, offset)), s));
                        store16(out, out_type, row * k + c + 64 + j,
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, offset)), s));
                    }
                }
            }
        }
    }
}

"""

BLOCK_ROWS = 8  # out_features must be a multiple of it (ROWS in CPU_SOURCE: the threads split the rows in blocks)
CHUNK = 128  # columns per chunk of the codes layout (CHUNK in CPU_SOURCE)
GROUP = CHUNK  # input columns per fixed-point scale in the decode kernel (GROUP in CPU_SOURCE)
GEMV_MAX_ROWS = 16  # inputs with more rows: dequantize in chunks and let torch's GEMM do the work
DEQUANT_CHUNK_BYTES = 8 << 20  # bytes of weight dequantized at a time for that GEMM
IO_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # TYPE_* in CPU_SOURCE
PIECES = {torch.float32: 3, torch.bfloat16: 2, torch.float16: 2}  # int8 pieces per input value (see CPU_SOURCE)
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # /proc/cpuinfo names
COMPILE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pipe", "-x", "c")
# Per CPU (vendor, or vendor and family): software prefetch distances in bytes ahead in the int8 stream, the int4
# stream and each bf16 row (0 = none), the codes layout's GROUP_ROWS, and
# whether the decode attention kernel beats SDPA (2.0-2.5x on Zen 5; 0.66-1.04x on the Xeon, where vdpbf16ps has half
# the fp32 FMA's multiply-add rate: SDPA there). Measured with in-process A/Bs (benchmarks/bench_kernels_ab.py;
# results/kernels_*.txt, prefetch_*.txt): on the Intel Xeon (Sapphire Rapids class) 8 / 8 / 4 KiB, row-major codes; on
# the AMD EPYC Zen 4 (family 25, the AMD default) 2 / 2 / 8 KiB, Zen 5 (family 26) 4 / 8 / 8 KiB, interleaved groups
# of 4 rows. The bf16 GEMV reads one row per pass on every CPU (one sequential stream: 1.55x a 4-row pass on Zen 5,
# 1.04-1.07x on the Xeon); CHATGLM_CPU_PREFETCH="int8,int4,row" overrides the distances.
CPU_TUNING = {"GenuineIntel": (8192, 8192, 4096, 1, False), "AuthenticAMD": (2048, 2048, 8192, 4, True),
              "AuthenticAMD 26": (4096, 8192, 8192, 4, True)}
ATTENTION_KEY_BLOCK = 64  # KEY_BLOCK in CPU_SOURCE (sizes the decode attention's scratch)
_lib = None  # None: not tried yet; False: unavailable here
_scratch = threading.local()


def pack_codes(stored: torch.Tensor, bits: int, group_rows: int) -> torch.Tensor:
    """Stored format [N, K*bits/8] -> the "codes" layout of CPU_SOURCE (flat int8): unsigned codes in chunks of
    CHUNK columns, ``group_rows`` rows (GROUP_ROWS) interleaved chunk by chunk."""

    def pack_rows(rows_in):
        n = rows_in.shape[0]
        if bits == 8:
            codes = rows_in.view(torch.uint8) ^ 0x80  # q + 128
        else:
            nib = (unpack_int4(rows_in) + 8).view(torch.uint8).reshape(n, -1, 2, CHUNK // 2)  # [row, chunk, half, j]
            codes = nib[:, :, 0] | (nib[:, :, 1] << 4)
        cb = CHUNK * bits // 8
        grouped = codes.reshape(n // group_rows, group_rows, -1, cb).transpose(1, 2)
        return grouped.contiguous().view(torch.int8).reshape(-1)

    return in_row_chunks(pack_rows, stored)


def unpack_codes(packed: torch.Tensor, bits: int, n: int, k: int, group_rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: codes layout -> stored format [N, K*bits/8]."""
    cb = CHUNK * bits // 8
    codes = packed.view(torch.uint8).reshape(n // group_rows, k // CHUNK, group_rows, cb).transpose(1, 2)
    codes = codes.reshape(n, k // CHUNK, cb)
    if bits == 8:
        return (codes.reshape(n, k) ^ 0x80).view(torch.int8)
    return pack_int4(torch.stack((codes & 0xF, codes >> 4), dim=2).reshape(n, k).to(torch.int8) - 8)


def scratch_bytes(rows: int, k: int, pieces: int) -> int:
    """Bytes of scratch the matmul kernel needs for ``rows`` input rows (their int8 pieces and group scales)."""
    return rows * (pieces * k + 8 * (k // GROUP))


def _scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread reusable buffer of at least ``numel`` elements (so concurrent forwards never share one)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def kernel_dir() -> str:
    """Where the compiled library is cached: beside transformers' remote-code modules (under HF_HOME)."""
    from transformers.utils import HF_MODULES_CACHE

    return os.path.join(HF_MODULES_CACHE, "chatglm3_cpu_kernels")


def find_compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = ("vendor_id", "cpu family", "model name", "flags")
            return "".join(sorted({ln for ln in f if ln.startswith(fields)}))
    except OSError:
        return platform.processor()


def cpu_tuning(signature: str):
    """(int8, int4, row) prefetch distances in bytes, the codes layout's rows per group and whether to run the decode
    attention kernel, for this CPU (``CPU_TUNING``)."""
    vendor = next((v for v in ("GenuineIntel", "AuthenticAMD") if v in signature), "GenuineIntel")
    family = next((ln.split(":")[1].strip() for ln in signature.splitlines() if ln.startswith("cpu family")), "")
    *distances, group_rows, attention = CPU_TUNING.get(f"{vendor} {family}", CPU_TUNING[vendor])
    override = os.environ.get("CHATGLM_CPU_PREFETCH")
    if override:
        values = override.split(",")
        if len(values) != 3 or not all(v.strip().isdigit() for v in values):
            raise ValueError(f"CHATGLM_CPU_PREFETCH must be three byte counts >= 0, 'int8,int4,row' (e.g. "
                             f"8192,8192,4096); got {override!r}")
        distances = [int(v) for v in values]
    return (*distances, group_rows, attention)


def compile_flags(signature: str):
    names = ("PREFETCH_INT8", "PREFETCH_INT4", "PREFETCH_ROW", "GROUP_ROWS")
    return (*COMPILE_FLAGS, *(f"-D{name}={value}" for name, value in zip(names, cpu_tuning(signature)[:4])))


def library_path(compiler: str, signature: str) -> str:
    """The cached library for this source, compiler, flags and CPU."""
    key = hashlib.sha256("\0".join((CPU_SOURCE, compiler, " ".join(compile_flags(signature)), signature)).encode())
    return os.path.join(kernel_dir(), f"chatglm_cpu_{key.hexdigest()[:20]}.so")


def _compile(compiler: str, path: str, flags) -> bool:
    """Compile CPU_SOURCE into the shared library ``path``. The only process this package ever starts: the C
    compiler, with a fixed argument list (no shell). With OpenMP if the compiler has it (the library then shares
    torch's libgomp and its thread count), else single-threaded."""
    source, tmp = path[:-3] + ".c", f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(source, "w") as f:
            f.write(CPU_SOURCE)
    except OSError as e:  # e.g. a read-only HF_HOME
        logger.info("could not write the CPU quantization kernel source: %s", e)
        return False
    errors = ""
    for extra in (["-fopenmp"], []):
        try:
            proc = subprocess.run([compiler, *flags, *extra, source, "-o", tmp],
                                  capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, TMPDIR=os.path.dirname(path)))  # its temporaries too
        except (OSError, subprocess.SubprocessError) as e:
            errors = str(e)
            break
        if proc.returncode == 0:
            os.replace(tmp, path)  # atomic: concurrent processes never load a half-written library
            return True
        errors = proc.stderr
    if os.path.exists(tmp):
        os.remove(tmp)
    logger.info("could not compile the CPU quantization kernels: %s", errors.strip()[-2000:])
    return False


def _self_check(lib, group_rows: int) -> bool:
    """A small matmul (fp32 and bf16 inputs, 1 and 3 rows) and dequantize against plain torch: refuse a library
    that computes anything else."""
    gen = torch.Generator().manual_seed(0)
    n, k = 16, 256
    for bits in (8, 4):
        stored = torch.randint(-128, 128, (n, k * bits // 8), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen).bfloat16()
        weight = (unpack_int4(stored) if bits == 4 else stored).double() * scale.double()[:, None]  # exact
        packed = pack_codes(stored, bits, group_rows)
        if not torch.equal(unpack_codes(packed, bits, n, k, group_rows), stored):
            return False
        scale32 = scale.float()  # (every tensor whose address the library gets is held by a name)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            for rows in (1, 3):
                x = torch.randn(rows, k, generator=gen).to(dtype)
                out, scratch = torch.empty(rows, n, dtype=dtype), torch.empty(scratch_bytes(rows, k, 3),
                                                                              dtype=torch.uint8)
                lib.chatglm_cpu_matmul(x.data_ptr(), IO_TYPE[dtype], rows, packed.data_ptr(), bits, scale32.data_ptr(),
                                       out.data_ptr(), IO_TYPE[dtype], n, k, PIECES[dtype], scratch.data_ptr(), 1)
                want = x.double() @ weight.t()
                if not (out.double() - want).norm() <= tol * want.norm():
                    return False
        dense = torch.empty(n, k, dtype=torch.bfloat16)
        lib.chatglm_cpu_dequantize(packed.data_ptr(), bits, scale32.data_ptr(), dense.data_ptr(), 1, n, k, 1)
        if not torch.equal(dense, weight.float().bfloat16()):
            return False
    n, k = 10, 72  # a row tail (10 = 2 * 4 + 2) and a column tail (72 = 2 * 32 + 8)
    weight, bias = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, generator=gen).bfloat16()
    for rows in (1, 3):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        lib.chatglm_cpu_linear_bf16(x.data_ptr(), rows, weight.data_ptr(), bias.data_ptr(), out.data_ptr(), n, k, 1)
        if not torch.allclose(out.float(), F.linear(x.double(), weight.double(), bias.double()).float(),
                              rtol=1e-2, atol=1e-2):
            return False
    q, kv = torch.randn(1, 6, 1, 64, generator=gen).bfloat16(), torch.randn(2, 1, 2, 70, 64, generator=gen).bfloat16()
    want = F.scaled_dot_product_attention(q.double().view(1, 2, 3, 64), kv[0].double(), kv[1].double())
    return bool((decode_attention(q, kv[0], kv[1], lib=lib).double().view(1, 2, 3, 64) - want).abs().max() < 2e-2)


def load():
    """The compiled kernel library, or None where it cannot be had (not x86-64, no AVX-512, no C compiler,
    ``CHATGLM_CPU_KERNELS=0``, a failed build or self-check: those warn, once). Tried once per process."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _build_and_load() or False
    return _lib or None


def _build_and_load():
    if os.environ.get("CHATGLM_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        return None
    signature = cpu_signature()
    if not all(flag in signature.split() for flag in REQUIRED_FLAGS):
        return None
    compiler = find_compiler()
    if not compiler:
        logger.warning("No C compiler found (set CC or install gcc): this package's AVX-512 CPU kernels cannot be "
                       "built; bf16 decode uses oneDNN and quantized CPU layers torch's slower packed kernels.")
        return None
    path = library_path(compiler, signature)
    if not os.path.exists(path) and not _compile(compiler, path, compile_flags(signature)):
        logger.warning("Compiling the AVX-512 CPU quantization kernels failed (details at INFO level); bf16 decode "
                       "uses oneDNN and quantized CPU layers torch's slower packed kernels instead.")
        return None
    try:
        lib = ctypes.CDLL(path)
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {"matmul": [ptr, i32, i64, ptr, i32, ptr, ptr, i32, i64, i64, i32, ptr, i32],
                      "dequantize": [ptr, i32, ptr, ptr, i32, i64, i64, i32],
                      "linear_bf16": [ptr, i64, ptr, ptr, ptr, i64, i64, i32],
                      "decode_attention": [ptr, ptr, ptr, ptr, *[i64] * 11, ptr, i64, ctypes.c_float, ptr, i32]}
        for name, argtypes in signatures.items():
            function = getattr(lib, f"chatglm_cpu_{name}")
            function.argtypes, function.restype = argtypes, None
        lib.group_rows, lib.attention = cpu_tuning(signature)[3:]  # the codes layout this build reads; see CPU_TUNING
        ok = _self_check(lib, lib.group_rows)
    except OSError as e:  # a damaged cached library: remove it so that the next process rebuilds it
        logger.info("could not load the CPU quantization kernels from %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.remove(path)
        ok = False
    if not ok:
        logger.warning("The AVX-512 CPU quantization kernels could not be loaded or failed their self-check; bf16 "
                       "decode uses oneDNN and quantized CPU layers torch's packed kernels instead.")
        return None
    return lib


class Avx512:
    """This package's C kernels: up to GEMV_MAX_ROWS input rows, fused dequantize-and-multiply (decode); more,
    dequantize in row chunks into a reused buffer, then torch's GEMM (prefill). Weight in the codes layout,
    scales as fp32."""

    name = "cpu-avx512"
    layout = "codes"
    differentiable = False

    def usable(self, bits, out_features, in_features, dtype):
        return (out_features % BLOCK_ROWS == 0 and in_features % CHUNK == 0 and dtype in FLOAT_DTYPES
                and load() is not None)

    def pack(self, stored, bits):
        return pack_codes(stored, bits, load().group_rows)

    def unpack(self, packed, bits, out_features, in_features):
        return unpack_codes(packed, bits, out_features, in_features, load().group_rows)

    def scales(self, scale, in_features, dtype):
        return scale.to(torch.float32).contiguous()  # exact: the model-dtype scales widened

    def matmul(self, x2, packed, scale, bits, n, k):
        lib, threads, rows = _lib, torch.get_num_threads(), x2.shape[0]
        x2 = x2.contiguous()
        if rows <= GEMV_MAX_ROWS:
            pieces = PIECES[x2.dtype]
            out = torch.empty(rows, n, dtype=x2.dtype)
            scratch = _scratch_buffer(scratch_bytes(rows, k, pieces), torch.uint8)
            lib.chatglm_cpu_matmul(x2.data_ptr(), IO_TYPE[x2.dtype], rows, packed.data_ptr(), bits, scale.data_ptr(),
                                   out.data_ptr(), IO_TYPE[x2.dtype], n, k, pieces, scratch.data_ptr(), threads)
            return out
        # Row chunks of ~8 MB, dequantized into a reused per-thread buffer: they stay in cache for the GEMM, and no
        # full-size float weight is ever allocated (fresh pages cost more than the dequantization itself).
        chunk = max(BLOCK_ROWS, DEQUANT_CHUNK_BYTES // (k * x2.element_size()) // BLOCK_ROWS * BLOCK_ROWS)
        scratch = _scratch_buffer(min(chunk, n) * k, x2.dtype)
        pieces = []
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            weight = scratch[:count * k].view(count, k)
            lib.chatglm_cpu_dequantize(packed.data_ptr() + start * k * bits // 8, bits, scale.data_ptr() + start * 4,
                                       weight.data_ptr(), IO_TYPE[x2.dtype], count, k, threads)
            pieces.append(F.linear(x2, weight))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# bf16 decode: the GEMV of linear layers (on the weight as it is stored) and attention of one new token to the cache
# ---------------------------------------------------------------------------------------------------------------------
BF16_GEMV_MAX_ROWS = 4  # more input rows: torch's GEMM


def linear_bf16_takes(x, weight, bias) -> bool:
    """Whether :func:`linear_bf16` takes these tensors (all bf16 on CPU already): 1 to BF16_GEMV_MAX_ROWS rows of
    the weight's input width, contiguous weight and bias."""
    return (0 < x.numel() <= BF16_GEMV_MAX_ROWS * x.shape[-1] and x.shape[-1] == weight.shape[1]
            and weight.is_contiguous() and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def linear_bf16(x2: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``F.linear`` for bf16 on CPU where :func:`linear_bf16_takes` the inputs: reads the row-major weight once, as one
    sequential stream per thread (oneDNN's GEMV on this layout runs at a fraction of the memory bandwidth, and on
    its own prepacked layout below ours). Call only where :func:`load` gave the library."""
    x2 = x2.contiguous()
    rows, (n, k) = x2.shape[0], weight.shape
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    _lib.chatglm_cpu_linear_bf16(x2.data_ptr(), rows, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                 out.data_ptr(), n, k, torch.get_num_threads())
    return out


def decode_attention_takes(q, k, v, mask=None) -> bool:
    """Whether :func:`decode_attention` takes these: bf16 CPU tensors, one query row per head, up to 16 query heads
    per key/value head, head_dim a multiple of 64 up to 256, key/value rows contiguous; no mask, or a bool key mask
    [b, 1, 1, length] (True = attend)."""
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == k.device.type == "cpu"
            and q.shape[2] == 1 and k.shape == v.shape and k.shape[2] > 0 and q.shape[1] % k.shape[1] == 0
            and q.shape[1] // k.shape[1] <= 16 and q.shape[-1] % 64 == 0 and q.shape[-1] <= 256
            and k.stride(-1) == 1 and v.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.device.type == "cpu" and mask.stride(-1) == 1
                                  and tuple(mask.shape) == (q.shape[0], 1, 1, k.shape[2]))))


def decode_attention(q, k, v, mask=None, lib=None):
    """``softmax(q k^T / sqrt(d)) v`` for one new token where :func:`decode_attention_takes` the tensors: q [b, heads,
    1, d], k / v [b, heads_kv, length, d] -> [b, heads, 1, d]; fp32 scores, softmax and sums, one rounding (as SDPA's
    own CPU kernel; SDPA reads a long cache at a fraction of the bandwidth). ``lib``: the library, by default the one
    :func:`load` gave (call only where it did)."""
    (b, heads, _, d), (heads_kv, length) = q.shape, k.shape[1:3]
    q, out = q.contiguous(), torch.empty_like(q)
    scratch = _scratch_buffer(b * heads_kv * (16 * length + (ATTENTION_KEY_BLOCK + 16) * d), torch.float32)
    (lib or _lib).chatglm_cpu_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, heads_kv, heads // heads_kv, length, d,
        *k.stride()[:3], *v.stride()[:3], None if mask is None else mask.data_ptr(),
        0 if mask is None else mask.stride(0), d ** -0.5, scratch.data_ptr(), torch.get_num_threads())
    return out
