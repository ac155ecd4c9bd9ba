"""How a run starts, once rank 0 (or the rank holding the newest checkpoint) has decided: the Start
every rank receives, the checks that a checkpoint belongs to this run, the wsd cooldown a resume
keeps, loading a checkpoint into this rank's model, optimizer, data position and RNG, and the
HellaSwag data read once on rank 0. Works on train_gpt2's config and model without importing it."""

import os
from dataclasses import dataclass, replace

from gpt2lib import checkpoints, parallel, resume
from gpt2lib.common import Precision, UserError
from gpt2lib.distributed import DistContext, FollowerStop
from gpt2lib.hellaswag_data import load_examples
from gpt2lib.hellaswag_scoring import check_fits, tokenize_examples


@dataclass
class Start:
    """What a run starts from, decided on one rank and sent to every rank by DistContext.decide."""
    config: dict  # GPTConfig's fields
    checkpoint: dict | None  # the checkpoint of this run to resume, or None
    weights: dict | None  # --init-from's state_dict, or None: a seeded init (or the checkpoint's weights)
    run_id: str  # the same for every checkpoint of a run, across resumes
    logs: dict | None = None  # the run log, when the checkpoint comes from another node than rank 0's


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd")


def shape_text(config):
    return f"{config['n_layer']} layers, {config['n_head']} heads, width {config['n_embd']}"


def same_source(a, b):
    return os.path.normpath(a) == os.path.normpath(b) if a and b else a == b


def origin_text(init_from):
    return f"--init-from {init_from}" if init_from else "scratch (no --init-from)"


