"""Sharded (--fsdp) checkpoints held to the .pt standard: every shard file and .metadata carries a digest
recorded with the checkpoint, every reader checks them before a tensor is used, --resume auto falls back
past a damaged checkpoint on every rank, a full disk during a sharded save is one line and leaves no
.partial behind, and --async-checkpoint saves the state of the checkpoint's step.

The damage is real: flipped bytes in a .distcp, a truncated or missing one, flipped bytes in .metadata,
a real tmpfs that fills. Models are d1 on random tokens, 2 gloo ranks."""

import os
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from test_fsdp import assert_same_weights, spawn_runs, weights
from test_integrity import TINY_CLI, flip_bytes, start_cli, tmpfs
from test_long_runs import torchrun
from test_train import logged, make_data, tiny_config, write_hellaswag

import hellaswag
import train_gpt2
from gpt2lib import checkpoints
from train_gpt2 import GPT, UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-rank --fsdp runs of 6 steps with checkpoints at 2, 4 and 6, the second one written in the
    background (--async-checkpoint). Every step is clipped, so the counts change at every step."""
    root = tmp_path_factory.mktemp("sharded")
    sync = tiny_config(
        make_data(root / "data"),
        str(root / "sync"),
        max_steps=6,
        checkpoint_every=2,
        eval_every=0,
        fsdp=True,
        grad_clip=1e-3,
    )
    background = replace(sync, log_dir=str(root / "async"), async_checkpoint=True)
    spawn_runs(sync, background)
    return sync, background


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGES = {
    "flipped-distcp": lambda d: flip_bytes(os.path.join(d, "__1_0.distcp")),
    "truncated-distcp": lambda d: truncate(os.path.join(d, "__0_0.distcp")),
    "missing-distcp": lambda d: os.remove(os.path.join(d, "__1_0.distcp")),
    "flipped-metadata": lambda d: flip_bytes(os.path.join(d, ".metadata"), n=16),
}


def damaged_copy(cfg, directory, damage):
    """A copy of the run's log dir as if it had died after step 5, its step-4 checkpoint damaged."""
    log_dir = str(directory)
    shutil.copytree(cfg.log_dir, log_dir)
    shutil.rmtree(os.path.join(log_dir, "model_00006"))
    DAMAGES[damage](os.path.join(log_dir, "model_00004"))
    return replace(cfg, log_dir=log_dir, resume="auto")


def one_line_error(err, path):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {path}"), err
    return lines[0]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_sharded_checkpoint_is_refused_by_every_reader(runs, tmp_path, capsys, monkeypatch, damage):
    cfg = damaged_copy(runs[0], tmp_path / "log", damage)
    newest = os.path.join(cfg.log_dir, "model_00004")
    # --resume auto chooses the one before, when choosing (before any tensor is read)
    path, checkpoint = train_gpt2.find_checkpoint("auto", cfg.log_dir)
    assert path == os.path.join(cfg.log_dir, "model_00002") and checkpoint["step"] == 2
    assert f"warning: skipping {newest}: checkpoint {newest} is damaged" in capsys.readouterr().out
    # by path: --resume PATH, GPT.from_checkpoint, --init-from
    for read in (
        lambda: train_gpt2.find_checkpoint(newest, cfg.log_dir),
        lambda: GPT.from_checkpoint(newest),
        lambda: train_gpt2.load_init_source(newest, vocab_multiple=64),
    ):
        with pytest.raises(UserError) as e:
            read()
        assert str(e.value).startswith(f"checkpoint {newest} is damaged") and "\n" not in str(e.value)
    # the command lines: --export-hf, --generate, hellaswag.py -c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = tmp_path / "hf"
    for argv in (
        ["--export-hf", str(export), "--resume", newest, "--model", "d1"],
        ["--generate", "Hello", "--resume", newest, "--model", "d1", "--device", "cpu"],
    ):
        with pytest.raises(SystemExit) as e:
            train_gpt2.main(argv)
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert "damaged" in one_line_error(err, newest) and "sample:" not in out
    assert not export.exists()
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["-c", newest, "--data", write_hellaswag(tmp_path / "h.jsonl"), "-d", "cpu"])
    assert e.value.code == 2 and "damaged" in one_line_error(capsys.readouterr().err, newest)


def test_two_ranks_resume_past_a_damaged_sharded_checkpoint_exactly(runs, tmp_path, capfd):
    """Each damage in a log dir of its own; every run ends as the undamaged run did."""
    sync = runs[0]
    damaged = [damaged_copy(sync, tmp_path / damage, damage) for damage in DAMAGES]
    spawn_runs(*damaged)
    out = capfd.readouterr().out
    reference = weights(os.path.join(sync.log_dir, "model_00006"))
    for cfg in damaged:
        newest = os.path.join(cfg.log_dir, "model_00004")
        assert f"warning: skipping {newest}: checkpoint {newest} is damaged" in out
        assert_same_weights(weights(os.path.join(cfg.log_dir, "model_00006")), reference, 0)
        assert logged(cfg.log_dir) == logged(sync.log_dir)
        aside = os.path.join(cfg.log_dir, "previous_1")  # set aside, not deleted, with a copy of the logs
        assert sorted(os.listdir(aside)) == ["log.txt", "metrics.jsonl", "model_00004"]
    assert out.count("resuming at step 2") == len(DAMAGES)


