"""--fsdp (FSDP2) and --recompute: losses and weights equal a single process and DDP; sharded
checkpoint directories resume exactly, on another world size, across DDP and FSDP, survive a kill in
mid-write, and load into the other readers; gradients reduce once per optimizer step; each rank
holds about half the state at world size 2.

Models are d1/d2 on random tokens; distributed runs use 2 gloo processes, several runs per spawn."""

import gc
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt2
from gpt2lib import checkpoints
from test_train import free_port, init_gloo, logged, make_data, tiny_config
from train_gpt2 import GPT, DistContext, train


def runs_worker(rank, world_size, port, cfgs):
    """Train each config in turn in one process group (a spawn costs seconds; a run, less)."""
    ctx = init_gloo(rank, world_size, port)
    for cfg in cfgs:
        train(cfg, ctx)
    gc.collect()  # as main() does: DDP's reducer goes before its process group
    dist.destroy_process_group()


def spawn_runs(*cfgs, world_size=2):
    mp.spawn(runs_worker, args=(world_size, free_port(), cfgs), nprocs=world_size)


def weights(path):
    """The full weights of a checkpoint, .pt or sharded directory."""
    return checkpoints.read_checkpoint(path)["model"]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def assert_same_losses(a, b, atol):
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= atol, (step, a[step], b[step])


def resumed_dir(tmp_path, name, source):
    """A fresh log dir for a run that resumes from source (--resume PATH)."""
    return str(tmp_path / name), str(source)


def test_fsdp_matches_single_process_and_checkpoints_move_between_ddp_and_fsdp(tmp_path):
    data_dir = make_data(tmp_path / "data")
    # one process, accumulation 4: the reference
    single = tiny_config(data_dir, str(tmp_path / "single"), max_steps=4, checkpoint_every=2, eval_every=2)
    train(single, DistContext())
    fsdp = replace(single, log_dir=str(tmp_path / "fsdp"), fsdp=True, sample_every=4)  # 2 ranks, accumulation 2
    # same world size, resumed from the FSDP run's step-2 directory: bitwise equal
    fsdp_resumed = replace(fsdp, log_dir=str(tmp_path / "fsdp_resumed"), resume=str(tmp_path / "fsdp" / "model_00002"))
    # FSDP directory -> DDP, and DDP-shaped .pt (the single run's) -> FSDP
    ddp_from_fsdp = replace(single, log_dir=str(tmp_path / "ddp_from_fsdp"), resume=fsdp_resumed.resume)
    fsdp_from_pt = replace(fsdp, log_dir=str(tmp_path / "fsdp_from_pt"), resume=str(tmp_path / "single" / "model_00002.pt"))
    spawn_runs(fsdp, fsdp_resumed, ddp_from_fsdp, fsdp_from_pt)

    reference = logged(single.log_dir)
    assert sorted(reference) == [0, 1, 2, 3]
    assert_same_losses(logged(fsdp.log_dir), reference, 1e-5)
    final = weights(os.path.join(single.log_dir, "model_00004.pt"))
    assert sorted(os.listdir(fsdp.log_dir)) == ["log.txt", "metrics.jsonl", "model_00002", "model_00004"]
    assert_same_weights(weights(os.path.join(fsdp.log_dir, "model_00004")), final, 1e-5)

    fsdp_final = weights(os.path.join(fsdp.log_dir, "model_00004"))
    assert_same_weights(weights(os.path.join(fsdp_resumed.log_dir, "model_00004")), fsdp_final, 0)
    assert {s: v for s, v in logged(fsdp.log_dir).items() if s >= 2} == logged(fsdp_resumed.log_dir)
    assert_same_weights(weights(os.path.join(ddp_from_fsdp.log_dir, "model_00004.pt")), final, 1e-5)
    # val loss (2 ranks read other windows than 1 does): FSDP's equals DDP's on the same weights
    fsdp_val, ddp_val = logged(fsdp.log_dir, "val"), logged(ddp_from_fsdp.log_dir, "val")
    assert sorted(ddp_val) == [2, 4]
    assert_same_losses({step: fsdp_val[step] for step in ddp_val}, ddp_val, 1e-5)
    assert_same_weights(weights(os.path.join(fsdp_from_pt.log_dir, "model_00004")), final, 1e-5)


# ---- a kill in mid-write, another world size, the other readers

def killing_worker(rank, world_size, port, cfg, kill_step):
    """Train with --fsdp; when every rank has written its shards of the kill_step checkpoint, rank 1
    is SIGKILLed before rank 0 can complete it (the .partial directory then holds .metadata and every
    shard: all but train_state.pt and COMPLETE)."""
    ctx = init_gloo(rank, world_size, port)
    write_shards = checkpoints.write_shards

    def write_then_die(directory, model, optimizer):
        write_shards(directory, model, optimizer)
        if rank == 1 and directory.endswith(f"model_{kill_step:05d}.partial"):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.write_shards = write_then_die
    train(cfg, ctx)


def test_kill_in_mid_write_resumes_from_the_previous_checkpoint_on_one_rank(tmp_path, monkeypatch):
    data_dir = make_data(tmp_path / "data")
    single = tiny_config(data_dir, str(tmp_path / "single"), max_steps=4, checkpoint_every=2, eval_every=0)
    train(single, DistContext())
    killed = replace(single, log_dir=str(tmp_path / "killed"), fsdp=True, resume="auto")
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(killing_worker, args=(2, free_port(), killed, 4), nprocs=2)
    partial = os.path.join(killed.log_dir, "model_00004.partial")
    assert {".metadata", checkpoints.OWNER} <= set(os.listdir(partial))
    assert checkpoints.list_checkpoints(killed.log_dir) == [os.path.join(killed.log_dir, "model_00002")]

    # --resume auto, on one rank (a process group of one, as train_gpt2.py makes for --fsdp alone)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        resumed = train(killed, DistContext())["losses"]
    finally:
        dist.destroy_process_group()
    reference = logged(single.log_dir)
    assert len(resumed) == 2
    assert_same_losses(logged(killed.log_dir), reference, 1e-5)
    assert not os.path.exists(partial)
    final = os.path.join(killed.log_dir, "model_00004")
    assert_same_weights(weights(final), weights(os.path.join(single.log_dir, "model_00004.pt")), 1e-5)

    # the other readers gather the sharded directory: GPT.from_checkpoint, --init-from, --export-hf
    ours = GPT.from_checkpoint(final).eval()
    assert_same_weights(ours.state_dict(), weights(final), 0)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    init_from = train_gpt2.load_init_source(final, vocab_multiple=64).eval()  # padding rows zeroed
    with torch.no_grad():
        assert torch.equal(init_from(idx)[0], ours(idx)[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    export = str(tmp_path / "hf")
    train_gpt2.main(["--export-hf", export, "--resume", final, "--model", "d1"])
    from transformers import GPT2LMHeadModel

    theirs = GPT2LMHeadModel.from_pretrained(export).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
