"""The training loop: DDP gradient accumulation, exact resume, stop on signals and on NaN, settings.

Models are d1 (one layer, 64 wide) on random tokens; distributed runs use 2 gloo processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import train_gpt2
from gpt2lib import flops
from gpt2lib.distributed import close_process_group, end_process
from train_gpt2 import (
    GPT,
    DataLoaderLite,
    DistContext,
    TrainConfig,
    UserError,
    config_for,
    configure_optimizer,
    parse_config,
    train,
    validate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(root, n_train=6000, n_val=1000, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    np.save(os.path.join(root, "t_val_000000.npy"), rng.integers(0, 50257, n_val, dtype=np.uint16))
    # skewed token frequencies so that the loss has something to learn
    train = (rng.zipf(1.3, n_train) % 50257).astype(np.uint16)
    np.save(os.path.join(root, "t_train_000001.npy"), train[: n_train // 2])
    np.save(os.path.join(root, "t_train_000002.npy"), train[n_train // 2 :])
    return str(root)


def tiny_config(data_dir, log_dir, **overrides):
    base = dict(
        model="d1",
        data_dir=data_dir,
        log_dir=log_dir,
        batch_size=2,
        seq_len=16,
        total_batch_size=128,
        max_steps=6,
        warmup_steps=2,
        lr=1e-3,
        eval_every=3,
        val_steps=2,
        hellaswag=False,
        sample_every=0,
        checkpoint_every=3,
        keep_last=0,
        resume="none",
        device="cpu",
        dtype="fp32",
        compile=False,
    )
    return TrainConfig(**{**base, **overrides})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    return DistContext(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))


def end_worker():
    """End a test worker as main() ends a process that had a process group (see
    distributed.end_process: a normal exit can abort). Callers store their results first."""
    close_process_group()
    end_process(0)


def final_weights(log_dir, step):
    return torch.load(os.path.join(log_dir, f"model_{step:05d}.pt"), weights_only=True)["model"]


# ---- gradient synchronisation: the flag must be set before the forward pass


def late_flag_step(run, step, stop=None):
    """The anchors' old bug: the sync flag is set after forward, just before backward."""
    run.optimizer.zero_grad(set_to_none=True)
    for micro_step in range(run.grad_accum_steps):
        x, y = run.train_loader.next_batch()
        _, loss = run.model(x, y, loss_impl="chunked")
        run.model.require_backward_grad_sync = micro_step == run.grad_accum_steps - 1
        (loss / run.grad_accum_steps).backward()
    run.optimizer.step()


def count_allreduces_worker(rank, world_size, port, data_dir, step_fn_name, results):
    """Per accumulation setting: how many bucket all-reduces ran, during which micro-step's backward
    (as a batch index), and whether both ranks ended with the same weights."""
    ctx = init_gloo(rank, world_size, port)
    step_fn = {"ours": train_gpt2.train_step, "late": late_flag_step}[step_fn_name]
    report = {}
    for accum in (1, 4):
        torch.manual_seed(0)
        model = DDP(GPT(config_for("d1", vocab_multiple=64)))
        loader = DataLoaderLite(2, 16, rank, world_size, "train", data_dir)
        batches_read, synced_during = [0], []
        next_batch = loader.next_batch

        def counting_next_batch():
            batches_read[0] += 1
            return next_batch()

        def counting_hook(state, bucket):
            synced_during.append((batches_read[0] - 1) % accum)  # the micro-step whose backward is running
            return allreduce_hook(state, bucket)

        loader.next_batch = counting_next_batch
        model.register_comm_hook(None, counting_hook)
        # the parts of a train_gpt2.Run that a step uses
        run = SimpleNamespace(
            model=model,
            optimizer=configure_optimizer(model.module, 0.1, 1e-3, "cpu"),
            precision=train_gpt2.Precision("fp32", torch.device("cpu")),
            train_loader=loader,
            grad_accum_steps=accum,
            dist_ctx=ctx,
            log=SimpleNamespace(failure=None),
            cfg=TrainConfig(lr=1e-3, warmup_steps=0, max_steps=3, loss_impl="chunked"),
        )
        for step in range(3):
            step_fn(run, step)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(weights) for _ in range(world_size)]
        dist.all_gather(gathered, weights)
        report[accum] = {
            "calls": len(synced_during),
            "micro_steps": sorted(set(synced_during)),
            "ranks_agree": all(torch.equal(gathered[0], g) for g in gathered),
        }
    if rank == 0:
        results.put(report)
    end_worker()


