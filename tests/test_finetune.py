"""Fine-tuning (--init-from), --eval-only and --export-hf. CPU only, no network.

The references are independent of the code under test: transformers' GPT2LMHeadModel computing its
own loss on the val windows read straight from the shard, the val loss a training run stored in its
checkpoint, one process against two, and transformers loading the export."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_model import perturb_
from test_train import final_weights, logged, make_data, run_cli, spawn_train, tiny_config, write_hellaswag

import train_gpt2
from train_gpt2 import GPT, DistContext, TrainConfig, UserError, parse_config, train, validate

try:  # the notebook test needs jupyter and matplotlib; without them test_notebook skips itself
    from test_notebook import images, python3_kernel, run_notebook, text_of  # noqa: F401 (python3_kernel: a fixture)
except pytest.skip.Exception:
    run_notebook = None

B, T, VAL_STEPS = 2, 16, 3
HF_SHAPE = dict(n_layer=2, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py: no hub, no network


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small random transformers GPT-2 (every tensor perturbed), saved by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, **HF_SHAPE)).eval()
    perturb_(hf, seed=3)
    directory = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(directory)
    return hf, str(directory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def finetune_config(data_dir, log_dir, init_from, **overrides):
    return tiny_config(
        data_dir,
        log_dir,
        **{
            "model": "",
            "init_from": init_from,
            "batch_size": B,
            "seq_len": T,
            "val_steps": VAL_STEPS,
            **overrides,
        },
    )


def transformers_val_loss(hf, data_dir):
    """transformers' own loss over the windows our val loader reads: batch s, row b is the tokens
    [(s*B + b)*T, (s*B + b + 1)*T] of the val shard, its last token only a target."""
    tokens = np.load(os.path.join(data_dir, "t_val_000000.npy")).astype(np.int64)
    losses = []
    for step in range(VAL_STEPS):
        rows = torch.stack(
            [torch.from_numpy(tokens[(step * B + b) * T : (step * B + b + 1) * T + 1]) for b in range(B)]
        )
        with torch.no_grad():
            losses.append(hf(rows, labels=rows).loss.item())  # shifts the labels itself: B*T predictions
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def eval_only_run(hf_model, data_dir, tmp_path_factory):
    """--init-from the HF directory --eval-only, on a data dir that holds only the val shard."""
    root = tmp_path_factory.mktemp("eval_only")
    val_only = root / "data"
    val_only.mkdir()
    os.link(os.path.join(data_dir, "t_val_000000.npy"), val_only / "t_val_000000.npy")
    cfg = finetune_config(
        str(val_only),
        str(root / "log"),
        hf_model[1],
        eval_only=True,
        hellaswag=True,
        hellaswag_data=write_hellaswag(root / "hellaswag.jsonl"),
    )
    return cfg, train(cfg, DistContext())


# ---- --eval-only and fine-tuning from an HF directory


def test_eval_only_val_loss_equals_transformers_own(eval_only_run, hf_model, data_dir):
    cfg, result = eval_only_run
    reference = transformers_val_loss(hf_model[0], data_dir)
    assert abs(result["val_loss"] - reference) < 1e-4, (result["val_loss"], reference)
    assert result["losses"] == []
    # logged as a training run logs its step 0, and nothing else: no training, no checkpoint
    with open(os.path.join(cfg.log_dir, "log.txt")) as f:
        lines = f.read().splitlines()
    assert lines == [f"0 val {result['val_loss']:.4f}", f"0 hella {logged(cfg.log_dir, 'hella')[0]:.4f}"]
    assert logged(cfg.log_dir, "val") == {0: result["val_loss"]}
    assert sorted(os.listdir(cfg.log_dir)) == [".lock", "log.txt", "metrics.jsonl"]


def test_fine_tune_starts_from_the_weights_and_learns(eval_only_run, hf_model, data_dir, tmp_path):
    eval_cfg, evaluated = eval_only_run
    cfg = finetune_config(
        data_dir, str(tmp_path / "log"), hf_model[1], max_steps=6, eval_every=3, checkpoint_every=3
    )
    result = train(cfg, DistContext())
    assert logged(cfg.log_dir, "val")[0] == evaluated["val_loss"]  # step 0 is the model as loaded
    assert result["losses"][-1] < result["losses"][0] - 0.1, result["losses"]
    assert sorted(logged(cfg.log_dir)) == list(range(6))  # step 0 onwards: the step count starts over
    checkpoint = torch.load(os.path.join(cfg.log_dir, "model_00006.pt"), weights_only=True)
    assert checkpoint["config"] == dict(block_size=64, vocab_size=50257, vocab_multiple=64, **HF_SHAPE)
    assert checkpoint["train_config"]["init_from"] == hf_model[1]


def test_two_ranks_from_an_hf_directory_match_one_rank(hf_model, data_dir, tmp_path):
    single = finetune_config(data_dir, str(tmp_path / "single"), hf_model[1], max_steps=3, checkpoint_every=3)
    train(single, DistContext())
    double = replace(single, log_dir=str(tmp_path / "double"))  # same total batch: accumulation 4 -> 2
    spawn_train(double)
    a, b = final_weights(single.log_dir, 3), final_weights(double.log_dir, 3)
    initial = GPT.from_pretrained(hf_model[1], vocab_multiple=64).state_dict()
    key = "transformer.h.1.mlp.c_fc.weight"
    assert 1e-4 < (a[key] - initial[key]).abs().max() < 0.1  # trained, from the loaded weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    la, lb = logged(single.log_dir), logged(double.log_dir)
    assert la.keys() == lb.keys() == {0, 1, 2} and all(abs(la[s] - lb[s]) < 1e-5 for s in la)


# ---- from a training checkpoint; resume takes precedence


@pytest.fixture(scope="module")
def trained_checkpoint(data_dir, tmp_path_factory):
    """A 3-step d1 run; its checkpoint holds the val loss at step 3."""
    cfg = tiny_config(
        data_dir,
        str(tmp_path_factory.mktemp("pretrain") / "log"),
        max_steps=3,
        checkpoint_every=3,
        val_steps=VAL_STEPS,
    )
    train(cfg, DistContext())
    return os.path.join(cfg.log_dir, "model_00003.pt")


def test_init_from_a_training_checkpoint_then_resume(trained_checkpoint, data_dir, tmp_path, capsys):
    stored = torch.load(trained_checkpoint, weights_only=True)
    # another vocabulary padding than the checkpoint's (64): the padded ids are never scored
    cfg = finetune_config(
        data_dir,
        str(tmp_path / "log"),
        trained_checkpoint,
        vocab_multiple=1,
        max_steps=2,
        eval_every=2,
        checkpoint_every=2,
        resume="auto",
    )
    train(cfg, DistContext())
    assert logged(cfg.log_dir, "val")[0] == pytest.approx(stored["val_loss"], abs=1e-5)
    checkpoint = torch.load(os.path.join(cfg.log_dir, "model_00002.pt"), weights_only=True)
    assert checkpoint["config"] == {**stored["config"], "vocab_multiple": 1}  # d1's shape, as stored
    assert checkpoint["step"] == 2

    # rerun with more steps: the log dir's checkpoint of this fine-tune wins over --init-from,
    # whose file is not read again (here it is gone)
    moved = str(tmp_path / "elsewhere.pt")
    os.rename(trained_checkpoint, moved)
    try:
        capsys.readouterr()
        result = train(replace(cfg, max_steps=3), DistContext())
    finally:
        os.rename(moved, trained_checkpoint)
    out = capsys.readouterr().out
    assert f"resuming {os.path.join(cfg.log_dir, 'model_00002.pt')}, a run started from --init-from" in out
    assert "resuming at step 2" in out and len(result["losses"]) == 1


def test_a_checkpoint_of_another_run_is_not_resumed(trained_checkpoint, hf_model, data_dir, tmp_path):
    cfg = finetune_config(data_dir, os.path.dirname(trained_checkpoint), hf_model[1], resume="auto")
    before = sorted(os.listdir(cfg.log_dir))
    with pytest.raises(
        UserError, match="is a run started from scratch .no --init-from., not from --init-from"
    ):
        train(cfg, DistContext())
    assert sorted(os.listdir(cfg.log_dir)) == before


# ---- bad input: one line each, and nothing in the log dir moves


def assert_one_line_error(cfg, *needles):
    os.makedirs(cfg.log_dir, exist_ok=True)
    with open(os.path.join(cfg.log_dir, "log.txt"), "w") as f:
        f.write("0 train 1.000000\n")  # another run's log, which a bad start must not set aside
    with pytest.raises(UserError) as e:
        train(cfg, DistContext())
    message = str(e.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    assert sorted(os.listdir(cfg.log_dir)) == [
        ".lock",
        "log.txt",
    ]  # the lock, and another run's log untouched


def test_directory_without_weights_is_a_one_line_error(hf_model, data_dir, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    with open(os.path.join(hf_model[1], "config.json")) as src:
        (config_only / "config.json").write_text(src.read())
    assert_one_line_error(
        finetune_config(data_dir, str(tmp_path / "log"), str(config_only)),
        str(config_only),
        "model.safetensors",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        finetune_config(data_dir, str(tmp_path / "log"), str(empty)), str(empty), "config.json"
    )


def test_model_flag_conflicting_with_the_source_is_a_one_line_error(
    hf_model, trained_checkpoint, data_dir, tmp_path
):
    assert_one_line_error(
        finetune_config(data_dir, str(tmp_path / "a"), hf_model[1], model="d2"),
        "--model d2 (2 layers, 2 heads, width 128) conflicts with --init-from",
        "(2 layers, 2 heads, width 32)",
    )
    assert_one_line_error(
        finetune_config(data_dir, str(tmp_path / "b"), trained_checkpoint, model="gpt2"),
        "--model gpt2",
        "(1 layers, 1 heads, width 64)",
    )
    # the same shape is no conflict
    train(
        finetune_config(data_dir, str(tmp_path / "c"), trained_checkpoint, model="d1", eval_only=True),
        DistContext(),
    )


def test_unknown_source_on_the_command_line(data_dir, tmp_path):
    result = run_cli(
        [
            "--init-from",
            "gpt3",
            "--data-dir",
            data_dir,
            "-B",
            "2",
            "-T",
            "16",
            "--total-batch-size",
            "32",
            "--device",
            "cpu",
            "--log-dir",
            "log",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --init-from gpt3: not one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, an existing HF model "
        "directory or a training checkpoint (.pt)"
    ]
    assert not (tmp_path / "log").exists()  # refused before the log dir is touched


# ---- --export-hf


def test_export_hf_from_a_checkpoint_loads_in_transformers(trained_checkpoint, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    log_dir = os.path.dirname(trained_checkpoint)
    before = {name: os.stat(os.path.join(log_dir, name)) for name in os.listdir(log_dir)}
    out = tmp_path / "export"
    # no data dir, and the log dir's files stay as they are (no setting aside, no trimming)
    train_gpt2.main(
        [
            "--init-from",
            trained_checkpoint,
            "--export-hf",
            str(out),
            "--data-dir",
            "missing",
            "--log-dir",
            log_dir,
        ]
    )
    assert f"wrote {out} from --init-from {trained_checkpoint}" in capsys.readouterr().out
    ours = GPT.from_checkpoint(trained_checkpoint).eval()
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    # without --init-from: the checkpoint --resume auto picks in --log-dir
    train_gpt2.main(
        ["--export-hf", str(tmp_path / "resumable"), "--data-dir", "missing", "--log-dir", log_dir]
    )
    assert f"from {trained_checkpoint}" in capsys.readouterr().out
    with (
        open(out / "model.safetensors", "rb") as a,
        open(tmp_path / "resumable" / "model.safetensors", "rb") as b,
    ):
        assert a.read() == b.read()
    after = {name: os.stat(os.path.join(log_dir, name)) for name in os.listdir(log_dir)}
    assert {n: (s.st_size, s.st_mtime_ns) for n, s in after.items()} == {
        n: (s.st_size, s.st_mtime_ns) for n, s in before.items()
    }


def test_export_hf_without_a_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--export-hf", str(tmp_path / "out"), "--log-dir", str(tmp_path / "empty")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.splitlines() == [
        f"error: --export-hf: no model to export (no checkpoint in {tmp_path / 'empty'}): "
        "pass --init-from SOURCE or --resume PATH"
    ]


# ---- settings


def test_model_flag_is_optional_with_init_from():
    assert parse_config([]) == TrainConfig() and TrainConfig().model == ""
    assert (
        parse_config(["--demo", "--init-from", "gpt2"]).model == ""
    )  # the shape comes from gpt2, not the preset
    assert parse_config(["--demo", "--init-from", "gpt2", "--model", "d4"]).model == "d4"
    assert (
        validate(TrainConfig(init_from="somewhere", seq_len=4096), 1) == []
    )  # its block size is checked on reading
    assert validate(TrainConfig(model="gpt2", init_from="gpt2", seq_len=4096), 1) == [
        "--seq-len 4096 exceeds the model's block size 1024"
    ]
    assert validate(TrainConfig(eval_only=True, export_hf="out"), 1) == [
        "--eval-only and --export-hf exclude each other: choose one"
    ]
    assert validate(TrainConfig(export_hf="out"), 2) == [
        "--export-hf runs in one process: run it with python, not torchrun"
    ]


def test_seq_len_longer_than_the_sources_block_is_a_one_line_error(hf_model, data_dir, tmp_path):
    assert_one_line_error(
        finetune_config(data_dir, str(tmp_path / "log"), hf_model[1], seq_len=128, total_batch_size=256),
        "--seq-len 128 exceeds the block size 64 of --init-from",
    )


# ---- play.ipynb draws an eval-only run as a baseline


def test_notebook_draws_an_eval_only_baseline(eval_only_run, data_dir, tmp_path, monkeypatch, request):
    if run_notebook is None:
        pytest.skip("play.ipynb needs nbformat, nbclient, ipykernel and matplotlib")
    request.getfixturevalue("python3_kernel")
    baseline_cfg, evaluated = eval_only_run
    cfg = tiny_config(data_dir, str(tmp_path / "log"), max_steps=3, checkpoint_every=0)
    train(cfg, DistContext())
    monkeypatch.setenv("BASELINE_DIR", baseline_cfg.log_dir)
    out = run_notebook(cfg.log_dir, monkeypatch)
    summary = text_of(out["summary"])
    assert f"baseline val loss: {evaluated['val_loss']:.4f} ({baseline_cfg.log_dir})" in summary
    hella = logged(baseline_cfg.log_dir, "hella")[0]
    assert f"baseline HellaSwag acc_norm: {hella:.4f} ({baseline_cfg.log_dir})" in summary
    assert len(images(out["loss"])) == 1
    assert len(images(out["hellaswag"])) == 1  # the baseline's HellaSwag line, though this run has none
