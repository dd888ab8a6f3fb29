"""Weight-only int8 / int4 quantization of the ChatGLM3 block linears.

Storage format (the published one; checkpoints written by the original code load unchanged):

* Only the four linears of every block are quantized: ``self_attention.query_key_value``,
  ``self_attention.dense``, ``mlp.dense_h_to_4h`` and ``mlp.dense_4h_to_h`` (and, only when asked for with
  ``quantize(bits, quantize_output_layer=True)``, ``output_layer``, in the same format: this package's extension).
* ``weight_scale`` [out_features], in the model dtype: ``max |w|`` over the row divided by 127 (int8) or 7 (int4).
* ``weight`` int8: ``q = round(w / weight_scale[:, None])``; [out, in] for int8; for int4 [out, in / 2] with
  element 2j in the high nibble and element 2j+1 in the low nibble, both signed 4-bit two's complement.
* ``bias`` (query_key_value has one) stays in the model dtype.
* An all-zero row gets scale 0 and q = 0, so it dequantizes to exact zeros (the original computed 0/0 = NaN).

Compute backends (picked per layer at run time; see :func:`quantization_backend`,
:func:`set_quantization_backend`):

=================== ====== =========================================================================
name                device what runs
=================== ====== =========================================================================
``cpu-avx512``      CPU    this file's C kernels (``CPU_SOURCE``), compiled once for the host CPU with its C
                           compiler and cached under ``HF_HOME``; the weight is repacked once, in place, into
                           a blocked layout read as one sequential stream. Up to 16 input rows: fused
                           dequantize-and-multiply (decode); more rows: dequantize, then torch's GEMM
                           (prefill). Needs x86-64 with AVX-512 F/BW, a C compiler, in_features % 128 == 0
                           and out_features % 8 == 0; ``CHATGLM_CPU_KERNELS=0`` turns it off
``cpu-int8pack``    CPU    ``torch._weight_int8pack_mm`` on the stored int8 weight (no copy)
``cpu-int4pack``    CPU    ``torch._weight_int4pack_mm_for_cpu``; the weight is repacked once, in place
``cuda-cpm_kernels``CUDA   this file's CUDA C dequantize kernels, compiled with NVRTC for the present GPU
                           and launched through ``cpm_kernels``; then a cuBLAS matmul
``cuda-nvrtc``      CUDA   the same kernels compiled and launched through torch's own NVRTC wrapper
                           (used when cpm_kernels is missing or cannot find the CUDA libraries)
``torch-dequant``   any    ``q * scale`` in plain torch, then ``F.linear`` (always available)
=================== ====== =========================================================================

On the CPU the first choice is ``cpu-avx512``, then torch's packed kernel for the bit width; on CUDA
``cuda-cpm_kernels``, then ``cuda-nvrtc``; ``torch-dequant`` where nothing else can run the layer.

This file imports only torch, the standard library and transformers' logging; ``cpm_kernels`` is imported lazily,
the first time a CUDA layer runs, and the C compiler runs (once per CPU and source version) the first time a CPU
layer runs. Any failure there falls back (with one warning) instead of failing.
"""
import contextlib
import ctypes
import hashlib
import importlib
import math
import os
import platform
import shutil
import subprocess
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from transformers.utils import logging as _hf_logging

    logger = _hf_logging.get_logger(__name__)
except Exception:  # pragma: no cover - transformers always present for remote code
    import logging as _logging

    logger = _logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
QUANTIZED_LINEARS = {
    "self_attention": ("query_key_value", "dense"),
    "mlp": ("dense_h_to_4h", "dense_4h_to_h"),
}
CPU_BACKENDS = ("cpu-avx512", "cpu-int8pack", "cpu-int4pack")
CUDA_BACKENDS = ("cuda-cpm_kernels", "cuda-nvrtc")
BACKENDS = CPU_BACKENDS + CUDA_BACKENDS + ("torch-dequant",)

_backend_override: Optional[str] = None
_warned = set()
_lock = threading.Lock()
_pack_lock = threading.RLock()  # layout changes of QuantizedLinear weights


