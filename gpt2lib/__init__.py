"""The machinery that train_gpt2.py, hellaswag.py, fineweb.py and tools/ share, one module per job:

    common             errors, atomic writes, the offline GPT-2 tokenizer, device and precision
    losses             cross-entropy through the lm_head without holding the (B, T, vocab) logits
    hf                 HuggingFace directories in and out: key mapping, config, tokenizer export
    shards             token shard files: naming and opening (build-nanogpt's .npy, llm.c's .bin)
    checkpoints        checkpoint files, whole or sharded: writing, reading back verified, listing
    resume             which checkpoint a run resumes (across nodes), the resume checks, restoring state
    rundir             one writer per directory (the lock, checked before each write), leftovers
    previous_runs      other runs' files in a log dir set aside into previous_N/, logs trimmed to the
                       resume point
    runlog             log.txt and metrics.jsonl, and the trackers they feed
    run_state          the Start every rank receives and the Run a training run holds
    distributed        process groups, each torchrun attempt's store, rank-0 decisions shared with every rank
    parallel           FSDP2 sharding, DDP/compile wrapping, full weights for evals and samples
    optimizers         --optimizer muon: torch's Muon for the blocks' matrices, AdamW for the rest, as
                       one optimizer
    evals              val loss and HellaSwag during training
    step_metrics       the step's timer and metrics, the --benchmark summary
    flops              FLOPs per token and GPU peak FLOP/s, for MFU
    sampling           KV-cache generation and the printed samples
    tracking           W&B and TensorBoard: every metrics.jsonl row, rank 0 only, optional packages
    hellaswag_data     HellaSwag's jsonl: download, validation, reading
    hellaswag_scoring  HellaSwag tokenization, batching and scoring (training and hellaswag.py)

The package offers services that take instances and plain values: it never receives a class or
function of a script (DistContext.decide and on_every_rank run a caller's function on the ranks
they name, which is their job).

Only the scripts import this package; it never imports a script, and no two of its modules
import each other both ways. Importing any of it does no heavy work (transformers, tiktoken,
datasets, wandb and tensorboard load on first use).
"""
