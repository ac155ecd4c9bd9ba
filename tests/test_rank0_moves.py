"""When a restart puts rank 0 on another node: two single-process torchrun 'nodes' in two working
directories (no shared files). First with static rendezvous, the second run started with the nodes'
ranks swapped; then with torchrun's c10d rendezvous and --max-restarts, where a node dies and its
replacement joins the re-run rendezvous behind the surviving node, which becomes rank 0."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
from test_long_runs import TINY_ARGS, checkpoints, digest, finish, same_weights, torchrun
from test_train import REPO, final_weights, free_port, logged, make_data, tiny_config

from gpt2lib import distributed
from gpt2lib.common import UserError
from train_gpt2 import DistContext, train

ARGS = TINY_ARGS + [
    "--total-batch-size",
    "64",
    "--max-steps",
    "6",
    "--checkpoint-every",
    "2",
    "--keep-last",
    "0",
    "--eval-every",
    "0",
    "--sample-every",
    "0",
]


def run_nodes(dirs, args):
    """One run over two nodes; dirs[0] is the node that gets rank 0. Returns [(rc, out, err)] per node."""
    port = free_port()
    return finish([torchrun(args, d, nnodes=2, node_rank=n, port=port) for n, d in enumerate(dirs)])


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_rank_0_on_another_node_resumes_the_newest_checkpoint_and_takes_over_the_logs(tmp_path, monkeypatch):
    from test_tracking import tensorboard_scalars

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    tracked = ARGS + ["--tensorboard", "--wandb", "tests"]
    first = run_nodes([a, b], tracked)
    assert [rc for rc, _, _ in first] == [0, 0], first
    uninterrupted = final_weights(a / "log", 6)
    (a / "log" / "model_00006.pt").unlink()  # as if the run had died after step 4's checkpoint
    kept = {name: digest(a / "log" / name) for name in checkpoints(a / "log")}

    second = run_nodes([b, a], tracked)  # B joined first: rank 0 is on B now, A holds the checkpoints
    assert [rc for rc, _, _ in second] == [0, 0], second
    out = second[0][1]
    assert "holds the newest checkpoint, log/model_00004.pt at step 4" in out and "(rank 1)" in out, out
    assert "resuming at step 4" in out
    assert same_weights(final_weights(b / "log", 6), uninterrupted), (
        "B must have resumed from A's step-4 state"
    )
    # the logs now live on B, each step once, the earlier steps carried over from A
    train_steps = [
        int(line.split()[0]) for line in lines(b / "log" / "log.txt") if line.split()[1] == "train"
    ]
    assert train_steps == list(range(6))
    assert sorted(logged(b / "log")) == list(range(6))
    # so do the trackers': A's TensorBoard events and W&B run id came along, and continue on B
    _, scalars = tensorboard_scalars(b / "log")
    assert [step for step, _ in scalars["train/loss"]] == list(range(6))
    assert (b / "log" / "wandb_run_id").read_text() == (a / "log" / "wandb_run_id").read_text()
    # nothing of A's was deleted or changed
    assert {name: digest(a / "log" / name) for name in checkpoints(a / "log")} == kept


def test_a_node_holding_another_runs_checkpoint_is_refused_and_nothing_moves(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    # two unrelated one-process runs, one in each node's log dir
    for node in (a, b):
        train(
            tiny_config(str(node / "data"), str(node / "log"), max_steps=2, checkpoint_every=2, eval_every=0),
            DistContext(),
        )
    before = {node: sorted(os.listdir(node / "log")) for node in (a, b)}
    digests = {node: {n: digest(node / "log" / n) for n in checkpoints(node / "log")} for node in (a, b)}

    results = run_nodes([b, a], ARGS)
    assert all(rc != 0 for rc, _, _ in results), results
    # torchrun adds its own failure report after the worker's line; the worker prints one line, on rank 0
    assert (
        results[0][2]
        .splitlines()[0]
        .startswith("error: the nodes' log dirs hold checkpoints of different runs")
    )
    assert "exitcode  : 2" in results[0][2] and "exitcode  : 2" in results[1][2]
    assert "error:" not in results[1][2] and 'train_gpt2.py", line' not in results[0][2] + results[1][2]
    assert {node: sorted(os.listdir(node / "log")) for node in (a, b)} == before
    assert {
        node: {n: digest(node / "log" / n) for n in checkpoints(node / "log")} for node in (a, b)
    } == digests


def test_a_node_whose_checkpoints_are_all_damaged_resumes_from_another_nodes_good_one(tmp_path):
    """Rank 0's node holds only damaged checkpoints, node B a good copy: the run resumes B's (it used
    to stop, and the suggested --resume none would have thrown B's away); with none good anywhere,
    one line as before."""
    from test_integrity import flip_bytes

    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    run = ARGS[: ARGS.index("--max-steps")] + ["--max-steps", "4"] + ARGS[ARGS.index("--max-steps") + 2 :]
    assert [rc for rc, _, _ in run_nodes([a, b], run)] == [0, 0]
    (b / "log").mkdir()
    shutil.copy(a / "log" / "model_00002.pt", b / "log" / "model_00002.pt")
    for name in checkpoints(a / "log"):
        flip_bytes(a / "log" / name)
    longer = ARGS[: ARGS.index("--max-steps")] + ["--max-steps", "6"] + ARGS[ARGS.index("--max-steps") + 2 :]
    resumed = run_nodes([a, b], longer)
    assert [rc for rc, _, _ in resumed] == [0, 0], resumed
    assert "(rank 1) holds the newest checkpoint, log/model_00002.pt at step 2" in resumed[0][1], resumed[0][
        1
    ]
    assert "resuming at step 2" in resumed[0][1]
    # A's damaged checkpoints were set aside, not deleted
    assert sorted(os.listdir(a / "log" / "previous_1")) == [
        "log.txt",
        "metrics.jsonl",
        "model_00002.pt",
        "model_00004.pt",
    ]
    for name in checkpoints(b / "log"):
        flip_bytes(b / "log" / name)
    for name in checkpoints(a / "log"):
        flip_bytes(a / "log" / name)
    nothing_good = run_nodes([a, b], longer)
    assert all(rc != 0 for rc, _, _ in nothing_good)
    assert nothing_good[0][2].splitlines()[0].startswith("error: every checkpoint in log is damaged")


def test_resume_path_on_another_node_is_found_and_a_path_no_node_has_is_one_line(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    run = ARGS[: ARGS.index("--max-steps")] + ["--max-steps", "4"] + ARGS[ARGS.index("--max-steps") + 2 :]
    assert [rc for rc, _, _ in run_nodes([a, b], run)] == [0, 0]
    missing = run_nodes([b, a], run + ["--resume", "log/model_00003.pt"])
    assert all(rc != 0 for rc, _, _ in missing)
    assert missing[0][2].splitlines()[0] == "error: checkpoint log/model_00003.pt does not exist on any node"
    assert "exitcode  : 2" in missing[0][2] and "exitcode  : 2" in missing[1][2]
    found = run_nodes([b, a], run + ["--resume", "log/model_00002.pt"])
    assert [rc for rc, _, _ in found] == [0, 0], found
    assert "log/model_00002.pt at step 2" in found[0][1] and "resuming at step 2" in found[0][1]
    assert sorted(logged(b / "log")) == [0, 1, 2, 3]
    # a PATH outside the node's log dir is another run's checkpoint: its weights come along, not that
    # log dir's logs (as when rank 0 itself holds such a file)
    (a / "kept").mkdir()
    shutil.copy(a / "log" / "model_00002.pt", a / "kept" / "model_00002.pt")
    outside = run_nodes([b, a], run + ["--resume", "kept/model_00002.pt"])
    assert [rc for rc, _, _ in outside] == [0, 0], outside
    assert "kept/model_00002.pt at step 2\n" in outside[0][1] and "its logs continue" not in outside[0][1]
    assert sorted(logged(b / "log")) == [2, 3]  # not A's log/ steps 0-3


# ---- torchrun --max-restarts with the c10d rendezvous: a node dies, its replacement joins

# train_gpt2.py, except that rank 0 stops for good right after saving step NODE_DIES_AFTER's
# checkpoint and writes its PID to a marker, so that the test kills its node at a known step
NODE_DIES = """
import os, signal, sys
import train_gpt2
die_after, save = int(os.environ.get("NODE_DIES_AFTER", "-1")), train_gpt2.save
def save_then_hang(step, run):
    save(step, run)
    if step == die_after and run.dist_ctx.master_process:
        sys.stdout.flush()
        with open("died", "w") as f:
            f.write(str(os.getpid()))
        signal.pause()
train_gpt2.save = save_then_hang
train_gpt2.main()
"""


def c10d_node(script, cwd, port, local_addr, args, env=()):
    """One node's torchrun agent, in its own session so the test can kill the whole node. The c10d
    rendezvous ranks nodes by address and then agent PID: --local-addr sets the order here."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=moves",
        "--rdzv-conf=join_timeout=120",
        "--max-restarts=1",
        f"--local-addr={local_addr}",
        "--monitor-interval=0.5",
        script,
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **dict(env)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def stop_nodes(agents, marker):
    """After a failed test: SIGTERM the agents still running, which stop their workers (each in a
    session of its own), SIGKILL those that do not exit, and the worker that waits to be killed."""
    running = [p for p in agents if p is not None and p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    if os.path.exists(marker):
        try:
            os.kill(int(marker.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_max_restarts_after_a_node_dies_moves_rank_0_and_resumes_the_dead_nodes_checkpoint(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    script = tmp_path / "node_dies.py"
    script.write_text(NODE_DIES)
    args = [*ARGS[: ARGS.index("--max-steps")], "--max-steps", "8", *ARGS[ARGS.index("--max-steps") + 2 :]]
    port = free_port()
    # B joins first and so hosts the rendezvous store, which must outlive A; A's lower address makes
    # it rank 0 all the same
    b_node = c10d_node(script, b, port, "127.0.0.2", args)
    time.sleep(1)
    a_node = c10d_node(script, a, port, "127.0.0.1", args, env={"NODE_DIES_AFTER": "4"})
    replacement = None
    try:
        wait_for(a / "died", timeout=120)
        # node A dies: its agent, and its worker (torchrun starts each worker in a session of its own)
        os.killpg(a_node.pid, signal.SIGKILL)
        os.kill(int((a / "died").read_text()), signal.SIGKILL)
        a_node.wait()
        kept = {name: digest(a / "log" / name) for name in checkpoints(a / "log")}
        assert sorted(kept) == ["model_00002.pt", "model_00004.pt"]
        # A's replacement (a new agent, its address ordered after B's) joins the rendezvous that B's
        # agent re-runs: rank 0 is on B now, and only A holds checkpoints
        replacement = c10d_node(script, a, port, "127.0.0.3", args)
        b_out, b_err = b_node.communicate(timeout=240)
        a_out, a_err = replacement.communicate(timeout=60)
    finally:
        stop_nodes([a_node, b_node, replacement], a / "died")
    assert (b_node.returncode, replacement.returncode) == (0, 0), (b_err[-3000:], a_err[-3000:])
    assert "holds the newest checkpoint, log/model_00004.pt at step 4" in b_out and "(rank 1)" in b_out, b_out
    assert "resuming at step 4" in b_out and a_out == "", (b_out, a_out)
    # the same run on one process, uninterrupted (2 ranks x accumulation 1 = 1 x 2)
    train(
        tiny_config(
            str(a / "data"),
            str(tmp_path / "one"),
            total_batch_size=64,
            max_steps=8,
            checkpoint_every=8,
            eval_every=0,
        ),
        DistContext(),
    )
    moved = final_weights(b / "log", 8)
    reference = final_weights(tmp_path / "one", 8)
    assert moved.keys() == reference.keys()
    for key in moved:
        torch.testing.assert_close(moved[key], reference[key], atol=1e-5, rtol=0, msg=key)
    train_steps = [
        int(line.split()[0]) for line in lines(b / "log" / "log.txt") if line.split()[1] == "train"
    ]
    assert train_steps == list(range(8))
    assert sorted(logged(b / "log")) == list(range(8))
    assert {name: digest(a / "log" / name) for name in checkpoints(a / "log")} == kept


# ---- every rank of an attempt meets under one store prefix, whatever earlier attempts left


def meet(store_port, ranks, world_size, delays):
    """Ranks `ranks` of one attempt, each a thread with its own client of a real TCPStore, starting
    after its delay: {rank: the attempt id it ended up with}."""
    found = {}

    def start(rank):
        time.sleep(delays.get(rank, 0))
        store = torch.distributed.TCPStore("127.0.0.1", store_port, is_master=False)
        found[rank] = (
            distributed.open_attempt(store, world_size)
            if rank == 0
            else distributed.join_attempt(store, rank)
        )

    threads = [threading.Thread(target=start, args=(rank,), daemon=True) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return found


def test_each_attempt_gets_one_fresh_prefix_even_when_ranks_arrive_before_rank_0():
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = meet(server.port, range(3), 3, delays={})
    assert sorted(first) == [0, 1, 2] and len(set(first.values())) == 1, first
    # the next attempt finds the first one's questions and answers in the store; ranks 1 and 2 ask
    # before rank 0 starts, then rank 0 comes; then again with rank 0 first
    second = meet(server.port, range(3), 3, delays={0: 0.5})
    third = meet(server.port, range(3), 3, delays={1: 0.3, 2: 0.6})
    for attempt in (second, third):
        assert sorted(attempt) == [0, 1, 2] and len(set(attempt.values())) == 1, attempt
    assert len({first[0], second[0], third[0]}) == 3


def test_a_rank_that_never_comes_stops_the_others_with_one_line(monkeypatch):
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", timedelta(seconds=1))
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = torch.distributed.TCPStore("127.0.0.1", server.port, is_master=False)
    with pytest.raises(UserError, match="^1 of 2 ranks did not start within 0:00:01"):
        distributed.open_attempt(client, 2)
    with pytest.raises(UserError, match="^rank 1: rank 0 did not start within 0:00:01"):
        distributed.join_attempt(client, 1)