def run_counting(tmp_path, step_fn_name):
    data_dir = make_data(tmp_path / "data")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(count_allreduces_worker, args=(2, free_port(), data_dir, step_fn_name, results), nprocs=2)
    return results.get()


def test_gradients_are_all_reduced_once_per_optimizer_step(tmp_path):
    ours = run_counting(tmp_path, "ours")
    assert ours[1]["calls"] > 0
    assert ours[4]["calls"] == ours[1]["calls"], f"accumulating 4 micro-steps must sync as often as 1: {ours}"
    assert ours[4]["micro_steps"] == [3], "only the last micro-step's backward may all-reduce"
    assert ours[1]["ranks_agree"] and ours[4]["ranks_agree"]
    # the same checks catch the late flag: the sync happens in the first micro-step, the
    # other three micro-steps' gradients never leave their rank, and the ranks drift apart
    late = run_counting(tmp_path, "late")
    assert late[4]["micro_steps"] != [3] and not late[4]["ranks_agree"], late


# ---- world 2 x accum 2 equals world 1 x accum 4; resume is exact


def train_worker(rank, world_size, port, cfg, stop_after):
    ctx = init_gloo(rank, world_size, port)
    if stop_after:
        install_stop_after(stop_after)
    train(cfg, ctx)
    end_worker()


def spawn_train(cfg, stop_after=0):
    mp.spawn(train_worker, args=(2, free_port(), cfg, stop_after), nprocs=2)


def install_stop_after(n):
    """Make the n-th train_step report a stop request, as a SIGTERM on some rank would."""
    original = train_gpt2.train_step
    calls = [0]

    def stopping_step(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        return replace(result, stop=calls[0] >= n)

    train_gpt2.train_step = stopping_step
    return original


def logged(log_dir, kind="train"):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["value"] for r in rows if r["kind"] == kind}


