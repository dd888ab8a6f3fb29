"""Linear layers and their inference layouts: one explicit conversion for every layer kind.

A layer that can hold its weight in a faster inference layout derives from :class:`InferenceLayout`: ``pack()``
converts it (or binds a kernel), ``unpack()`` undoes it, and every way out -- ``train()``, ``.to()`` and the other
moves, ``state_dict()`` / saving, ``load_state_dict`` -- unpacks first, so what leaves the layer is always the
dense (or, for ``quantization.QuantizedLinear``, the published stored) weight. :func:`pack_model` /
:func:`unpack_model` do it for a whole model (``model.pack_weights()``, which ``generate`` calls). Nothing packs
implicitly: a forward never changes a layer's layout.

:class:`Linear` is the block / output linear of an unquantized model: ``nn.Linear`` plus the bf16 CPU layouts.
"""
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

PACK_LOCK = threading.RLock()  # layout changes (stream_chat generates in a worker thread)


def cpu_layouts_enabled():
    """``CHATGLM_CPU_PREPACK=0`` turns the bf16 CPU layouts off."""
    return os.environ.get("CHATGLM_CPU_PREPACK", "1").lower() not in ("0", "false", "no", "off")


_CPU_PREPACK = None
_CPU_KERNELS = {}  # "gemv" / "attention" -> (takes, run) from cpu_kernels, or False where its library does not build


