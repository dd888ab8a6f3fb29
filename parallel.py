"""Tensor parallelism for ChatGLM3 (``config.base_model_tp_plan``): this package's parallel styles for the fused
``query_key_value`` ([q | k | v], unequal parts: each rank keeps whole key/value groups with their query heads)
and the fused gate/up projection, their registration in transformers' style registry (on the first
``from_pretrained`` that asks for parallelism), the degree checks, and gathering shards back to the published
layout for saving. Imported by modeling_chatglm.py."""
import functools
import re

import torch
from torch import nn

from .configuration_chatglm import ChatGLMConfig

def _distributed_rank():
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_tensor_parallel(config, tp_size):
    """``ValueError`` unless a model with ``config`` can be split over ``tp_size`` tensor-parallel ranks."""
    if tp_size <= 1:
        return
    if config.quantization_bit:
        raise ValueError(
            f"tensor parallelism does not support quantized ChatGLM models (quantization_bit="
            f"{config.quantization_bit}): load the float checkpoint with tp_plan, or the quantized one in one process")
    groups, heads = config.num_key_value_heads, config.num_attention_heads
    for what, count in (("key/value groups (multi_query_group_num)", groups), ("attention heads", heads),
                        ("MLP features (ffn_hidden_size)", config.ffn_hidden_size)):
        if count % tp_size:
            raise ValueError(
                f"tensor parallelism over {tp_size} ranks: the {count} {what} do not divide by {tp_size} (each rank "
                f"holds whole key/value groups with their query heads); use a degree that divides {groups}")
    if config.add_bias_linear:
        raise ValueError("tensor parallelism does not support add_bias_linear=true (the fused gate/up bias)")
    if config.pre_seq_len is not None:
        raise ValueError("tensor parallelism does not support p-tuning prefixes (pre_seq_len)")


