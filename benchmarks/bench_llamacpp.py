#!/usr/bin/env python
"""CPU side by side: this package (trust_remote_code) vs llama.cpp (through llama-cpp-python) on the same weights.

One random ChatGLM3-6B-width checkpoint (``--layers`` blocks, bf16 safetensors, the same one
``bench_generate.py`` writes) is

* loaded by this package with ``from_pretrained(trust_remote_code=True)``: bf16, ``quantize(8)``, ``quantize(4)``
  (output_layer stays bf16 in both);
* converted by llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python source distribution) to a bf16
  GGUF, and from it, with ``llama_model_quantize``, to q8_0 and q4_0 with the output tensor kept 16-bit (f16;
  ``--head bf16`` for bf16).

For each precision both models are loaded, then for each ``--threads`` value, one warm-up round and ``--rounds``
timed rounds alternate between ours and llama.cpp (who goes first alternates too):

* prefill ms   = time to evaluate the ``--prompt`` random token ids and pick the first token (ours: ``generate`` of
                 one token; llama.cpp: ``Llama.eval(prompt)`` + argmax of the last-position logits)
* decode ms/tok = (t[N-1] - t[0]) / (N - 1), t[i] the time token i was picked in one greedy run of N =
                 ``--new-tokens`` tokens (ours: timestamps from a logits processor inside ``generate``, as in
                 bench_generate; llama.cpp: ``Llama.eval([token])`` + argmax per step)

and medians over the rounds are reported. "Share of the bandwidth limit" = (weight bytes read per token / the
memory-read bandwidth measured at that thread count, ``torch.sum`` over 1 GiB of fp32) / measured time per token:
100% means the weights stream at the measured bandwidth. Weight bytes: ours every parameter and buffer but the
embedding table (``bench_generate.weight_bytes_per_token``); llama.cpp every GGUF tensor but ``token_embd`` (a
lookup). The KV cache (a few MB at this length) is left out of both.

Needs ``llama_cpp`` (llama-cpp-python, ideally built here: ``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install
llama-cpp-python==0.3.36 --no-binary llama-cpp-python``), ``gguf``, and the llama-cpp-python sdist (``--sdist``, else
``$LLAMA_CPP_PYTHON_SDIST``, else ``~/.cache/chatglm3-tests/llama_cpp_python-*.tar.gz``; get it with
``pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36``); it exits with a "skipped" message otherwise.
On CPUs with AMX, llama.cpp 0.3.36's AMX matmul crashes on prompt batches (upstream issue #20824): build it without
AMX, keeping its repacked AVX-512 kernels (``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"``); the bench warns when the build has AMX.

Examples::

    python -m benchmarks.bench_llamacpp --quick --sdist llama_cpp_python-0.3.36.tar.gz   # smoke run: 1 layer
    python -m benchmarks.bench_llamacpp --threads 1,2 --layers 4                        # the table
"""
import argparse
import ctypes
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks import bench_generate as bg
from tests.llama_cpp_sdist import SDIST_ENV, converter_script, find_sdist  # (shared with tests/test_clients.py)
from tests.support import real_model_path, train_tiny_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (our label, llama.cpp label, bits for model.quantize or None, llama_ftype name or None for the converter's bf16)
PRECISIONS = [("bf16", "bf16", None, None), ("int8", "q8_0", 8, "LLAMA_FTYPE_MOSTLY_Q8_0"),
              ("int4", "q4_0", 4, "LLAMA_FTYPE_MOSTLY_Q4_0")]
HEAD_TYPES = {"f16": "GGML_TYPE_F16", "bf16": "GGML_TYPE_BF16"}
log = bg.log


# ---------------------------------------------------------------------------------------------------------------------
# What is needed, and where it is
# ---------------------------------------------------------------------------------------------------------------------
def missing_requirements(args):
    why = [f"the Python package '{m}' is not installed" for m in ("llama_cpp", "gguf")
           if importlib.util.find_spec(m) is None]
    if find_sdist(args.sdist) is None:
        where = args.sdist or os.environ.get(SDIST_ENV)
        why.append(f"no llama-cpp-python sdist ({where} does not exist)" if where else
                   f"no llama-cpp-python sdist: pass --sdist or set ${SDIST_ENV} to llama_cpp_python-*.tar.gz "
                   f"(pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36)")
    return why


def tokenizer_model(arg, work):
    """The SentencePiece model the converter builds the GGUF vocabulary from: --tokenizer-model, else the published
    one (tests/support.real_model_path), else a small one trained here (the vocabulary does not change
    the timing: the converter pads it to the 65024 rows of the weights either way)."""
    if arg:
        if not Path(arg).is_file():
            raise SystemExit(f"--tokenizer-model {arg} is not a file")
        return Path(arg)
    path = real_model_path()
    if path is None:
        path = Path(work) / "trained-tokenizer.model"
        if not path.exists():
            train_tiny_model(path)
    return path


def hf_folder(work, layers, seed, tok_model):
    """bench_generate's model folder (shared random weights + our code files) with the tokenizer files added: what
    from_pretrained(trust_remote_code=True) and the converter both read."""
    folder = bg.model_folder(work, layers, seed, str(REPO), "llamacpp")
    shutil.copyfile(REPO / "tokenizer_config.json", folder / "tokenizer_config.json")
    shutil.copyfile(tok_model, folder / "tokenizer.model")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------------------------------
def _stamp(work, layers, seed, folder):
    """What the GGUF files were made from: the random weights (rewritten -> new marker time) and the tokenizer."""
    ok = Path(work) / f"weights-{layers}l-s{seed}" / ".bench_ok"
    tok = hashlib.sha256((Path(folder) / "tokenizer.model").read_bytes()).hexdigest()
    return {"weights": str(ok.parent), "mtime_ns": ok.stat().st_mtime_ns, "marker": ok.read_text(),
            "tokenizer_sha256": tok}


def make_ggufs(args, folder, work):
    """bf16 GGUF from the converter, q8_0 / q4_0 from it; rebuilt when the random weights were rewritten."""
    out = Path(work) / f"gguf-{args.layers}l-s{args.seed}-head{args.head}"
    out.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(work, args.layers, args.seed, folder)
    stamp_file = out / "stamp.json"
    if not stamp_file.exists() or json.loads(stamp_file.read_text()) != stamp:
        for p in out.glob("*.gguf"):
            p.unlink()
        stamp_file.write_text(json.dumps(stamp))
    paths, timings = {}, {}
    bf16 = out / "bf16.gguf"
    if not bf16.exists():
        sdist = find_sdist(args.sdist)
        try:
            script = converter_script(sdist, Path(work) / f"sdist-{sdist.name.replace('.tar.gz', '')}")
        except FileNotFoundError as e:
            raise SystemExit(str(e))
        log(f"converting {folder} to {bf16} with {script} ...")
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
        tmp = bf16.with_suffix(".tmp")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(tmp), "--outtype", "bf16"],
                              capture_output=True, text=True, env=env)
        (out / "convert.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            raise SystemExit(f"convert_hf_to_gguf.py failed (log: {out / 'convert.log'}):\n"
                             f"{(proc.stdout + proc.stderr)[-3000:]}")
        tmp.rename(bf16)
        timings["convert_bf16_s"] = time.perf_counter() - t
    paths["bf16"] = bf16
    for _, name, _, ftype in PRECISIONS:
        if ftype is None:
            continue
        path = out / f"{name}.gguf"
        if not path.exists():
            log(f"quantizing {bf16.name} to {path.name} (output tensor {args.head}) ...")
            tmp = path.with_suffix(".tmp")
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_llamacpp", "--_quantize",
                                   str(bf16.resolve()), str(tmp.resolve()), ftype, HEAD_TYPES[args.head]],
                                  capture_output=True, text=True, cwd=str(REPO))
            (out / f"quantize-{name}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode:
                raise SystemExit(f"llama_model_quantize to {name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            tmp.rename(path)
            timings[f"quantize_{name}_s"] = time.perf_counter() - t
        paths[name] = path
    return paths, timings


def _quantize_child(inp, out, ftype, head_type):
    """Runs in a subprocess (llama.cpp logs every tensor): llama_model_quantize with the output tensor kept."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    fields = {f[0] for f in llama_cpp.llama_model_quantize_params._fields_}
    if "output_tensor_type" not in fields:
        raise SystemExit(f"this llama_cpp's llama_model_quantize_params has no output_tensor_type ({sorted(fields)})")
    params.ftype = getattr(llama_cpp, ftype)
    params.output_tensor_type = getattr(llama_cpp, head_type)
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def gguf_info(path):
    """Tensor bytes (all, and all but token_embd) and the tensor types of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types, total, read = {}, 0, 0
    for t in reader.tensors:
        kind = t.tensor_type.name
        types.setdefault(kind, []).append(t.name)
        total += int(t.n_bytes)
        if not t.name.startswith("token_embd"):
            read += int(t.n_bytes)
    by_type = {k: len(v) for k, v in types.items()}
    out_type = next((k for k, v in types.items() if "output.weight" in v), None)
    return {"file": str(path), "file_bytes": path.stat().st_size, "tensor_bytes": total, "bytes_per_token": read,
            "tensor_types": by_type, "output_type": out_type,
            "ffn_down_type": next((k for k, v in types.items() if "blk.0.ffn_down.weight" in v), None)}


# ---------------------------------------------------------------------------------------------------------------------
# Runners: the same interface for both
# ---------------------------------------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, model):
        self.model = model
        self.sync = bg.Sync("cpu")

    def set_threads(self, t):
        torch.set_num_threads(t)

    def run(self, ids, n):
        """(start, [time token i was picked], end, tokens) of one greedy generate of n tokens."""
        return bg.run_generate(self.model, ids, n, self.sync)

    def last_logits(self, ids):
        with torch.inference_mode():
            return self.model(input_ids=ids).logits[0, -1].float()


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, n_ctx, n_batch, threads):
        import llama_cpp
        import numpy as np

        self.lc, self.np = llama_cpp, np
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_batch, n_ubatch=n_batch, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def set_threads(self, t):
        self.lc.llama_set_n_threads(self.llm.ctx, t, t)

    def _logits(self):
        ptr = self.lc.llama_get_logits_ith(self.llm.ctx, -1)
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def run(self, ids, n):
        ids = [int(i) for i in ids[0].tolist()]
        self.llm.reset()  # the next eval removes every cached position
        t0 = time.perf_counter()
        self.llm.eval(ids)
        tok = int(self._logits().argmax())
        stamps, toks = [time.perf_counter()], [tok]
        for _ in range(n - 1):
            self.llm.eval([tok])
            tok = int(self._logits().argmax())
            stamps.append(time.perf_counter())
            toks.append(tok)
        return t0, stamps, stamps[-1], toks

    def last_logits(self, ids):
        self.llm.reset()
        self.llm.eval([int(i) for i in ids[0].tolist()])
        return torch.from_numpy(self._logits().copy())

    def close(self):
        self.llm.close() if hasattr(self.llm, "close") else None
        self.llm = None


def compare_logits(a, b):
    """How close llama.cpp's last-position logits are to ours (a sanity check that both run the same model)."""
    a, b = a.double(), b.double()
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "same_top1": int(a.argmax()) == int(b.argmax())}


