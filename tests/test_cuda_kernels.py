"""cuda_kernels.py without a GPU, and with one.

* nvcc: the CUDA source compiles for every architecture from sm_75 to the newest the toolkit knows, warnings as
  errors, no spills, no stack frame;
* g++: the same kernel bodies run on the CPU (tests/cuda_emulation.h: threads as std::threads, warp shuffles in
  lockstep, the PTX conversions as _Float16 ones) and match independent torch references: dequantization bit for
  bit, the GEMV within the fp32-accumulation bound below (bit for bit where every sum is exact), on odd shapes,
  unaligned data, launches at the grid limit (grid-stride loops) and element indices past 2**31;
* our launch code (grid, block, arguments, stream, device, per-device cache; both launchers, with cpm_kernels and
  torch's NVRTC wrapper faked) drives that emulation; availability, probing, fallback and its single warning;
* with a GPU: the same references on the real kernels.
"""
import ctypes
import importlib
import json
import os
import mmap
import re
import shutil
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from support import REPO, load_module, load_quantization_module, reference_pack_int4, reference_unpack_int4

Q = load_quantization_module()
GK = load_module("cuda_kernels")
HALVES = (torch.float16, torch.bfloat16)
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_state():
    GK._launchers.clear()
    GK._on_device.clear()
    Q._device_kernels.pop(torch.device("cuda", 0), None)
    Q._warned.clear()
    yield
    GK._launchers.clear()
    GK._on_device.clear()
    Q._warned.clear()


def _quantized(rows, cols, bits, dtype, seed=0):
    """(q int values, stored, scale): random ints of the full range and random scales, some tiny (subnormal)."""
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1)
    q = torch.randint(-qmax, qmax, (rows, cols), generator=gen, dtype=torch.int8)
    scale = (torch.rand(rows, generator=gen) * 0.1).to(dtype)
    scale[0], scale[-1] = 0, 2.0 ** -20  # all zeros; fp16 subnormal results
    return q, (reference_pack_int4(q) if bits == 4 else q), scale


def _gemv_reference(x, q, scale):
    """The exact product (float64) and the bound on what fp32 accumulation plus one final rounding may add:
    every x * q is exact in fp32; each lane adds about k / 32 of them, the warp reduction 5 more levels, the
    scale one more rounding, the output one rounding of unit roundoff u."""
    exact = (x.double() @ q.double().T) * scale.double()
    magnitude = (x.double().abs() @ q.double().abs().T) * scale.double().abs()
    u = UNIT_ROUNDOFF[x.dtype]
    return exact, u * exact.abs() + (1 + u) * (x.shape[1] / 32 + 8) * 2.0 ** -24 * magnitude + 2.0 ** -24


