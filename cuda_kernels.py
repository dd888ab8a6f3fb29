"""CUDA kernels for quantization.py's QuantizedLinear: readable CUDA C, compiled at run time with NVRTC for the GPU
that is present, that reads the published storage format directly:

* ``chatglm_gemv_int{4,8}_{f16,bf16}``: y = x @ dequant(w).T for few input rows (decode), fused: one warp per
  weight row reads each weight byte once, accumulates in fp32 and rounds once to the output dtype;
* ``chatglm_dequant_int{4,8}_{f16,bf16}``: the fp16 / bf16 weight, for cuBLAS (``F.linear``) on longer inputs.

Two ways to launch them: ``cuda-cpm_kernels`` (cpm_kernels' NVRTC binding and driver calls; install with
``pip install -r requirements-cuda.txt``) and ``cuda-nvrtc`` (torch's own NVRTC wrapper). A backend counts as
available on a GPU once its kernels compiled and a probe launch gave the right numbers there; otherwise
:func:`launcher` gives None for that GPU and :func:`why_not` says why. Nothing here raises for a missing library.
"""
import atexit
import ctypes
import glob
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

CUDA_SOURCE = r"""
// No headers: NVRTC may have no include path. Conversions use PTX / integer code; every float result is
// rounded to nearest even exactly once, as torch does.
#ifndef CHATGLM_EMULATION  // the host emulation in tests/ supplies these two with the same rounding
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
#endif
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
static __device__ __forceinline__ int byte_of(unsigned int word, int i) { return (int)(signed char)(word >> (8 * i)); }

// ---- dequantize: one output pair (two adjacent columns of a row) per thread and grid-stride step --------------------
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
        const unsigned int even = FROM_FLOAT((float)byte_of(two, 0) * s);                                  \
        const unsigned int odd = FROM_FLOAT((float)byte_of(two, 1) * s);                                   \
        out[i] = even | (odd << 16);                                                                       \
    }                                                                                                      \
}

// ---- GEMV: out[m, n] = round(scale[n] * sum_k x[m, k] * q[n, k]) for m < m_rows (<= 16) ---------------------------
// One warp per weight row (grid-stride over rows). Lane l takes the 16-column groups l, l + 32, ... of the first
// `groups` groups with 16-byte loads of x (and 16 / 8 weight bytes); the columns after them (all of them when
// groups = 0: unaligned data) go one per lane. Input rows go in chunks of 4 so the sums stay in registers.
struct alignas(16) u32x4 { unsigned int v[4]; };
struct alignas(8) u32x2 { unsigned int v[2]; };

static __device__ __forceinline__ void weights16_int8(const signed char* row, int group, float* w) {
    const u32x4 q = ((const u32x4*)row)[group];
#pragma unroll
    for (int i = 0; i < 16; ++i) w[i] = (float)byte_of(q.v[i / 4], i % 4);
}
static __device__ __forceinline__ void weights16_int4(const signed char* row, int group, float* w) {
    const u32x2 q = ((const u32x2*)row)[group];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int byte = byte_of(q.v[j / 4], j % 4);
        w[2 * j] = (float)sext4(byte >> 4);  // element 2j: high nibble
        w[2 * j + 1] = (float)sext4(byte);   // element 2j+1: low nibble
    }
}
static __device__ __forceinline__ float weight_int8(const signed char* row, int k) { return (float)row[k]; }
static __device__ __forceinline__ float weight_int4(const signed char* row, int k) {
    const int byte = (int)row[k / 2];
    return (float)sext4(k % 2 ? byte : byte >> 4);
}
static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

#define GEMV_CHUNK 4
#define DEFINE_GEMV(BITS, SUFFIX, TO_FLOAT, FROM_FLOAT)                                                    \
extern "C" __global__ void chatglm_gemv_int##BITS##_##SUFFIX(                                              \
        const unsigned short* __restrict__ x, const signed char* __restrict__ weight,                      \
        const unsigned short* __restrict__ scale, unsigned short* __restrict__ out,                        \
        int m_rows, int n, int k, int groups) {                                                            \
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;                                            \
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < n; row += gridDim.x * warps) {             \
        const signed char* w_row = weight + (long long)row * (k / (8 / BITS));                             \
        const float s = TO_FLOAT(scale[row]);                                                              \
        for (int m0 = 0; m0 < m_rows; m0 += GEMV_CHUNK) {                                                  \
            float acc[GEMV_CHUNK];                                                                         \
            _Pragma("unroll") for (int i = 0; i < GEMV_CHUNK; ++i) acc[i] = 0.0f;                          \
            for (int g = lane; g < groups; g += 32) {                                                      \
                float w[16];                                                                               \
                weights16_int##BITS(w_row, g, w);                                                          \
                _Pragma("unroll") for (int i = 0; i < GEMV_CHUNK; ++i) {                                   \
                    if (m0 + i < m_rows) {                                                                 \
                        const u32x4* xs = (const u32x4*)(x + (long long)(m0 + i) * k) + 2 * g;             \
                        const u32x4 lo = xs[0], hi = xs[1];                                                \
                        _Pragma("unroll") for (int j = 0; j < 8; ++j) {                                    \
                            const unsigned int two = j < 4 ? lo.v[j] : hi.v[j - 4];                        \
                            acc[i] += TO_FLOAT(two & 0xFFFFu) * w[2 * j];                                  \
                            acc[i] += TO_FLOAT(two >> 16) * w[2 * j + 1];                                  \
                        }                                                                                  \
                    }                                                                                      \
                }                                                                                          \
            }                                                                                              \
            for (int c = groups * 16 + lane; c < k; c += 32) {                                             \
                const float w = weight_int##BITS(w_row, c);                                                \
                _Pragma("unroll") for (int i = 0; i < GEMV_CHUNK; ++i)                                     \
                    if (m0 + i < m_rows) acc[i] += TO_FLOAT(x[(long long)(m0 + i) * k + c]) * w;           \
            }                                                                                              \
            _Pragma("unroll") for (int i = 0; i < GEMV_CHUNK; ++i) {                                       \
                const float total = warp_sum(acc[i]);  /* every lane takes part in the shuffles */         \
                if (lane == 0 && m0 + i < m_rows) out[(long long)(m0 + i) * n + row] = FROM_FLOAT(total * s); \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
}

DEFINE_DEQUANT(f16, half_to_float, float_to_half)
DEFINE_DEQUANT(bf16, bf16_to_float, float_to_bf16)
DEFINE_GEMV(8, f16, half_to_float, float_to_half)
DEFINE_GEMV(4, f16, half_to_float, float_to_half)
DEFINE_GEMV(8, bf16, bf16_to_float, float_to_bf16)
DEFINE_GEMV(4, bf16, bf16_to_float, float_to_bf16)
"""

DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}
KERNEL_NAMES = tuple(f"chatglm_{op}_int{b}_{s}" for op in ("dequant", "gemv") for b in (4, 8) for s in ("f16", "bf16"))
THREADS = 256      # dequantize block size
GEMV_WARPS = 4     # weight rows per GEMV block
GEMV_MAX_ROWS = 16  # input rows up to which matmul uses the GEMV
MAX_GRID = 65535   # blocks per launch; both kernels loop (grid-stride) over what does not fit


def dequantize(run, stored, scale, bits, dtype):
    """Dequantize with launcher ``run`` to ``dtype`` (fp16 / bf16); the same bits as ``q.to(dtype) * scale``."""
    rows = stored.shape[0]
    per_row = stored.shape[1] if bits == 4 else stored.shape[1] // 2
    out = torch.empty(rows, stored.shape[1] * 8 // bits, dtype=dtype, device=stored.device)
    if rows and per_row:
        grid = min((rows * per_row + THREADS - 1) // THREADS, MAX_GRID)
        run(f"chatglm_dequant_int{bits}_{DTYPES[dtype]}", grid, THREADS,
            (stored, scale.to(dtype).contiguous(), out, rows, per_row), stored.device)
    return out


def gemv(run, x2, stored, scale, bits):
    """``x2 @ dequantize_weight(stored, scale).T`` for x2 [m <= 16, in] (fp16 / bf16) with launcher ``run``: fp32
    sums of x * q, times the scale, rounded once to x2's dtype."""
    x2 = x2.contiguous()
    m, k = x2.shape
    n = stored.shape[0]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m and n:
        aligned = k % 16 == 0 and x2.data_ptr() % 16 == 0 and stored.data_ptr() % 16 == 0
        grid = min((n + GEMV_WARPS - 1) // GEMV_WARPS, MAX_GRID)
        run(f"chatglm_gemv_int{bits}_{DTYPES[x2.dtype]}", grid, GEMV_WARPS * 32,
            (x2, stored, scale.to(x2.dtype).contiguous(), out, m, n, k, k // 16 if aligned else 0), x2.device)
    return out


def applicable(stored, bits, dtype):
    """Whether the kernels take this stored weight and output dtype."""
    return (dtype in DTYPES and stored.is_contiguous() and stored.data_ptr() % 4 == 0
            and (bits == 4 or stored.shape[1] % 2 == 0) and max(stored.shape) < 2 ** 31)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers: run(name, grid, block, args, device), args = tensors and ints (C int)
# ---------------------------------------------------------------------------------------------------------------------
def _cuda_libraries():
    """{name: path} of the libnvrtc / libcudart / libcublasLt torch uses: those already loaded in this process,
    else those of torch's NVIDIA wheels (preferring torch's CUDA major version)."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if ".so" in line]
    except OSError:
        pass
    spec = importlib.util.find_spec("nvidia")
    major = (torch.version.cuda or "").split(".")[0]
    for folder in (spec.submodule_search_locations or []) if spec else []:
        paths += sorted(glob.glob(os.path.join(folder, "**", "lib*.so*"), recursive=True),
                        key=lambda p: not p.endswith(f".so.{major}"))
    found = {}
    for name in ("nvrtc", "cudart", "cublasLt"):
        found.update({name: p for p in reversed(paths) if os.path.basename(p).startswith(f"lib{name}.so")})
    return found


def _cuda_path_for(libraries):
    """A folder laid out as cpm_kernels looks for a toolkit ($CUDA_PATH/lib64/lib<name>.so), linking to
    ``libraries`` and their neighbours (libnvrtc loads libnvrtc-builtins from its own folder). Removed at exit."""
    root = tempfile.mkdtemp(prefix="chatglm-cuda-libs-")
    atexit.register(shutil.rmtree, root, True)
    lib64 = os.path.join(root, "lib64")
    os.mkdir(lib64)
    for name, path in libraries.items():
        for neighbour in glob.glob(os.path.join(os.path.dirname(path), "lib*.so*")):
            if not os.path.lexists(os.path.join(lib64, os.path.basename(neighbour))):
                os.symlink(neighbour, os.path.join(lib64, os.path.basename(neighbour)))
        if not os.path.lexists(os.path.join(lib64, f"lib{name}.so")):
            os.symlink(path, os.path.join(lib64, f"lib{name}.so"))
    return root


def _import_cpm_kernels():
    """Import cpm_kernels. It looks for CUDA libraries only under $CUDA_PATH, /usr/local/cuda and ldconfig, so
    where CUDA_PATH is unset it is pointed, for the import only, at the libraries torch uses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources' deprecation warning
        if "cpm_kernels" in sys.modules or "CUDA_PATH" in os.environ:
            cpm = importlib.import_module("cpm_kernels")
        else:
            os.environ["CUDA_PATH"] = _cuda_path_for(_cuda_libraries())
            try:
                cpm = importlib.import_module("cpm_kernels")
            finally:
                del os.environ["CUDA_PATH"]
    if cpm.library.nvrtc.version == (0, 0):
        raise RuntimeError("cpm_kernels found no usable libnvrtc")
    return cpm


class _CpmKernelsLauncher:
    """Compile CUDA_SOURCE with cpm_kernels' NVRTC binding, load it with its lazy module, launch via cuLaunchKernel."""

    def __init__(self):
        cpm = _import_cpm_kernels()
        self._nvrtc, self._base = cpm.library.nvrtc, importlib.import_module("cpm_kernels.kernels.base")
        self._funcs = {}  # (device index, name) -> KernelFunction

    def _compile(self, device):
        nvrtc = self._nvrtc
        major, minor = torch.cuda.get_device_capability(device)
        prog = nvrtc.nvrtcProgram()
        nvrtc.nvrtcCreateProgram(prog, CUDA_SOURCE, "chatglm_quantization.cu", 0, [], [])
        try:
            nvrtc.nvrtcCompileProgram(prog, 2, [f"--gpu-architecture=sm_{major}{minor}", "--std=c++14"])
            buf = ctypes.create_string_buffer(nvrtc.nvrtcGetCUBINSize(prog))
            nvrtc.nvrtcGetCUBIN(prog, buf)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        module = self._base.LazyKernelCModule(buf.raw)
        for n in KERNEL_NAMES:
            self._funcs[(device.index, n)] = self._base.KernelFunction(module, n)

    def __call__(self, name, grid, block, args, device):
        with torch.cuda.device(device):
            if (device.index, name) not in self._funcs:
                self._compile(device)
            params = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
            stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
            self._funcs[(device.index, name)]((grid, 1, 1), (block, 1, 1), 0, stream, params)


class _TorchNvrtcLauncher:
    """The same kernels through ``torch.cuda._compile_kernel`` (torch's own NVRTC wrapper)."""

    def __init__(self):
        self._compile_kernel = getattr(torch.cuda, "_compile_kernel", None) or getattr(torch.cuda, "compile_kernel")
        self._funcs = {}

    def __call__(self, name, grid, block, args, device):
        with torch.cuda.device(device):
            fn = self._funcs.get((device.index, name))
            if fn is None:
                fn = self._funcs[(device.index, name)] = self._compile_kernel(CUDA_SOURCE, name)
            fn(grid=(grid, 1, 1), block=(block, 1, 1), args=list(args), stream=torch.cuda.current_stream(device))


def _probe(run, device):
    """Launch both kernel kinds on exactly representable numbers; RuntimeError unless the results are exact."""
    q8 = torch.arange(-64, 64, 3, dtype=torch.int8, device=device)[:40].reshape(2, 20)
    s = torch.tensor([0.5, -0.25], dtype=torch.float16, device=device)
    q4 = torch.full((2, 16), 0x3E, dtype=torch.int8, device=device)  # element 2j = 3, element 2j+1 = -2
    x = torch.arange(-16, 16, dtype=torch.float16, device=device).reshape(1, 32)
    want4 = (x.double() @ torch.tensor([3.0, -2.0] * 16, device=device, dtype=torch.float64) * s.double()).half()
    if not (torch.equal(dequantize(run, q8, s, 8, torch.float16), q8.half() * s[:, None])
            and torch.equal(gemv(run, x, q4, s, 4), want4.reshape(1, 2))):
        raise RuntimeError("the probe launch gave wrong results")


_LAUNCHER_CLASSES = {"cuda-cpm_kernels": _CpmKernelsLauncher, "cuda-nvrtc": _TorchNvrtcLauncher}
_launchers = {}  # backend name -> launcher object, or the reason it cannot be made
_on_device = {}  # (backend name, device index) -> launcher, or the reason it cannot run there


def _index(device):
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def launcher(name, device):
    """The launcher of backend ``name`` ("cuda-cpm_kernels" / "cuda-nvrtc") for CUDA ``device``, or None where it
    cannot run there (:func:`why_not` says why). The first call per device compiles the kernels and probes them."""
    key = (name, _index(device) if torch.cuda.is_available() else None)
    if key not in _on_device:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available")
            if name not in _launchers:
                try:
                    _launchers[name] = _LAUNCHER_CLASSES[name]()
                except Exception as e:  # ImportError, missing CUDA libraries, pkg_resources gone, ...
                    _launchers[name] = f"{type(e).__name__}: {e}"
            if isinstance(_launchers[name], str):
                raise RuntimeError(_launchers[name])
            _probe(_launchers[name], torch.device("cuda", key[1]))
            _on_device[key] = _launchers[name]
        except Exception as e:
            _on_device[key] = str(e) or type(e).__name__
            logger.info("quantization backend %s unavailable on cuda:%s: %s", name, key[1], _on_device[key])
    found = _on_device[key]
    return None if isinstance(found, str) else found


def why_not(name, device):
    """Why ``launcher(name, device)`` is None (None if it is not)."""
    found = _on_device.get((name, _index(device) if torch.cuda.is_available() else None))
    return found if isinstance(found, str) else None


def disable(name, device, reason):
    """Stop using launcher ``name`` on ``device`` (after a failed launch there)."""
    _on_device[(name, _index(device))] = reason
