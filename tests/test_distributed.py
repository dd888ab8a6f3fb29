"""Tensor parallelism and FSDP2 on 2 local CPU processes (gloo), launched with ``python -m torch.distributed.run``.

Each launch runs tests/distributed_worker.py on a tiny random checkpoint and compares the distributed model with
the same checkpoint loaded in one process; the launches are bounded in time (no hang can stall the suite)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import load_model, make_model_dir

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT = 240  # seconds for the one torchrun launch (20-40 s here on 2 shared cores)


def _has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _gloo():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available")


def _has_tp():
    """transformers 5.x (transformers.distributed: DTensor styles) or 4.5x (integrations.tensor_parallel: styles
    that slice each checkpoint tensor, torch >= 2.5); both take styles registered by name."""
    if _has("transformers.distributed.tensor_parallel"):
        return True
    try:
        from transformers.integrations import tensor_parallel
    except ImportError:
        return False
    return hasattr(tensor_parallel.TensorParallelLayer, "partition_tensor") and "colwise" in dict(
        tensor_parallel.ParallelInterface._global_mapping)


needs_tp = pytest.mark.skipif(not _has_tp(), reason="this transformers has no tensor parallelism with registrable "
                                                    "styles (tp_plan)")


def launch(out, **jobs):
    """Run the worker's ``jobs`` (mode -> folder) in one 2-process launch; -> {mode: [rank 0 result, rank 1 result]}."""
    Path(out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out)] + [f"{mode}={folder}" for mode, folder in jobs.items()]
    # Own process group: on a timeout the launcher and both workers are ended together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {sorted(jobs)} did not finish in {LAUNCH_TIMEOUT} s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"torchrun {sorted(jobs)} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return {mode: [json.loads((Path(out) / f"{mode}-rank{r}.json").read_text()) for r in range(2)] for mode in jobs}


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        import torch.distributed.checkpoint  # noqa: F401
        return True
    except ImportError:
        return False


def _has_hf_fsdp():
    try:
        import inspect

        from transformers.distributed import DistributedConfig
        return "fsdp_size" in inspect.signature(DistributedConfig).parameters
    except ImportError:
        return False


