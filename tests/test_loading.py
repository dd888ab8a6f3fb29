"""loading.py and what ``from_pretrained(..., trust_remote_code=True)`` runs and reads.

* The remote-code files as source (``ast``, not grep), with generate.py and scripts/*.py: no eval/exec/compile, no
  pickle-family loading, ``torch.load`` only with ``weights_only=True``, no opaque blobs (long high-entropy literals,
  base64/bz2/zlib/lzma decoding), no process spawning or raw network modules in the remote code (except the C
  compiler for the CPU kernels), dynamic imports only of literal module names, no invisible/bidirectional characters.
* Importing them, in fresh subprocesses with every socket connection made to fail: no network, no change to global
  torch state (JIT flags, default dtype/device, threads, grad mode, RNG, SDP/TF32 switches), to the environment or to
  the warnings filters; import + load + tokenize + generate with HOME, HF_HOME, TMPDIR and cwd pointed at empty
  temporary folders writes nothing outside the hub cache.
* Checkpoint folders: a broken shard, weight file, index or config.json is a clear error (never a half-loaded model);
  ``model.safetensors`` wins over a ``pytorch_model.bin`` beside it; a malicious pickle in ``pytorch_model.bin`` is
  not executed; ``low_cpu_mem_usage`` loads; a ``config.json`` without ``model_type`` still loads (``auto_map``
  picks the classes).
* Saving: save_pretrained over an older checkpoint leaves no stale weight files, a save that fails half-way keeps
  the old checkpoint loadable, and a saved folder loads in a fresh offline process.

``HOSTILE_CASES`` (``test_hostile_case_inventory``) counts the hostile cases of this file and of test_generation.py,
test_modeling.py, test_quantization.py and test_tokenizer_files.py.
"""
import ast
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from support import (CODE_FILES, REPO, SHARED_REFERENCE, copy_dir, dtype_kwargs, load_model, logits_of, make_model_dir,
                     published_config_dict, random_ids, random_state_dict)

IDS = torch.tensor([[5, 6, 7, 8]])
REMOTE_CODE = [REPO / name for name in CODE_FILES if (REPO / name).exists()]
SCANNED = REMOTE_CODE + [p for p in [REPO / "generate.py", *sorted((REPO / "scripts").glob("*.py"))] if p.exists()]


# =====================================================================================================================
# 1. The remote-code files as source (static checks)
# =====================================================================================================================
def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def _tree(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node):
    """'a.b.c' for Name/Attribute chains, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, _dotted(node.func)


def _imports(tree):
    """(module, name) for every import; name is None for ``import module``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.module, alias.name


def test_scanned_files_exist():
    names = _ids(SCANNED)
    assert "modeling_chatglm.py" in names and "configuration_chatglm.py" in names, names


@pytest.mark.parametrize("path", SCANNED, ids=_ids(SCANNED))
def test_no_eval_exec_compile(path):
    bad = []
    for node, name in _calls(_tree(path)):
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "builtins.compile",
                    "execfile", "runpy.run_path", "runpy.run_module", "code.interact", "pydoc.locate"):
            bad.append(f"line {node.lineno}: {name}()")
        if name == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in ("eval", "exec", "compile", "__import__"):
            bad.append(f"line {node.lineno}: getattr(..., {node.args[1].value!r})")
    assert not bad, bad


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "pickletools"}


@pytest.mark.parametrize("path", SCANNED, ids=_ids(SCANNED))
def test_no_pickle_loading(path):
    tree = _tree(path)
    bad = [f"import {m}{'.' + n if n else ''}" for m, n in _imports(tree) if m.split(".")[0] in PICKLE_MODULES]
    for node, name in _calls(tree):
        if name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in PICKLE_MODULES | {"np", "numpy"}:
            bad.append(f"line {node.lineno}: {name}()")
        if name.endswith("Unpickler"):
            bad.append(f"line {node.lineno}: {name}()")
    assert not bad, bad


