"""cpu_kernels.py, this package's AVX-512 C kernels (compiled at run time for the host CPU into the hub cache):
the codes layout against its description, accuracy against the dequantized weight, bit-exact dequantization,
threads, the layout's life cycle, the model through them, and the ways a build can fail and fall back."""
import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from support import (CHILD_IMPORT, REPO, block_linears, dequantized_float_model, load_model, load_module,
                     left_padded_batch, load_quantization_module, make_model_dir, quant_layer,
                     quantization_module_of, quiet_load, random_ids, reference_pack_int4, rel_err)

Q = load_quantization_module()
CK = load_module("cpu_kernels")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_BACKEND_FOR_BITS = {8: "cpu-int8pack", 4: "cpu-int4pack"}
pytestmark = pytest.mark.usefixtures("automatic_quantization_backend")


def _host_can_build_cpu_kernels():
    import platform

    flags = CK.cpu_signature()
    return (platform.machine().lower() in ("x86_64", "amd64") and all(f in flags.split() for f in CK.REQUIRED_FLAGS)
            and bool(CK.find_compiler()) and os.environ.get("CHATGLM_CPU_KERNELS", "1") != "0")


needs_cpu_kernels = pytest.mark.skipif(not _host_can_build_cpu_kernels(),
                                       reason="needs x86-64 with AVX-512 F/BW/VNNI and a C compiler")
KERNEL_OUT, KERNEL_IN = 80, 384  # 10 row blocks of 3 chunks (and shapes torch's int4 kernel takes too)


def test_cpu_kernels_are_used_where_the_host_can_build_them():
    """On a machine like CI's (AVX-512 and gcc), the kernels must build, pass their self-check and be the automatic
    CPU choice: a silent fallback would hide a broken kernel behind torch's slower one."""
    if not _host_can_build_cpu_kernels():
        pytest.skip("this host cannot build the AVX-512 kernels")
    assert CK.load() is not None
    if not torch.cuda.is_available():
        assert Q.quantization_backend() == "cpu-avx512"


