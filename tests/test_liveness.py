"""A run that cannot be fooled into sharing its log dir, never hangs silently, and stops quickly.

The lock: real second processes against a live run whose .lock or log dir was deleted, replaced or
moved. The watchdog: a real SIGSTOP of one rank of two under torchrun. The stop: a real signal to a
real run in the middle of a long val eval. Models are d1 on random tokens."""

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_integrity import TINY_CLI, start_cli, wait_for_steps
from test_long_runs import TRAIN, same_weights, torchrun
from test_train import REPO, final_weights, make_data

from gpt2lib import evals, hellaswag_scoring, rundir
from gpt2lib.common import Precision, UserError
from gpt2lib.distributed import DistContext, StopRequest
from train_gpt2 import GPT, GPTConfig

# ---- a lock that holds


def only_errors(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def refusal(pid):
    return (
        f"error: --log-dir log is in use by another run (host {socket.gethostname()}, pid {pid}): "
        "wait for it to end, or choose another --log-dir"
    )


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_lock_file_deleted_or_replaced_under_a_live_run_lets_no_second_run_in(tmp_path, how):
    make_data(tmp_path / "data", n_train=200000)
    log = tmp_path / "log"
    args = TINY_CLI + [
        "--data-dir",
        "data",
        "--log-dir",
        "log",
        "--max-steps",
        "100000",
        "--checkpoint-every",
        "2",
    ]
    first = start_cli(args, tmp_path)
    try:
        wait_for_steps(log / "log.txt", 1, first)
        if how == "deleted":
            os.remove(log / ".lock")
        else:  # a look-alike that nobody locks, put in place as editors save
            (tmp_path / "lock.new").write_text("otherhost 1\n")
            os.replace(tmp_path / "lock.new", log / ".lock")
        second = start_cli(args, tmp_path)
        try:
            out, err = second.communicate(
                timeout=60
            )  # a refusal takes seconds; a second run that got in never ends
        finally:
            if second.poll() is None:
                second.kill()
                out, err = second.communicate()
        assert second.returncode == 2 and only_errors(err) == [refusal(first.pid)], err
        assert "Traceback" not in err
        # the holder writes its name again at its next checkpoint, and goes on as if alone
        saved = len([n for n in os.listdir(log) if n.endswith(".pt")])
        deadline = time.time() + 120
        while time.time() < deadline and len([n for n in os.listdir(log) if n.endswith(".pt")]) <= saved:
            time.sleep(0.1)
        assert (log / ".lock").read_text() == f"{socket.gethostname()} {first.pid}\n"
        assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGHUP)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0 and "stopped by signal" in out, err
        assert not [n for n in os.listdir(log) if n.startswith("previous_")]  # nothing of it was set aside
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_a_log_dir_moved_or_deleted_under_a_live_run_stops_it_with_one_line(tmp_path, how):
    """The run stops at its next checkpoint instead of writing into whatever is now at its path
    (a second run's directory), and its lock's release is quiet."""
    make_data(tmp_path / "data", n_train=200000)
    log = tmp_path / "log"
    args = TINY_CLI + [
        "--data-dir",
        "data",
        "--log-dir",
        "log",
        "--max-steps",
        "100000",
        "--checkpoint-every",
        "3",
    ]
    first = start_cli(args, tmp_path)
    try:
        wait_for_steps(log / "log.txt", 1, first)
        if how == "moved":
            os.rename(log, tmp_path / "moved")
        else:
            shutil.rmtree(log)
        os.mkdir(log)  # a new directory at the same path: none of the first run's files may land here
        out, err = first.communicate(timeout=60)
        assert first.returncode == 2, err
        assert only_errors(err) == [
            "error: --log-dir log was moved or deleted while this run was using it: stopped without "
            "writing more into it; resume from the directory that holds its checkpoints"
        ], err
        assert "Traceback" not in err
        assert os.listdir(log) == []
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def contend(directory_root, n, barrier, results):
    """n times: take the lock of a fresh directory at the same moment as the other process; the
    loser reports the refusal's message, then the winner lets go."""
    for i in range(n):
        lock = rundir.DirectoryLock(os.path.join(directory_root, str(i)), "--log-dir")
        barrier.wait()
        try:
            lock.acquire()
            message = None
        except UserError as e:
            message = str(e)
        barrier.wait()  # the loser has read the holder's name
        lock.release()
        if message is not None:
            results.put((os.getpid(), message))
    os._exit(0)


