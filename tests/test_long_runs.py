"""Long runs: one run per log dir, torn log lines, decisions taken once for all ranks (two nodes
without a shared filesystem), quick stops, torchrun restarts, a resume on another world size, MFU
lookup, weight init, and torch.compile with bf16 autocast and with DDP.

Multi-process runs go through torchrun (`python -m torch.distributed.run`) with gloo on 127.0.0.1;
models are d1 on random tokens."""

import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from test_train import (
    REPO,
    STOP_LIMIT_S,
    final_weights,
    free_port,
    install_stop_after,
    logged,
    make_data,
    signal_between_logged_steps,
    spawn_train,
    tiny_config,
    write_hellaswag,
)

import train_gpt2
from gpt2lib import flops
from train_gpt2 import GPT, DistContext, config_for, train

TRAIN = os.path.join(REPO, "train_gpt2.py")
TINY_ARGS = [
    "--model",
    "d1",
    "--data-dir",
    "data",
    "-B",
    "2",
    "-T",
    "16",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--no-compile",
    "--log-dir",
    "log",
    "--warmup-steps",
    "2",
    "--lr",
    "1e-3",
    "--val-steps",
    "2",
]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_digests(directory):
    return {
        name: digest(os.path.join(directory, name))
        for name in sorted(os.listdir(directory))
        if os.path.isfile(os.path.join(directory, name)) and name != ".lock"
    }


def checkpoints(log_dir):
    return sorted(n for n in os.listdir(log_dir) if n.endswith(".pt"))


def train_until_stop(cfg, steps):
    """One process trains cfg as if a signal arrived during step `steps - 1`: checkpoint, then exit."""
    original = install_stop_after(steps)
    try:
        return train(cfg, DistContext())
    finally:
        train_gpt2.train_step = original


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- one run per log dir


