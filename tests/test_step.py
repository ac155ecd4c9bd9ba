"""One optimizer step (train_gpt2.train_step) against a big-batch reference: the accumulated gradient,
its logged norm, clipping, and a NaN that must leave weights and optimizer state untouched.

d1 models on random tokens; the two-rank cases run once, in two gloo processes, for all tests here."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from test_train import end_worker, free_port, init_gloo, make_data
from torch.nn.parallel import DistributedDataParallel as DDP

import train_gpt2
from train_gpt2 import (
    GPT,
    DataLoaderLite,
    DistContext,
    NonFiniteLoss,
    TrainConfig,
    config_for,
    configure_optimizer,
)

T = 16
TOKENS_PER_STEP = 128  # B * accumulation * ranks, the same in every setting compared


def make_run(model, data_dir, B, accum, ctx, grad_clip=0.0):
    """The parts of a train_gpt2.Run that train_step uses; grad_clip 0 leaves the gradients as computed."""
    raw = model.module if isinstance(model, DDP) else model
    loader = DataLoaderLite(B, T, ctx.rank, ctx.world_size, "train", data_dir)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=10, grad_clip=grad_clip, loss_impl="chunked")
    return SimpleNamespace(
        model=model,
        optimizer=configure_optimizer(raw, 0.1, cfg.lr, "cpu"),
        cfg=cfg,
        precision=train_gpt2.Precision("fp32", torch.device("cpu")),
        train_loader=loader,
        grad_accum_steps=accum,
        dist_ctx=ctx,
        log=SimpleNamespace(failure=None),
    )


def fresh_model():
    torch.manual_seed(0)
    return GPT(config_for("d1", vocab_multiple=64))


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def snapshot(run):
    raw = run.model.module if isinstance(run.model, DDP) else run.model
    return copy.deepcopy(raw.state_dict()), copy.deepcopy(run.optimizer.state_dict())


def same_state(a, b):
    """Weights and optimizer state equal, bit for bit (NaN counts as different)."""
    (wa, oa), (wb, ob) = a, b
    weights = all(torch.equal(wa[k], wb[k]) for k in wa)
    state = oa["state"].keys() == ob["state"].keys() and all(
        torch.equal(oa["state"][i][name], ob["state"][i][name])
        for i in oa["state"]
        for name in oa["state"][i]
    )
    return weights and state


def poison(model):
    """LayerNorm gains at the edge of fp32: the weights stay finite, the logits and loss do not."""
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(3e38)


def two_rank_worker(rank, world_size, port, data_dir, out_dir):
    """On 2 ranks: one step of B=2 x accumulation 2 (gradients, norm, loss), then a step whose loss is
    NaN on rank 1 only (did each rank raise, and are its weights and optimizer state unchanged?)."""
    ctx = init_gloo(rank, world_size, port)
    model = DDP(fresh_model())
    run = make_run(model, data_dir, B=2, accum=TOKENS_PER_STEP // (2 * T * world_size), ctx=ctx)
    result = train_gpt2.train_step(run, 0)
    report = {"grads": flat_grads(model), "norm": result.norm, "loss": result.loss}
    if rank == 1:
        poison(model.module)
    before = snapshot(run)
    try:
        train_gpt2.train_step(run, 1)
        report["raised"] = False
    except NonFiniteLoss:
        report["raised"] = True
    report["unchanged"] = same_state(before, snapshot(run))
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))  # megabytes: too big for a queue's pipe
    end_worker()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def big_batch(data_dir):
    """The reference: one process, B=8, no accumulation."""
    model = fresh_model()
    result = train_gpt2.train_step(make_run(model, data_dir, B=8, accum=1, ctx=DistContext()), 0)
    return flat_grads(model), result


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(two_rank_worker, args=(2, free_port(), data_dir, out_dir), nprocs=2)
    return {rank: torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in (0, 1)}


def assert_same_step(grads, norm, loss, big_batch):
    ref_grads, ref = big_batch
    torch.testing.assert_close(torch.as_tensor(grads), ref_grads, rtol=1e-4, atol=1e-7)
    assert norm == pytest.approx(ref.norm, rel=1e-5)
    assert loss == pytest.approx(ref.loss, rel=1e-6)


def test_accumulated_gradient_equals_the_big_batch_gradient(data_dir, big_batch):
    """B=2 x accumulation 4 must give B=8's gradient: the loss is divided by the accumulation before
    backward(), else the gradient (and its logged norm) is 4 times too big."""
    model = fresh_model()
    result = train_gpt2.train_step(make_run(model, data_dir, B=2, accum=4, ctx=DistContext()), 0)
    assert big_batch[1].norm > 0
    assert_same_step(flat_grads(model), result.norm, result.loss, big_batch)


def test_two_ranks_accumulating_equal_the_big_batch_gradient(two_ranks, big_batch):
    for rank in (0, 1):
        r = two_ranks[rank]
        assert_same_step(r["grads"], r["norm"], r["loss"], big_batch)


def test_grad_clip_bounds_the_gradient_the_optimizer_applies(data_dir, big_batch):
    ref_grads, ref = big_batch
    clip = ref.norm / 10
    model = fresh_model()
    run = make_run(model, data_dir, B=2, accum=4, ctx=DistContext(), grad_clip=clip)
    result = train_gpt2.train_step(run, 0)
    assert result.norm == pytest.approx(ref.norm, rel=1e-5), "the logged norm is the one before clipping"
    # AdamW's first step keeps exp_avg = (1 - beta1) * gradient: the gradient the update was made from
    state = run.optimizer.state
    applied = torch.cat([state[p]["exp_avg"].flatten() / 0.1 for p in model.parameters()])
    assert applied.norm().item() == pytest.approx(clip, rel=1e-4)
    torch.testing.assert_close(applied, ref_grads * (clip / ref.norm), rtol=1e-3, atol=1e-8)


def test_nan_leaves_weights_and_optimizer_state_untouched(data_dir):
    model = fresh_model()
    run = make_run(model, data_dir, B=2, accum=4, ctx=DistContext())
    train_gpt2.train_step(run, 0)  # the optimizer has state to lose
    poison(model)
    before = snapshot(run)
    with pytest.raises(NonFiniteLoss, match="before the optimizer step"):
        train_gpt2.train_step(run, 1)
    assert same_state(before, snapshot(run))


def test_nan_on_one_rank_stops_every_rank_before_the_optimizer_step(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["raised"], f"rank {rank} went on"
        assert two_ranks[rank]["unchanged"], f"rank {rank} stepped on NaN"


def test_training_draws_nothing_from_the_global_rng(data_dir, tmp_path):
    """Checkpoints store each rank's RNG state, but nothing after the seeded init draws from it (samples
    use their own generator, the shuffle is seeded per epoch), so an exact resume does not rest on it:
    after a run with samples, evals and a shuffle the global RNG is where the init left it."""
    from test_train import tiny_config, write_hellaswag

    cfg = tiny_config(
        data_dir,
        str(tmp_path / "log"),
        max_steps=1,
        eval_every=1,
        sample_every=1,
        sample_prompt="a",
        shuffle=True,
        hellaswag=True,
        hellaswag_data=write_hellaswag(tmp_path / "h.jsonl", n=4),
    )
    train_gpt2.train(cfg, DistContext())
    after = torch.get_rng_state()
    torch.manual_seed(cfg.seed)
    GPT(config_for(cfg.model, vocab_multiple=cfg.vocab_multiple))
    assert torch.equal(after, torch.get_rng_state())
