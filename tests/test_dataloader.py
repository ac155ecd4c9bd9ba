"""DataLoaderLite: coverage across ranks, exact resume, and a clear error for every bad shard."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from gpt2lib.common import UserError
from gpt2lib.shards import LLMC_MAGIC
from train_gpt2 import DataLoaderLite, DistContext


def write_npy(path, tokens):
    np.save(path, np.asarray(tokens, dtype=np.uint16))


def write_bin(path, tokens, magic=LLMC_MAGIC, version=1, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [magic, version, len(tokens) if count is None else count]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.fixture
def shards(tmp_path):
    """A val shard and three train shards of uneven lengths; token i of the stream is i % 50000,
    so every position of the train stream is identifiable by its value."""
    lengths = [1000, 700, 1234]
    write_npy(tmp_path / "tok_val_000000.npy", np.arange(500) % 50000)
    start = 0
    for i, n in enumerate(lengths, start=1):
        write_npy(tmp_path / f"tok_train_{i:06d}.npy", np.arange(start, start + n) % 50000)
        start += n
    return tmp_path, sum(lengths)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_the_stream_once_without_overlap(shards, world):
    root, total = shards
    B, T = 2, 16
    loaders = [DataLoaderLite(B, T, r, world, "train", str(root)) for r in range(world)]
    steps = (total - 1) // (B * T * world)
    used = np.zeros(total, dtype=int)
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == (B, T) and x.dtype == torch.int64
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one
            positions = x.flatten().numpy()  # values equal stream positions (< 50000 here)
            assert np.array_equal(y.flatten().numpy(), positions + 1)
            used[positions] += 1
    covered = steps * B * T * world
    assert (used[:covered] == 1).all(), "every token of the stream is an input exactly once"
    assert (used[covered:] == 0).all()
    assert total - covered < B * T * world + 1, "only a tail shorter than one step is skipped"
    # windows crossed both shard boundaries (positions 1000 and 1700) without dropping tokens
    assert used[999] == used[1000] == used[1699] == used[1700] == 1


def test_epoch_wraps_to_the_start(shards):
    root, total = shards
    loader = DataLoaderLite(4, 32, 0, 1, "train", str(root))
    steps = (total - 1) // 128
    first, _ = loader.next_batch()
    for _ in range(steps - 1):
        loader.next_batch()
    again, _ = loader.next_batch()
    assert loader.epoch == 1
    assert torch.equal(first, again)


def test_resume_equals_uninterrupted_across_shard_boundary(shards):
    root, _ = shards
    for world in (1, 2):
        for seed in (None, 7):
            ref = [
                DataLoaderLite(2, 32, r, world, "train", str(root), shuffle_seed=seed) for r in range(world)
            ]
            batches = [
                [loader.next_batch() for _ in range(30)] for loader in ref
            ]  # spans shards and an epoch
            for cut in (5, 11, 17):
                for r in range(world):
                    first = DataLoaderLite(2, 32, r, world, "train", str(root), shuffle_seed=seed)
                    for _ in range(cut):
                        first.next_batch()
                    state = first.state_dict()
                    resumed = DataLoaderLite(2, 32, r, world, "train", str(root))
                    resumed.load_state_dict(state)
                    for step in range(cut, 30):
                        x, y = resumed.next_batch()
                        assert torch.equal(x, batches[r][step][0]) and torch.equal(y, batches[r][step][1])


def test_shuffle_changes_shard_order_per_epoch_but_not_content(shards):
    root, total = shards
    loader = DataLoaderLite(1, 50, 0, 1, "train", str(root), shuffle_seed=3)
    orders = set()
    for _ in range(8):
        orders.add(tuple(loader.order))
        seen = []
        epoch = loader.epoch
        while loader.epoch == epoch:
            x, _ = loader.next_batch()
            if loader.epoch == epoch:
                seen.append(x.flatten().numpy())
        # each epoch is a permutation of whole shards: the multiset of inputs is a subset of the stream
        values = np.concatenate(seen)
        assert len(np.unique(values)) == len(values)
    assert len(orders) > 1
    unshuffled = DataLoaderLite(1, 50, 0, 1, "train", str(root))
    assert unshuffled.order == [0, 1, 2]


def test_llmc_bin_shards_read_like_npy(tmp_path):
    tokens = np.arange(3000) % 50257
    write_npy(tmp_path / "a_val_000000.npy", tokens)
    os.mkdir(tmp_path / "bin")
    write_bin(tmp_path / "bin" / "fineweb_val_000000.bin", tokens)
    a = DataLoaderLite(4, 64, 0, 1, "val", str(tmp_path))
    b = DataLoaderLite(4, 64, 0, 1, "val", str(tmp_path / "bin"))
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reset_restarts_val(shards):
    root, _ = shards
    loader = DataLoaderLite(2, 8, 0, 1, "val", str(root))
    first = loader.next_batch()[0]
    loader.next_batch()
    loader.reset()
    assert torch.equal(loader.next_batch()[0], first)


def make_loader(root, split="val", B=2, T=8):
    return DataLoaderLite(B, T, 0, 1, split, str(root))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "run `python fineweb.py`"),  # empty directory
        (lambda d: write_npy(d / "x_train_000001.npy", range(100)), "no 'val' shards"),
        (lambda d: open(d / "x_val_000000.npy", "wb").close(), "is empty (0 bytes)"),
        (
            lambda d: (
                write_npy(d / "x_val_000000.npy", range(1000)),
                os.truncate(d / "x_val_000000.npy", 500),
            ),
            "truncated",
        ),
        (lambda d: np.save(d / "x_val_000000.npy", np.arange(100, dtype=np.float32)), "holds float32"),
        (lambda d: np.save(d / "x_val_000000.npy", np.arange(100, dtype=np.int32)), "holds int32"),
        (
            lambda d: np.save(d / "x_val_000000.npy", np.zeros((10, 10), dtype=np.uint16)),
            "expected 1-D uint16",
        ),
        (lambda d: write_bin(d / "x_val_000000.bin", range(100), magic=123), "bad magic"),
        (lambda d: write_bin(d / "x_val_000000.bin", range(100), version=2), "version 2"),
        (lambda d: write_bin(d / "x_val_000000.bin", range(100), count=200), "header promises 200 tokens"),
        (lambda d: write_npy(d / "x_val_000000.npy", range(10)), "fewer than one step needs"),
    ],
)
def test_bad_shards_are_named_in_a_one_line_error(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserError) as info:
        make_loader(tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text
    if any(tmp_path.iterdir()):
        assert str(tmp_path) in text


def test_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist: run `python fineweb.py`"):
        make_loader(tmp_path / "nope")


def test_token_id_out_of_vocab_is_caught_when_the_shard_is_read(tmp_path):
    write_npy(tmp_path / "x_val_000000.npy", [1, 2, 3] + [60000] + list(range(100)))
    loader = make_loader(tmp_path)
    with pytest.raises(UserError, match=r"x_val_000000.npy holds token id 60000, >= vocab size 50257"):
        loader.next_batch()


def test_resume_on_different_shards_is_refused(shards, tmp_path):
    root, _ = shards
    state = make_loader(root, "train").state_dict()
    write_npy(root / "tok_train_000004.npy", range(100))
    with pytest.raises(UserError, match="shards differ"):
        make_loader(root, "train").load_state_dict(state)


def epoch_inputs(loaders):
    """Every rank's inputs, step by step, over the first epoch: a list (per step) of per-rank arrays."""
    steps = []
    while True:
        batches = [loader.next_batch()[0].flatten().numpy() for loader in loaders]
        if loaders[0].epoch:
            return steps
        steps.append(batches)