needs_fsdp2 = pytest.mark.skipif(not _has_fully_shard(),
                                 reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
needs_hf_fsdp = pytest.mark.skipif(not _has_hf_fsdp(), reason="this transformers has no FSDP2 in from_pretrained "
                                                              "(DistributedConfig(fsdp_size=...))")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One launch for every check this version supports (each launch costs ~10 s of process start and loading)."""
    if not _gloo():
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = tmp_path_factory.mktemp("distributed")
    model = make_model_dir(root / "model")
    jobs = {}
    if _has_tp():
        cases = root / "refused"
        make_model_dir(cases / "one_group", multi_query_group_num=1)  # 1 key/value group over 2 ranks
        quantized = make_model_dir(cases / "quantized")
        tiny = load_model(quantized)
        tiny.quantize(8)
        tiny.save_pretrained(quantized)
        jobs.update(tp=model, errors=cases)
    if _has_fully_shard():
        jobs["fsdp"] = model
        if _has_hf_fsdp():
            jobs["fsdp_hf"] = model
    if not jobs:
        pytest.skip("neither tensor parallelism nor FSDP2 is available here")
    return launch(root / "out", **jobs)


@pytest.fixture(scope="module")
def tp_results(results):
    return results["tp"]


@pytest.fixture(scope="module")
def fsdp_results(results):
    return results["fsdp"]


@needs_gloo
@needs_tp
def test_tp_logits_match_single_process(tp_results):
    for res in tp_results:
        assert res["world"] == 2
        assert res["logits_max_diff"] <= 1e-5, res
        if "distributed_config_logits_diff" in res:  # 5.x: distributed_config=DistributedConfig(tp_size=2)
            assert res["distributed_config_logits_diff"] <= 1e-5, res


@needs_gloo
@needs_tp
def test_tp_greedy_tokens_and_cache(tp_results):
    for res in tp_results:
        assert res["new_tokens"] == 12
        assert res["greedy_equal"], res  # identical to the single-process model
        assert res["greedy_nocache_equal"], res  # the cache path equals recomputing everything


@needs_gloo
@needs_tp
def test_tp_each_rank_holds_half_the_blocks(tp_results):
    from support import TINY_CONFIG as cfg

    head_dim = cfg["kv_channels"]
    fused = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * head_dim
    for res in tp_results:
        assert 0.45 <= res["block_fraction"] <= 0.55, res  # layer norms stay replicated
        assert res["qkv_local_rows"] == [fused // 2, cfg["hidden_size"]]


@needs_gloo
@needs_tp
def test_tp_training_step_and_save(tp_results):
    for res in tp_results:
        assert res["loss_diff"] <= 1e-5, res
        assert res["grad_max_diff"] <= 1e-5, res
    saved = tp_results[0]
    assert saved["saved_keys_equal"] and saved["saved_max_diff"] == 0.0, saved  # published keys and layout


@needs_gloo
@needs_tp
def test_tp_refuses_what_it_cannot_split(results):
    for res in results["errors"]:
        assert res["one_group"].startswith("ValueError") and "key/value groups" in res["one_group"], res
        assert res["quantized"].startswith("ValueError") and "quantized" in res["quantized"], res


@needs_gloo
@needs_fsdp2
def test_fsdp2_training_step_matches_single_process(fsdp_results):
    for res in fsdp_results:
        assert res["param_fraction"] == pytest.approx(0.5, abs=0.02), res  # every parameter sharded over 2 ranks
        assert res["loss_diff"] <= 1e-5, res
        assert res["grad_max_diff"] <= 1e-5, res
        assert res["step_max_diff"] <= 1e-5, res


@needs_gloo
@needs_fsdp2
def test_fsdp2_sharded_save_reloads(fsdp_results):
    for res in fsdp_results:
        assert res["shard_files"] == ["__0_0.distcp", "__1_0.distcp"], res  # one file per rank
        assert res["reload_max_diff"] == 0.0, res
    saved = fsdp_results[0]  # get_model_state_dict(full_state_dict=True) + save_pretrained on rank 0
    assert saved["full_save_keys_equal"] and saved["full_save_max_diff"] == 0.0, saved


@needs_gloo
@needs_fsdp2
@needs_hf_fsdp
def test_transformers_fsdp2_plan_step_and_save(results):
    """from_pretrained(distributed_config=DistributedConfig(fsdp_size=2)) with the config's base_model_fsdp_plan."""
    for res in results["fsdp_hf"]:
        assert res["sharded_blocks"] == 2, res  # every GLMBlock its own FSDP unit
        assert res["param_fraction"] == pytest.approx(0.5, abs=0.02), res
        assert res["loss_diff"] <= 1e-5 and res["grad_max_diff"] <= 1e-5, res
    saved = results["fsdp_hf"][0]  # save_pretrained gathers on rank 0; the folder loads in one process
    assert saved["saved_keys_equal"] and saved["saved_max_diff"] == 0.0, saved


def test_tp_degree_checks(tiny_model):
    """The checks every tensor-parallel load runs first (no processes needed): whole key/value groups per rank."""
    import copy

    check = sys.modules[type(tiny_model).__module__].check_tensor_parallel
    config = tiny_model.config  # 4 heads, 2 key/value groups, ffn 96
    check(config, 1)
    check(config, 2)
    with pytest.raises(ValueError, match="key/value groups"):
        check(config, 4)
    with pytest.raises(ValueError, match="key/value groups"):
        check(config, 3)
    for field, value, words in (("add_bias_linear", True, "add_bias_linear"), ("pre_seq_len", 4, "prefixes"),
                                ("quantization_bit", 4, "quantized")):
        changed = copy.deepcopy(config)
        setattr(changed, field, value)
        with pytest.raises(ValueError, match=words):
            check(changed, 2)