def _torch_load_names(tree):
    """Names under which torch.load is reachable in this file (``torch.load``, ``from torch import load as x``)."""
    names = {"torch.load", "torch.serialization.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            names.update(a.asname or a.name for a in node.names if a.name == "load")
        if isinstance(node, ast.Import):
            names.update(f"{a.asname}.load" for a in node.names if a.name == "torch" and a.asname)
    return names


@pytest.mark.parametrize("path", SCANNED, ids=_ids(SCANNED))
def test_torch_load_only_with_weights_only_true(path):
    tree = _tree(path)
    names = _torch_load_names(tree)
    bad = []
    for node, name in _calls(tree):
        if name in names:
            ok = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                     for kw in node.keywords)
            if not ok:
                bad.append(f"line {node.lineno}: {name}() without weights_only=True")
    assert not bad, bad


def _entropy(s):
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


BLOB_CHARS = re.compile(r"[A-Za-z0-9+/=_\-]+")


DECODER_MODULES = {"base64", "binascii", "bz2", "zlib", "lzma", "gzip", "zipimport", "uu", "quopri"}


def blob_findings(tree):
    bad = []
    for m, n in _imports(tree):
        if m.split(".")[0] in DECODER_MODULES:
            bad.append(f"import {m}{'.' + n if n else ''}")
    for node, name in _calls(tree):
        last = name.split(".")[-1]
        if last in ("b64decode", "b32decode", "b16decode", "b85decode", "a85decode", "decodebytes", "decompress",
                    "unhexlify", "a2b_base64", "a2b_hex"):
            bad.append(f"line {node.lineno}: {name}()")
        if name == "codecs.decode" or (last == "fromhex" and node.args and isinstance(node.args[0], ast.Constant)
                                       and len(str(node.args[0].value)) > 64):
            bad.append(f"line {node.lineno}: {name}()")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes) and len(node.value) > 64:
            bad.append(f"line {node.lineno}: bytes literal of {len(node.value)} bytes")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= 128:
            s = node.value
            for token in re.findall(r"\S{96,}", s):  # long runs without whitespace
                if BLOB_CHARS.fullmatch(token) and _entropy(token) > 4.0:
                    bad.append(f"line {node.lineno}: high-entropy literal {token[:40]}... ({len(token)} chars)")
            if _entropy(s) > 5.5:
                bad.append(f"line {node.lineno}: string literal with entropy {_entropy(s):.2f} bits/char")
    return bad


@pytest.mark.parametrize("path", SCANNED, ids=_ids(SCANNED))
def test_no_opaque_blobs(path):
    assert not blob_findings(_tree(path))


def test_blob_detector_catches_the_original_kernel_blob():
    """The original quantization.py shipped its CUDA kernels as a bz2+base64 literal; the scan must catch that."""
    import base64
    import bz2

    payload = base64.b64encode(bz2.compress(bytes(range(256)) * 40)).decode()
    source = f"import bz2, base64\nquantization_code = {payload!r}\nkernels = bz2.decompress(base64.b64decode(quantization_code))\n"
    findings = blob_findings(ast.parse(source))
    assert any("import bz2" in f for f in findings) and any("high-entropy" in f for f in findings)
    assert any("decompress" in f for f in findings) and any("b64decode" in f for f in findings)
    assert not blob_findings(ast.parse('"""' + "An ordinary docstring with words. " * 40 + '"""'))


SPAWN = {"subprocess", "pty", "multiprocessing", "pexpect", "sh"}


NETWORK = {"socket", "ssl", "urllib.request", "urllib3", "http.client", "http.server", "requests", "httpx", "aiohttp",
           "ftplib", "smtplib", "telnetlib", "paramiko", "websocket", "websockets", "xmlrpc.client"}


# The one process the remote code may start: the C compiler building cpu_kernels.py's CPU kernels (documented in
# README's SECURITY section), from that one function, with a literal argument list and no shell.
COMPILER_SPAWN = ("cpu_kernels.py", "_compile")


