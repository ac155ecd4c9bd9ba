"""Gaps closed by issue 23: bad numbers refused at parse time, quiet one-line failures (a tracker on a
full disk, Ctrl-C during start-up, shards changed since the checkpoint), and direct tests for mistakes
that the suite once missed or caught only by accident."""

import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import fields

import numpy as np
import pytest

import train_gpt2
from test_integrity import tmpfs
from test_train import install_stop_after, make_data, tiny_config
from train_gpt2 import GPT2_VOCAB_SIZE, DataLoaderLite, DistContext, TrainConfig, train, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOAT_FLAGS = [f.name for f in fields(TrainConfig) if f.type is float]


# ---- numbers validated at parse time

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_every_float_flag_refuses_nan_and_inf_in_one_message(name, value):
    flag = "--" + name.replace("_", "-")
    assert validate(TrainConfig(**{name: value}), 1) == [f"{flag} must be a finite number, got {value}"]


@pytest.mark.parametrize("settings, message", [
    (dict(lr=1e308), "--lr must be positive and at most 10, got 1e+308"),
    (dict(lr=0.0), "--lr must be positive and at most 10, got 0.0"),
    (dict(lr=5.0, weight_decay=0.2), "--weight-decay 0.2 times --lr 5.0 must be below 1: each step would zero or "
                                     "flip the sign of every decayed weight"),
    (dict(grad_clip=-1.0), "--grad-clip must be >= 0, got -1.0"),
    (dict(min_lr_ratio=1.5), "--min-lr-ratio must be in [0, 1], got 1.5"),
    (dict(temperature=-0.5), "--temperature must be positive, got -0.5"),
])
def test_out_of_range_float_flags_are_refused(settings, message):
    assert validate(TrainConfig(**settings), 1) == [message]


def test_bad_numbers_stop_the_command_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--lr", "nan", "--temperature", "nan", "--grad-clip", "nan", "--weight-decay", "inf",
                         "--log-dir", "log"])
    assert str(e.value.code).splitlines() == [
        "error: --grad-clip must be a finite number, got nan",
        "error: --lr must be a finite number, got nan",
        "error: --temperature must be a finite number, got nan",
        "error: --weight-decay must be a finite number, got inf"]
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
        result = subprocess.run([sys.executable, "-c", FILL_THEN_TRACK, str(disk)], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "warning: TensorBoard tracking failed (OSError: [Errno 28] No space left on device): training goes on "
        "without it", "training went on"]
    assert result.stderr == ""


def test_ctrl_c_while_train_gpt2_imports_exits_quietly_with_130(tmp_path):
    # -X importtime reports each import as it completes: numpy's line means the script's own imports
    # have begun, and torch's (seconds) is still under way
    proc = subprocess.Popen([sys.executable, "-X", "importtime", os.path.join(REPO, "train_gpt2.py"), "--device", "cpu"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
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
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


def test_a_resume_on_shards_changed_since_the_checkpoint_says_so_in_one_line(tmp_path, capsys):
    cfg = tiny_config(make_data(tmp_path / "data"), str(tmp_path / "log"), resume="auto", eval_every=0)
    warned = lambda: [line for line in capsys.readouterr().out.splitlines() if "changed since" in line]
    for stop_after in (1, 1):  # a checkpoint at step 1, then one at step 2 resumed from it
        original = install_stop_after(stop_after)
        try:
            train(cfg, DistContext())
        finally:
            train_gpt2.train_step = original
        assert warned() == []  # the same shards: nothing to say
    shard = tmp_path / "data" / "t_train_000002.npy"
    tokens = np.load(shard)
    np.save(shard, (tokens[::-1] + 1) % GPT2_VOCAB_SIZE)  # same name, size and token count; other tokens
    assert train(cfg, DistContext())["losses"]  # resumed at step 2 and went on to the end
    assert warned() == ["warning: 1 'train' shard(s) changed since the checkpoint (t_train_000002.npy): same names "
                        "and token counts, other tokens; resuming on them"]


def test_a_checkpoint_from_before_shard_digests_still_resumes(tmp_path, capsys):
    loader = DataLoaderLite(2, 16, 0, 1, "train", make_data(tmp_path / "data"))
    loader.next_batch()
    state = loader.state_dict()
    del state["shard_digests"]
    fresh = DataLoaderLite(2, 16, 0, 1, "train", str(tmp_path / "data"))
    fresh.load_state_dict(state)
    assert fresh.position == loader.position and capsys.readouterr().out == ""