def _warn_once(key, msg, *args):
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def _check_bits(bits):
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"weight bit width must be 4 or 8, got {bits!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Storage format: quantize / pack / dequantize (pure torch, any device)
# ---------------------------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight [out, in] to the stored format. Returns ``(stored int8, weight_scale)``.

    Arithmetic happens in the weight's own dtype, as in the original (so fp16 checkpoints quantize bit-identically).
    """
    _check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating point weight, got {tuple(weight.shape)} {weight.dtype}")
    out_features, in_features = weight.shape
    if bits == 4 and in_features % 2:
        raise ValueError(f"int4 quantization packs two columns per byte, so in_features must be even; "
                         f"got in_features={in_features}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach()
    scale = w.abs().amax(dim=-1) / qmax
    # All-zero rows: scale 0, q 0 (dequantizes to exact zeros instead of 0/0 = NaN).
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / divisor[:, None]).clamp_(-qmax - 1, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> packed int8 [out, in/2] (element 2j high nibble, 2j+1 low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    hi = q[..., 0::2].to(torch.int16)
    lo = q[..., 1::2].to(torch.int16)
    return (hi * 16 + (lo & 0xF)).to(torch.int8)  # hi*16 in [-128, 112] has a zero low nibble


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed int8 [out, in/2] -> int8 values [out, in] in [-8, 7] (sign-extended nibbles)."""
    b = packed.to(torch.int16)
    hi = torch.div(b, 16, rounding_mode="floor")  # arithmetic shift right by 4
    lo = ((b & 0xF) ^ 8) - 8
    return torch.stack((hi, lo), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def dequantize_weight(stored: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The float weight a stored tensor stands for: ``q.to(scale.dtype) * scale[:, None]`` (one rounding)."""
    _check_bits(bits)
    q = unpack_int4(stored) if bits == 4 else stored
    return q.to(scale.dtype) * scale[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# CPU int4: torch's packed layout, and its inverse (so the stored format can be given back without keeping a copy)
# ---------------------------------------------------------------------------------------------------------------------
_INT4_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_cpu_int4_layout = None  # (block_n, mode) once calibrated, False if unusable
_PACK_CHUNK_ROWS = 1024  # a multiple of every block size torch uses (64 / 32): chunks pack independently


def _torch_int4_pack_rows(values_u4: torch.Tensor) -> torch.Tensor:
    """values in [0, 15], int32 [n, K] -> torch's CPU int4 layout (uint8 [n, K/2])."""
    try:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values_u4.to(torch.int32).contiguous(), 2)
    except RuntimeError as e:
        if "kByte" not in str(e) and "uint8" not in str(e).lower():
            raise
        # Older/newer torch: input is already nibble-packed uint8 [n, K/2], element 2j in the high nibble.
        v = values_u4.to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu((v[:, 0::2] << 4 | v[:, 1::2]).contiguous(), 2)


def _cpu_int4_pack(stored: torch.Tensor) -> torch.Tensor:
    """Stored int4 [N, K/2] (int8) -> torch CPU packed uint8 [N, K/2], in row chunks to bound the int32 temp."""
    rows = []
    for start in range(0, stored.shape[0], _PACK_CHUNK_ROWS):
        q = unpack_int4(stored[start:start + _PACK_CHUNK_ROWS])
        rows.append(_torch_int4_pack_rows(q.to(torch.int32) + 8))
    return rows[0] if len(rows) == 1 else torch.cat(rows, 0)


def _layout_unpack(packed: torch.Tensor, n: int, k: int, block_n: int, mode: str) -> torch.Tensor:
    """Inverse of torch's CPU int4 layout -> unsigned nibble values uint8 [n, k].

    Rows are packed in blocks of ``block_n``; block b takes bytes [b*block_n*k/2, ...) laid out [k][block_n/2].
    Full blocks: ``split`` puts row r in the low nibble of byte r and row r+block_n/2 in its high nibble;
    ``pairs`` (partial blocks, and the non-vectorized build) puts rows 2i / 2i+1 in byte i's low / high nibble.
    """
    flat = packed.reshape(-1)
    full = (n // block_n) * block_n
    parts = []
    if full:
        blocks = flat[: full * k // 2].reshape(full // block_n, k, block_n // 2)
        lo, hi = blocks & 0xF, blocks >> 4
        vals = torch.cat((lo, hi), -1) if mode == "split" else torch.stack((lo, hi), -1).reshape(
            full // block_n, k, block_n)
        parts.append(vals.permute(0, 2, 1).reshape(full, k))
    tail = n - full
    if tail:
        t = flat[full * k // 2:].reshape(k, tail // 2)
        vals = torch.stack((t & 0xF, t >> 4), -1).reshape(k, tail)
        parts.append(vals.t())
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _calibrate_cpu_int4_layout():
    """Find which layout this torch build packs into, by packing a probe and inverting it. ``False`` if none fits
    (then the int4 CPU backend is not used and the plain torch path runs instead)."""
    global _cpu_int4_layout
    if _cpu_int4_layout is not None:
        return _cpu_int4_layout
    with _lock:
        if _cpu_int4_layout is not None:
            return _cpu_int4_layout
        layout = False
        try:
            gen = torch.Generator().manual_seed(1234)
            n, k = 176, 64  # 2 full 64-blocks + a 48 tail; 5 full 32-blocks + a 16 tail
            vals = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            packed = _torch_int4_pack_rows(vals)
            chunked = torch.cat((_torch_int4_pack_rows(vals[:128]), _torch_int4_pack_rows(vals[128:])), 0)
            if torch.equal(packed, chunked):
                for block_n, mode in ((64, "split"), (32, "split"), (32, "pairs"), (64, "pairs")):
                    if torch.equal(_layout_unpack(packed, n, k, block_n, mode).to(torch.int32), vals):
                        layout = (block_n, mode)
                        break
        except Exception as e:  # op missing, or a layout we don't know
            logger.info("torch int4 CPU kernels unavailable: %s", e)
        _cpu_int4_layout = layout
        return layout


def _cpu_int4_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """torch CPU packed uint8 [n, k/2] -> stored int4 format int8 [n, k/2]."""
    block_n, mode = _calibrate_cpu_int4_layout()
    vals = _layout_unpack(packed, n, k, block_n, mode).to(torch.int8) - 8
    return pack_int4(vals)


def _int4_group_size(k):
    for gs in (256, 128, 64, 32):
        if k % gs == 0:
            return gs
    return None


# ---------------------------------------------------------------------------------------------------------------------
# CPU kernels (x86-64 with AVX-512): readable C, compiled at run time with the host's C compiler, loaded with ctypes
# ---------------------------------------------------------------------------------------------------------------------
CPU_SOURCE = r"""
/* Weight-only int8 / int4 matmul and dequantize for x86-64 CPUs with AVX-512 (F + BW), compiled at run time
 * with the host's C compiler (-O3 -march=native, plus -fopenmp when available) by quantization.py.
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

_CPU_BLOCK_ROWS = 8  # rows per block of the blocked layout (ROWS in CPU_SOURCE)
_CPU_CHUNK = 128  # columns per chunk of the blocked layout (CHUNK in CPU_SOURCE)
_CPU_GEMV_MAX_ROWS = 16  # inputs with more rows: dequantize once per call and let torch's GEMM do the work
_CPU_DEQUANT_CHUNK_BYTES = 8 << 20  # rows dequantized at a time for that GEMM
_CPU_OUT_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CPU_COMPILE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pipe", "-x", "c")
_cpu_lib = None  # None: not tried yet; False: unavailable here
_cpu_scratch_local = threading.local()


def _cpu_kernel_shape_ok(bits, in_features, out_features):
    return out_features % _CPU_BLOCK_ROWS == 0 and in_features % _CPU_CHUNK == 0


def _cpu_blocked_pack(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored format [N, K*bits/8] -> the C kernels' blocked layout (see CPU_SOURCE), as a flat int8 tensor.
    Row blocks are independent, so this runs in chunks of rows to bound the temporaries."""
    if stored.shape[0] > _PACK_CHUNK_ROWS:
        return torch.cat([_cpu_blocked_pack(stored[i:i + _PACK_CHUNK_ROWS], bits)
                          for i in range(0, stored.shape[0], _PACK_CHUNK_ROWS)])
    n = stored.shape[0]
    k = stored.shape[1] * 8 // bits
    chunks, chunk_bytes = k // _CPU_CHUNK, _CPU_CHUNK * bits // 8
    if bits == 8:
        rows = stored.reshape(n, chunks, chunk_bytes)
    else:
        codes = (unpack_int4(stored) & 0xF).to(torch.uint8).reshape(n, chunks, 2, 2, 32)  # [.., h, low/high, j]
        rows = (codes[:, :, :, 0, :] | (codes[:, :, :, 1, :] << 4)).view(torch.int8).reshape(n, chunks, chunk_bytes)
    blocks = rows.reshape(n // _CPU_BLOCK_ROWS, _CPU_BLOCK_ROWS, chunks, chunk_bytes)
    return blocks.transpose(1, 2).contiguous().reshape(-1)


def _cpu_blocked_unpack(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`_cpu_blocked_pack`: blocked layout -> stored format [N, K*bits/8]."""
    chunks, chunk_bytes = k // _CPU_CHUNK, _CPU_CHUNK * bits // 8
    blocks = packed.reshape(n // _CPU_BLOCK_ROWS, chunks, _CPU_BLOCK_ROWS, chunk_bytes)
    rows = blocks.transpose(1, 2).reshape(n, chunks, chunk_bytes)
    if bits == 8:
        return rows.reshape(n, k).contiguous()
    b = rows.view(torch.uint8).reshape(n, chunks, 2, 32)
    codes = torch.stack((b & 0xF, b >> 4), dim=3).reshape(n, k).to(torch.int16)  # column order restored
    return pack_int4((((codes ^ 8) - 8)).to(torch.int8))


def _cpu_scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread reusable buffer of at least ``numel`` elements (so concurrent forwards never share one)."""
    buffers = getattr(_cpu_scratch_local, "buffers", None)
    if buffers is None:
        buffers = _cpu_scratch_local.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def _cpu_kernel_dir() -> str:
    """Where the compiled library is cached: beside transformers' remote-code modules (under HF_HOME)."""
    try:
        from transformers.utils import HF_MODULES_CACHE
    except ImportError:  # pragma: no cover
        HF_MODULES_CACHE = os.path.join(os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"),
                                        "modules")
    return os.path.join(HF_MODULES_CACHE, "chatglm3_cpu_kernels")


def _find_compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_library_path(compiler: str, signature: str) -> str:
    """The cached library for this source, compiler and CPU."""
    key = hashlib.sha256("\0".join((CPU_SOURCE, compiler, " ".join(_CPU_COMPILE_FLAGS), signature)).encode())
    return os.path.join(_cpu_kernel_dir(), f"chatglm_cpu_{key.hexdigest()[:20]}.so")


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile_cpu_kernels(compiler: str, path: str) -> bool:
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
            proc = subprocess.run([compiler, *_CPU_COMPILE_FLAGS, *extra, source, "-o", tmp],
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
    """A small matmul and dequantize against the plain torch path: refuse a library that computes anything else."""
    gen = torch.Generator().manual_seed(0)
    for bits in SUPPORTED_BITS:
        n, k = 16, 256
        stored, scale = quantize_weight(torch.randn(n, k, generator=gen), bits)
        packed = _cpu_blocked_pack(stored, bits)
        if not torch.equal(_cpu_blocked_unpack(packed, bits, n, k), stored):
            return False
        weight = dequantize_weight(stored, scale, bits)
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=gen).bfloat16().float()
            x_bf16 = x.bfloat16()
            out = torch.empty(rows, n)
            lib.chatglm_cpu_matmul(x.data_ptr(), x_bf16.data_ptr(), rows, packed.data_ptr(), bits, scale.data_ptr(),
                                   out.data_ptr(), n, k, 1)
            if not torch.allclose(out, x @ weight.t(), rtol=1e-4, atol=1e-4):
                return False
        scale_bf16 = scale.bfloat16()
        widened = scale_bf16.float()  # the kernel gets the model-dtype scale, widened to fp32 (exactly)
        dense = torch.empty(n, k, dtype=torch.bfloat16)
        lib.chatglm_cpu_dequantize(packed.data_ptr(), bits, widened.data_ptr(), dense.data_ptr(), 1, n, k, 1)
        if not torch.equal(dense, dequantize_weight(stored, scale_bf16, bits)):
            return False
    return True


def _load_cpu_kernels():
    """The compiled CPU kernel library, or None where it cannot be had (not x86-64, no AVX-512, no C compiler,
    ``CHATGLM_CPU_KERNELS=0``): then the torch packed kernels run instead."""
    global _cpu_lib
    if _cpu_lib is not None:
        return _cpu_lib or None
    with _lock:
        if _cpu_lib is not None:
            return _cpu_lib or None
        _cpu_lib = False
        if os.environ.get("CHATGLM_CPU_KERNELS", "1") == "0":
            return None
        if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
            return None
        signature = _cpu_signature()
        if "avx512f" not in signature or "avx512bw" not in signature:
            return None
        compiler = _find_compiler()
        if not compiler:
            _warn_once("no-cc", "No C compiler found (set CC or install gcc): quantized CPU layers use torch's "
                       "slower packed kernels instead of this package's AVX-512 kernels.")
            return None
        path = _cpu_library_path(compiler, signature)
        if not os.path.exists(path) and not _compile_cpu_kernels(compiler, path):
            _warn_once("cc-failed", "Compiling the AVX-512 CPU quantization kernels failed (details at INFO "
                       "level); quantized CPU layers use torch's slower packed kernels instead.")
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
            _warn_once("cpu-kernel-check", "The AVX-512 CPU quantization kernels could not be loaded or failed their "
                       "self-check; quantized CPU layers use torch's packed kernels instead.")
            return None
        _cpu_lib = lib
        return lib


# ---------------------------------------------------------------------------------------------------------------------
# CUDA kernels: readable CUDA C, compiled at run time with NVRTC for the GPU that is present
# ---------------------------------------------------------------------------------------------------------------------
CUDA_SOURCE = r"""
// Dequantize the stored ChatGLM3 formats to fp16 / bf16. Each thread handles one output pair (two adjacent
// columns of one row) per step of a grid-stride loop, so an int4 byte or two int8 bytes -> one 32-bit store.
// out = round_to_nearest_even(float(q) * float(scale[row])): the same single rounding torch's `q.to(T) * s` does.
// No headers: NVRTC may have no include path, so conversions are done with PTX / integer code.

static __device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
static __device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
static __device__ __forceinline__ float bf16_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
static __device__ __forceinline__ unsigned short float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
    return (unsigned short)(u >> 16);
}
static __device__ __forceinline__ int sext4(int nibble) { return ((nibble & 0xF) ^ 8) - 8; }

#define DEFINE_DEQUANT(SUFFIX, TO_FLOAT, FROM_FLOAT)                                                       \
extern "C" __global__ void chatglm_dequant_int4_##SUFFIX(                                                  \
        const signed char* __restrict__ weight, const unsigned short* __restrict__ scale,                  \
        unsigned int* __restrict__ out, int rows, int bytes_per_row) {                                     \
    const long long total = (long long)rows * bytes_per_row;                                               \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;                        \
         i += (long long)gridDim.x * blockDim.x) {                                                         \
        const float s = TO_FLOAT(scale[i / bytes_per_row]);                                                \
        const int byte = (int)weight[i];                                                                   \
        const unsigned int even = FROM_FLOAT((float)sext4(byte >> 4) * s);  /* element 2j: high nibble */ \
        const unsigned int odd = FROM_FLOAT((float)sext4(byte) * s);        /* element 2j+1: low nibble */ \
        out[i] = even | (odd << 16);                                                                       \
    }                                                                                                      \
}                                                                                                          \
extern "C" __global__ void chatglm_dequant_int8_##SUFFIX(                                                  \
        const unsigned short* __restrict__ weight_pairs, const unsigned short* __restrict__ scale,         \
        unsigned int* __restrict__ out, int rows, int pairs_per_row) {                                     \
    const long long total = (long long)rows * pairs_per_row;                                               \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;                        \
         i += (long long)gridDim.x * blockDim.x) {                                                         \
        const float s = TO_FLOAT(scale[i / pairs_per_row]);                                                \
        const unsigned int two = weight_pairs[i];                                                          \
        const int q0 = (int)(signed char)(two & 0xFFu);                                                    \
        const int q1 = (int)(signed char)(two >> 8);                                                       \
        const unsigned int even = FROM_FLOAT((float)q0 * s);                                               \
        const unsigned int odd = FROM_FLOAT((float)q1 * s);                                                \
        out[i] = even | (odd << 16);                                                                       \
    }                                                                                                      \
}

DEFINE_DEQUANT(f16, half_to_float, float_to_half)
DEFINE_DEQUANT(bf16, bf16_to_float, float_to_bf16)
"""

_KERNEL_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}
_KERNEL_NAMES = tuple(f"chatglm_dequant_int{b}_{s}" for b in (4, 8) for s in ("f16", "bf16"))
_THREADS = 256


class _CpmKernelsLauncher:
    """Compile CUDA_SOURCE with cpm_kernels' NVRTC binding, load it with its lazy module, launch via cuLaunchKernel."""

    name = "cuda-cpm_kernels"

    def __init__(self):
        nvrtc = importlib.import_module("cpm_kernels.library.nvrtc")
        base = importlib.import_module("cpm_kernels.kernels.base")
        self._nvrtc, self._base = nvrtc, base
        self._funcs = {}  # (device index, name) -> KernelFunction

    def _compile(self, device):
        nvrtc = self._nvrtc
        major, minor = torch.cuda.get_device_capability(device)
        prog = nvrtc.nvrtcProgram()
        nvrtc.nvrtcCreateProgram(prog, CUDA_SOURCE, "chatglm_quantization.cu", 0, [], [])
        try:
            nvrtc.nvrtcCompileProgram(prog, 2, [f"--gpu-architecture=sm_{major}{minor}", "--std=c++14"])
            size = nvrtc.nvrtcGetCUBINSize(prog)
            buf = ctypes.create_string_buffer(size)
            nvrtc.nvrtcGetCUBIN(prog, buf)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        return self._base.LazyKernelCModule(buf.raw)

    def __call__(self, name, grid, args, device):
        key = (device.index, name)
        fn = self._funcs.get(key)
        if fn is None:
            with torch.cuda.device(device):
                module = self._compile(device)
                for n in _KERNEL_NAMES:
                    self._funcs[(device.index, n)] = self._base.KernelFunction(module, n)
            fn = self._funcs[key]
        params = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        with torch.cuda.device(device):
            fn((grid, 1, 1), (_THREADS, 1, 1), 0, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
               params)


class _TorchNvrtcLauncher:
    """The same kernels through ``torch.cuda._compile_kernel`` (torch's own NVRTC wrapper)."""

    name = "cuda-nvrtc"

    def __init__(self):
        self._compile_kernel = getattr(torch.cuda, "_compile_kernel", None) or getattr(torch.cuda, "compile_kernel")
        self._funcs = {}

    def __call__(self, name, grid, args, device):
        key = (device.index, name)
        fn = self._funcs.get(key)
        if fn is None:
            with torch.cuda.device(device):
                fn = self._funcs[key] = self._compile_kernel(CUDA_SOURCE, name)
        with torch.cuda.device(device):
            fn(grid=(grid, 1, 1), block=(_THREADS, 1, 1), args=list(args),
               stream=torch.cuda.current_stream(device))


_launchers = {}


def _get_launcher(name):
    """The CUDA launcher ``name`` or None (reason logged once). Never raises."""
    if name not in _launchers:
        launcher = None
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available")
            launcher = _CpmKernelsLauncher() if name == "cuda-cpm_kernels" else _TorchNvrtcLauncher()
        except Exception as e:  # ImportError, missing CUDA/NVRTC libraries, pkg_resources gone, ...
            logger.info("quantization backend %s unavailable: %s", name, e)
        _launchers[name] = launcher
    return _launchers[name]


def _cuda_dequantize(launcher, stored, scale, bits, dtype):
    """Dequantize with this file's kernels to ``dtype`` (fp16/bf16). Same bits as dequantize_weight()."""
    rows = stored.shape[0]
    per_row = stored.shape[1] if bits == 4 else stored.shape[1] // 2
    out_cols = stored.shape[1] * 2 if bits == 4 else stored.shape[1]
    out = torch.empty(rows, out_cols, dtype=dtype, device=stored.device)
    if rows == 0 or per_row == 0:
        return out
    total = rows * per_row
    grid = max(1, min((total + _THREADS - 1) // _THREADS, 65535))
    name = f"chatglm_dequant_int{bits}_{_KERNEL_SUFFIX[dtype]}"
    launcher(name, grid, (stored, scale.to(dtype).contiguous(), out, rows, per_row), stored.device)
    return out


def _cuda_kernel_applicable(stored, bits, dtype):
    return (dtype in _KERNEL_SUFFIX and stored.is_contiguous() and stored.data_ptr() % 4 == 0
            and (bits == 4 or stored.shape[1] % 2 == 0) and stored.numel() < 2 ** 31 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------------
def set_quantization_backend(name: Optional[str]):
    """Force a compute backend for every QuantizedLinear (``None`` / ``"auto"``: choose automatically).

    A forced backend that cannot run a given layer (wrong device, bit width, shape or dtype) falls back to
    ``torch-dequant`` for that layer, with one warning; :func:`quantization_backend` reports what really runs.
    """
    global _backend_override
    if name is None or name == "auto":
        _backend_override = None
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown quantization backend {name!r}; expected one of {('auto',) + BACKENDS}")
    _backend_override = name


def get_quantization_backend_override() -> Optional[str]:
    return _backend_override


def _cpu_kernel_usable(name, bits, in_features, out_features, dtype):
    if dtype not in _INT4_FLOAT_DTYPES:
        return False
    if name == "cpu-avx512":
        return _cpu_kernel_shape_ok(bits, in_features, out_features) and _load_cpu_kernels() is not None
    if name == "cpu-int8pack":
        # The AVX-512 kernel reads 16 columns at a time with no tail handling (wrong results / crashes otherwise).
        return (bits == 8 and in_features % 16 == 0
                and hasattr(torch.ops.aten, "_weight_int8pack_mm"))
    if name == "cpu-int4pack":
        return (bits == 4 and out_features % 16 == 0 and _int4_group_size(in_features) is not None
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                and bool(_calibrate_cpu_int4_layout()))
    return False


def _select_backend(layer, device, dtype) -> str:
    bits, k, n = layer.weight_bit_width, layer.in_features, layer.out_features
    forced = _backend_override
    if device.type == "cpu":
        candidates = [forced] if forced else ["cpu-avx512", "cpu-int8pack" if bits == 8 else "cpu-int4pack"]
        for name in candidates:
            if name == "torch-dequant":
                return name
            if _cpu_kernel_usable(name, bits, k, n, dtype):
                return name
    elif device.type == "cuda":
        candidates = [forced] if forced else list(CUDA_BACKENDS)
        for name in candidates:
            if name == "torch-dequant":
                return name
            if name in CUDA_BACKENDS and dtype in _KERNEL_SUFFIX and _get_launcher(name) is not None:
                return name
        if not forced and dtype in _KERNEL_SUFFIX:
            _warn_once("cuda-fallback", "No CUDA quantization kernels could be loaded (install cpm_kernels, or "
                       "check that the CUDA NVRTC library is present); using the slower torch-dequant backend.")
    if forced and forced != "torch-dequant":
        _warn_once(("forced", forced, device.type, bits, dtype),
                   "quantization backend %r cannot run %d-bit %s layers on %s; using torch-dequant for them.",
                   forced, bits, dtype, device.type)
    return "torch-dequant"


# ---------------------------------------------------------------------------------------------------------------------
# QuantizedLinear
# ---------------------------------------------------------------------------------------------------------------------
class QuantizedLinear(torch.nn.Module):
    """A linear layer with a weight-only int8 / int4 weight in the published storage format.

    Parameters (the checkpoint keys): ``weight`` int8 [out, in*bits/8], ``weight_scale`` [out] and ``bias``
    [out] or None, both in the model dtype.

    With the ``cpu-avx512`` and ``cpu-int4pack`` backends the weight is repacked once, on the first forward, into
    that kernel's layout. The packed bytes live in the non-persistent buffer ``packed_weight`` (same size as the
    stored weight) and ``weight`` becomes an empty placeholder, so the layer never holds two copies;
    ``state_dict()`` unpacks it and gives back the stored format bit for bit, and :meth:`stored_weight` returns it.
    Replacing or loading ``weight`` again (``load_state_dict``, transformers' loaders, ``module.weight = ...``)
    makes the stored format authoritative again. The scales in the form the kernel wants are the buffer
    ``scale_table`` (fp32 [out] for ``cpu-avx512``; a per-group table, 3-6 % of the int4 weight bytes, for
    ``cpu-int4pack``); both buffers count in ``get_memory_footprint()``.
    """

    def __init__(self, in_features, out_features, bits, bias=False, dtype=torch.float16, device=None):
        super().__init__()
        _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 quantization packs two columns per byte, so in_features must be even; "
                             f"got in_features={in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bit_width = bits
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(
            torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("packed_weight", None, persistent=False)
        self.register_buffer("scale_table", None, persistent=False)
        self._scale_table_key = None
        self._layout = None  # layout of packed_weight: "int4pack" or "blocked"
        self._last_backend = None

    # -- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int) -> "QuantizedLinear":
        _check_bits(bits)
        weight = linear.weight
        bias = linear.bias
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, bias=bias is not None, dtype=weight.dtype, device="meta")
        if weight.is_meta:
            return layer.to_empty(device="meta")
        stored, scale = quantize_weight(weight.detach(), bits)
        layer.weight = torch.nn.Parameter(stored, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.weight_bit_width}, bias={self.bias is not None}")

    # -- stored format <-> CPU int4 layout ----------------------------------------------------------------------------
    def _expected_weight_shape(self):
        return (self.out_features, self.in_features * self.weight_bit_width // 8)

    def _is_packed(self):
        """True while the weight lives (only) in ``packed_weight``. A ``weight`` that is no longer the empty
        placeholder was put there from outside (a load), so it wins and the packed copy is dropped."""
        if self.packed_weight is None:
            return False
        if self.weight is not None and self.weight.numel() != 0:
            self.packed_weight = None
            return False
        return True

    def stored_weight(self) -> torch.Tensor:
        """The weight in the published storage format, whatever layout is resident."""
        if self._is_packed():
            packed = self.packed_weight.cpu()
            if self._layout == "blocked":
                stored = _cpu_blocked_unpack(packed, self.weight_bit_width, self.out_features, self.in_features)
            else:
                stored = _cpu_int4_unpack(packed, self.out_features, self.in_features)
            return stored.to(self.packed_weight.device)
        return self.weight

    def _unpack_to_stored(self):
        if self._is_packed():
            with _pack_lock:
                self._unpack_to_stored_locked()

    def _unpack_to_stored_locked(self):
        if self._is_packed():
            stored = self.stored_weight()
            self.packed_weight = None
            self._layout = None
            self.weight = torch.nn.Parameter(stored, requires_grad=False)

    def _pack(self, layout):
        """Make ``layout`` ("int4pack": torch's int4 CPU layout; "blocked": the C kernels') the resident one."""
        if self._is_packed() and self._layout == layout:
            return
        with _pack_lock:  # two threads running the model for the first time must not pack the same layer twice
            if not (self._is_packed() and self._layout == layout):
                self._pack_locked(layout)

    def _pack_locked(self, layout):
        self._unpack_to_stored()
        stored = self.weight.detach()
        if layout == "blocked":
            packed = _cpu_blocked_pack(stored, self.weight_bit_width)
        else:
            packed = _cpu_int4_pack(stored)
        self.packed_weight = packed
        self._layout = layout
        placeholder = torch.empty(0, dtype=torch.int8, device=stored.device)
        self.weight = torch.nn.Parameter(placeholder, requires_grad=False)

    def _scale_table_for(self, dtype, layout):
        """The scales as the kernel for ``layout`` takes them, rebuilt if ``weight_scale`` changes: fp32 [N] for
        "blocked"; a [K/group, N, 2] (scale, zero=0) table in ``dtype`` for "int4pack"."""
        scale = self.weight_scale
        key = (scale.data_ptr(), scale._version, scale.dtype, dtype, layout)
        want = torch.float32 if layout == "blocked" else dtype
        # (a dtype move such as model.to(torch.bfloat16) converts the buffer without touching weight_scale)
        if self.scale_table is None or self._scale_table_key != key or self.scale_table.dtype != want:
            s = scale.detach().to(dtype)
            if layout == "blocked":
                table = s
            else:
                groups = self.in_features // _int4_group_size(self.in_features)
                table = torch.stack((s[None, :].expand(groups, -1), torch.zeros_like(s)[None, :].expand(groups, -1)),
                                    -1)
            self.scale_table = table.contiguous()
            self._scale_table_key = key
        return self.scale_table

    # -- nn.Module hooks ----------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._is_packed():
            destination[prefix + "weight"] = self.stored_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            check_quantized_weight(prefix + "weight", state_dict[key], self.out_features, self.in_features,
                                   self.weight_bit_width)
            # The incoming stored weight replaces whatever layout is resident.
            self.packed_weight = None
            self._layout = None
            self.scale_table = None
            if self.weight is None or tuple(self.weight.shape) != self._expected_weight_shape():
                self.weight = torch.nn.Parameter(
                    torch.empty(self._expected_weight_shape(), dtype=torch.int8, device=self.weight_scale.device),
                    requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, *args, **kwargs):
        # Moving to another device: go back to the stored format (the CPU layout means nothing elsewhere).
        if self._is_packed():
            probe = fn(torch.empty(0, dtype=torch.int8, device=self.packed_weight.device))
            if probe.device != self.packed_weight.device:
                self._unpack_to_stored()
        return super()._apply(fn, *args, **kwargs)

    # -- compute ------------------------------------------------------------------------------------------------------
    def backend_for(self, device=None, dtype=None) -> str:
        """The backend a forward with inputs on ``device`` in ``dtype`` would use (default: this layer's)."""
        device = torch.device(device) if device is not None else self.weight_scale.device
        dtype = dtype or self.weight_scale.dtype
        return _select_backend(self, device, dtype)

    def _packed_matmul(self, x2, backend):
        if backend == "cpu-avx512":
            return self._cpu_kernel_matmul(x2)
        if backend == "cpu-int8pack":
            self._unpack_to_stored()
            return torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.weight_scale.detach().to(x2.dtype))
        self._pack("int4pack")
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed_weight, _int4_group_size(self.in_features), self._scale_table_for(x2.dtype, "int4pack"))

    def _cpu_kernel_matmul(self, x2):
        """cpu-avx512: fused dequantize-and-multiply for up to _CPU_GEMV_MAX_ROWS rows (memory-bound decode), else
        dequantize into a temporary in the input dtype and use torch's GEMM (compute-bound prefill)."""
        lib = _load_cpu_kernels()
        self._pack("blocked")
        n, k, bits = self.out_features, self.in_features, self.weight_bit_width
        scale = self._scale_table_for(torch.float32, "blocked")
        threads = torch.get_num_threads()
        if x2.shape[0] <= _CPU_GEMV_MAX_ROWS:
            xf = x2.to(torch.float32).contiguous()
            x_bf16 = x2.data_ptr() if x2.dtype == torch.bfloat16 else None  # x2 is contiguous
            out = torch.empty(x2.shape[0], n, dtype=torch.float32)
            lib.chatglm_cpu_matmul(xf.data_ptr(), x_bf16, x2.shape[0], self.packed_weight.data_ptr(), bits,
                                   scale.data_ptr(), out.data_ptr(), n, k, threads)
            return out.to(x2.dtype)
        # Row chunks of ~8 MB, dequantized into a reused per-thread buffer: they stay in cache for the GEMM, and no
        # full-size float weight is ever allocated (fresh pages cost more than the dequantization itself).
        rows = max(_CPU_BLOCK_ROWS, (_CPU_DEQUANT_CHUNK_BYTES // (k * x2.element_size())) // _CPU_BLOCK_ROWS *
                   _CPU_BLOCK_ROWS)
        scratch = _cpu_scratch(min(rows, n) * k, x2.dtype)
        pieces = []
        for start in range(0, n, rows):
            count = min(rows, n - start)
            weight = scratch[:count * k].view(count, k)
            lib.chatglm_cpu_dequantize(self.packed_weight.data_ptr() + start * k * bits // 8, bits,
                                       scale.data_ptr() + start * 4, weight.data_ptr(), _CPU_OUT_TYPE[x2.dtype],
                                       count, k, threads)
            pieces.append(F.linear(x2, weight))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        backend = _select_backend(self, x.device, x.dtype)
        self._last_backend = backend
        lead = x.shape[:-1]
        scale = self.weight_scale.detach()
        if backend in CPU_BACKENDS:
            x2 = x.reshape(-1, self.in_features).contiguous()
            if torch.is_grad_enabled() and x.requires_grad:
                out = _PackedMatmul.apply(x2, self, backend)  # the packed kernels have no autograd formula
            else:
                out = self._packed_matmul(x2, backend)
        else:
            self._unpack_to_stored()
            weight = None
            if backend in CUDA_BACKENDS and _cuda_kernel_applicable(self.weight, self.weight_bit_width, x.dtype):
                try:
                    weight = _cuda_dequantize(_get_launcher(backend), self.weight, scale, self.weight_bit_width,
                                              x.dtype)
                except Exception as e:
                    _launchers[backend] = None  # don't try again
                    _warn_once(("cuda-failed", backend), "quantization backend %s failed (%s); falling back to "
                               "torch-dequant.", backend, e)
            if weight is None:
                self._last_backend = "torch-dequant" if backend in CUDA_BACKENDS else backend
                weight = dequantize_weight(self.weight, scale, self.weight_bit_width).to(x.dtype)
            out = F.linear(x.reshape(-1, self.in_features), weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)


class _PackedMatmul(torch.autograd.Function):
    """Packed-kernel forward; backward w.r.t. the input through the dequantized weight (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x2, layer, backend):
        ctx.layer = layer
        return layer._packed_matmul(x2, backend)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        weight = dequantize_weight(layer.stored_weight(), layer.weight_scale.detach(), layer.weight_bit_width)
        return grad_out @ weight.to(grad_out.dtype), None, None


def check_quantized_weight(name, tensor, out_features, in_features, bits):
    """ValueError unless ``tensor`` is a stored weight for a [out_features, in_features] linear at ``bits``."""
    expected = (out_features, in_features * bits // 8)
    if tuple(tensor.shape) != expected or tensor.dtype != torch.int8:
        hint = ""
        if tensor.is_floating_point():
            hint = (" It looks like an unquantized checkpoint: load it without quantization_bit and call "
                    f".quantize({bits}).")
        elif tensor.dim() == 2 and tensor.shape[0] == out_features:
            found_bits = {in_features: 8, in_features // 2: 4}.get(tensor.shape[1])
            if found_bits:
                hint = f" The checkpoint looks {found_bits}-bit quantized: set quantization_bit={found_bits}."
        raise ValueError(
            f"{name}: quantization_bit={bits} expects an int8 tensor of shape {list(expected)} "
            f"(int{bits} storage of a [{out_features}, {in_features}] weight), but the checkpoint has "
            f"{tensor.dtype} {list(tensor.shape)}.{hint}")


def check_quantized_state_dict(module: torch.nn.Module, state_dict_shapes, prefix=""):
    """Check checkpoint tensor shapes against every QuantizedLinear under ``module``, before any weight is loaded.

    ``state_dict_shapes`` maps checkpoint keys to tensors or to ``(shape, dtype)`` pairs (e.g. read from safetensors
    headers). Raises a ValueError naming the expected and found shape at the first mismatch."""
    for name, sub in module.named_modules():
        if not isinstance(sub, QuantizedLinear):
            continue
        key = f"{prefix}{name}.weight"
        if key not in state_dict_shapes:
            continue
        value = state_dict_shapes[key]
        if not isinstance(value, torch.Tensor):
            shape, dtype = value
            value = torch.empty(shape, dtype=dtype, device="meta")
        check_quantized_weight(key, value, sub.out_features, sub.in_features, sub.weight_bit_width)


def check_quantized_load(model: torch.nn.Module, loading_info) -> None:
    """After ``from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)``: raise a ValueError
    if a quantized layer's checkpoint tensors did not fit (``config.quantization_bit`` does not match the
    checkpoint) or its ``weight_scale`` was missing (an unquantized checkpoint loaded with ``quantization_bit``
    set: transformers would otherwise cast the float weight to int8 silently and leave the scales uninitialised).

    Works with the loading-info dicts of transformers 4.30 to 5.x (``mismatched_keys`` as (key, found, expected)
    tuples, ``missing_keys`` as names)."""
    info = loading_info if isinstance(loading_info, dict) else vars(loading_info)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return
    for entry in info.get("mismatched_keys") or ():
        if isinstance(entry, str):  # transformers 4.5x lists only the names
            key, found = entry, None
        else:
            key, found = entry[0], tuple(entry[1])
        module_name, _, param = key.rpartition(".")
        layer = layers.get(module_name)
        if layer is None:
            continue
        expected = layer._expected_weight_shape() if param == "weight" else (layer.out_features,)
        if param == "weight" and found is not None:
            check_quantized_weight(key, torch.empty(found, dtype=torch.int8, device="meta"), layer.out_features,
                                   layer.in_features, layer.weight_bit_width)
        raise ValueError(f"{key}: quantization_bit={layer.weight_bit_width} expects shape {list(expected)}, but the "
                         f"checkpoint's tensor has {list(found) if found is not None else 'another shape'}; "
                         f"check config.quantization_bit.")
    for key in info.get("missing_keys") or ():
        module_name, _, param = key.rpartition(".")
        layer = layers.get(module_name)
        if layer is not None and param in ("weight", "weight_scale"):
            raise ValueError(
                f"{key} is missing from the checkpoint, but config.quantization_bit={layer.weight_bit_width} says "
                f"the checkpoint is quantized (expected int8 weight {list(layer._expected_weight_shape())} and "
                f"weight_scale [{layer.out_features}]). For an unquantized checkpoint, load it without "
                f"quantization_bit and call .quantize({layer.weight_bit_width}).")


# ---------------------------------------------------------------------------------------------------------------------
# Whole-model helpers
# ---------------------------------------------------------------------------------------------------------------------
def _block_linear_slots(module: torch.nn.Module):
    """(parent, attribute name) of every block linear under ``module``, in module order."""
    for _, parent in module.named_modules():
        for child_name, names in QUANTIZED_LINEARS.items():
            child = getattr(parent, child_name, None)
            if not isinstance(child, torch.nn.Module) or child_name not in parent._modules:
                continue
            for name in names:
                if name in child._modules:
                    yield child, name


def quantize_model(module: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Replace, in place, the four block linears of every block under ``module`` with QuantizedLinear.

    Layers are converted one at a time and the float module is dropped as soon as it is replaced, so the peak
    memory is the float model plus one layer's temporaries (if nothing else holds the float weights)."""
    _check_bits(bits)
    slots = list(_block_linear_slots(module))
    # Validate everything first, so that a bad width leaves the model untouched.
    for parent, name in slots:
        layer = parent._modules[name]
        if isinstance(layer, QuantizedLinear) and layer.weight_bit_width != bits:
            raise ValueError(f"layer already quantized to {layer.weight_bit_width} bits, cannot requantize to {bits}")
        if isinstance(layer, torch.nn.Linear) and bits == 4 and layer.in_features % 2:
            raise ValueError(f"int4 quantization packs two columns per byte, so in_features must be even; "
                             f"{name} has in_features={layer.in_features}")
    for parent, name in slots:
        linear = parent._modules[name]
        if isinstance(linear, QuantizedLinear):
            if linear.weight_bit_width != bits:
                raise ValueError(f"layer already quantized to {linear.weight_bit_width} bits, cannot requantize "
                                 f"to {bits}")
            continue
        if not isinstance(linear, torch.nn.Linear):
            continue
        with torch.no_grad():
            parent._modules[name] = QuantizedLinear.from_linear(linear, bits)
        del linear
    return module


def quantization_backend(model_or_module: Optional[torch.nn.Module] = None) -> str:
    """Which compute backend runs the quantized linears.

    With a model: what each QuantizedLinear under it uses for inputs on its device in its dtype (several names
    joined by ``+`` if layers differ; ``"none"`` if nothing is quantized). Without: what an automatic choice gives
    for a bf16 layer on CUDA (if available) or the CPU, honouring :func:`set_quantization_backend`."""
    if model_or_module is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        probe = QuantizedLinear(4096, 4096, 8, dtype=torch.bfloat16, device="meta")
        return _select_backend(probe, device, torch.bfloat16)
    names = []
    for sub in model_or_module.modules():
        if isinstance(sub, QuantizedLinear):
            name = sub.backend_for()
            if name not in names:
                names.append(name)
    return "+".join(names) if names else "none"