# ---------------------------------------------------------------------------------------------------------------------
# nvcc: every architecture, no warnings, no spills
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_source_compiles_for_every_architecture_without_warnings_or_spills(tmp_path):
    listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    archs = sorted({int(a) for a in re.findall(r"compute_(\d+)", listed) if int(a) >= 75})
    assert archs and archs[0] == 75, listed
    (tmp_path / "kernels.cu").write_text(GK.CUDA_SOURCE)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    out = subprocess.run(["nvcc", "-fatbin", "--threads", "0", "-Werror", "all-warnings", "-Xptxas",
                          "-v,--warning-as-error,--warn-on-spills,--warn-on-local-memory-usage", *gencode,
                          "-o", str(tmp_path / "kernels.fatbin"), str(tmp_path / "kernels.cu")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    compiled = set(re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", out.stderr))
    assert compiled == {(name, str(a)) for name in GK.KERNEL_NAMES for a in archs}
    usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    assert len(usage) == len(compiled) and all(u == ("0", "0", "0") for u in usage), usage


# ---------------------------------------------------------------------------------------------------------------------
# g++: the kernels on the CPU
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    folder = tmp_path_factory.mktemp("cuda_emulation")
    source = folder / "kernels.cpp"
    source.write_text(f'#include "{REPO / "tests" / "cuda_emulation.h"}"\n{GK.CUDA_SOURCE}\n'
                      + "".join(f"EMULATE({name})\n" for name in GK.KERNEL_NAMES))
    out = subprocess.run(["g++", "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                          "-shared", "-fPIC", "-pthread", "-o", str(folder / "kernels.so"), str(source)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode and "barrier" in out.stderr and "No such file" in out.stderr:
        pytest.skip("g++ without C++20 <barrier>")
    assert out.returncode == 0, out.stderr
    lib = ctypes.CDLL(str(folder / "kernels.so"))
    for name in GK.KERNEL_NAMES:
        getattr(lib, f"launch_{name}").argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint,
                                                   ctypes.c_uint]
    return lib


def _emulate(lib, name, grid, block, pointers, first=0, count=2 ** 32 - 1):
    """Launch kernel ``name`` in the emulation; ``pointers``: the address of each argument (as cuLaunchKernel)."""
    array = (ctypes.c_void_p * len(pointers))(*pointers)
    assert getattr(lib, f"launch_{name}")(grid, block, array, first, count) == 0, "invalid launch"


class EmulatedRun:
    """A launcher (run(name, grid, block, args, device)) on the emulation; records every launch."""

    def __init__(self, lib):
        self.lib, self.launches, self.args = lib, [], []

    def __call__(self, name, grid, block, args, device):
        self.launches.append((name, grid, block, device))
        self.args.append(args)
        params = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        _emulate(self.lib, name, grid, block, [ctypes.addressof(p) for p in params])


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("rows,cols,max_grid", [(37, 50, 65535), (5, 2, 65535), (300, 64, 3), (1, 4098, 1)])
def test_dequantize_bit_exact(emulator, monkeypatch, dtype, bits, rows, cols, max_grid):
    monkeypatch.setattr(GK, "MAX_GRID", max_grid)  # max_grid < the blocks needed: the grid-stride loop
    q, stored, scale = _quantized(rows, cols, bits, dtype)
    run = EmulatedRun(emulator)
    got = GK.dequantize(run, stored, scale, bits, dtype)
    assert torch.equal(got, q.to(dtype) * scale[:, None])
    pairs = rows * cols // 2
    assert run.launches == [(f"chatglm_dequant_int{bits}_{GK.DTYPES[dtype]}",
                             min(-(-pairs // GK.THREADS), max_grid), GK.THREADS, stored.device)]


@pytest.mark.parametrize("bits", (8, 4))
def test_dequantize_indices_past_2_31(emulator, bits):
    """A weight of just over 2**31 pairs / bytes, in sparse memory: only the grid blocks whose grid-stride loops
    reach indices past 2**31 (and the first and last) run, and only the elements they touch are checked."""
    rows, per_row = 32768, 65537  # rows * per_row = 2**31 + 32768 int8 pairs / int4 bytes
    total, item = rows * per_row, 2 if bits == 8 else 1
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value
    try:  # untouched pages take no memory: this test touches about 0.5 GB
        weight_map, out_map = mmap.mmap(-1, total * item, flags=flags), mmap.mmap(-1, total * 4, flags=flags)
    except (OSError, AttributeError) as e:
        pytest.skip(f"no sparse memory map of {total * 6 >> 30} GB here: {e}")
    grid = min(-(-total // GK.THREADS), GK.MAX_GRID)
    stride = grid * GK.THREADS
    steps = 2 ** 31 // stride  # the loop step whose index first passes 2**31 for some blocks
    crossing = (2 ** 31 - steps * stride) // GK.THREADS + 1
    blocks = (0, crossing, grid - 1)
    starts = torch.cat([torch.arange(b * GK.THREADS, (b + 1) * GK.THREADS) for b in blocks])
    index = (starts[:, None] + torch.arange(0, total // stride + 1)[None, :] * stride).flatten()
    index = index[index < total]
    assert (index >= 2 ** 31).sum() > 100
    weight = torch.frombuffer(weight_map, dtype=torch.int16 if bits == 8 else torch.int8)
    out = torch.frombuffer(out_map, dtype=torch.int32)
    values = torch.randint(-2 ** 15 if bits == 8 else -128, 2 ** 15 if bits == 8 else 128, index.shape,
                           generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    weight[index] = values.to(weight.dtype)
    scale = (torch.arange(rows, dtype=torch.float32) * 2.0 ** -12 + 0.5).half()  # distinct per row
    params = [ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(scale.data_ptr()), ctypes.c_void_p(out.data_ptr()),
              ctypes.c_int(rows), ctypes.c_int(per_row)]
    name = f"chatglm_dequant_int{bits}_f16"
    for b in blocks:
        _emulate(emulator, name, grid, GK.THREADS, [ctypes.addressof(p) for p in params], first=b, count=1)
    if bits == 8:
        q = weight[index].view(torch.int8).reshape(-1, 2)  # little endian: element 2j is the low byte
    else:
        q = reference_unpack_int4(weight[index].reshape(-1, 1))
    want = (q.half() * scale[index // per_row][:, None]).view(torch.int16).to(torch.int32)
    got = out[index]
    del weight, out
    assert torch.equal(got & 0xFFFF, want[:, 0] & 0xFFFF) and torch.equal((got >> 16) & 0xFFFF, want[:, 1] & 0xFFFF)
    weight_map.close()
    out_map.close()


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("m,n,k,max_grid,offset", [
    (1, 37, 64, 65535, 0),     # aligned: 16-byte loads
    (16, 9, 80, 2, 0),         # 16 input rows, grid-stride over weight rows
    (3, 10, 50, 65535, 0),     # in % 16 != 0: the one-column path
    (5, 13, 96, 65535, 1),     # x not 16-byte aligned: the one-column path
    (7, 4, 4112, 1, 0),        # one block for all rows; 4112 columns: lanes with unequal group counts
])
def test_gemv_matches_exact_product_within_fp32_bound(emulator, monkeypatch, dtype, bits, m, n, k, max_grid, offset):
    monkeypatch.setattr(GK, "MAX_GRID", max_grid)
    q, stored, scale = _quantized(n, k, bits, dtype, seed=k)
    x = torch.randn(m * k + offset, generator=torch.Generator().manual_seed(1)).to(dtype)[offset:].reshape(m, k)
    run = EmulatedRun(emulator)
    got = GK.gemv(run, x, stored, scale, bits)
    exact, bound = _gemv_reference(x, q, scale)
    assert got.dtype == dtype and got.shape == (m, n)
    assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact).abs().max()
    assert run.launches == [(f"chatglm_gemv_int{bits}_{GK.DTYPES[dtype]}", min(-(-n // GK.GEMV_WARPS), max_grid),
                             GK.GEMV_WARPS * 32, x.device)]
    # 16-byte loads only where x rows and weight rows are 16-byte aligned (x86 would not fault on a misaligned one)
    assert run.args[0][-1] == (k // 16 if k % 16 == 0 and offset == 0 else 0)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("bits", (8, 4))
def test_gemv_rounds_once_from_fp32(emulator, dtype, bits):
    """Small integers and power-of-two scales: every fp32 sum is exact, so the result must be the exact product
    rounded once to the output dtype (rounding the dequantized weight or a partial sum first would show)."""
    gen = torch.Generator().manual_seed(2)
    qmax = 2 ** (bits - 1)
    q = torch.randint(-qmax, qmax, (24, 1024), generator=gen, dtype=torch.int8)
    stored = reference_pack_int4(q) if bits == 4 else q
    scale = (2.0 ** -torch.randint(8, 13, (24,), generator=gen)).to(dtype)
    x = torch.randint(-64, 65, (6, 1024), generator=gen).to(dtype)
    got = GK.gemv(EmulatedRun(emulator), x, stored, scale, bits)
    exact = (x.double() @ q.double().T) * scale.double()
    assert torch.equal(got, exact.to(dtype))
    halves = [(x[:, i:i + 512].double() @ q[:, i:i + 512].double().T * scale.double()).to(dtype) for i in (0, 512)]
    assert not torch.equal(got, (halves[0].double() + halves[1].double()).to(dtype))  # the check can see a 2nd rounding


# ---------------------------------------------------------------------------------------------------------------------
# Our launch code on the emulation: both launchers with their libraries faked
# ---------------------------------------------------------------------------------------------------------------------
class FakeCuda:
    """torch.cuda's device context, streams and capabilities for devices that do not exist."""

    def __init__(self, monkeypatch, capabilities=((8, 0), (9, 0))):
        self.current, self.capabilities = None, capabilities
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(
            cuda_stream=1000 + torch.device(device).index, device=torch.device(device)))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capabilities[torch.device(d).index])

    @contextmanager
    def device(self, device):
        before, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = before


def _fake_cpm_kernels(monkeypatch, lib, cuda):
    """cpm_kernels' NVRTC binding and kernel classes, recording what they are given; launches go to ``lib``."""
    log = types.SimpleNamespace(compiles=[], launches=[])

    class Nvrtc:
        version = (12, 4)
        nvrtcProgram = ctypes.c_void_p

        @staticmethod
        def nvrtcCreateProgram(prog, source, name, n_headers, headers, include_names):
            assert source == GK.CUDA_SOURCE and n_headers == 0

        @staticmethod
        def nvrtcCompileProgram(prog, n_options, options):
            assert n_options == len(options)
            log.compiles.append((cuda.current, tuple(options)))

        nvrtcGetCUBINSize = staticmethod(lambda prog: 8)
        nvrtcGetCUBIN = staticmethod(lambda prog, buf: ctypes.memmove(buf, b"cubin!!!", 8))
        nvrtcDestroyProgram = staticmethod(lambda prog: None)

    class KernelFunction:
        def __init__(self, module, name):
            assert module.code == b"cubin!!!"
            self.name = name

        def __call__(self, grid, block, shared, stream, params):
            log.launches.append((self.name, cuda.current, stream.value))
            assert grid[1:] == block[1:] == (1, 1) and shared == 0
            _emulate(lib, self.name, grid[0], block[0], [ctypes.addressof(p) for p in params])

    base = types.SimpleNamespace(LazyKernelCModule=lambda code: types.SimpleNamespace(code=code),
                                 KernelFunction=KernelFunction)
    cpm = types.ModuleType("cpm_kernels")
    cpm.library = types.SimpleNamespace(nvrtc=Nvrtc)
    monkeypatch.setitem(sys.modules, "cpm_kernels", cpm)
    monkeypatch.setitem(sys.modules, "cpm_kernels.kernels.base", base)
    return log


def _fake_torch_compile_kernel(monkeypatch, lib, cuda):
    """torch.cuda._compile_kernel: arguments as torch passes them (tensor -> pointer, int -> C int)."""
    log = types.SimpleNamespace(compiles=[], launches=[])

    def compile_kernel(source, name):
        assert source == GK.CUDA_SOURCE
        log.compiles.append((cuda.current, name))

        def launch(grid, block, args, stream):
            log.launches.append((name, cuda.current, stream.cuda_stream))
            assert grid[1:] == block[1:] == (1, 1) and stream.device == cuda.current
            params = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
            _emulate(lib, name, grid[0], block[0], [ctypes.addressof(p) for p in params])
        return launch

    monkeypatch.setattr(torch.cuda, "_compile_kernel", compile_kernel, raising=False)
    return log


@pytest.mark.parametrize("backend", Q.CUDA_BACKENDS)
def test_launchers_compile_per_device_and_launch_on_its_stream(emulator, monkeypatch, backend):
    cuda = FakeCuda(monkeypatch)
    fake = _fake_cpm_kernels if backend == "cuda-cpm_kernels" else _fake_torch_compile_kernel
    log = fake(monkeypatch, emulator, cuda)
    run = GK._LAUNCHER_CLASSES[backend]()
    q, stored, scale = _quantized(9, 48, 8, torch.float16)
    x = torch.randn(2, 48).half()
    for index in (1, 0, 1):
        device = torch.device("cuda", index)
        out = torch.empty(2, 9, dtype=torch.float16)
        run("chatglm_gemv_int8_f16", 3, 128, (x, stored, scale, out, 2, 9, 48, 3), device)
        exact, bound = _gemv_reference(x, q, scale)
        assert ((out.double() - exact).abs() <= bound).all()
    devices = [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1)]
    assert [(d, s) for _, d, s in log.launches] == [(d, 1000 + d.index) for d in devices]
    if backend == "cuda-cpm_kernels":  # one compilation per device, for its architecture
        assert log.compiles == [(devices[0], ("--gpu-architecture=sm_90", "--std=c++14")),
                                (devices[1], ("--gpu-architecture=sm_80", "--std=c++14"))]
    else:
        assert log.compiles == [(devices[0], "chatglm_gemv_int8_f16"), (devices[1], "chatglm_gemv_int8_f16")]


@pytest.mark.parametrize("backend", Q.CUDA_BACKENDS)
def test_probe_passes_on_right_kernels_and_fails_on_wrong_ones(emulator, monkeypatch, backend):
    cuda = FakeCuda(monkeypatch)
    (_fake_cpm_kernels if backend == "cuda-cpm_kernels" else _fake_torch_compile_kernel)(monkeypatch, emulator, cuda)
    run = GK._LAUNCHER_CLASSES[backend]()
    # the probe's tensors are on the CPU (the emulation's memory); the launcher is told they are on cuda:0
    GK._probe(lambda name, grid, block, args, device: run(name, grid, block, args, torch.device("cuda", 0)), "cpu")
    swapped = {"f16": "bf16", "bf16": "f16"}
    with pytest.raises(RuntimeError):  # the bf16 kernels where fp16 ones were asked for
        GK._probe(lambda name, grid, block, args, device: run(
            name.rsplit("_", 1)[0] + "_" + swapped[name.rsplit("_", 1)[1]], grid, block, args,
            torch.device("cuda", 0)), "cpu")


def _no_proc(*args, **kwargs):
    raise OSError("no /proc here")


def test_import_of_cpm_kernels_points_it_at_torchs_cuda_libraries(monkeypatch, tmp_path):
    wheels = tmp_path / "site" / "nvidia"
    for lib in ("cuda_nvrtc/lib/libnvrtc.so.12", "cuda_nvrtc/lib/libnvrtc-builtins.so.12.8",
                "cuda_runtime/lib/libcudart.so.12", "cu13/lib/libcudart.so.13", "cublas/lib/libcublasLt.so.12"):
        (wheels / lib).parent.mkdir(parents=True, exist_ok=True)
        (wheels / lib).write_bytes(b"")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        submodule_search_locations=[str(wheels)]) if name == "nvidia" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(GK, "open", _no_proc, raising=False)  # nothing loaded in this process: the wheels only
    assert GK._cuda_libraries() == {"nvrtc": str(wheels / "cuda_nvrtc/lib/libnvrtc.so.12"),
                                    "cudart": str(wheels / "cuda_runtime/lib/libcudart.so.12"),
                                    "cublasLt": str(wheels / "cublas/lib/libcublasLt.so.12")}
    fake = tmp_path / "pkgs" / "cpm_kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os, types\nseen = os.environ.get('CUDA_PATH')\n"
        "found = seen is not None and os.path.exists(os.path.join(seen, 'lib64', 'libnvrtc.so'))\n"
        "library = types.SimpleNamespace(nvrtc=types.SimpleNamespace(version=(12, 8) if found else (0, 0)))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delitem(sys.modules, "cpm_kernels", raising=False)
    cpm = GK._import_cpm_kernels()
    lib64 = f"{cpm.seen}/lib64"
    assert "CUDA_PATH" not in GK.os.environ  # set for the import only
    assert {p: (Path(lib64) / p).resolve() for p in ("libnvrtc.so", "libcudart.so", "libcublasLt.so",
                                                    "libnvrtc-builtins.so.12.8")} == {
        "libnvrtc.so": wheels / "cuda_nvrtc/lib/libnvrtc.so.12", "libcudart.so": wheels / "cuda_runtime/lib/libcudart.so.12",
        "libcublasLt.so": wheels / "cublas/lib/libcublasLt.so.12",
        "libnvrtc-builtins.so.12.8": wheels / "cuda_nvrtc/lib/libnvrtc-builtins.so.12.8"}
    monkeypatch.delitem(sys.modules, "cpm_kernels")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "toolkit"))  # the user's own toolkit: left as it is
    with pytest.raises(RuntimeError):  # ... where it has no libnvrtc, cpm_kernels imports but cannot compile
        GK._import_cpm_kernels()
    assert sys.modules["cpm_kernels"].seen == str(tmp_path / "toolkit")


# ---------------------------------------------------------------------------------------------------------------------
# Availability: decided per device by a probe, once; one warning naming the reason and what runs instead
# ---------------------------------------------------------------------------------------------------------------------
def test_launchers_are_none_without_cuda_and_say_why():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    for name in Q.CUDA_BACKENDS:
        assert GK.launcher(name, "cuda") is None  # no exception
        assert GK.why_not(name, "cuda")


def _pretend_gpus(monkeypatch, factories, broken_devices=()):
    """CUDA 'available' with launchers made by ``factories``; the probe fails on ``broken_devices``."""
    probes = []

    def probe(run, device):
        probes.append((run.name, device))
        if device.index in broken_devices:
            raise RuntimeError(f"probe failed on {device}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(GK, "_probe", probe)
    monkeypatch.setattr(GK, "_LAUNCHER_CLASSES", factories)
    return probes


def test_availability_is_probed_once_per_device_and_failures_stay_on_their_device(monkeypatch):
    made = []

    def working():
        made.append("nvrtc")
        return types.SimpleNamespace(name="cuda-nvrtc")

    def missing():
        made.append("cpm")
        raise ImportError("cpm_kernels is not installed")
    probes = _pretend_gpus(monkeypatch, {"cuda-cpm_kernels": missing, "cuda-nvrtc": working}, broken_devices=(1,))
    for _ in range(2):
        assert GK.launcher("cuda-nvrtc", "cuda:0").name == "cuda-nvrtc"
        assert GK.launcher("cuda-nvrtc", "cuda:1") is None
        assert GK.launcher("cuda-cpm_kernels", "cuda:0") is None and GK.launcher("cuda-cpm_kernels", "cuda:1") is None
    assert GK.launcher("cuda-nvrtc", "cuda") is not None  # no index: the current device (0)
    assert made == ["nvrtc", "cpm"]  # each launcher made once, whatever the device count
    assert probes == [("cuda-nvrtc", torch.device("cuda", 0)), ("cuda-nvrtc", torch.device("cuda", 1))]
    assert "probe failed on cuda:1" in GK.why_not("cuda-nvrtc", "cuda:1")
    assert GK.why_not("cuda-nvrtc", "cuda:0") is None
    assert "ImportError" in GK.why_not("cuda-cpm_kernels", "cuda:1")
    GK.disable("cuda-nvrtc", "cuda:0", "a launch failed")
    assert GK.launcher("cuda-nvrtc", "cuda:0") is None and GK.why_not("cuda-nvrtc", "cuda:0") == "a launch failed"


def _recorded_warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(Q.logger, "warning", lambda msg, *args: seen.append(msg % args))
    return seen


@pytest.mark.parametrize("working,fallback", [(("cuda-nvrtc",), "cuda-nvrtc"), ((), "torch-dequant")])
def test_fallback_gives_one_warning_with_the_reason_and_what_runs(monkeypatch, working, fallback):
    def factory(name):
        def make():
            if name not in working:
                raise ImportError(f"no {name} here")
            return types.SimpleNamespace(name=name)
        return make
    _pretend_gpus(monkeypatch, {n: factory(n) for n in Q.CUDA_BACKENDS})
    Q._device_kernels.pop(torch.device("cuda", 0), None)
    warned = _recorded_warnings(monkeypatch)
    layer = Q.QuantizedLinear(64, 32, 8, dtype=torch.float16, device="meta")
    for _ in range(3):
        assert Q._choose(layer, torch.device("cuda", 0), torch.float16, packed_ok=False).name == fallback
    assert len(warned) == 1, warned
    assert "cuda-cpm_kernels" in warned[0] and "no cuda-cpm_kernels here" in warned[0] and warned[0].endswith(
        f"using {fallback}.")
    Q._device_kernels.pop(torch.device("cuda", 0), None)


def test_cuda_matmul_uses_the_gemv_for_few_rows_and_dequantize_for_more(emulator, monkeypatch):
    run = EmulatedRun(emulator)
    monkeypatch.setattr(GK, "launcher", lambda name, device: run)
    kernel = Q._CudaDequant("cuda-nvrtc", GK, torch.device("cuda", 0))
    q, stored, scale = _quantized(40, 96, 4, torch.bfloat16)
    for rows, op in ((1, "gemv"), (16, "gemv"), (17, "dequant")):
        run.launches.clear()
        x = torch.randn(rows, 96).bfloat16()
        got = kernel.matmul(x, stored, scale, 4, 40, 96)
        assert [launch[0] for launch in run.launches] == [f"chatglm_{op}_int4_bf16"]
        if op == "gemv":
            exact, bound = _gemv_reference(x, q, scale)
            assert ((got.double() - exact).abs() <= bound).all()
        else:
            assert torch.equal(got, F.linear(x, q.bfloat16() * scale[:, None]))


def test_a_failed_launch_disables_the_backend_on_that_device_only(monkeypatch):
    def failing(*args):
        raise RuntimeError("launch failed")
    state = {("cuda-nvrtc", 0): failing, ("cuda-nvrtc", 1): failing}
    monkeypatch.setattr(GK, "_on_device", state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    warned = _recorded_warnings(monkeypatch)
    kernel = Q._CudaDequant("cuda-nvrtc", GK, torch.device("cuda", 0))
    q, stored, scale = _quantized(8, 32, 8, torch.float16)
    x = torch.randn(2, 32).half()
    epoch = Q._choice_epoch
    for _ in range(2):  # the torch-dequant result, one warning
        assert torch.equal(kernel.matmul(x, stored, scale, 8, 8, 32), F.linear(x, q.half() * scale[:, None]))
    assert len(warned) == 1 and "cuda-nvrtc" in warned[0] and "cuda:0" in warned[0]
    assert isinstance(state[("cuda-nvrtc", 0)], str) and state[("cuda-nvrtc", 1)] is failing
    assert Q._choice_epoch == epoch + 1  # the layers bound to it choose again


# ---------------------------------------------------------------------------------------------------------------------
# With a GPU: the real kernels against the same references
# ---------------------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("backend", Q.CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("bits", (8, 4))
def test_gpu_kernels_match_the_references(backend, dtype, bits):
    run = GK.launcher(backend, "cuda")
    if run is None:
        pytest.skip(f"{backend} unavailable here: {GK.why_not(backend, 'cuda')}")
    q, stored, scale = _quantized(4608 // 8, 1024, bits, dtype)
    stored, scale = stored.cuda(), scale.cuda()
    assert torch.equal(GK.dequantize(run, stored, scale, bits, dtype).cpu(), q.to(dtype) * scale.cpu()[:, None])
    for m, k in ((1, 1024), (16, 1024), (5, 1000)):
        x = torch.randn(m, k, dtype=dtype)
        got = GK.gemv(run, x.cuda(), stored[:, : k * bits // 8].contiguous(), scale, bits).cpu()
        exact, bound = _gemv_reference(x, q[:, :k], scale.cpu())
        assert ((got.double() - exact).abs() <= bound).all()


@needs_cuda
@pytest.mark.parametrize("bits", (8, 4))
def test_gpu_layer_matches_torch_dequant(bits):
    lin = torch.nn.Linear(96, 192).half()
    layer = Q.QuantizedLinear.from_linear(lin, bits).cuda()
    for shape in ((1, 1, 96), (2, 7, 96), (3, 9, 96)):  # GEMV (1 and 14 rows) and dequantize (27 rows)
        x = torch.randn(*shape, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            Q.set_quantization_backend(None)
            auto = layer(x)
            Q.set_quantization_backend("torch-dequant")
            plain = layer(x)
        Q.set_quantization_backend(None)
        assert layer.backend_for() in Q.CUDA_BACKENDS
        torch.testing.assert_close(auto, plain, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh, as CI can run it: --dry-run on the CPU with a tiny model
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_script_dry_run_records_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    steps = {e["step"]: e for e in map(json.loads, (tmp_path / "gpu_results.json").read_text().splitlines())}
    assert list(steps) == ["facts", "cpm", "backends", "tests", "linears", "bench_b1", "bench_b8"]
    assert all(e["rc"] == 0 and not e["timed_out"] for e in steps.values()), {k: e["log_tail"] for k, e in steps.items()}
    assert steps["facts"]["result"]["torch"] == torch.__version__
    assert set(steps["backends"]["result"]) >= {"auto", *Q.CUDA_BACKENDS, "int8 torch.float16", "int4 torch.bfloat16"}
    assert len(steps["linears"]["result"]) == 2 * 2 * 4  # dtypes x row counts x linears
    for name, batch in (("bench_b1", 1), ("bench_b8", 8)):
        rows = steps[name]["result"]["rows"]
        native = {"native"} if hasattr(transformers, "GlmForCausalLM") else set()  # transformers >= 4.46
        assert {r["model"] for r in rows} == {"ours", "ours-int8", "ours-int4"} | native
        assert all(r["batch"] == batch and r["decode_ms_tok"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_MB"] > 0
                   for r in rows)