def _qkv_local_rows(config, rank, tp_size):
    """Rows of the fused ``[q | k | v]`` projection that rank ``rank`` keeps: its query heads, then its key and its
    value groups (query head ``h`` attends with group ``h // (heads / groups)``, so these belong together)."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    lq, lkv = q // tp_size, kv // tp_size
    return ((rank * lq, (rank + 1) * lq), (q + rank * lkv, q + (rank + 1) * lkv),
            (q + kv + rank * lkv, q + kv + (rank + 1) * lkv))


def _setup_tensor_parallel_attention(attention, rank, tp_size, group):
    """Give a ``SelfAttention`` its local split sizes and tell its ``query_key_value`` which rows to keep."""
    check_tensor_parallel(attention.config, tp_size)
    attention.q_size = attention.config.num_attention_heads * attention.head_dim // tp_size
    attention.kv_size = attention.config.num_key_value_heads * attention.head_dim // tp_size
    qkv = attention.query_key_value
    full_rows = (attention.config.num_attention_heads + 2 * attention.config.num_key_value_heads) * attention.head_dim
    qkv._chatglm_tp = dict(rows=_qkv_local_rows(attention.config, rank, tp_size), tp_size=tp_size, group=group,
                           full_rows=full_rows)
    qkv.prepack = False


def shard_fused_qkv(linear):
    """Cut a loaded, whole ``query_key_value`` down to this rank's rows (no-op when already cut or not yet loaded).
    DTensor placements cannot express a split into unequal parts, so the parameter becomes a plain local tensor."""
    tp = getattr(linear, "_chatglm_tp", None)
    if tp is None:
        return
    with torch.no_grad():
        for name in ("weight", "bias"):
            param = linear._parameters.get(name)
            if param is None or param.is_meta or param.shape[0] != tp["full_rows"]:
                continue
            local = torch.cat([param[a:b] for a, b in tp["rows"]]).contiguous()
            linear._parameters[name] = nn.Parameter(local, requires_grad=param.requires_grad)


def gather_fused_qkv(linear, prefix, state_dict):
    """Replace a cut ``query_key_value``'s entries in ``state_dict`` with the whole tensors in the published layout
    (every rank must call this: it all-gathers)."""
    import torch.distributed as dist

    tp = getattr(linear, "_chatglm_tp", None)
    if tp is None:
        return
    for name in ("weight", "bias"):
        param = linear._parameters.get(name)
        if param is None or param.shape[0] == tp["full_rows"]:
            continue
        local = param.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(tp["tp_size"])]
        dist.all_gather(parts, local, group=tp["group"])
        sizes = [b - a for a, b in tp["rows"]]
        pieces = [part.split(sizes) for part in parts]  # per rank: (q_r, k_r, v_r)
        state_dict[prefix + name] = torch.cat([p[i] for i in range(3) for p in pieces]).cpu()


def gather_packed_gate_up(linear, prefix, state_dict):
    """transformers 4.5x marks its packed (gate | up) shards as plain contiguous shards, so their ``full_tensor``
    is ``[gate_0 | up_0 | gate_1 | up_1 ...]``: put the published ``[gate | up]`` in ``state_dict`` instead (5.x
    records the packing, ``_StridedShard``, and gathers it right)."""
    weight = linear._parameters.get("weight")
    placements = getattr(weight, "placements", None)
    if not placements or type(placements[0]).__name__ != "Shard":
        return
    full = weight.full_tensor()
    tp = weight.device_mesh.size()
    state_dict[prefix + "weight"] = full.view(tp, 2, -1, full.shape[-1]).transpose(0, 1).reshape(full.shape).cpu()


def _finish_tensor_parallel(model):
    """After a tensor-parallel load: cut the fused projections, and keep the bf16 CPU prepacking off (the library
    swaps sharded weights in and out around each forward)."""
    cut = False
    for module in model.modules():
        if getattr(module, "_chatglm_tp", None) is not None:
            shard_fused_qkv(module)
            cut = True
    if cut:
        for module in model.modules():
            if hasattr(module, "prepack"):  # modeling's Linear: no oneDNN packing of local shards
                module.prepack = False


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the gradient summed over the tensor-parallel group (a replicated input feeding a
    column-parallel projection gets a partial gradient on each rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@functools.lru_cache(maxsize=None)
def register_tensor_parallel_styles():
    """Register this package's tensor-parallel styles with transformers' style registry, once. ``from_pretrained``
    calls it when a load asks for parallelism, so importing the model code leaves the library's registry alone.
    Returns whether this transformers has such a registry (5.x; 4.5x with torch >= 2.5)."""
    if not torch.distributed.is_available():
        return False
    try:  # transformers 5.x: DTensor tensor parallelism
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
    except ImportError:
        return _register_tensor_parallel_styles_457()

    class ChatGLMAttentionParallel(TensorParallelLayer):
        """``SelfAttention``: checks the degree, sets the local head split; its children carry the collectives."""

        def install_forward(self, module, mesh, **kwargs):  # 5.25+ passes config=, mesh_manager=
            _setup_tensor_parallel_attention(module, mesh.get_local_rank(), mesh.size(), mesh.get_group())
            return module

    class ChatGLMQKVColwise(TensorParallelLayer):
        """``query_key_value``: loaded whole, then cut to this rank's ``[q_r | k_r | v_r]`` rows (``from_pretrained``
        calls ``shard_fused_qkv`` once the weights are in). Input replicated, output local."""

        def install_forward(self, module, mesh, **kwargs):  # 5.25+ passes config=, mesh_manager=
            forward = module.forward

            def tp_forward(x, *args, **kwargs):
                shard_fused_qkv(module)
                if torch.is_grad_enabled() and x.requires_grad:
                    x = _AllReduceGrad.apply(x, module._chatglm_tp["group"])
                return forward(x, *args, **kwargs)

            module.forward = tp_forward
            return module

    ALL_PARALLEL_STYLES.register("chatglm_attention", ChatGLMAttentionParallel())
    ALL_PARALLEL_STYLES.register("chatglm_qkv_colwise", ChatGLMQKVColwise())
    return True


def _register_tensor_parallel_styles_457():
    """transformers 4.5x: hook-based tensor parallelism whose styles slice each checkpoint tensor
    (``partition_tensor``)."""
    try:
        from transformers.integrations import tensor_parallel as tp457
    except ImportError:
        return False
    styles = tp457.ALL_PARALLEL_STYLES
    if not hasattr(tp457.TensorParallelLayer, "partition_tensor") or "colwise" not in dict(styles._global_mapping):
        return False  # torch < 2.5: the library registers no styles

    class ChatGLMAttentionParallel(tp457.TensorParallelLayer):
        """``SelfAttention``: checks the degree, sets the local head split (no hooks of its own)."""

        def partition_tensor(self, param, *args, **kwargs):  # it has no parameters of its own
            raise NotImplementedError

        def prepare_module_tp(self, module, device_mesh):
            _setup_tensor_parallel_attention(module, device_mesh.get_local_rank(), device_mesh.size(),
                                             device_mesh.get_group())

    class ChatGLMQKVColwise(tp457.TensorParallelLayer):
        """``query_key_value``: loaded whole (a plain tensor), cut to this rank's rows after loading; the replicated
        input's gradient is summed over the ranks."""

        def partition_tensor(self, param, empty_param, param_type, param_casting_dtype, to_contiguous, rank,
                             device_mesh):
            return nn.Parameter(param[...].to(param_casting_dtype).contiguous(),
                                requires_grad=empty_param.is_floating_point())

        def prepare_module_tp(self, module, device_mesh):
            def pre_hook(mod, inputs):
                shard_fused_qkv(mod)
                x = inputs[0]
                if torch.is_grad_enabled() and x.requires_grad:
                    return (_AllReduceGrad.apply(x, mod._chatglm_tp["group"]),) + tuple(inputs[1:])
                return None

            module.register_forward_pre_hook(pre_hook)

    class PackedColwise(tp457.ColwiseParallel):
        """A linear's fused ``[gate | up]`` output rows: each rank a slice of both halves (this version's own packed
        style slices the last-but-one dimension, for 3-d expert weights)."""

        def partition_tensor(self, param, empty_param, param_type, param_casting_dtype, to_contiguous, rank,
                             device_mesh):
            half, tp = empty_param.shape[0] // 2, device_mesh.size()
            rows = [(h * half + rank * half // tp, h * half + (rank + 1) * half // tp) for h in range(2)]
            local = torch.cat([param[a:b] for a, b in rows]).to(param_casting_dtype).contiguous()
            local = tp457.DTensor.from_local(local, device_mesh, [tp457.Shard(0 if param_type != "bias" else -1)],
                                             run_check=False, shape=empty_param.size(), stride=empty_param.stride())
            return nn.Parameter(local, requires_grad=local.is_floating_point())

    styles.register("chatglm_attention", ChatGLMAttentionParallel())
    styles.register("chatglm_qkv_colwise", ChatGLMQKVColwise())
    # The 5.x names the plan uses, with this version's implementations (only where this version lacks them).
    for name, style in (("embedding_rowwise", tp457.RowwiseParallel(input_layouts=tp457.Replicate())),
                        ("packed_colwise", PackedColwise()),
                        ("colwise_gather_output", tp457.ColwiseParallel(output_layouts=tp457.Replicate()))):
        if name not in dict(styles._global_mapping):
            styles.register(name, style)
    # 4.5x matches plan keys after turning every digit run into "*" (dense_h_to_4h -> dense_h_to_*h).
    ChatGLMConfig.base_model_tp_plan = {
        re.sub(r"\d+", "*", key): style for key, style in ChatGLMConfig.base_model_tp_plan.items()}
    return True