def _compiler_spawn_findings(tree):
    allowed = {id(node) for func in ast.walk(tree) if isinstance(func, ast.FunctionDef) and func.name == COMPILER_SPAWN[1]
               for node, _ in _calls(func)}
    bad = [f"from subprocess import {n}" for m, n in _imports(tree) if m == "subprocess" and n is not None]
    for node, name in _calls(tree):
        if not name.startswith("subprocess."):
            continue
        if id(node) not in allowed or name != "subprocess.run":
            bad.append(f"line {node.lineno}: {name}() outside {COMPILER_SPAWN[1]}()")
        elif not (node.args and isinstance(node.args[0], ast.List)) or any(
                k.arg in ("shell", "executable", "preexec_fn") for k in node.keywords):
            bad.append(f"line {node.lineno}: subprocess.run() without a literal argument list, or with a shell")
    return bad


@pytest.mark.parametrize("path", REMOTE_CODE, ids=_ids(REMOTE_CODE))
def test_remote_code_spawns_no_processes_and_opens_no_sockets(path):
    """The remote code may reach the network only through huggingface_hub (documented: the tokenizer fetches a
    missing tokenizer.model from the hub), never by itself, and starts no process except the C compiler for the
    CPU quantization kernels (one function, fixed argument list, no shell)."""
    tree = _tree(path)
    spawn_ok = {"subprocess"} if path.name == COMPILER_SPAWN[0] else set()
    bad = [f"import {m}" for m, n in _imports(tree)
           if (m.split(".")[0] in SPAWN and m not in spawn_ok) or m in NETWORK
           or m.split(".")[0] in {x for x in NETWORK if "." not in x}]
    if spawn_ok:
        bad += _compiler_spawn_findings(tree)
        assert any(isinstance(f, ast.FunctionDef) and f.name == COMPILER_SPAWN[1] for f in ast.walk(tree))
    for node, name in _calls(tree):
        if name in ("os.system", "os.popen", "os.fork", "os.forkpty", "os.startfile", "os.kill", "os.killpg") \
                or re.fullmatch(r"os\.(exec|spawn|posix_spawn)\w*", name):
            bad.append(f"line {node.lineno}: {name}()")
        if name in ("importlib.import_module", "import_module") and not (
                node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            bad.append(f"line {node.lineno}: {name}() of a computed module name")
    assert not bad, bad


@pytest.mark.parametrize("path", SCANNED, ids=_ids(SCANNED))
def test_no_invisible_or_bidi_characters(path):
    """Trojan-source defence: no bidirectional overrides or zero-width characters anywhere in the source."""
    bad = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for ch in line:
            if unicodedata.category(ch) == "Cf" or ch in "\u2028\u2029":
                bad.append(f"line {lineno}: U+{ord(ch):04X} {unicodedata.name(ch, '?')}")
    assert not bad, bad


@pytest.mark.parametrize("path", REMOTE_CODE, ids=_ids(REMOTE_CODE))
def test_no_global_state_changes_at_module_level(path):
    """Module-level statements must not call torch/global setters (the original set torch._C._jit_* flags)."""
    bad = []
    for stmt in _tree(path).body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node, name in _calls(stmt):
            if re.match(r"torch\.(_C\._jit_set|_C\._jit_override|set_|use_deterministic|manual_seed|backends\.)", name) \
                    or name in ("os.environ.update", "os.putenv", "os.chdir", "warnings.simplefilter",
                                "warnings.filterwarnings", "logging.basicConfig", "sys.setrecursionlimit"):
                bad.append(f"line {node.lineno}: {name}()")
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    name = _dotted(target) or (_dotted(target.value) if isinstance(target, ast.Subscript) else "")
                    if name.startswith(("torch.", "os.environ", "sys.")):
                        bad.append(f"line {node.lineno}: assignment to {name}")
    assert not bad, bad


def test_no_binary_files_tracked_in_the_repository():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    binary_ext = (".so", ".dll", ".dylib", ".pyd", ".pyc", ".pyo", ".fatbin", ".cubin", ".ptx", ".o", ".a", ".pkl",
                  ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".exe", ".whl", ".egg")
    assert not [f for f in files if f.lower().endswith(binary_ext)]


# =====================================================================================================================
# 2. Importing and using them, in fresh subprocesses
# =====================================================================================================================
_CHILD = textwrap.dedent(r'''
    import json, os, socket, sys, traceback, warnings, logging
    attempts = []

    def deny(*args, **kwargs):
        attempts.append("".join(traceback.format_stack(limit=12)[:-1]))
        raise OSError("network disabled by test_loading")

    socket.socket.connect = deny
    socket.socket.connect_ex = deny
    socket.create_connection = deny
    socket.getaddrinfo = deny

    import torch, transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    def flag(setter):
        old = setter(True)
        setter(old)
        return old

    def snapshot():
        C = torch._C
        s = {
            "default_dtype": str(torch.get_default_dtype()),
            "default_device": str(torch.get_default_device()) if hasattr(torch, "get_default_device") else None,
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "grad_enabled": torch.is_grad_enabled(),
            "inference_mode": torch.is_inference_mode_enabled(),
            "anomaly": torch.is_anomaly_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": [torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                      torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32],
            "sdp": [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                    torch.backends.cuda.math_sdp_enabled()],
            "jit_profiling_mode": flag(C._jit_set_profiling_mode),
            "jit_profiling_executor": flag(C._jit_set_profiling_executor),
            "jit_fuse_cpu": C._jit_can_fuse_on_cpu(),
            "jit_fuse_gpu": C._jit_can_fuse_on_gpu(),
            "jit_texpr": C._jit_texpr_fuser_enabled(),
            "jit_optimize": C._get_graph_executor_optimize(),
            "environ": dict(os.environ),
            "warnings_filters": [repr(f) for f in warnings.filters],
            "root_log_level": logging.getLogger().level,
            "recursion_limit": sys.getrecursionlimit(),
            "cwd": os.getcwd(),
        }
        s["rng"] = torch.get_rng_state().double().sum().item()
        return s

    # Import what the remote code imports from the libraries first: their own import-time effects are not ours.
    import transformers.modeling_utils, transformers.modeling_outputs, transformers.generation  # noqa: E401
    import transformers.tokenization_utils_base, transformers.utils.logging  # noqa: E401
    from transformers import PreTrainedModel, PreTrainedTokenizer, PreTrainedTokenizerFast  # noqa: F401
    for optional in ("transformers.cache_utils", "transformers.generation.utils", "transformers.tokenization_utils",
                     "sentencepiece", "tokenizers", "tokenizers.models", "safetensors.torch"):
        try:
            __import__(optional)
        except ImportError:
            pass

    folder, out = sys.argv[1], sys.argv[2]
    result = {"before": snapshot()}
    get_class_from_dynamic_module("configuration_chatglm.ChatGLMConfig", folder)
    model_cls = get_class_from_dynamic_module("modeling_chatglm.ChatGLMForConditionalGeneration", folder)
    if os.path.exists(os.path.join(folder, "tokenization_chatglm.py")):
        get_class_from_dynamic_module("tokenization_chatglm.ChatGLMTokenizer", folder)
    result["after_import"] = snapshot()
    result["import_attempts"] = list(attempts)

    if sys.argv[3] == "use":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.tensor([[5, 6, 7, 8]])
        if os.path.exists(os.path.join(folder, "tokenizer.model")):
            for fast in (False, True):
                tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=fast)
                enc = tok(["hello world", "你好"], return_tensors="pt", padding=True)
                tok.decode(enc["input_ids"][0])
            ids = enc["input_ids"] % model.config.padded_vocab_size
            mask = enc["attention_mask"]
        else:
            mask = torch.ones_like(ids)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        result["after_use"] = snapshot()
    result["attempts"] = attempts
    with open(out, "w") as f:
        json.dump(result, f, default=str)
''')


def _clean_env(tmp_path):
    home, hf_home, tmp, cwd = (tmp_path / n for n in ("home", "hf-home", "tmp", "cwd"))
    for d in (home, hf_home, tmp, cwd):
        d.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_", "XDG_", "TORCH_", "TRITON_", "PYTORCH_KERNEL_CACHE"))
           and k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONPATH", "HUGGINGFACE_HUB_CACHE")}
    env.update(HOME=str(home), HF_HOME=str(hf_home), TMPDIR=str(tmp), TMP=str(tmp), TEMP=str(tmp))
    return env, {"home": home, "hf_home": hf_home, "tmp": tmp, "cwd": cwd}


def _listing(root):
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    """A tiny model folder with the tokenizer files (when available), as a user would download it."""
    folder = make_model_dir(tmp_path_factory.mktemp("full") / "chatglm3-tiny")
    model_file = SHARED_REFERENCE / "tokenizer.model"
    if (REPO / "tokenization_chatglm.py").exists() and model_file.exists():
        shutil.copyfile(model_file, folder / "tokenizer.model")
    return folder


def _run_child(folder, tmp_path, mode):
    env, dirs = _clean_env(tmp_path)
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), mode], cwd=dirs["cwd"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), dirs