def without_digests(directory):
    """Rewrite train_state.pt as sharded checkpoints were written before their files had digests."""
    path = os.path.join(directory, checkpoints.TRAIN_STATE)
    state = torch.load(path, weights_only=True)
    state.pop(checkpoints.FILE_DIGESTS_KEY)
    state.pop(checkpoints.CHECKSUM_KEY)
    state[checkpoints.CHECKSUM_KEY] = {checkpoints.CHECKSUM_ALGORITHM: checkpoints.checksum(state)}
    torch.save(state, path)


def test_sharded_checkpoint_without_digests_loads_with_a_note_and_its_structure_checked(
    runs, tmp_path, capsys
):
    sync = runs[0]
    log_dir = str(tmp_path / "log")
    shutil.copytree(sync.log_dir, log_dir)
    newest, before = os.path.join(log_dir, "model_00006"), os.path.join(log_dir, "model_00004")
    without_digests(newest)
    path, checkpoint = train_gpt2.find_checkpoint("auto", log_dir)
    assert path == newest and checkpoint["step"] == 6
    assert f"note: checkpoint {newest} has no digests of its shard files" in capsys.readouterr().out
    assert_same_weights(
        GPT.from_checkpoint(newest).state_dict(), weights(os.path.join(sync.log_dir, "model_00006")), 0
    )
    # a truncated shard file is still found, by the sizes .metadata gives
    truncate(os.path.join(newest, "__1_0.distcp"))
    without_digests(before)
    path, _ = train_gpt2.find_checkpoint("auto", log_dir)
    assert path == before
    assert (
        f"warning: skipping {newest}: checkpoint {newest} is damaged: __1_0.distcp" in capsys.readouterr().out
    )


def shard_tensors(directory):
    """Every tensor of a sharded checkpoint's shards (model and optimizer state), read in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # that it loads in a single process: the point
        warnings.simplefilter("ignore")
        dcp.load(tensors, checkpoint_id=directory, no_dist=True)
    return tensors


def assert_same_state(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_async_checkpoint_holds_its_steps_state_field_by_field(runs):
    """An --async-checkpoint checkpoint completes steps after its own: it must hold that step's counts
    and state, as the same step's checkpoint written synchronously does."""
    sync, background = runs
    for step in (2, 4, 6):
        paths = [os.path.join(cfg.log_dir, f"model_{step:05d}") for cfg in runs]
        states = [
            torch.load(os.path.join(path, checkpoints.TRAIN_STATE), weights_only=True) for path in paths
        ]
        for state in states:
            state.pop(checkpoints.CHECKSUM_KEY)  # of train_config too, which differs
            state.pop("run_id")
            state["train_config"] = {
                k: v for k, v in state["train_config"].items() if k not in ("log_dir", "async_checkpoint")
            }
        assert states[0]["counts"] == {"clipped_steps": step, "skipped_steps": 0}
        assert states[1]["counts"] == states[0]["counts"]
        for state in states:
            state[checkpoints.FILE_DIGESTS_KEY] = sorted(state[checkpoints.FILE_DIGESTS_KEY])  # the names
        assert_same_state(states[1], states[0], f"step {step}")
        assert_same_state(shard_tensors(paths[1]), shard_tensors(paths[0]), f"step {step} shards")


@pytest.mark.parametrize("ranks, background", [(1, False), (1, True), (2, False), (2, True)])
def test_disk_full_during_a_sharded_save_is_one_line_and_removes_the_partial(tmp_path, ranks, background):
    make_data(tmp_path / "data")
    # a d1 sharded checkpoint (weights and AdamW moments) is ~53 MB: the first fits, the second does not
    with tmpfs(tmp_path / "disk", "80m") as disk:
        args = (
            TINY_CLI
            + [
                "--data-dir",
                "data",
                "--log-dir",
                str(disk / "log"),
                "--max-steps",
                "6",
                "--checkpoint-every",
                "2",
                "--fsdp",
            ]
            + (["--async-checkpoint"] if background else [])
        )
        proc = start_cli(args, tmp_path) if ranks == 1 else torchrun(args, tmp_path, nproc=2)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert (
            len(errors) == 1 and "model_00004.partial" in errors[0] and "No space left on device" in errors[0]
        ), err
        assert 'train_gpt2.py", line' not in err and "Traceback (most recent call last): (RANK" not in err, (
            err
        )
        if ranks == 1:
            assert "Traceback" not in err, err
        assert sorted(os.listdir(disk / "log")) == [".lock", "log.txt", "metrics.jsonl", "model_00002"]
        checkpoint = train_gpt2.read_verified(
            str(disk / "log" / "model_00002"), resume=True, weights=False
        )  # digests and structure
        assert checkpoint["step"] == 2
