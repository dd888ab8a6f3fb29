"""Weight-only int8/int4 quantization: storage format (bit-exact against a reference packer), compute backends,
QuantizedLinear life cycle (explicit pack / unpack, state_dict, load, device moves), model-level accuracy,
save/load round trips (also in a fresh process), checkpoints in the original's layout, a quantized checkpoint whose
config.json has the wrong quantization_bit, error messages, memory. The kernels have their own files:
test_cpu_kernels.py (cpu_kernels.py's AVX-512 C kernels), test_cuda_kernels.py, test_cpu_prepack.py (bf16 decode)."""
import ast
import copy
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from support import (CHILD_IMPORT, REPO, block_linears, copy_dir, dequantized_float_model, load_model,
                     load_quantization_module, make_model_dir, quant_layer, quant_weight, quantization_module_of,
                     quiet_load, random_ids, reference_pack_int4, reference_quantize, reference_unpack_int4, rel_err,
                     write_code, write_config)

Q = load_quantization_module()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_BACKEND_FOR_BITS = {8: "cpu-int8pack", 4: "cpu-int4pack"}
pytestmark = pytest.mark.usefixtures("automatic_quantization_backend")


# ---------------------------------------------------------------------------------------------------------------------
# Storage format
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_stored_format_matches_reference_packer(dtype, bits):
    w = quant_weight(48, 96, dtype)
    q_ref, stored_ref, scale_ref = reference_quantize(w, bits)
    stored, scale = Q.quantize_weight(w, bits)
    assert stored.dtype == torch.int8 and scale.dtype == dtype
    assert stored.shape == (48, 96 if bits == 8 else 48) and scale.shape == (48,)
    assert torch.equal(stored, stored_ref)
    assert torch.equal(scale, scale_ref)
    # dequantize == q * scale exactly, with q read back by the reference unpacker
    q_back = stored if bits == 8 else reference_unpack_int4(stored)
    assert torch.equal(q_back, q_ref)
    assert torch.equal(Q.dequantize_weight(stored, scale, bits), q_ref.to(dtype) * scale[:, None])


def test_int4_nibble_order_and_sign():
    q = torch.tensor([[-8, 7, -1, 0, 3, -5]], dtype=torch.int8)
    packed = Q.pack_int4(q)
    # element 2j -> high nibble, 2j+1 -> low nibble, two's complement
    assert packed.view(torch.uint8).tolist() == [[0x87, 0xF0, 0x3B]]
    assert torch.equal(packed, reference_pack_int4(q))
    assert torch.equal(Q.unpack_int4(packed), q)


@pytest.mark.parametrize("bits", (8, 4))
def test_all_zero_rows_dequantize_to_zero(bits):
    w = torch.zeros(16, 32)
    w[3, 5] = 1.5
    stored, scale = Q.quantize_weight(w, bits)
    deq = Q.dequantize_weight(stored, scale, bits)
    assert not torch.isnan(deq).any()
    assert torch.equal(deq[torch.arange(16) != 3], torch.zeros(15, 32))
    layer = Q.QuantizedLinear.from_linear(torch.nn.Linear(32, 16, bias=False), bits)
    with torch.no_grad():
        layer.weight.copy_(stored)
        layer.weight_scale.copy_(scale)
        out = layer(torch.randn(2, 32))
    assert torch.isfinite(out).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_features must be even"):
        Q.quantize_weight(torch.randn(4, 5), 4)
    with pytest.raises(ValueError, match="in_features must be even"):
        Q.QuantizedLinear(5, 4, 4)
    with pytest.raises(ValueError, match="in_features must be even"):
        Q.QuantizedLinear.from_linear(torch.nn.Linear(7, 4), 4)
    for bits in (3, 0, 16, True):
        with pytest.raises(ValueError, match="4 or 8"):
            Q.quantize_weight(torch.randn(4, 8), bits)
    with pytest.raises(ValueError, match="unknown quantization backend"):
        Q.set_quantization_backend("cuda-magic")


