#!/usr/bin/env python
"""Generation benchmark: this package (trust_remote_code) vs transformers' own ``GlmForCausalLM``.

Both models get the SAME random ChatGLM3-6B-width weights (hidden 4096, ffn 13696, 32 heads, 2 kv groups, vocab
65024) with ``--layers`` blocks (default 4; 28 = the full model). The logits of the two are checked to agree on a
short prompt before anything is timed. Then, alternately and in one process, with warm-up and medians over
``--repeats``:

* prefill tokens/s  = prompt_len / time(generate(max_new_tokens=1))  (prefill + one last-position lm_head)
* decode ms/token   = (t[N-1] - t[0]) / (N - 1), with t[i] the wall-clock time at which token i was chosen, taken
                      by a logits processor inside one greedy ``generate(do_sample=False, min_new_tokens=N,
                      max_new_tokens=N)`` run. The decode rows for every ``--new-tokens`` value N come from the
                      same run of max(N) tokens (the first N timestamps), which is the spec formula
                      ``(time(N new) - time(prefill)) / (N - 1)`` without running generate twice.
* peak RSS          = VmHWM of the process during that generate call (reset through /proc/self/clear_refs),
                      i.e. including every model loaded in the process; ``rss_growth`` = peak - RSS before.
* weight GB/s       = bytes of weights read per decoded token (all block linears + lm_head + KV cache)
                      / decode time, next to the memory-read bandwidth measured here (``torch.sum`` of 1 GiB).

The two models share their weight storage (the native model's q/k/v/o/gate_up/down/lm_head parameters are views
of this package's tensors), so two 28-layer bf16 models fit in 12.5 GB; that makes the per-phase peak RSS a
process-wide number. ``--load-test`` measures each ``from_pretrained`` in its own subprocess instead.

Several ``--code-dir`` values benchmark several versions of the package against each other (e.g. the committed
``modeling_chatglm.py`` and a patched copy), alternately in the same process.

Examples::

    python -m benchmarks.bench_generate --quick                       # bf16, prompt 128, 32 new tokens
    python -m benchmarks.bench_generate                               # the full CPU table (bf16 + fp32)
    python -m benchmarks.bench_generate --code-dir . --code-dir /tmp/perfwt --dtypes bf16
    python -m benchmarks.bench_generate --make-checkpoint /data/chatglm3-28l
    python -m benchmarks.bench_generate --load-test /data/chatglm3-28l
    python -m benchmarks.bench_generate --device cuda --dtypes fp16,bf16 --quant 8,4 --layers 28
"""
import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from generate import remote_code_files
from scripts import convert_to_glm  # the one ChatGLM3 -> transformers Glm mapping (config and tensors)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WIDTH = dict(hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, kv_channels=128,
             multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024, seq_length=32768,
             add_qkv_bias=True, add_bias_linear=False, rmsnorm=True, post_layer_norm=True, layernorm_epsilon=1e-5,
             rope_ratio=1)
TINY = dict(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, kv_channels=64, multi_query_group_num=2,
            padded_vocab_size=1024)  # --tiny: the same code paths in seconds (script checks, CI)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Memory accounting
