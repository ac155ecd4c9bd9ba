"""Experiment tracking: TensorBoard's event files and W&B's offline run hold what metrics.jsonl holds,
across a real SIGKILL and a resume; a failing tracker never stops training."""

import glob
import json
import multiprocessing
import os
import signal
import struct

import numpy as np
import pytest
from test_train import make_data, tiny_config

import train_gpt2
from gpt2lib import tracking
from train_gpt2 import DistContext, train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

# metrics.jsonl key -> tracker name, for each kind (written out here, not taken from gpt2lib.tracking)
EXPECTED_NAMES = {
    ("train", "value"): "train/loss",
    ("val", "value"): "val/loss",
    ("train", "lr"): "train/lr",
    ("train", "norm"): "train/norm",
    ("train", "clipped_steps"): "train/clipped_steps",
}


def jsonl_rows(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def jsonl_scalars(rows):
    """{tag: [(step, value), ...]} of every number in metrics.jsonl, named `kind/key` (value: the
    kind's name)."""
    names = {"train": "loss", "val": "loss", "hella": "acc_norm"}
    out = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "kind") or not isinstance(value, (int, float)):
                continue
            tag = f"{row['kind']}/{names[row['kind']] if key == 'value' else key}"
            out.setdefault(tag, []).append((row["step"], float(value)))
    return out


def tensorboard_scalars(log_dir, purge=True):
    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "tensorboard"),
        purge_orphaned_data=purge,
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """The protobuf records of a .wandb file (W&B's leveldb-style log: 32 KiB blocks, 7-byte record
    headers)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir):
    """(run id, {summary key: last value}) of one W&B offline run directory. The id is the end of the
    directory's name (offline-run-DATE_TIME-ID): a SIGKILLed process may not have flushed its run record."""
    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run_id, summary = os.path.basename(run_dir).rsplit("-", 1)[1], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            assert record.run.run_id == run_id, (record.run.run_id, run_dir)
        elif kind == "summary":
            for item in record.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return run_id, summary


def killed_run(cfg, kill_at_call):
    """train(cfg) in a child process that SIGKILLs itself when train_step is called for the
    kill_at_call-th time (earlier steps are logged, later ones never happen)."""
    original, calls = train_gpt2.train_step, [0]

    def step_or_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    train_gpt2.train_step = step_or_die
    train(cfg, DistContext())


def test_tensorboard_and_wandb_match_metrics_jsonl_across_sigkill_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(
        data_dir,
        str(tmp_path / "log"),
        max_steps=8,
        checkpoint_every=3,
        eval_every=3,
        sample_every=3,
        resume="auto",
        tensorboard=True,
        wandb="tests",
        total_batch_size=32,
    )
    child = multiprocessing.get_context("spawn").Process(target=killed_run, args=(cfg, 6))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    first_id = open(os.path.join(cfg.log_dir, "wandb_run_id")).read()
    killed = jsonl_scalars(jsonl_rows(cfg.log_dir))
    assert max(step for step, _ in killed["train/loss"]) == 4  # steps 3 and 4 are redone from model_00003.pt

    train(cfg, DistContext())
    rows = jsonl_rows(cfg.log_dir)
    expected = jsonl_scalars(rows)
    acc, logged = tensorboard_scalars(cfg.log_dir)
    # every tag, step by step, no step twice; TensorBoard keeps scalars as float32
    assert logged == {
        tag: [(step, float(np.float32(v))) for step, v in pairs] for tag, pairs in expected.items()
    }
    assert [s for s, _ in logged["train/loss"]] == list(range(8)) and [s for s, _ in logged["val/loss"]] == [
        0,
        3,
        6,
        8,
    ]
    # the counts go on from the checkpoint: as if the run had not been killed
    norms = [n for _, n in expected["train/norm"]]
    assert [c for _, c in expected["train/clipped_steps"]] == [
        sum(n > cfg.grad_clip for n in norms[: i + 1]) for i in range(8)
    ]
    for (kind, key), tag in EXPECTED_NAMES.items():
        assert tag in logged, (kind, key, tag)
    # the killed run's events at steps 3 and 4 are in the files: only purge_step keeps them out
    assert len(glob.glob(os.path.join(cfg.log_dir, "tensorboard", "events.*"))) == 2
    _, unpurged = tensorboard_scalars(cfg.log_dir, purge=False)
    assert [s for s, _ in unpurged["train/loss"]].count(3) == 2
    samples = [r for r in rows if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [3, 6, 8] and all(len(r["texts"]) == 4 for r in samples)
    assert acc.Tags()["tensors"] == ["sample/text/text_summary"]

    # W&B: two offline runs (before and after the kill) of the same W&B run; the summary has the final
    # val loss
    run_dirs = sorted(glob.glob(os.path.join(cfg.log_dir, "wandb", "offline-run-*")))
    assert len(run_dirs) == 2
    # the killed process's record file may end before its buffered records: its directory names the id
    assert [os.path.basename(d).rsplit("-", 1)[1] for d in run_dirs] == [first_id, first_id]
    resumed_id, summary = wandb_run(run_dirs[-1])
    assert resumed_id == first_id
    assert summary["val/loss"] == pytest.approx(expected["val/loss"][-1][1])
    assert summary["train/loss"] == pytest.approx(expected["train/loss"][-1][1])

    # a fresh start sets the trackers' files aside with the rest of the old run, and starts a new W&B run
    train(
        tiny_config(
            data_dir,
            cfg.log_dir,
            max_steps=1,
            eval_every=0,
            checkpoint_every=0,
            tensorboard=True,
            wandb="tests",
        ),
        DistContext(),
    )
    assert sorted(os.listdir(os.path.join(cfg.log_dir, "previous_1"))) == sorted(
        [
            "log.txt",
            "metrics.jsonl",
            "model_00003.pt",
            "model_00006.pt",
            "model_00008.pt",
            "tensorboard",
            "wandb",
            "wandb_run_id",
        ]
    )
    assert open(os.path.join(cfg.log_dir, "wandb_run_id")).read() != first_id


def test_a_failing_tracker_is_reported_once_and_training_goes_on(tmp_path, capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    # a link to a path that cannot be a directory: not another run's file (nothing is set aside), yet unusable
    os.symlink("/dev/null/events", log_dir / "tensorboard")
    cfg = tiny_config(
        make_data(tmp_path / "data"), str(log_dir), max_steps=3, checkpoint_every=0, tensorboard=True
    )
    assert len(train(cfg, DistContext())["losses"]) == 3
    out = capsys.readouterr().out
    assert out.count("warning: TensorBoard tracking failed") == 1, out


def test_a_missing_package_is_one_line_naming_pip(monkeypatch):
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a),
    )
    problems = train_gpt2.validate(train_gpt2.TrainConfig(wandb="proj", tensorboard=True), 1)
    assert problems == ["--wandb needs the wandb package: pip install wandb"]
    # only rank 0 opens the trackers: another node without the package does not stop the run
    assert train_gpt2.validate(train_gpt2.TrainConfig(wandb="proj", tensorboard=True), 2, rank=1) == []
