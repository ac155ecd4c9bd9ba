"""Gaps closed by issue 23: bad numbers refused at parse time, quiet one-line failures (a tracker on a
full disk, Ctrl-C during start-up, shards changed since the checkpoint), and direct tests for mistakes
that the suite once missed or caught only by accident."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from test_integrity import tmpfs
from test_train import install_stop_after, make_data, tiny_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train_gpt2
from gpt2lib.common import UserError
from train_gpt2 import (
    GPT,
    GPT2_VOCAB_SIZE,
    DataLoaderLite,
    DistContext,
    TrainConfig,
    config_for,
    train,
    validate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOAT_FLAGS = [f.name for f in fields(TrainConfig) if f.type is float]


# ---- numbers validated at parse time


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_every_float_flag_refuses_nan_and_inf_in_one_message(name, value):
    flag = "--" + name.replace("_", "-")
    assert validate(TrainConfig(**{name: value}), 1) == [f"{flag} must be a finite number, got {value}"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lr=1e308), "--lr must be positive and at most 10, got 1e+308"),
        (dict(lr=0.0), "--lr must be positive and at most 10, got 0.0"),
        (
            dict(lr=5.0, weight_decay=0.2),
            "--weight-decay 0.2 times --lr 5.0 must be below 1: each step would zero or "
            "flip the sign of every decayed weight",
        ),
        (dict(grad_clip=-1.0), "--grad-clip must be >= 0, got -1.0"),
        (dict(min_lr_ratio=1.5), "--min-lr-ratio must be in [0, 1], got 1.5"),
        (dict(temperature=-0.5), "--temperature must be positive, got -0.5"),
    ],
)
def test_out_of_range_float_flags_are_refused(settings, message):
    assert validate(TrainConfig(**settings), 1) == [message]


def test_bad_numbers_stop_the_command_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(
            [
                "--lr",
                "nan",
                "--temperature",
                "nan",
                "--grad-clip",
                "nan",
                "--weight-decay",
                "inf",
                "--log-dir",
                "log",
            ]
        )
    assert str(e.value.code).splitlines() == [
        "error: --grad-clip must be a finite number, got nan",
        "error: --lr must be a finite number, got nan",
        "error: --temperature must be a finite number, got nan",
        "error: --weight-decay must be a finite number, got inf",
    ]
    assert os.listdir(tmp_path) == []


# ---- quiet one-line failures

FILL_THEN_TRACK = """
import contextlib, sys, threading
from gpt2lib.tracking import Tracking
disk = sys.argv[1]
tracking = Tracking.open(disk + "/log", 0, tensorboard=True)
with contextlib.suppress(OSError), open(disk + "/filler", "wb", buffering=0) as f:
    while True:
        f.write(bytes(4096))
for step in range(20):
    tracking.log({"step": step, "kind": "sample", "value": 1.0, "texts": ["x" * 2000]})
tracking.close()
for thread in threading.enumerate():  # the writer thread's last words, if any, come before the exit
    if thread is not threading.current_thread():
        thread.join(timeout=30)
