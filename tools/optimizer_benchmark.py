"""AdamW against Muon (--optimizer muon) on the same real-text shards, the same seed and data order:
a small lr sweep each, then per run the val loss at equal tokens, and the fraction of AdamW's tokens
that Muon needs to reach AdamW's best final val loss, and the seconds per step.

The corpus is real text found offline on this machine: Python's help topics (pydoc_data.topics), and
from the standard library and each package in site-packages (at most 1M characters each) the
docstrings of its modules (one document per module) and its .md/.rst/.txt prose (license texts and
metadata left out). The documents are shuffled with a fixed
seed BEFORE they are tokenized, so the val shard and the train shards come from one distribution: a
corpus ordered by source would measure the data order (val loss jumps as the train shards change
domain), not the optimizer. fineweb.py writes the shards from a jsonl of the shuffled documents.

AdamW's sweep runs first; Muon's runs then use AdamW's best lr for the parameters AdamW keeps
(embeddings, LayerNorms, biases), so that only the hidden matrices' optimizer differs.

    python tools/optimizer_benchmark.py                       # d4, CPU, 8x128 tokens per step, 400 steps
    python tools/optimizer_benchmark.py --steps 600 --plot optimizers.png
    python tools/optimizer_benchmark.py --model gpt2 --device cuda --batch-size 16 --seq-len 1024 \\
        --total-batch-size 524288 --steps 2000 --warmup 200 --adamw-lrs 6e-4 1.2e-3 1.8e-3 \\
        --data-dir edu_fineweb10B
"""

import argparse
import ast
import glob
import json
import os
import random
import sys
import sysconfig
import tempfile
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fineweb  # noqa: E402
from train_gpt2 import DistContext, TrainConfig, train  # noqa: E402

SKIPPED_NAMES = (
    "license",
    "licence",
    "copying",
    "notice",
    "authors",
    "entry_points",
    "top_level",
    "record",
    "requires",
    "sources",
    "dependency_links",
    "not-zip-safe",
    "installer",
    "wheel",
)
MAX_DOC_CHARS = 40_000  # one long file must not make up much of the corpus
MAX_SOURCE_CHARS = 1_000_000  # nor one package (awscli alone ships 6M characters of near-identical examples)


def is_prose(text):
    """Mostly letters and spaces: documentation, not a data table or a word list."""
    sample = text[:5000]
    return (
        len(sample) > 500
        and sum(c.isalpha() or c == " " for c in sample) > 0.75 * len(sample)
        and sample.count(" ") > 0.1 * len(sample)
    )


def read_document(path):
    """A text file's prose, or a Python module's docstrings in source order; None if neither."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".py"):
            tree = ast.parse(text)
            nodes = [tree] + [
                n
                for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            ]
            text = "\n\n".join(doc for doc in (ast.get_docstring(n) for n in nodes) if doc)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    text = text[:MAX_DOC_CHARS]
    return text if is_prose(text) else None


def source_files(rng):
    """{source: its candidate files in a seeded random order}: each top-level package of site-packages,
    and the standard library."""
    sources = {}
    stdlib = sysconfig.get_paths()["stdlib"]
    sources["stdlib"] = [
        p
        for p in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
        if "site-packages" not in p and f"{os.sep}test" not in p
    ]
    for root in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for path in glob.glob(os.path.join(root, "**", "*.*"), recursive=True):
            name = os.path.basename(path).lower()
            if name.endswith((".md", ".rst", ".txt", ".py")) and not any(s in name for s in SKIPPED_NAMES):
                sources.setdefault(os.path.relpath(path, root).split(os.sep)[0], []).append(path)
    for files in sources.values():
        files.sort()
        rng.shuffle(files)
    return sources


def corpus_documents(seed):
    """Every document, at most MAX_SOURCE_CHARS of each source, shuffled with `seed`."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    docs = list(topics.values())
    for _source, files in sorted(source_files(rng).items()):
        taken = 0
        for path in files:
            if taken >= MAX_SOURCE_CHARS:
                break
            text = read_document(path)
            if text:
                docs.append(text)
                taken += len(text)
    rng.shuffle(docs)
    return docs


def prepare_corpus(data_dir, shard_size, seed):
    """Shuffled documents -> data_dir/corpus_{val,train}_NNNNNN.npy (shard 0 is val), once."""
    if glob.glob(os.path.join(data_dir, "corpus_train_*.npy")):
        return
    docs = corpus_documents(seed)
    os.makedirs(data_dir, exist_ok=True)
    jsonl = os.path.join(data_dir, "corpus.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    print(
        f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters, shuffled (seed {seed})"
    )
    fineweb.main(
        [
            "--input",
            jsonl,
            "--out",
            data_dir,
            "--prefix",
            "corpus",
            "--shard-size",
            str(shard_size),
            "--workers",
            "1",
        ]
    )


def val_curve(log_dir):
    """[(step, val loss)] from the run's metrics.jsonl."""
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(row["step"], row["value"]) for row in rows if row.get("kind") == "val"]


