"""ChatGLM3 configuration.

Field names, order and defaults are those of the published ``configuration_chatglm.py`` so that
published ``config.json`` files (and the converters of vLLM / llama.cpp that read them) keep working.
Added on top: ``rope_ratio`` (the 32k/128k variants), ``original_rope`` (declared, informational),
``num_hidden_layers`` as an alias of ``num_layers`` (transformers' caches read it), ``quantize_output_layer``
(this package's optional quantized ``output_layer``; the original code cannot load such checkpoints), and validation.
"""
import os

from transformers import PretrainedConfig

SUPPORTED_QUANTIZATION_BITS = (0, 4, 8)
# The ``_name_or_path`` of the published config.json. Converters recognise ChatGLM3 by it (llama.cpp's
# convert_hf_to_gguf.py picks the ChatGLM3 SentencePiece vocabulary when it contains "THUDM/chatglm3-6b", and
# the GLM-4 path, which fails on these files, otherwise), so saved folders keep such a name.
PUBLISHED_NAME_OR_PATH = "THUDM/chatglm3-6b-base"
CONVERTER_MARK = "THUDM/chatglm3-6b"


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    # One value under two names: transformers (resize_token_embeddings, caches, exporters) uses the standard names,
    # the published config.json the original ones.
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under torchrun): the library's styles where the
    # layout is standard, and two of this package's (registered by modeling_chatglm.py) for the fused
    # ``query_key_value`` ([q | k | v], unequal parts): each rank keeps whole key/value groups with their query heads
    # and the attention module splits the projection with the local sizes. Embedding and output layer as
    # transformers shards Glm (vocabulary-parallel lookup, column-parallel head with gathered logits).
    base_model_tp_plan = {
        "embedding.word_embeddings": "embedding_rowwise",
        "encoder.layers.*.self_attention": "chatglm_attention",
        "encoder.layers.*.self_attention.query_key_value": "chatglm_qkv_colwise",
        "encoder.layers.*.self_attention.dense": "rowwise",
        "encoder.layers.*.mlp.dense_h_to_4h": "packed_colwise",  # [gate | up]: each rank a slice of both halves
        "encoder.layers.*.mlp.dense_4h_to_h": "rowwise",
        "output_layer": "colwise_gather_output",
    }
    # FSDP2 through transformers 5.x (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))``):
    # one unit per GLMBlock (freed after use), the embedding, and the final norm and output layer kept gathered.
    base_model_fsdp_plan = {
        "embedding": "free_full_weight",
        "encoder.layers.*": "free_full_weight",
        "encoder.final_layernorm": "keep_full_weight",
        "output_layer": "keep_full_weight",
    }

    def __init__(
        self,
        num_layers=28,
        padded_vocab_size=65024,
        hidden_size=4096,
        ffn_hidden_size=13696,
        kv_channels=128,
        num_attention_heads=32,
        seq_length=2048,
        hidden_dropout=0.0,
        classifier_dropout=None,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        rope_ratio=1,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        bias_dropout_fusion=True,
        multi_query_attention=False,
        multi_query_group_num=1,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        quantization_bit=0,
        quantize_output_layer=False,
        pre_seq_len=None,
        prefix_projection=False,
        original_rope=True,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rope_ratio = rope_ratio
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.quantization_bit = quantization_bit
        self.quantize_output_layer = quantize_output_layer
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.original_rope = original_rope
        # transformers 5 drops generation-ish kwargs it does not declare; keep them explicit.
        self.use_cache = use_cache
        # Validate before PretrainedConfig.__init__: transformers 5 runs its own validators there (comparing token
        # ids with vocab_size), which would fail with a bare TypeError on e.g. "padded_vocab_size": "128".
        self.validate_chatglm()
        if quantize_output_layer and tie_word_embeddings:
            raise ValueError("quantize_output_layer=true cannot be combined with tie_word_embeddings=true: the "
                             "output layer's weight is then the (unquantized) input embedding table")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def saved_name_or_path(self):
        """The ``_name_or_path`` written to config.json: the hub id the config was loaded from when it names a
        ChatGLM3-6B checkpoint (``THUDM/chatglm3-6b``, ``-base``, ``-32k``, ...), else the published base
        checkpoint's id. Never a local path (transformers 5 / 4.57 drop the field on save, 4.30 writes the local
        folder): either way the saved folder would no longer be recognised as ChatGLM3 by converters."""
        name = str(getattr(self, "_name_or_path", "") or "")
        if CONVERTER_MARK in name and not os.path.exists(name):
            return name
        return PUBLISHED_NAME_OR_PATH

    def to_diff_dict(self):
        """What ``save_pretrained`` / ``to_json_string`` write: the library's diff, plus ``_name_or_path`` as the
        published config.json carries it (see ``saved_name_or_path``)."""
        out = super().to_diff_dict()
        out["_name_or_path"] = self.saved_name_or_path()
        return out

    @property
    def num_key_value_heads(self):
        """Number of key/value heads the attention actually uses (what StaticCache and exporters read)."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, value):
        # Derived from multi_query_attention / multi_query_group_num; accept only the value it already has
        # (transformers may set it back when copying a config).
        if value != self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads is derived from multi_query_attention and multi_query_group_num "
                f"(= {self.num_key_value_heads}); set those instead of {value!r}")

    num_kv_heads = num_key_value_heads

    @property
    def head_dim(self):
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    def validate_chatglm(self):
        """Raise ``ValueError`` for values the model cannot be built with."""
        positive_ints = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size",
                         "num_attention_heads", "seq_length")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ChatGLMConfig.{name} must be a positive integer, got {value!r}")
        if self.kv_channels is not None and (
            isinstance(self.kv_channels, bool) or not isinstance(self.kv_channels, int) or self.kv_channels <= 0
            or self.kv_channels % 2
        ):
            raise ValueError(f"ChatGLMConfig.kv_channels must be a positive even integer, got {self.kv_channels!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) when kv_channels is not set")
        if self.multi_query_attention:
            g = self.multi_query_group_num
            if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
                raise ValueError(f"ChatGLMConfig.multi_query_group_num must be a positive integer, got {g!r}")
            if self.num_attention_heads % g:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                    f"multi_query_group_num ({g})")
        if self.quantization_bit not in SUPPORTED_QUANTIZATION_BITS:
            raise ValueError(
                f"ChatGLMConfig.quantization_bit must be one of {SUPPORTED_QUANTIZATION_BITS}, "
                f"got {self.quantization_bit!r}")
        if self.quantize_output_layer is True and not self.quantization_bit:
            raise ValueError("ChatGLMConfig.quantize_output_layer=true needs quantization_bit 4 or 8")
        if self.pre_seq_len is not None and (
            isinstance(self.pre_seq_len, bool) or not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0
        ):
            raise ValueError(f"ChatGLMConfig.pre_seq_len must be None or a positive integer, got {self.pre_seq_len!r}")
        if not isinstance(self.rope_ratio, (int, float)) or isinstance(self.rope_ratio, bool) or self.rope_ratio <= 0:
            raise ValueError(f"ChatGLMConfig.rope_ratio must be a positive number, got {self.rope_ratio!r}")
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"ChatGLMConfig.{name} must be a probability in [0, 1), got {value!r}")
        for name in ("rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear",
                     "add_qkv_bias", "multi_query_attention", "fp32_residual_connection", "prefix_projection",
                     "use_cache", "quantize_output_layer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ChatGLMConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.layernorm_epsilon, (int, float)) or self.layernorm_epsilon <= 0:
            raise ValueError(
                f"ChatGLMConfig.layernorm_epsilon must be a positive number, got {self.layernorm_epsilon!r}")