def test_fresh_start_sets_an_older_run_aside_and_keeps_only_its_own_checkpoints(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    old = tiny_config(data_dir, str(tmp_path / "log"), max_steps=6, checkpoint_every=2, keep_last=2)
    train(old, DistContext())
    before = tree_digests(old.log_dir)
    assert checkpoints(old.log_dir) == ["model_00004.pt", "model_00006.pt"]

    new = replace(old, max_steps=2, lr=2e-3)  # --resume none into the same directory
    train(new, DistContext())
    out = capsys.readouterr().out
    aside = os.path.join(old.log_dir, "previous_1")
    assert "saved " + os.path.join(old.log_dir, "model_00002.pt") in out and f"moved them to {aside}" in out
    assert checkpoints(old.log_dir) == ["model_00002.pt"], "a saved checkpoint was pruned by the older run's"
    assert tree_digests(aside) == before, "the older run must be kept byte for byte"
    assert max(logged(old.log_dir)) == 1 and max(logged(aside)) == 5

    result = train(replace(new, resume="auto", max_steps=3), DistContext())  # continues the new run
    assert "resuming at step 2" in capsys.readouterr().out and len(result["losses"]) == 1


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(data_dir, str(tmp_path / "log"), max_steps=6, checkpoint_every=2, keep_last=1)
    train(replace(cfg, keep_last=0), DistContext())
    later = {name: digest(os.path.join(cfg.log_dir, name)) for name in ("model_00004.pt", "model_00006.pt")}
    full_log = digest(os.path.join(cfg.log_dir, "log.txt"))

    train(replace(cfg, resume=os.path.join(cfg.log_dir, "model_00002.pt"), lr=2e-3), DistContext())
    aside = os.path.join(cfg.log_dir, "previous_1")
    assert {n: digest(os.path.join(aside, n)) for n in later} == later
    assert digest(os.path.join(aside, "log.txt")) == full_log  # the set-aside branch keeps its whole log
    # keep_last=1 prunes this run's model_00002/4, never the just-saved model_00006
    assert checkpoints(cfg.log_dir) == ["model_00006.pt"]
    assert "resuming at step 2" in capsys.readouterr().out


def test_torn_log_lines_are_dropped_on_resume(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    full = tiny_config(data_dir, str(tmp_path / "full"), max_steps=6, checkpoint_every=6)
    train(full, DistContext())
    cut = replace(full, log_dir=str(tmp_path / "cut"), resume="auto")
    train_until_stop(cut, 4)
    # a SIGKILL in mid-append leaves half a line at the end of each log
    with open(os.path.join(cut.log_dir, "log.txt"), "a") as f:
        f.write("4 train 9.87")
    with open(os.path.join(cut.log_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "kind": "tr')
    capsys.readouterr()
    train(cut, DistContext())
    out = capsys.readouterr().out
    assert "dropped 1 malformed line(s)" in out and "resuming at step 4" in out
    for name in ("log.txt", "metrics.jsonl"):
        with open(os.path.join(cut.log_dir, name)) as f, open(os.path.join(full.log_dir, name)) as g:
            # every line but the timings equals the uninterrupted run's
            def strip(text):
                return re.sub(r'"(dt_ms|tokens_per_sec)": [0-9.e+-]+', "", text)

            assert strip(f.read()) == strip(g.read()), name


# ---- processes started by torchrun


def torchrun(args, cwd, nnodes=1, node_rank=0, nproc=1, port=None, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, *extra, TRAIN, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs, timeout=300):
    """[(returncode, stdout, stderr)] of each process once it ends. Each is printed too: pytest shows
    them whole when the test fails, where an assertion's message would be cut short."""
    results = []
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=timeout)
        print(f"---- process {n}: exit code {proc.returncode}\n{out}\n---- its stderr\n{err}")
        results.append((proc.returncode, out, err))
    return results


def two_nodes(tmp_path, args):
    """Two single-process 'nodes' of one run, each in its own working directory (no shared files)."""
    port = free_port()
    return finish([torchrun(args, tmp_path / f"node{n}", nnodes=2, node_rank=n, port=port) for n in (0, 1)])


# a process that had a DDP model's process group, ending as train_gpt2.main() ends it
ENDS = """
import atexit, sys, torch
from gpt2lib.distributed import close_process_group, end_process
torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.randn(2, 4)).sum().backward()
atexit.register(lambda: open(sys.argv[1], "w").close())
print("last line", end="")
print("last error line", end="", file=sys.stderr)
close_process_group()
end_process(3)
"""


def test_a_process_that_had_a_process_group_ends_without_teardown_with_its_output_and_exit_code(tmp_path):
    """The interpreter's teardown, where the group's surviving threads can abort the process, is
    skipped (an atexit handler never runs); what the process printed and its exit code still come out."""
    marker = tmp_path / "teardown_ran"

    def run(script):
        return subprocess.run(
            [sys.executable, "-c", script, str(marker)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            timeout=120,
        )

    proc = run(ENDS)
    assert (proc.returncode, proc.stdout) == (3, "last line"), proc
    assert proc.stderr.endswith("last error line"), proc.stderr
    assert not marker.exists()
    # the same process without end_process runs the teardown: the marker does tell
    assert run(ENDS.replace("end_process(3)", "")).returncode == 0
    assert marker.exists()


def test_two_nodes_without_a_shared_filesystem_resume_and_evaluate_together(tmp_path):
    for node in (0, 1):
        make_data(tmp_path / f"node{node}" / "data")
    write_hellaswag(tmp_path / "node0" / "hellaswag.jsonl", n=9)  # on node 0 only
    args = TINY_ARGS + [
        "--total-batch-size",
        "64",
        "--max-steps",
        "6",
        "--checkpoint-every",
        "2",
        "--keep-last",
        "0",
        "--eval-every",
        "2",
        "--sample-every",
        "0",
        "--hellaswag-data",
        "hellaswag.jsonl",
    ]
    first = two_nodes(tmp_path, args)
    assert [rc for rc, _, _ in first] == [0, 0], first
    log0 = tmp_path / "node0" / "log"
    assert logged(log0, "hella").keys() == {0, 2, 4, 6}
    assert not (tmp_path / "node1" / "log").exists() or not checkpoints(tmp_path / "node1" / "log")
    uninterrupted = final_weights(log0, 6)
    (log0 / "model_00006.pt").unlink()  # as if the run had died before its last checkpoint

    second = two_nodes(tmp_path, args)
    assert [rc for rc, _, _ in second] == [0, 0], second
    assert "resuming at step 4" in second[0][1]
    assert same_weights(final_weights(log0, 6), uninterrupted), "node 1 must have resumed from rank 0's state"


def test_nodes_with_different_data_stop_together_with_one_line(tmp_path):
    make_data(tmp_path / "node0" / "data")
    make_data(tmp_path / "node1" / "data", n_train=8000)
    results = two_nodes(
        tmp_path, TINY_ARGS + ["--total-batch-size", "64", "--max-steps", "2", "--eval-every", "0"]
    )
    assert all(rc != 0 for rc, _, _ in results), results
    # torchrun adds its own failure report after the worker's line; the worker prints one line, on rank 0
    assert results[0][2].splitlines()[0] == (
        "error: rank 1: the shards in data differ from rank 0's "
        "(names or lengths): give every node the same data"
    )
    assert "exitcode  : 2" in results[0][2] and "exitcode  : 2" in results[1][2]
    assert "error:" not in results[1][2] and 'train_gpt2.py", line' not in results[0][2] + results[1][2]


def worker_pid(torchrun_pid, rank, timeout=60):
    """The pid of torchrun's worker process with the given RANK."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if parent == torchrun_pid and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under {torchrun_pid}")


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.05)
    assert predicate(), "timed out"


@pytest.mark.parametrize(
    "sig, rank", [(signal.SIGTERM, 1), (signal.SIGINT, 0)], ids=["SIGTERM-rank1", "SIGINT-rank0"]
)
def test_a_signal_to_one_rank_stops_all_at_once_without_evals(tmp_path, sig, rank):
    """The signalled rank reads its stop request after the micro-steps of the step in flight, and the
    step's all-reduce carries it to the others: the checkpoint is at the next step boundary, or at the
    one after when the signal came while that rank already waited in the step's all-reduce. With evals
    at every step, the signal may also come during the evals at the top of the step in flight: they
    end at the next batch, and the checkpoint is at that step."""
    make_data(tmp_path / "data", n_train=200000)
    write_hellaswag(tmp_path / "h.jsonl")
    args = TINY_ARGS + [
        "--total-batch-size",
        "256",
        "--max-steps",
        "100000",
        "--eval-every",
        "1",
        "--sample-every",
        "1",
        "--checkpoint-every",
        "0",
        "--hellaswag-data",
        "h.jsonl",
    ]
    proc = torchrun(args, tmp_path, nproc=2)
    log = tmp_path / "log" / "log.txt"
    wait_for(lambda: log.exists() and log.read_text().count(" train ") >= 3)
    workers = [worker_pid(proc.pid, rank=r) for r in (1, 0)]
    done, signalled = signal_between_logged_steps(
        workers, worker_pid(proc.pid, rank=rank), sig, tmp_path / "log" / "metrics.jsonl"
    )
    out, err = proc.communicate(timeout=120)
    stop_seconds = time.time() - signalled
    assert proc.returncode == 0, err
    [name] = checkpoints(tmp_path / "log")
    step = int(name[6:11])
    assert done <= step <= done + 2, f"signal during step {done}, checkpoint at step {step}"
    text = log.read_text()
    assert f"stopped by signal after step {step - 1}" in out and text.count(" train ") == step
    if step > done:  # the stop was known at the top of the step: no evals there
        assert not re.search(rf"^{step} (val|hella) ", text, re.M), "the stop step must not run evals"
    else:  # the signal came during that step's evals: the one it ended (HellaSwag runs last) is not logged
        assert not re.search(rf"^{step} hella ", text, re.M), "an eval a stop ended must not be logged"
    assert out.count("sample:") == 4 * (step - 1), "nor samples"
    assert stop_seconds < STOP_LIMIT_S
    print(f"signal to exit: {stop_seconds:.2f} s")


def test_torchrun_restart_after_sigkill_ends_like_an_uninterrupted_run(tmp_path):
    make_data(tmp_path / "data", n_train=200000)
    args = TINY_ARGS + [
        "--total-batch-size",
        "256",
        "--max-steps",
        "30",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "5",
        "--keep-last",
        "2",
    ]
    reference = torchrun(args + ["--log-dir", "reference"], tmp_path, nproc=2)
    reference.communicate(timeout=300)
    assert reference.returncode == 0

    proc = torchrun(args, tmp_path, nproc=2, extra=["--max-restarts=1"])
    wait_for(lambda: (tmp_path / "log" / "model_00010.pt").exists())
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert re.search(r"resuming at step (10|15|20|25)\b", out), out[-2000:]
    assert same_weights(final_weights(tmp_path / "log", 30), final_weights(tmp_path / "reference", 30))
    assert logged(tmp_path / "log") == logged(tmp_path / "reference")


def test_resume_on_half_the_ranks_with_twice_the_accumulation(tmp_path):
    data_dir = make_data(tmp_path / "data")
    full = tiny_config(data_dir, str(tmp_path / "full"), max_steps=4, checkpoint_every=4, eval_every=0)
    spawn_train(full)  # 2 ranks, accumulation 2
    cut = replace(full, log_dir=str(tmp_path / "cut"), resume="auto")
    spawn_train(cut, stop_after=2)
    result = train(cut, DistContext())  # 1 rank, accumulation 4, from step 2
    assert len(result["losses"]) == 2
    a, b = final_weights(full.log_dir, 4), final_weights(cut.log_dir, 4)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


# ---- MFU


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla T4", 65e12),
        ("NVIDIA A10G", None),
        ("NVIDIA B200", None),
    ],
)
def test_gpu_peak_is_looked_up_by_exact_model(name, peak):
    assert flops.peak_flops(name) == peak


def test_unknown_gpu_is_named_once_and_gets_no_mfu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    assert flops.gpu_peak_flops(torch.device("cuda"), master_process=True) is None
    assert capsys.readouterr().out == "note: no peak FLOP/s known for 'NVIDIA Future GPU': MFU is not shown\n"
    assert flops.gpu_peak_flops(torch.device("cpu"), master_process=True) is None


# ---- init, and torch.compile with bf16 autocast and with DDP


def test_init_std_and_scaled_residual_projections():
    torch.manual_seed(0)
    model = GPT(config_for("d8"))  # 8 layers: residual projections get 0.02 / sqrt(16) = 0.005
    params = dict(model.named_parameters())
    for name, std in (
        ("transformer.wte.weight", 0.02),
        ("transformer.wpe.weight", 0.02),
        ("transformer.h.3.attn.c_attn.weight", 0.02),
        ("transformer.h.3.mlp.c_fc.weight", 0.02),
        ("transformer.h.3.attn.c_proj.weight", 0.005),
        ("transformer.h.3.mlp.c_proj.weight", 0.005),
    ):
        assert params[name].std().item() == pytest.approx(std, rel=0.03), name
        assert abs(params[name].mean().item()) < std / 20, name
    assert all(params[n].abs().max() == 0 for n in params if n.endswith(".bias"))
    assert all(
        torch.equal(params[n], torch.ones_like(params[n])) for n in params if re.search(r"ln_.*weight", n)
    )


def test_compiled_bf16_autocast_training_tracks_eager(tmp_path):
    data_dir = make_data(tmp_path / "data")
    cfg = tiny_config(
        data_dir, str(tmp_path / "eager"), max_steps=3, checkpoint_every=0, eval_every=3, dtype="bf16"
    )
    eager = train(cfg, DistContext())
    torch._dynamo.reset()
    compiled = train(replace(cfg, log_dir=str(tmp_path / "compiled"), compile=True), DistContext())
    fp32 = train(replace(cfg, log_dir=str(tmp_path / "fp32"), dtype="fp32"), DistContext())
    # measured (torch 2.13, CPU): compiled bf16 is within 4.2e-5 of eager bf16, fp32 2.2e-4 away from it;
    # so a compiled run that dropped autocast (an fp32 run) lands outside the tolerance
    tolerance = 1e-4

    def distance(run):
        return max(
            abs(a - b)
            for a, b in zip(run["losses"] + [run["val_loss"]], eager["losses"] + [eager["val_loss"]])
        )

    assert distance(compiled) < tolerance, "compiled bf16 must track eager bf16"
    assert distance(fp32) > tolerance, (
        "bf16 autocast must have been active, and the tolerance tell it from fp32"
    )


def test_ddp_over_a_compiled_model_matches_one_eager_process(tmp_path):
    """DDP's optimizer splits the compiled graph at gradient buckets, around the chunked loss's
    autograd Function; two compiled ranks must still train the weights of one eager process."""
    data_dir = make_data(tmp_path / "data")
    single = tiny_config(data_dir, str(tmp_path / "single"), max_steps=3, checkpoint_every=3, eval_every=3)
    train(single, DistContext())
    spawn_train(replace(single, log_dir=str(tmp_path / "ddp"), compile=True))
    a, b = final_weights(single.log_dir, 3), final_weights(str(tmp_path / "ddp"), 3)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    assert logged(single.log_dir, "val").keys() == logged(str(tmp_path / "ddp"), "val").keys() == {0, 3}


# ---- fp16 with loss scaling (--dtype fp16, for GPUs without bf16; CPU autocast runs it here too)


def test_fp16_tracks_fp32_and_resumes_exactly(tmp_path):
    data_dir = make_data(tmp_path / "data")
    # one micro-step per step: CPUs multiply fp16 matrices slowly
    fp16 = tiny_config(
        data_dir, str(tmp_path / "fp16"), dtype="fp16", checkpoint_every=6, total_batch_size=32
    )
    fp32 = train(replace(fp16, log_dir=str(tmp_path / "fp32"), dtype="fp32"), DistContext())["losses"]
    reference = train(fp16, DistContext())["losses"]
    assert reference != fp32, "fp16 autocast must have been active"
    torch.testing.assert_close(torch.tensor(reference), torch.tensor(fp32), atol=1e-3, rtol=0)
    scaler = torch.load(os.path.join(fp16.log_dir, "model_00006.pt"), weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 6

    cut = replace(fp16, log_dir=str(tmp_path / "cut"), resume="auto")
    train_until_stop(cut, 3)
    assert train(cut, DistContext())["losses"] == reference[3:], "the loss scale must resume too"


def test_fp16_overflow_skips_the_step_instead_of_stopping(tmp_path, monkeypatch):
    """A loss scale of 2**24 overflows fp16 gradients: the scaler skips those steps and halves its
    scale until gradients fit, and the run goes on (a non-finite norm is no reason to stop in fp16)."""
    original_init = train_gpt2.Precision.__init__

    def huge_scale(self, name, device):
        original_init(self, name, device)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**24, enabled=name == "fp16")

    monkeypatch.setattr(train_gpt2.Precision, "__init__", huge_scale)
    cfg = tiny_config(
        make_data(tmp_path / "data"),
        str(tmp_path / "log"),
        dtype="fp16",
        max_steps=16,
        checkpoint_every=16,
        eval_every=0,
        total_batch_size=32,
    )
    result = train(cfg, DistContext())
    norms = [m["norm"] for m in result["metrics"]]
    skipped = sum(not math.isfinite(n) for n in norms)
    assert not math.isfinite(norms[0]) and math.isfinite(norms[-1]) and 0 < skipped < 16, norms
    scaler = torch.load(os.path.join(cfg.log_dir, "model_00016.pt"), weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0 ** (24 - skipped)
    assert result["losses"][-1] < result["losses"][0]
    # the logged count of skipped steps (what metrics.jsonl and the trackers show) follows the scaler
    assert [m["skipped_steps"] for m in result["metrics"]] == [
        sum(not math.isfinite(n) for n in norms[: i + 1]) for i in range(16)
    ]
    assert result["metrics"][-1]["clipped_steps"] == sum(
        math.isfinite(n) and n > cfg.grad_clip for n in norms
    )
    assert torch.load(os.path.join(cfg.log_dir, "model_00016.pt"), weights_only=True)["counts"] == {
        "skipped_steps": skipped,
        "clipped_steps": result["metrics"][-1]["clipped_steps"],
    }


def train_and_report(rank, world_size, port, cfg, results):
    """Train on this rank; put (rank, "trained" or the UserError's class name, its message) on results."""
    from test_train import end_worker, init_gloo

    ctx = init_gloo(rank, world_size, port)
    try:
        train(cfg, ctx)
        results.put((rank, "trained", ""))
    except train_gpt2.UserError as e:
        results.put((rank, type(e).__name__, str(e)))
    end_worker()


def test_a_setting_rank_0_refuses_stops_every_rank(tmp_path):
    """--resume of a file no node has: rank 0 raises the UserError, the other ranks stop with it
    (FollowerStop, which main() exits on without printing) instead of training alone."""
    import torch.multiprocessing as mp

    cfg = tiny_config(
        make_data(tmp_path / "data"), str(tmp_path / "log"), resume=str(tmp_path / "missing.pt")
    )
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(train_and_report, args=(2, free_port(), cfg, results), nprocs=2)
    outcome = sorted(results.get() for _ in range(2))
    message = f"checkpoint {tmp_path / 'missing.pt'} does not exist on any node"
    assert outcome == [(0, "UserError", message), (1, "FollowerStop", message)]
    # a checkpoint that exists but that rank 0, which reads it, refuses (another model): the refusal
    # reaches the other rank through DistContext.decide
    data_dir = str(tmp_path / "data")
    train(
        tiny_config(data_dir, str(tmp_path / "d1"), max_steps=1, eval_every=0, checkpoint_every=1),
        DistContext(),
    )
    refused = tiny_config(
        data_dir, str(tmp_path / "log"), model="d2", resume=str(tmp_path / "d1" / "model_00001.pt")
    )
    mp.spawn(train_and_report, args=(2, free_port(), refused, results), nprocs=2)
    outcome = sorted(results.get() for _ in range(2))
    assert [(rank, kind) for rank, kind, _ in outcome] == [(0, "UserError"), (1, "FollowerStop")], outcome
    assert outcome[0][2] == outcome[1][2] and "differs from --model's" in outcome[0][2]


def failed_write_worker(rank, world_size, port, cfg, results):
    """Rank 0 finds a directory where its step-2 checkpoint should go: the rename onto it fails."""
    if rank == 0:
        original = train_gpt2.train_step

        def blocking_step(*args, **kwargs):
            os.makedirs(os.path.join(cfg.log_dir, "model_00002.pt", "in_the_way"), exist_ok=True)
            return original(*args, **kwargs)

        train_gpt2.train_step = blocking_step
    train_and_report(rank, world_size, port, cfg, results)


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny_config(
        make_data(tmp_path / "data"), str(tmp_path / "log"), max_steps=4, checkpoint_every=2, eval_every=0
    )
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=failed_write_worker, args=(rank, 2, port, cfg, results))
        for port in [free_port()]
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    deadline = time.time() + 90
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.time()))  # a rank left waiting for the others would hang here
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill()
    assert not hung, "a rank did not exit"
    outcome = []
    while not results.empty():  # a rank that crashed instead of stopping reported nothing
        outcome.append(results.get())
    outcome.sort()
    assert [o[:2] for o in outcome] == [(0, "UserError"), (1, "FollowerStop")], outcome
    assert outcome[0][2] == outcome[1][2] and "model_00002.pt: cannot write" in outcome[0][2]
    assert not any(
        name.endswith(".pt") and os.path.isfile(tmp_path / "log" / name)
        for name in os.listdir(tmp_path / "log")
    )
