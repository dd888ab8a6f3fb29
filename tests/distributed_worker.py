"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo) by tests/test_distributed.py; writes one JSON per rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR MODE=FOLDER...

MODE: tp (tensor parallelism), errors (FOLDER of checkpoints TP must refuse), fsdp (fully_shard applied directly),
fsdp_hf (transformers' DistributedConfig(fsdp_size=2)).

Every check compares the distributed model with the same checkpoint loaded in one process (no parallelism)."""
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _ids():
    return torch.tensor([[5, 9, 17, 33, 64, 100, 7, 3, 11, 42], [0, 0, 0, 21, 8, 90, 13, 55, 6, 77]]), \
        torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])


def _qkv_rows(config, rank, world):
    """This rank's rows of [q | k | v]: query heads rank*h/w.., then key and value groups rank*g/w.. """
    d, h, g = config.kv_channels, config.num_attention_heads, config.multi_query_group_num
    q = torch.arange(h * d).view(h, d)[rank * h // world:(rank + 1) * h // world].flatten()
    k = h * d + torch.arange(g * d).view(g, d)[rank * g // world:(rank + 1) * g // world].flatten()
    return torch.cat([q, k, k + g * d])


def _grad_diff(model, ref, rank, world):
    want_grads = {n: p.grad for n, p in ref.named_parameters()}
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        want = want_grads[name]
        if name.endswith("dense_h_to_4h.weight"):  # [gate | up]: this rank's slice of each half
            half = ref.config.ffn_hidden_size
            rows = torch.arange(2 * half).view(2, world, half // world)[:, rank].flatten()
            grad, want = _local(grad), want[rows]
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        if name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            want = want[_qkv_rows(ref.config, rank, world)]
        worst = max(worst, (grad - want).abs().max().item())
    return worst


def run_tp(folder, out):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, tp_plan="auto",
                                                 dtype=torch.float32).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids, mask = _ids()
    res = {"rank": rank, "world": world}
    with torch.no_grad():
        res["logits_max_diff"] = (model(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits
                                  ).abs().max().item()
    try:  # transformers 5.x: the non-deprecated spelling
        import inspect

        from transformers.distributed import DistributedConfig
        has_tp_size = "tp_size" in inspect.signature(DistributedConfig).parameters
    except ImportError:
        has_tp_size = False
    if has_tp_size:
        other = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                     distributed_config=DistributedConfig(tp_size=2)).eval()
        with torch.no_grad():
            res["distributed_config_logits_diff"] = (other(ids, attention_mask=mask).logits
                                                     - ref(ids, attention_mask=mask).logits).abs().max().item()
        del other
    gen = dict(max_new_tokens=12, do_sample=False, attention_mask=mask, pad_token_id=0)
    tokens = model.generate(ids, **gen)
    res["greedy_equal"] = torch.equal(tokens, ref.generate(ids, **gen))
    res["greedy_nocache_equal"] = torch.equal(tokens, model.generate(ids, use_cache=False, **gen))
    res["new_tokens"] = tokens.shape[1] - ids.shape[1]

    def block_numel(m):
        return sum(_local(p).numel() for n, p in m.named_parameters() if ".encoder.layers." in f".{n}")

    res["block_fraction"] = block_numel(model) / block_numel(ref)
    qkv = model.transformer.encoder.layers[0].self_attention.query_key_value.weight
    res["qkv_local_rows"] = list(_local(qkv).shape)

    # one training step's loss and gradients (DTensor paths) against the single-process model
    model.train()
    ref.train()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    ref_loss = ref(ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()
    res["loss_diff"] = abs(loss.item() - ref_loss.item())
    res["grad_max_diff"] = _grad_diff(model, ref, rank, world)

    save = os.path.join(out, "tp_saved")
    model.save_pretrained(save)
    dist.barrier()
    if rank == 0:
        again = AutoModelForCausalLM.from_pretrained(save, trust_remote_code=True, dtype=torch.float32)
        got, want = again.state_dict(), ref.state_dict()
        res["saved_keys_equal"] = sorted(got) == sorted(want)
        res["saved_max_diff"] = max((got[k] - want[k]).abs().max().item() for k in want if k in got)
    dist.barrier()
    return res


def run_errors(folder, out):
    """FOLDER holds sub-folders; each must be refused with a ValueError under tensor parallelism."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    res = {}
    for name in sorted(os.listdir(folder)):
        try:
            AutoModelForCausalLM.from_pretrained(os.path.join(folder, name), trust_remote_code=True, tp_plan="auto",
                                                 dtype=torch.float32)
            res[name] = "loaded"
        except ValueError as exc:
            res[name] = f"ValueError: {exc}"
        except Exception as exc:  # reported, the test fails on it
            res[name] = f"{type(exc).__name__}: {exc}"
    res["rank"] = dist.get_rank()
    return res


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_blocks(model):
    """FSDP2 applied directly: each GLMBlock, then the whole model (embedding, final norm, output layer)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.encoder.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _sharded_training_step(model, ref, rank, world, res):
    """One SGD step of the sharded ``model`` on this rank's row of a two-row batch and of ``ref`` (the same
    checkpoint in this process) on both rows; records in ``res`` this rank's share of the parameters and how far
    the data-parallel loss and gradients are from the reference's."""
    import torch.distributed as dist

    res["param_fraction"] = (sum(p.to_local().numel() for p in model.parameters())
                             / sum(p.numel() for p in ref.parameters()))
    ids = torch.tensor([[5, 9, 17, 33, 64, 100, 7, 3, 11, 42], [21, 8, 90, 13, 55, 6, 77, 4, 19, 60]])
    ref_loss = ref(ids, labels=ids).loss  # mean over all tokens = mean of the two rows' means (equal lengths)
    ref_loss.backward()
    mine = ids[rank:rank + 1]
    loss = model(mine, labels=mine).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    res["loss_diff"] = abs(total.item() / world - ref_loss.item())
    want = {n: p.grad for n, p in ref.named_parameters()}
    res["grad_max_diff"] = max((_full(p.grad) - want[n]).abs().max().item() for n, p in model.named_parameters())
    for m in (ref, model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()


def run_fsdp(folder, out):
    """One SGD step of FSDP2 (each rank one row of the batch) against the single-process step on the whole batch,
    then a sharded (torch.distributed.checkpoint) save loaded into a fresh sharded model."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().train()

    ref, model = load(), _shard_blocks(load())
    res = {"rank": rank, "world": world}
    _sharded_training_step(model, ref, rank, world, res)
    stepped = {n: p.detach() for n, p in ref.named_parameters()}
    res["step_max_diff"] = max((_full(p) - stepped[n]).abs().max().item() for n, p in model.named_parameters())

    ckpt = os.path.join(out, "fsdp_dcp")
    dcp.save({"model": model.state_dict()}, checkpoint_id=ckpt)  # each rank writes its own shards
    fresh = _shard_blocks(load())
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    fresh.load_state_dict(state["model"])
    saved = {n: _full(p) for n, p in model.named_parameters()}
    res["reload_max_diff"] = max((_full(p) - saved[n]).abs().max().item() for n, p in fresh.named_parameters())
    res["shard_files"] = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))

    # a checkpoint folder from the sharded model: torch gathers the full state dict, rank 0 saves it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    folder_out = os.path.join(out, "fsdp_full")
    if rank == 0:
        model.save_pretrained(folder_out, state_dict=full)
        again = AutoModelForCausalLM.from_pretrained(folder_out, trust_remote_code=True).state_dict()
        res["full_save_keys_equal"] = sorted(again) == sorted(ref.state_dict())
        res["full_save_max_diff"] = max((again[n] - saved[n]).abs().max().item() for n in saved)
    dist.barrier()
    return res


def run_fsdp_hf(folder, out):
    """transformers' own FSDP2 (DistributedConfig(fsdp_size=2), the config's base_model_fsdp_plan): one step as in
    run_fsdp, then save_pretrained (gathered on rank 0) loaded in one process."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(fsdp_size=2)).train()
    ref = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).train()
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {"rank": rank, "world": world}
    res["sharded_blocks"] = sum(isinstance(b, FSDPModule) for b in model.transformer.encoder.layers)
    _sharded_training_step(model, ref, rank, world, res)
    saved = {n: _full(p).detach() for n, p in model.named_parameters()}
    save = os.path.join(out, "fsdp_saved")
    model.save_pretrained(save)
    dist.barrier()
    if rank == 0:
        again = AutoModelForCausalLM.from_pretrained(save, trust_remote_code=True, dtype=torch.float32)
        got = again.state_dict()
        res["saved_keys_equal"] = sorted(got) == sorted(ref.state_dict())
        res["saved_max_diff"] = max((got[n] - saved[n]).abs().max().item() for n in saved)
    dist.barrier()
    return res


def main():
    out, jobs = sys.argv[1], sys.argv[2:]
    for job in jobs:  # MODE=FOLDER, run in order in the same processes
        mode, folder = job.split("=", 1)
        res = MODES[mode](folder, out)
        with open(os.path.join(out, f"{mode}-rank{res['rank']}.json"), "w") as f:
            json.dump(res, f)
    import torch.distributed as dist

    dist.destroy_process_group()


MODES = {"tp": run_tp, "errors": run_errors, "fsdp": run_fsdp, "fsdp_hf": run_fsdp_hf}

if __name__ == "__main__":
    main()
