"""CPU bf16 inference: block linears and the output layer move their weight into oneDNN's prepacked layout on
the first bf16 forward without autograd. Checked here: same outputs, no second copy of the weights, and every
way back to the dense weight (state_dict, save/load, training, dtype and device moves, quantization)."""
import copy

import pytest
import torch

from conftest import load_model, make_model_dir


def _modeling(model):
    import sys

    return sys.modules[type(model).__module__]


def _linears(model):
    mod = _modeling(model)
    return [m for m in model.modules() if isinstance(m, mod.Linear)]


@pytest.fixture()
def bf16_pair(tmp_path):
    folder = make_model_dir(tmp_path, hidden_size=128, ffn_hidden_size=256, kv_channels=32)
    model = load_model(folder).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    mod = _modeling(model)
    if not mod._cpu_prepack_enabled():
        pytest.skip("no oneDNN bf16 prepacking on this machine/torch")
    return folder, model, ref


def _dense_forward(model, ids):
    mod = _modeling(model)
    old = mod._CPU_PREPACK
    mod._CPU_PREPACK = False
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits.float()
    finally:
        mod._CPU_PREPACK = old


def test_prepacked_matches_dense_and_frees_dense_weight(bf16_pair):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (2, 9))
    expected = _dense_forward(ref, ids)
    before = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        got = model(input_ids=ids).logits.float()
    layers = _linears(model)
    assert layers and all(m._is_packed() for m in layers)
    assert all(m._parameters["weight"].numel() == 0 for m in layers)  # no second copy
    assert sum(p.numel() for p in model.parameters()) < before
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    # generate works and gives the dense model's greedy tokens
    with torch.inference_mode():
        out = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    mod = _modeling(ref)
    mod._CPU_PREPACK = False
    try:
        with torch.no_grad():
            out_ref = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
    finally:
        mod._CPU_PREPACK = None
    assert out.tolist() == out_ref.tolist()
    # state_dict gives the dense weights back bit for bit
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    # Reading .weight from outside (PEFT merges, get_output_embeddings, user code) gives the dense weight back.
    with torch.inference_mode():
        model(input_ids=ids)
    assert all(m._is_packed() for m in layers)
    for packed, dense in zip(layers, _linears(ref)):
        assert torch.equal(packed.weight, dense.weight)
    assert not any(m._is_packed() for m in layers)


def test_ways_back_to_dense(bf16_pair, tmp_path):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (1, 5))
    params_before = {n: id(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        model(input_ids=ids)
    # save / load round trip while packed
    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved", dtype=torch.bfloat16) if _has_dtype_kw() else load_model(
        tmp_path / "saved", torch_dtype=torch.bfloat16)
    for (k, a), b in zip(again.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    # training mode restores the dense weights in the same Parameter objects (optimizers keep working)
    model.train()
    assert not any(m._is_packed() for m in _linears(model))
    assert {n: id(p) for n, p in model.named_parameters()} == params_before
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.transformer.output_layer.weight.grad is not None
    model.zero_grad()
    # grad-enabled forward in eval mode: dense path
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(m._is_packed() for m in _linears(model))
    out = model(input_ids=ids).logits  # grad enabled -> unpacks
    assert out.requires_grad and not any(m._is_packed() for m in _linears(model))
    # dtype moves
    with torch.no_grad():
        model(input_ids=ids)
    model.float()
    assert all(m.weight.dtype == torch.float32 and m.weight.numel() for m in _linears(model))
    with torch.no_grad():
        model(input_ids=ids)  # fp32: never packed
    assert not any(m._is_packed() for m in _linears(model))


def test_load_state_dict_and_assignment_replace_packed(bf16_pair):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
    sd = {k: torch.zeros_like(v) if k.endswith("output_layer.weight") else v for k, v in ref.state_dict().items()}
    model.load_state_dict(sd)
    with torch.no_grad():
        assert model(input_ids=ids).logits.abs().max() == 0
    with torch.no_grad():
        model.transformer.output_layer.weight = torch.nn.Parameter(ref.transformer.output_layer.weight.clone())
        torch.testing.assert_close(model(input_ids=ids).logits.float(), _dense_forward(ref, ids), rtol=2e-2,
                                   atol=2e-2)


def test_quantize_after_packed_inference(bf16_pair):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
    try:
        model.quantize(8)
        ref.quantize(8)
    except NotImplementedError:
        pytest.skip("quantization not available")
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_opt_out(bf16_pair, monkeypatch):
    _, model, _ = bf16_pair
    mod = _modeling(model)
    monkeypatch.setattr(mod, "_CPU_PREPACK", False)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 5)))
    assert not any(m._is_packed() for m in _linears(model))


def _has_dtype_kw():
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def test_deepcopy_pickle_and_footprint(bf16_pair):
    import io

    _, model, ref = bf16_pair
    footprint = model.get_memory_footprint()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 5)))
    assert model.get_memory_footprint() == footprint  # the packed buffers replace the dense weights
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    for (k, a), b in zip(clone.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
