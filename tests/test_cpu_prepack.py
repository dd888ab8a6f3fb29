"""CPU bf16 inference: ``generate`` (through ``model.pack_weights()``) binds the block linears and the output layer
to this package's bf16 decode kernel (``gemv``: the weights stay as they are) or, where that kernel does not build,
converts them to oneDNN's prepacked layout (``onednn``), explicitly. Both are checked here against a dense copy of
the same model: same outputs and tokens, the same parameters (names, shapes, counts, memory footprint) before and
after, no second copy of the weights, and every way back to the dense weights (state_dict, save/load, training,
autograd, dtype moves, quantization, copies and pickles)."""
import copy
import io

import pytest
import torch

from support import load_model, make_model_dir


def _linear_module(model):  # linear.py as the model's remote code imported it
    import sys

    return sys.modules[type(model).__module__.rpartition(".")[0] + ".linear"]


def _linears(model):
    mod = _linear_module(model)
    return [m for m in model.modules() if isinstance(m, mod.Linear)]


def _summary(model):
    return [(n, tuple(p.shape), p.dtype, p.numel()) for n, p in model.named_parameters()]


@pytest.fixture(params=["gemv", "onednn"])
def bf16_pair(tmp_path, request, monkeypatch):
    folder = make_model_dir(tmp_path, hidden_size=128, ffn_hidden_size=256, kv_channels=32)
    model = load_model(folder).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    mod = _linear_module(model)
    if request.param == "gemv":
        if mod.cpu_kernel("gemv") is None:
            pytest.skip("this package's CPU kernels do not build here (x86-64 with AVX-512 F/BW/VNNI and a C compiler)")
    else:
        monkeypatch.setitem(mod._CPU_KERNELS, "gemv", False)  # as on a machine where they do not build
        if not mod.cpu_prepack_enabled():
            pytest.skip("no oneDNN bf16 prepacking on this machine/torch")
    return folder, model, ref



