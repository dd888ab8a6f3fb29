"""CPU kernels for quantization.py's QuantizedLinear: this package's AVX-512 C kernels (built at run time with
the host's C compiler, loaded with ctypes) and torch's packed int8 / int4 CPU kernels.

quantization.py imports this module the first time a quantized layer is bound to the CPU. Every kernel here
takes the published storage format (``weight`` int8 [out, in*bits/8], int4 element 2j in the high nibble) and the
``weight_scale`` tensor, and offers the same small interface (see :class:`Int8Pack`): ``usable``, ``matmul`` and,
for the kernels that read their own weight layout, ``pack`` / ``unpack`` / ``scales``.
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

logger = logging.get_logger(__name__)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PACK_CHUNK_ROWS = 1024  # rows re-laid-out at a time (bounds the temporaries); a multiple of every block size
_lock = threading.Lock()


def nibble_codes(stored: torch.Tensor) -> torch.Tensor:
    """Stored int4 [n, k/2] -> the 4-bit two's complement code of every element, uint8 [n, k] (column order)."""
    b = stored.view(torch.uint8)
    return torch.stack((b >> 4, b & 0xF), dim=-1).reshape(b.shape[0], -1)


def codes_to_stored(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nibble_codes`."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4 | codes[:, 1::2]).view(torch.int8)


def _values(stored, bits):
    """The int values a stored weight holds, int8 [n, k]."""
    if bits == 8:
        return stored
    return ((nibble_codes(stored).to(torch.int16) ^ 8) - 8).to(torch.int8)


def _in_row_chunks(fn, stored):
    if stored.shape[0] <= PACK_CHUNK_ROWS:
        return fn(stored)
    return torch.cat([fn(stored[i:i + PACK_CHUNK_ROWS]) for i in range(0, stored.shape[0], PACK_CHUNK_ROWS)])


# ---------------------------------------------------------------------------------------------------------------------
# torch's kernels
# ---------------------------------------------------------------------------------------------------------------------
class Int8Pack:
    """``torch._weight_int8pack_mm`` on the stored int8 weight as it is (no layout of its own)."""

    name = "cpu-int8pack"
    layout = None  # reads the stored format
    differentiable = False  # the layer routes autograd through the dequantized weight

    def usable(self, bits, out_features, in_features, dtype):
        # Its AVX-512 path reads 16 columns at a time with no tail handling (wrong results / crashes otherwise).
        return (bits == 8 and in_features % 16 == 0 and dtype in FLOAT_DTYPES
                and hasattr(torch.ops.aten, "_weight_int8pack_mm"))

    def matmul(self, x2, weight, scale, bits, out_features, in_features):
        if scale.dtype != x2.dtype:
            scale = scale.to(x2.dtype)
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scale)


class Int4Pack:
    """``torch._weight_int4pack_mm_for_cpu``; the weight is re-laid-out once into torch's int4 CPU layout, whose
    exact byte order this class finds by packing a probe (it differs between torch builds)."""

    name = "cpu-int4pack"
    layout = "int4pack"
    differentiable = False
    _layout = None  # (block_n, mode) once calibrated, False if unusable

    def usable(self, bits, out_features, in_features, dtype):
        return (bits == 4 and out_features % 16 == 0 and self._group_size(in_features) is not None
                and dtype in FLOAT_DTYPES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                and bool(self._calibrate()))

    @staticmethod
    def _group_size(k):
        return next((gs for gs in (256, 128, 64, 32) if k % gs == 0), None)

    @staticmethod
    def _torch_pack(values_u4):
        """values in [0, 15], [n, K] -> torch's CPU int4 layout (uint8 [n, K/2])."""
        try:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values_u4.to(torch.int32).contiguous(), 2)
        except RuntimeError as e:
            if "kByte" not in str(e) and "uint8" not in str(e).lower():
                raise
            # Other torch builds take the values already nibble-packed (uint8 [n, K/2], element 2j high).
            v = values_u4.to(torch.uint8)
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu((v[:, 0::2] << 4 | v[:, 1::2]).contiguous(), 2)

    @staticmethod
    def _layout_unpack(packed, n, k, block_n, mode):
        """Inverse of torch's CPU int4 layout -> unsigned values uint8 [n, k]. Rows are packed in blocks of
        ``block_n``; block b takes bytes [b*block_n*k/2, ...) laid out [k][block_n/2]. Full blocks, ``split``: row
        r in the low nibble of byte r, row r+block_n/2 in its high nibble; ``pairs`` (partial blocks, and the
        non-vectorized build): rows 2i / 2i+1 in byte i's low / high nibble."""
        flat = packed.reshape(-1)
        full = (n // block_n) * block_n
        parts = []
        if full:
            blocks = flat[: full * k // 2].reshape(full // block_n, k, block_n // 2)
            lo, hi = blocks & 0xF, blocks >> 4
            vals = torch.cat((lo, hi), -1) if mode == "split" else torch.stack((lo, hi), -1).reshape(
                full // block_n, k, block_n)
            parts.append(vals.permute(0, 2, 1).reshape(full, k))
        if n - full:
            t = flat[full * k // 2:].reshape(k, (n - full) // 2)
            parts.append(torch.stack((t & 0xF, t >> 4), -1).reshape(k, n - full).t())
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    @classmethod
    def _calibrate(cls):
        if cls._layout is not None:
            return cls._layout
        with _lock:
            if cls._layout is None:
                layout = False
                try:
                    gen = torch.Generator().manual_seed(1234)
                    n, k = 176, 64  # 2 full 64-blocks + a 48 tail; 5 full 32-blocks + a 16 tail
                    vals = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
                    packed = cls._torch_pack(vals)
                    chunked = torch.cat((cls._torch_pack(vals[:128]), cls._torch_pack(vals[128:])), 0)
                    if torch.equal(packed, chunked):
                        for block_n, mode in ((64, "split"), (32, "split"), (32, "pairs"), (64, "pairs")):
                            if torch.equal(cls._layout_unpack(packed, n, k, block_n, mode).to(torch.int32), vals):
                                layout = (block_n, mode)
                                break
                except Exception as e:  # op missing, or a layout we don't know
                    logger.info("torch int4 CPU kernels unavailable: %s", e)
                cls._layout = layout
        return cls._layout

    def pack(self, stored, bits):
        # stored code c of value q in [-8, 7]: torch wants q + 8 = c ^ 8
        return _in_row_chunks(lambda rows: self._torch_pack(nibble_codes(rows) ^ 8), stored)

    def unpack(self, packed, bits, out_features, in_features):
        block_n, mode = self._calibrate()
        return codes_to_stored(self._layout_unpack(packed, out_features, in_features, block_n, mode) ^ 8)

    def scales(self, scale, in_features, dtype):
        """[K/group, N, 2] (scale, zero = 0) in the activation dtype."""
        scale = scale.to(dtype)
        groups = in_features // self._group_size(in_features)
        return torch.stack((scale.expand(groups, -1), torch.zeros_like(scale).expand(groups, -1)), -1).contiguous()

    def matmul(self, x2, packed, table, bits, out_features, in_features):
        if x2.dtype != table.dtype:
            return self.matmul(x2.to(table.dtype), packed, table, bits, out_features, in_features).to(x2.dtype)
        group_size = in_features // table.shape[0]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, table)


# ---------------------------------------------------------------------------------------------------------------------
# This package's kernels (x86-64 with AVX-512): readable C, compiled at run time, loaded with ctypes
# ---------------------------------------------------------------------------------------------------------------------
CPU_SOURCE = r"""
/* Weight-only int8 / int4 matmul and dequantize for x86-64 CPUs with AVX-512 (F + BW), compiled at run time
 * with the host's C compiler (-O3 -march=native, plus -fopenmp when available) by cpu_kernels.py.
 *
 * Weight layout ("blocked"): rows are taken in blocks of 8; inside a block the weight is stored in chunks of 128
 * columns of one row (128 bytes for int8, 64 for int4), chunk-major: [N / 8][K / 128][8 rows][chunk].  A block is
 * one sequential stream that the hardware prefetchers follow. (Row-major rows are one 4 KiB page each at K = 4096;
 * a GEMV reading 8 such rows side by side runs at about half the memory bandwidth. 128-byte int8 chunks measured
 * ~25 % faster than 64-byte ones.)
 *   int8: chunk t of row r holds columns 128t .. 128t+127, in order.
 *   int4: chunk t of row r holds columns 128t .. 128t+127: byte 32h+j (h = 0, 1; j = 0..31) has column
 *         128t+64h+j in its low nibble and column 128t+64h+32+j in its high nibble (4-bit two's complement).
 *         So 32 bytes widened to 16-bit lanes give 32 consecutive columns from the low nibbles and the next 32
 *         from the high nibbles, and 16 bytes widened to 32-bit lanes give two runs of 16 columns.
 * out[m][n] = scale[n] * sum_k x[m][k] * q[n][k], accumulated in fp32.
 */
#include <stdint.h>
#include <stddef.h>
#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "these kernels need AVX-512 F and BW"
#endif

#define ROWS 8            /* rows per block */
#define CHUNK 128         /* columns per chunk */
#define PREFETCH 16384    /* bytes ahead of the chunk being read */

/* The 16 values of a 4-bit two's complement nibble, as floats: vpermps looks nibbles up in it directly. */
static inline __m512 nibble_table(void) {
    return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

/* 16 int8 weights -> 16 floats */
static inline __m512 int8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* 16 bytes of int4 weights -> their 16 low and 16 high nibbles as floats */
static inline __m512i bytes16(const int8_t *p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}
static inline __m512 low_nibbles(__m512i b, __m512 table) { return _mm512_permutexvar_ps(b, table); }
static inline __m512 high_nibbles(__m512i b, __m512 table) {
    return _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}
/* first column of the low / high nibbles of bytes 16g .. 16g+15 of an int4 chunk (g = 0..3) */
static inline int64_t low_column(int g) { return 64 * (g >> 1) + 16 * (g & 1); }
static inline int64_t high_column(int g) { return low_column(g) + 32; }

/* dot products of one fp32 x row with the 8 rows of one block, times their scales */
static void block_dot_int8(const float *x, const int8_t *block, int64_t k, const float *scale, float *out) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += CHUNK) {
        const int8_t *chunk = block + c * ROWS;
        for (int r = 0; r < ROWS; r++, chunk += CHUNK) {
            for (int l = 0; l < CHUNK; l += 64) {  /* one 64-byte cache line at a time */
                _mm_prefetch((const char *)chunk + l + PREFETCH, _MM_HINT_T0);
                acc[r][0] = _mm512_fmadd_ps(int8x16(chunk + l), _mm512_loadu_ps(x + c + l), acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(int8x16(chunk + l + 16), _mm512_loadu_ps(x + c + l + 16), acc[r][1]);
                acc[r][0] = _mm512_fmadd_ps(int8x16(chunk + l + 32), _mm512_loadu_ps(x + c + l + 32), acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(int8x16(chunk + l + 48), _mm512_loadu_ps(x + c + l + 48), acc[r][1]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) * scale[r];
}

static void block_dot_int4(const float *x, const int8_t *block, int64_t k, const float *scale, float *out) {
    const __m512 table = nibble_table();
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += CHUNK) {
        const int8_t *chunk = block + (c / 2) * ROWS;
        for (int r = 0; r < ROWS; r++, chunk += CHUNK / 2) {
            _mm_prefetch((const char *)chunk + PREFETCH, _MM_HINT_T0);
            for (int g = 0; g < 4; g++) {
                const __m512i b = bytes16(chunk + 16 * g);
                acc[r][0] = _mm512_fmadd_ps(low_nibbles(b, table), _mm512_loadu_ps(x + c + low_column(g)), acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(high_nibbles(b, table), _mm512_loadu_ps(x + c + high_column(g)),
                                            acc[r][1]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) * scale[r];
}

#ifdef __AVX512BF16__
/* int4 with one bf16 x row (bf16 models): nibbles -> bf16 by a 16-bit table lookup (vpermw), then vdpbf16ps,
 * which multiplies 32 bf16 pairs exactly and adds them in fp32: half the instructions of the fp32 path, which
 * matters because int4 decoding is compute-bound there. */
static void block_dot_int4_bf16(const uint16_t *x, const int8_t *block, int64_t k, const float *scale, float *out) {
    uint16_t values[32];  /* bf16 bit patterns of the nibble values; vpermw uses 5 index bits, so repeat them */
    for (int e = 0; e < 32; e++) {
        union { float f; uint32_t u; } v = { .f = (float)(((e & 15) ^ 8) - 8) };
        values[e] = (uint16_t)(v.u >> 16);
    }
    const __m512i table = _mm512_loadu_si512(values);
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += CHUNK) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + c), x1 = (__m512bh)_mm512_loadu_si512(x + c + 32);
        const __m512bh x2 = (__m512bh)_mm512_loadu_si512(x + c + 64), x3 = (__m512bh)_mm512_loadu_si512(x + c + 96);
        const int8_t *chunk = block + (c / 2) * ROWS;
        for (int r = 0; r < ROWS; r++, chunk += CHUNK / 2) {
            _mm_prefetch((const char *)chunk + PREFETCH, _MM_HINT_T0);
            const __m512i b0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)chunk));
            const __m512i b1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(chunk + 32)));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_permutexvar_epi16(b0, table), x0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b0, 4), table),
                                         x1);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_permutexvar_epi16(b1, table), x2);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b1, 4), table),
                                         x3);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) * scale[r];
}
#endif

/* The same for 2 to 4 fp32 x rows at once: each weight is converted once and used for every x row. The block is
 * walked in two halves of 4 rows so that the 4 x 4 accumulators stay in registers. out has row stride n. */
static inline __attribute__((always_inline)) void block_dot_multi(const float *x, int mc, const int8_t *block,
                                                                 int bits, int64_t k, const float *scale,
                                                                 float *out, int64_t n) {
    const __m512 table = nibble_table();
    const int chunk_bytes = CHUNK * bits / 8;
    for (int half = 0; half < 2; half++) {
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < k; c += CHUNK) {
            const int8_t *chunk = block + (c * bits / 8) * ROWS + half * 4 * chunk_bytes;
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++, chunk += chunk_bytes) {
                _Pragma("GCC unroll 8") for (int g = 0; g < chunk_bytes / 16; g++) {
                    if (g % 4 == 0) _mm_prefetch((const char *)chunk + 16 * g + PREFETCH, _MM_HINT_T0);
                    if (bits == 8) {
                        const __m512 w = int8x16(chunk + 16 * g);
                        _Pragma("GCC unroll 4") for (int i = 0; i < mc; i++)
                            acc[i][r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * k + c + 16 * g), acc[i][r]);
                    } else {
                        const __m512i b = bytes16(chunk + 16 * g);
                        const __m512 lo = low_nibbles(b, table), hi = high_nibbles(b, table);
                        _Pragma("GCC unroll 4") for (int i = 0; i < mc; i++) {
                            acc[i][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + i * k + c + low_column(g)), acc[i][r]);
                            acc[i][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + i * k + c + high_column(g)), acc[i][r]);
                        }
                    }
                }
            }
        }
        for (int i = 0; i < mc; i++)
            for (int r = 0; r < 4; r++)
                out[i * n + half * 4 + r] = _mm512_reduce_add_ps(acc[i][r]) * scale[half * 4 + r];
    }
}

/* block_dot_multi with compile-time row count and bit width (so its loops unroll and stay in registers) */
static void block_dot_rows(const float *x, int mc, const int8_t *block, int bits, int64_t k, const float *scale,
                           float *out, int64_t n) {
#define ROWS_CASE(MC)                                                                     \
    case MC:                                                                              \
        if (bits == 8) block_dot_multi(x, MC, block, 8, k, scale, out, n);               \
        else block_dot_multi(x, MC, block, 4, k, scale, out, n);                         \
        break;
    switch (mc) { ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) }
#undef ROWS_CASE
}

/* out [m, n] (fp32) = x [m, k] @ dequantized(w)^T.  x: fp32 [m, k]; x_bf16: the same rows in bf16, or NULL
 * (used for int4 with m == 1 where the CPU has AVX512-BF16).  n % 8 == 0, k % 128 == 0. */
void chatglm_cpu_matmul(const float *x, const uint16_t *x_bf16, int64_t m, const int8_t *w, int bits,
                        const float *scale, float *out, int64_t n, int64_t k, int threads) {
    const int64_t block_bytes = ROWS * k * bits / 8;
#ifndef __AVX512BF16__
    (void)x_bf16;
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n / ROWS; b++) {
        const int8_t *block = w + b * block_bytes;
        const float *s = scale + b * ROWS;
        for (int64_t i = 0; i < m; i += 4) {  /* x rows in groups of up to 4 */
            const int mc = m - i < 4 ? (int)(m - i) : 4;
            float *o = out + i * n + b * ROWS;
            if (mc > 1)
                block_dot_rows(x + i * k, mc, block, bits, k, s, o, n);
            else if (bits == 8)
                block_dot_int8(x + i * k, block, k, s, o);
#ifdef __AVX512BF16__
            else if (x_bf16 != NULL)
                block_dot_int4_bf16(x_bf16 + i * k, block, k, s, o);
#endif
            else
                block_dot_int4(x + i * k, block, k, s, o);
        }
    }
}

/* 16 floats -> 16 values of the output type at dst (0: fp32, 1: bf16, 2: fp16), rounded to nearest even */
static inline void store16(void *dst, int64_t index, __m512 v, int out_type) {
    if (out_type == 0) {
        _mm512_storeu_ps((float *)dst + index, v);
    } else if (out_type == 2) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + index),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        /* bf16: round to nearest even on the bits (the values are finite: |q * scale| <= 128 * max|scale|) */
        __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + index), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    }
}

/* out [n, k] (row-major, in out_type) = q * scale, rounded once: the same as torch's q.to(T) * scale for a
 * model-dtype scale (given here widened to fp32; q * scale is then exact in fp32). */
void chatglm_cpu_dequantize(const int8_t *w, int bits, const float *scale, void *out, int out_type,
                            int64_t n, int64_t k, int threads) {
    const int64_t block_bytes = ROWS * k * bits / 8;
    const int chunk_bytes = CHUNK * bits / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n / ROWS; b++) {
        const __m512 table = nibble_table();
        for (int64_t c = 0; c < k; c += CHUNK) {
            const int8_t *chunk = w + b * block_bytes + (c * bits / 8) * ROWS;
            for (int r = 0; r < ROWS; r++, chunk += chunk_bytes) {
                const int64_t row = b * ROWS + r;
                const __m512 s = _mm512_set1_ps(scale[row]);
                for (int g = 0; g < chunk_bytes / 16; g++) {
                    if (bits == 8) {
                        store16(out, row * k + c + 16 * g, _mm512_mul_ps(int8x16(chunk + 16 * g), s), out_type);
                    } else {
                        const __m512i v = bytes16(chunk + 16 * g);
                        store16(out, row * k + c + low_column(g), _mm512_mul_ps(low_nibbles(v, table), s), out_type);
                        store16(out, row * k + c + high_column(g), _mm512_mul_ps(high_nibbles(v, table), s), out_type);
                    }
                }
            }
        }
    }
}
"""

BLOCK_ROWS = 8  # rows per block of the blocked layout (ROWS in CPU_SOURCE)
CHUNK = 128  # columns per chunk of the blocked layout (CHUNK in CPU_SOURCE)
GEMV_MAX_ROWS = 16  # inputs with more rows: dequantize in chunks and let torch's GEMM do the work
DEQUANT_CHUNK_BYTES = 8 << 20  # bytes of weight dequantized at a time for that GEMM
OUT_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
COMPILE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pipe", "-x", "c")
_lib = None  # None: not tried yet; False: unavailable here
_scratch = threading.local()


def pack_blocked(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored format [N, K*bits/8] -> the blocked layout described in CPU_SOURCE, as a flat int8 tensor."""
    def pack_rows(rows_in):
        n = rows_in.shape[0]
        k = rows_in.shape[1] * 8 // bits
        chunks, chunk_bytes = k // CHUNK, CHUNK * bits // 8
        if bits == 8:
            rows = rows_in.reshape(n, chunks, chunk_bytes)
        else:
            codes = nibble_codes(rows_in).reshape(n, chunks, 2, 2, 32)  # [.., h, low/high, j]
            rows = (codes[:, :, :, 0, :] | (codes[:, :, :, 1, :] << 4)).view(torch.int8).reshape(n, chunks,
                                                                                               chunk_bytes)
        return rows.reshape(n // BLOCK_ROWS, BLOCK_ROWS, chunks, chunk_bytes).transpose(1, 2).contiguous().reshape(-1)

    return _in_row_chunks(pack_rows, stored)


def unpack_blocked(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_blocked`: blocked layout -> stored format [N, K*bits/8]."""
    chunks, chunk_bytes = k // CHUNK, CHUNK * bits // 8
    rows = packed.reshape(n // BLOCK_ROWS, chunks, BLOCK_ROWS, chunk_bytes).transpose(1, 2).reshape(n, chunks,
                                                                                                   chunk_bytes)
    if bits == 8:
        return rows.reshape(n, k).contiguous()
    b = rows.view(torch.uint8).reshape(n, chunks, 2, 32)
    return codes_to_stored(torch.stack((b & 0xF, b >> 4), dim=3).reshape(n, k))


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
            return "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def library_path(compiler: str, signature: str) -> str:
    """The cached library for this source, compiler and CPU."""
    key = hashlib.sha256("\0".join((CPU_SOURCE, compiler, " ".join(COMPILE_FLAGS), signature)).encode())
    return os.path.join(kernel_dir(), f"chatglm_cpu_{key.hexdigest()[:20]}.so")


def _compile(compiler: str, path: str) -> bool:
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
            proc = subprocess.run([compiler, *COMPILE_FLAGS, *extra, source, "-o", tmp],
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


def _self_check(lib) -> bool:
    """A small matmul and dequantize against plain torch: refuse a library that computes anything else."""
    gen = torch.Generator().manual_seed(0)
    n, k = 16, 256
    for bits in (8, 4):
        stored = torch.randint(-128, 128, (n, k * bits // 8), generator=gen, dtype=torch.int8)
        if bits == 8:
            stored[stored == -128] = -127  # int8 quantization never stores -128
        scale = torch.rand(n, generator=gen).bfloat16()
        weight = _values(stored, bits).float() * scale.float()[:, None]  # exact in fp32
        packed = pack_blocked(stored, bits)
        if not torch.equal(unpack_blocked(packed, bits, n, k), stored):
            return False
        scale32 = scale.float()  # (every tensor whose address the library gets is held by a name)
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=gen).bfloat16()
            x32, out = x.float(), torch.empty(rows, n)
            lib.chatglm_cpu_matmul(x32.data_ptr(), x.data_ptr(), rows, packed.data_ptr(), bits, scale32.data_ptr(),
                                   out.data_ptr(), n, k, 1)
            if not torch.allclose(out, x32 @ weight.t(), rtol=1e-4, atol=1e-4):
                return False
        dense = torch.empty(n, k, dtype=torch.bfloat16)
        lib.chatglm_cpu_dequantize(packed.data_ptr(), bits, scale32.data_ptr(), dense.data_ptr(), 1, n, k, 1)
        if not torch.equal(dense, weight.bfloat16()):
            return False
    return True


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
    if "avx512f" not in signature or "avx512bw" not in signature:
        return None
    compiler = find_compiler()
    if not compiler:
        logger.warning("No C compiler found (set CC or install gcc): quantized CPU layers use torch's slower "
                       "packed kernels instead of this package's AVX-512 kernels.")
        return None
    path = library_path(compiler, signature)
    if not os.path.exists(path) and not _compile(compiler, path):
        logger.warning("Compiling the AVX-512 CPU quantization kernels failed (details at INFO level); quantized "
                       "CPU layers use torch's slower packed kernels instead.")
        return None
    try:
        lib = ctypes.CDLL(path)
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.chatglm_cpu_matmul.argtypes = [ptr, ptr, i64, ptr, i32, ptr, ptr, i64, i64, i32]
        lib.chatglm_cpu_matmul.restype = None
        lib.chatglm_cpu_dequantize.argtypes = [ptr, i32, ptr, ptr, i32, i64, i64, i32]
        lib.chatglm_cpu_dequantize.restype = None
        ok = _self_check(lib)
    except OSError as e:  # a damaged cached library: remove it so that the next process rebuilds it
        logger.info("could not load the CPU quantization kernels from %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.remove(path)
        ok = False
    if not ok:
        logger.warning("The AVX-512 CPU quantization kernels could not be loaded or failed their self-check; "
                       "quantized CPU layers use torch's packed kernels instead.")
        return None
    return lib


class Avx512:
    """This package's C kernels: up to GEMV_MAX_ROWS input rows, fused dequantize-and-multiply (decode); more,
    dequantize in row chunks into a reused buffer, then torch's GEMM (prefill). Weight in the blocked layout,
    scales as fp32."""

    name = "cpu-avx512"
    layout = "blocked"
    differentiable = False

    def usable(self, bits, out_features, in_features, dtype):
        return (out_features % BLOCK_ROWS == 0 and in_features % CHUNK == 0 and dtype in FLOAT_DTYPES
                and load() is not None)

    def pack(self, stored, bits):
        return pack_blocked(stored, bits)

    def unpack(self, packed, bits, out_features, in_features):
        return unpack_blocked(packed, bits, out_features, in_features)

    def scales(self, scale, in_features, dtype):
        return scale.to(torch.float32).contiguous()  # exact: the model-dtype scales widened

    def matmul(self, x2, packed, scale, bits, n, k):
        lib, threads, rows = _lib, torch.get_num_threads(), x2.shape[0]
        x2 = x2.contiguous()
        if rows <= GEMV_MAX_ROWS:
            xf = x2 if x2.dtype == torch.float32 else x2.to(torch.float32)
            x_bf16 = x2.data_ptr() if x2.dtype == torch.bfloat16 else None
            out = torch.empty(rows, n, dtype=torch.float32)
            lib.chatglm_cpu_matmul(xf.data_ptr(), x_bf16, rows, packed.data_ptr(), bits, scale.data_ptr(),
                                   out.data_ptr(), n, k, threads)
            return out if x2.dtype == torch.float32 else out.to(x2.dtype)
        # Row chunks of ~8 MB, dequantized into a reused per-thread buffer: they stay in cache for the GEMM, and no
        # full-size float weight is ever allocated (fresh pages cost more than the dequantization itself).
        chunk = max(BLOCK_ROWS, DEQUANT_CHUNK_BYTES // (k * x2.element_size()) // BLOCK_ROWS * BLOCK_ROWS)
        scratch = _scratch_buffer(min(chunk, n) * k, x2.dtype)
        pieces = []
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            weight = scratch[:count * k].view(count, k)
            lib.chatglm_cpu_dequantize(packed.data_ptr() + start * k * bits // 8, bits, scale.data_ptr() + start * 4,
                                       weight.data_ptr(), OUT_TYPE[x2.dtype], count, k, threads)
            pieces.append(F.linear(x2, weight))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


KERNELS = {k.name: k for k in (Avx512(), Int8Pack(), Int4Pack())}