def write_hellaswag(path, n=10, seed=0):
    rng = np.random.default_rng(seed)
    words = "the a cat dog runs jumps over under quickly slowly and then".split()

    def sentence(k):
        return " ".join(rng.choice(words, k))

    with open(path, "w") as f:
        for i in range(n):
            row = {
                "ind": i,
                "ctx": sentence(int(rng.integers(3, 12))),
                "label": int(rng.integers(0, 4)),
                "endings": [sentence(int(rng.integers(1, 8))) for _ in range(4)],
            }
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_two_ranks_match_one_rank_with_more_accumulation(tmp_path):
    data_dir = make_data(tmp_path / "data")
    hella = write_hellaswag(tmp_path / "hellaswag.jsonl", n=11)  # 11 examples: ranks get 6 and 5
    single = tiny_config(
        data_dir,
        str(tmp_path / "single"),
        max_steps=4,
        checkpoint_every=4,
        val_steps=4,
        hellaswag=True,
        hellaswag_data=hella,
    )
    train(single, DistContext())
    # same total batch: accum 4 -> 2; 2 ranks x 2 val batches read the windows of 1 rank x 4
    double = replace(single, log_dir=str(tmp_path / "double"), val_steps=single.val_steps // 2)
    spawn_train(double)
    a, b = final_weights(single.log_dir, 4), final_weights(double.log_dir, 4)
    initial = GPT(config_for("d1", vocab_multiple=64)).state_dict()
    assert not torch.equal(
        a["transformer.h.0.attn.c_attn.weight"], initial["transformer.h.0.attn.c_attn.weight"]
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    la, lb = logged(single.log_dir), logged(double.log_dir)
    assert la.keys() == lb.keys() == {0, 1, 2, 3}
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-5
    # the val loss is the mean over both ranks' batches, not rank 0's alone
    va, vb = logged(single.log_dir, "val"), logged(double.log_dir, "val")
    assert va.keys() == vb.keys() == {0, 3, 4}
    for step in va:
        assert abs(va[step] - vb[step]) < 1e-5
    # HellaSwag split across the two ranks, counts all-reduced: the same as one process scoring all
    ha, hb = logged(single.log_dir, "hella"), logged(double.log_dir, "hella")
    assert ha.keys() == {0, 3, 4} and ha == hb
    with open(os.path.join(double.log_dir, "metrics.jsonl")) as f:
        assert all(json.loads(line).get("n", 11) == 11 for line in f)


def test_resume_is_bitwise_identical_single_process(tmp_path, monkeypatch):
    data_dir = make_data(tmp_path / "data")
    full = tiny_config(data_dir, str(tmp_path / "full"), checkpoint_every=6)
    reference = train(full, DistContext())["losses"]
    assert len(reference) == 6 and reference[-1] < reference[0]

    cut = replace(full, log_dir=str(tmp_path / "cut"), resume="auto")
    original = install_stop_after(3)
    try:
        first = train(cut, DistContext())["losses"]
    finally:
        train_gpt2.train_step = original
    assert first == reference[:3]
    assert os.listdir(cut.log_dir).count("model_00003.pt") == 1
    second = train(cut, DistContext())["losses"]  # --resume auto picks model_00003.pt
    assert second == reference[3:], "losses after resume must equal the uninterrupted run bitwise"
    a, b = final_weights(full.log_dir, 6), final_weights(cut.log_dir, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's logs read like one uninterrupted run
    assert logged(cut.log_dir) == logged(full.log_dir)
    assert logged(cut.log_dir, "val") == logged(full.log_dir, "val")


def test_resume_is_bitwise_identical_with_two_ranks(tmp_path):
    data_dir = make_data(tmp_path / "data")
    full = tiny_config(data_dir, str(tmp_path / "full"), max_steps=4, checkpoint_every=4, eval_every=0)
    spawn_train(full)
    cut = replace(full, log_dir=str(tmp_path / "cut"), resume="auto")
    spawn_train(cut, stop_after=2)
    assert sorted(os.listdir(cut.log_dir)) == [".lock", "log.txt", "metrics.jsonl", "model_00002.pt"]
    state = torch.load(os.path.join(cut.log_dir, "model_00002.pt"), weights_only=True)
    assert len(state["loader"]) == 2 and len(state["rng"]) == 2
    spawn_train(cut)
    assert logged(cut.log_dir) == logged(full.log_dir)
    a, b = final_weights(full.log_dir, 4), final_weights(cut.log_dir, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- checkpoints


def test_checkpoint_format_and_keep_last(tmp_path):
    cfg = tiny_config(
        make_data(tmp_path / "data"), str(tmp_path / "log"), max_steps=6, checkpoint_every=2, keep_last=2
    )
    train(cfg, DistContext())
    assert sorted(n for n in os.listdir(cfg.log_dir) if n.endswith(".pt")) == [
        "model_00004.pt",
        "model_00006.pt",
    ]
    ckpt = torch.load(os.path.join(cfg.log_dir, "model_00006.pt"), weights_only=True)  # never runs code
    assert {"model", "optimizer", "step", "config", "val_loss", "loader", "rng"} <= ckpt.keys()
    assert ckpt["step"] == 6 and isinstance(ckpt["val_loss"], float)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model = GPT(train_gpt2.GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    with open(os.path.join(cfg.log_dir, "log.txt")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("0 val ") and "5 train " in lines[-2] and lines[-1].startswith("6 val ")


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(data_dir, str(tmp_path / "log"), max_steps=4, checkpoint_every=2, eval_every=0)
    train(cfg, DistContext())
    newest = os.path.join(cfg.log_dir, "model_00004.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    damaged = str(tmp_path / "damaged.pt")
    shutil.copy(newest, damaged)
    result = train(replace(cfg, resume="auto", max_steps=5), DistContext())
    out = capsys.readouterr().out
    assert "warning: skipping" in out and "model_00004.pt" in out
    assert "resuming at step 2" in out
    assert len(result["losses"]) == 3  # steps 2, 3, 4
    with pytest.raises(UserError, match="damaged.pt is damaged"):  # an explicit bad path is an error
        train(replace(cfg, resume=damaged), DistContext())


def test_resume_with_another_model_is_refused(tmp_path):
    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(data_dir, str(tmp_path / "log"), max_steps=2, checkpoint_every=2, eval_every=0)
    train(cfg, DistContext())
    with pytest.raises(UserError, match="differs from --model"):
        train(replace(cfg, model="d2", resume="auto", max_steps=3), DistContext())


def test_non_finite_loss_stops_before_the_step_and_writes_no_checkpoint(tmp_path):
    cfg = tiny_config(
        make_data(tmp_path / "data"),
        str(tmp_path / "log"),
        lr=1e30,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=1,
    )
    with pytest.raises(train_gpt2.NonFiniteLoss, match="non-finite"):
        train(cfg, DistContext())
    # steps that stayed finite may have been checkpointed, but none holds a non-finite weight
    for name in os.listdir(cfg.log_dir):
        if name.endswith(".pt"):
            weights = torch.load(os.path.join(cfg.log_dir, name), weights_only=True)["model"]
            assert all(torch.isfinite(t).all() for t in weights.values()), name


# ---- the command line


def run_cli(args, cwd, **kwargs):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train_gpt2.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


STOP_LIMIT_S = 30  # torchrun and SLURM send SIGKILL about 30 s after SIGTERM


def signal_between_logged_steps(pids, target, sig, metrics_path):
    """Freeze the processes, count the steps logged so far (n: steps 0..n-1 are done, step n is in
    flight), send `sig` to `target` and let them go on. Returns (n, time of the signal)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    with open(metrics_path) as f:
        done = sum('"kind": "train"' in line for line in f)
    os.kill(target, sig)
    signalled = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    return done, signalled


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_next_step_boundary_with_a_checkpoint(tmp_path, sig):
    """SIGTERM, or Ctrl-C (SIGINT), to `python train_gpt2.py`: the step in flight finishes, its
    checkpoint is written at the very next step boundary, and the process exits 0 within the limit."""
    data_dir = make_data(tmp_path / "data", n_train=200000)
    args = [
        "--model",
        "d1",
        "--data-dir",
        data_dir,
        "-B",
        "2",
        "-T",
        "16",
        "--total-batch-size",
        "128",
        "--max-steps",
        "100000",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "0",
        "--no-hellaswag",
        "--log-dir",
        "log",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train_gpt2.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "log" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("train") >= 3):
        time.sleep(0.05)
    done, signalled = signal_between_logged_steps(
        [proc.pid], proc.pid, sig, tmp_path / "log" / "metrics.jsonl"
    )
    out, err = proc.communicate(timeout=120)
    seconds = time.time() - signalled
    assert proc.returncode == 0, err
    checkpoints = [n for n in os.listdir(tmp_path / "log") if n.endswith(".pt")]
    assert len(checkpoints) == 1 and f"stopped by signal after step {done}" in out
    step = torch.load(tmp_path / "log" / checkpoints[0], weights_only=True)["step"]
    assert step == done + 1, (
        f"signal during step {done}: the checkpoint must be at step {done + 1}, not {step}"
    )
    assert log.read_text().count("train") == step
    assert seconds < STOP_LIMIT_S


def test_bad_settings_are_all_reported_at_once(tmp_path):
    result = run_cli(
        ["--model", "gpt5", "-B", "0", "--total-batch-size", "1000", "--dtype", "fp8", "--lr", "-1"],
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    for needle in (
        "unknown model 'gpt5'",
        "--batch-size must be positive",
        "--dtype must be",
        "--lr must be positive",
    ):
        assert any(needle in line for line in lines), (needle, lines)
    assert all(line.startswith("error: ") for line in lines)


def test_indivisible_batch_and_missing_data_are_one_line_errors(tmp_path):
    problems = validate(TrainConfig(batch_size=3), world_size=1)
    assert problems == ["--total-batch-size 524288 is not divisible by B*T*processes = 3*1024*1 = 3072"]
    assert validate(TrainConfig(), world_size=8) == []
    assert validate(TrainConfig(seq_len=2048), 1) == ["--seq-len 2048 exceeds the model's block size 1024"]
    result = run_cli(["--demo", "--data-dir", "missing"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: data directory missing does not exist: run `python fineweb.py` to make it, or pass --data-dir"
    )


def test_flags_map_to_config_and_demo_preset_yields_to_explicit_flags():
    cfg = parse_config(
        ["-B", "8", "-T", "256", "--no-compile", "--lr", "1e-3", "--hellaswag-data", "h.jsonl"]
    )
    assert (cfg.batch_size, cfg.seq_len, cfg.compile, cfg.lr, cfg.hellaswag_data) == (
        8,
        256,
        False,
        1e-3,
        "h.jsonl",
    )
    assert parse_config([]) == TrainConfig()
    demo = parse_config(["--demo", "--max-steps", "7"])
    assert demo.model == train_gpt2.DEMO["model"] and demo.max_steps == 7


def test_lr_schedule():
    cfg = TrainConfig(lr=6e-4, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train_gpt2.get_lr(0, cfg) == pytest.approx(6e-5)
    assert train_gpt2.get_lr(9, cfg) == pytest.approx(6e-4)
    assert train_gpt2.get_lr(60, cfg) == pytest.approx(0.5 * (6e-4 + 6e-5))
    assert train_gpt2.get_lr(110, cfg) == pytest.approx(6e-5)
    assert train_gpt2.get_lr(500, cfg) == pytest.approx(6e-5)


def test_optimizer_decays_only_matrices():
    model = GPT(config_for("d1"))
    groups = configure_optimizer(model, 0.1, 1e-3, "cpu").param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert (
        id(model.transformer.wte.weight) in decayed and id(model.transformer.h[0].ln_1.weight) not in decayed
    )
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_parameters()


def test_flops_per_token_matches_the_124m_figure():
    # about 855 MFLOP per token for 124M with the padded vocabulary (6N + 12*L*H*Q*T)
    per_token = flops.flops_per_token(config_for("gpt2", vocab_multiple=64), 1024)
    n = sum(p.numel() for p in GPT(config_for("d1", vocab_multiple=64)).parameters()) - 1024 * 64
    assert per_token == pytest.approx(855e6, rel=0.01)
    assert flops.flops_per_token(config_for("d1", vocab_multiple=64), 1024) == 6 * n + 12 * 1 * 64 * 1024


def slowed(monkeypatch, name, seconds, calls=None):
    """Make train_gpt2.<name> sleep `seconds` first (on its first `calls` calls; None: always)."""
    original, count = getattr(train_gpt2, name), [0]

    def slow(*args, **kwargs):
        count[0] += 1
        if calls is None or count[0] <= calls:
            time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_gpt2, name, slow)


def test_benchmark_median_excludes_the_warmup_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    warmup = train_gpt2.BENCHMARK_WARMUP_STEPS
    slowed(monkeypatch, "train_step", 1.0, calls=warmup)  # warm-up steps that are slow, as compiling ones are
    cfg = tiny_config("unused", "unused", benchmark=3, max_steps=1000)
    result = train_gpt2.benchmark(cfg, DistContext())
    out = capsys.readouterr().out
    step_ms = [
        float(line.split("dt ")[1].split("ms")[0]) for line in out.splitlines() if line.startswith("step ")
    ]
    assert len(step_ms) == warmup + 3 and all(ms >= 1000 for ms in step_ms[:warmup])
    assert "benchmark d1 | B 2 T 16 x 1 process(es) | 3 steps | median" in out
    assert result["dt_ms"] == pytest.approx(float(np.median(step_ms[warmup:])), abs=0.01)
    assert result["tokens_per_sec"] == pytest.approx(128 / result["dt_ms"] * 1000, rel=1e-6)
    assert os.listdir(tmp_path) == []  # no data, logs or checkpoints left behind


def test_tokens_per_second_counts_the_training_step_alone(tmp_path, monkeypatch):
    """With evals, samples and checkpoints made slow (0.3 s each), a step's logged time is still the
    time of train_step alone (measured around it here), and tokens/s follows from it."""
    for name in ("run_evals", "print_samples", "save"):
        slowed(monkeypatch, name, 0.3)
    original, step_ms = train_gpt2.train_step, []

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        step_ms.append((time.perf_counter() - started) * 1000)
        return result

    monkeypatch.setattr(train_gpt2, "train_step", timed_step)
    cfg = tiny_config(
        make_data(tmp_path / "data"),
        str(tmp_path / "log"),
        max_steps=3,
        eval_every=1,
        sample_every=1,
        checkpoint_every=1,
    )
    metrics = train(cfg, DistContext())["metrics"]
    assert len(metrics) == len(step_ms) == 3
    for m, ms in zip(metrics, step_ms):
        assert ms <= m["dt_ms"] < ms + 150, (m["dt_ms"], ms)  # 150 ms: half of what a slowed part adds
        assert m["tokens_per_sec"] == pytest.approx(128 / m["dt_ms"] * 1000, rel=1e-6)


def test_cli_runs_hellaswag_or_warns_when_its_data_is_missing(tmp_path):
    data_dir = make_data(tmp_path / "data")
    args = [
        "--model",
        "d1",
        "--data-dir",
        data_dir,
        "-B",
        "2",
        "-T",
        "16",
        "--total-batch-size",
        "32",
        "--max-steps",
        "1",
        "--val-steps",
        "1",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        "--log-dir",
        "log",
    ]
    ok = run_cli(args + ["--hellaswag-data", write_hellaswag(tmp_path / "h.jsonl")], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "HellaSwag acc_norm" in ok.stdout and " hella " in (tmp_path / "log" / "log.txt").read_text()
    # run as a script, a UserError raised inside hellaswag.py is still this module's UserError
    missing = run_cli(args + ["--hellaswag-data", "nope.jsonl", "--resume", "none"], cwd=tmp_path)
    assert missing.returncode == 0, missing.stderr
    assert "warning: HellaSwag eval is off" in missing.stdout and "nope.jsonl" in missing.stdout


def test_chunked_loss_run_tracks_the_full_logits_run(tmp_path):
    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(data_dir, str(tmp_path / "a"), max_steps=8, checkpoint_every=0, eval_every=4)
    chunked = train(cfg, DistContext())
    full = train(replace(cfg, log_dir=str(tmp_path / "b"), loss_impl="full"), DistContext())
    assert chunked["losses"][-1] < chunked["losses"][0] - 0.1
    np.testing.assert_allclose(chunked["losses"], full["losses"], rtol=0, atol=1e-5)
    assert chunked["val_loss"] == pytest.approx(full["val_loss"], abs=1e-5)


def test_compiled_run_matches_eager_and_evals_never_recompile(tmp_path):
    """torch.compile (inductor on the CPU here) trains the same losses as eager; HellaSwag and
    sampling run on the uncompiled module, so they add no compiled graphs whatever their shapes."""
    from torch._dynamo.utils import counters

    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(data_dir, str(tmp_path / "eager"), max_steps=3, checkpoint_every=0, eval_every=3)
    eager = train(cfg, DistContext())
    graphs = {}
    for name, extras in (
        ("plain", {}),
        ("evals", dict(hellaswag=True, sample_every=1, hellaswag_data=write_hellaswag(tmp_path / "h.jsonl"))),
    ):
        torch._dynamo.reset()  # forget graphs compiled by the previous run
        counters.clear()
        compiled = train(replace(cfg, log_dir=str(tmp_path / name), compile=True, **extras), DistContext())
        graphs[name] = counters["stats"]["unique_graphs"]
        np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=0, atol=1e-5)
        assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-5)
    assert logged(str(tmp_path / "evals"), "hella").keys() == {0, 3}
    assert graphs["plain"] > 0 and graphs["evals"] == graphs["plain"], graphs