# ---------------------------------------------------------------------------------------------------------------------
def _status_kb(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb():
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


class Sync:
    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint: config + random weights in safetensors, code files copied from a code dir
# ---------------------------------------------------------------------------------------------------------------------
def chatglm_config(layers, dtype_name="bfloat16"):
    cfg = json.loads((REPO / "config.json").read_text())
    cfg.update(WIDTH)
    cfg["num_layers"] = layers
    cfg["torch_dtype"] = dtype_name
    return cfg


def param_shapes(cfg):
    h, f, L = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"]
    q = cfg["num_attention_heads"] * cfg["kv_channels"]
    kv = cfg["multi_query_group_num"] * cfg["kv_channels"]
    shapes = {"transformer.embedding.word_embeddings.weight": (cfg["padded_vocab_size"], h)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.query_key_value.weight"] = (q + 2 * kv, h)
        shapes[p + "self_attention.query_key_value.bias"] = (q + 2 * kv,)
        shapes[p + "self_attention.dense.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * f, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, f)
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (cfg["padded_vocab_size"], h)
    return shapes


def random_tensor(name, shape, gen, dtype):
    if name.endswith("layernorm.weight"):
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    if name.endswith(".bias"):
        return (0.05 * torch.randn(shape, generator=gen)).to(dtype)
    if "word_embeddings" in name:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    fan_in = shape[1]
    out = torch.empty(shape, dtype=dtype)
    for s in range(0, shape[0], 8192):  # chunked: no full fp32 copy of big matrices
        rows = min(8192, shape[0] - s)
        out[s:s + rows] = (torch.randn((rows, fan_in), generator=gen) / math.sqrt(fan_in)).to(dtype)
    return out


def write_checkpoint(folder, layers, seed=0, shard_bytes=2 << 30, dtype=torch.bfloat16):
    """Write config.json + sharded safetensors (bf16) of random ChatGLM3-width weights, streaming shard by shard."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = chatglm_config(layers, {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shapes = param_shapes(cfg)
    shards, cur, cur_bytes = [], {}, 0
    for name, shape in shapes.items():
        t = random_tensor(name, shape, gen, dtype)
        cur[name] = t
        cur_bytes += t.numel() * t.element_size()
        if cur_bytes >= shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
            _flush_shard(folder, shards, save_file)
    if cur:
        shards.append(cur)
        _flush_shard(folder, shards, save_file)
    n = len(shards)
    weight_map, total = {}, 0
    for i in range(n):
        tmp = folder / f"model-{i + 1:05d}.safetensors.tmp"
        final = folder / (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
        tmp.rename(final)
        from safetensors import safe_open
        with safe_open(str(final), "pt") as f:
            for k in f.keys():
                weight_map[k] = final.name
                sl = f.get_slice(k)
                total += math.prod(sl.get_shape()) * torch.tensor([], dtype=dtype).element_size()
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    (folder / ".bench_ok").write_text(json.dumps({"layers": layers, "seed": seed}))
    return folder


def _flush_shard(folder, shards, save_file):
    i = len(shards)
    save_file(shards[-1], str(folder / f"model-{i:05d}.safetensors.tmp"), metadata={"format": "pt"})
    shards[-1] = None  # free the tensors, keep the count
    gc.collect()


def code_files(code_dir):
    """The remote-code files of ``code_dir`` (generate.remote_code_files: its loading.py's REMOTE_CODE_FILES)."""
    return remote_code_files(code_dir)


def copy_code(code_dir, folder):
    for name in code_files(code_dir):
        src = Path(code_dir) / name
        if src.exists():
            shutil.copyfile(src, Path(folder) / name)


def model_folder(work, layers, seed, code_dir, label):
    """A loadable folder: the shared weights (symlinked) plus the code files of ``code_dir``."""
    weights = Path(work) / f"weights-{layers}l-s{seed}"
    if not (weights / ".bench_ok").exists():
        log(f"writing random {layers}-layer bf16 checkpoint to {weights} ...")
        shutil.rmtree(weights, ignore_errors=True)
        write_checkpoint(weights, layers, seed)
    folder = Path(work) / f"model-{layers}l-{label}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for p in weights.iterdir():
        if p.name == ".bench_ok":
            continue
        (folder / p.name).symlink_to(p.resolve())
    copy_code(code_dir, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def load_ours(folder, dtype, device):
    from transformers import AutoModelForCausalLM

    kw = dict(trust_remote_code=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    except TypeError:  # transformers 4.x
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, **kw)
    return model.to(device).eval()


def glm_config(c):
    from transformers import GlmConfig

    cfg = GlmConfig.from_dict(convert_to_glm.build_glm_config_dict(c.to_dict()))
    cfg._attn_implementation = "sdpa"
    return cfg


class _StateDictReader:
    """The converter's reader interface over an in-memory state dict."""

    def __init__(self, sd):
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def file_of(self, name):
        return None


def to_glm_state_dict(sd, cfg):
    plan = convert_to_glm.chatglm_to_glm_plan(_StateDictReader(sd), cfg.to_dict())
    return {dst: fn(sd[srcs[0]]) for _, dst, srcs, fn in plan}


def build_native(ours, device, state_dict=None):
    """transformers' GlmForCausalLM holding views of ``ours``' weights (only the split QKV is copied)."""
    from transformers import GlmForCausalLM

    cfg = glm_config(ours.config)
    dtype = next(ours.parameters()).dtype
    with torch.device("meta"):
        glm = GlmForCausalLM(cfg)
    sd = to_glm_state_dict(state_dict if state_dict is not None else ours.state_dict(), ours.config)
    missing, unexpected = glm.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected, unexpected
    # rotary inv_freq buffers (non-persistent) are still on meta: rebuild that module for real
    for name, mod in list(glm.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            parent = glm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else glm
            with torch.device(device):
                setattr(parent, name.rsplit(".", 1)[-1], type(mod)(config=cfg))
    bad = [n for n, t in list(glm.named_parameters()) + list(glm.named_buffers()) if t.is_meta]
    assert not bad, bad
    glm.to(dtype)
    return glm.to(device).eval()


def weight_bytes_per_token(model):
    """Bytes read per decoded token: every parameter and buffer except the embedding table (one row read)."""
    total = 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed" in name or "inv_freq" in name:
            continue
        if t.is_mkldnn:  # a prepacked (opaque) weight
            key = ("mkldnn", id(t))
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def kv_bytes(cfg, tokens, dtype):
    """Key/value cache bytes for ``tokens`` positions (ChatGLMConfig or GlmConfig field names)."""
    layers = getattr(cfg, "num_layers", None) or cfg.num_hidden_layers
    kv_heads = getattr(cfg, "multi_query_group_num", None) or cfg.num_key_value_heads
    head_dim = getattr(cfg, "kv_channels", None) or cfg.head_dim
    return 2 * layers * kv_heads * head_dim * tokens * torch.tensor([], dtype=dtype).element_size()


def check_parity(ours, native, device, vocab):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, 24), generator=gen).to(device)
    with torch.inference_mode():
        a = ours(input_ids=ids).logits.float()
        b = native(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / max(scale, 1e-6), "top1_agree": agree}


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------
class Stamps:
    """A logits processor that records when each token is chosen (after that step's forward)."""

    def __init__(self, sync):
        self.times = []
        self.cpu_times = []
        self.sync = sync

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        return scores


def run_generate(model, ids, n, sync, **generate_kwargs):
    from transformers import LogitsProcessorList

    stamps = Stamps(sync)
    mask = torch.ones_like(ids)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=n,
                             max_new_tokens=n, logits_processor=LogitsProcessorList([stamps]), pad_token_id=0,
                             eos_token_id=None, num_beams=1, use_cache=True, **generate_kwargs)
    sync()
    t1 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + n, out.shape
    run_generate.cpu_times = stamps.cpu_times
    return t0, stamps.times, t1, out[0, ids.shape[1]:].tolist()


def measure_bandwidth(device, nbytes=1 << 30, repeats=7):
    """Memory-read bandwidth: torch.sum over a 1 GiB tensor (far larger than the caches), in bf16, fp32 and
    int64; ``max`` is the best of them (the reductions themselves cost some compute, so it is a lower bound)."""
    out = {}
    sync = Sync(device)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("int64", torch.int64)):
        x = torch.ones(nbytes // torch.tensor([], dtype=dt).element_size(), dtype=dt, device=device)
        x.sum()
        ts = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            x.sum()
            sync()
            ts.append(time.perf_counter() - t)
        out[name] = nbytes / min(ts) / 1e9
        out[name + "_median"] = nbytes / statistics.median(ts) / 1e9
        del x
    gc.collect()
    out["max"] = max(out["bf16"], out["fp32"], out["int64"])
    return out


def _pct(xs, p):
    """p-th percentile (nearest rank). On a shared machine the low percentiles are the contention-free speed."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Main benchmark
# ---------------------------------------------------------------------------------------------------------------------
def bench(args):
    device = args.device
    sync = Sync(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir) / ("tiny" if args.tiny else "")
    if args.tiny:
        WIDTH.update(TINY)
    work.mkdir(parents=True, exist_ok=True)
    code_dirs = args.code_dir or [str(REPO)]
    labels = ["ours"] + [f"ours{i + 1}" for i in range(1, len(code_dirs))]
    if args.labels:
        labels = args.labels.split(",")
    folders = [model_folder(work, args.layers, args.seed, c, l) for c, l in zip(code_dirs, labels)]

    meta = {
        "layers": args.layers, "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
        "code_dirs": dict(zip(labels, code_dirs)), "repeats": args.repeats, "prompts": args.prompts,
        "new_tokens": args.new_tokens, "batch": args.batch, "tiny": args.tiny, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    import transformers
    meta["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    meta["loadavg_start"] = os.getloadavg()
    meta["bandwidth_GBps"] = measure_bandwidth(device, 1 << 24 if args.tiny else 1 << 30)
    log(f"memory-read bandwidth: {meta['bandwidth_GBps']}")
    rows, parity = [], {}
    vocab = WIDTH["padded_vocab_size"]
    nmax = max(args.new_tokens)

    for dname in args.dtypes:
        dtype = DTYPES[dname]
        variants = []  # (label, model, kind)
        for label, folder in zip(labels, folders):
            log(f"[{dname}] loading {label} from {folder}")
            variants.append((label, load_ours(folder, dtype, device), dname))
        if args.native_only:  # the native model keeps (views of) the weights; ours is dropped
            native = build_native(variants[0][1], device)
            variants = [("native", native, dname)]
            gc.collect()
        elif not args.no_native:
            native = build_native(variants[0][1], device)
            parity[dname] = check_parity(variants[0][1], native, device, vocab)
            log(f"[{dname}] parity ours vs native: {parity[dname]}")
            tol = 1e-3 if dtype == torch.float32 else 0.05
            if parity[dname]["rel"] > tol:
                raise SystemExit(f"ours and native disagree in {dname}: {parity[dname]}")
            variants.append(("native", native, dname))
        quant_specs = args.quant if dname in ("bf16", "fp16") and not args.native_only else []
        for spec, (code_label, folder) in [(s, lf) for s in quant_specs for lf in zip(labels, folders)]:
            bits, head = int(spec.rstrip("h")), spec.endswith("h")  # "8h": output_layer quantized too
            label = f"ours-int{spec}" if len(folders) == 1 else f"{code_label}-int{spec}"  # one row per --code-dir
            try:
                q = load_ours(folder, dtype, device)
                q.quantize(bits, **({"quantize_output_layer": True} if head else {}))
                if not any("Quantized" in type(m).__name__ for m in q.modules()):
                    raise RuntimeError("quantize() did not create quantized layers")
                variants.append((label, q, f"{dname}+int{spec}"))
            except Exception as e:  # quantization.py not there yet, or a backend missing
                log(f"[{dname}] skipping int{spec}: {type(e).__name__}: {e}")
                rows.append({"model": label, "dtype": f"{dname}+int{spec}", "skipped": f"{type(e).__name__}: {e}"})
                q = None
            gc.collect()
        generate_kwargs = {}
        if args.compile and not args.native_only:
            # the last --code-dir with a static cache and ``forward`` compiled with fullgraph=True (the warm-up
            # round compiles)
            label = f"{labels[-1]}-static-compiled"
            compiled = load_ours(folders[-1], dtype, device)
            compiled.forward = torch.compile(compiled.forward, fullgraph=True)
            variants.append((label, compiled, dname))
            generate_kwargs[label] = {"cache_implementation": "static"}
        wbytes = {label: weight_bytes_per_token(model) for label, model, _ in variants}  # before any (pre)packing
        for label, model, kind in variants:
            log(f"  {label}: {wbytes[label] / 1e9:.3f} GB weights read per token, rss {rss_mb():.0f} MB")

        for prompt in args.prompts:
            ids = torch.randint(3, vocab, (args.batch, prompt), generator=torch.Generator().manual_seed(prompt)).to(device)
            res = {label: {"prefill": [], "decode": {n: [] for n in args.new_tokens}, "steps": [], "peak": [],
                           "cpu": {n: [] for n in args.new_tokens},
                           "growth": [], "tokens": None} for label, _, _ in variants}
            for r in range(args.repeats + 1):  # round 0 = warm-up
                order = variants if r % 2 == 0 else variants[::-1]  # alternate who goes first
                for label, model, _ in order:
                    gc.collect()
                    # prefill: generate 1 token (prefill + last-position logits)
                    t0, st, t1, _ = run_generate(model, ids, 1, sync, **generate_kwargs.get(label, {}))
                    if r:
                        res[label]["prefill"].append(t1 - t0)
                    # decode: one run of nmax tokens, timestamps per token
                    gc.collect()
                    before = rss_mb()
                    reset_peak_rss()
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    warm = nmax if label in generate_kwargs else min(nmax, 4)  # compile for the timed shapes
                    t0, st, t1, toks = run_generate(model, ids, nmax if r else warm, sync,  # short warm-up
                                                    **generate_kwargs.get(label, {}))
                    peak = (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else peak_rss_mb()
                    if r:
                        ct = run_generate.cpu_times
                        for n in args.new_tokens:
                            res[label]["decode"][n].append((st[n - 1] - st[0]) / (n - 1))
                            res[label]["cpu"][n].append((ct[n - 1] - ct[0]) / (n - 1))
                        res[label]["steps"].extend(b - a for a, b in zip(st, st[1:]))
                        res[label]["peak"].append(peak)
                        res[label]["growth"].append(peak - before)
                    if r:
                        res[label]["tokens"] = toks
                log(f"  [{dname} prompt {prompt}] round {r} done, loadavg {os.getloadavg()[0]:.1f}")
            ref_tokens = res[variants[0][0]]["tokens"]
            for label, model, kind in variants:
                d = res[label]
                wb = wbytes[label]
                pre = median(d["prefill"])
                for n in args.new_tokens:
                    dec = median(d["decode"][n])
                    kvb = kv_bytes(model.config if label != "native" else variants[0][1].config,
                                   prompt + n // 2, DTYPES[dname])
                    row = {
                        "model": label, "dtype": kind, "layers": args.layers, "prompt": prompt, "new_tokens": n,
                        "batch": args.batch, "prefill_tok_s": args.batch * prompt / pre, "prefill_s": pre,
                        "decode_ms_tok": dec * 1e3, "decode_step_median_ms": median(d["steps"]) * 1e3,
                        "decode_step_p10_ms": _pct(d["steps"], 10) * 1e3,
                        "decode_cpu_ms_tok": median(d["cpu"][n]) * 1e3,
                        "prefill_tok_s_best": prompt / min(d["prefill"]),
                        "decode_runs_ms": [x * 1e3 for x in d["decode"][n]],
                        "weight_GB_tok": wb / 1e9, "effective_GBps": (wb + kvb) / dec / 1e9,
                        "peak_rss_MB": median(d["peak"]), "rss_growth_MB": median(d["growth"]),
                        "bw_fraction": (wb + kvb) / dec / 1e9 / meta["bandwidth_GBps"]["max"],
                        "same_tokens_as_ours": d["tokens"][:n] == ref_tokens[:n],
                    }
                    rows.append(row)
            _print_table([r for r in rows if r.get("prompt") == prompt and r.get("dtype", "").startswith(dname)],
                         meta)
        del variants, model
        native = None
        gc.collect()

    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["loadavg_end"] = os.getloadavg()
    result = {"meta": meta, "parity": parity, "rows": rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{device.split(':')[0]}_{args.layers}l_{time.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out_dir / (stem + '.json')}")
    _print_table(rows, meta)
    try:
        _chart(rows, meta, out_dir / f"{stem}.png")
        print(f"wrote {out_dir / (stem + '.png')}")
    except Exception as e:  # matplotlib missing
        log(f"no chart: {e}")
    return result


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(rows, meta=None):
    """Markdown table; each ours* row gets a speed-up column against the native row of the same setting."""
    native = {(r["dtype"], r["prompt"], r["new_tokens"]): r for r in rows if r.get("model") == "native"}
    lines = ["| model | dtype | prompt | new | prefill tok/s | decode ms/tok | decode vs native | prefill vs native "
             "| decode p10 step ms | decode CPU ms/tok | GB/tok | eff. GB/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | - | - | skipped: {r['skipped'][:60]} | | | | | | | | |")
            continue
        base = r["dtype"].split("+")[0]
        nat = native.get((base, r["prompt"], r["new_tokens"]))
        sd = sp = ""
        if nat and r["model"] != "native":
            sd = f"{nat['decode_ms_tok'] / r['decode_ms_tok']:.2f}x"
            sp = f"{r['prefill_tok_s'] / nat['prefill_tok_s']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['prompt']} | {r['new_tokens']} | {r['prefill_tok_s']:.1f} | "
            f"{r['decode_ms_tok']:.1f} | {sd} | {sp} | {r.get('decode_step_p10_ms', float('nan')):.1f} | "
            f"{r.get('decode_cpu_ms_tok', float('nan')):.1f} | "
            f"{r['weight_GB_tok']:.2f} | {r['effective_GBps']:.1f} | "
            f"{r['peak_rss_MB']:.0f} |")
    if meta:
        bw = meta.get("bandwidth_GBps", {})
        lines.append("")
        lines.append(f"{meta['layers']} layers, {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
                     f"transformers {meta.get('transformers')}; measured read bandwidth "
                     f"{bw.get('max', float('nan')):.1f} GB/s (best of torch.sum over 1 GiB in bf16/fp32/int64)")
    return "\n".join(lines)


def _print_table(rows, meta):
    print(format_table(rows, meta), flush=True)


def _chart(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r]
    settings = sorted({(r["dtype"], r["prompt"], r["new_tokens"]) for r in rows},
                      key=lambda s: (s[0], s[1], s[2]))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        dec = [next((r["decode_ms_tok"] for r in rows if r["model"] == m and (r["dtype"], r["prompt"],
                                                                              r["new_tokens"]) == s), 0)
               for s in settings]
        pre = [next((r["prefill_tok_s"] for r in rows if r["model"] == m and (r["dtype"], r["prompt"],
                                                                              r["new_tokens"]) == s), 0)
               for s in settings]
        xs = [j + i * width for j in range(len(settings))]
        axes[0].bar(xs, dec, width, label=m)
        axes[1].bar(xs, pre, width, label=m)
    names = [f"{d}\np{p} n{n}" for d, p, n in settings]
    for ax, title in zip(axes, ("decode ms/token (lower is better)", "prefill tokens/s (higher is better)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"ChatGLM3-6B width, {meta['layers']} layers, {meta['device']} ({meta.get('cpu') or ''}), "
                 f"{meta['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------------------------
# Load test: from_pretrained time and peak RSS, ours vs native, each in a fresh subprocess
# ---------------------------------------------------------------------------------------------------------------------
def native_checkpoint(src, dst):
    """A GlmForCausalLM folder for the same weights: config + key-renamed safetensors. Tensors are streamed
    shard by shard (q/k/v split), so it needs the disk space of one more checkpoint but little RAM."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    src, dst = Path(src), Path(dst)
    if (dst / ".bench_ok").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(src, trust_remote_code=True)
    gcfg = glm_config(cfg)
    gcfg.dtype = torch.bfloat16
    gcfg.save_pretrained(dst)
    files = sorted(p for p in src.iterdir() if p.suffix == ".safetensors")
    weight_map = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
        out = {k: v.contiguous() for k, v in to_glm_state_dict(sd, cfg).items()}
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
        del sd, out
        gc.collect()
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / ".bench_ok").write_text("ok")
    return dst


def _load_child(kind, folder, dtype_name, device):
    """Runs in a subprocess: load, report time and peak RSS as JSON on stdout."""
    import transformers

    dtype = DTYPES[dtype_name]
    base_rss = rss_mb()
    t = time.perf_counter()
    if kind == "ours":
        model = load_ours(folder, dtype, device)
    else:
        try:
            model = transformers.GlmForCausalLM.from_pretrained(folder, dtype=dtype)
        except TypeError:
            model = transformers.GlmForCausalLM.from_pretrained(folder, torch_dtype=dtype)
        model = model.to(device).eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    peak_load = peak_rss_mb()
    # safetensors may leave the weights memory-mapped and not yet read: touch every tensor so the resident size
    # (and the time until the weights are really in memory) is comparable between loaders.
    t = time.perf_counter()
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.sum()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    touch = time.perf_counter() - t
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"kind": kind, "load_s": elapsed, "touch_s": touch, "load_and_touch_s": elapsed + touch,
                      "peak_rss_load_MB": peak_load, "peak_rss_MB": peak_rss_mb(), "base_rss_MB": base_rss,
                      "rss_after_MB": rss_mb(), "weights_MB": wbytes / 2**20,
                      "peak_over_weights": peak_rss_mb() / (wbytes / 2**20)}))


