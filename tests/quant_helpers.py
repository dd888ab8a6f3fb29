"""Reference implementation of the published quantized storage format, written from the format description
(not from quantization.py), to check quantization.py against bit for bit."""
import importlib
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


PACKAGE = "chatglm_remote_code_under_test"
# The same for a child process: `python -c CHILD_IMPORT+code REPO` runs code with `m` = quantization.py.
CHILD_IMPORT = ("import sys, types, importlib; pkg = types.ModuleType('rc'); pkg.__path__ = [sys.argv[1]]; "
                "sys.modules['rc'] = pkg; m = importlib.import_module('rc.quantization'); ")


def load_module(name="quantization"):
    """A remote-code file (quantization.py, cpu_kernels.py, ...) imported from the repository as a member of a
    package, so that its relative imports work as they do in transformers' module cache."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(REPO)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


def load_quantization_module():
    return load_module("quantization")


def quantization_module_of(model):
    """The quantization module that a remote-code model actually uses."""
    return sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".quantization"]


def reference_quantize(weight, bits):
    """-> (q int values as int8 [out, in], stored int8, scale). Arithmetic in the weight dtype."""
    qmax = 127 if bits == 8 else 7
    scale = weight.abs().max(dim=1).values / qmax
    safe = scale.clone()
    safe[safe == 0] = 1
    # Saturate: in bf16, max|w| / scale can round up to 128 (bf16 spacing is 1 there), which a plain .to(int8)
    # (the original's code) would wrap to -128, flipping the sign of the row's largest weight.
    q = torch.round(weight / safe[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    if bits == 8:
        return q, q.clone(), scale
    return q, reference_pack_int4(q), scale


def reference_pack_int4(q):
    """byte = (q[2j] << 4) | (q[2j+1] & 0xF), as a signed byte."""
    out, cols = q.shape
    ints = q.to(torch.int32)
    high = ints[:, 0::2] << 4
    low = ints[:, 1::2] & 0xF
    byte = (high | low) & 0xFF
    return byte.to(torch.uint8).view(torch.int8)


def reference_unpack_int4(stored):
    u = stored.view(torch.uint8).to(torch.int32)
    high = u >> 4
    low = u & 0xF
    high = torch.where(high >= 8, high - 16, high)
    low = torch.where(low >= 8, low - 16, low)
    return torch.stack((high, low), -1).reshape(stored.shape[0], -1).to(torch.int8)


def block_linears(model):
    """{name: module} of the four linears of every block."""
    return {n: m for n, m in model.named_modules() if n.endswith(BLOCK_LINEARS)}
