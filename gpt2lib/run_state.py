"""The records a training run is built from: the Start every rank receives (what the run starts from,
decided on one rank) and the Run, everything a training run holds."""

from dataclasses import dataclass

from gpt2lib.common import Precision
from gpt2lib.distributed import DistContext
from gpt2lib.runlog import RunLog


@dataclass
class Start:
    """What a run starts from, decided on one rank and sent to every rank by DistContext.decide."""

    config: dict  # GPTConfig's fields
    checkpoint: dict | None  # the checkpoint of this run to resume, or None
    weights: dict | None  # --init-from's state_dict, or None: a seeded init (or the checkpoint's weights)
    run_id: str  # the same for every checkpoint of a run, across resumes
    logs: dict | None = None  # the run log, when the checkpoint comes from another node than rank 0's


@dataclass
class Run:
    """Everything a training run holds. `model` is what trains: compiled and DDP-wrapped as
    configured; `raw_model` is the same parameters without wrappers, for evals with new shapes,
    sampling and checkpoints (so they never recompile and never see key prefixes)."""

    cfg: object  # train_gpt2.TrainConfig
    dist_ctx: DistContext
    raw_model: object  # train_gpt2.GPT
    model: object
    optimizer: object  # None with --eval-only
    precision: Precision
    train_loader: object  # train_gpt2.DataLoaderLite; None with --eval-only
    val_loader: object
    hella_examples: object  # gpt2lib.hellaswag_scoring.TokenizedExamples, or None when HellaSwag is off
    log: RunLog
    grad_accum_steps: int
    gpu_peak_flops: float | None  # for MFU; None off CUDA or on an unknown GPU
    start_step: int
    val_loss: float | None
    run_id: str
    counts: dict  # clipped_steps and skipped_steps so far, kept in checkpoints
    save_group: object = None  # --async-checkpoint: the process group its background writes use
    pending_save: tuple | None = None  # (partial directory, Future or None, completion): see save