def _diff(a, b, ignore=()):
    return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}


def test_import_does_no_network_and_changes_no_global_state(full_dir, tmp_path):
    result, _ = _run_child(full_dir, tmp_path, "import")
    assert not result["import_attempts"], result["import_attempts"]
    changed = _diff(result["before"], result["after_import"])
    if "warnings_filters" in changed:
        before, after = changed["warnings_filters"]
        changed["warnings_filters"] = [f for f in after if f not in before]
    if "environ" in changed:
        before, after = changed["environ"]
        changed["environ"] = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                              if before.get(k) != after.get(k)}
    assert not changed, changed


def test_load_tokenize_generate_writes_nothing_outside_the_hub_cache(full_dir, tmp_path):
    model_files = _listing(full_dir)
    result, dirs = _run_child(full_dir, tmp_path, "use")
    assert not result["attempts"], result["attempts"]
    # generate restores what it changes (grad mode, default dtype ...); RNG may be consumed by loading
    changed = _diff(result["after_import"], result["after_use"], ignore=("rng", "environ"))
    assert not changed, changed
    for name in ("home", "cwd", "tmp"):
        assert not _listing(dirs[name]), (name, sorted(_listing(dirs[name]))[:20])
    assert _listing(full_dir) == model_files, "the model folder was modified"
    assert _listing(dirs["hf_home"]), "the remote code should have been copied into the hub cache"