def cooldown_start(max_steps, cooldown_steps):
    """The first step of wsd's cooldown; --cooldown-steps 0 means 20% of --max-steps."""
    return max_steps - (cooldown_steps or max_steps // 5)


def schedule_config(cfg, checkpoint):
    """cfg with the wsd cooldown fixed, so that the lr of the steps a resumed checkpoint already
    trained never changes. A checkpoint of the stable phase continues it under a larger --max-steps,
    and under a smaller one the cooldown starts at the checkpoint at the earliest. A checkpoint
    already in its cooldown keeps that cooldown: another --max-steps is refused."""
    if cfg.eval_only:  # no step is trained
        return cfg
    past = (checkpoint or {}).get("train_config") or {}
    if checkpoint is not None and past.get("lr_schedule", "cosine") != cfg.lr_schedule:
        raise UserError(f"the checkpoint at step {checkpoint['step']} was trained with --lr-schedule "
                        f"{past.get('lr_schedule', 'cosine')}, not {cfg.lr_schedule}: pass the same --lr-schedule, "
                        "or --resume none")
    if cfg.lr_schedule != "wsd":
        return cfg
    start = cooldown_start(cfg.max_steps, cfg.cooldown_steps)
    if checkpoint is not None:
        step, past_start = checkpoint["step"], cooldown_start(past["max_steps"], past["cooldown_steps"])
        if step <= past_start:
            start = max(start, step)
        elif cfg.max_steps != past["max_steps"]:
            raise UserError(f"the checkpoint at step {step} is in the cooldown that started at step {past_start}: "
                            f"resume it with --max-steps {past['max_steps']}, or resume a checkpoint of the stable phase")
        else:  # the cooldown under way goes on as it started, whatever --cooldown-steps says now
            start = past_start
    return replace(cfg, cooldown_steps=cfg.max_steps - start)


def agree_on_start(cfg, dist_ctx, choose_start, layout):
    """Every node reports its newest checkpoint; the newest of all is read by the rank that holds it
    and sent to every rank (resume.find_holder). Then rank 0, which writes checkpoints and logs from
    now on, sets its log dir up, with the holder's logs when the checkpoint came from another node.
    choose_start(holder) builds the Start on the holder; layout checks a checkpoint's weights."""
    holder = resume.find_holder(cfg.resume, cfg.log_dir, layout, dist_ctx)
    start = dist_ctx.decide(lambda: choose_start(holder), src=holder.rank if holder else 0)
    resume_step = start.checkpoint["step"] if start.checkpoint else None
    if holder is not None and holder.rank != 0 and dist_ctx.master_process:
        logs = f"; its logs continue in this node's {cfg.log_dir}" if start.logs is not None else ""
        print(f"resuming from another node: {holder.host} (rank {holder.rank}) holds the newest checkpoint, "
              f"{holder.path} at step {resume_step}{logs}")
    here = holder.path if holder is not None and holder.rank == 0 else None
    dist_ctx.decide(lambda: checkpoints.prepare_run_dir(cfg.log_dir, here, resume_step, start.logs))
    return start


def restore(checkpoint, raw_model, optimizer, precision, train_loader, dist_ctx):
    """Load a checkpoint's model into this process and, when it trains (an optimizer is given), its
    optimizer, loss scale, data position and RNG. Sharded or not, a checkpoint loads into a model
    sharded by --fsdp or not, at any world size."""
    if "sharded" in checkpoint:  # a directory: every rank reads its part; a failed read stops every rank
        dist_ctx.on_every_rank(lambda: checkpoints.load_sharded(checkpoint["sharded"], raw_model, optimizer))
    elif parallel.is_sharded(raw_model):  # a .pt under --fsdp: every rank keeps its shard of the full state
        parallel.load_full_state(raw_model, optimizer, checkpoint["model"], checkpoint["optimizer"])
    else:
        raw_model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
    if optimizer is None:  # --eval-only
        return checkpoint["step"]
    if checkpoint.get("scaler"):
        precision.scaler.load_state_dict(checkpoint["scaler"])
    # every rank's state is stored; with another world size the (global) data position still holds
    same_world = len(checkpoint["loader"]) == dist_ctx.world_size
    train_loader.load_state_dict(checkpoint["loader"][dist_ctx.rank if same_world else 0])
    checkpoints.set_rng_state(checkpoint["rng"][dist_ctx.rank if same_world else 0], dist_ctx.device)
    return checkpoint["step"]


def check_shared_log_dir(log_dir, dist_ctx):
    """Every rank writes its shards of a --fsdp checkpoint into log_dir: all ranks must see the same
    directory. Said at start, on every rank, rather than found out at the first resume."""
    probe = dist_ctx.decide(lambda: checkpoints.write_probe(log_dir))
    blind = [rank for rank, seen in enumerate(dist_ctx.gather_objects(os.path.exists(probe))) if not seen]
    dist_ctx.decide(lambda: checkpoints.remove_probe(probe))
    if blind:
        message = (f"--fsdp: rank(s) {', '.join(map(str, blind))} do not see --log-dir {log_dir} as rank 0 does: "
                   "sharded checkpoints need a log dir on a filesystem every node shares (or train without --fsdp)")
        raise UserError(message) if dist_ctx.master_process else FollowerStop(message)


def load_hellaswag(data_path, context_length):
    """Tokenized HellaSwag val examples, or None (with a warning) when the data is unavailable or
    holds a row longer than the model's context. Runs on rank 0 only: one download, and the
    examples are sent to the other ranks."""
    try:
        examples = tokenize_examples(load_examples("val", data_path=data_path))
        check_fits(examples, context_length)
        return examples
    except UserError as e:
        print(f"warning: HellaSwag eval is off: {e}")
        return None


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
    log: checkpoints.RunLog
    grad_accum_steps: int
    gpu_peak_flops: float | None  # for MFU; None off CUDA or on an unknown GPU
    start_step: int
    val_loss: float | None
    run_id: str
    counts: dict  # clipped_steps and skipped_steps so far, kept in checkpoints
    save_group: object = None  # --async-checkpoint: the process group its background writes use
    pending_save: tuple | None = None  # (partial directory, Future or None, completion): see save


def make_loaders(cfg, dist_ctx, DataLoaderLite):
    """This rank's train and val loaders. Every rank reads its own --data-dir (nodes need not share
    a filesystem), so all ranks check that they see the same shards as rank 0. DataLoaderLite is
    train_gpt2's class."""
    loader_args = dict(B=cfg.batch_size, T=cfg.seq_len, process_rank=dist_ctx.rank,
                       num_processes=dist_ctx.world_size, data_root=cfg.data_dir, device=dist_ctx.device)

    def open_loaders():
        train_loader = None if cfg.eval_only else \
            DataLoaderLite(split="train", shuffle_seed=cfg.seed if cfg.shuffle else None,
                           block_tokens=cfg.total_batch_size if cfg.shuffle else None, **loader_args)
        val_loader = DataLoaderLite(split="val", **loader_args) if cfg.eval_every or cfg.eval_only else None
        return train_loader, val_loader

    train_loader, val_loader = dist_ctx.on_every_rank(open_loaders)
    seen = [([os.path.basename(p) for p in loader.shards], loader.shard_lengths)
            for loader in (train_loader, val_loader) if loader is not None]
    rank0_seen = dist_ctx.gather_objects(seen)[0]

    def check_same_shards():
        if seen != rank0_seen:
            raise UserError(f"the shards in {cfg.data_dir} differ from rank 0's (names or lengths): "
                            "give every node the same data")

    dist_ctx.on_every_rank(check_same_shards)
    return train_loader, val_loader


def check_model_flag(config, source, cfg, model_config):
    """An explicit --model must have the shape of the model that `source` brings. model_config(name,
    **fields): GPTConfig's fields as a dict, of a size name, or of the fields given when name is None."""
    if not cfg.model:
        return
    wanted = model_config(cfg.model)
    if any(wanted[k] != config[k] for k in SHAPE_FIELDS):
        raise UserError(f"--model {cfg.model} ({shape_text(wanted)}) conflicts with {source} ({shape_text(config)}): "
                        f"leave --model out, the shape comes from {source}")


def check_resumable(path, checkpoint, cfg, model_config, default_model):
    """Resume only a checkpoint of this run: one started from the same --init-from (or from scratch),
    with the same model (model_config: see check_model_flag)."""
    started_from = (checkpoint.get("train_config") or {}).get("init_from", "")
    if not same_source(started_from, cfg.init_from):
        raise UserError(f"{path} is a run started from {origin_text(started_from)}, not from "
                        f"{origin_text(cfg.init_from)}: pass the same --init-from, another --log-dir, or --resume none")
    schedule_config(cfg, checkpoint)
    config = model_config(None, **checkpoint["config"])
    if not cfg.init_from:
        expected = model_config(cfg.model or default_model, vocab_multiple=cfg.vocab_multiple)
        if config != expected:
            raise UserError(f"the checkpoint's model {config} differs from --model's {expected}: "
                            "pass the same --model and --vocab-multiple, or --resume none")
        return config
    check_model_flag(config, path, cfg, model_config)
    if config["vocab_multiple"] != cfg.vocab_multiple:
        raise UserError(f"{path} pads its vocabulary to a multiple of {config['vocab_multiple']}, not "
                        f"{cfg.vocab_multiple}: pass the same --vocab-multiple, or --resume none")
    return config


def print_schedule(cfg):
    """One line at start for a wsd run: where its stable phase ends and how it cools down."""
    if cfg.lr_schedule == "wsd" and not cfg.eval_only:
        print(f"lr schedule wsd: warmup {cfg.warmup_steps} steps, lr {cfg.lr:g} until step "
              f"{cfg.max_steps - cfg.cooldown_steps}, {cfg.cooldown_shape} cooldown to {cfg.lr * cfg.min_lr_ratio:g} "
              f"at step {cfg.max_steps}")