def run_one(base, optimizer, lr, muon_lr=None, threads=1):
    """Train one configuration; its val curve and median seconds per step."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(base, optimizer=optimizer, lr=lr, muon_lr=muon_lr or base.muon_lr, log_dir=tmp)
        result = train(cfg, DistContext(device=torch.device(base.device)))
        curve = val_curve(tmp)
    seconds = sorted(m["dt_ms"] / 1000 for m in result["metrics"])
    return {
        "optimizer": optimizer,
        "lr": lr,
        "muon_lr": muon_lr,
        "curve": curve,
        "final": curve[-1][1],
        "s_per_step": seconds[len(seconds) // 2],
    }


def tokens_to_reach(curve, target, tokens_per_step):
    """Tokens at which the val curve first reaches target (linear between evals); None if never."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            step = s0 + (s1 - s0) * (v0 - target) / (v0 - v1) if v0 > target else s0
            return step * tokens_per_step
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir",
        default="data/optimizer_benchmark",
        help="shards; built here from the offline corpus when it has none",
    )
    p.add_argument("--model", default="d4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--total-batch-size", type=int, default=0, help="tokens per step (default: B*T)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument(
        "--val-tokens",
        type=int,
        default=32768,
        help="val tokens per eval, the same for every run (a few thousand are one or two documents)",
    )
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    p.add_argument(
        "--rest-lr",
        type=float,
        help="AdamW's lr for what Muon does not take (default: the best of --adamw-lrs)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side, each in its own process")
    p.add_argument(
        "--repeat-best",
        action="store_true",
        help="train each optimizer's best run again and check that it gives the same curve",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--corpus-seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=2**17)
    p.add_argument("--json", help="write every run's curve and figures here")
    p.add_argument("--plot", help="write a PNG of the best runs' val loss against tokens here")
    return p.parse_args(argv)


def report(runs, tokens_per_step):
    adamw = [r for r in runs if r["optimizer"] == "adamw"]
    target = min(r["final"] for r in adamw)
    adamw_tokens = adamw[0]["curve"][-1][0] * tokens_per_step
    print(f"\ntarget: AdamW's best final val loss {target:.4f} at {adamw_tokens:,} tokens")
    print(
        "| optimizer | lr (Muon lr) | val loss at "
        + " | ".join(f"{s * tokens_per_step // 1000}k" for s, _ in adamw[0]["curve"][1::4])
        + " | tokens to target / AdamW's | s/step |"
    )
    print("|---" * (4 + len(adamw[0]["curve"][1::4])) + "|")
    for r in runs:
        reach = tokens_to_reach(r["curve"], target, tokens_per_step)
        r["token_ratio"] = None if reach is None else reach / adamw_tokens
        lr = f"{r['lr']:g}" + (f" ({r['muon_lr']:g})" if r["muon_lr"] else "")
        ratio = "not reached" if reach is None else f"{r['token_ratio']:.3f}"
        print(
            f"| {r['optimizer']} | {lr} | "
            + " | ".join(f"{v:.4f}" for _, v in r["curve"][1::4])
            + f" | {ratio} | {r['s_per_step']:.3f} |"
        )
    best = {
        name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["final"])
        for name in ("adamw", "muon")
    }
    ratio = best["muon"]["token_ratio"]
    print(
        f"\nMuon (best lr {best['muon']['muon_lr']:g}) reaches AdamW's best final val loss "
        + ("never" if ratio is None else f"in {ratio:.3f}x AdamW's tokens")
        + "; "
        f"s/step AdamW {best['adamw']['s_per_step']:.3f}, Muon {best['muon']['s_per_step']:.3f}"
    )
    return best


def plot(best, tokens_per_step, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in best.values():
        label = f"{r['optimizer']} lr {r['muon_lr'] or r['lr']:g}"
        ax.plot([s * tokens_per_step for s, _ in r["curve"]], [v for _, v in r["curve"]], label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("val loss")
    ax.set_ylim(top=min(8.0, max(v for r in best.values() for _, v in r["curve"][2:]) + 0.2))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_all(configs, base, jobs, threads):
    """run_one for each (optimizer, lr, muon_lr), `jobs` at a time in processes of their own."""
    if jobs <= 1:
        return [run_one(base, *config, threads=threads) for config in configs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.starmap(run_one, [(base, *config, threads) for config in configs])


def print_run(r):
    rest = f" (AdamW lr {r['lr']:g} for the rest)" if r["muon_lr"] else ""
    print(
        f"{r['optimizer']} lr {r['muon_lr'] or r['lr']:g}{rest}: final val {r['final']:.4f}, "
        f"{r['s_per_step']:.3f} s/step",
        flush=True,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_corpus(args.data_dir, args.shard_size, args.corpus_seed)
    tokens_per_step = args.total_batch_size or args.batch_size * args.seq_len
    base = TrainConfig(
        model=args.model,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        total_batch_size=tokens_per_step,
        max_steps=args.steps,
        warmup_steps=args.warmup,
        eval_every=args.eval_every,
        val_steps=max(1, args.val_tokens // (args.batch_size * args.seq_len)),
        hellaswag=False,
        sample_every=0,
        checkpoint_every=0,
        resume="none",
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )
    # with --rest-lr given, both sweeps run together; else Muon's runs wait for AdamW's best lr
    adamw_configs = [("adamw", lr, None) for lr in args.adamw_lrs]
    if args.rest_lr:
        runs = run_all(
            adamw_configs + [("muon", args.rest_lr, m) for m in args.muon_lrs], base, args.jobs, args.threads
        )
    else:
        runs = run_all(adamw_configs, base, args.jobs, args.threads)
        rest_lr = min(runs, key=lambda r: r["final"])["lr"]
        runs += run_all([("muon", rest_lr, m) for m in args.muon_lrs], base, args.jobs, args.threads)
    for r in runs:
        print_run(r)
    best = report(runs, tokens_per_step)
    if args.repeat_best:
        again = run_all(
            [(r["optimizer"], r["lr"], r["muon_lr"]) for r in best.values()], base, args.jobs, args.threads
        )
        for first, second in zip(best.values(), again):
            same = first["curve"] == second["curve"]
            print(
                f"repeat {first['optimizer']}: the same val curve twice: {same} (final {first['final']:.6f}, "
                f"{second['final']:.6f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    if args.plot:
        plot(best, tokens_per_step, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