# =====================================================================================================================
# 3. Checkpoint formats and broken checkpoints: shards, weight files, config.json
# =====================================================================================================================
def test_safetensors_preferred_over_bin_with_different_weights(tmp_path):
    folder = make_model_dir(tmp_path / "both", seed=1)  # model.safetensors holds seed-1 weights
    st_model = load_model(folder)
    other = random_state_dict(st_model, seed=2)
    torch.save(other, folder / "pytorch_model.bin")
    loaded = load_model(folder)
    for key, value in st_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the .bin is a valid, different checkpoint: alone it loads the other weights
    (folder / "model.safetensors").unlink()
    from_bin = load_model(folder)
    key = "transformer.output_layer.weight"
    assert torch.equal(from_bin.state_dict()[key], other[key])
    assert not torch.equal(from_bin.state_dict()[key], st_model.state_dict()[key])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_bin_checkpoint_is_not_executed(tmp_path):
    """The model code never unpickles; transformers' loader runs torch.load(weights_only=True) on torch >= 2.6,
    which refuses arbitrary callables. Loading must fail (clearly) and the payload must not run."""
    folder = make_model_dir(tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"transformer.embedding.word_embeddings.weight": _Evil(marker)}, buf)
    (folder / "pytorch_model.bin").write_bytes(buf.getvalue())
    with pytest.raises(Exception):
        load_model(folder)
    assert not marker.exists(), "a pickle payload ran while loading pytorch_model.bin"


