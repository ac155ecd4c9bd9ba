"""The machinery that train_gpt2.py, hellaswag.py, fineweb.py and tools/ share, one module per job:

    common          errors, atomic writes, the offline GPT-2 tokenizer, device and precision
    losses          cross-entropy through the lm_head without holding the (B, T, vocab) logits
    hf              HuggingFace directories in and out: key mapping, config, tokenizer export
    shards          token shard files: naming and opening (build-nanogpt's .npy, llm.c's .bin)
    checkpoints     checkpoint files (checksum, structure checks), the resume choice, other runs set aside, the run log
    rundir          one writer per directory: the OS lock on --log-dir and --out, leftovers of killed writers
    distributed     process groups, each torchrun attempt's store, rank-0 decisions shared with every rank
    resume          which checkpoint a run resumes from when its nodes do not share a filesystem
    start           the run's start: resume checks, restore, loaders, the HellaSwag data
    parallel        FSDP2 sharding, DDP/compile wrapping, full weights for evals and samples
    optimizers      --optimizer muon: torch's Muon for the blocks' matrices and AdamW for the rest, as one optimizer
    evals           step timing and metrics, val loss, HellaSwag during training, benchmark summary
    sampling        KV-cache generation and the printed samples
    flags           train_gpt2.py's --help texts
    metrics         FLOPs per token and GPU peak FLOP/s, for MFU
    tracking        W&B and TensorBoard: every metrics.jsonl row, rank 0 only, optional packages
    hellaswag_data  HellaSwag's jsonl: download, validation, reading
    hellaswag_scoring  HellaSwag tokenization, batching and scoring (training and hellaswag.py)

Only the scripts import this package; it never imports a script, and no two of its modules
import each other both ways. Importing any of it does no heavy work (transformers, tiktoken,
datasets, wandb and tensorboard load on first use).
"""
