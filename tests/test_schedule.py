"""--lr-schedule wsd: its formula, and a finished or running wsd run extended or shortened on resume
without changing the lr of any step already trained, resuming bitwise."""

import json
import math
import os
from dataclasses import asdict, replace

import pytest
import torch
from test_train import final_weights, install_stop_after, logged, make_data, tiny_config

import train_gpt2
from train_gpt2 import DistContext, TrainConfig, UserError, get_lr, schedule_config, train


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_values_follow_warmup_hold_and_cooldown(shape):
    cfg = TrainConfig(
        lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, lr_schedule="wsd", cooldown_shape=shape
    )
    decay = (lambda p: p) if shape == "linear" else math.sqrt
    expected = {
        0: 0.1,
        9: 1.0,
        10: 1.0,
        79: 1.0,
        80: 1.0,
        90: 0.1 + 0.9 * (1 - decay(0.5)),
        99: 0.1 + 0.9 * (1 - decay(19 / 20)),
        100: 0.1,
        500: 0.1,
    }  # default cooldown: the last 20 steps
    assert {s: get_lr(s, cfg) for s in expected} == pytest.approx(expected)
    explicit = replace(cfg, cooldown_steps=50)
    assert get_lr(49, explicit) == 1.0 and get_lr(75, explicit) == pytest.approx(0.1 + 0.9 * (1 - decay(0.5)))


def metrics_lr(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["lr"] for r in map(json.loads, f) if r["kind"] == "train"}


def stopped_run(cfg, steps):
    original = install_stop_after(steps)
    try:
        train(cfg, DistContext())
    finally:
        train_gpt2.train_step = original


@pytest.mark.parametrize("change", ["extend", "shorten"])
def test_resuming_with_another_max_steps_keeps_the_past_lr_and_is_bitwise(tmp_path, change):
    """extend: a run planned for 8 steps, stopped at 4 (stable phase) and resumed for 12, equals an
    uninterrupted 12-step run. shorten: a 12-step run stopped at 6 and resumed for 8 steps with a
    4-step cooldown (which would have started at 4, in its past) cools down from 6: it equals an
    uninterrupted 8-step run whose cooldown is the last 2 steps."""
    data_dir = make_data(tmp_path / "data")
    base = tiny_config(
        data_dir,
        str(tmp_path / "cut"),
        lr_schedule="wsd",
        eval_every=0,
        checkpoint_every=100,
        total_batch_size=32,
        warmup_steps=2,
        resume="auto",
    )
    first, stop_at, resumed, reference = {
        "extend": (dict(max_steps=8), 4, dict(max_steps=12), dict(max_steps=12)),
        "shorten": (
            dict(max_steps=12),
            6,
            dict(max_steps=8, cooldown_steps=4),
            dict(max_steps=8, cooldown_steps=2),
        ),
    }[change]
    stopped_run(replace(base, **first), stop_at)
    planned = metrics_lr(base.log_dir)
    train(replace(base, **resumed), DistContext())
    ref = replace(base, log_dir=str(tmp_path / "ref"), resume="none", **reference)
    train(ref, DistContext())
    got = metrics_lr(base.log_dir)
    assert {s: got[s] for s in planned} == planned  # the steps already trained keep their lr
    assert got == metrics_lr(ref.log_dir) and logged(base.log_dir) == logged(ref.log_dir)  # bitwise
    assert got[stop_at] == base.lr  # the resume point is still at the held lr...
    assert got[max(got)] < base.lr  # ...and the run cools down at its (new) end
    a, b = (final_weights(d, max(got) + 1) for d in (base.log_dir, ref.log_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_in_its_cooldown_or_of_another_schedule_is_refused():
    past = asdict(TrainConfig(lr_schedule="wsd", max_steps=100, cooldown_steps=20))
    in_cooldown = {"step": 90, "train_config": past}
    cfg = TrainConfig(lr_schedule="wsd", max_steps=100)
    assert schedule_config(cfg, in_cooldown).cooldown_steps == 20  # the same command resumes
    assert (
        schedule_config(replace(cfg, cooldown_steps=30), in_cooldown).cooldown_steps == 20
    )  # the cooldown goes on
    with pytest.raises(UserError, match="in the cooldown that started at step 80"):
        schedule_config(replace(cfg, max_steps=200), in_cooldown)
    with pytest.raises(UserError, match="trained with --lr-schedule wsd, not cosine"):
        schedule_config(replace(cfg, lr_schedule="cosine"), in_cooldown)
    assert (
        schedule_config(replace(cfg, max_steps=200), {"step": 50, "train_config": past}).cooldown_steps == 40
    )