def cpu_prepack_enabled():
    """oneDNN's prepacked bf16 linear: CPU builds of torch >= 2.0 with mkldnn, on a CPU with bf16 support."""
    global _CPU_PREPACK
    if _CPU_PREPACK is None:
        mkldnn = torch.ops.mkldnn
        try:
            _CPU_PREPACK = bool(torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
                                and hasattr(mkldnn, "_reorder_linear_weight") and mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - builds without these ops
            _CPU_PREPACK = False
    return _CPU_PREPACK


def cpu_kernel(kind):
    """This package's CPU decode kernel ``kind`` as ``(takes, run)`` from ``cpu_kernels``: ``"gemv"`` (bf16 linear,
    ``linear_bf16``) or ``"attention"`` (one new token against the cache, ``decode_attention``; only on CPUs where it
    beats SDPA, ``cpu_kernels.CPU_TUNING``), or ``"steps"`` (the module, for its ``rms_norm`` / ``rotary_`` /
    ``silu_mul``), where its C library builds on this machine (x86-64 with AVX-512; ``CHATGLM_CPU_KERNELS=0`` turns it
    off), else None. Tried once per process."""
    if kind not in _CPU_KERNELS:
        from . import cpu_kernels as ck

        lib = ck.load()
        _CPU_KERNELS.setdefault("gemv", lib is not None and (ck.linear_bf16_takes, ck.linear_bf16))
        _CPU_KERNELS.setdefault("attention", lib is not None and lib.attention
                                and (ck.decode_attention_takes, ck.decode_attention))
        _CPU_KERNELS.setdefault("steps", lib is not None and ck)
    return _CPU_KERNELS[kind] or None


class InferenceLayout:
    """Mixin for an ``nn.Module`` with an inference layout: subclasses define ``is_packed``, ``pack()`` and
    ``unpack()`` (both idempotent); every way out of the layer unpacks first."""

    def train(self, mode=True):
        if mode:
            self.unpack()
        return super().train(mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.unpack()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.unpack()  # a packed layout means nothing on another device or for another dtype
        return super()._apply(fn, *args, **kwargs)


def pack_model(model):
    """Pack every :class:`InferenceLayout` layer of ``model``. A dense :class:`Linear` that an adapter wraps (PEFT's
    ``base_layer``) stays dense, since adapters merge into it; under ``torch.compile`` (a compiled ``forward``) the
    compiler lays the dense weights out itself."""
    with PACK_LOCK:
        compiled = getattr(model.forward, "_torchdynamo_orig_callable", None) is not None
        wrapped = {id(m.base_layer) for m in model.modules() if isinstance(getattr(m, "base_layer", None), Linear)}
        for module in model.modules():
            if isinstance(module, Linear) and (compiled or id(module) in wrapped):
                continue
            if isinstance(module, InferenceLayout):
                module.pack()
    return model


def unpack_model(model):
    """Every layer of ``model`` back to its dense / stored weight."""
    with PACK_LOCK:
        for module in model.modules():
            if isinstance(module, InferenceLayout):
                module.unpack()
    return model


class PackedWeight(nn.Parameter):
    """A weight held in a kernel's inference layout (oneDNN's blocked bf16, a quantized kernel's), standing in for a
    module's ``weight`` Parameter between ``pack()`` and ``unpack()``: same shape, dtype and number of elements, so
    ``parameters()``, ``num_parameters()`` and ``get_memory_footprint()`` do not change with the layout.
    ``unpacked()`` gives the weight it stands for. ``original`` is the module's own Parameter object, emptied while
    packed (one resident copy). Copies and pickles stay packed; oneDNN's opaque tensors copy as the dense weight."""

    def unpacked(self) -> torch.Tensor:
        with torch.no_grad():
            return self.unpack_fn(self)

    def __deepcopy__(self, memo):
        if self.layout != torch.strided:
            copy = nn.Parameter(self.unpacked(), requires_grad=self.original.requires_grad)
        else:
            copy = _packed_weight(self.data.clone(), self.unpack_fn, self.original.__deepcopy__(memo))
        memo[id(self)] = copy
        return copy

    def __reduce_ex__(self, protocol):
        if self.layout != torch.strided:
            return nn.Parameter(self.unpacked(), requires_grad=self.original.requires_grad).__reduce_ex__(protocol)
        return _packed_weight, (self.data, self.unpack_fn, self.original)


def _packed_weight(data, unpack_fn, original):
    packed = PackedWeight(data, requires_grad=False)
    packed.unpack_fn, packed.original = unpack_fn, original
    return packed


def pack_weight(module, pack_fn, unpack_fn):
    """Put ``pack_fn(weight)`` (its values in a kernel's layout, as many bytes) in place of ``module.weight``, as a
    :class:`PackedWeight`; ``unpack_fn(packed)`` must give the weight back. Call under ``PACK_LOCK``."""
    weight = module._parameters["weight"]
    with torch.inference_mode(False), torch.no_grad():
        data = pack_fn(weight.detach())
        if data.layout == torch.strided:  # (oneDNN's opaque tensors already have the weight's shape and dtype)
            data = data.view(weight.dtype).view(weight.shape)
        packed = _packed_weight(data, unpack_fn, weight)
        weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    module._parameters["weight"] = packed
    return packed


def unpack_weight(module):
    """Undo :func:`pack_weight`: the original Parameter object, refilled, is ``module.weight`` again (no-op when
    the weight is not packed)."""
    packed = module._parameters.get("weight")
    if type(packed) is PackedWeight:
        with torch.inference_mode(False), torch.no_grad():
            packed.original.data = packed.unpacked()
        module._parameters["weight"] = packed.original


class Linear(InferenceLayout, nn.Linear):
    """``nn.Linear`` with the bf16 CPU inference layouts.

    oneDNN's GEMV on a plain ``[out, in]`` bf16 weight re-blocks (copies) the whole weight at every matmul, so a
    decode step (one row, memory bound) reads the weights about twice. :meth:`pack` fixes that in one of two ways:

    - where this package's CPU kernels build (x86-64 with AVX-512), it binds their bf16 GEMV
      (``cpu_kernels.linear_bf16``) for inputs of up to 4 rows; the weight stays exactly as it is;
    - else it replaces ``weight`` by a :class:`PackedWeight` holding the same values in oneDNN's layout
      (:func:`pack_weight`); :meth:`unpack` puts the original Parameter object back with the dense values.

    A forward that needs autograd or another dtype unpacks too.
    """

    prepack = True  # False for a layer whose weight may be shared (tied) with another module
    gemv = None  # the bound bf16 decode kernel (cpu_kernel("gemv")), or None

    @property
    def is_packed(self):
        return self.gemv is not None or isinstance(self._parameters.get("weight"), PackedWeight)

    def pack(self):
        """Bind the bf16 CPU decode kernel, or move to oneDNN's layout, when the layer is bf16 on CPU (no-op
        otherwise, or when already packed)."""
        weight = self._parameters["weight"]
        if (self.is_packed or not self.prepack or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
                or weight.dim() != 2 or not cpu_layouts_enabled()):
            return self
        with PACK_LOCK:
            if weight.is_contiguous() and cpu_kernel("gemv") is not None:
                self.gemv = cpu_kernel("gemv")
            elif cpu_prepack_enabled():
                pack_weight(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1), torch.Tensor.to_dense)
        return self

    def unpack(self):
        """Back to the dense weight in the original Parameter object, no kernel bound (no-op when not packed)."""
        with PACK_LOCK:
            self.gemv = None
            unpack_weight(self)
        return self

    def forward(self, x):
        gemv, weight, bias = self.gemv, self._parameters["weight"], self._parameters["bias"]
        if gemv is not None:  # (the weight may have been assigned since pack)
            if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.dtype != torch.bfloat16
                    or weight.device.type != "cpu" or torch.is_grad_enabled()):
                self.unpack()  # autograd or another dtype: no binding
            elif gemv[0](x, weight, bias):  # linear_bf16_takes; else F.linear on the same weight
                out = gemv[1](x.reshape(-1, x.shape[-1]), weight, bias)
                return out.view(*x.shape[:-1], out.shape[-1])
        elif type(weight) is PackedWeight:
            if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
                out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
                return out.view(*x.shape[:-1], out.shape[-1])
            self.unpack()  # autograd or another dtype needs the dense weight
            weight = self._parameters["weight"]
        return F.linear(x, weight, bias)