def load_test(args):
    src = Path(args.load_test)
    if not (src / "config.json").exists():
        raise SystemExit(f"{src} has no config.json; create it with --make-checkpoint {src}")
    code_dir = (args.code_dir or [str(REPO)])[0]
    copy_code(code_dir, src)
    nat = Path(args.native_dir or str(src) + "-glm")
    log(f"native checkpoint: {nat} (written once, {_du(src) / 1e9:.1f} GB)")
    native_checkpoint(src, nat)
    results = []
    for r in range(args.repeats):
        for kind, folder in (("ours", src), ("native", nat)) if r % 2 == 0 else (("native", nat), ("ours", src)):
            if args.drop_caches:
                _drop_caches()
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_generate", "--_load-child", kind,
                                  str(Path(folder).resolve()), args.dtypes[0], "--device", args.device],
                                 capture_output=True, text=True, cwd=str(REPO))
            if out.returncode:
                raise SystemExit(out.stderr)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["repeat"] = r
            results.append(res)
            log(res)
    summary = {}
    for kind in ("ours", "native"):
        rs = [x for x in results if x["kind"] == kind]
        summary[kind] = {k: median([x[k] for x in rs]) for k in (
            "load_s", "load_and_touch_s", "peak_rss_load_MB", "peak_rss_MB", "weights_MB", "peak_over_weights")}
    print("| model | from_pretrained s | + reading every weight s | peak RSS after load MB | peak RSS MB | "
          "weights MB | peak / weights |\n|---|---|---|---|---|---|---|")
    for kind, s in summary.items():
        print(f"| {kind} | {s['load_s']:.2f} | {s['load_and_touch_s']:.2f} | {s['peak_rss_load_MB']:.0f} | "
              f"{s['peak_rss_MB']:.0f} | {s['weights_MB']:.0f} | {s['peak_over_weights']:.2f} |")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"load_{src.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"runs": results, "summary": summary, "dtype": args.dtypes[0],
                                                       "page_cache_dropped": args.drop_caches}, indent=2))
    print(f"wrote {out_dir / (stem + '.json')}")


