"""Weight-only int8 / int4 quantization of the ChatGLM3 block linears.

Storage format (the published one; checkpoints written by the original code load unchanged):

* Only the four linears of every block are quantized: ``self_attention.query_key_value``,
  ``self_attention.dense``, ``mlp.dense_h_to_4h`` and ``mlp.dense_4h_to_h`` (and, only when asked for with
  ``quantize(model, bits, quantize_output_layer=True)``, ``output_layer``, in the same format: this package's
  extension).
* ``weight_scale`` [out_features], in the model dtype: ``max |w|`` over the row divided by 127 (int8) or 7 (int4).
* ``weight`` int8: ``q = round(w / weight_scale[:, None])``; [out, in] for int8; for int4 [out, in / 2] with
  element 2j in the high nibble and element 2j+1 in the low nibble, both signed 4-bit two's complement.
* ``bias`` (query_key_value has one) stays in the model dtype.
* An all-zero row gets scale 0 and q = 0, so it dequantizes to exact zeros (the original computed 0/0 = NaN).

Use: :func:`quantize` converts a model in place; :meth:`QuantizedLinear.pack` (``model.pack_weights()``, which
``generate`` calls) binds a layer to the fastest backend for its device and dtype and, where that backend reads a
weight layout of its own, re-lays the weight out once; ``unpack()`` undoes it, and so do ``.to()``, ``train()``,
``state_dict()`` and ``load_state_dict`` (``linear.InferenceLayout``). A layer that is not packed binds, on its
first forward for a device and dtype, the fastest backend that reads the stored format as it is.

Compute backends (:func:`quantization_backend` says which runs; :func:`set_quantization_backend` forces one):

=================== ====== ======= ===================================================================
name                device layout  what runs
=================== ====== ======= ===================================================================
``cpu-avx512``      CPU    codes   this package's C kernels (cpu_kernels.py), compiled once for the host CPU and
                                   cached under ``HF_HOME``; x86-64 with AVX-512 F/BW, a C compiler,
                                   in_features % 128 == 0, out_features % 8 == 0; ``CHATGLM_CPU_KERNELS=0``: off
``cpu-int8pack``    CPU    stored  ``torch._weight_int8pack_mm``
``cpu-int4pack``    CPU    torch's ``torch._weight_int4pack_mm_for_cpu``
``cuda-cpm_kernels``CUDA   stored  cuda_kernels.py's kernels through ``cpm_kernels`` (requirements-cuda.txt): a fused
                                   GEMV for up to 16 input rows, else dequantize + cuBLAS
``cuda-nvrtc``      CUDA   stored  the same kernels through torch's own NVRTC wrapper
``torch-dequant``   any    stored  ``q * scale`` in plain torch, then ``F.linear`` (always available)
=================== ====== ======= ===================================================================

The kernel modules are imported the first time a layer is bound to a device that uses them; ``cpm_kernels`` only
when its launcher is first asked for. Anything missing there falls back (with one warning) instead of failing.
"""
import functools
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .configuration_chatglm import SUPPORTED_QUANTIZATION_BITS
from .linear import PACK_LOCK, InferenceLayout, PackedWeight, pack_weight, unpack_weight

logger = logging.get_logger(__name__)

WEIGHT_BITS = tuple(b for b in SUPPORTED_QUANTIZATION_BITS if b)  # (4, 8)
QUANTIZED_LINEARS = {
    "self_attention": ("query_key_value", "dense"),
    "mlp": ("dense_h_to_4h", "dense_4h_to_h"),
}
CPU_BACKENDS = ("cpu-avx512", "cpu-int8pack", "cpu-int4pack")
CUDA_BACKENDS = ("cuda-cpm_kernels", "cuda-nvrtc")
BACKENDS = CPU_BACKENDS + CUDA_BACKENDS + ("torch-dequant",)

_forced_backend: Optional[str] = None
_choice_epoch = 0  # bumped by set_quantization_backend: unpacked layers choose again
_warned = set()


