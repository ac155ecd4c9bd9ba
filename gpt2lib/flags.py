"""The --help text of train_gpt2.py's flags, one line per TrainConfig field."""

FLAG_HELP = {
    "model": "gpt2, gpt2-medium, gpt2-large, gpt2-xl or dN (default: gpt2, or the shape of --init-from)",
    "init_from": "fine-tune: start from the weights and shape of an OpenAI GPT-2 (gpt2 ... gpt2-xl), an HF "
                 "directory or a training checkpoint (.pt), with a fresh optimizer at step 0",
    "eval_only": "evaluate the initial (--init-from, seeded or resumed) model, log it at its step, and exit",
    "export_hf": "write the --init-from model, else the checkpoint --resume picks, as an HF directory, and exit",
    "generate": "print --num-samples continuations of this prompt by the --init-from model, else the checkpoint "
                "--resume picks, and exit",
    "num_samples": "samples per prompt, for --generate and the training samples",
    "max_new_tokens": "tokens each sample adds to its prompt",
    "top_k": "sample among the k likeliest tokens; 0: the whole vocabulary; 1: greedy",
    "temperature": "divides the logits before sampling: lower is more conservative",
    "data_dir": "directory of *_train_NNNNNN / *_val_NNNNNN token shards (.npy, or llm.c .bin)",
    "batch_size": "micro-batch: sequences per forward pass per process",
    "seq_len": "sequence length T (at most the model's block size)",
    "total_batch_size": "tokens per optimizer step; divisible by B*T*processes (the rest is gradient accumulation)",
    "max_steps": "optimizer steps of the whole run; the schedule ends here",
    "warmup_steps": "steps of linear lr warmup",
    "lr": "peak learning rate",
    "min_lr_ratio": "the schedule decays to lr times this",
    "lr_schedule": "cosine: decay from the end of warmup to --max-steps; wsd: warmup, hold --lr, cool down over "
                   "--cooldown-steps (a stable-phase checkpoint can be resumed with another --max-steps)",
    "cooldown_steps": "wsd: the last steps, over which the lr decays; 0: 20%% of --max-steps",
    "cooldown_shape": "wsd: the cooldown's decay",
    "weight_decay": "AdamW weight decay on matrices and embeddings",
    "grad_clip": "clip the gradient norm to this; 0: no clipping",
    "eval_every": "val loss (and HellaSwag) every N steps and at the end; 0: never",
    "val_steps": "val batches per evaluation",
    "hellaswag": "HellaSwag acc_norm at every eval (skipped with a warning when its data cannot be had)",
    "hellaswag_data": "a local hellaswag_val.jsonl; empty: download it",
    "sample_every": "print (and log) text samples every N steps; 0: never",
    "sample_prompt": "the samples' prompt",
    "checkpoint_every": "write a checkpoint every N steps and at the end; 0: only when stopped by a signal",
    "keep_last": "checkpoints of this run kept in --log-dir; 0: all",
    "log_dir": "log.txt, metrics.jsonl, checkpoints and tracking files of the run",
    "resume": "auto (the newest good checkpoint in --log-dir), none, or a checkpoint path",
    "device": "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps",
    "dtype": "auto: bf16 on CUDA (fp16 with loss scaling where bf16 is missing), fp32 elsewhere",
    "compile": "torch.compile the model (default: on with CUDA)",
    "loss_impl": "full computes the (B, T, vocab) logits; chunked and fused never hold them",
    "sdpa_backend": "attention kernel to prefer; default (the default) leaves the choice to PyTorch",
    "shuffle": "seeded shuffle, every epoch, of the train shards' order and of the blocks of one optimizer step",
    "seed": "seed of the init, the shuffle and the samples",
    "vocab_multiple": "pad the embedding rows to a multiple of this (64: 50257 -> 50304)",
    "benchmark": "time N steps on random tokens (no data, evals or checkpoints), print the median, and exit",
    "wandb": "log every metric to this Weights & Biases project (WANDB_MODE=offline or disabled is respected); "
             "rank 0 only",
    "wandb_name": "the W&B run's name (default: the log dir's name)",
    "tensorboard": "write TensorBoard event files under {log_dir}/tensorboard/",
    "fsdp": "shard weights, gradients and AdamW state across the ranks (FSDP2) and write sharded checkpoint "
            "directories; for gpt2-medium and up (default: DDP, a full copy on every rank)",
    "recompute": "recompute each Block's activations in backward instead of keeping them (less memory)",
    "collective_timeout": "under torchrun: seconds without progress (a step, an eval batch) after which every "
                          "live rank names the stalled rank and exits, for torchrun to restart; longer than a "
                          "checkpoint write",
    "async_checkpoint": "with --fsdp: copy the state to CPU memory and write the checkpoint while the next "
                        "steps run (a stop or the end of the run waits for it)",
}
