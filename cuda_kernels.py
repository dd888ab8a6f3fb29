"""CUDA kernels for quantization.py's QuantizedLinear: readable CUDA C that dequantizes the published storage
format to fp16 / bf16, compiled at run time with NVRTC for the GPU that is present, and two ways to launch it
(``cuda-cpm_kernels``: cpm_kernels' NVRTC binding and driver calls; ``cuda-nvrtc``: torch's own NVRTC wrapper).
The dequantized weight then goes to cuBLAS through ``F.linear`` (in quantization.py).

quantization.py imports this module the first time a quantized layer is bound to a CUDA device; ``cpm_kernels``
is imported only when its launcher is first asked for. Nothing here raises for a missing library: ``launcher()``
gives None and says why at INFO level.
"""
import ctypes
import importlib

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

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

DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}
KERNEL_NAMES = tuple(f"chatglm_dequant_int{b}_{s}" for b in (4, 8) for s in ("f16", "bf16"))
THREADS = 256


class _CpmKernelsLauncher:
    """Compile CUDA_SOURCE with cpm_kernels' NVRTC binding, load it with its lazy module, launch via cuLaunchKernel."""

    def __init__(self):
        self._nvrtc = importlib.import_module("cpm_kernels.library.nvrtc")
        self._base = importlib.import_module("cpm_kernels.kernels.base")
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
        fn = self._funcs.get((device.index, name))
        if fn is None:
            with torch.cuda.device(device):
                module = self._compile(device)
                for n in KERNEL_NAMES:
                    self._funcs[(device.index, n)] = self._base.KernelFunction(module, n)
            fn = self._funcs[(device.index, name)]
        params = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        with torch.cuda.device(device):
            fn((grid, 1, 1), (THREADS, 1, 1), 0, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
               params)


class _TorchNvrtcLauncher:
    """The same kernels through ``torch.cuda._compile_kernel`` (torch's own NVRTC wrapper)."""

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
            fn(grid=(grid, 1, 1), block=(THREADS, 1, 1), args=list(args), stream=torch.cuda.current_stream(device))


_LAUNCHER_CLASSES = {"cuda-cpm_kernels": _CpmKernelsLauncher, "cuda-nvrtc": _TorchNvrtcLauncher}
_launchers = {}  # backend name -> launcher, or None where it cannot run


def launcher(name):
    """The launcher of backend ``name`` ("cuda-cpm_kernels" / "cuda-nvrtc"), or None (reason logged once)."""
    if name not in _launchers:
        found = None
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available")
            found = _LAUNCHER_CLASSES[name]()
        except Exception as e:  # ImportError, missing CUDA/NVRTC libraries, pkg_resources gone, ...
            logger.info("quantization backend %s unavailable: %s", name, e)
        _launchers[name] = found
    return _launchers[name]


def disable(name):
    """Stop using launcher ``name`` (after a failed launch)."""
    _launchers[name] = None


def applicable(stored, bits, dtype):
    """Whether the kernels take this stored weight and output dtype."""
    return (dtype in DTYPES and stored.is_contiguous() and stored.data_ptr() % 4 == 0
            and (bits == 4 or stored.shape[1] % 2 == 0) and stored.numel() < 2 ** 31 - 1)


def dequantize(run, stored, scale, bits, dtype):
    """Dequantize with launcher ``run`` to ``dtype`` (fp16 / bf16); the same bits as ``q.to(dtype) * scale``."""
    rows = stored.shape[0]
    per_row = stored.shape[1] if bits == 4 else stored.shape[1] // 2
    out = torch.empty(rows, stored.shape[1] * 8 // bits, dtype=dtype, device=stored.device)
    if rows == 0 or per_row == 0:
        return out
    grid = max(1, min((rows * per_row + THREADS - 1) // THREADS, 65535))
    run(f"chatglm_dequant_int{bits}_{DTYPES[dtype]}", grid, (stored, scale.to(dtype).contiguous(), out, rows, per_row),
        stored.device)
    return out