print("training went on")
"""


def test_tensorboard_on_a_full_disk_is_one_line_without_the_writer_threads_traceback(tmp_path):
    pytest.importorskip("tensorboard")
    with tmpfs(tmp_path / "disk", "256k") as disk:
        result = subprocess.run(
            [sys.executable, "-c", FILL_THEN_TRACK, str(disk)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "warning: TensorBoard tracking failed (OSError: [Errno 28] No space left on device): "
        "training goes on without it",
        "training went on",
    ]
    assert result.stderr == ""


def test_ctrl_c_while_train_gpt2_imports_exits_quietly_with_130(tmp_path):
    # -X importtime reports each import as it completes: numpy's line means the script's own imports
    # have begun, and torch's (seconds) is still under way
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "train_gpt2.py"), "--device", "cpu"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.rstrip().endswith("| numpy"):
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=60) == 130
    assert not any(line.rstrip().endswith("| torch") for line in lines), "the signal came after the imports"
    assert [line for line in lines if not line.startswith("import time:")] == []
    assert os.listdir(tmp_path) == []


def test_importing_train_gpt2_leaves_the_signal_handlers_alone():
    script = "import signal, train_gpt2; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.stdout.strip() == "True", result.stderr


def test_a_resume_on_shards_changed_since_the_checkpoint_says_so_in_one_line(tmp_path, capsys):
    cfg = tiny_config(
        make_data(tmp_path / "data"), str(tmp_path / "log"), resume="auto", eval_every=0, max_steps=3
    )
    original = install_stop_after(1)
    try:
        train(cfg, DistContext())  # a checkpoint at step 1
    finally:
        train_gpt2.train_step = original
    shard = tmp_path / "data" / "t_train_000002.npy"
    tokens = np.load(shard)
    np.save(shard, (tokens[::-1] + 1) % GPT2_VOCAB_SIZE)  # same name, size and token count; other tokens
    capsys.readouterr()
    assert len(train(cfg, DistContext())["losses"]) == 2  # resumed at step 1 and went on to the end
    assert [line for line in capsys.readouterr().out.splitlines() if "changed since" in line] == [
        "warning: 1 'train' shard(s) changed since the checkpoint (t_train_000002.npy): same names and token "
        "counts, other tokens; resuming on them"
    ]


@pytest.mark.parametrize("digests", ["recorded", "from before digests"])
def test_unchanged_shards_resume_without_a_word(tmp_path, capsys, digests):
    loader = DataLoaderLite(2, 16, 0, 1, "train", make_data(tmp_path / "data"))
    loader.next_batch()
    state = loader.state_dict()
    if digests != "recorded":
        del state["shard_digests"]  # a checkpoint written before shards had digests still resumes
    fresh = DataLoaderLite(2, 16, 0, 1, "train", str(tmp_path / "data"))
    fresh.load_state_dict(state)
    assert fresh.position == loader.position and capsys.readouterr().out == ""


# ---- mistakes the suite once missed or caught only by accident


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run (warm-up 2, cosine to 10%) with checkpoints at 3 and 6, evals at 0, 3 and 6, and
    what every optimizer step saw: each optimizer's class, defaults and param groups, from a global
    step hook, so that every optimizer the run makes is seen."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = tiny_config(
        make_data(root / "data"),
        str(root / "log"),
        max_steps=6,
        checkpoint_every=3,
        eval_every=3,
        min_lr_ratio=0.1,
    )
    seen = []

    def record(optimizer, args, kwargs):
        seen.append(
            (
                id(optimizer),
                type(optimizer),
                dict(optimizer.defaults),
                [
                    {
                        **{k: v for k, v in group.items() if k != "params"},
                        "dims": [p.dim() for p in group["params"]],
                        "numel": sum(p.numel() for p in group["params"]),
                    }
                    for group in optimizer.param_groups
                ],
            )
        )

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(cfg, DistContext())
    finally:
        handle.remove()
    return cfg, seen


def test_every_param_group_of_every_optimizer_follows_the_lr_schedule(uninterrupted):
    cfg, seen = uninterrupted
    optimizers = list(dict.fromkeys(key for key, *_ in seen))
    assert len(seen) == cfg.max_steps * len(optimizers)
    for call, (_, _, _, groups) in enumerate(seen):
        step = call // len(optimizers)  # each step steps every optimizer once
        expected = train_gpt2.get_lr(step, cfg)
        assert [group["lr"] for group in groups] == [expected] * len(groups), f"step {step}"
    assert {train_gpt2.get_lr(step, cfg) for step in range(cfg.max_steps)} >= {
        cfg.lr / 2,
        cfg.lr,
    }  # warm-up, peak


def test_adamw_has_gpt3s_betas_and_eps_and_decays_matrices_only(uninterrupted):
    cfg, seen = uninterrupted
    _, kind, defaults, groups = seen[0]
    assert kind is torch.optim.AdamW
    assert defaults["betas"] == (0.9, 0.95) and defaults["eps"] == 1e-8
    assert all(group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 for group in groups)
    decayed = [group for group in groups if group["weight_decay"] == cfg.weight_decay]
    plain = [group for group in groups if group["weight_decay"] == 0.0]
    assert len(decayed) + len(plain) == len(groups) and decayed and plain
    assert all(dim >= 2 for group in decayed for dim in group["dims"])
    assert all(dim < 2 for group in plain for dim in group["dims"])
    assert (
        sum(group["numel"] for group in groups)
        == GPT(config_for("d1", vocab_multiple=cfg.vocab_multiple)).num_parameters()
    )


def timeless(path):
    """A log file's lines in order, without the timings (which no two runs share)."""
    if path.endswith(".jsonl"):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("dt_ms", "tokens_per_sec")}
            for line in open(path)
        ]
    return open(path).read().splitlines()


