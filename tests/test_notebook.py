"""play.ipynb runs headless on a real tiny run's log and on a hand-written log with HellaSwag lines,
and its summary repeats the log's numbers."""

import json
import os
import re
import sys

import numpy as np
import pytest

import train_gpt2

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "play.ipynb")


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """A `python3` kernelspec that runs this interpreter, first on JUPYTER_PATH: whatever other
    `python3` kernel a machine has (or lacks), the notebook runs where train_gpt2's deps are."""
    kernel_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "JUPYTER_PATH",
            os.pathsep.join(filter(None, [str(kernel_dir.parent.parent), os.environ.get("JUPYTER_PATH")])),
        )
        from jupyter_client.kernelspec import KernelSpecManager

        assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
        yield


def run_notebook(log_dir, monkeypatch):
    """Execute play.ipynb on log_dir; returns {cell tag: outputs}."""
    monkeypatch.setenv("LOG_DIR", str(log_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()
    return {
        tag: cell.outputs
        for cell in nb.cells
        if cell.cell_type == "code"
        for tag in cell.metadata.get("tags", [])
    }


def text_of(outputs):
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def images(outputs):
    return [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]


def summary_value(summary, label):
    m = re.search(rf"^{label}: (\S+)", summary, re.MULTILINE)
    assert m, f"no '{label}' in the summary:\n{summary}"
    return m.group(1)


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    tags = {t for c in code for t in c.metadata.get("tags", [])}
    assert {"loss", "hellaswag", "throughput", "lr", "summary"} <= tags


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 6-step d1 run on random tokens; val at steps 0, 3, 6, no HellaSwag."""
    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    data_dir, log_dir = root / "data", root / "log"
    data_dir.mkdir()
    np.save(data_dir / "t_val_000000.npy", rng.integers(0, 50257, 2000, dtype=np.uint16))
    np.save(data_dir / "t_train_000001.npy", rng.integers(0, 50257, 4000, dtype=np.uint16))
    cfg = train_gpt2.TrainConfig(
        model="d1",
        data_dir=str(data_dir),
        log_dir=str(log_dir),
        batch_size=2,
        seq_len=16,
        total_batch_size=64,
        max_steps=6,
        warmup_steps=2,
        lr=1e-3,
        eval_every=3,
        val_steps=2,
        hellaswag=False,
        sample_every=0,
        checkpoint_every=0,
        resume="none",
        device="cpu",
        dtype="fp32",
        compile=False,
    )
    result = train_gpt2.train(cfg, train_gpt2.DistContext())
    return log_dir, result


def test_notebook_on_a_real_run(tiny_run, python3_kernel, monkeypatch):
    log_dir, result = tiny_run
    lines = [line.split() for line in (log_dir / "log.txt").read_text().splitlines()]
    train_values = [v for _, kind, v in lines if kind == "train"]
    val_values = [v for _, kind, v in lines if kind == "val"]
    assert len(train_values) == 6 and len(val_values) == 3

    out = run_notebook(log_dir, monkeypatch)
    summary = text_of(out["summary"])
    min_train = summary_value(summary, "min train loss")
    assert min_train == min(train_values, key=float)
    assert float(min_train) == pytest.approx(min(result["losses"]), abs=1e-6)
    last_val = summary_value(summary, "last val loss")
    assert last_val == val_values[-1]
    assert float(last_val) == pytest.approx(result["val_loss"], abs=1e-4)
    assert summary_value(summary, "last HellaSwag acc_norm") == "none"

    assert len(images(out["loss"])) == 1
    assert not images(out["hellaswag"]) and "plot skipped" in text_of(out["hellaswag"])
    assert len(images(out["throughput"])) == 1  # tokens/s from metrics.jsonl
    assert len(images(out["lr"])) == 1


def test_notebook_with_hellaswag_lines(tmp_path, python3_kernel, monkeypatch):
    """A build-nanogpt-style log: log.txt only, with hella lines, no metrics.jsonl."""
    (tmp_path / "log.txt").write_text(
        "0 val 10.9876\n0 hella 0.2471\n0 train 10.987654\n1 train 9.500000\n2 train 8.250000\n"
        "3 train 8.750000\n4 val 8.1234\n4 hella 0.2612\n"
    )
    out = run_notebook(tmp_path, monkeypatch)
    summary = text_of(out["summary"])
    assert summary_value(summary, "min train loss") == "8.250000"
    assert summary_value(summary, "last val loss") == "8.1234"
    assert summary_value(summary, "last HellaSwag acc_norm") == "0.2612"
    assert len(images(out["loss"])) == 1
    assert len(images(out["hellaswag"])) == 1
    assert not images(out["throughput"]) and "plot skipped" in text_of(out["throughput"])
    assert not images(out["lr"]) and "plot skipped" in text_of(out["lr"])
