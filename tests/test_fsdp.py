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