def _prefix_agree(x, y):
    n = 0
    for p, q in zip(x, y):
        if p != q:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------------
def bench(args):
    import gguf
    import llama_cpp
    import transformers

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok_model = tokenizer_model(args.tokenizer_model, work)
    folder = hf_folder(work, args.layers, args.seed, tok_model)
    ggufs, prep_times = make_ggufs(args, folder, work)
    info = {name: gguf_info(p) for name, p in ggufs.items()}
    for name, i in info.items():
        log(f"{name}: {i['bytes_per_token'] / 1e9:.3f} GB read per token, types {i['tensor_types']}, "
            f"output {i['output_type']}")

    meta = {"layers": args.layers, "prompt": args.prompt, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "threads": args.threads, "cpu": bg._cpu_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llama_cpp.__version__,
            "gguf": getattr(gguf, "__version__", None), "python": platform.python_version(),
            "platform": platform.platform(), "head": args.head, "seed": args.seed,
            "tokenizer_model": str(tok_model), "gguf_files": {k: str(v) for k, v in ggufs.items()},
            "llama_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg(), **prep_times}
    if "AMX_INT8 = 1" in meta["llama_system_info"]:
        log("warning: this llama.cpp build has AMX, whose matmul crashes on prompt batches (llama.cpp issue #20824); "
            "see the module docstring for a build without it")
    bw = {}
    for t in args.threads:
        torch.set_num_threads(t)
        bw[t] = bg.measure_bandwidth("cpu")
        log(f"read bandwidth, {t} thread(s): {bw[t]['fp32']:.1f} GB/s (fp32 sum)")
    meta["bandwidth_GBps"] = bw

    vocab = bg.WIDTH["padded_vocab_size"]
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.prompt))
    n = args.new_tokens
    n_ctx = max(512, args.prompt + n + 16)
    n_batch = max(512, args.prompt)
    rows, checks, reference = [], {}, None
    for ours_label, llama_label, bits, _ in PRECISIONS:
        if ours_label not in args.precisions:
            continue
        log(f"[{ours_label} / {llama_label}] loading ...")
        model = bg.load_ours(folder, torch.bfloat16, "cpu")
        ours_row = {"model": "ours", "precision": ours_label}
        if bits:
            try:
                model.quantize(bits)
                if not any("Quantized" in type(m).__name__ for m in model.modules()):
                    raise RuntimeError("quantize() did not create quantized layers")
            except Exception as e:
                log(f"  ours {ours_label} skipped: {type(e).__name__}: {e}")
                ours_row["skipped"] = f"{type(e).__name__}: {e}"
                model = None
        runners = []
        if model is not None:
            ours_row["bytes_per_token"] = bg.weight_bytes_per_token(model)  # before any (pre)packing
            runners.append((Ours(model), ours_row))
        llama_row = {"model": "llama.cpp", "precision": llama_label, "gguf": info[llama_label],
                     "bytes_per_token": info[llama_label]["bytes_per_token"]}
        runners.append((LlamaCpp(ggufs[llama_label], n_ctx, n_batch, args.threads[0]), llama_row))
        for _, row in runners:
            row.update(prefill_s={t: [] for t in args.threads}, decode_s={t: [] for t in args.threads},
                       steps_s={t: [] for t in args.threads}, tokens=None)

        if len(runners) == 2:
            for runner, _ in runners:
                runner.set_threads(args.threads[-1])
            mine, theirs = runners[0][0].last_logits(ids), runners[1][0].last_logits(ids)
            checks[ours_label] = compare_logits(mine, theirs)
            if bits is None:
                reference = mine  # ours bf16: what each quantization is compared with
            elif reference is not None:  # how far each int8 / int4 is from the bf16 model
                checks[ours_label]["ours_vs_bf16_cosine"] = compare_logits(reference, mine)["cosine"]
                checks[ours_label]["llama_vs_bf16_cosine"] = compare_logits(reference, theirs)["cosine"]
            log(f"  last-position logits, llama.cpp {llama_label} vs ours {ours_label}: {checks[ours_label]}")
        for t in args.threads:
            for runner, _ in runners:
                runner.set_threads(t)
            for r in range(args.rounds + 1):  # round 0 = warm-up
                order = runners if r % 2 == 0 else runners[::-1]
                for runner, row in order:
                    gc.collect()
                    time.sleep(0.1)  # let the other runtime's worker threads go idle
                    t0, _, t1, _ = runner.run(ids, 1)
                    if r:
                        row["prefill_s"][t].append(t1 - t0)
                    gc.collect()
                    time.sleep(0.1)
                    _, stamps, _, toks = runner.run(ids, n if r else min(n, 4))
                    if r:
                        row["decode_s"][t].append((stamps[-1] - stamps[0]) / (n - 1))
                        row["steps_s"][t].extend(b - a for a, b in zip(stamps, stamps[1:]))
                        row["tokens"] = toks
                log(f"  [{ours_label} / {llama_label}, {t} thread(s)] round {r} done, "
                    f"loadavg {os.getloadavg()[0]:.1f}")
        if len(runners) == 2:
            a, b = runners[0][1]["tokens"], runners[1][1]["tokens"]
            checks.setdefault(ours_label, {})["greedy_prefix_agree"] = _prefix_agree(a, b)
        for runner, row in runners:
            row["prefill_ms"] = {t: bg.median(row["prefill_s"][t]) * 1e3 for t in args.threads}
            row["decode_ms"] = {t: bg.median(row["decode_s"][t]) * 1e3 for t in args.threads}
            row["decode_step_p10_ms"] = {t: bg._pct(row["steps_s"][t], 10) * 1e3 for t in args.threads}
            row["bw_share"] = {t: row["bytes_per_token"] / (bw[t]["fp32"] * 1e9) / (row["decode_ms"][t] / 1e3)
                               for t in args.threads}
            row["GBps"] = {t: row["bytes_per_token"] / 1e9 / (row["decode_ms"][t] / 1e3) for t in args.threads}
            del row["steps_s"]
            if isinstance(runner, LlamaCpp):
                runner.close()
        rows += [ours_row, llama_row]
        del runners, model
        gc.collect()
        log(format_table(rows, meta, checks))

    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["loadavg_end"] = os.getloadavg()
    result = {"meta": meta, "logit_checks": checks, "rows": rows, "table": format_table(rows, meta, checks)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"llamacpp_cpu_{args.layers}l_{time.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out_dir / (stem + '.json')}\n")
    print(result["table"])
    return result