def test_block_shuffle_covers_every_token_once_across_two_ranks_in_a_new_order(shards):
    root, total = shards
    B, T, block = 2, 16, 128  # a block is 2 steps of 2 ranks: an optimizer step with 2 micro-steps
    shuffled = [
        DataLoaderLite(B, T, r, 2, "train", str(root), shuffle_seed=5, block_tokens=block) for r in range(2)
    ]
    plain = [DataLoaderLite(B, T, r, 2, "train", str(root)) for r in range(2)]
    got = epoch_inputs(shuffled)
    used = np.zeros(total, dtype=int)
    for step in got:
        for x in step:
            used[x] += 1
    covered = (total - 1) // block * block
    assert (used <= 1).all(), "no token is an input twice, on any rank"
    assert used.sum() == covered and total - covered < block + 1, (
        "only a tail shorter than a block is skipped"
    )
    plain_order = np.concatenate([np.concatenate(s) for s in epoch_inputs(plain)])
    shuffled_order = np.concatenate([np.concatenate(s) for s in got])
    assert not np.array_equal(shuffled_order, plain_order[: len(shuffled_order)])
    # whole blocks of the (shard-shuffled) stream move: the epoch reads them in the seeded block order
    fresh = DataLoaderLite(B, T, 0, 2, "train", str(root), shuffle_seed=5, block_tokens=block)
    stream = np.concatenate([np.load(fresh.shards[i]) for i in fresh.order]).astype(np.int64)
    assert sorted(fresh.blocks.tolist()) == list(range(covered // block)) and fresh.blocks.tolist() != sorted(
        fresh.blocks.tolist()
    )
    assert np.array_equal(
        shuffled_order, np.concatenate([stream[b * block : (b + 1) * block] for b in fresh.blocks])
    )
    assert shuffled[0].blocks.tolist() != fresh.blocks.tolist()  # epoch 1 has another order


def test_block_shuffle_resumes_exactly_on_the_same_and_another_world_size(shards):
    root, _ = shards
    block = 128

    def steps(loaders, n):  # the tokens of n optimizer steps, in rank order within each micro-step
        per_micro = sum(loader.B * loader.T for loader in loaders)
        return [
            np.concatenate([loader.next_batch()[0].flatten().numpy() for loader in loaders])
            for _ in range(n * block // per_micro)
        ]

    ref = [
        DataLoaderLite(2, 16, r, 2, "train", str(root), shuffle_seed=9, block_tokens=block) for r in range(2)
    ]
    reference = np.concatenate(steps(ref, 40))  # 40 steps: past the end of the first epoch (22 blocks)
    first = [
        DataLoaderLite(2, 16, r, 2, "train", str(root), shuffle_seed=9, block_tokens=block) for r in range(2)
    ]
    head = np.concatenate(steps(first, 13))
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["block_tokens"] == block
    for world, T in ((2, 16), (1, 32), (4, 16)):  # the same world, then half and twice the ranks
        resumed = [DataLoaderLite(2, T, r, world, "train", str(root)) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(state)
        tail = np.concatenate(steps(resumed, 27))
        assert np.array_equal(np.concatenate([head, tail]), reference), world


def test_shuffled_training_covers_every_shard_and_token_each_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    """--shuffle through train(): every epoch reads each train shard once, in a seeded order that
    changes, and every token of the stream is an input exactly once but for the tail shorter than a
    step; a run stopped in the second epoch and resumed reads the same batches and trains the same losses."""
    from test_train import install_stop_after, tiny_config

    import train_gpt2

    lengths = [60, 40, 53, 50]
    shard_tokens, start = [], 0
    for i, n in enumerate(lengths, start=1):
        shard_tokens.append(np.arange(start, start + n))  # every token's value is its place in the data
        write_npy(tmp_path / f"tok_train_{i:06d}.npy", shard_tokens[-1])
        start += n
    step_tokens, steps_per_epoch = 64, (sum(lengths) - 1) // 64  # B=4, T=16, one rank, no accumulation
    real_next_batch, reads = DataLoaderLite.next_batch, []

    def recording_next_batch(loader):
        x, y = real_next_batch(loader)
        reads.append((loader.epoch, list(loader.order), x.flatten().numpy(), y.flatten().numpy()))
        return x, y

    monkeypatch.setattr(DataLoaderLite, "next_batch", recording_next_batch)
    cfg = tiny_config(
        str(tmp_path),
        str(tmp_path / "full"),
        batch_size=4,
        total_batch_size=step_tokens,
        shuffle=True,
        max_steps=2 * steps_per_epoch + 2,
        eval_every=0,
        checkpoint_every=2 * steps_per_epoch + 2,
    )
    reference = train_gpt2.train(cfg, DistContext())["losses"]
    full_reads = list(reads)
    orders = []
    for epoch in (0, 1):
        batches = [r for r in full_reads if r[0] == epoch]
        order = batches[0][1]
        orders.append(order)
        assert len(batches) == steps_per_epoch and sorted(order) == [0, 1, 2, 3], order
        stream = np.concatenate([shard_tokens[i] for i in order])
        inputs = np.concatenate([x for _, _, x, _ in batches])
        # the step-sized blocks of the shard-shuffled stream, read in a seeded order: the same tokens
        np.testing.assert_array_equal(np.sort(inputs), np.sort(stream[: len(inputs)]))
        assert len(np.unique(inputs)) == len(inputs)  # no token twice
        missing = np.setdiff1d(np.arange(sum(lengths)), inputs)  # only the tail, at the end of the last shard
        assert len(missing) < step_tokens + 1 and np.isin(missing, shard_tokens[order[-1]]).all()
        np.testing.assert_array_equal(missing, stream[len(inputs) :])
        for _, _, x, y in batches:  # each block is a run of the stream: targets are the next tokens
            blocks = [
                stream[start : start + step_tokens + 1] for start in [int(np.flatnonzero(stream == x[0])[0])]
            ]
            np.testing.assert_array_equal(x, blocks[0][:-1])
            np.testing.assert_array_equal(y, blocks[0][1:])
    assert orders[0] != orders[1] or orders[0] != [0, 1, 2, 3], "the shard order must be shuffled"

    reads.clear()
    cut = replace(cfg, log_dir=str(tmp_path / "cut"), resume="auto")
    stop_at = steps_per_epoch + 1  # in the second epoch
    original = install_stop_after(stop_at)
    try:
        first = train_gpt2.train(cut, DistContext())["losses"]
    finally:
        train_gpt2.train_step = original
    reads.clear()
    second = train_gpt2.train(cut, DistContext())["losses"]
    assert first + second == reference, "a resumed shuffled run must train the same losses, bit for bit"
    for a, b in zip(reads, full_reads[stop_at:]):
        assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    assert len(reads) == len(full_reads) - stop_at
