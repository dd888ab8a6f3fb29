"""Checkpoint loading and saving for the ChatGLM3 models (a mixin of ``ChatGLMPreTrainedModel``): transformers'
``from_pretrained`` / ``save_pretrained`` plus the checks that a load never returns a partly random or garbage
model, and a saved folder that loads again with ``trust_remote_code=True``."""
import copy
import json
import os
import re
import shutil
import tempfile
import zipfile

import torch
from transformers import PretrainedConfig

from .parallel import (
    _distributed_rank,
    _finish_tensor_parallel,
    gather_fused_qkv,
    gather_packed_gate_up,
    register_tensor_parallel_styles,
)
from .quantization import check_quantized_load

# Weight files a previous save_pretrained may have left (both formats, single or sharded, plus their indexes).
_WEIGHT_FILE_RE = re.compile(
    r"(?:model|pytorch_model)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)|(?:model\.safetensors|pytorch_model\.bin)"
    r"\.index\.json")
# Weights a checkpoint may lack: the rotary buffer (recomputed), new p-tuning prefixes, a fresh classification head.
_MISSING_OK_RE = re.compile(r"(?:^|\.)(?:rotary_pos_emb\.inv_freq|prefix_encoder\..+|classifier_head\..+)$")
# from_pretrained arguments that name the configuration source's hub files, and those that load another format.
_HUB_KWARGS = ("cache_dir", "force_download", "resume_download", "proxies", "token", "use_auth_token", "revision",
               "local_files_only", "subfolder", "_commit_hash")
_OTHER_SOURCES = ("gguf_file", "variant", "state_dict", "from_tf", "from_flax")
REMOTE_CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "chat.py", "linear.py", "masks.py",
                     "generation.py", "compat.py", "loading.py", "parallel.py", "quantization.py", "cpu_kernels.py",
                     "cpu_source.py", "cuda_kernels.py", "tokenization_chatglm.py")


def _check_scales_declared(config, scale_keys):
    """ValueError for quantized tensors (``weight_scale``) that the config does not declare: transformers would
    drop the scales and read the int8 weights as float weights."""
    scales = sorted(scale_keys)
    if scales and not config.quantization_bit:
        raise ValueError(
            f"the checkpoint is quantized (it has {scales[0]} and {len(scales) - 1} more weight_scale tensors), "
            f"but config.quantization_bit is 0: its int8 weights would be used as float weights. Set "
            f"quantization_bit (4 or 8) in config.json to the checkpoint's width.")
    head_scales = [k for k in scales if k.endswith("output_layer.weight_scale")]
    if head_scales and not config.quantize_output_layer:
        raise ValueError(
            f"the checkpoint's output_layer is quantized (it has {head_scales[0]}), but "
            f"config.quantize_output_layer is false: its int8 weight would be used as a float weight. Set "
            f"quantize_output_layer to true in config.json.")


def _safetensors_shapes(path):
    """{name: shape} from a safetensors file's header (no tensor data read); None if it has no valid header
    (the library's loader then reports the damage)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        if length > size - 8:
            return None
        try:
            header = json.loads(f.read(length))
        except ValueError:  # not JSON: a damaged file
            return None
    if not isinstance(header, dict):
        return None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "shape" in v}


def _bin_shapes(path):
    """{name: shape} from a torch zip checkpoint, memory-mapped (no tensor data read); None for another format."""
    if not zipfile.is_zipfile(path):
        return None
    state_dict = torch.load(path, map_location="meta", mmap=True, weights_only=True)
    return {k: list(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _local_checkpoint_shapes(source, kwargs):
    """{name: shape} of every tensor of the checkpoint ``from_pretrained`` would load from a local folder; None
    where it is not a plain local checkpoint (a hub id, gguf, a variant, a given state dict) or one of its files
    is missing or damaged: the library's loader reports those."""
    if not isinstance(source, (str, os.PathLike)) or any(kwargs.get(k) for k in _OTHER_SOURCES):
        return None
    folder = os.path.join(source, kwargs.get("subfolder") or "")
    if not os.path.isdir(folder):
        return None
    kinds = (("model.safetensors", _safetensors_shapes), ("pytorch_model.bin", _bin_shapes))
    for name, read in kinds[1:] if kwargs.get("use_safetensors") is False else kinds:
        files = [os.path.join(folder, name)]
        index = files[0] + ".index.json"
        if not os.path.isfile(files[0]) and os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map")
            except (ValueError, AttributeError):  # not JSON, or not an object
                return None
            if not isinstance(weight_map, dict):
                return None
            files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
        if all(os.path.isfile(f) for f in files):
            shapes = {}
            for path in files:
                part = read(path)
                if part is None:
                    return None
                shapes.update(part)
            return shapes
        if os.path.isfile(index) or os.path.isfile(files[0]):
            return None  # a shard is missing
    return None