def test_a_refused_contender_always_names_the_holder(tmp_path):
    """Two processes race for 1000 fresh directories (3 s): each loser names the winner's PID. The
    holder's name was once written after the lock was taken: 15 of 1000 losers read an empty file."""
    n = 500
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.SimpleQueue()  # put() is done when it returns
    procs = [ctx.Process(target=contend, args=(str(tmp_path), n, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    messages = [results.get() for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    pids = {p.pid for p in procs}
    for loser, message in messages:
        winner = (pids - {loser}).pop()
        assert f"(host {socket.gethostname()}, pid {winner})" in message, message


# ---- a stop that is quick during an eval

EVAL_ARGS = TINY_CLI + [
    "--data-dir",
    "data",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "0",
    "--log-dir",
    "log",
]
LONG_EVAL_S = 12  # the val eval's length in these runs: what a stop used to wait for


def val_steps_lasting(seconds):
    return str(
        int(seconds * 50)
    )  # d1, B=2, T=16 on one CPU thread: about 50 val batches a second (its 50304-wide head)


def test_a_signal_during_the_val_eval_ends_it_at_the_next_batch_and_the_resume_redoes_it(tmp_path):
    make_data(tmp_path / "data", n_train=200000)
    val = ["--val-steps", val_steps_lasting(LONG_EVAL_S)]
    out_path = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, TRAIN, *EVAL_ARGS, *val, "--max-steps", "100000"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "model d1" not in out_path.read_text():
            time.sleep(0.02)
        time.sleep(1)  # into the step-0 eval
        proc.send_signal(signal.SIGINT)
        signalled = time.time()
        _, err = proc.communicate(timeout=120)
        seconds = time.time() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"stop latency during the val eval: {seconds:.2f} s (the eval alone takes about {LONG_EVAL_S} s)")
    assert proc.returncode == 0, err
    assert "stopped by signal" in out_path.read_text()
    assert os.listdir(tmp_path / "log") and sorted(n for n in os.listdir(tmp_path / "log") if ".pt" in n) == [
        "model_00000.pt"
    ]
    assert " val " not in (tmp_path / "log" / "log.txt").read_text()  # the unfinished eval is not logged
    assert seconds < LONG_EVAL_S / 2, f"the stop took {seconds:.1f} s: it waited for the eval"
    # the resume redoes the step-0 eval; its logs and weights are an uninterrupted run's (both with
    # a short eval: its length no longer matters)
    val = ["--val-steps", "4"]
    for log_dir in ["log", "alone"]:
        result = subprocess.run(
            [
                sys.executable,
                TRAIN,
                *EVAL_ARGS[:-1],
                log_dir,
                *val,
                "--max-steps",
                "2",
                "--checkpoint-every",
                "2",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    resumed, alone = [(tmp_path / d / "log.txt").read_text() for d in ["log", "alone"]]
    assert resumed == alone and resumed.count(" val ") == 2
    assert same_weights(final_weights(str(tmp_path / "log"), 2), final_weights(str(tmp_path / "alone"), 2))


# ---- no silent hang


def worker_pids(torchrun_proc):
    """{rank: pid} of torchrun's workers."""
    pids = {}
    for pid in map(int, open(f"/proc/{torchrun_proc.pid}/task/{torchrun_proc.pid}/children").read().split()):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        pids[int(env[b"RANK"])] = pid
    return pids


def test_a_stopped_rank_is_named_by_the_other_within_the_collective_timeout(tmp_path):
    """SIGSTOP one rank of two: the other prints one line naming it and exits, instead of waiting
    in its collective for gloo's 30 minutes."""
    make_data(tmp_path / "data", n_train=400000)
    timeout_s = 3
    args = TINY_CLI + [
        "--data-dir",
        "data",
        "--log-dir",
        "log",
        "--max-steps",
        "100000",
        "--checkpoint-every",
        "0",
        "--collective-timeout",
        str(timeout_s),
    ]
    proc = torchrun(args, tmp_path, nproc=2)
    lines, stopped = [], None
    reader = threading.Thread(
        target=lambda: [lines.append((time.time(), line)) for line in proc.stderr], daemon=True
    )
    reader.start()
    pids = {}
    try:
        wait_for_steps(tmp_path / "log" / "log.txt", 3, proc)
        time.sleep(2)  # the ranks have published a step
        pids = worker_pids(proc)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.time()
        deadline = stopped + 60
        while time.time() < deadline and not any(line.startswith("error:") for _, line in lines):
            time.sleep(0.05)
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    errors = [(t, line.strip()) for t, line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    seconds = errors[0][0] - stopped
    print(f"SIGSTOP to the other rank's line: {seconds:.1f} s (--collective-timeout {timeout_s})")
    assert re.fullmatch(
        rf"error: rank 0: no progress for \d+ s \(--collective-timeout {timeout_s}\): rank 1 \(host "
        rf"{re.escape(socket.gethostname())}\) stopped responding after step \d+; ending this rank so that "
        r"torchrun can restart the run",
        errors[0][1],
    ), errors
    assert seconds < timeout_s + 10
    assert proc.returncode != 0


def test_a_signal_during_the_hellaswag_eval_ends_it_at_the_next_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=64)).eval()
    rng = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 50257, (n,), generator=rng).tolist()

    # short rows, so that the eval is many batches (256 rows each) of a fraction of a second
    n = 500
    examples = hellaswag_scoring.TokenizedExamples(
        [ids(10) for _ in range(n)], [[ids(5) for _ in range(4)] for _ in range(n)], [0] * n
    )
    precision, dist_ctx = Precision("fp32", torch.device("cpu")), DistContext()
    started = time.time()
    whole = evals.evaluate_hellaswag(model, examples, precision, dist_ctx, StopRequest())
    whole_s = time.time() - started
    assert whole["n"] == n  # no signal: the whole split is scored
    stop = StopRequest()
    previous = signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(whole_s / 10, os.kill, (os.getpid(), signal.SIGINT))  # a real signal
    try:
        timer.start()
        started = time.time()
        stopped = evals.evaluate_hellaswag(model, examples, precision, dist_ctx, stop)
        seconds = time.time() - started
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    print(
        f"HellaSwag eval {whole_s:.2f} s; stopped {seconds:.2f} s after it began "
        f"(the signal at {whole_s / 10:.2f} s)"
    )
    assert stop.requested and stopped is None
    assert seconds < whole_s / 2, (
        f"the stop took {seconds:.1f} s of a {whole_s:.1f} s eval: it waited for the eval"
    )
