"""--fsdp (FSDP2) and --recompute: losses and weights equal a single process and DDP; sharded
checkpoint directories resume exactly, on another world size, across DDP and FSDP, survive a kill in
mid-write, and load into the other readers; gradients reduce once per optimizer step; each rank
holds about half the state at world size 2.

Models are d1/d2 on random tokens; distributed runs use 2 gloo processes, several runs per spawn."""

import os
import signal
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import (
    end_worker,
    free_port,
    init_gloo,
    install_stop_after,
    logged,
    make_data,
    tiny_config,
    write_hellaswag,
)

import train_gpt2
from gpt2lib import checkpoints
from gpt2lib.distributed import close_process_group
from train_gpt2 import GPT, DistContext, train


def runs_worker(rank, world_size, port, cfgs, stopped_cfg):
    """Train each config in turn in one process group (a spawn costs seconds; a run, less); then
    stopped_cfg, whose first step reports a stop request as a SIGTERM would."""
    ctx = init_gloo(rank, world_size, port)
    for cfg in cfgs:
        train(cfg, ctx)
    if stopped_cfg is not None:
        install_stop_after(1)
        train(stopped_cfg, ctx)
    end_worker()


def spawn_runs(*cfgs, stopped=None, world_size=2):
    mp.spawn(runs_worker, args=(world_size, free_port(), cfgs, stopped), nprocs=world_size)


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


def test_fsdp_matches_single_process_and_checkpoints_move_between_ddp_and_fsdp(tmp_path):
    data_dir = make_data(tmp_path / "data")
    # one process, accumulation 4: the reference
    hella = write_hellaswag(tmp_path / "hellaswag.jsonl", n=11)  # 11 examples: the ranks' shares differ
    single = tiny_config(
        data_dir,
        str(tmp_path / "single"),
        max_steps=4,
        checkpoint_every=2,
        eval_every=2,
        hellaswag=True,
        hellaswag_data=hella,
    )
    train(single, DistContext())
    fsdp = replace(
        single, log_dir=str(tmp_path / "fsdp"), fsdp=True, sample_every=4
    )  # 2 ranks, accumulation 2
    # same world size, resumed from the FSDP run's step-2 directory: bitwise equal
    fsdp_resumed = replace(
        fsdp, log_dir=str(tmp_path / "fsdp_resumed"), resume=str(tmp_path / "fsdp" / "model_00002")
    )
    # FSDP directory -> DDP, and DDP-shaped .pt (the single run's) -> FSDP
    ddp_from_fsdp = replace(single, log_dir=str(tmp_path / "ddp_from_fsdp"), resume=fsdp_resumed.resume)
    fsdp_from_pt = replace(
        fsdp, log_dir=str(tmp_path / "fsdp_from_pt"), resume=str(tmp_path / "single" / "model_00002.pt")
    )
    fsdp_eval = replace(
        fsdp,
        log_dir=str(tmp_path / "fsdp_eval"),
        eval_only=True,
        resume=str(tmp_path / "fsdp" / "model_00004"),
    )
    # --async-checkpoint: written while the next steps run, the same checkpoints
    fsdp_async = replace(
        fsdp, log_dir=str(tmp_path / "fsdp_async"), async_checkpoint=True, sample_every=0, hellaswag=False
    )
    fsdp_stopped = replace(fsdp_async, log_dir=str(tmp_path / "fsdp_stopped"), eval_every=0)
    spawn_runs(fsdp, fsdp_resumed, ddp_from_fsdp, fsdp_from_pt, fsdp_eval, fsdp_async, stopped=fsdp_stopped)

    reference = logged(single.log_dir)
    assert sorted(reference) == [0, 1, 2, 3]
    assert_same_losses(logged(fsdp.log_dir), reference, 1e-5)
    final = weights(os.path.join(single.log_dir, "model_00004.pt"))
    assert sorted(os.listdir(fsdp.log_dir)) == [
        ".lock",
        "log.txt",
        "metrics.jsonl",
        "model_00002",
        "model_00004",
    ]
    assert_same_weights(weights(os.path.join(fsdp.log_dir, "model_00004")), final, 1e-5)

    fsdp_final = weights(os.path.join(fsdp.log_dir, "model_00004"))
    assert_same_weights(weights(os.path.join(fsdp_resumed.log_dir, "model_00004")), fsdp_final, 0)
    assert {s: v for s, v in logged(fsdp.log_dir).items() if s >= 2} == logged(fsdp_resumed.log_dir)
    assert_same_weights(weights(os.path.join(ddp_from_fsdp.log_dir, "model_00004.pt")), final, 1e-5)
    # val loss (2 ranks read other windows than 1 does): FSDP's equals DDP's on the same weights
    fsdp_val, ddp_val = logged(fsdp.log_dir, "val"), logged(ddp_from_fsdp.log_dir, "val")
    assert sorted(ddp_val) == [2, 4]
    assert_same_losses({step: fsdp_val[step] for step in ddp_val}, ddp_val, 1e-5)
    assert_same_losses(logged(fsdp_eval.log_dir, "val"), {4: fsdp_val[4]}, 1e-6)
    for step in (2, 4):
        assert_same_weights(
            weights(os.path.join(fsdp_async.log_dir, f"model_{step:05d}")),
            weights(os.path.join(fsdp.log_dir, f"model_{step:05d}")),
            0,
        )
    assert logged(fsdp_async.log_dir) == logged(fsdp.log_dir)
    # a stop request after step 0: the checkpoint of step 1 (written in the background) is complete
    assert checkpoints.list_checkpoints(fsdp_stopped.log_dir) == [
        os.path.join(fsdp_stopped.log_dir, "model_00001")
    ]
    assert (
        checkpoints.read_checkpoint(os.path.join(fsdp_stopped.log_dir, "model_00001"), weights=False)["step"]
        == 1
    )
    # HellaSwag on gathered weights, the ranks scoring shares of different sizes
    assert logged(fsdp.log_dir, "hella") == logged(single.log_dir, "hella")
    assert logged(fsdp_eval.log_dir, "hella") == {4: logged(single.log_dir, "hella")[4]}
    assert_same_weights(weights(os.path.join(fsdp_from_pt.log_dir, "model_00004")), final, 1e-5)


