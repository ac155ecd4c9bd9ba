"""Every loss formulation (GPT.forward's loss_impl) against plain F.cross_entropy on the cropped
full logits, and the SDPA backend setting against PyTorch's default kernel choice. CPU, fp32.

The GPU side (bf16 autocast, compiled, cuDNN attention) is in test_cuda.py."""

import pytest
import torch
import torch.nn.functional as F
from test_model import PADDED_VOCAB, VOCAB, perturb_, rel_err
from torch.profiler import ProfilerActivity, profile

import train_gpt2
from train_gpt2 import GPT, LOSS_IMPLS, SDPA_BACKENDS, GPTConfig, chunked_cross_entropy


def model_and_batch(vocab_multiple, seed=0):
    """A perturbed one-layer model (padded rows large enough to dominate any softmax they leak
    into) and a (3, 5) batch whose targets include the last real id."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_multiple=vocab_multiple))
    perturb_(model, seed=seed + 100)
    if vocab_multiple > 1:
        with torch.no_grad():
            model.transformer.wte.weight[VOCAB:] = 20.0 * torch.randn(PADDED_VOCAB - VOCAB, 32)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randint(0, VOCAB, (3, 5), generator=g)  # B*T = 15: chunks of 7 leave a remainder of 1
    y = torch.randint(0, VOCAB, (3, 5), generator=g)
    y[0, 0] = VOCAB - 1
    return model, x, y


def reference_loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    logits = model.lm_head(model.hidden_states(x))[..., :VOCAB]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
    (2.5 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_matches_reference(loss, grads, ref_loss, ref_grads, vocab_multiple):
    assert ref_loss.item() > 1.0
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    if vocab_multiple > 1:
        assert torch.count_nonzero(grads["transformer.wte.weight"][VOCAB:]) == 0  # padded rows learn nothing


@pytest.mark.parametrize("vocab_multiple", [1, 64])
@pytest.mark.parametrize("loss_impl", LOSS_IMPLS)
def test_every_loss_impl_equals_full_logits_loss_and_grads(loss_impl, vocab_multiple):
    model, x, y = model_and_batch(vocab_multiple)
    ref_loss, ref_grads = reference_loss_and_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y, loss_impl=loss_impl)
    assert logits is None
    (2.5 * loss).backward()
    assert_matches_reference(
        loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters()},
        ref_loss,
        ref_grads,
        vocab_multiple,
    )


@pytest.mark.parametrize("vocab_multiple", [1, 64])
@pytest.mark.parametrize("loss_impl", ["chunked", "fused"])
@pytest.mark.parametrize("chunk_size", [7, 4])  # remainders of 1 and 3; one chunk: the test above
def test_chunked_impls_with_uneven_chunks(loss_impl, vocab_multiple, chunk_size):
    model, x, y = model_and_batch(vocab_multiple, seed=1)
    ref_loss, ref_grads = reference_loss_and_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(x)
    loss = chunked_cross_entropy(
        h, model.lm_head.weight, y, VOCAB, chunk_size=chunk_size, loss_impl=loss_impl
    )
    (2.5 * loss).backward()
    assert_matches_reference(
        loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters()},
        ref_loss,
        ref_grads,
        vocab_multiple,
    )


@pytest.mark.parametrize("loss_impl", ["chunked", "fused"])
def test_compiled_chunked_loss_equals_full_logits(loss_impl):
    """The loss function alone through torch.compile (inductor on the CPU), forward and backward."""
    model, x, y = model_and_batch(64, seed=2)
    ref_loss, _ = reference_loss_and_grads(model, x, y)
    h = model.hidden_states(x).detach().requires_grad_()
    weight = model.lm_head.weight.detach().clone().requires_grad_()
    compiled = torch.compile(chunked_cross_entropy, fullgraph=True)  # fullgraph: a graph break is an error
    loss = compiled(h, weight, y, VOCAB, chunk_size=7, loss_impl=loss_impl)
    (2.5 * loss).backward()
    # the reference for the loss function alone: both inputs as leaves (the model ties lm_head to wte)
    h_ref, weight_ref = h.detach().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h_ref, weight_ref)[..., :VOCAB].reshape(-1, VOCAB), y.reshape(-1))
    (2.5 * ref).backward()
    assert abs(ref.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert rel_err(h.grad, h_ref.grad) <= 1e-5
    assert rel_err(weight.grad, weight_ref.grad) <= 1e-5
    assert torch.count_nonzero(weight.grad[VOCAB:]) == 0


def test_unknown_loss_impl_is_refused():
    model, x, y = model_and_batch(1)
    with pytest.raises(ValueError, match="unknown chunked loss 'fast'"):
        model(x, y, loss_impl="fast")


# -----------------------------------------------------------------------------
# SDPA backend: a model-level setting


def attention_ops(model, x):
    """Names of the aten SDPA kernels a forward pass ran."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(x)[0]
    return out, {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_forcing_the_math_backend_gives_the_default_output():
    model, x, _ = model_and_batch(64, seed=3)
    keys = list(model.state_dict())
    default_out, default_ops = attention_ops(model, x)
    model.set_sdpa_backend("math")
    math_out, math_ops = attention_ops(model, x)
    assert math_ops == {"aten::_scaled_dot_product_attention_math"}
    assert default_ops and default_ops != math_ops  # the setting changed the kernel, not just the label
    assert rel_err(math_out, default_out) <= 1e-5
    assert list(model.state_dict()) == keys and list(model.buffers()) == []
    model.set_sdpa_backend("default")
    assert attention_ops(model, x)[1] == default_ops


def test_unknown_sdpa_backend_is_refused():
    model, _, _ = model_and_batch(1)
    assert set(SDPA_BACKENDS) == {"default", "cudnn", "flash", "efficient", "math"}
    with pytest.raises(ValueError, match="unknown SDPA backend 'fastest'"):
        model.set_sdpa_backend("fastest")
    assert train_gpt2.sdpa_priority("cudnn")[0] == torch.nn.attention.SDPBackend.CUDNN_ATTENTION
