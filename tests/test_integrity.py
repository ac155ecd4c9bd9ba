"""Nothing a user made is lost, nothing damaged is trained on: damaged checkpoints, shards that change
under a run, one run per log dir, a full disk (a real tmpfs, when root), SIGHUP, shapes read from files.

Models are d1 on random tokens; runs on the command line go through train_gpt2.py and torchrun."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_long_runs import TRAIN, digest, same_weights, torchrun
from test_train import REPO, final_weights, logged, make_data, run_cli, tiny_config

import train_gpt2
from gpt2lib import checkpoints, common, previous_runs, rundir, runlog
from train_gpt2 import GPT, DistContext, UserError, train

TINY_CLI = [
    "--model",
    "d1",
    "-B",
    "2",
    "-T",
    "16",
    "--total-batch-size",
    "64",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--no-compile",
    "--warmup-steps",
    "2",
    "--lr",
    "1e-3",
    "--min-lr-ratio",
    "1",
    "--eval-every",
    "0",
    "--sample-every",
    "0",
    "--no-hellaswag",
    "--keep-last",
    "0",
]


# ---- damaged checkpoints: set aside under auto, an error by path, a stop when all are damaged


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4 and 6, and its final weights."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(
        make_data(root / "data"), str(root / "log"), max_steps=6, checkpoint_every=2, eval_every=0
    )
    train(cfg, DistContext())
    return cfg, final_weights(cfg.log_dir, 6)


def flip_bytes(path, n=64):
    """Invert n bytes in the middle of the file, where the tensors' bytes are (AdamW's moments are
    two thirds of a checkpoint): torch.load still reads it."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) * 2 // 3)
        data = f.read(n)
        f.seek(-n, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def rewrite(path, change):
    """Load a checkpoint, change it, save it again without a checksum, as an older version (or a
    hand-edited file) would have it: the structure checks must catch what the change broke."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.pop(checkpoints.CHECKSUM_KEY)
    change(checkpoint)
    torch.save(checkpoint, path)


DAMAGES = {
    "flipped-bytes": flip_bytes,
    "no-rng": lambda path: rewrite(path, lambda c: c.pop("rng")),
    "missing-tensor": lambda path: rewrite(path, lambda c: c["model"].pop("transformer.h.0.mlp.c_fc.weight")),
    "no-optimizer-moment": lambda path: rewrite(path, lambda c: c["optimizer"]["state"][3].pop("exp_avg")),
}


def copy_run(trained, tmp_path):
    cfg, reference = trained
    log_dir = str(tmp_path / "log")
    shutil.copytree(cfg.log_dir, log_dir)
    os.remove(os.path.join(log_dir, "model_00006.pt"))  # as if the run had died after step 5
    return replace(cfg, log_dir=log_dir, resume="auto"), reference


def test_flipped_bytes_checkpoint_is_set_aside_and_the_one_before_resumed_exactly(trained, tmp_path, capsys):
    cfg, reference = copy_run(trained, tmp_path)
    newest = os.path.join(cfg.log_dir, "model_00004.pt")
    flip_bytes(newest)
    damaged_bytes = open(newest, "rb").read()
    train(cfg, DistContext())
    out = capsys.readouterr().out
    assert (
        f"warning: skipping {newest}: checkpoint {newest} is damaged" in out and "resuming at step 2" in out
    )
    assert same_weights(final_weights(cfg.log_dir, 6), reference), "must end as the uninterrupted run"
    with open(os.path.join(cfg.log_dir, "previous_1", "model_00004.pt"), "rb") as f:
        assert f.read() == damaged_bytes  # set aside, not deleted
    with pytest.raises(UserError) as e:  # by path: a one-line error
        train(replace(cfg, resume=os.path.join(cfg.log_dir, "previous_1", "model_00004.pt")), DistContext())
    assert "\n" not in str(e.value) and "model_00004.pt is damaged" in str(e.value)


@pytest.mark.parametrize("damage", [d for d in DAMAGES if d != "flipped-bytes"])
def test_checkpoint_missing_state_falls_back_to_the_one_before(trained, tmp_path, capsys, damage):
    """The same choice as above (rank 0's find_resume_checkpoint) for checkpoints that still unpickle;
    --resume PATH refuses them with one line."""
    cfg, _ = copy_run(trained, tmp_path)
    newest = os.path.join(cfg.log_dir, "model_00004.pt")
    DAMAGES[damage](newest)
    path, checkpoint = train_gpt2.find_checkpoint("auto", cfg.log_dir)
    assert path == os.path.join(cfg.log_dir, "model_00002.pt") and checkpoint["step"] == 2
    assert f"warning: skipping {newest}: checkpoint {newest}" in capsys.readouterr().out
    with pytest.raises(UserError) as e:
        train_gpt2.find_checkpoint(newest, cfg.log_dir)
    assert "\n" not in str(e.value) and newest in str(e.value)


def test_every_checkpoint_damaged_stops_with_one_line_and_moves_nothing(trained, tmp_path):
    cfg, _ = copy_run(trained, tmp_path)
    flip_bytes(os.path.join(cfg.log_dir, "model_00004.pt"))
    DAMAGES["no-rng"](os.path.join(cfg.log_dir, "model_00002.pt"))
    before = sorted(os.listdir(cfg.log_dir))
    with pytest.raises(UserError) as e:
        train(cfg, DistContext())
    message = str(e.value)
    assert "\n" not in message and "model_00004.pt, model_00002.pt" in message and "--resume none" in message
    assert sorted(os.listdir(cfg.log_dir)) == before
    # the model loaders verify too: from_checkpoint (hellaswag.py -c) and --init-from
    with pytest.raises(UserError, match="is damaged: its contents do not match the checksum"):
        GPT.from_checkpoint(os.path.join(cfg.log_dir, "model_00004.pt"))
    with pytest.raises(UserError, match="is damaged"):
        train(
            replace(
                cfg,
                init_from=os.path.join(cfg.log_dir, "model_00004.pt"),
                model="",
                resume="none",
                log_dir=str(tmp_path / "ft"),
            ),
            DistContext(),
        )


def test_checkpoint_without_checksum_still_loads_with_a_note(trained, tmp_path, capsys):
    cfg, _ = copy_run(trained, tmp_path)
    newest = os.path.join(cfg.log_dir, "model_00004.pt")
    rewrite(newest, lambda c: None)
    path, checkpoint = train_gpt2.find_checkpoint("auto", cfg.log_dir)
    assert path == newest and checkpoint["step"] == 4
    assert f"note: checkpoint {newest} has no checksum" in capsys.readouterr().out
    assert same_weights(GPT.from_checkpoint(newest).state_dict(), final_weights(trained[0].log_dir, 4))


@pytest.mark.parametrize(
    "config, problem",
    [
        (dict(n_head=0), "n_head must be a positive integer"),
        (dict(n_embd="128"), "n_embd must be a positive integer, got '128'"),
        (dict(n_embd=2**20), "n_embd 1048576 is larger than 65536"),
        (dict(n_embd=100, n_head=3), "n_embd 100 is not a multiple of n_head 3"),
    ],
)
def test_bad_shapes_in_a_checkpoint_or_hf_config_are_refused_before_allocating(tmp_path, config, problem):
    path = str(tmp_path / "model.pt")
    shape = dict(block_size=64, vocab_size=50257, n_layer=1, n_head=1, n_embd=64, vocab_multiple=1)
    torch.save({"model": {}, "config": {**shape, **config}}, path)
    with pytest.raises(UserError) as e:
        GPT.from_checkpoint(path)
    assert problem in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    names = dict(block_size="n_positions", n_layer="n_layer", n_head="n_head", n_embd="n_embd")
    hf_config = {
        "model_type": "gpt2",
        "vocab_size": 50257,
        **{names[k]: v for k, v in {**shape, **config}.items() if k in names},
    }
    (hf_dir / "config.json").write_text(__import__("json").dumps(hf_config))
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(hf_dir))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


# ---- shards that change under a run


def change_shard(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    elif how == "rewritten":  # in place, same size: another tokenization written over it
        with open(path, "r+b") as f:
            f.seek(128)
            f.write(np.zeros((os.path.getsize(path) - 128) // 2, dtype=np.uint16).tobytes())
    else:
        os.remove(path)


@pytest.mark.parametrize("how", ["truncated", "rewritten"])  # "deleted": under two ranks, below
def test_shard_changed_during_a_run_stops_it_before_a_step_on_it(tmp_path, how):
    cfg = tiny_config(
        make_data(tmp_path / "data"), str(tmp_path / "log"), max_steps=8, checkpoint_every=2, eval_every=0
    )
    shard = os.path.join(cfg.data_dir, "t_train_000001.npy")  # the shard steps 0-22 read
    original = train_gpt2.train_step
    calls = []

    def step_then_change(run, step, *args):
        calls.append(step)
        result = original(run, step, *args)
        if step == 2:
            change_shard(shard, how)
        return result

    train_gpt2.train_step = step_then_change
    try:
        with pytest.raises(UserError) as e:
            train(cfg, DistContext())
    finally:
        train_gpt2.train_step = original
    assert f"shard {shard} was {'rewritten or replaced' if how == 'rewritten' else how}" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(logged(cfg.log_dir)) == [0, 1, 2], "no step may be taken once the shard changed"
    assert calls == [0, 1, 2, 3]  # step 3 read the changed shard and was refused before its update
    kept = torch.load(os.path.join(cfg.log_dir, "model_00002.pt"), weights_only=True)
    assert kept["step"] == 2 and sorted(n for n in os.listdir(cfg.log_dir) if ".pt" in n) == [
        "model_00002.pt"
    ]


def test_shard_deleted_under_two_ranks_stops_both_with_one_line(tmp_path):
    make_data(tmp_path / "data", n_train=400000)
    shard = tmp_path / "data" / "t_train_000001.npy"
    args = TINY_CLI + [
        "--data-dir",
        "data",
        "--log-dir",
        "log",
        "--max-steps",
        "100000",
        "--checkpoint-every",
        "0",
    ]
    proc = torchrun(args, tmp_path, nproc=2)
    wait_for_steps(tmp_path / "log" / "log.txt", 2, proc)
    change_shard(shard, "deleted")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: rank [01]: shard data/t_train_000001.npy was deleted while the run was using it: "
        r"restore it and resume \(the checkpoints written so far are good\)",
        errors[0],
    ), err
    assert 'train_gpt2.py", line' not in err and "exitcode  : 2" in err


# ---- one run per log dir; SIGHUP; leftovers of killed runs


def start_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, TRAIN, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_steps(log, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum(" train " in line for line in log.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach {n} steps: {proc.communicate()}")


def test_a_second_run_into_a_busy_log_dir_stops_and_the_first_ends_as_if_alone(tmp_path):
    make_data(tmp_path / "data", n_train=200000)
    log = tmp_path / "log"
    log.mkdir()
    # what an earlier killed run left: its temporary files go, a user's look-alike stays
    leftovers = [
        "model_00002.pt.tmp",
        "log.txt.tmp.node7.4242.0badf00d",
        "wandb_run_id.tmp.node7.4242.0badf00d",
    ]
    for name in leftovers + ["model_00002.pt.tmp.notes"]:
        (log / name).write_text("x")
    base = TINY_CLI + ["--data-dir", "data", "--resume", "none"]
    args = base + ["--log-dir", "log", "--max-steps", "100000", "--checkpoint-every", "0"]
    first = start_cli(args, tmp_path)
    wait_for_steps(log / "log.txt", 2, first)
    for second in [start_cli(args, tmp_path), torchrun(args, tmp_path, nproc=2)]:  # both at once
        out, err = second.communicate(timeout=300)
        assert second.returncode != 0
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert lines == [
            f"error: --log-dir log is in use by another run (host {os.uname().nodename}, "
            f"pid {first.pid}): wait for it to end, or choose another --log-dir"
        ], err
        assert 'train_gpt2.py", line' not in err  # no traceback of ours (torchrun prints its own report)
    assert first.poll() is None, "the first run must be unharmed"
    first.send_signal(signal.SIGHUP)  # an SSH session that dropped: checkpoint, exit 0
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "note: removed temporary files" in out
    saved = sorted(name for name in os.listdir(log) if name.endswith(".pt"))
    assert len(saved) == 1 and "stopped by signal" in out
    assert sorted(os.listdir(log)) == sorted(
        [".lock", "log.txt", "metrics.jsonl", "model_00002.pt.tmp.notes"] + saved
    )
    # the first run's weights are those of the same run alone: constant lr after warmup, so a run of
    # exactly that many steps (in a process with the same threads) is the reference
    steps = int(saved[0][6:11])
    alone = start_cli(
        base + ["--log-dir", "alone", "--max-steps", str(steps), "--checkpoint-every", str(steps)], tmp_path
    )
    assert alone.wait(timeout=300) == 0
    assert same_weights(final_weights(str(log), steps), final_weights(str(tmp_path / "alone"), steps))


def test_log_dir_that_is_a_file_is_one_line(tmp_path):
    make_data(tmp_path / "data")
    (tmp_path / "log").write_text("not a directory")
    result = run_cli(TINY_CLI + ["--data-dir", "data", "--log-dir", "log", "--max-steps", "1"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --log-dir log is a file, not a directory: choose another --log-dir"
    ]


# ---- a full disk: a real tmpfs, mounted by the test (root only)


@contextlib.contextmanager
def tmpfs(path, size, options=""):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@pytest.mark.parametrize("ranks", [1, 2])
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_earlier_one(tmp_path, ranks):
    make_data(tmp_path / "data")
    # a d1 checkpoint (weights and AdamW moments) is ~40 MB: the first fits, the second does not
    with tmpfs(tmp_path / "disk", "64m") as disk:
        args = TINY_CLI + [
            "--data-dir",
            "data",
            "--log-dir",
            str(disk / "log"),
            "--max-steps",
            "6",
            "--checkpoint-every",
            "2",
        ]
        proc = start_cli(args, tmp_path) if ranks == 1 else torchrun(args, tmp_path, nproc=2)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert (
            len(errors) == 1
            and "model_00004.pt: cannot write" in errors[0]
            and "No space left on device" in errors[0]
        ), err
        assert 'train_gpt2.py", line' not in err and "Connection closed" not in err
        assert sorted(os.listdir(disk / "log")) == [".lock", "log.txt", "metrics.jsonl", "model_00002.pt"]
        checkpoint = train_gpt2.read_verified(
            str(disk / "log" / "model_00002.pt"), resume=True
        )  # verified: checksum and structure
        assert checkpoint["step"] == 2


@pytest.mark.parametrize("eval_only", [False, True])
def test_disk_full_on_a_log_append_stops_cleanly(tmp_path, monkeypatch, eval_only):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        cfg = tiny_config(
            make_data(tmp_path / "data"),
            str(disk / "log"),
            max_steps=4,
            checkpoint_every=0,
            eval_every=0,
            eval_only=eval_only,
        )
        prepare = runlog.RunLog.prepare

        def prepare_then_fill(log_dir, resume_step):
            prepare(log_dir, resume_step)
            with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)

        monkeypatch.setattr(runlog.RunLog, "prepare", staticmethod(prepare_then_fill))
        with pytest.raises(UserError) as e:
            train(cfg, DistContext())
        assert "log.txt: cannot append" in str(e.value) and "No space left" in str(e.value)
        assert "\n" not in str(e.value)
        assert not [name for name in os.listdir(disk / "log") if ".tmp" in name]


def fill(disk):
    """Use up a tmpfs: its space (a file that grows until ENOSPC), or, mounted with nr_inodes, its
    inodes (empty files until ENOSPC)."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)
    with contextlib.suppress(OSError):
        for n in range(100000):
            (disk / f"inode_{n}").touch()


def listing(log_dir):
    """Every file under log_dir with its digest (the lock file aside: it names its holder)."""
    return {
        os.path.relpath(os.path.join(d, n), log_dir): digest(os.path.join(d, n))
        for d, _, names in os.walk(log_dir)
        for n in names
        if n != ".lock"
    }


@pytest.mark.parametrize("case", ["copy, disk full", "move, no inodes left"])
def test_a_set_aside_that_fails_puts_everything_back_and_is_one_line(tmp_path, monkeypatch, case):
    """Resuming from an older checkpoint copies the logs aside (a full disk stops the copy); a fresh
    start moves the earlier run aside into a new previous_N/ (no inode left for it)."""
    options = "" if case.startswith("copy") else ",nr_inodes=16"
    with tmpfs(tmp_path / "disk", "160m", options) as disk:
        earlier = tiny_config(
            make_data(tmp_path / "data"), str(disk / "log"), max_steps=4, checkpoint_every=2, eval_every=0
        )
        train(earlier, DistContext())
        before = listing(disk / "log")
        set_aside = previous_runs.set_aside

        def fill_then_set_aside(*args):
            fill(disk)
            return set_aside(*args)

        monkeypatch.setattr(previous_runs, "set_aside", fill_then_set_aside)
        resume = str(disk / "log" / "model_00002.pt") if case.startswith("copy") else "none"
        with pytest.raises(UserError) as e:
            train(replace(earlier, max_steps=6, resume=resume), DistContext())
        message = str(e.value)
        assert (
            message.startswith(
                f"{disk / 'log'}: cannot set earlier runs' files aside into {disk / 'log' / 'previous_1'}"
            )
            and "No space left on device" in message
        ), message
        assert "nothing was moved" in message and "\n" not in message
        assert listing(disk / "log") == before  # every file in place, unchanged; no previous_1, no copy


def test_sharded_checkpoint_and_probe_writes_that_fail_are_one_line(tmp_path):
    """The writes rank 0 makes through DistContext.decide outside atomic_write: a failure there is a
    UserError naming the path, not a traceback."""
    with tmpfs(tmp_path / "disk", "1m", ",nr_inodes=4") as disk:
        fill(disk)
        for write in (
            lambda: checkpoints.begin_sharded_checkpoint(str(disk), 2),
            lambda: rundir.write_probe(str(disk)),
        ):
            with pytest.raises(UserError) as e:
                write()
            assert str(e.value).startswith(str(disk)) and "No space left on device" in str(e.value), e.value
            assert "\n" not in str(e.value)


def test_read_only_log_dir_and_an_impossible_model_are_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", ",ro") as ro:
        for log_dir in (ro, ro / "log"):  # an existing read-only dir, and one that cannot be created
            with pytest.raises(UserError) as e:
                train(tiny_config(str(tmp_path / "no-data"), str(log_dir)), DistContext())
            assert str(log_dir) in str(e.value) and "Read-only file system" in str(e.value)
            assert "\n" not in str(e.value)
    problems = train_gpt2.validate(replace(tiny_config("data", "log"), model="d5000"), 1)
    assert problems == [
        "--model: d5000: not a usable model shape: n_layer 5000 is larger than 1024; "
        "n_head 5000 is larger than 1024; n_embd 320000 is larger than 65536"
    ]


def test_write_failures_from_libraries_are_recognised():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError(  # noqa: B904 - implicit chaining, as torch.save's zip writer raises it
                "[enforce fail at inline_container.cc:672] . unexpected pos 26228096 vs 26227984"
            )
    except RuntimeError as e:
        assert "No space left" in str(common.write_failure(e))  # the OSError behind torch.save's error
    assert common.write_failure(
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    )
    assert common.write_failure(RuntimeError("size mismatch for transformer.wte.weight")) is None


def test_over_long_hellaswag_row_is_named_and_training_skips_hellaswag(tmp_path, capsys):
    import json

    from gpt2lib.hellaswag_data import load_examples
    from gpt2lib.hellaswag_scoring import evaluate

    path = tmp_path / "h.jsonl"
    rows = [{"ctx": "the cat", "endings": ["a", "b", "c", "d"], "label": 0}] * 2 + [
        {"ctx": " ".join(["word"] * 1100), "endings": ["a", "b", "c", "d"], "label": 1}
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = GPT(train_gpt2.config_for("d1"))
    with pytest.raises(
        UserError,
        match=f"^{path}:3: a HellaSwag row is 1101 tokens long, more than the model's context of 1024$",
    ):
        evaluate(model, load_examples("val", data_path=str(path)), "cpu")
    cfg = tiny_config(
        make_data(tmp_path / "data"),
        str(tmp_path / "log"),
        max_steps=1,
        checkpoint_every=0,
        hellaswag=True,
        hellaswag_data=str(path),
    )
    train(cfg, DistContext())
    assert (
        f"warning: HellaSwag eval is off: {path}:3: a HellaSwag row is 1101 tokens long"
        in capsys.readouterr().out
    )
    assert logged(cfg.log_dir, "val") and not logged(cfg.log_dir, "hella")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_holding_code_is_refused_without_advice_to_run_it(tmp_path):
    path = str(tmp_path / "model_00001.pt")
    torch.save({"model": {}, "config": {}, "x": RunsCode()}, path)
    with pytest.raises(UserError) as e:
        GPT.from_checkpoint(path)
    message = str(e.value)
    assert "damaged or not a train_gpt2.py checkpoint" in message and "system" in message
    assert "weights_only" not in message and "\n" not in message
