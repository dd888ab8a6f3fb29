"""This package's CPU kernels, AVX-512 C (cpu_source.py) built at run time with the host's C compiler and loaded with
ctypes: the int8 / int4 decode GEMV and dequantize of quantization.py's ``cpu-avx512`` backend (:class:`Avx512`), the
bf16 decode GEMV of linear.py's Linear (:func:`linear_bf16`), the one-token decode attention of modeling_chatglm.py's
SDPA path (:func:`decode_attention`) and the small bf16 steps between a decode step's GEMVs (:func:`rms_norm`,
:func:`rotary_`, :func:`silu_mul`).

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

from .cpu_source import CPU_SOURCE
from .quantization import FLOAT_DTYPES, in_row_chunks, pack_int4, unpack_int4

logger = logging.get_logger(__name__)

_lock = threading.Lock()

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
    if not (decode_attention(q, kv[0], kv[1], lib=lib).double().view(1, 2, 3, 64) - want).abs().max() < 2e-2:
        return False
    x, w = torch.randn(2, 96, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    cos, sin = torch.rand(2, 2, 8, generator=gen).bfloat16()
    out, h = torch.empty_like(x), x.float()
    lib.chatglm_cpu_rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), 2, 96, 1e-5)
    ok = torch.allclose(out.float(), w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)), rtol=1e-2)
    lib.chatglm_cpu_silu_mul(x.data_ptr(), out.data_ptr(), 2, 48)  # (out's first 96 values: [2, 48])
    ok &= torch.allclose(out.view(-1)[:96].view(2, 48).float(), F.silu(h[:, :48]) * h[:, 48:], rtol=1e-2, atol=1e-3)
    a, b = x.view(2, 3, 32)[..., :16:2], x.view(2, 3, 32)[..., 1:16:2]  # 3 heads of 32, the first 16 dims rotated
    c, s = cos[:, None], sin[:, None]
    want = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    lib.chatglm_cpu_rotary(x.data_ptr(), 2, 96, 3, 32, cos.data_ptr(), sin.data_ptr(), 8)
    return bool(ok and torch.equal(x.view(2, 3, 32)[..., :16], want))


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
                      "decode_attention": [ptr, ptr, ptr, ptr, *[i64] * 11, ptr, i64, ctypes.c_float, ptr, i32],
                      "rms_norm": [ptr, ptr, ptr, i64, i64, ctypes.c_float],
                      "rotary": [ptr, i64, i64, i64, i64, ptr, ptr, i64], "silu_mul": [ptr, ptr, i64, i64]}
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


# ---------------------------------------------------------------------------------------------------------------------
# The small bf16 steps between a decode step's GEMVs (RMSNorm, rotary, SwiGLU): each returns None where it does not
# take the tensors (the caller then runs its torch ops). Call only where load() gave the library.
# ---------------------------------------------------------------------------------------------------------------------
STEP_MAX_ROWS = GEMV_MAX_ROWS  # more rows (prefill): torch's ops, which use every thread


def _step_takes(x, width) -> bool:
    """A contiguous bf16 CPU tensor of up to STEP_MAX_ROWS rows, ``width`` (the kernel's vector) a multiple of 16."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous() and width % 16 == 0
            and 0 < x.numel() <= STEP_MAX_ROWS * x.shape[-1])


def rms_norm(x, weight, eps):
    """RMSNorm of the last dimension, fp32 inside, bf16 out (modeling_chatglm.RMSNorm's numerics)."""
    if not (_step_takes(x, x.shape[-1]) and weight.dtype == torch.bfloat16 and weight.is_contiguous()
            and weight.shape == x.shape[-1:]):
        return None
    out = torch.empty_like(x)
    _lib.chatglm_cpu_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                              eps)
    return out


def rotary_(x, heads, head_dim, cos, sin):
    """In place on ``x`` [b, s, ...] (rows of a fused QKV output): the rotary embedding of modeling_chatglm.apply_rotary
    on its first ``heads`` heads of ``head_dim``, angles ``cos`` / ``sin`` [b, 1, s, half]. True where it ran."""
    half = cos.shape[-1]
    if not (_step_takes(x, 2 * half) and x.dim() == 3 and 2 * half <= head_dim and heads * head_dim <= x.shape[-1]
            and cos.dtype == sin.dtype == torch.bfloat16 and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape == sin.shape == (x.shape[0], 1, x.shape[1], half)):
        return False
    _lib.chatglm_cpu_rotary(x.data_ptr(), x.shape[0] * x.shape[1], x.shape[-1], heads, head_dim, cos.data_ptr(),
                            sin.data_ptr(), half)
    return True


def silu_mul(x):
    """SwiGLU of [..., 2f] stacked [gate; up] -> [..., f]: silu(gate) * up, as torch's bf16 ops round it."""
    f = x.shape[-1] // 2
    if not _step_takes(x, f) or x.shape[-1] != 2 * f:
        return None
    out = torch.empty(*x.shape[:-1], f, dtype=x.dtype)
    _lib.chatglm_cpu_silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], f)
    return out
