"""A new user's first commands: the demo under 2-rank torchrun, --help, the no-data hint, and an
offline hellaswag.py -m gpt2 that fails at once with one line."""

import json
import os
import subprocess
import sys
import time

import torch

import fineweb
import train_gpt2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_under_two_rank_torchrun(tmp_path):
    fineweb.main(
        ["--demo", "--out", str(tmp_path / "data" / "pydoc")]
    )  # as `python fineweb.py --demo` in tmp_path
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO, "train_gpt2.py"),
        "--demo",
        "--max-steps",
        "2",
        "--eval-every",
        "2",
        "--val-steps",
        "2",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout and "grad accum 1" in result.stdout
    log = (tmp_path / "log_demo" / "log.txt").read_text().split("\n")
    assert [line.split()[0] for line in log if " val " in line] == ["0", "2"]
    assert torch.load(tmp_path / "log_demo" / "model_00002.pt", weights_only=True)["step"] == 2
    # one process runs the same 1,024-token steps as two micro-batches
    assert train_gpt2.validate(train_gpt2.parse_config(["--demo"]), world_size=1) == []
    assert train_gpt2.validate(train_gpt2.parse_config(["--demo"]), world_size=2) == []


def test_help_describes_every_flag_and_lists_the_choices():
    text = " ".join(train_gpt2.build_parser().format_help().split())
    for choices in (
        "--dtype {auto,bf16,fp16,fp32}",
        "--loss-impl {full,chunked,fused}",
        "--sdpa-backend {default,cudnn,flash,efficient,math}",
        "--resume {auto,none,PATH}",
        "--lr-schedule {cosine,wsd}",
        "--cooldown-shape {linear,1-sqrt}",
    ):
        assert choices in text, choices
    for field in train_gpt2.fields(train_gpt2.TrainConfig):
        assert field.metadata.get("help"), f"--{field.name} has no description"
    assert "20% of --max-steps" in text


def test_no_data_hint_names_the_demo_command_for_the_demo_dir(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: data directory data/pydoc does not exist: run `python fineweb.py --demo` "
        "to make it, or pass --data-dir"
    )


def test_offline_hellaswag_with_a_hub_model_fails_at_once(tmp_path):
    data = tmp_path / "h.jsonl"
    data.write_text(
        json.dumps({"ind": 0, "ctx": "a cat", "label": 0, "endings": ["runs", "b", "c", "d"]}) + "\n"
    )
    # a hub nobody listens at and an empty cache: no network, as on this project's machines
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.time()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "hellaswag.py"), "-m", "gpt2", "--data", str(data)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.time() - t0
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the HuggingFace hub at 127.0.0.1"), (
        lines
    )
    assert "Retrying" not in result.stderr + result.stdout
    assert seconds < 60, seconds  # the hub client's own retries took over 30 s beyond the imports
