"""The llama-cpp-python source distribution and llama.cpp's ``convert_hf_to_gguf.py`` inside it, for
tests/test_clients.py and benchmarks/bench_llamacpp.py. Nothing is downloaded here (``.ci/run``'s clients stage
fetches the sdist with ``pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36``)."""
import glob
import os
import shutil
import tarfile
from pathlib import Path

SDIST_ENV = "LLAMA_CPP_PYTHON_SDIST"
SCRIPT = "vendor/llama.cpp/convert_hf_to_gguf.py"
CONVERTER_FILES = (SCRIPT, "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


def find_sdist(explicit=None):
    """The sdist (.tar.gz, or its unpacked folder): ``explicit``, else ``$LLAMA_CPP_PYTHON_SDIST``, else the newest
    cached copy in ``$XDG_CACHE_HOME/chatglm3-tests/``; None where the one named does not exist or none is found."""
    for named in (explicit, os.environ.get(SDIST_ENV)):
        if named:
            return Path(named) if Path(named).exists() else None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatglm3-tests"
    found = sorted(glob.glob(str(cache / "llama_cpp_python-*.tar.gz")))
    return Path(found[-1]) if found else None


def converter_script(sdist, dest):
    """Path of convert_hf_to_gguf.py with its conversion/ and gguf-py/ beside it: in an unpacked sdist as it is,
    else extracted from the tarball into ``dest`` (once: a later call with the same ``dest`` reuses it)."""
    sdist, dest = Path(sdist), Path(dest)
    if sdist.is_dir():
        found = list(sdist.glob(f"**/{SCRIPT}"))
    else:
        found = list(dest.glob(f"*/{SCRIPT}"))
        if not (found and (dest / ".complete").exists()):
            shutil.rmtree(dest, ignore_errors=True)
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers()
                           if (m.isfile() or m.isdir()) and any(f in m.name for f in CONVERTER_FILES)]
                tar.extractall(dest, members=members)
            found = list(dest.glob(f"*/{SCRIPT}"))
            (dest / ".complete").write_text("")
    if not found:
        raise FileNotFoundError(f"{sdist} holds no {SCRIPT}")
    return found[0]