def test_a_resumed_run_logs_each_step_once_line_by_line_like_an_uninterrupted_one(uninterrupted, tmp_path):
    cfg, _ = uninterrupted
    # a run killed after logging steps 3-5 but before its step-6 checkpoint: a copy with that checkpoint gone
    cut = tmp_path / "cut"
    shutil.copytree(cfg.log_dir, cut, ignore=shutil.ignore_patterns(".lock"))
    os.remove(cut / "model_00006.pt")
    train(replace(cfg, log_dir=str(cut), resume="auto"), DistContext())  # resumes at step 3
    for name in ("log.txt", "metrics.jsonl"):
        assert timeless(str(cut / name)) == timeless(os.path.join(cfg.log_dir, name)), name


def test_a_checkpoint_changed_in_a_way_that_keeps_it_finite_is_refused_by_its_checksum(
    uninterrupted, tmp_path, capsys
):
    cfg, _ = uninterrupted
    path = tmp_path / "model_00003.pt"
    checkpoint = torch.load(os.path.join(cfg.log_dir, "model_00003.pt"), weights_only=True)
    weight = checkpoint["model"]["transformer.h.0.attn.c_attn.weight"]
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(math.inf))  # one float, one ulp
    torch.save(checkpoint, path)  # with the checksum of the original contents
    with pytest.raises(UserError) as e:
        train_gpt2.read_verified(str(path), resume=True)
    assert (
        str(e.value)
        == f"checkpoint {path} is damaged: its contents do not match the checksum written with it"
    )


def test_a_shard_holding_the_vocabulary_size_as_an_id_is_refused(tmp_path):
    for top, refused in ((GPT2_VOCAB_SIZE - 1, False), (GPT2_VOCAB_SIZE, True)):
        data = tmp_path / str(top)
        make_data(data)
        shard = data / "t_train_000001.npy"
        tokens = np.load(shard)
        tokens[100] = top
        np.save(shard, tokens)
        loader = DataLoaderLite(2, 16, 0, 1, "train", str(data))
        if refused:
            with pytest.raises(UserError, match=f"holds token id {top}, >= vocab size {GPT2_VOCAB_SIZE}"):
                loader.next_batch()
        else:
            loader.next_batch()


HOLD_THE_LOCK = """
import sys
from gpt2lib.common import UserError
from gpt2lib.rundir import DirectoryLock
try:
    DirectoryLock(sys.argv[1], "--log-dir").acquire()
except UserError as e:
    print(e)
    sys.exit(3)
print("acquired")
"""


def test_a_second_process_is_refused_the_directory_lock_at_once(tmp_path):
    from gpt2lib.rundir import DirectoryLock

    lock = DirectoryLock(str(tmp_path / "log"), "--log-dir").acquire()
    try:
        started = time.time()
        result = subprocess.run(
            [sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "log")],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            timeout=60,
        )
        assert result.stdout.strip() == (
            f"--log-dir {tmp_path / 'log'} is in use by another run (host "
            f"{socket.gethostname()}, pid {os.getpid()}): wait for it to end, or "
            "choose another --log-dir"
        ), result.stderr
        assert result.returncode == 3 and time.time() - started < 60
    finally:
        lock.release()