def _assert_bf16_close(got, expected):
    """Two bf16 computations of the same logits (different kernels, so different summation order) agree to a couple of
    roundings at the logits' scale: 2 ** -7 of the largest |logit| is two bf16 ulps there. A fixed 2e-2 sits below one
    ulp of logits above 4 and failed now and then on random inputs; a wrong kernel is off by O(1)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=2 ** -7 * expected.abs().max().item())


def _packed(model):
    return [m.is_packed for m in _linears(model)]


def test_generate_packs_explicitly_and_parameters_stay_the_same(bf16_pair):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (2, 9))
    summary, count, footprint = _summary(model), model.num_parameters(), model.get_memory_footprint()
    pointers = [m.weight.data_ptr() for m in _linears(model)]
    with torch.inference_mode():
        expected = ref(input_ids=ids).logits.float()
        model(input_ids=ids)
    assert not any(_packed(model))  # a forward changes nothing
    with torch.inference_mode():
        out = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert _packed(model) and all(_packed(model))
    assert _summary(model) == summary and model.num_parameters() == count
    assert model.get_memory_footprint() == footprint
    linears = _linears(model)
    if all(m.gemv is not None for m in linears):  # the weights are untouched
        assert all(type(m.weight) is torch.nn.Parameter and m.weight.data_ptr() == p
                   for m, p in zip(linears, pointers))
    else:
        assert all(m.weight.original.numel() == 0 for m in linears)  # no second copy
    with torch.inference_mode():
        got = model(input_ids=ids).logits.float()  # 9 rows: the GEMM path
        step = model(input_ids=ids[:1, -1:], position_ids=torch.tensor([[8]])).logits.float()  # 1 row: the GEMV
        step_ref = ref(input_ids=ids[:1, -1:], position_ids=torch.tensor([[8]])).logits.float()
    _assert_bf16_close(got, expected)
    _assert_bf16_close(step, step_ref)
    with pytest.MonkeyPatch.context() as mp:  # the reference: no binding at all
        mp.setenv("CHATGLM_CPU_PREPACK", "0")
        with torch.inference_mode():
            out_ref = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert not any(_packed(ref))
    assert out.tolist() == out_ref.tolist()


def _assert_same_weights(model, ref):
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k


def test_ways_back_to_dense(bf16_pair, tmp_path):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (1, 5))
    params_before = {n: id(p) for n, p in model.named_parameters()}
    model.pack_weights()
    _assert_same_weights(model, ref)  # state_dict unpacks, bit for bit
    assert not any(_packed(model)) and {n: id(p) for n, p in model.named_parameters()} == params_before
    model.pack_weights()
    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved").to(torch.bfloat16)
    _assert_same_weights(again, ref)
    # training restores the dense weights in the same Parameter objects (optimizers keep working)
    model.pack_weights()
    model.train()
    assert not any(_packed(model)) and {n: id(p) for n, p in model.named_parameters()} == params_before
    assert all(p.requires_grad for p in model.parameters())
    model.eval().pack_weights()
    out = model(input_ids=ids, labels=ids)  # autograd on: dense again, gradients flow
    out.loss.backward()
    assert not any(_packed(model)) and model.transformer.output_layer.weight.grad is not None
    model.zero_grad()
    model.pack_weights()
    model.float()
    assert not any(_packed(model))
    assert all(m.weight.dtype == torch.float32 and m.weight.numel() for m in _linears(model))
    model.pack_weights()  # fp32: nothing to pack
    assert not any(_packed(model))
    model.to(torch.bfloat16).pack_weights().unpack_weights()
    assert not any(_packed(model))


def test_load_state_dict_and_assignment_replace_packed(bf16_pair):
    _, model, ref = bf16_pair
    ids = torch.randint(3, 128, (1, 5))
    model.pack_weights()
    sd = {k: torch.zeros_like(v) if k.endswith("output_layer.weight") else v for k, v in ref.state_dict().items()}
    model.load_state_dict(sd)
    with torch.no_grad():
        assert model(input_ids=ids).logits.abs().max() == 0
    model.pack_weights()
    model.transformer.output_layer.weight = torch.nn.Parameter(ref.transformer.output_layer.weight.clone())
    with torch.no_grad():
        _assert_bf16_close(model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float())


def test_quantize_and_output_embeddings_after_packing(bf16_pair):
    _, model, ref = bf16_pair
    model.pack_weights()
    assert torch.equal(model.get_output_embeddings().weight, ref.get_output_embeddings().weight)
    model.quantize(8)
    ref.quantize(8)
    _assert_same_weights(model, ref)


def test_opt_out(bf16_pair, monkeypatch):
    _, model, _ = bf16_pair
    monkeypatch.setenv("CHATGLM_CPU_PREPACK", "0")
    model.pack_weights()
    assert not any(_packed(model))


def test_deepcopy_and_pickle_of_a_packed_model(bf16_pair):
    _, model, ref = bf16_pair
    model.pack_weights()
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    assert all(_packed(model))  # copying does not change the original
    _assert_same_weights(clone, ref)
    buf.seek(0)
    _assert_same_weights(torch.load(buf, weights_only=False), ref)


def test_adapter_wrapped_layers_stay_dense(bf16_pair):
    peft = pytest.importorskip("peft")
    _, model, ref = bf16_pair
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query_key_value"], lora_dropout=0.0))
    with torch.inference_mode():
        lora.generate(input_ids=torch.randint(3, 128, (1, 5)), max_new_tokens=2, do_sample=False)
    packed = {n: m.is_packed for n, m in model.named_modules() if isinstance(m, _linear_module(model).Linear)}
    assert not any(v for n, v in packed.items() if "query_key_value" in n)
    assert any(v for n, v in packed.items() if "dense_h_to_4h" in n)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        before = lora(input_ids=ids).logits.float()
        merged = lora.merge_and_unload()  # merges into the dense base layers
        _assert_bf16_close(merged(input_ids=ids).logits.float(), before)


def test_bound_decode_kernel_takes_only_what_fits(bf16_pair):
    """The bf16 decode binding must give F.linear's results for 1-4 rows, hand larger inputs to F.linear, and reject
    a wrong input width as F.linear does (never read past the input)."""
    _, model, ref = bf16_pair
    model.pack_weights()
    layer, dense = model.transformer.encoder.layers[0].self_attention.query_key_value, \
        ref.transformer.encoder.layers[0].self_attention.query_key_value
    with torch.no_grad():
        for rows in (1, 3, 4, 5, 9):
            x = torch.randn(rows, layer.in_features).bfloat16()
            torch.testing.assert_close(layer(x).float(), torch.nn.functional.linear(
                x.double(), dense.weight.double(), dense.bias.double()).float(), rtol=1e-2, atol=1e-2)
        with pytest.raises(RuntimeError):
            layer(torch.randn(1, layer.in_features - 32).bfloat16())
    assert layer.is_packed
