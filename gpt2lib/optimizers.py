"""--optimizer muon: torch.optim.Muon for the transformer blocks' matrices and AdamW for the rest,
stepped as one optimizer.

Muon orthogonalizes each 2-D update (Newton-Schulz in bf16), so it takes only the blocks' weight
matrices, in nn.Linear's (out, in) layout: attn.c_attn (q, k and v as one matrix), attn.c_proj,
mlp.c_fc and mlp.c_proj. The embeddings (wte, tied to the lm_head, and wpe), the LayerNorm gains and
every bias stay on AdamW, as in Muon's documentation, modded-nanogpt and nanochat.

MuonAdamW holds the two and behaves as one optimizer where the project uses one: train_step sets
each param group's lr, GradScaler unscales and steps it, and its state_dict() has a single optimizer's
layout (parameters numbered on from AdamW's into Muon's, in param_groups order), so checkpoints keep
their format. torch.distributed.checkpoint takes the two torch optimizers themselves (parts())."""

import torch

MUON_GROUP = "muon"  # a param group key: True on Muon's groups (train_step's lr, the checkpoint checks)
ADAMW_STATE = ("exp_avg", "exp_avg_sq")
MUON_STATE = ("momentum_buffer",)


def is_muon_parameter(name, param):
    """Whether a parameter (named as in GPT.named_parameters) goes to Muon: a block's weight matrix."""
    return name.startswith("transformer.h.") and name.endswith(".weight") and param.dim() == 2


def state_names(group):
    """The per-parameter state a param group's optimizer keeps once it has stepped."""
    return MUON_STATE if group.get(MUON_GROUP) else ADAMW_STATE


def parts(optimizer):
    """The torch optimizers behind `optimizer`, for torch.distributed.checkpoint's state_dict API."""
    return list(optimizer.parts) if isinstance(optimizer, MuonAdamW) else [optimizer]


class MuonAdamW:
    """AdamW and Muon over disjoint parameters, as one optimizer: param_groups (AdamW's, then Muon's:
    the same dicts, so setting a group's lr sets it in the optimizer that owns it), state, zero_grad,
    step, state_dict and load_state_dict."""

    def __init__(self, adamw, muon):
        self.adamw, self.muon = adamw, muon
        self.parts = (adamw, muon)

    @property
    def param_groups(self):
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self):
        return {**self.adamw.state, **self.muon.state}

    def zero_grad(self, set_to_none=True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self):
        for part in self.parts:
            part.step()

    def state_dict(self):
        """One optimizer's state_dict: Muon's parameters numbered on after AdamW's."""
        merged, offset = {"state": {}, "param_groups": []}, 0
        for part in self.parts:
            state = part.state_dict()
            merged["state"].update({offset + index: value for index, value in state["state"].items()})
            merged["param_groups"] += [
                {**group, "params": [offset + index for index in group["params"]]}
                for group in state["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in part.param_groups)
        return merged

    def load_state_dict(self, state):
        """Each part takes its own groups (AdamW's come first) and the state of their parameters."""
        groups = state["param_groups"]
        for part in self.parts:
            own, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            indices = {index for group in own for index in group["params"]}
            part.load_state_dict(
                {
                    "state": {index: value for index, value in state["state"].items() if index in indices},
                    "param_groups": own,
                }
            )
        if groups:
            raise ValueError(
                f"the optimizer state has {len(groups)} param group(s) more than AdamW's and Muon's"
            )


def muon_adamw(model, weight_decay, lr, fused, muon_lr, muon_momentum, muon_weight_decay):
    """Muon (lr muon_lr) for the blocks' matrices, AdamW (lr, with weight decay on wte and wpe only)
    for the rest. Muon's "original" lr adjustment scales each matrix's step by sqrt(max(1, out/in)),
    so that its update's RMS does not depend on the matrix's aspect ratio."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if is_muon_parameter(name, p)]
    rest = [p for name, p in named if not is_muon_parameter(name, p)]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=fused,
    )
    muon = torch.optim.Muon(
        [{"params": hidden, MUON_GROUP: True}],
        lr=muon_lr,
        momentum=muon_momentum,
        weight_decay=muon_weight_decay,
        nesterov=True,
        adjust_lr_fn="original",
    )
    return MuonAdamW(adamw, muon)
