"""Read-only modes stay read-only, and exports never destroy a user's edit.

--eval-only, --export-hf, --generate and `hellaswag.py -c` change nothing in a log dir (names, sizes,
digests and mtimes compared before and after), and read a checkpoint once, into memory, so that a
live run that prunes its checkpoints every step never makes them fail. A re-export replaces an
earlier export only when its marker's digests show every file unchanged; a full disk at any export
file (a real tmpfs) is one line. CPU only, no network; models are d1/d2."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import time
from dataclasses import replace

import pytest
from test_export import export_files, tiny_model
from test_integrity import TINY_CLI, start_cli, tmpfs, wait_for_steps
from test_train import make_data, tiny_config, write_hellaswag

import hellaswag
import train_gpt2
from gpt2lib import hf
from train_gpt2 import DistContext, UserError, train

# ---- exports never destroy a user's edit


def fine_tune_in_place(directory):
    """What a user's fine-tune saved over the export: the same file name, other weights."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    weights = load_file(path)
    weights["transformer.ln_f.bias"] += 0.5
    save_file(weights, path, metadata={"format": "pt"})


EDITS = {
    "model.safetensors": fine_tune_in_place,
    "tokenizer_config.json": lambda d: open(os.path.join(d, "tokenizer_config.json"), "a").write("\n"),
    "config.json": lambda d: open(os.path.join(d, "config.json"), "r+b").write(b" "),  # same size
}


@pytest.mark.parametrize("edited", list(EDITS))
def test_reexport_over_an_edited_export_stops_naming_the_file(tmp_path, offline, edited):
    out = tmp_path / "out"
    tiny_model(seed=1).save_pretrained(out)
    EDITS[edited](out)
    before = export_files(out)
    with pytest.raises(UserError) as e:
        tiny_model(seed=2).save_pretrained(out)
    message = str(e.value)
    assert message.startswith(f"{out / edited} was changed since it was exported") and "\n" not in message, (
        message
    )
    assert export_files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_reexport_on_the_command_line_checks_the_digests_before_loading_anything(
    tmp_path, offline, monkeypatch, capsys
):
    out = tmp_path / "out"
    tiny_model(seed=1).save_pretrained(out)
    fine_tune_in_place(out)
    before = export_files(out)

    def no_load(*args):
        raise AssertionError("the model was loaded before the export directory was checked")

    monkeypatch.setattr(train_gpt2, "load_cli_model", no_load)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--export-hf", str(out), "--log-dir", str(tmp_path / "log")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out / 'model.safetensors'} was changed since it was exported (its contents differ from the "
        "digest the export recorded): export into a new or empty directory, or move this one away; "
        "nothing was changed"
    ]
    assert export_files(out) == before


def test_an_unchanged_export_is_replaced_and_its_marker_holds_every_file_digest(tmp_path, offline):
    out = tmp_path / "out"
    tiny_model(seed=1).save_pretrained(out)
    tiny_model(seed=2).save_pretrained(out)  # unchanged since: replaced
    marker = json.loads((out / hf.EXPORT_MARKER).read_text())
    files = export_files(out)
    assert marker["sha256"] == {
        name: hashlib.sha256(data).hexdigest() for name, data in files.items() if name != hf.EXPORT_MARKER
    }


def test_an_export_whose_marker_has_no_digests_is_not_replaced(tmp_path, offline):
    """Exports written before markers held digests: whether they were edited cannot be told."""
    out = tmp_path / "out"
    tiny_model(seed=1).save_pretrained(out)
    marker = json.loads((out / hf.EXPORT_MARKER).read_text())
    del marker["sha256"]
    (out / hf.EXPORT_MARKER).write_text(json.dumps(marker))
    before = export_files(out)
    with pytest.raises(UserError) as e:
        tiny_model(seed=2).save_pretrained(out)
    assert str(e.value) == (
        f"{out} is an export whose marker records no digests of its files (written by an "
        "earlier version): whether they were changed since cannot be told, so it is not "
        "replaced; move it away (or delete it) and export again; nothing was changed"
    )
    assert export_files(out) == before


# in the order write_hf_checkpoint writes them, after the temporary directory's first marker
EXPORT_ORDER = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer_config.json",
    "tokenizer.json",
]
PAGE = 4096


@pytest.mark.parametrize("full_at", EXPORT_ORDER)
def test_a_full_disk_at_any_export_file_is_one_line_and_leaves_nothing(tmp_path, offline, full_at):
    """A real tmpfs filled so that exactly the files before `full_at` fit: tokenizers reports its
    failed write of tokenizer.json as a plain Exception."""
    tiny_model(seed=1).save_pretrained(tmp_path / "sizes")

    def pages(name):
        return -(-os.path.getsize(tmp_path / "sizes" / name) // PAGE)

    room = pages(hf.EXPORT_MARKER) + sum(pages(name) for name in EXPORT_ORDER[: EXPORT_ORDER.index(full_at)])
    with tmpfs(tmp_path / "disk", "64m") as disk:
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (os.statvfs(disk).f_bavail - room) * PAGE)
        with pytest.raises(UserError) as e:
            tiny_model(seed=1).save_pretrained(disk / "out")
        message = str(e.value)
        assert (
            message.startswith(f"{disk / 'out'}: cannot write the export (")
            and "No space left on device" in message
        )
        assert "\n" not in message
        assert os.listdir(disk) == ["filler"]  # no temporary directory, no half export


# ---- read-only modes change nothing in a log dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run with checkpoints and evals at 2, 4 and 6, HellaSwag data and its data dir."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(
        make_data(root / "data"), str(root / "log"), max_steps=6, checkpoint_every=2, eval_every=2
    )
    train(cfg, DistContext())
    return cfg, write_hellaswag(root / "hellaswag.jsonl", n=4)