def _du(path):
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and not p.is_symlink())


def _drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        log(f"cannot drop page cache ({e}); load times are warm-cache")


# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32 (default bf16,fp32; cuda: fp16,bf16)")
    p.add_argument("--prompts", default="128,2048")
    p.add_argument("--new-tokens", default="32,256")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--quant", default="8,4", help="int bits rows through model.quantize(bits), e.g. 8,4; a trailing h "
                   "(8h, 4h) also quantizes output_layer; '' for none")
    p.add_argument("--quick", action="store_true", help="bf16, prompt 128, 32 new tokens, 2 repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1, help="sequences per generate call (prefill tok/s counts them all)")
    p.add_argument("--tiny", action="store_true", help="small widths (hidden 256, 4 heads, vocab 1024) instead of "
                   "ChatGLM3-6B's: checks the benchmark itself, times nothing meaningful")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--code-dir", action="append", help="folder with the package's code files (repeatable; "
                   "default: the repository). Several: benchmarked against each other")
    p.add_argument("--labels", help="comma list of labels for the --code-dir values")
    p.add_argument("--compile", action="store_true", help="also this package with cache_implementation='static' and "
                   "forward = torch.compile(forward, fullgraph=True)")
    p.add_argument("--no-native", action="store_true", help="only this package (e.g. --layers 28: one model at a time)")
    p.add_argument("--native-only", action="store_true", help="only transformers' GlmForCausalLM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "chatglm_bench"),
                   help="where the random checkpoints and model folders are written (reused between runs)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--name", help="stem of the result files")
    p.add_argument("--make-checkpoint", metavar="DIR", help="write a random bf16 checkpoint (--layers, default 28 "
                   "here) with the code files into DIR and exit")
    p.add_argument("--load-test", metavar="DIR", help="from_pretrained time and peak RSS, ours vs native")
    p.add_argument("--native-dir", help="--load-test: where the key-renamed native copy goes (default DIR-glm)")
    p.add_argument("--drop-caches", action="store_true", help="--load-test: drop the page cache before each load "
                   "(needs root)")
    p.add_argument("--_load-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = "fp16,bf16" if args.device.startswith("cuda") else "bf16,fp32"
    if args.quick:
        args.dtypes, args.prompts, args.new_tokens = "bf16", "128", "32"
        args.repeats = min(args.repeats, 2)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.prompts = [int(x) for x in args.prompts.split(",") if x]
    args.new_tokens = [int(x) for x in args.new_tokens.split(",") if x]
    args.quant = [x.strip() for x in args.quant.split(",") if x.strip()]
    bad = [x for x in args.quant if x.rstrip("h") not in ("4", "8") or x.count("h") > 1]
    if bad:
        p.error(f"--quant takes 8, 4, 8h or 4h, got {bad}")
    if min(args.new_tokens) < 2:
        p.error("--new-tokens values must be >= 2")
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args._load_child:
        kind, folder, dt = args._load_child
        if args.threads:
            torch.set_num_threads(args.threads)
        return _load_child(kind, folder, dt, args.device)
    if args.make_checkpoint:
        layers = args.layers if "--layers" in (argv or sys.argv) else 28
        t = time.perf_counter()
        folder = write_checkpoint(args.make_checkpoint, layers, args.seed)
        copy_code((args.code_dir or [str(REPO)])[0], folder)
        print(f"wrote {layers}-layer bf16 checkpoint to {folder} ({_du(folder) / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t:.0f} s")
        return
    if args.load_test:
        return load_test(args)
    bench(args)


if __name__ == "__main__":
    main()