def test_low_cpu_mem_usage_load(tiny_dir, tiny_model):
    model = load_model(tiny_dir, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in model.parameters())
    ids = random_ids()
    torch.testing.assert_close(logits_of(model, ids), logits_of(tiny_model, ids), atol=0, rtol=0)


def _write_bin_shards(folder, model, n=3):
    """A sharded pytorch_model-*.bin checkpoint written by hand (transformers 5 only writes safetensors)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(sd)
    chunks = [keys[i::n] for i in range(n)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        torch.save({k: sd[k] for k in chunk}, folder / name)
        weight_map.update({k: name for k in chunk})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def sharded_dirs(tiny_dir, tiny_model, tmp_path_factory):
    st = copy_dir(tiny_dir, tmp_path_factory.mktemp("st") / "m")
    os.remove(st / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tiny_model.save_pretrained(st, max_shard_size="60KB", safe_serialization=True)
        except TypeError:
            tiny_model.save_pretrained(st, max_shard_size="60KB")
    assert len(list(st.glob("model-*-of-*.safetensors"))) >= 3
    pt = copy_dir(tiny_dir, tmp_path_factory.mktemp("pt") / "m")
    os.remove(pt / "model.safetensors")
    _write_bin_shards(pt, tiny_model)
    return {"safetensors": st, "bin": pt}


def _second_shard(folder):
    return sorted(p for p in folder.iterdir() if "-00002-of-" in p.name)[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


SHARD_FAULTS = {
    "missing": lambda p: p.unlink(),
    "truncated": _truncate,
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "text": lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"),  # LFS pointer
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("fault", list(SHARD_FAULTS))
def test_broken_shard_is_a_clear_error(sharded_dirs, tiny_model, tmp_path, fmt, fault):
    folder = copy_dir(sharded_dirs[fmt], tmp_path / "m")
    # sanity: the intact folder loads the right weights
    shard = _second_shard(folder)
    SHARD_FAULTS[fault](shard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            load_model(folder)
    message = str(info.value)
    assert message.strip(), f"{type(info.value).__name__} without a message for a {fault} {fmt} shard"
    if fault == "missing":
        assert shard.name in message


def test_intact_shards_load_the_same_weights(sharded_dirs, tiny_model):
    for folder in sharded_dirs.values():
        loaded = load_model(folder)
        for key, value in tiny_model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (folder, key)


def test_index_json_broken_is_a_clear_error(sharded_dirs, tmp_path):
    folder = copy_dir(sharded_dirs["safetensors"], tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(Exception) as info:
        load_model(folder)
    assert str(info.value).strip()


SINGLE_FILE_FAULTS = {
    "truncated-tail": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "truncated-header": lambda p: p.write_bytes(p.read_bytes()[:6]),
    "garbage": lambda p: p.write_bytes(os.urandom(2048)),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("fault", list(SINGLE_FILE_FAULTS))
def test_broken_single_weight_file_is_a_clear_error(tiny_dir, tmp_path, fault):
    folder = copy_dir(tiny_dir, tmp_path / "m")
    SINGLE_FILE_FAULTS[fault](folder / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            load_model(folder)
    assert str(info.value).strip()


def test_missing_tensor_in_checkpoint_is_an_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_dir(tiny_dir, tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    del sd[key]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_model(folder)


# Missing fields: the ChatGLMConfig default applies; if that contradicts the weights, loading must fail.
MISSING_FIELD_CASES = [
    ("num_layers", ()),
    ("padded_vocab_size", ()),
    ("hidden_size", ()),
    ("kv_channels", ()),
    ("multi_query_group_num", ()),
    ("ffn_hidden_size", ()),
]


@pytest.mark.parametrize("field", [pytest.param(f, marks=m) for f, m in MISSING_FIELD_CASES])
def test_config_json_missing_field(tiny_dir, tmp_path, field):
    folder = copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg[field]
    (folder / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, RuntimeError, OSError)) as info:
            load_model(folder)
    assert str(info.value).strip()


def test_config_json_missing_model_type_still_loads(tiny_dir, tiny_model, tmp_path):
    folder = copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["model_type"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(IDS).logits, tiny_model(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "null"])
def test_config_json_not_an_object_is_an_error(tiny_dir, tmp_path, text):
    folder = copy_dir(tiny_dir, tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(Exception) as info:
        load_model(folder)
    assert str(info.value).strip()


# =====================================================================================================================
# 4. save_pretrained: over an older checkpoint, failing half-way, loaded in a fresh process
# =====================================================================================================================
def _save(model, folder, fmt, sharded):
    kwargs = {"max_shard_size": "60KB"} if sharded else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "bin-by-hand":
            model.save_pretrained(folder)  # code + config
            for p in list(Path(folder).glob("model*.safetensors*")):
                p.unlink()
            if sharded:
                _write_bin_shards(Path(folder), model)
            else:
                torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
            return
        try:
            model.save_pretrained(folder, safe_serialization=(fmt == "safetensors"), **kwargs)
        except TypeError:
            model.save_pretrained(folder, **kwargs)


def _weight_files(folder):
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(("model", "pytorch_model")) and p.suffix in (".safetensors", ".bin", ".json"))


def _referenced(folder):
    """The weight files the checkpoint that transformers would load consists of (with its index)."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).exists():
            return {single}
        if (folder / index).exists():
            return {index} | set(json.loads((folder / index).read_text())["weight_map"].values())
    return set()