# ---------------------------------------------------------------------------------------------------------------------
# QuantizedLinear and the backends
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("backend", ("auto", "torch-dequant", "cpu"))
def test_quantized_linear_matches_dequantized_linear(dtype, bits, backend):
    lin, layer = quant_layer(bits, dtype)
    Q.set_quantization_backend(CPU_BACKEND_FOR_BITS[bits] if backend == "cpu" else backend)
    expected_backend = "torch-dequant" if backend == "torch-dequant" else CPU_BACKEND_FOR_BITS[bits]
    layer.pack()
    assert layer.backend_for() == expected_backend
    assert Q.quantization_backend(layer) == expected_backend
    deq = Q.dequantize_weight(layer.stored_weight(), layer.weight_scale, bits)
    x = torch.randn(3, 5, 96).to(dtype)
    with torch.no_grad():
        out = layer(x)
    assert layer.backend == expected_backend
    assert out.shape == (3, 5, 192) and out.dtype == dtype
    reference = F.linear(x.float(), deq.float(), lin.bias.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(out, reference) < tol


def test_forced_backend_that_cannot_run_falls_back():
    _, layer = quant_layer(8, torch.float32)
    Q.set_quantization_backend("cpu-int4pack")  # wrong bit width for this layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert layer.backend_for() == "torch-dequant"
        layer(torch.randn(2, 96))
    Q.set_quantization_backend("cuda-cpm_kernels")
    assert layer.backend_for() == "torch-dequant"  # CPU tensors


def test_shapes_the_cpu_kernels_cannot_take_use_torch_dequant():
    # _weight_int8pack_mm needs in_features % 16 == 0 (wrong results / crashes otherwise);
    # the int4 kernel needs out_features % 16 == 0 and in_features % 32 == 0.
    for bits, out, inp in ((8, 32, 40), (4, 40, 64), (4, 32, 48)):
        lin, layer = quant_layer(bits, torch.float32, out=out, inp=inp)
        assert layer.pack().backend == "torch-dequant" and not layer.is_packed
        x = torch.randn(2, inp)
        deq = Q.dequantize_weight(layer.weight, layer.weight_scale, bits)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, deq, lin.bias))


@pytest.mark.parametrize("bits", (8, 4))
def test_forward_never_changes_the_layout_and_binds_a_stored_format_backend(bits):
    _, layer = quant_layer(bits, torch.bfloat16)
    tensors = [(n, t) for n, t in list(layer.named_parameters()) + list(layer.named_buffers())]
    with torch.no_grad():
        layer(torch.randn(2, 96, dtype=torch.bfloat16))
    assert not layer.is_packed and type(layer.weight) is torch.nn.Parameter
    assert [(n, t) for n, t in list(layer.named_parameters()) + list(layer.named_buffers())] == tensors
    assert layer.backend == ("cpu-int8pack" if bits == 8 else "torch-dequant")  # no layout of its own
    Q.set_quantization_backend("torch-dequant")  # unpacked layers choose again
    with torch.no_grad():
        layer(torch.randn(2, 96, dtype=torch.bfloat16))
    assert layer.backend == "torch-dequant"


def test_int4_cpu_layout_packed_once_and_state_dict_gives_back_stored_format():
    _, layer = quant_layer(4, torch.bfloat16)
    stored = layer.weight.detach().clone()
    original = layer.weight
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    assert layer.pack() is layer and layer.backend == "cpu-int4pack" and layer.is_packed
    with torch.no_grad():
        first = layer(x)
    packed = layer.weight  # the kernel's layout, standing in for the stored weight: same shape, dtype, size
    assert tuple(packed.shape) == tuple(stored.shape) and packed.dtype == stored.dtype
    assert packed.original.numel() == 0  # one resident copy
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    layer.pack()
    assert layer.weight is packed  # packing again is a no-op
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}  # runtime buffers are not persistent
    assert torch.equal(sd["weight"], stored) and not layer.is_packed  # state_dict() unpacks first
    layer.pack()
    assert torch.equal(layer.stored_weight(), stored)
    # chunked packing equals packing in one go
    old = Q.PACK_CHUNK_ROWS
    try:
        Q.PACK_CHUNK_ROWS = 64
        assert torch.equal(Q.Int4Pack().pack(stored, 4).view(torch.int8), packed)
    finally:
        Q.PACK_CHUNK_ROWS = old
    # unpack gives the stored weight back in the layer's own Parameter object
    assert layer.weight.original is original
    layer.unpack()
    assert layer.weight is original and torch.equal(layer.weight, stored)
    assert not layer.is_packed and layer.scale_table is None


