"""The CUDA path, each part against an fp32 eager reference: the losses under bf16 autocast (eager and
compiled), compiled bf16 training, fused AdamW, HellaSwag on the GPU, DDP (two gloo processes sharing
one GPU), fp16 training, and the preferred SDPA kernel.

Every test is skipped without a GPU. tools/device_check.sh runs this file on the device machine.
Fp32 references run on the CPU, or on the GPU with TF32 off (train() turns it on for the process)."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_hellaswag import example_losses
from test_model import PADDED_VOCAB, VOCAB, perturb_, rel_err
from test_train import end_worker, final_weights, free_port, make_data, tiny_config
from torch.profiler import ProfilerActivity, profile

from gpt2lib import hellaswag_scoring
from train_gpt2 import GPT, LOSS_IMPLS, DistContext, GPTConfig, config_for, configure_optimizer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def true_fp32():
    """GPU references in real fp32: no TF32, whatever an earlier train() call set. And no compiled
    graphs left from earlier tests: GPT.forward would hit dynamo's recompile limit and run eagerly."""
    torch._dynamo.reset()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the loss: every implementation under bf16 autocast against fp32


def head_only_model(weight):
    """A GPT whose hidden_states is the identity, so that forward(x, targets) runs exactly GPT.forward's
    loss code on given (B, T, C) hidden states x through the lm_head `weight`."""
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=weight.size(1), vocab_multiple=64)).to(
        CUDA
    )
    with torch.no_grad():
        model.lm_head.weight.copy_(weight)
    model.hidden_states = lambda x: x
    return model


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("loss_impl", LOSS_IMPLS)
def test_loss_and_grads_under_bf16_autocast_match_fp32(loss_impl, compiled):
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 4596, 128  # 9192 positions: one full 8192-row chunk and a partial one
    x = torch.randn(B, T, C, generator=g)
    weight = 0.05 * torch.randn(PADDED_VOCAB, C, generator=g)
    weight[VOCAB:] = 2.0 * torch.randn(PADDED_VOCAB - VOCAB, C, generator=g)  # would dominate if they leaked
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    targets[0, 0] = VOCAB - 1
    x, weight, targets = x.to(CUDA), weight.to(CUDA), targets.to(CUDA)

    x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(x_ref, w_ref)[..., :VOCAB].reshape(-1, VOCAB), targets.reshape(-1))
    (3.0 * ref).backward()

    model = head_only_model(weight)
    run = torch.compile(model) if compiled else model
    x_in = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = run(x_in, targets, loss_impl=loss_impl)
    (3.0 * loss).backward()
    grad_w = model.lm_head.weight.grad
    assert logits is None and loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 5e-3 * ref.item(), (loss.item(), ref.item())
    assert rel_err(x_in.grad, x_ref.grad) <= 2e-2
    assert rel_err(grad_w, w_ref.grad) <= 2e-2
    assert torch.count_nonzero(grad_w[VOCAB:]) == 0


# ---- training: compiled bf16 and eager bf16 track a CPU fp32 run


def test_compiled_bf16_training_tracks_fp32_eager(tmp_path):
    data = make_data(tmp_path / "data")
    cpu = tiny_config(data, str(tmp_path / "cpu"), max_steps=8, checkpoint_every=8, eval_every=4)
    reference = train(cpu, DistContext())
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = replace(cpu, log_dir=str(tmp_path / name), device="cuda", dtype="bf16", compile=compile_)
        runs[name] = train(cfg, DistContext(device=CUDA))
    assert reference["losses"][-1] < reference["losses"][0] - 0.1  # it learns: the comparison means something
    for name, run in runs.items():
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=0, atol=1e-2, err_msg=name)
        assert run["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-2), name
    np.testing.assert_allclose(runs["compiled"]["losses"], runs["eager"]["losses"], rtol=0, atol=5e-3)


# ---- fused AdamW


def test_fused_adamw_matches_the_unfused_cpu_optimizer():
    torch.manual_seed(0)
    cpu_model = GPT(config_for("d1", vocab_multiple=64))
    gpu_model = GPT(config_for("d1", vocab_multiple=64))
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(CUDA)
    reference = configure_optimizer(cpu_model, 0.1, 1e-3, "cpu")
    fused = configure_optimizer(gpu_model, 0.1, 1e-3, "cuda")
    assert fused.defaults["fused"] and not reference.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        for p_ref, p in zip(cpu_model.parameters(), gpu_model.parameters()):
            grad = torch.randn(p_ref.shape, generator=g) * 10.0 ** -(step % 3)  # varied magnitudes
            p_ref.grad, p.grad = grad, grad.to(CUDA)
        reference.step()
        fused.step()
    initial = GPT(config_for("d1", vocab_multiple=64)).state_dict()
    for (name, p_ref), p in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        torch.testing.assert_close(p.detach().cpu(), p_ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        cpu_model.state_dict()["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"]
    )


# ---- HellaSwag on the GPU gives the CPU's counts


def synthetic_examples(n, seed=0):
    """Tokenized HellaSwag-shaped examples of random ids: contexts of 5-40 tokens, endings of 1-15."""
    rng = np.random.default_rng(seed)
    ctx = [rng.integers(0, VOCAB, int(rng.integers(5, 41))).tolist() for _ in range(n)]
    endings = [
        [rng.integers(0, VOCAB, int(rng.integers(1, 16))).tolist() for _ in range(4)] for _ in range(n)
    ]
    return hellaswag_scoring.TokenizedExamples(ctx, endings, rng.integers(0, 4, n).tolist())


def test_hellaswag_on_the_gpu_counts_like_the_cpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, vocab_multiple=64)).eval()
    perturb_(model, seed=1)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(4.0)  # spread-out logits: clear preferences between endings
    examples = synthetic_examples(200)
    ref_sum, ref_mean = example_losses(model, examples, "cpu", batch_size=16)
    top2 = ref_mean.sort(1).values
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4  # no near-ties that rounding could flip
    cpu_counts = hellaswag_scoring.evaluate(model, examples, "cpu", batch_size=16)
    model.to(CUDA)
    fp32_counts = hellaswag_scoring.evaluate(
        model, examples, CUDA, batch_size=64, autocast_dtype=torch.float32
    )
    assert fp32_counts.tolist() == cpu_counts.tolist()
    gpu_sum, gpu_mean = example_losses(model, examples, CUDA, autocast_dtype=torch.float32)
    assert torch.allclose(gpu_sum, ref_sum, atol=1e-3, rtol=1e-5)
    # bf16 (the default on CUDA): the same choice wherever the fp32 margin is clear of bf16's rounding
    bf16_sum, bf16_mean = example_losses(model, examples, CUDA)
    clear = top2[:, 1] - top2[:, 0] > 0.25  # bf16 moved the mean losses by under 0.02 on the CPU
    assert clear.sum() > 100
    assert torch.equal(bf16_mean.argmin(1)[clear], ref_mean.argmin(1)[clear])
    assert rel_err(bf16_sum, ref_sum) <= 2e-2