class CheckpointIO:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The library's loader, plus checks so that it never returns a partly random or garbage model:

        - a checkpoint whose tensors do not fit ``quantization_bit`` (int8 vs int4 shapes, or a float checkpoint
          with ``quantization_bit`` set) raises a ``ValueError`` saying what was expected;
        - a checkpoint lacking weights the model needs (truncated shards, wrong ``num_layers``) raises a
          ``ValueError`` naming them (``allow_missing_weights=True`` opts out);
        - p-tuning v2 freezing is re-applied (transformers 5 re-creates loaded parameters as trainable).
        """
        if any(kwargs.get(k) is not None for k in ("tp_plan", "tp_size", "distributed_config", "device_mesh")):
            register_tensor_parallel_styles()
        want_info = kwargs.pop("output_loading_info", False)
        allow_missing = kwargs.pop("allow_missing_weights", False)
        kwargs = cls._with_config(args, kwargs)
        config = kwargs["config"]
        tensors = _local_checkpoint_shapes(args[0] if args else kwargs.get("pretrained_model_name_or_path"), kwargs)
        if tensors is not None:  # a local checkpoint: check that it fits the config before loading it
            _check_scales_declared(config, [k for k in tensors if k.endswith(".weight_scale")])
            if config.quantization_bit:
                cls._check_quantized_shapes(config, tensors)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except EOFError as exc:  # torch.load of an empty .bin shard: a bare EOFError() without a message
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(f"a weight file in {where!r} is empty or truncated (EOFError while reading it)") from exc
        check_quantized_load(model, info)  # a hub checkpoint (not checked above), or a layer quantized on load
        _check_scales_declared(model.config, [k for k in (info.get("unexpected_keys") or ())
                                              if k.endswith(".weight_scale")])
        missing = sorted(k for k in (info.get("missing_keys") or ()) if not _MISSING_OK_RE.search(k))
        if missing and not allow_missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weight(s) this model needs: {shown}. The weight files are "
                f"incomplete or do not match config.json (num_layers, hidden_size, ...); refusing to return a "
                f"partly random model (pass allow_missing_weights=True to load anyway).")
        for module in model.modules():
            if hasattr(module, "freeze_for_prefix_tuning"):  # ChatGLMModel
                module.freeze_for_prefix_tuning()
        _finish_tensor_parallel(model)
        return (model, info) if want_info else model

    def _tensor_parallel_state_dict(self):
        """The state dict with the cut fused projections gathered back to the published layout (all ranks)."""
        state_dict = self.state_dict()
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            gather_fused_qkv(module, prefix, state_dict)
            if hasattr(module, "dense_h_to_4h"):  # the MLP's fused gate | up
                gather_packed_gate_up(module.dense_h_to_4h, prefix + "dense_h_to_4h.", state_dict)
        return state_dict

    @classmethod
    def _with_config(cls, args, kwargs):
        """``kwargs`` with ``config`` a ``ChatGLMConfig``: read here once (with the caller's overrides, such as
        ``quantization_bit=4``, applied) the way the Auto classes do before they call this, unless given."""
        config = kwargs.get("config")
        if isinstance(config, PretrainedConfig):
            return kwargs
        source = config if isinstance(config, (str, os.PathLike)) else (
            args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        dtypes = {k: v for k, v in kwargs.items() if k in ("torch_dtype", "dtype")}  # not config fields here
        rest = {k: v for k, v in kwargs.items() if k not in hub and k not in dtypes and k != "config"}
        config, rest = cls.config_class.from_pretrained(source, return_unused_kwargs=True, **hub, **rest)
        return {**hub, **dtypes, **rest, "config": config}

    @classmethod
    def _check_quantized_shapes(cls, config, tensors):
        """ValueError (worded by ``check_quantized_load``) for a quantized layer whose checkpoint tensors do not
        fit ``config.quantization_bit``, found from the checkpoint's shapes and the layers of a model on the meta
        device, before any weight is read."""
        with torch.device("meta"):
            model = cls(copy.deepcopy(config))
        prefix = cls.base_model_prefix + "."
        shapes = {(k[len(prefix):] if k.startswith(prefix) else k): shape for k, shape in tensors.items()}
        mismatched, missing = [], []
        for name, param in model.named_parameters():
            if param.dtype != torch.int8 and not name.endswith(".weight_scale"):
                continue  # only a quantized layer's stored tensors
            found = shapes.get(name[len(prefix):] if name.startswith(prefix) else name)
            if found is None:
                missing.append(name)
            elif tuple(found) != tuple(param.shape):
                mismatched.append((name, tuple(found), tuple(param.shape)))
        check_quantized_load(model, {"mismatched_keys": mismatched, "missing_keys": missing})

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, then copy the remote-code files next to the weights so the folder loads again
        with ``trust_remote_code=True`` (the published files lose them)."""
        # Weight files of an older checkpoint in the folder would be loaded instead of (or mixed with) the new
        # ones: move them aside, and delete them once the new save succeeded (put them back if it failed).
        stale_dir = None
        writer = kwargs.get("is_main_process", True) and _distributed_rank() == 0  # one writer per save
        if writer and os.path.isdir(save_directory):
            old = [n for n in os.listdir(save_directory)
                   if _WEIGHT_FILE_RE.fullmatch(n) and os.path.isfile(os.path.join(save_directory, n))]
            if old:
                stale_dir = tempfile.mkdtemp(prefix=".stale-weights-", dir=save_directory)
                for name in old:
                    os.replace(os.path.join(save_directory, name), os.path.join(stale_dir, name))
        existing = set(os.listdir(save_directory)) if writer and os.path.isdir(save_directory) else set()
        try:
            if kwargs.get("state_dict") is None and any(
                    getattr(m, "_chatglm_tp", None) is not None for m in self.modules()):
                kwargs["state_dict"] = self._tensor_parallel_state_dict()
            result = super().save_pretrained(save_directory, *args, **kwargs)
        except BaseException:
            if stale_dir is not None:
                for name in os.listdir(stale_dir):
                    if not os.path.exists(os.path.join(save_directory, name)):
                        os.replace(os.path.join(stale_dir, name), os.path.join(save_directory, name))
                shutil.rmtree(stale_dir, ignore_errors=True)
            raise
        if stale_dir is not None:
            shutil.rmtree(stale_dir, ignore_errors=True)
        if not writer:
            return result
        # The code files: from this module's folder, else (tokenizer code, never imported by the model) from
        # the folder the model was loaded from.
        here = os.path.dirname(os.path.abspath(__file__))
        origin = getattr(self.config, "_name_or_path", "") or ""
        for name in REMOTE_CODE_FILES:
            src = os.path.join(here, name)
            if not os.path.isfile(src) and os.path.isdir(origin):
                src = os.path.join(origin, name)
            dst = os.path.join(save_directory, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst):
                shutil.copyfile(src, dst)
        self._repair_wrapped_class_save(save_directory, existing)
        return result

    def _repair_wrapped_class_save(self, save_directory, existing):
        """FSDP2's ``fully_shard`` gives the model a subclass defined in torch; the library then writes that
        class into ``auto_map`` and copies torch's FSDP files next to ours. Point ``auto_map`` back at our class
        and remove the copied files, so the folder loads as it should."""
        own = next(c for c in type(self).__mro__ if c.__module__.rsplit(".", 1)[-1] == "modeling_chatglm")
        if own is type(self):
            return
        wrapped = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        path = os.path.join(save_directory, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        auto_map = config.get("auto_map") or {}
        if wrapped not in auto_map.values():
            return
        config["auto_map"] = {k: (f"{own.__module__.rsplit('.', 1)[-1]}.{own.__name__}" if v == wrapped else v)
                              for k, v in auto_map.items()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for name in set(os.listdir(save_directory)) - existing:
            if name.endswith(".py") and name not in REMOTE_CODE_FILES:
                os.remove(os.path.join(save_directory, name))