def _n(k, word):
    return f"{k} {word}{'s' if k != 1 else ''}"


def format_table(rows, meta, checks=None):
    threads = meta["threads"]
    tcols = " | ".join(_n(t, "thread") for t in threads)
    tshort = " / ".join(f"{t}t" for t in threads)
    bw = meta["bandwidth_GBps"]
    lines = [f"CPU: {meta['cpu']}; read bandwidth (torch.sum over 1 GiB fp32) "
             + ", ".join(f"{bw[t]['fp32']:.1f} GB/s at {_n(t, 'thread')}" for t in threads)
             + f"; {_n(meta['layers'], 'layer')}, prompt {meta['prompt']}, {meta['new_tokens']} new tokens, "
               f"median of {_n(meta['rounds'], 'round')}; torch {meta['torch']}, llama-cpp-python "
               f"{meta['llama_cpp_python']}",
             "",
             f"| decode ms/token (share of bandwidth limit) | {tcols} | prefill {meta['prompt']} ms ({tshort}) |",
             "|---|" + "---|" * len(threads) + "---|"]

    def label(r):
        return f"{r['model']} {r['precision']}"

    for r in rows:
        if "skipped" in r:
            lines.append(f"| {label(r)} | " + " | ".join("skipped" for _ in threads) + f" | {r['skipped'][:60]} |")
            continue
        cells = [f"{r['decode_ms'][t]:.1f} ({100 * r['bw_share'][t]:.0f}%)" for t in threads]
        pre = " / ".join(f"{r['prefill_ms'][t]:.0f}" for t in threads)
        lines.append(f"| {label(r)} | " + " | ".join(cells) + f" | {pre} |")
    for i in range(0, len(rows) - 1, 2):
        a, b = rows[i], rows[i + 1]
        if "skipped" in a or "skipped" in b:
            continue
        cells = [f"{a['decode_ms'][t] / b['decode_ms'][t]:.2f}" for t in threads]
        pre = " / ".join(f"{a['prefill_ms'][t] / b['prefill_ms'][t]:.2f}" for t in threads)
        lines.append(f"| ours / llama.cpp, {a['precision']} vs {b['precision']} | " + " | ".join(cells)
                     + f" | {pre} |")
    lines.append("")
    lines.append("Ratios are time ours / time llama.cpp (below 1: ours is faster). Weight bytes read per token: "
                 + ", ".join(f"{label(r)} {r['bytes_per_token'] / 1e9:.3f} GB" for r in rows if "bytes_per_token" in r)
                 + ".")
    if checks:
        lines.append("Last-position logits of the prompt, llama.cpp vs ours: " + "; ".join(
            f"{k}: cosine {c['cosine']:.4f}, same top-1 {c['same_top1']}"
            + (f", greedy tokens agree for {c['greedy_prefix_agree']}/{meta['new_tokens']}"
               if "greedy_prefix_agree" in c else "")
            + (f" (cosine to ours bf16: ours {c['ours_vs_bf16_cosine']:.4f}, llama.cpp {c['llama_vs_bf16_cosine']:.4f})"
               if "ours_vs_bf16_cosine" in c else "")
            for k, c in checks.items() if "cosine" in c) + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", default="1,2", help="comma list of thread counts (torch.set_num_threads and "
                   "llama.cpp's n_threads / n_threads_batch)")
    p.add_argument("--prompt", type=int, default=128, help="prompt length (random token ids)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--precisions", default="bf16,int8,int4", help="comma list of bf16,int8,int4 (int8 = ours "
                   "quantize(8) vs q8_0, int4 = quantize(4) vs q4_0)")
    p.add_argument("--head", choices=sorted(HEAD_TYPES), default="f16", help="type of llama.cpp's output tensor in "
                   "the q8_0 / q4_0 files (ours keeps output_layer bf16)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 layer, 8 new tokens, 1 round")
    p.add_argument("--sdist", help=f"llama-cpp-python sdist (.tar.gz or unpacked; default ${SDIST_ENV} or "
                   f"~/.cache/chatglm3-tests/llama_cpp_python-*.tar.gz)")
    p.add_argument("--tokenizer-model", help="tokenizer.model for the GGUF vocabulary (default: the published one "
                   "in ../shared/reference or $CHATGLM_TOKENIZER_MODEL, else a small one trained here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "chatglm_bench"),
                   help="random checkpoint, model folder and GGUF files (reused between runs; shared with "
                        "bench_generate.py)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--name", help="stem of the result file")
    p.add_argument("--_quantize", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers = 1 if "--layers" not in (argv or sys.argv) else args.layers
        args.new_tokens, args.rounds = 8, 1
    try:
        args.threads = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--threads takes a comma list of integers, got {args.threads!r}")
    if not args.threads or min(args.threads) < 1:
        p.error("--threads values must be >= 1")
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in {r[0] for r in PRECISIONS}]
    if bad or not args.precisions:
        p.error(f"--precisions takes bf16, int8, int4, got {args.precisions}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    if args.prompt < 1 or args.layers < 1 or args.rounds < 1:
        p.error("--prompt, --layers and --rounds must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._quantize:
        return _quantize_child(*args._quantize)
    why = missing_requirements(args)
    if why:
        print("bench_llamacpp: skipped: " + "; ".join(why), file=sys.stderr)
        return 0
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