def snapshot(root):
    """Every entry under root (root too): kind, size, mtime in ns, and a file's digest."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in [".", *dirs, *files] if directory == str(root) else [*dirs, *files]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            digest = (
                hashlib.sha256(open(path, "rb").read()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            )
            entries[os.path.relpath(path, root)] = (
                stat.S_IFMT(info.st_mode),
                info.st_size,
                info.st_mtime_ns,
                digest,
            )
    return entries


@pytest.fixture
def run_dir(trained, tmp_path):
    cfg, hella = trained
    log_dir = str(tmp_path / "log")
    shutil.copytree(cfg.log_dir, log_dir)
    return replace(cfg, log_dir=log_dir), hella


@pytest.mark.parametrize("resume", ["model_00002.pt", "auto"])
def test_eval_only_in_a_run_log_dir_changes_nothing_and_prints_its_results(run_dir, capsys, resume):
    """An older checkpoint evaluated used to set the newer ones aside and trim the logs: the next plain
    run then continued from the older one."""
    cfg, hella = run_dir
    assert sorted(name for name in os.listdir(cfg.log_dir) if name.endswith(".pt")) == [
        "model_00002.pt",
        "model_00004.pt",
        "model_00006.pt",
    ]
    before = snapshot(cfg.log_dir)
    path = os.path.join(cfg.log_dir, resume) if resume != "auto" else "auto"
    result = train(
        replace(cfg, eval_only=True, resume=path, hellaswag=True, hellaswag_data=hella), DistContext()
    )
    out = capsys.readouterr().out
    step = 2 if resume != "auto" else 6
    assert f"step {step:5d} | val loss {result['val_loss']:.4f}" in out and "HellaSwag acc_norm" in out
    assert f"--eval-only writes nothing into --log-dir {cfg.log_dir}" in out
    assert snapshot(cfg.log_dir) == before


def test_eval_only_into_a_new_log_dir_still_logs_its_results(run_dir):
    cfg, _ = run_dir
    fresh = os.path.join(os.path.dirname(cfg.log_dir), "baseline")
    result = train(
        replace(cfg, eval_only=True, resume=os.path.join(cfg.log_dir, "model_00004.pt"), log_dir=fresh),
        DistContext(),
    )
    with open(os.path.join(fresh, "log.txt")) as f:
        assert f.read().splitlines() == [f"4 val {result['val_loss']:.4f}"]


def test_every_read_only_mode_leaves_the_log_dir_as_it_was(run_dir, tmp_path, capsys):
    cfg, hella = run_dir
    before = snapshot(cfg.log_dir)
    train_gpt2.main(["--export-hf", str(tmp_path / "hf"), "--log-dir", cfg.log_dir])
    train_gpt2.main(
        [
            "--generate",
            "Hello",
            "--log-dir",
            cfg.log_dir,
            "--num-samples",
            "1",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ]
    )
    hellaswag.main(["-c", os.path.join(cfg.log_dir, "model_00004.pt"), "--data", hella, "--device", "cpu"])
    train(replace(cfg, eval_only=True, resume="auto"), DistContext())
    out = capsys.readouterr().out
    assert "wrote" in out and "sample:" in out and "hellaswag val" in out
    assert snapshot(cfg.log_dir) == before


# ---- read-only modes against a live run that prunes its checkpoints every step

LIVE_ROUNDS = 4  # of an export, a --generate and an --eval-only each


@contextlib.contextmanager
def live_run(root):
    """A training run that checkpoints every step and keeps only the newest; stopped by SIGTERM at the end."""
    make_data(root / "data", n_train=200000)
    args = TINY_CLI[:-2] + [
        "--keep-last",
        "1",
        "--checkpoint-every",
        "1",
        "--data-dir",
        "data",
        "--log-dir",
        "log",
        "--max-steps",
        "100000",
        "--resume",
        "none",
    ]
    proc = start_cli(args, root)
    try:
        wait_for_steps(root / "log" / "log.txt", 2, proc)
        yield root / "log"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in out, err


def attempt(mode, log_dir, root, n):
    """Run one read-only mode on the live run's log dir in this process; returns its failure or None."""
    common = ["--log-dir", str(log_dir), "--device", "cpu", "--dtype", "fp32"]
    try:
        if mode == "export":
            train_gpt2.main(["--export-hf", str(root / f"hf_{n}"), *common])
        elif mode == "generate":
            train_gpt2.main(["--generate", "Hello", "--num-samples", "1", "--max-new-tokens", "2", *common])
        else:
            cfg = train_gpt2.parse_config(
                TINY_CLI + ["--eval-only", "--val-steps", "1", "--data-dir", str(root / "data"), *common]
            )
            train(cfg, DistContext())
    except (SystemExit, UserError) as e:
        return f"{mode}: {e}"
    return None


def test_read_only_modes_never_fail_on_a_live_run_that_prunes_every_step(tmp_path, capsys):
    failures, tried = [], 0
    with live_run(tmp_path) as log_dir:
        for n in range(LIVE_ROUNDS):
            for mode in ("export", "generate", "eval"):
                failure = attempt(mode, log_dir, tmp_path, n)
                tried += 1
                if failure:
                    failures.append(f"{failure} ({capsys.readouterr().err.strip()})")
                time.sleep(0.05)
    print(f"{len(failures)} of {tried} read-only runs failed against the live run")
    assert not failures, f"{len(failures)} of {tried} failed: {failures}"
    assert len([name for name in os.listdir(tmp_path) if name.startswith("hf_")]) == LIVE_ROUNDS