def _warn_once(key, msg, *args):
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def check_bits(bits, allow_zero=False):
    """ValueError unless ``bits`` is a supported weight width (or 0, "not quantized", when ``allow_zero``)."""
    valid = SUPPORTED_QUANTIZATION_BITS if allow_zero else WEIGHT_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in valid:
        names = ", ".join(map(str, valid[:-1])) + f" or {valid[-1]}"
        raise ValueError(f"weight bit width must be {names}, got {bits!r}")


def check_width(bits, in_features, name="the layer"):
    """ValueError unless a layer with ``in_features`` inputs can be stored at ``bits``."""
    if bits == 4 and in_features % 2:
        raise ValueError(f"int4 quantization packs two columns per byte, so in_features must be even; "
                         f"{name} has in_features={in_features}")


# ---------------------------------------------------------------------------------------------------------------------
# Storage format: quantize / pack / dequantize (pure torch, any device)
# ---------------------------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight [out, in] to the stored format. Returns ``(stored int8, weight_scale)``.

    Arithmetic happens in the weight's own dtype, as in the original (so fp16 checkpoints quantize bit-identically).
    """
    check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating point weight, got {tuple(weight.shape)} {weight.dtype}")
    check_width(bits, weight.shape[1], "the weight")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach()
    scale = w.abs().amax(dim=-1) / qmax
    # All-zero rows: scale 0, q 0 (dequantizes to exact zeros instead of 0/0 = NaN).
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / divisor[:, None]).clamp_(-qmax - 1, qmax).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


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
    check_bits(bits)
    q = unpack_int4(stored) if bits == 4 else stored
    return q.to(scale.dtype) * scale[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# Backends. Each kernel object has: name; layout (None: reads the stored format); differentiable;
# usable(bits, out_features, in_features, dtype); matmul(x2, weight, scale, bits, out_features, in_features) -> the
# product without bias; and, with a layout, pack(stored, bits) / unpack(packed, bits, n, k) / scales(scale, k, dtype).
# ---------------------------------------------------------------------------------------------------------------------
class _TorchDequant:
    name = "torch-dequant"
    layout = None
    differentiable = True

    def usable(self, bits, out_features, in_features, dtype):
        return True

    def matmul(self, x2, weight, scale, bits, out_features, in_features):
        return F.linear(x2, dequantize_weight(weight, scale, bits).to(x2.dtype))


class _CudaDequant:
    """cuda_kernels.py through launcher ``name`` on one GPU: the fused GEMV for inputs of up to 16 rows, else
    dequantize + cuBLAS. A failed launch disables that launcher on that GPU (one warning) and the layers using it
    choose again."""

    layout = None
    differentiable = True

    def __init__(self, name, kernels, device):
        self.name, self._kernels, self._device = name, kernels, device  # kernels: the cuda_kernels module

    def usable(self, bits, out_features, in_features, dtype):
        return dtype in (torch.float16, torch.bfloat16) and self._kernels.launcher(self.name, self._device) is not None

    def matmul(self, x2, weight, scale, bits, out_features, in_features):
        global _choice_epoch
        k = self._kernels
        run = k.launcher(self.name, self._device)
        if run is not None and k.applicable(weight, bits, x2.dtype):
            try:
                if x2.shape[0] <= k.GEMV_MAX_ROWS:
                    return k.gemv(run, x2, weight, scale, bits)
                return F.linear(x2, k.dequantize(run, weight, scale, bits, x2.dtype))
            except Exception as e:
                k.disable(self.name, self._device, f"a launch failed: {e}")
                _choice_epoch += 1  # the layers bound to it choose again
                _warn_once(("cuda-failed", self.name, self._device), "quantization backend %s failed on %s (%s); its "
                           "layers there use another backend from now on.", self.name, self._device, e)
        return TORCH_DEQUANT.matmul(x2, weight, scale, bits, out_features, in_features)


TORCH_DEQUANT = _TorchDequant()


# torch's packed CPU kernels (this package's own, cpu-avx512, are in cpu_kernels.py)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PACK_CHUNK_ROWS = 1024  # rows re-laid-out at a time (bounds the temporaries); a multiple of every block size
_int4_lock = threading.Lock()


def in_row_chunks(fn, stored):
    """``fn`` over the rows of ``stored`` in chunks of PACK_CHUNK_ROWS (bounds the temporaries of a re-layout)."""
    if stored.shape[0] <= PACK_CHUNK_ROWS:
        return fn(stored)
    return torch.cat([fn(stored[i:i + PACK_CHUNK_ROWS]) for i in range(0, stored.shape[0], PACK_CHUNK_ROWS)])


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
        except RuntimeError as first:
            # Other torch builds take the values already nibble-packed (uint8 [n, K/2], element 2j high).
            v = values_u4.to(torch.uint8)
            try:
                return torch.ops.aten._convert_weight_to_int4pack_for_cpu((v[:, 0::2] << 4 | v[:, 1::2]).contiguous(), 2)
            except RuntimeError:
                raise first from None

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
        with _int4_lock:
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
        return in_row_chunks(lambda rows: self._torch_pack(unpack_int4(rows) + 8), stored)

    def unpack(self, packed, bits, out_features, in_features):
        block_n, mode = self._calibrate()
        codes = self._layout_unpack(packed.view(torch.uint8), out_features, in_features, block_n, mode)
        return pack_int4(codes.to(torch.int8) - 8)

    def scales(self, scale, in_features, dtype):
        """[K/group, N, 2] (scale, zero = 0) in the activation dtype."""
        scale = scale.to(dtype)
        groups = in_features // self._group_size(in_features)
        return torch.stack((scale.expand(groups, -1), torch.zeros_like(scale).expand(groups, -1)), -1).contiguous()

    def matmul(self, x2, packed, table, bits, out_features, in_features):
        if x2.dtype != table.dtype:
            return self.matmul(x2.to(table.dtype), packed, table, bits, out_features, in_features).to(x2.dtype)
        group_size = in_features // table.shape[0]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed.view(torch.uint8), group_size, table)


_device_kernels = {}  # device type (CUDA: device) -> {name: kernel} in order of preference


def _kernels_for(device):
    """The kernels for a device (per GPU on CUDA); imports their module the first time."""
    key = device.type
    if key == "cuda":
        key = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    kernels = _device_kernels.get(key)
    if kernels is None:
        if device.type == "cpu":
            from .cpu_kernels import Avx512

            kernels = {k.name: k for k in (Avx512(), Int8Pack(), Int4Pack())}
        elif device.type == "cuda":
            from . import cuda_kernels

            kernels = {name: _CudaDequant(name, cuda_kernels, key) for name in CUDA_BACKENDS}
        else:
            kernels = {}
        _device_kernels[key] = kernels
    return kernels


def _choose(layer, device, dtype, packed_ok):
    """The kernel for ``layer`` with inputs on ``device`` in ``dtype``; with ``packed_ok`` False only kernels that
    read the stored format (a forced kernel with a layout of its own applies from the next :meth:`pack`)."""
    bits, n, k = layer.weight_bit_width, layer.out_features, layer.in_features
    kernels = _kernels_for(device)
    forced = _forced_backend
    if forced == "torch-dequant":
        return TORCH_DEQUANT
    if forced is not None:
        kernel = kernels.get(forced)
        if kernel is None or not kernel.usable(bits, n, k, dtype):
            _warn_once(("forced", forced, device.type, bits, dtype), "quantization backend %r cannot run %d-bit %s "
                       "layers on %s; using torch-dequant for them.", forced, bits, dtype, device.type)
            return TORCH_DEQUANT
        if packed_ok or kernel.layout is None:
            return kernel
    chosen = next((kernel for kernel in kernels.values()
                   if (packed_ok or kernel.layout is None) and kernel.usable(bits, n, k, dtype)), TORCH_DEQUANT)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and chosen.name != CUDA_BACKENDS[0]:
        first = kernels[CUDA_BACKENDS[0]]
        _warn_once(("cuda-fallback", first._device), "quantization backend %s cannot run on %s (%s); using %s.",
                   first.name, first._device, first._kernels.why_not(first.name, first._device), chosen.name)
    return chosen


def set_quantization_backend(name: Optional[str]):
    """Force a compute backend for every QuantizedLinear (``None`` / ``"auto"``: choose automatically).

    Unpacked layers choose again at their next forward, packed ones at their next :meth:`QuantizedLinear.pack`.
    A forced backend that cannot run a layer (device, bit width, shape or dtype) gives ``torch-dequant`` for it,
    with one warning; :func:`quantization_backend` reports what really runs."""
    global _forced_backend, _choice_epoch
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown quantization backend {name!r}; expected one of {('auto',) + BACKENDS}")
    _forced_backend = None if name in (None, "auto") else name
    _choice_epoch += 1


# ---------------------------------------------------------------------------------------------------------------------
# QuantizedLinear
# ---------------------------------------------------------------------------------------------------------------------
class QuantizedLinear(InferenceLayout, torch.nn.Module):
    """A linear layer with a weight-only int8 / int4 weight in the published storage format.

    Parameters (the checkpoint keys): ``weight`` int8 [out, in*bits/8], ``weight_scale`` [out] and ``bias``
    [out] or None, both in the model dtype.

    ``backend`` names the bound kernel (None until the first forward or :meth:`pack`). While ``is_packed``,
    ``weight`` is a :class:`linear.PackedWeight` of the same shape and dtype holding the kernel's layout, with the
    scales in the form it wants in the non-persistent buffer ``scale_table``; :meth:`stored_weight` gives the
    stored format bit for bit, and ``state_dict()`` unpacks first.
    """

    def __init__(self, in_features, out_features, bits, bias=False, dtype=torch.float16, device=None):
        super().__init__()
        check_bits(bits)
        check_width(bits, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bit_width = bits
        self.weight = torch.nn.Parameter(
            torch.empty(self._stored_shape(), dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                               requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("scale_table", None, persistent=False)  # the scales as a packed kernel wants them
        self.backend = None  # name of the bound kernel
        self._kernel = None
        self._bound_for = None  # (device, dtype, choice epoch) of a stored-format kernel; (.., name, "packed")

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int, empty_init=False, device=None) -> "QuantizedLinear":
        """Quantize ``linear`` (``empty_init``: only allocate, for weights loaded afterwards), on ``device``
        (default: the linear's)."""
        weight, bias = linear.weight, linear.bias
        out_features, in_features = weight.shape
        device = weight.device if device is None else device
        layer = cls(in_features, out_features, bits, bias=bias is not None, dtype=weight.dtype,
                    device=device if empty_init else "meta")
        if empty_init or weight.is_meta:
            return layer
        stored, scale = quantize_weight(weight.detach().to(device), bits)
        layer.weight = torch.nn.Parameter(stored, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().to(device, copy=True), requires_grad=False)
        return layer

    def _stored_shape(self):
        return (self.out_features, self.in_features * self.weight_bit_width // 8)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_bit_width}, "
                f"bias={self.bias is not None}, backend={self.backend}, packed={self.is_packed}")

    # -- explicit conversion ------------------------------------------------------------------------------------------
    @property
    def is_packed(self) -> bool:
        return type(self._parameters["weight"]) is PackedWeight

    def pack(self, dtype: Optional[torch.dtype] = None) -> "QuantizedLinear":
        """Bind the fastest backend for this layer's device and ``dtype`` inputs (default: the model dtype) and, if
        it reads a layout of its own, re-lay the weight out for it, once. No-op when already so."""
        device, dtype = self.weight_scale.device, dtype or self.weight_scale.dtype
        bits, n, k = self.weight_bit_width, self.out_features, self.in_features
        with PACK_LOCK, torch.inference_mode(False), torch.no_grad():
            kernel = _choose(self, device, dtype, packed_ok=True)
            packed_for = (device, dtype, kernel.name, "packed")
            if kernel.layout is None:
                self.unpack()
                self._kernel, self.backend, self._bound_for = kernel, kernel.name, (device, dtype, _choice_epoch)
            elif not (self.is_packed and self._bound_for == packed_for):
                self.unpack()
                unpack = functools.partial(kernel.unpack, bits=bits, out_features=n, in_features=k)
                pack_weight(self, lambda w: kernel.pack(w, bits), unpack)
                self.scale_table = kernel.scales(self.weight_scale.detach(), k, dtype)
                self._kernel, self.backend, self._bound_for = kernel, kernel.name, packed_for
        return self

    def unpack(self) -> "QuantizedLinear":
        """Back to the stored format with no backend bound (no-op when not packed)."""
        with PACK_LOCK:
            unpack_weight(self)
            self.scale_table = None
            self._kernel = self.backend = self._bound_for = None
        return self

    def stored_weight(self) -> torch.Tensor:
        """The weight in the published storage format, whatever layout is resident."""
        weight = self._parameters["weight"]
        return weight.unpacked() if type(weight) is PackedWeight else weight

    def backend_for(self, device=None, dtype=None) -> str:
        """The backend a forward with inputs on ``device`` in ``dtype`` uses (default: this layer's)."""
        if self.is_packed:
            return self.backend
        device = torch.device(device) if device is not None else self.weight_scale.device
        return _choose(self, device, dtype or self.weight_scale.dtype, packed_ok=False).name

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            check_quantized_weight(key, state_dict[key], self.out_features, self.in_features, self.weight_bit_width)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # unpacks first (InferenceLayout)

    # -- compute ------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        weight = self._parameters["weight"]
        if type(weight) is PackedWeight:
            scale = self._buffers["scale_table"]
        else:
            if self._bound_for != (x.device, x.dtype, _choice_epoch):
                kernel = _choose(self, x.device, x.dtype, packed_ok=False)
                self._kernel, self.backend, self._bound_for = kernel, kernel.name, (x.device, x.dtype, _choice_epoch)
            scale = self._parameters["weight_scale"]
        x2 = x.reshape(-1, self.in_features)
        if x.requires_grad and not self._kernel.differentiable and torch.is_grad_enabled():
            out = _KernelMatmul.apply(x2, self, weight, scale)
        else:
            out = self._kernel.matmul(x2, weight, scale, self.weight_bit_width, self.out_features, self.in_features)
        bias = self._parameters["bias"]
        if bias is not None:
            out = out + (bias if bias.dtype == out.dtype else bias.to(out.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


class _KernelMatmul(torch.autograd.Function):
    """A kernel without an autograd formula; backward w.r.t. the input through the dequantized (frozen) weight."""

    @staticmethod
    def forward(ctx, x2, layer, weight, scale):
        ctx.layer = layer
        return layer._kernel.matmul(x2, weight, scale, layer.weight_bit_width, layer.out_features, layer.in_features)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        weight = dequantize_weight(layer.stored_weight(), layer.weight_scale.detach(), layer.weight_bit_width)
        return grad_out @ weight.to(grad_out.dtype), None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint checks
# ---------------------------------------------------------------------------------------------------------------------
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


def check_quantized_load(model: torch.nn.Module, loading_info) -> None:
    """After ``from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)``: raise a ValueError
    if a quantized layer's checkpoint tensors did not fit (``config.quantization_bit`` does not match the
    checkpoint) or its ``weight_scale`` was missing (an unquantized checkpoint loaded with ``quantization_bit``
    set: transformers would otherwise cast the float weight to int8 silently and leave the scales uninitialised).

    Works with the loading-info dicts of transformers 4.30 to 5.x (``mismatched_keys`` as (key, found, expected)
    tuples, or names only)."""
    info = loading_info if isinstance(loading_info, dict) else vars(loading_info)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return
    for entry in info.get("mismatched_keys") or ():
        key, found = (entry, None) if isinstance(entry, str) else (entry[0], tuple(entry[1]))
        module_name, _, param = key.rpartition(".")
        layer = layers.get(module_name)
        if layer is None:
            continue
        expected = layer._stored_shape() if param == "weight" else (layer.out_features,)
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
                f"the checkpoint is quantized (expected int8 weight {list(layer._stored_shape())} and "
                f"weight_scale [{layer.out_features}]). For an unquantized checkpoint, load it without "
                f"quantization_bit and call .quantize({layer.weight_bit_width}).")


# ---------------------------------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------------------------------
def _block_linear_slots(module: torch.nn.Module):
    """(parent, attribute name) of every block linear under ``module``, in module order."""
    for _, parent in module.named_modules():
        for child_name, names in QUANTIZED_LINEARS.items():
            child = parent._modules.get(child_name)
            for name in names if child is not None else ():
                if name in child._modules:
                    yield child, name


def quantize(model: torch.nn.Module, bits: int, quantize_output_layer: bool = False, empty_init: bool = False,
             device=None, **unexpected) -> torch.nn.Module:
    """Weight-only quantization of a ChatGLM model's block linears, in place; returns the model. The one entry
    point (the models' ``quantize`` methods call it).

    ``bits``: 8 or 4 (0: nothing to do). ``quantize_output_layer``: also quantize ``output_layer`` (sets
    ``config.quantize_output_layer``; such a checkpoint loads with this code only). ``empty_init``: allocate the
    quantized layers without computing them, for weights loaded afterwards. ``device``: where the quantized
    layers are computed and kept (default: where each float layer is). Everything is checked before any layer
    changes; a model already quantized to ``bits`` is left as it is (its output layer may still be quantized).
    """
    if unexpected:
        raise ValueError(f"quantize() got unexpected argument(s): {', '.join(sorted(unexpected))}")
    check_bits(bits, allow_zero=True)
    for name, value in (("quantize_output_layer", quantize_output_layer), ("empty_init", empty_init)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"quantize(device={device!r}): {e}") from None
    if bits == 0:
        return model
    config = model.config
    if config.quantization_bit and config.quantization_bit != bits:
        raise ValueError(f"model is already quantized to {config.quantization_bit} bits; load the float checkpoint "
                         f"to quantize to {bits} bits")
    slots = [(parent, name) for parent, name in _block_linear_slots(model)
             if isinstance(parent._modules[name], torch.nn.Linear)]
    core = getattr(model, "transformer", model)  # the ChatGLMModel, which holds output_layer
    if quantize_output_layer and isinstance(core._modules.get("output_layer"), torch.nn.Linear):
        if config.tie_word_embeddings:
            raise ValueError("cannot quantize output_layer: it is tied to the input embeddings "
                             "(tie_word_embeddings=True)")
        slots.append((core, "output_layer"))
    if not slots:
        logger.warning("Already quantized to %d bits; nothing to do.", bits)
        return model
    for parent, name in slots:
        check_width(bits, parent._modules[name].in_features, name)
    with torch.no_grad():
        for parent, name in slots:
            linear = parent._modules[name]
            if callable(getattr(linear, "unpack", None)):  # a float layer in a packed layout of its own
                linear.unpack()
            parent._modules[name] = QuantizedLinear.from_linear(linear, bits, empty_init=empty_init, device=device)
            del linear  # the float weight goes as soon as it is replaced: peak memory is one layer's temporaries
    config.quantization_bit = bits
    if quantize_output_layer:
        config.quantize_output_layer = True
    return model


def quantization_backend(model_or_module: Optional[torch.nn.Module] = None) -> str:
    """Which compute backend runs the quantized linears.

    With a model: what each QuantizedLinear under it uses for inputs on its device in its dtype (several names
    joined by ``+`` if layers differ; ``"none"`` if nothing is quantized). Without: what :func:`pack` would bind
    for a bf16 int8 layer on CUDA (if available) or the CPU, honouring :func:`set_quantization_backend`."""
    if model_or_module is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        probe = QuantizedLinear(4096, 4096, 8, dtype=torch.bfloat16, device="meta")
        return _choose(probe, device, torch.bfloat16, packed_ok=True).name
    names = []
    for sub in model_or_module.modules():
        if isinstance(sub, QuantizedLinear) and sub.backend_for() not in names:
            names.append(sub.backend_for())
    return "+".join(names) if names else "none"