# ---- a kill in mid-write, another world size, the other readers


def killing_worker(rank, world_size, port, cfg, kill_step, inside_dcp):
    """Train with --fsdp and SIGKILL rank 1 while it writes the kill_step checkpoint: inside_dcp, once
    its shard files are written but before DCP's coordinator can add .metadata; otherwise once every
    rank's shards and .metadata are written, before rank 0 can add train_state.pt and COMPLETE."""
    import torch.distributed.checkpoint as dcp

    ctx = init_gloo(rank, world_size, port)
    target = f"model_{kill_step:05d}.partial"
    if inside_dcp:
        write_data = dcp.FileSystemWriter.write_data

        def write_data_then_die(self, plan, planner):
            written = write_data(self, plan, planner)
            if rank == 1 and str(self.path).endswith(target):
                written.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            return written

        dcp.FileSystemWriter.write_data = write_data_then_die
    else:
        write_shards = checkpoints.write_shards

        def write_then_die(directory, model, optimizer, background_group=None):
            write_shards(directory, model, optimizer, background_group)
            if rank == 1 and directory.endswith(target):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoints.write_shards = write_then_die
    train(cfg, ctx)


def test_kill_in_mid_write_resumes_from_the_previous_checkpoint_on_one_rank(tmp_path, monkeypatch):
    data_dir = make_data(tmp_path / "data")
    single = tiny_config(data_dir, str(tmp_path / "single"), max_steps=4, checkpoint_every=2, eval_every=0)
    train(single, DistContext())
    reference = logged(single.log_dir)
    for inside_dcp in (True, False):
        killed = replace(single, log_dir=str(tmp_path / f"killed_{inside_dcp}"), fsdp=True, resume="auto")
        with pytest.raises(mp.ProcessExitedException):
            mp.spawn(killing_worker, args=(2, free_port(), killed, 4, inside_dcp), nprocs=2)
        partial = os.path.join(killed.log_dir, "model_00004.partial")
        written = set(os.listdir(partial))
        assert checkpoints.OWNER in written and any(name.endswith(".distcp") for name in written), written
        assert (".metadata" in written) != inside_dcp, written
        assert checkpoints.list_checkpoints(killed.log_dir) == [os.path.join(killed.log_dir, "model_00002")]

        # --resume auto, on one rank (a process group of one, as train_gpt2.py makes for --fsdp alone)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            resumed = train(killed, DistContext())["losses"]
        finally:
            close_process_group()
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


# ---- reduce-scatters per optimizer step, --recompute, bytes per rank


def flag_after_backward_step(run, step, stop_requested=False):
    """A wrong placement: the sync flag set after each micro-step's backward, one micro-step late."""
    run.optimizer.zero_grad(set_to_none=True)
    for micro_step in range(run.grad_accum_steps):
        x, y = run.train_loader.next_batch()
        _, loss = run.model(x, y, loss_impl="chunked")
        (loss / run.grad_accum_steps).backward()
        run.model.set_requires_gradient_sync(micro_step == run.grad_accum_steps - 1)
    run.optimizer.step()


def sharded_d1(rank, recompute=False):
    from gpt2lib import parallel

    torch.manual_seed(0)
    model = GPT(train_gpt2.config_for("d1", vocab_multiple=64))
    model.set_recompute(recompute)
    return parallel.shard_model(model, torch.device("cpu"))


def full_grads(model):
    return {
        name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for name, p in model.named_parameters()
    }


def saved_bytes(model, x):
    """(loss, bytes of the activations the Blocks keep for backward during one forward): tensors saved
    while a Block runs, the weights (leaves) left out."""
    total, inside = [0], [False]

    def pack(tensor):
        if inside[0] and not (tensor.is_leaf and tensor.requires_grad):
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    handles = [
        hook
        for block in model.transformer.h
        for hook in (
            block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
            block.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
        )
    ]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(x, x, loss_impl="chunked")
    for handle in handles:
        handle.remove()
    return loss, total[0]


