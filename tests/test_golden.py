"""Golden outputs of the ORIGINAL ChatGLM3 modeling code (../shared/reference, from chatglm.cpp's tests),
reproduced through the real trust_remote_code loading path."""
import numpy as np
import pytest
import torch

from support import SHARED_REFERENCE, load_model, write_code, write_config

GOLDEN_CONFIG = dict(
    hidden_size=32, num_attention_heads=8, num_layers=1, padded_vocab_size=5, multi_query_group_num=2,
    ffn_hidden_size=48, kv_channels=4, seq_length=8192, torch_dtype="float32",
)


def _read(buf, offset, dtype, shape):
    count = int(np.prod(shape))
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
    return torch.from_numpy(arr.copy()), offset + arr.nbytes


def _load_golden(name, pre_seq_len=None):
    path = SHARED_REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data {path} not available")
    buf = path.read_bytes()
    off = 0
    tensors = {}
    if pre_seq_len:
        prefix, off = _read(buf, off, np.float16, (2, 2, pre_seq_len, 4))  # [layers*2, groups, pre, d]
        # stored = embedding.weight.view(pre, 2, 2, 4).permute(1, 2, 0, 3); invert it
        tensors["transformer.prefix_encoder.embedding.weight"] = prefix.float().permute(2, 0, 1, 3).reshape(
            pre_seq_len, 16)
    specs = [
        ("transformer.embedding.word_embeddings.weight", (5, 32)),
        ("transformer.encoder.layers.0.input_layernorm.weight", (32,)),
        ("transformer.encoder.layers.0.self_attention.query_key_value.weight", (48, 32)),
        ("transformer.encoder.layers.0.self_attention.query_key_value.bias", (48,)),
        ("transformer.encoder.layers.0.self_attention.dense.weight", (32, 32)),
        ("transformer.encoder.layers.0.post_attention_layernorm.weight", (32,)),
        ("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", (96, 32)),
        ("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight", (32, 48)),
        ("transformer.encoder.final_layernorm.weight", (32,)),
    ]
    for key, shape in specs:
        tensors[key], off = _read(buf, off, np.float32, shape)
    x1, off = _read(buf, off, np.int32, (3,))
    y1, off = _read(buf, off, np.float32, (3, 1, 32))
    x2, off = _read(buf, off, np.int32, (1,))
    y2, off = _read(buf, off, np.float32, (1, 1, 32))
    x3, off = _read(buf, off, np.int32, (1,))
    y3, off = _read(buf, off, np.float32, (1, 1, 32))
    assert off == len(buf)
    return tensors, [(x1, y1), (x2, y2), (x3, y3)]


@pytest.mark.parametrize("name,pre_seq_len,atol", [
    ("glm3_model.data", None, 1e-5),
    ("glm3_ptuning_v2_model.data", 5, 5e-4),
])
def test_golden_hidden_states(tmp_path, name, pre_seq_len, atol):
    from safetensors.torch import save_file

    tensors, steps = _load_golden(name, pre_seq_len)
    write_code(tmp_path)
    extra = {"pre_seq_len": pre_seq_len} if pre_seq_len else {}
    write_config(tmp_path, **GOLDEN_CONFIG, **extra)
    tensors["transformer.output_layer.weight"] = torch.zeros(5, 32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    model = load_model(tmp_path, cls="AutoModel")
    assert model.transformer.embedding.word_embeddings.weight.dtype == torch.float32
    past = None
    position = 0
    with torch.no_grad():
        for x, y in steps:
            ids = x.long()[None, :]
            positions = torch.arange(position, position + ids.shape[1])[None, :]
            out = model.transformer(input_ids=ids, position_ids=positions, past_key_values=past, use_cache=True,
                                    return_dict=True)
            assert out.last_hidden_state.shape == y.shape  # seq-first [seq, batch, hidden]
            torch.testing.assert_close(out.last_hidden_state, y, atol=atol, rtol=0)
            past = out[1]
            position += ids.shape[1]
