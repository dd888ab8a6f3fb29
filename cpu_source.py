"""The C source of cpu_kernels.py's library (x86-64 with AVX-512): the int8 / int4 decode GEMV and dequantize, the
bf16 decode GEMV, the one-token decode attention and the small bf16 steps between a decode step's GEMVs. Readable C,
compiled at run time by cpu_kernels.py with the host's C compiler and loaded with ctypes; no Python here."""

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

/* ---- the steps between a decode step's GEMVs (bf16, a few thousand values: one thread, one call each) ---------- */
/* One ctypes call instead of 3-12 torch ops: right after a weight stream every op runs on evicted caches (~20 us). */

/* fp32 rounded to the nearest bf16 (even on ties), still as fp32: the result of every torch bf16 op */
static inline __m512 round_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

/* out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)), fp32 inside, rows of n % 16 == 0 values (RMSNorm) */
void chatglm_cpu_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) sq = _mm512_fmadd_ps(load16(xr, TYPE_BF16, j), load16(xr, TYPE_BF16, j), sq);
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)n + eps));
        for (int64_t j = 0; j < n; j += 16)
            store16(out, TYPE_BF16, r * n + j,
                    _mm512_mul_ps(load16(w, TYPE_BF16, j), _mm512_mul_ps(load16(xr, TYPE_BF16, j), inv)));
    }
}

/* In place: the first 2 * half dims of each of `heads` heads (d values apart) of each row (stride rs) rotated in
 * adjacent pairs, (a, b) -> (a c - b s, b c + a s) with the row's cos / sin [rows][half], every product and sum
 * rounded to bf16 as torch's bf16 ops round them (2 * half % 16 == 0). */
void chatglm_cpu_rotary(uint16_t *x, int64_t rows, int64_t rs, int64_t heads, int64_t d, const uint16_t *cos,
                        const uint16_t *sin, int64_t half) {
    const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512 sign = _mm512_set_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < 2 * half; j += 16) {  /* cos / sin of pairs j/2 .. j/2 + 7, each twice (s signed) */
            const __m512 c = _mm512_permutexvar_ps(pairs, load16(cos, TYPE_BF16, r * half + j / 2));
            const __m512 s = _mm512_mul_ps(sign, _mm512_permutexvar_ps(pairs, load16(sin, TYPE_BF16, r * half + j / 2)));
            for (int64_t h = 0; h < heads; h++) {
                const __m512 v = load16(x, TYPE_BF16, r * rs + h * d + j);
                const __m512 swapped = _mm512_permute_ps(v, 0xB1);  /* (b, a) in each pair */
                store16(x, TYPE_BF16, r * rs + h * d + j,
                        _mm512_add_ps(round_bf16(_mm512_mul_ps(v, c)), round_bf16(_mm512_mul_ps(swapped, s))));
            }
        }
}

/* out[r][j] = silu(g) * u with g = x[r][j], u = x[r][f + j] (SwiGLU; silu rounded to bf16 first, as torch), f % 16 == 0 */
void chatglm_cpu_silu_mul(const uint16_t *x, uint16_t *out, int64_t rows, int64_t f) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < f; j += 16) {
            const __m512 g = load16(x, TYPE_BF16, r * 2 * f + j);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  /* e^-|g| */
            const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(one, neg, e), _mm512_add_ps(one, e));
            store16(out, TYPE_BF16, r * f + j,
                    _mm512_mul_ps(round_bf16(_mm512_mul_ps(g, sigmoid)), load16(x, TYPE_BF16, r * 2 * f + f + j)));
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