@pytest.mark.parametrize("group_rows", (1, 4))
@pytest.mark.parametrize("bits", (8, 4))
def test_codes_layout_matches_its_description(bits, group_rows):
    """The layout as CPU_SOURCE's comment describes it, checked line by line from the int values (row-major codes on
    Intel, groups of 4 interleaved rows on AMD)."""
    n, k = 24, 256
    gen = torch.Generator().manual_seed(bits)
    qmax = 127 if bits == 8 else 7
    q = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    stored = q.clone() if bits == 8 else reference_pack_int4(q)
    packed = CK.pack_codes(stored, bits, group_rows)
    assert packed.numel() == stored.numel() and packed.dtype == torch.int8
    # [N/G][K/128][G rows][128 columns of one row: 128 bytes (int8) or 64 (int4)], unsigned codes u = q + offset
    g = group_rows
    chunks = packed.view(torch.uint8).reshape(n // g, k // 128, g, 128 * bits // 8).to(torch.int16)
    codes = q.to(torch.int16) + (128 if bits == 8 else 8)
    for r in range(n):
        for t in range(k // 128):
            line, row = chunks[r // g, t, r % g], codes[r, t * 128:(t + 1) * 128]
            if bits == 8:
                assert torch.equal(line, row)
            else:  # byte j: column j in the low nibble, column 64 + j in the high nibble
                assert torch.equal(line & 0xF, row[:64]) and torch.equal(line >> 4, row[64:])
    assert torch.equal(CK.unpack_codes(packed, bits, n, k, group_rows), stored)
    old = Q.PACK_CHUNK_ROWS
    try:
        Q.PACK_CHUNK_ROWS = 8  # chunked packing equals packing in one go
        assert torch.equal(CK.pack_codes(stored, bits, group_rows), packed)
    finally:
        Q.PACK_CHUNK_ROWS = old


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_cpu_kernel_layer_matches_dequantized_linear(dtype, bits):
    lin, layer = quant_layer(bits, dtype, out=KERNEL_OUT, inp=KERNEL_IN)
    assert layer.pack().backend_for() == "cpu-avx512"
    deq = Q.dequantize_weight(layer.stored_weight(), layer.weight_scale, bits)
    gen = torch.Generator().manual_seed(7)
    # 1 row (decode), 2-4 rows (one weight load for several rows), remainders, the 16-row limit, then the
    # dequantize + GEMM path
    for rows in (1, 2, 3, 4, 5, 7, 16, 17, 64):
        x = torch.randn(rows, KERNEL_IN, generator=gen).to(dtype)
        with torch.no_grad():
            out = layer(x)
        assert layer.backend == "cpu-avx512" and out.dtype == dtype and out.shape == (rows, KERNEL_OUT)
        reference = F.linear(x.float(), deq.float(), lin.bias.float())
        # exact integer dot products of the inputs in 16-bit (fp32: 24-bit) fixed point per 128 columns (CK.GROUP), fp32
        # accumulation: the error is the output rounding (bf16 2^-9, fp16 2^-12 relative)
        tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        assert rel_err(out, reference) < tol, (rows, rel_err(out, reference))


@needs_cpu_kernels
@pytest.mark.parametrize("bits", (8, 4))
def test_cpu_kernel_decode_keeps_small_inputs_beside_an_outlier_and_propagates_non_finite(bits):
    """The decode kernel writes each input row as fixed point scaled per CK.GROUP (128) columns: an outlier column (as real
    hidden states have) must not wipe out the small values sharing its group, and NaN / inf must not vanish."""
    lin, layer = quant_layer(bits, torch.float32, out=KERNEL_OUT, inp=KERNEL_IN)
    layer.pack()
    deq = Q.dequantize_weight(layer.stored_weight(), layer.weight_scale, bits)
    x = torch.randn(2, KERNEL_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e-3
    x[:, 5] = 300.0  # 3e5 times the others
    reference = (x @ deq.double().t() + lin.bias.double())
    small = x.clone()
    small[:, 5] = 0  # what the small values alone contribute must survive: compare their part exactly
    with torch.no_grad():
        got = layer(x.float()).double()
        assert rel_err(got - layer(torch.zeros_like(x).float()).double(), reference - lin.bias.double()) < 1e-5
        part = got - (x[:, 5:6] @ deq.double()[:, 5:6].t()) - lin.bias.double()
        expected_part = small @ deq.double().t()
        # fp32 inputs become 24-bit fixed point per CK.GROUP columns: in the outlier's group each value may be off by
        # half a step of 300 / 2^23 (bounded here with 2x slack), plus fp32 rounding of the large output
        step = 300.0 / 2 ** 22
        bound = 0.5 * step * deq.double()[:, :CK.GROUP].abs().sum(1) + 16 * 2.0 ** -24 * got.abs() + 1e-7
        assert ((part - expected_part).abs() <= bound).all()
        assert bound.max() < 0.1 * expected_part.abs().max()  # so the small values' part really survives
        for bad in (float("nan"), float("inf")):
            y = torch.randn(1, KERNEL_IN)
            y[0, 7] = bad
            assert not torch.isfinite(layer(y)).any()


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_cpu_kernel_dequantize_is_bit_exact(dtype, bits):
    _, layer = quant_layer(bits, dtype, out=KERNEL_OUT, inp=KERNEL_IN)
    stored = layer.weight.detach().clone()
    expected = Q.dequantize_weight(stored, layer.weight_scale, bits)
    x = torch.randn(40, KERNEL_IN).to(dtype)  # > 16 rows: dequantize + F.linear
    with torch.no_grad():
        out = layer.pack()(x)
        assert layer.backend == "cpu-avx512" and layer.is_packed
        dense = torch.empty(KERNEL_OUT, KERNEL_IN, dtype=dtype)
        scale = layer.scale_table
        assert scale.dtype == torch.float32
        CK.load().chatglm_cpu_dequantize(layer.weight.data_ptr(), bits, scale.data_ptr(), dense.data_ptr(),
                                         CK.IO_TYPE[dtype], KERNEL_OUT, KERNEL_IN, 1)
        assert torch.equal(dense, expected)
        assert torch.equal(out, F.linear(x, expected) + layer.bias)


@needs_cpu_kernels
def test_packing_and_running_from_several_threads():
    import threading

    layers = [quant_layer(bits, torch.bfloat16, out=KERNEL_OUT, inp=KERNEL_IN, seed=s)[1] for s, bits in ((0, 8), (1, 4))]
    x = torch.randn(1, KERNEL_IN, dtype=torch.bfloat16)
    expected = [F.linear(x.float(), Q.dequantize_weight(l.weight, l.weight_scale, l.weight_bit_width).float(),
                         l.bias.float()) for l in layers]
    results, errors = [], []

    def work():
        try:
            with torch.no_grad():
                results.append([l.pack()(x) for l in layers])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    for got in results:
        for out, want in zip(got, expected):
            assert rel_err(out, want) < 8e-3
    assert all(torch.equal(a, b) for got in results for a, b in zip(got, results[0]))


@needs_cpu_kernels
def test_cpu_kernel_results_do_not_depend_on_the_thread_count():
    _, layer = quant_layer(4, torch.bfloat16, out=KERNEL_OUT, inp=KERNEL_IN)
    layer.pack()
    x = torch.randn(3, KERNEL_IN, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = [layer(x[:1]), layer(x)]
            torch.set_num_threads(2)
            two = [layer(x[:1]), layer(x)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpu_kernels
@pytest.mark.parametrize("bits", (8, 4))
def test_cpu_kernel_layout_life_cycle(bits):
    lin, layer = quant_layer(bits, torch.bfloat16, out=KERNEL_OUT, inp=KERNEL_IN)
    stored = layer.weight.detach().clone()
    x = torch.randn(2, KERNEL_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        first = layer.pack()(x)
    packed = layer.weight
    assert layer.backend == "cpu-avx512" and packed.original.numel() == 0  # one resident copy
    assert tuple(packed.shape) == tuple(stored.shape) and packed.dtype == stored.dtype  # same size
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    assert layer.weight is packed  # not repacked per call
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"} and torch.equal(sd["weight"], stored)
    assert not layer.is_packed and torch.equal(layer.weight, stored)  # state_dict() unpacks first
    assert layer.pack().backend == "cpu-avx512"
    # switching to torch's kernel and back changes the resident layout, never the stored weight
    Q.set_quantization_backend(CPU_BACKEND_FOR_BITS[bits])
    with torch.no_grad():
        assert torch.equal(layer(x), first)  # a packed layer keeps its kernel until the next pack()
        torch.testing.assert_close(layer.pack()(x), first, rtol=1e-2, atol=1e-2)
    assert layer.backend == CPU_BACKEND_FOR_BITS[bits]
    assert torch.equal(layer.state_dict()["weight"], stored)
    Q.set_quantization_backend(None)
    with torch.no_grad():
        assert torch.equal(layer.pack()(x), first)
    # gradients reach the input through the dequantized weight
    xg = x.float().requires_grad_()
    layer32 = copy.deepcopy(layer).float().pack()
    layer32(xg).sum().backward()
    deq = Q.dequantize_weight(stored, layer32.weight_scale, bits)
    torch.testing.assert_close(xg.grad, deq.sum(0).expand(2, -1))
    # a dtype move converts the float buffers (the fp32 scale table too): results must not change
    moved = copy.deepcopy(layer).to(torch.bfloat16).pack()
    with torch.no_grad():
        assert torch.equal(moved(x), first)
    assert moved.scale_table.dtype == torch.float32
    # device moves go back to the stored format; loading a new weight drops the packed copy
    meta = copy.deepcopy(layer).to("meta")
    assert not meta.is_packed and tuple(meta.weight.shape) == tuple(stored.shape)
    _, other = quant_layer(bits, torch.bfloat16, out=KERNEL_OUT, inp=KERNEL_IN, seed=1)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), other(x))


@needs_cpu_kernels
@pytest.mark.parametrize("bits", (8, 4))
def test_cpu_kernel_model_matches_dequantized_float_model(kernel_float_dir, bits):
    model = quiet_load(kernel_float_dir).quantize(bits)
    qmod = quantization_module_of(model)
    assert qmod.quantization_backend(model.pack_weights()) == "cpu-avx512"
    ref = dequantized_float_model(kernel_float_dir, model)
    ids = random_ids(seq=12)
    with torch.no_grad():
        # prefill (24 rows: dequantize + GEMM), then cached one-token steps for the 2-row batch (GEMV kernels)
        got = model(ids, use_cache=True)
        want = ref(ids, use_cache=True)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        step = ids[:, -1:] + 1
        got2 = model(step, past_key_values=got.past_key_values, use_cache=True).logits
        want2 = ref(step, past_key_values=want.past_key_values, use_cache=True).logits
        torch.testing.assert_close(got2, want2, rtol=1e-4, atol=1e-4)
        a = model.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        b = ref.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    assert {m.backend for m in block_linears(model).values()} == {"cpu-avx512"}


_FALLBACK_CHILD = CHILD_IMPORT + (
    "import torch; layer = m.QuantizedLinear.from_linear(torch.nn.Linear(256, 64), 8).pack(); x = torch.randn(2, 256); "
    "ok = torch.allclose(layer(x), x @ m.dequantize_weight(layer.stored_weight(), layer.weight_scale, 8).t() "
    "+ layer.bias, atol=1e-4); print(layer.backend, ok)")


@pytest.mark.parametrize("env", ({}, {"CHATGLM_CPU_KERNELS": "0"}, {"CC": "/bin/false"}, {"CC": "/nonexistent/cc"}),
                         ids=("builds", "disabled", "compiler-fails", "compiler-missing"))
def test_cpu_kernels_build_or_fall_back_to_torch_kernels(tmp_path, env):
    """In a fresh process with an empty HF_HOME (so the compiler really runs), HOME and TMPDIR: the kernels build
    into HF_HOME only, or the layer falls back to torch's kernel with at most one warning, and computes right."""
    builds = not env and _host_can_build_cpu_kernels()
    if not env and not builds:
        pytest.skip("this host cannot build the AVX-512 kernels")
    dirs = {name: tmp_path / name for name in ("hf", "home", "tmp")}
    for d in dirs.values():
        d.mkdir()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CHATGLM_"))}
    child_env.update(env, HF_HOME=str(dirs["hf"]), HOME=str(dirs["home"]), TMPDIR=str(dirs["tmp"]))
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD, str(REPO)], env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu-avx512" if builds else "cpu-int8pack", "True"]
    if _host_can_build_cpu_kernels() and "CC" in env:
        assert proc.stderr.count("AVX-512 CPU quantization kernels") == 1  # one clear warning
    libraries = list(dirs["hf"].rglob("*.so"))
    assert len(libraries) == (1 if builds else 0)
    if builds:
        assert libraries[0].parent == dirs["hf"] / "modules" / "chatglm3_cpu_kernels"
        assert libraries[0].with_suffix(".c").read_text() == CK.CPU_SOURCE  # the source it was built from, readable
    assert not list(dirs["home"].rglob("*")) and not list(dirs["tmp"].rglob("*"))




_DAMAGED_CHILD = CHILD_IMPORT + (
    "import os, torch; k = importlib.import_module('rc.cpu_kernels'); "
    "path = k.library_path(k.find_compiler(), k.cpu_signature()); os.makedirs(os.path.dirname(path)); "
    "open(path, 'wb').write(b'not a library'); "
    "layer = m.QuantizedLinear.from_linear(torch.nn.Linear(256, 64), 8).pack(); layer(torch.randn(1, 256)); "
    "print(layer.backend, os.path.exists(path))")


@needs_cpu_kernels
def test_a_damaged_cached_library_falls_back_and_is_rebuilt_next_time(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CHATGLM_"))}
    env["HF_HOME"] = str(tmp_path / "hf")
    first = subprocess.run([sys.executable, "-c", _DAMAGED_CHILD, str(REPO)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["cpu-int8pack", "False"]  # fell back, and removed the damaged file
    assert first.stderr.count("could not be loaded or failed their self-check") == 1
    second = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD, str(REPO)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["cpu-avx512", "True"]


_OPENMP_CHILD = CHILD_IMPORT + (
    "import torch\n"
    "def runtimes():\n"
    "    return {l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l or 'libiomp' in l}\n"
    "before = runtimes()\n"
    "assert importlib.import_module('rc.cpu_kernels').load() is not None\n"
    "print(sorted(runtimes() - before), len(before))")


@needs_cpu_kernels
def test_cpu_kernels_share_torchs_openmp_runtime():
    """Loading the kernels must not bring a second OpenMP runtime (two thread pools fighting over the cores)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc")
    proc = subprocess.run([sys.executable, "-c", _OPENMP_CHILD, str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    added, before = proc.stdout.rsplit(" ", 1)
    assert added == "[]" and int(before) >= 1  # torch's libgomp was there, and the kernels reuse it


def test_cpu_tuning_is_chosen_by_vendor_and_family(monkeypatch):
    monkeypatch.delenv("CHATGLM_CPU_PREFETCH", raising=False)
    zen5 = "cpu family\t: 26\nflags\t\t: avx512f avx512bw\nvendor_id\t: AuthenticAMD\n"
    assert CK.cpu_tuning(zen5) == CK.CPU_TUNING["AuthenticAMD 26"]
    assert CK.cpu_tuning(zen5.replace(": 26", ": 27")) == CK.CPU_TUNING["AuthenticAMD"]  # an unlisted family
    assert CK.cpu_tuning("cpu family\t: 6\nvendor_id\t: GenuineIntel\n") == CK.CPU_TUNING["GenuineIntel"]
    monkeypatch.setenv("CHATGLM_CPU_PREFETCH", "0,512,1024")
    assert CK.cpu_tuning(zen5) == (0, 512, 1024, *CK.CPU_TUNING["AuthenticAMD 26"][3:])
    monkeypatch.setenv("CHATGLM_CPU_PREFETCH", "1,2")
    with pytest.raises(ValueError, match="CHATGLM_CPU_PREFETCH"):
        CK.cpu_tuning(zen5)


@needs_cpu_kernels
@pytest.mark.parametrize("tuning", sorted(set(CK.CPU_TUNING.values())))
def test_every_cpu_tuning_builds_kernels_that_compute_right(tuning, tmp_path, monkeypatch):
    """Each tuning in the table (prefetch distances, codes layout), built on this host: the
    self-check passes (it packs in that tuning's layout) and the bf16 GEMV equals F.linear on shapes with row and
    column tails."""
    monkeypatch.delenv("CHATGLM_CPU_PREFETCH", raising=False)
    monkeypatch.setattr(CK, "cpu_tuning", lambda signature: tuning)
    monkeypatch.setattr(CK, "kernel_dir", lambda: str(tmp_path))
    lib = CK._build_and_load()
    assert lib is not None  # built, and passed _self_check
    gen = torch.Generator().manual_seed(0)
    for n, k, rows in ((4099, 4096, 1), (13, 200, 4), (7, 13696, 2)):
        weight, bias = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, generator=gen).bfloat16()
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        lib.chatglm_cpu_linear_bf16(x.data_ptr(), rows, weight.data_ptr(), bias.data_ptr(), out.data_ptr(), n, k, 2)
        want = F.linear(x.double(), weight.double(), bias.double())
        assert rel_err(out.double(), want) < 4e-3


@needs_cpu_kernels
def test_kernels_build_and_pass_their_self_check_without_avx512_bf16(tmp_path, monkeypatch):
    """CPUs with AVX-512 VNNI but not BF16 (Cascade Lake, Ice Lake) get the bf16 dot products emulated: that build
    passes the self-check too (quantized matmul and dequantize, bf16 GEMV with tails, decode attention)."""
    monkeypatch.setattr(CK, "COMPILE_FLAGS", (*CK.COMPILE_FLAGS, "-mno-avx512bf16"))
    monkeypatch.setattr(CK, "kernel_dir", lambda: str(tmp_path))
    assert CK._build_and_load() is not None
    assert "-mno-avx512bf16" in CK.compile_flags(CK.cpu_signature())


@needs_cpu_kernels
@pytest.mark.parametrize("masked", (False, True))
@pytest.mark.parametrize("length", (1, 7, 64, 65, 300))
@pytest.mark.parametrize("groups", (1, 3, 16))
def test_decode_attention_matches_sdpa_in_float64(length, groups, masked):
    """One new token against a cache (batch 2, 2 key/value heads), the cache a view into a longer buffer (as a
    static cache hands it over), optionally a bool key mask (left padding, random holes; the last key always
    visible): equal to SDPA computed in float64, within the bf16 output's rounding."""
    assert CK.load() is not None
    gen = torch.Generator().manual_seed(length * 100 + groups)
    q = torch.randn(2, 2 * groups, 1, 128, generator=gen).bfloat16() * 3
    buffers = torch.randn(2, 2, 2, length + 5, 128, generator=gen).bfloat16()
    k, v = buffers[0, :, :, :length], buffers[1, :, :, :length]
    mask = None
    if masked:
        mask = torch.rand(2, 1, 1, length, generator=gen) > 0.3
        mask[0, ..., : length // 2] = False
        mask[..., -1] = True
    assert CK.decode_attention_takes(q, k, v, mask) and not k.is_contiguous()
    want = F.scaled_dot_product_attention(q.double().view(2, 2, groups, 128), k.double(), v.double(), attn_mask=mask)
    got = CK.decode_attention(q, k, v, mask)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert rel_err(got.double().view(2, 2, groups, 128), want) < 8e-3


def test_decode_attention_takes_only_what_it_computes():
    q, kv = torch.zeros(1, 4, 1, 128, dtype=torch.bfloat16), torch.zeros(1, 2, 9, 128, dtype=torch.bfloat16)
    assert CK.decode_attention_takes(q, kv, kv)
    assert not CK.decode_attention_takes(q.float(), kv.float(), kv.float())  # bf16 only
    assert not CK.decode_attention_takes(torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16), kv, kv)  # one query row
    assert not CK.decode_attention_takes(torch.zeros(1, 34, 1, 128, dtype=torch.bfloat16), kv, kv)  # 17 groups
    assert not CK.decode_attention_takes(q[..., :96], kv[..., :96], kv[..., :96])  # head_dim % 64
    assert not CK.decode_attention_takes(q, kv[:, :, :0], kv[:, :, :0])  # empty cache
    assert not CK.decode_attention_takes(q, kv.transpose(2, 3), kv.transpose(2, 3))  # rows not contiguous
    assert CK.decode_attention_takes(q, kv, kv, torch.ones(1, 1, 1, 9, dtype=torch.bool))
    assert not CK.decode_attention_takes(q, kv, kv, torch.zeros(1, 1, 1, 9))  # additive masks: SDPA
    assert not CK.decode_attention_takes(q, kv, kv, torch.ones(1, 1, 1, 8, dtype=torch.bool))  # wrong length


@needs_cpu_kernels
def test_model_decode_uses_the_attention_kernel_and_matches_sdpa(tmp_path, monkeypatch):
    """bf16 greedy decode through the model, one prompt and a left-padded batch: the CPU attention kernel runs for
    every layer and step of one new token, and the logits equal those of the same model with SDPA (the kernel
    switched off) within bf16 noise."""
    folder = make_model_dir(tmp_path, hidden_size=256, kv_channels=64, num_attention_heads=4, ffn_hidden_size=128)
    model = load_model(folder).to(torch.bfloat16).eval()
    package = type(model).__module__.rsplit(".", 1)[0]
    lin, ck = sys.modules[package + ".linear"], importlib.import_module(package + ".cpu_kernels")
    takes, run = ck.decode_attention_takes, ck.decode_attention  # (also where CPU_TUNING prefers SDPA)
    padded, padded_mask = left_padded_batch()
    for ids, mask in ((random_ids(batch=1, seq=12), None), (padded, padded_mask)):
        calls = []
        monkeypatch.setitem(lin._CPU_KERNELS, "attention",
                            (takes, lambda q, k, v, m=None: calls.append(k.shape[2]) or run(q, k, v, m)))
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                      return_dict_in_generate=True)
        with torch.no_grad():
            got = model.generate(ids, **kwargs)
            layers, prompt = model.config.num_layers, ids.shape[1]
            assert calls == [prompt + step for step in range(1, 6) for _ in range(layers)]  # every step and layer
            monkeypatch.setitem(lin._CPU_KERNELS, "attention", False)
            want = model.generate(ids, **kwargs)
        for a, b in zip(got.scores, want.scores):
            assert rel_err(a, b) < 3e-2


@needs_cpu_kernels
@pytest.mark.parametrize("wins", (True, False))
def test_decode_attention_kernel_runs_only_where_the_tuning_says_it_beats_sdpa(wins, monkeypatch):
    """CPU_TUNING's last entry decides whether the model's decode step takes the kernel (AMD) or SDPA (Intel, where
    SDPA's own kernel measured faster); the bf16 GEMV is there either way."""
    lin, lib = load_module("linear"), load_module("cpu_kernels").load()
    vendor = "GenuineIntel" if "GenuineIntel" in CK.cpu_signature() else "AuthenticAMD"
    assert lib.attention == (vendor == "AuthenticAMD")  # this machine's entry
    monkeypatch.setattr(lib, "attention", wins)
    monkeypatch.setattr(lin, "_CPU_KERNELS", {})
    assert (lin.cpu_kernel("attention") is not None) == wins and lin.cpu_kernel("gemv") is not None


@needs_cpu_kernels
def test_decode_attention_kernel_stays_out_of_compiled_graphs():
    """Under torch.compile (fullgraph: an opaque ctypes call would break the graph) the decode step is SDPA's."""
    attention = load_module("modeling_chatglm").ATTENTION_FUNCTIONS["sdpa"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 64, generator=gen).bfloat16() for heads, length in ((4, 1), (2, 9), (2, 9)))
    with torch.no_grad():
        got, _ = torch.compile(attention, fullgraph=True)(q, k, v, None, False, 0.0)
        eager, _ = attention(q, k, v, None, False, 0.0)
    want = F.scaled_dot_product_attention(q.double().view(1, 2, 2, 64), k.double(), v.double()).view(1, 4, 1, 64)
    assert rel_err(got.double(), want) < 8e-3 and rel_err(eager.double(), want) < 8e-3


@needs_cpu_kernels
def test_decode_attention_propagates_nan_like_sdpa():
    """A NaN key (a broken cache entry) makes the rows that see it NaN, as SDPA does; a masked-out NaN key does not."""
    assert CK.load() is not None
    q, k, v = torch.randn(2, 4, 1, 64).bfloat16(), torch.randn(2, 2, 9, 64).bfloat16(), torch.randn(2, 2, 9, 64).bfloat16()
    k[0, 1, 3, 5] = float("nan")
    got = CK.decode_attention(q, k, v).view(2, 2, 2, 64)
    want = F.scaled_dot_product_attention(q.float().view(2, 2, 2, 64), k.float(), v.float())
    assert torch.equal(got.isnan(), want.isnan()) and got[0, 1].isnan().all() and not got[1].isnan().any()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 3] = False
    assert not CK.decode_attention(q, k, v, mask).isnan().any()


# The small bf16 steps between a decode step's GEMVs: RMSNorm, rotary, SwiGLU (cpu_kernels.rms_norm / rotary_ /
# silu_mul), against the model's torch ops and float64.
@needs_cpu_kernels
@pytest.mark.parametrize("rows", (1, 3, 16))
def test_decode_steps_match_the_torch_ops(rows):
    """Each kernel against the module's own torch path (autograd on: no kernel) and float64: rotary bit-exact (every
    product and sum rounded to bf16 as torch's bf16 ops), the norm and SwiGLU within one bf16 rounding; values over
    several magnitudes, a row of zeros (norm: eps only), and inf / NaN propagating as in torch."""
    assert CK.load() is not None
    M = load_module("modeling_chatglm")
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 1, 4096, generator=gen) * torch.logspace(-3, 3, 4096)[torch.randperm(4096, generator=gen)])
    x = x.bfloat16()
    x[0, 0, :] = 0 if rows > 1 else x[0, 0, :]
    norm = M.RMSNorm(4096, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(4096, generator=gen).bfloat16()
    got = CK.rms_norm(x, norm.weight, norm.eps)
    want = norm(x)  # (grad enabled: the torch ops)
    h = x.double()
    exact = norm.weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert ((got.double() - want.double()).abs() <= 2 ** -7 * want.double().abs()).all()
    assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-30).all()

    qkv = torch.randn(rows, 1, 4608, generator=gen).bfloat16() * 4
    positions = torch.randint(0, 32768, (rows, 1), generator=gen)
    cos, sin = M.RotaryEmbedding(load_module("configuration_chatglm").ChatGLMConfig(), device="cpu")(
        positions, torch.bfloat16)
    heads = qkv[..., :34 * 128].view(rows, 1, 34, 128).transpose(1, 2)
    want = M.apply_rotary(heads, cos, sin).transpose(1, 2).reshape(rows, 1, -1)
    rotated = qkv.clone()
    assert CK.rotary_(rotated, 34, 128, cos, sin)
    assert torch.equal(rotated[..., :34 * 128], want) and torch.equal(rotated[..., 34 * 128:], qkv[..., 34 * 128:])

    stacked = (torch.randn(rows, 1, 2 * 13696, generator=gen) * 6).bfloat16()
    stacked[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -200.0])
    gate, up = stacked.chunk(2, dim=-1)
    want, got = F.silu(gate) * up, CK.silu_mul(stacked)
    assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
    finite, infinite = want.isfinite(), want.isinf()
    assert torch.equal(got[infinite], want[infinite])
    assert ((got - want).abs().double()[finite] <= 2 ** -7 * want.abs().double()[finite]).all()


def test_decode_steps_take_only_what_they_compute():
    """Where a step's kernel does not compute exactly the op (another dtype, a non-contiguous tensor, more rows than
    a decode step has, widths off the kernels' multiple of 16, a weight of another shape) it returns None / False
    before touching any memory, and the module runs its torch ops."""
    x, w = torch.zeros(2, 1, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    cos = sin = torch.zeros(2, 1, 1, 16, dtype=torch.bfloat16)
    if CK.load() is None:
        pytest.skip("the kernels do not build here")
    assert CK.rms_norm(x, w, 1e-5) is not None and CK.rotary_(x.clone(), 2, 32, cos, sin)
    assert CK.silu_mul(x) is not None
    assert CK.rms_norm(x.float(), w, 1e-5) is None and CK.rms_norm(x, w.float(), 1e-5) is None
    assert CK.rms_norm(x, w[:32], 1e-5) is None and CK.rms_norm(x[..., :40], w[:40], 1e-5) is None  # 40 % 16
    assert CK.rms_norm(x.transpose(0, 2), w[:2], 1e-5) is None  # not contiguous
    assert CK.rms_norm(torch.zeros(17, 64, dtype=torch.bfloat16), w, 1e-5) is None  # prefill-sized: torch
    assert CK.silu_mul(x[..., :48]) is None and CK.silu_mul(torch.zeros(17, 64, dtype=torch.bfloat16)) is None
    assert not CK.rotary_(x, 3, 32, cos, sin)  # 3 heads of 32 do not fit in 64
    assert not CK.rotary_(x, 2, 32, cos[:1], sin[:1]) and not CK.rotary_(x, 2, 32, cos.float(), sin.float())


@needs_cpu_kernels
def test_model_decode_uses_the_step_kernels_and_matches_torch_ops(tmp_path, monkeypatch):
    """bf16 greedy decode through the model: the norms, rotary and SwiGLU of every layer and step run in the C
    kernels (none under autograd), and the logits equal those of the same model with the torch ops (the kernels
    switched off) within bf16 noise."""
    folder = make_model_dir(tmp_path, hidden_size=256, kv_channels=64, num_attention_heads=4, ffn_hidden_size=128)
    model = load_model(folder).to(torch.bfloat16).eval()
    package = type(model).__module__.rsplit(".", 1)[0]
    lin, ck = sys.modules[package + ".linear"], importlib.import_module(package + ".cpu_kernels")
    calls = []

    class Counting:  # the steps that ran (a step that does not take its tensors returns None / False)
        def __getattr__(self, name):
            def step(*args):
                out = getattr(ck, name)(*args)
                if out is not None and out is not False:
                    calls.append(name)
                return out
            return step

    ids = random_ids(batch=1, seq=20)  # (a prompt over STEP_MAX_ROWS rows: torch's ops there)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    monkeypatch.setitem(lin._CPU_KERNELS, "steps", Counting())
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
    layers = model.config.num_layers
    assert calls.count("rotary_") == calls.count("silu_mul") == 5 * layers  # every layer of the 5 decode steps
    assert calls.count("rms_norm") == 5 * (2 * layers + 1)  # (and the final norm)
    calls.clear()
    model(ids[:, :4]).logits.sum().backward()  # autograd: torch's ops
    assert calls == []
    monkeypatch.setitem(lin._CPU_KERNELS, "steps", False)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        assert rel_err(a, b) < 1e-2


@needs_cpu_kernels
def test_step_kernels_stay_out_of_compiled_graphs():
    """Under torch.compile (fullgraph: an opaque ctypes call would break the graph) the norm and SwiGLU are torch's
    ops, with the eager (kernel) results."""
    M, config = load_module("modeling_chatglm"), load_module("configuration_chatglm").ChatGLMConfig(
        hidden_size=64, ffn_hidden_size=96, quantization_bit=0)
    gen = torch.Generator().manual_seed(0)
    norm, mlp = M.RMSNorm(64).to(torch.bfloat16), M.MLP(config).to(torch.bfloat16)
    for p in (*norm.parameters(), *mlp.parameters()):
        p.data = torch.randn(p.shape, generator=gen).bfloat16() * 0.3
    x = torch.randn(1, 2, 64, generator=gen).bfloat16()
    with torch.no_grad():
        for module in (norm, mlp):
            eager, compiled = module(x), torch.compile(module, fullgraph=True)(x)
            assert rel_err(compiled.double(), eager.double()) < 1e-2