# ---- DDP: two gloo processes on one GPU equal one process with twice the accumulation


def ddp_worker(rank, world_size, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    train(cfg, DistContext(rank=rank, local_rank=0, world_size=world_size, device=CUDA))
    end_worker()


def test_two_ranks_on_one_gpu_match_one_rank(tmp_path):
    data = make_data(tmp_path / "data")
    single = tiny_config(
        data, str(tmp_path / "single"), device="cuda", max_steps=4, checkpoint_every=4, eval_every=0
    )
    train(single, DistContext(device=CUDA))  # accumulates 4 micro-steps
    double = replace(single, log_dir=str(tmp_path / "double"))  # 2 ranks x 2 micro-steps
    mp.spawn(ddp_worker, args=(2, free_port(), double), nprocs=2)
    a, b = final_weights(single.log_dir, 4), final_weights(double.log_dir, 4)
    initial = GPT(config_for("d1", vocab_multiple=64)).state_dict()
    assert not torch.equal(
        a["transformer.h.0.attn.c_attn.weight"], initial["transformer.h.0.attn.c_attn.weight"]
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0, msg=key)


# ---- fp16 with loss scaling


def test_fp16_training_tracks_fp32_and_stays_finite(tmp_path):
    data = make_data(tmp_path / "data")
    cpu = tiny_config(data, str(tmp_path / "fp32"), max_steps=10, checkpoint_every=2, eval_every=0)
    reference = train(cpu, DistContext())
    linear_dtypes = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor) and output.is_cuda:
            linear_dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        fp16 = train(
            replace(cpu, log_dir=str(tmp_path / "fp16"), device="cuda", dtype="fp16"),
            DistContext(device=CUDA),
        )
    finally:
        hook.remove()
    assert linear_dtypes == {torch.float16}  # the matmuls really ran in fp16
    losses = np.array(fp16["losses"])
    assert len(losses) == 10 and np.isfinite(losses).all()
    # loose: the loss scaler may skip a step whose scaled gradients overflowed
    np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=0.25)
    assert losses[-1] < losses[0] - 0.1
    checkpoints = sorted(n for n in os.listdir(tmp_path / "fp16") if n.endswith(".pt"))
    assert len(checkpoints) == 5
    for name in checkpoints:
        weights = torch.load(tmp_path / "fp16" / name, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values()), name


# ---- the preferred SDPA kernel runs, eager and compiled, and matches fp32 math attention


@pytest.mark.parametrize(
    "backend,kernel",
    [
        ("cudnn", "aten::_scaled_dot_product_cudnn_attention"),
        ("flash", "aten::_scaled_dot_product_flash_attention"),
    ],
)
def test_preferred_sdpa_kernel_runs_and_matches_fp32(backend, kernel):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=128, vocab_multiple=64)).to(CUDA).eval()
    idx = torch.randint(0, VOCAB, (4, 256), device=CUDA)
    model.set_sdpa_backend("math")
    with torch.no_grad():
        reference = model(idx)[0]
    model.set_sdpa_backend(backend)
    for run in (model, torch.compile(model)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            run(idx)  # compiles, warms up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                logits = run(idx)[0]
        ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
        assert kernel in ops, (run is model, ops)
        assert rel_err(logits.float(), reference) <= 3e-2
