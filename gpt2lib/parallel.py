"""Sharded training with FSDP2 (--fsdp): sharding a model across the ranks, loading full (unsharded)
state into it, gathering its full weights for evals, and counting the bytes each rank holds.

DDP keeps a full copy of the weights, gradients and AdamW moments on every rank: 16 bytes a parameter
in fp32. FSDP2's `fully_shard` keeps 1/world of each on every rank and all-gathers one unit's weights
just before that unit runs (forward, and again in backward); gradients are reduce-scattered, so each
rank ends a step with the gradient of its own shard only. The model's state_dict keys stay the same.
torch.distributed.fsdp is imported inside the functions: importing this module does no heavy work."""

import contextlib

import torch

from gpt2lib import optimizers
from gpt2lib.common import UserError


def shard_model(model, device, param_dtype=None):
    """Shard `model` (a train_gpt2.GPT, already on `device`) in place across the default process group:
    each Block is one FSDP unit, the root holds the rest (wte, wpe, ln_f and lm_head, whose weight is
    wte's: the tied weight stays one parameter in one unit). With param_dtype (bf16 on CUDA) the
    all-gathered weights that compute are cast to it, while the sharded fp32 weights stay the master
    copy the optimizer updates, and gradients are reduced in fp32. Returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_units(model):
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def full_weights(model):
    """Inside the block every rank holds the full weights of a sharded model, so forwards need no
    collectives and the ranks may run different numbers of them (each rank's share of HellaSwag,
    rank 0's samples). Every rank must enter it (the gather is a collective). A no-op unsharded."""
    if not is_sharded(model):
        yield
        return
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()  # all-gather; forwards inside find the unit unsharded and gather nothing
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_norm(norm):
    """clip_grad_norm_ over sharded (DTensor) gradients returns a DTensor: its value over all shards."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def named_optimizer_state(model, optimizer, state):
    """An optimizer.state_dict() of an unsharded model (states keyed by parameter index) keyed by
    parameter name instead, as torch.distributed.checkpoint.state_dict expects. `optimizer` holds the
    same parameters in the same order (train_gpt2.configure_optimizer builds both)."""
    names = {param: name for name, param in model.named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    saved_order = [index for group in state["param_groups"] for index in group["params"]]
    by_index = dict(zip(saved_order, order))
    return {
        "state": {by_index[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [by_index[index] for index in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_full_state(model, optimizer, model_state, optimizer_state=None):
    """Load full (unsharded) weights and, when given, a full optimizer.state_dict() into a sharded
    model and its optimizer: each rank keeps its shard. Every rank passes the same full state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(
            model,
            optimizers.parts(optimizer),
            named_optimizer_state(model, optimizer, optimizer_state),
            options=options,
        )


def local_bytes(tensor):
    """Bytes this rank holds for a tensor: its local shard for a DTensor."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def state_bytes(model, optimizer):
    """{"params", "grads", "optimizer"}: bytes this rank holds for each, the tied weight counted once."""
    params = list(model.parameters())
    optimizer_tensors = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(t) for t in optimizer_tensors),
    }


def wrap_model(raw_model, cfg, dist_ctx):
    """What trains: compiled (on CUDA unless --no-compile), then DDP-wrapped under torchrun (unless
    --fsdp sharded it: see setup_model)."""
    use_compile = cfg.compile if cfg.compile is not None else dist_ctx.device.type == "cuda"
    model = torch.compile(raw_model) if use_compile else raw_model
    if dist_ctx.ddp and not cfg.fsdp:
        device_ids = [dist_ctx.local_rank] if dist_ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, use_compile


def shard_for_training(model, precision, device):
    """--fsdp: shard the model (see shard_model), computing in bf16 on CUDA when the run's dtype is
    bf16. fp16 is refused: its loss scaler is not sharded."""
    if precision.name == "fp16":
        raise UserError(
            "--fsdp trains in bf16 or fp32, not fp16 (its loss scaler is not sharded): "
            "pass --dtype bf16 or --dtype fp32"
        )
    compute_dtype = precision.dtype if device.type == "cuda" and precision.name == "bf16" else None
    shard_model(model, device, param_dtype=compute_dtype)