# (old format, old sharded, new format, new sharded). "bin" = save_pretrained(safe_serialization=False), which
# transformers 5 ignores (it always writes safetensors); "bin-by-hand" = torch.save'd .bin files.
SAVE_OVER_CASES = [
    ("bin-by-hand", True, "safetensors", False),
    ("bin-by-hand", False, "safetensors", True),
    ("safetensors", True, "safetensors", False),
    ("safetensors", False, "safetensors", True),
    ("safetensors", True, "safetensors", True),
    ("safetensors", False, "bin", False),
    ("safetensors", True, "bin", False),
    ("bin", False, "bin", True),
]


@pytest.fixture(scope="module")
def old_and_new(tiny_model, tiny_dir):
    new = load_model(tiny_dir)
    new.load_state_dict(random_state_dict(new, seed=123))
    return tiny_model, new


@pytest.mark.parametrize("old_fmt,old_sharded,new_fmt,new_sharded", SAVE_OVER_CASES,
                         ids=[f"{a}{'-sharded' if b else ''}->{c}{'-sharded' if d else ''}"
                              for a, b, c, d in SAVE_OVER_CASES])
def test_save_over_old_checkpoint_leaves_no_stale_weights(old_and_new, tmp_path, old_fmt, old_sharded, new_fmt,
                                                          new_sharded):
    old, new = old_and_new
    folder = tmp_path / "ckpt"
    _save(old, folder, old_fmt, old_sharded)
    before = _weight_files(folder)
    _save(new, folder, new_fmt, new_sharded)
    after = _weight_files(folder)
    stale = sorted(set(after) - _referenced(folder))
    loaded = load_model(folder)
    same = all(torch.equal(loaded.state_dict()[k], v) for k, v in new.state_dict().items())
    assert same and not stale, f"new weights loaded={same}, stale files {stale} (before {before}, after {after})"
    # both loaders agree (no older file is picked up when the other format is asked for)
    for use_safetensors in (True, False):
        if not any(n.endswith(".safetensors" if use_safetensors else ".bin") for n in after):
            continue
        try:
            other = load_model(folder, use_safetensors=use_safetensors)
        except TypeError:  # pragma: no cover - very old transformers
            continue
        for k, v in new.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), (use_safetensors, k)


