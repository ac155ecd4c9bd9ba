"""When a restart puts rank 0 on another node: two single-process torchrun 'nodes' in two working
directories (no shared files), the second run started with the nodes' ranks swapped, as a c10d
rendezvous that another node joins first assigns them."""

import os

from test_long_runs import TINY_ARGS, checkpoints, digest, same_weights, torchrun
from test_train import final_weights, free_port, logged, make_data, tiny_config
from train_gpt2 import DistContext, train

ARGS = TINY_ARGS + ["--total-batch-size", "64", "--max-steps", "6", "--checkpoint-every", "2", "--keep-last", "0",
                    "--eval-every", "0", "--sample-every", "0"]


def run_nodes(dirs, args):
    """One run over two nodes; dirs[0] is the node that gets rank 0. Returns [(rc, out, err)] per node."""
    port = free_port()
    procs = [torchrun(args, d, nnodes=2, node_rank=n, port=port) for n, d in enumerate(dirs)]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_rank_0_on_another_node_resumes_the_newest_checkpoint_and_takes_over_the_logs(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    first = run_nodes([a, b], ARGS)
    assert [rc for rc, _, _ in first] == [0, 0], first
    uninterrupted = final_weights(a / "log", 6)
    (a / "log" / "model_00006.pt").unlink()  # as if the run had died after step 4's checkpoint
    kept = {name: digest(a / "log" / name) for name in checkpoints(a / "log")}

    second = run_nodes([b, a], ARGS)  # B joined first: rank 0 is on B now, A holds the checkpoints
    assert [rc for rc, _, _ in second] == [0, 0], second
    out = second[0][1]
    assert "holds the newest checkpoint, log/model_00004.pt at step 4" in out and "(rank 1)" in out, out
    assert "resuming at step 4" in out
    assert same_weights(final_weights(b / "log", 6), uninterrupted), "B must have resumed from A's step-4 state"
    # the logs now live on B, each step once, the earlier steps carried over from A
    train_steps = [int(line.split()[0]) for line in lines(b / "log" / "log.txt") if line.split()[1] == "train"]
    assert train_steps == list(range(6))
    assert sorted(logged(b / "log")) == list(range(6))
    # nothing of A's was deleted or changed
    assert {name: digest(a / "log" / name) for name in checkpoints(a / "log")} == kept


def test_a_node_holding_another_runs_checkpoint_is_refused_and_nothing_moves(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    # two unrelated one-process runs, one in each node's log dir
    for node in (a, b):
        train(tiny_config(str(node / "data"), str(node / "log"), max_steps=2, checkpoint_every=2, eval_every=0),
              DistContext())
    before = {node: sorted(os.listdir(node / "log")) for node in (a, b)}
    digests = {node: {n: digest(node / "log" / n) for n in checkpoints(node / "log")} for node in (a, b)}

    results = run_nodes([b, a], ARGS)
    assert all(rc != 0 for rc, _, _ in results), results
    # torchrun adds its own failure report after the worker's line; the worker prints one line, on rank 0
    assert results[0][2].splitlines()[0].startswith("error: the nodes' log dirs hold checkpoints of different runs")
    assert "exitcode  : 2" in results[0][2] and "exitcode  : 2" in results[1][2]
    assert "error:" not in results[1][2] and 'train_gpt2.py", line' not in results[0][2] + results[1][2]
    assert {node: sorted(os.listdir(node / "log")) for node in (a, b)} == before
    assert {node: {n: digest(node / "log" / n) for n in checkpoints(node / "log")} for node in (a, b)} == digests


def test_resume_path_on_another_node_is_found_and_a_path_no_node_has_is_one_line(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    for node in (a, b):
        make_data(node / "data")
    run = ARGS[:ARGS.index("--max-steps")] + ["--max-steps", "4"] + ARGS[ARGS.index("--max-steps") + 2:]
    assert [rc for rc, _, _ in run_nodes([a, b], run)] == [0, 0]
    missing = run_nodes([b, a], run + ["--resume", "log/model_00003.pt"])
    assert all(rc != 0 for rc, _, _ in missing)
    assert missing[0][2].splitlines()[0] == "error: checkpoint log/model_00003.pt does not exist on any node"
    assert "exitcode  : 2" in missing[0][2] and "exitcode  : 2" in missing[1][2]
    found = run_nodes([b, a], run + ["--resume", "log/model_00002.pt"])
    assert [rc for rc, _, _ in found] == [0, 0], found
    assert "log/model_00002.pt at step 2" in found[0][1] and "resuming at step 2" in found[0][1]
    assert sorted(logged(b / "log")) == [0, 1, 2, 3]
