"""Independent references for tests: transformers' own GlmForCausalLM built from a ChatGLM3 model's weights
(the same function under a key mapping written here, not imported from the package), and a left-padded batch."""
import torch


def chatglm_to_glm_state_dict(sd, cfg):
    """Independent key mapping ChatGLM3 -> transformers' Glm (written here, not imported from the package)."""
    q = cfg["num_attention_heads"] * cfg["kv_channels"]
    kv = cfg["multi_query_group_num"] * cfg["kv_channels"]
    out = {}
    for key, t in sd.items():
        k = key.replace("transformer.", "", 1)
        if k.endswith("inv_freq"):
            continue
        if k == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif k == "encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif k == "output_layer.weight":
            out["lm_head.weight"] = t
        else:
            k = k.replace("encoder.layers.", "model.layers.")
            if "query_key_value" in k:
                base, kind = k.rsplit(".", 1)
                base = base.replace("self_attention.query_key_value", "self_attn")
                qt, kt, vt = t.split([q, kv, kv], dim=0)
                out[f"{base}.q_proj.{kind}"], out[f"{base}.k_proj.{kind}"], out[f"{base}.v_proj.{kind}"] = qt, kt, vt
            else:
                k = (k.replace("self_attention.dense", "self_attn.o_proj")
                     .replace("mlp.dense_h_to_4h", "mlp.gate_up_proj")
                     .replace("mlp.dense_4h_to_h", "mlp.down_proj"))
                out[k] = t
    return out


def build_glm(model):
    from transformers import GlmConfig, GlmForCausalLM

    c = model.config
    kwargs = dict(
        vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.multi_query_group_num, head_dim=c.kv_channels, partial_rotary_factor=0.5,
        rms_norm_eps=c.layernorm_epsilon, attention_bias=True, max_position_embeddings=c.seq_length,
        pad_token_id=0, eos_token_id=2, tie_word_embeddings=False,
    )
    theta = 10000.0 * c.rope_ratio
    cfg = GlmConfig(**kwargs, rope_theta=theta)
    if getattr(cfg, "rope_parameters", None) and cfg.rope_parameters.get("rope_theta") != theta:  # transformers 5
        cfg = GlmConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                   "partial_rotary_factor": 0.5})
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == theta
    glm = GlmForCausalLM(cfg).eval()
    sd = chatglm_to_glm_state_dict(model.state_dict(), c.to_dict())
    missing, unexpected = glm.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return glm


def left_padded_batch():
    ids = torch.tensor([[0, 0, 0, 5, 9, 33, 17, 4], [7, 8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 0, 0, 3, 99]])
    mask = (torch.arange(8)[None, :] >= torch.tensor([3, 0, 6])[:, None]).long()
    return ids, mask