def test_failed_save_keeps_the_old_checkpoint_loadable(tiny_model, tiny_dir, tmp_path, monkeypatch):
    """If writing the new weights fails half-way, the folder must still load (old or new weights, never a mix)."""
    folder = tmp_path / "ckpt"
    _save(tiny_model, folder, "safetensors", False)
    new = load_model(tiny_dir)
    new.load_state_dict(random_state_dict(new, seed=9))

    import inspect

    import transformers.modeling_utils as modeling_utils

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", broken_save)  # the safetensors writer transformers uses
    kwargs = {}
    if "save_function" in inspect.signature(modeling_utils.PreTrainedModel.save_pretrained).parameters:
        kwargs["save_function"] = broken_save  # the .bin writer (transformers 4.30 saves .bin by default)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="disk full"):
            new.save_pretrained(folder, **kwargs)
    monkeypatch.undo()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".stale")], "temporary folder left behind"
    loaded = load_model(folder)
    sd = loaded.state_dict()
    is_old = all(torch.equal(sd[k], v) for k, v in tiny_model.state_dict().items())
    is_new = all(torch.equal(sd[k], v) for k, v in new.state_dict().items())
    assert is_old or is_new


_LOAD_CHILD = r"""
import json, sys, torch, transformers
folder, out = sys.argv[1], sys.argv[2]
kwargs = {k: getattr(torch, v) for k, v in json.loads(sys.argv[3]).items()}
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
ids = torch.load(out, weights_only=True)["input_ids"]
with torch.no_grad():
    logits = model.eval()(input_ids=ids).logits
torch.save({"input_ids": ids, "logits": logits, "cls": type(model).__name__,
            "module": type(model).__module__}, out)
"""


def test_save_pretrained_folder_loads_in_fresh_offline_process(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    out = tmp_path / "saved"
    try:
        model.save_pretrained(out, safe_serialization=True)
    except TypeError:  # safe_serialization removed (always safetensors)
        model.save_pretrained(out)
    for name in CODE_FILES:  # every remote-code file; the fresh process below imports them from its module cache
        assert (out / name).read_bytes() == (REPO / name).read_bytes(), name
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == published_config_dict()["auto_map"]
    assert cfg["model_type"] == "chatglm"

    ids = random_ids(2, 9)
    io_file = tmp_path / "io.pt"
    torch.save({"input_ids": ids}, io_file)
    home = tmp_path / "hf-home"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home),
               HF_MODULES_CACHE=str(home / "modules"), PYTHONPATH="")
    dtype_arg = {k: "float32" for k in dtype_kwargs(None)}
    proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(out), str(io_file), json.dumps(dtype_arg)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(io_file, weights_only=False)
    assert child["cls"] == "ChatGLMForConditionalGeneration"
    assert child["module"].startswith("transformers_modules.")  # loaded through trust_remote_code
    torch.testing.assert_close(child["logits"].float(), logits_of(model, ids), atol=1e-6, rtol=0)


# =====================================================================================================================
# Inventory of the hostile cases (here and in the other unit files)
# =====================================================================================================================
def hostile_cases():
    """The hostile cases per kind; the tables live beside their tests (imported here, as pytest imported them)."""
    from test_generation import FORWARD_CASES, GENERATE_CASES
    from test_modeling import CONFIG_CASES
    from test_tokenizer_files import BAD_TOKENIZER_FILES

    return {
        "forward inputs": len(FORWARD_CASES) + 4 + 4,  # + small id dtypes + mask dtypes
        "generate inputs": len(GENERATE_CASES) + 1,  # + max_new_tokens=0
        "masks / long prompts / positions": 4,
        "broken shards": 2 * len(SHARD_FAULTS) + 1,
        "broken single weight file / missing tensor": len(SINGLE_FILE_FAULTS) + 1,
        "config.json": len(CONFIG_CASES) + len(MISSING_FIELD_CASES) + 1 + 4,
        "quantized checkpoint bits": 2,
        "tokenizer.model": 2 * len(BAD_TOKENIZER_FILES) + 1,
        "faults during generate / threads": 4,
        "save over old checkpoint": len(SAVE_OVER_CASES) + 1,
    }


def test_hostile_case_inventory(capsys):
    cases = hostile_cases()
    total = sum(cases.values())
    with capsys.disabled():
        print(f"\n[hostile cases] {total} in all: " + ", ".join(f"{k} {v}" for k, v in cases.items()))
    assert all(cases.values()) and total >= 100