@pytest.mark.parametrize("bits", (8, 4))
def test_quantized_linear_life_cycle(bits):
    _, layer = quant_layer(bits, torch.float32)
    x = torch.randn(4, 96)
    stored = layer.state_dict()["weight"].clone()
    layer.pack()
    with torch.no_grad():
        expected = layer(x)

    # deepcopy / pickle of a packed layer keep working (and stay packed)
    copied = copy.deepcopy(layer)
    assert copied.is_packed == layer.is_packed and torch.equal(copied(x), expected) and torch.equal(copied.stored_weight(), stored)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.is_packed == layer.is_packed and torch.equal(loaded(x), expected) and torch.equal(loaded.state_dict()["weight"], stored)

    # an empty layer built on meta (as transformers does), then loaded
    fresh = Q.QuantizedLinear(96, 192, bits, bias=True, dtype=torch.float32, device="meta").to_empty(device="cpu")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.pack()(x), expected)

    # loading a stored weight into a packed layer unpacks it first; assigning one into an unpacked layer is seen
    other_lin, other = quant_layer(bits, torch.float32, seed=1)
    layer.load_state_dict(other.state_dict())
    assert not layer.is_packed and torch.equal(layer(x), other(x))
    layer.weight = torch.nn.Parameter(stored.clone(), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(fresh.weight_scale.clone(), requires_grad=False)
    layer.bias = torch.nn.Parameter(fresh.bias.clone(), requires_grad=False)
    assert torch.equal(layer.pack()(x), expected)

    # dtype and device moves and train() go back to the stored format
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert not half.is_packed and torch.equal(half.state_dict()["weight"], stored)
    assert not copy.deepcopy(layer).train().is_packed
    assert half(x.bfloat16()).dtype == torch.bfloat16
    meta = copy.deepcopy(layer).to("meta")
    assert tuple(meta.weight.shape) == tuple(stored.shape) and not meta.is_packed


def test_load_state_dict_rejects_wrong_shapes_and_float_weights():
    layer = Q.QuantizedLinear(64, 32, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expects an int8 tensor of shape \[32, 32\].*int8 \[32, 64\].*8-bit"):
        layer.load_state_dict({"weight": torch.zeros(32, 64, dtype=torch.int8), "weight_scale": torch.zeros(32)})
    layer8 = Q.QuantizedLinear(64, 32, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="unquantized checkpoint"):
        layer8.load_state_dict({"weight": torch.zeros(32, 64), "weight_scale": torch.zeros(32)})


@pytest.mark.parametrize("bits", (8, 4))
def test_gradient_flows_to_the_input(bits):
    _, layer = quant_layer(bits, torch.float32)
    x = torch.randn(3, 96, requires_grad=True)
    layer.pack()(x).sum().backward()
    assert layer.backend == CPU_BACKEND_FOR_BITS[bits]
    deq = Q.dequantize_weight(layer.stored_weight(), layer.weight_scale, bits)
    torch.testing.assert_close(x.grad, deq.sum(0).expand(3, -1))


def test_meta_construction_and_from_linear_on_meta():
    layer = Q.QuantizedLinear(64, 32, 4, bias=True, dtype=torch.bfloat16, device="meta")
    assert layer.weight.shape == (32, 32) and layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.bias.shape == (32,)
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    with torch.device("meta"):
        lin = torch.nn.Linear(64, 32)
    assert Q.QuantizedLinear.from_linear(lin, 8).weight.is_meta


# ---------------------------------------------------------------------------------------------------------------------
# Kernel modules: imported lazily (the CUDA kernels themselves: tests/test_cuda_kernels.py)
# ---------------------------------------------------------------------------------------------------------------------
def test_kernel_modules_and_cpm_kernels_are_imported_lazily_only():
    for name in ("quantization.py", "cuda_kernels.py", "cpu_kernels.py"):
        for node in ast.parse((REPO / name).read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("cpm_kernels" in n or n.endswith("_kernels") for n in names), (name, names)
    code = CHILD_IMPORT + (
        "assert not {'cpm_kernels', 'rc.cpu_kernels', 'rc.cuda_kernels'} & set(sys.modules); "
        "print(m.quantization_backend()); assert 'rc.cpu_kernels' in sys.modules or 'rc.cuda_kernels' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = "cuda-cpm_kernels cuda-nvrtc torch-dequant" if torch.cuda.is_available() else "cpu-avx512 cpu-int8pack"
    assert out.stdout.strip().splitlines()[-1] in expected.split()


# ---------------------------------------------------------------------------------------------------------------------
# Model level (tiny random ChatGLM3 through the remote-code path)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qfloat"), seed=3)


@pytest.mark.parametrize("bits", (8, 4))
def test_model_logits_match_dequantized_float_model_for_every_cpu_backend(float_dir, bits):
    model = quiet_load(float_dir).quantize(bits)
    assert model.config.quantization_bit == bits
    assert all(type(m).__name__ == "QuantizedLinear" for m in block_linears(model).values())
    assert type(model.transformer.output_layer).__name__ == "Linear"  # not quantized
    qmod = quantization_module_of(model)
    ref = dequantized_float_model(float_dir, model)
    ids = random_ids(seq=12)
    with torch.no_grad():
        expected = ref(ids).logits
        try:
            assert qmod.quantization_backend(model) == ("cpu-int8pack" if bits == 8 else "torch-dequant")
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)  # unpacked
            for backend in ("auto", CPU_BACKEND_FOR_BITS[bits], "torch-dequant"):
                qmod.set_quantization_backend(backend)
                want = "torch-dequant" if backend == "torch-dequant" else CPU_BACKEND_FOR_BITS[bits]
                assert qmod.quantization_backend(model.pack_weights()) == want
                got = model(ids).logits
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        finally:
            qmod.set_quantization_backend(None)


def test_int8_greedy_decoding_mostly_agrees_with_float(float_dir):
    fp = quiet_load(float_dir)
    q8 = quiet_load(float_dir).quantize(8)
    prompt = random_ids(2, 6, seed=5)[:1]
    with torch.no_grad():
        a = fp.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        b = q8.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    agree = (a[0, 6:] == b[0, 6:]).float().mean().item()
    assert agree >= 0.6, (a, b)


@pytest.mark.parametrize("bits", (8, 4))
def test_save_load_round_trip(float_dir, tmp_path, bits):
    model = quiet_load(float_dir).quantize(bits)
    model.pack_weights()  # int4: the CPU layout; the saved file must still be the stored one
    ids = random_ids(seq=12)
    with torch.no_grad():
        before = model(ids).logits
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    write_code(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_bit"] == bits
    loaded = quiet_load(tmp_path)  # AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)
    assert loaded.config.quantization_bit == bits
    sd = loaded.state_dict()
    for name, lin in block_linears(loaded).items():
        assert type(lin).__name__ == "QuantizedLinear"
        for p in ("weight", "weight_scale"):
            assert torch.equal(sd[f"{name}.{p}"], stored[f"{name}.{p}"]), name
    loaded.pack_weights()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def _write_original_layout_checkpoint(folder, float_dir):
    """A checkpoint as the original code writes it: fp16 everywhere, int4 packed weights [out, in/2] (int8) and
    fp16 weight_scale, config quantization_bit=4, in a pytorch_model.bin."""
    float_model = quiet_load(float_dir)
    sd = {}
    for key, value in float_model.state_dict().items():
        sd[key] = value.half() if value.is_floating_point() else value
    for name in block_linears(float_model):
        w = sd.pop(f"{name}.weight")
        _, stored, scale = reference_quantize(w, 4)
        sd[f"{name}.weight"] = stored
        sd[f"{name}.weight_scale"] = scale
    write_code(folder)
    write_config(folder, quantization_bit=4, torch_dtype="float16")
    torch.save(sd, Path(folder) / "pytorch_model.bin")
    return sd


def test_original_layout_int4_checkpoint_loads(float_dir, tmp_path):
    sd = _write_original_layout_checkpoint(tmp_path, float_dir)
    model = quiet_load(tmp_path, torch_dtype=torch.float32)
    assert model.config.quantization_bit == 4
    loaded = model.state_dict()
    for name in block_linears(model):
        assert torch.equal(loaded[f"{name}.weight"], sd[f"{name}.weight"])
        assert torch.equal(loaded[f"{name}.weight_scale"], sd[f"{name}.weight_scale"].float())
    with torch.no_grad():
        logits = model(random_ids(seq=12)).logits
    assert torch.isfinite(logits).all()
    # reference: the float model holding the same (fp16-rounded) tensors, block weights dequantized
    ref = dequantized_float_model(float_dir, model)
    with torch.no_grad():
        for key, value in ref.state_dict().items():
            if not any(key.startswith(name + ".") for name in block_linears(ref)) or key.endswith(".bias"):
                value.copy_(sd[key].float())
        torch.testing.assert_close(logits, ref(random_ids(seq=12)).logits, rtol=1e-4, atol=1e-4)


def test_quantize_rejects_bad_bits(float_dir):
    model = quiet_load(float_dir)
    for bits in (3, 16, 1):
        with pytest.raises(ValueError):
            model.quantize(bits)


def test_odd_input_width_int4_is_a_value_error(tmp_path):
    # hidden 64 / ffn 95: dense_4h_to_h has in_features 95
    folder = make_model_dir(tmp_path / "odd", ffn_hidden_size=95)
    model = quiet_load(folder)
    with pytest.raises(ValueError, match="in_features must be even"):
        model.quantize(4)
    assert not any(type(m).__name__ == "QuantizedLinear" for m in block_linears(model).values())  # untouched
    assert not model.config.quantization_bit
    model.quantize(8)  # int8 is fine with any width
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(seq=12)).logits).all()


@pytest.fixture(scope="module")
def int8_dir(float_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("q8")
    model = quiet_load(float_dir).quantize(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    write_code(folder)
    return folder


def _set_bits(folder, bits):
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg["quantization_bit"] = bits
    (Path(folder) / "config.json").write_text(json.dumps(cfg))


def _load_checked(folder):
    """from_pretrained plus quantization.check_quantized_load on the loading info."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    quantization_module_of(model).check_quantized_load(model, info)
    return model


def test_config_bits_not_matching_checkpoint_is_a_value_error(int8_dir, float_dir, tmp_path):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(int8_dir, wrong)
    _set_bits(wrong, 4)
    with pytest.raises(ValueError, match=r"quantization_bit=4 expects .*shape \[\d+, \d+\]"):
        _load_checked(wrong)
    unquantized = tmp_path / "float"
    shutil.copytree(float_dir, unquantized)
    _set_bits(unquantized, 8)
    with pytest.raises(ValueError, match="quantization_bit=8"):
        _load_checked(unquantized)


def test_plain_from_pretrained_with_wrong_bits_is_a_value_error(int8_dir, tmp_path):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(int8_dir, wrong)
    _set_bits(wrong, 4)
    with pytest.raises(ValueError, match="quantization_bit=4"):
        quiet_load(wrong)


@pytest.mark.parametrize("fmt", ("safetensors", "bin"))
def test_wrong_bits_are_found_from_the_checkpoint_before_loading_it(int8_dir, tmp_path, monkeypatch, fmt):
    """The checkpoint's tensor shapes (safetensors header, or a memory-mapped .bin) are checked against the config
    before the library loads it, on every transformers version; a direct class call reads config.json once."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = tmp_path / fmt
    shutil.copytree(int8_dir, folder)
    saved = folder / "model.safetensors"  # transformers 4.30 saves pytorch_model.bin
    state_dict = load_file(saved) if saved.exists() else torch.load(folder / "pytorch_model.bin", weights_only=True)
    for old in (folder / "model.safetensors", folder / "pytorch_model.bin"):
        old.unlink(missing_ok=True)
    if fmt == "bin":
        torch.save(state_dict, folder / "pytorch_model.bin")
    else:
        save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    cls = get_class_from_dynamic_module("modeling_chatglm.ChatGLMForConditionalGeneration", str(folder))
    reads = []
    original = cls.config_class.from_pretrained.__func__
    monkeypatch.setattr(cls.config_class, "from_pretrained",
                        classmethod(lambda c, *a, **k: reads.append(a) or original(c, *a, **k)))

    def no_weight_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before it was checked")

    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(transformers.PreTrainedModel, "_load_pretrained_model", classmethod(no_weight_loading))
        with pytest.raises(ValueError, match=r"quantization_bit=4 expects .*shape \[\d+, \d+\]"):
            cls.from_pretrained(folder, quantization_bit=4)
        assert len(reads) == 1
        with pytest.raises(ValueError, match=r"weight_scale tensors\), but config.quantization_bit is 0"):
            cls.from_pretrained(folder, quantization_bit=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        reads.clear()
        assert cls.from_pretrained(folder, config=config).config.quantization_bit == 8 and not reads


SHORT_IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.mark.parametrize("bits", [4, 0])
def test_quantized_checkpoint_with_wrong_bits_is_a_value_error(int8_dir, tmp_path, bits):
    folder = copy_dir(int8_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_bit"] = bits
    (folder / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="quantiz|weight_scale|int8"):
        warnings.simplefilter("ignore")
        load_model(folder)


def test_quantized_checkpoint_with_right_bits_loads(int8_dir):
    model = load_model(int8_dir)
    with torch.no_grad():
        assert torch.isfinite(model(SHORT_IDS).logits).all()


@pytest.mark.parametrize("bits,limit", ((8, 0.52), (4, 0.27)))
def test_resident_bytes_of_quantized_linears(tmp_path, bits, limit):
    folder = make_model_dir(tmp_path / "mem", num_layers=1, hidden_size=512, ffn_hidden_size=1024,
                            num_attention_heads=8, kv_channels=64, torch_dtype="bfloat16")
    model = quiet_load(folder, torch_dtype=torch.bfloat16)

    def resident(module):
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

    float_bytes = sum(resident(m) for m in block_linears(model).values())
    footprint_before = model.get_memory_footprint()
    model.quantize(bits)
    model.pack_weights()  # int4: repacked for the CPU kernel, still one copy
    with torch.no_grad():
        model(random_ids(seq=12))
    quant_bytes = sum(resident(m) for m in block_linears(model).values())
    assert quant_bytes / float_bytes < limit
    assert quant_bytes / float_bytes > (0.5 if bits == 8 else 0.25)
    # get_memory_footprint sees the packed buffers too
    assert footprint_before - model.get_memory_footprint() == float_bytes - quant_bytes


# ---------------------------------------------------------------------------------------------------------------------
# Optional: quantize(bits, quantize_output_layer=True)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", (8, 4))
def test_quantized_output_layer_matches_dequantized_float_model_and_round_trips(kernel_float_dir, tmp_path, bits):
    model = quiet_load(kernel_float_dir).quantize(bits, quantize_output_layer=True)
    head = model.transformer.output_layer
    assert type(head).__name__ == "QuantizedLinear" and model.config.quantize_output_layer is True
    ref = dequantized_float_model(kernel_float_dir, model)
    qmod = quantization_module_of(model)
    with torch.no_grad():
        ref.transformer.output_layer.weight.copy_(
            qmod.dequantize_weight(head.stored_weight(), head.weight_scale, bits))
        ids = random_ids(seq=12)
        expected = ref(ids).logits
        got = model(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        a = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        b = ref.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    # the head's stored tensors follow the published block-linear format
    _, stored, scale = reference_quantize(quiet_load(kernel_float_dir).transformer.output_layer.weight.detach(), bits)
    assert torch.equal(head.stored_weight(), stored) and torch.equal(head.weight_scale, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantize_output_layer"] is True
    loaded = quiet_load(tmp_path)
    assert type(loaded.transformer.output_layer).__name__ == "QuantizedLinear"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
    # a config that hides the quantized head is refused (its int8 weight would be read as floats)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantize_output_layer"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantize_output_layer"):
        quiet_load(tmp_path)


def test_quantize_output_layer_bad_input(float_dir, tmp_path):
    model = quiet_load(float_dir)
    with pytest.raises(ValueError, match="quantize_output_layer must be True or False"):
        model.quantize(8, quantize_output_layer="yes")
    assert model.config.quantization_bit == 0  # untouched
    from transformers import AutoConfig

    for overrides, message in (({"quantize_output_layer": True}, "needs quantization_bit"),
                               ({"quantize_output_layer": "yes", "quantization_bit": 8}, "must be true or false"),
                               ({"quantize_output_layer": True, "quantization_bit": 8, "tie_word_embeddings": True},
                                "tie_word_embeddings")):
        folder = tmp_path / str(len(message))
        folder.mkdir()
        write_code(folder)
        write_config(folder, **overrides)
        with pytest.raises(ValueError, match=message):
            AutoConfig.from_pretrained(folder, trust_remote_code=True)
    # quantizing only the head of an already block-quantized model works; other widths do not
    q = quiet_load(float_dir).quantize(8)
    assert type(q.quantize(8, quantize_output_layer=True).transformer.output_layer).__name__ == "QuantizedLinear"
    with pytest.raises(ValueError, match="already quantized to 8 bits"):
        q.quantize(4, quantize_output_layer=True)


# ---------------------------------------------------------------------------------------------------------------------
# The entry point quantize(model, bits, ...) and the explicit pack / unpack of a whole model
# ---------------------------------------------------------------------------------------------------------------------
def test_quantize_checks_its_arguments_before_any_work(float_dir):
    model = quiet_load(float_dir)
    qmod = quantization_module_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in ((dict(bits=3), "0, 4 or 8"), (dict(bits="8"), "0, 4 or 8"), (dict(bits=8.0), "0, 4 or 8"),
                            (dict(bits=8, empty_init="no"), "empty_init must be True or False"),
                            (dict(bits=8, device="nowhere"), "device"),
                            (dict(bits=8, colour=1), "unexpected argument")):
        for entry in (model, model.transformer):
            with pytest.raises(ValueError, match=message):
                entry.quantize(**kwargs)
    for entry in (model, model.transformer):
        assert entry.quantize(0) is entry
    assert qmod.quantize(model, 0) is model
    assert model.config.quantization_bit == 0
    assert not any(type(m).__name__ == "QuantizedLinear" for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_every_quantize_method_is_the_same_conversion_and_honours_its_arguments(float_dir):
    full = quiet_load(float_dir).quantize(8)
    core_only = quiet_load(float_dir)
    assert core_only.transformer.quantize(8) is core_only.transformer
    assert core_only.config.quantization_bit == 8
    ids = random_ids(seq=12)
    with torch.no_grad():
        assert torch.equal(core_only(ids).logits, full(ids).logits)
    # empty_init: allocated, not computed; a load fills them in
    empty = quiet_load(float_dir).quantize(8, empty_init=True)
    assert all(type(m).__name__ == "QuantizedLinear" for m in block_linears(empty).values())
    empty.load_state_dict(full.state_dict())
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, full(ids).logits)
    # device: where the quantized layers are computed and kept
    on_meta = quiet_load(float_dir).quantize(8, device="meta")
    assert all(m.weight.is_meta and m.weight_scale.is_meta for m in block_linears(on_meta).values())


def test_model_pack_unpack_and_the_ways_back_to_the_stored_format(float_dir):
    model = quiet_load(float_dir).quantize(4)
    layers = list(block_linears(model).values())
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    shapes = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    count, footprint = model.num_parameters(), model.get_memory_footprint()
    ids = random_ids(seq=12)
    with torch.no_grad():
        unpacked_logits = model(ids).logits
    assert model.pack_weights() is model
    assert all(m.is_packed and m.backend == "cpu-int4pack" for m in layers)
    # parameters() tells the truth while packed: the same names, shapes, dtypes, count and bytes
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == shapes
    assert model.num_parameters() == count and model.get_memory_footprint() >= footprint
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unpacked_logits, rtol=1e-4, atol=1e-4)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in stored.items()) and not any(m.is_packed for m in layers)
    for undo in (lambda m: m.unpack_weights(), lambda m: m.train(), lambda m: m.float(), lambda m: m.to("cpu")):
        model.eval().pack_weights()
        undo(model)
        assert not any(m.is_packed or m.scale_table is not None for m in layers)
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in stored.items())
        assert [id(p) for p in model.parameters()] == params  # unpacking puts the same Parameter objects back


_FRESH_PROCESS_CHILD = r"""
import os, sys, torch
from transformers import AutoModelForCausalLM
folder, io_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
package = type(model).__module__.rsplit(".", 1)[0]
lazy = [name for name in ("cpu_kernels", "cuda_kernels") if f"{package}.{name}" not in sys.modules]
qmod = sys.modules[package + ".quantization"]
ids = torch.load(io_file)["ids"]
with torch.no_grad():
    unpacked = model(ids).logits
    packed = model.pack_weights()(ids).logits
cache = os.path.dirname(sys.modules[type(model).__module__].__file__)
torch.save({"unpacked": unpacked, "packed": packed, "lazy": lazy, "backend": qmod.quantization_backend(model),
            "cached": sorted(f for f in os.listdir(cache) if f.endswith(".py")),
            "cuda_imported": f"{package}.cuda_kernels" in sys.modules}, io_file)
"""


def test_saved_quantized_model_loads_and_runs_in_a_fresh_process(float_dir, tmp_path):
    """save_pretrained writes every code file (the kernel modules too) and transformers copies them all into its
    module cache: the folder alone loads in a new process, with a fresh HF_HOME, and gives the same logits."""
    model = quiet_load(float_dir).quantize(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    for name in ("quantization.py", "cpu_kernels.py", "cpu_source.py", "cuda_kernels.py"):
        assert (tmp_path / "saved" / name).read_bytes() == (REPO / name).read_bytes(), name
    ids = random_ids(seq=12)
    with torch.no_grad():
        unpacked = model(ids).logits
        packed = model.pack_weights()(ids).logits
    io_file = tmp_path / "io.pt"
    torch.save({"ids": ids}, io_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CHATGLM_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CHILD, str(tmp_path / "saved"), str(io_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(io_file)
    assert {"quantization.py", "cpu_kernels.py", "cpu_source.py", "cuda_kernels.py",
            "configuration_chatglm.py"} <= set(got["cached"])
    assert got["lazy"] == ["cpu_kernels", "cuda_kernels"]  # loading imports no kernel module
    assert not got["cuda_imported"] and got["backend"] == "cpu-int4pack"
    torch.testing.assert_close(got["unpacked"], unpacked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["packed"], packed, rtol=1e-5, atol=1e-5)
