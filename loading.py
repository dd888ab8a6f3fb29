"""Checkpoint loading and saving for the ChatGLM3 models (a mixin of ``ChatGLMPreTrainedModel``): transformers'
``from_pretrained`` / ``save_pretrained`` plus the checks that a load never returns a partly random or garbage
model, and a saved folder that loads again with ``trust_remote_code=True``."""
import json
import os
import re
import shutil
import tempfile

from .configuration_chatglm import ChatGLMConfig
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
REMOTE_CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "chat.py", "loading.py", "parallel.py",
                     "quantization.py", "cpu_kernels.py", "cuda_kernels.py", "tokenization_chatglm.py")


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
        user_ignores = kwargs.pop("ignore_mismatched_sizes", False)
        quantized = cls._loads_quantized(args, kwargs)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True,
                                                  ignore_mismatched_sizes=user_ignores, **kwargs)
        except EOFError as exc:  # torch.load of an empty .bin shard: a bare EOFError() without a message
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(f"a weight file in {where!r} is empty or truncated (EOFError while reading it)") from exc
        except RuntimeError as exc:
            if "Only Tensors of floating point" in str(exc):  # transformers 4.4x-4.5x: int8 into a float parameter
                raise ValueError(
                    "the checkpoint has int8 (quantized) weights where config.json declares float ones: set "
                    "quantization_bit (4 or 8) to the checkpoint's width, and quantize_output_layer to true if it "
                    "has transformer.output_layer.weight_scale") from exc
            if not quantized or "mismatch" not in str(exc):
                raise
            # Load again tolerating the mismatch only to say which quantization_bit the tensors fit (not done
            # up front: on transformers 4.30 ignore_mismatched_sizes breaks sharded checkpoints).
            model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
            check_quantized_load(model, info)
            cls._check_undeclared_scales(model, info)
            raise
        if quantized:
            check_quantized_load(model, info)
        cls._check_undeclared_scales(model, info)
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

    @staticmethod
    def _check_undeclared_scales(model, info):
        """ValueError for quantized tensors (``weight_scale``) that the config does not declare: transformers would
        drop the scales and read the int8 weights as float weights."""
        scales = sorted(k for k in (info.get("unexpected_keys") or ()) if k.endswith(".weight_scale"))
        if scales and not model.config.quantization_bit:
            raise ValueError(
                f"the checkpoint is quantized (it has {scales[0]} and {len(scales) - 1} more weight_scale tensors), "
                f"but config.quantization_bit is 0: its int8 weights would be used as float weights. Set "
                f"quantization_bit (4 or 8) in config.json to the checkpoint's width.")
        head_scales = [k for k in scales if k.endswith("output_layer.weight_scale")]
        if head_scales:
            raise ValueError(
                f"the checkpoint's output_layer is quantized (it has {head_scales[0]}), but "
                f"config.quantize_output_layer is false: its int8 weight would be used as a float weight. Set "
                f"quantize_output_layer to true in config.json.")

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
    def _loads_quantized(cls, args, kwargs):
        if "quantization_bit" in kwargs:
            return bool(kwargs["quantization_bit"])
        config = kwargs.get("config")
        if not isinstance(config, ChatGLMConfig) and args:
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder",
                                          "force_download", "proxies") if k in kwargs}
            try:
                config = ChatGLMConfig.from_pretrained(args[0], **hub)
            except Exception:  # let the library's loader report it
                return False
        return bool(getattr(config, "quantization_bit", 0))

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