def sync_and_memory_report(rank, ctx, data_dir):
    from types import SimpleNamespace

    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    from gpt2lib import parallel
    from train_gpt2 import DataLoaderLite, TrainConfig, configure_optimizer

    report = {}
    # reduce-scatters: when, and how many per optimizer step
    for step_name, step_fn in (("ours", train_gpt2.train_step), ("late", flag_after_backward_step)):
        for accum in (1, 4):
            model = sharded_d1(rank)
            loader = DataLoaderLite(2, 16, rank, ctx.world_size, "train", data_dir)
            batches_read, during = [0], []
            next_batch = loader.next_batch

            def counting_next_batch():
                batches_read[0] += 1
                return next_batch()

            class CountingReduceScatter(DefaultReduceScatter):
                def __call__(self, *args, **kwargs):
                    during.append((batches_read[0] - 1) % accum)  # the micro-step whose backward runs
                    return super().__call__(*args, **kwargs)

            loader.next_batch = counting_next_batch
            for unit in parallel.fsdp_units(model):
                unit.set_custom_reduce_scatter(CountingReduceScatter())
            run = SimpleNamespace(
                model=model,
                optimizer=configure_optimizer(model, 0.1, 1e-3, "cpu"),
                precision=train_gpt2.Precision("fp32", torch.device("cpu")),
                train_loader=loader,
                grad_accum_steps=accum,
                dist_ctx=ctx,
                log=SimpleNamespace(failure=None),
                cfg=TrainConfig(lr=1e-3, warmup_steps=0, max_steps=3, fsdp=True),
            )
            for step in range(3):
                step_fn(run, step)
            report[step_name, accum] = {
                "calls": len(during),
                "micro_steps": sorted(set(during)),
                "weights": {k: v.full_tensor() for k, v in model.state_dict().items()},
            }
            if step_name == "ours" and accum == 4:
                report["bytes", "fsdp"] = parallel.state_bytes(model, run.optimizer)
    plain = GPT(train_gpt2.config_for("d1", vocab_multiple=64))
    optimizer = configure_optimizer(plain, 0.1, 1e-3, "cpu")
    plain(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    report["bytes", "ddp"] = parallel.state_bytes(plain, optimizer)  # what DDP holds on every rank
    # --recompute: the same gradients, sharded or not, and fewer bytes kept for backward
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))  # one batch on all ranks
    for sharded in (False, True):
        for recompute in (False, True):
            if sharded:
                model = sharded_d1(rank, recompute)
            else:
                torch.manual_seed(0)
                model = GPT(train_gpt2.config_for("d1", vocab_multiple=64))
                model.set_recompute(recompute)
            loss, kept = saved_bytes(model, x)
            loss.backward()
            report["recompute", sharded, recompute] = {
                "loss": loss.item(),
                "grads": full_grads(model),
                "saved": kept,
            }
    return report


def sync_and_memory_worker(rank, world_size, port, data_dir, results):
    ctx = init_gloo(rank, world_size, port)
    report = sync_and_memory_report(rank, ctx, data_dir)
    if rank == 0:
        torch.save(report, results)
    end_worker()


def test_reduce_scatters_recompute_and_bytes_per_rank(tmp_path):
    data_dir = make_data(tmp_path / "data")
    results = str(tmp_path / "report.pt")
    mp.spawn(sync_and_memory_worker, args=(2, free_port(), data_dir, results), nprocs=2)
    report = torch.load(results)

    ours1, ours4 = report["ours", 1], report["ours", 4]
    assert ours1["calls"] > 0
    assert ours4["calls"] == ours1["calls"], "accumulating 4 micro-steps must reduce-scatter as often as 1"
    assert ours4["micro_steps"] == [3], "only the last micro-step's backward may reduce-scatter"
    # the flag set one micro-step late: the first micro-step reduces, the last one's gradients stay
    # behind (and leak into the next step): other weights than the correct rule's
    late4 = report["late", 4]
    assert late4["micro_steps"] == [0]
    assert any(not torch.equal(late4["weights"][k], ours4["weights"][k]) for k in ours4["weights"])

    base = report["recompute", False, False]
    for key in [(False, True), (True, False), (True, True)]:
        other = report["recompute", *key]
        assert abs(other["loss"] - base["loss"]) <= 1e-6, key
        assert_same_weights(other["grads"], base["grads"], 1e-6)
    for sharded in (False, True):
        assert (
            report["recompute", sharded, True]["saved"] < 0.6 * report["recompute", sharded, False]["saved"]
        )

    fsdp, ddp = report["bytes", "fsdp"], report["bytes", "ddp"]
    assert (
        ddp["params"] > 0
        and ddp["grads"] == ddp["params"]
        and 0 <= ddp["optimizer"] - 2 * ddp["params"] < 1024
    )  # two moments and a step count
    assert sum(fsdp.values()) <= 0.55 * sum(ddp.values()), (fsdp, ddp)
