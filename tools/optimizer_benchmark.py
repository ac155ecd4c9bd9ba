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
(embeddings, LayerNorms, biases), so that only the hidden matrices' optimizer differs, unless
--rest-lr sets it.

The fraction of AdamW's tokens that Muon needs is measured two ways: where the val curve of Muon's
best full-length run first reaches AdamW's best final val loss, and (--horizons) by training Muon's
best lr for fewer steps, each run with its schedule fit to its length: the shortest that ends below
AdamW's best is how step counts to a target are compared in the field.

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
from gpt2lib import optimizers  # noqa: E402
from train_gpt2 import DistContext, TrainConfig, train  # noqa: E402

MUON_ADAMW = optimizers.muon_adamw
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
    """Shuffled documents -> data_dir/corpus_{val,train}_NNNNNN.npy (shard 0 is val), once: a
    data_dir that has train shards already (these, or fineweb.py's) is used as it is."""
    if glob.glob(os.path.join(data_dir, "*_train_*.npy")) or glob.glob(
        os.path.join(data_dir, "*_train_*.bin")
    ):
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


class SplitQKV(optimizers.MuonAdamW):
    """MuonAdamW whose Muon orthogonalizes each c_attn's q, k and v blocks as three (C, C) matrices
    instead of one (3C, C) matrix, for --compare-qkv. Muon steps three Parameters that are views of the
    block's rows of c_attn.weight (they share its storage), and step() hands each the matching rows of
    c_attn's gradient. A measurement only: GradScaler (fp16) would not see these gradients."""

    def __init__(self, mixed, model):
        muon = mixed.muon
        self.blocks = []
        params = []
        for name, p in model.named_parameters():
            if not optimizers.is_muon_parameter(name, p):
                continue
            if name.endswith("attn.c_attn.weight"):
                views = [torch.nn.Parameter(rows) for rows in p.data.chunk(3)]
                self.blocks.append((p, views))
                params += views
            else:
                params.append(p)
        group = {k: v for k, v in muon.param_groups[0].items() if k != "params"}
        split = torch.optim.Muon([{**group, "params": params}], **muon.defaults)
        super().__init__(mixed.adamw, split)

    def step(self):
        for matrix, views in self.blocks:
            for view, grad in zip(views, matrix.grad.chunk(3)):
                view.grad = grad
        super().step()


def split_qkv_muon(model, *args):
    return SplitQKV(MUON_ADAMW(model, *args), model)


def run_one(base, run, threads=1):
    """Train one configuration (a dict: optimizer, lr, muon_lr, steps, qkv); the same dict with its
    val curve and median seconds per step."""
    if threads:
        torch.set_num_threads(threads)
    optimizers.muon_adamw = split_qkv_muon if run.get("qkv") == "split" else MUON_ADAMW
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(
            base,
            optimizer=run["optimizer"],
            lr=run["lr"],
            muon_lr=run["muon_lr"] or base.muon_lr,
            max_steps=run["steps"],
            log_dir=tmp,
        )
        result = train(cfg, DistContext(device=torch.device(base.device)))
        curve = val_curve(tmp)
    seconds = sorted(m["dt_ms"] / 1000 for m in result["metrics"])
    return {**run, "curve": curve, "final": curve[-1][1], "s_per_step": seconds[len(seconds) // 2]}


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
        "--horizons",
        type=float,
        nargs="*",
        default=[],
        help="also train Muon's best lr for these fractions of --steps, each with its schedule (warmup, "
        "decay) fit to its length: the shortest that reaches AdamW's best final val loss gives the "
        "fraction of AdamW's tokens Muon needs, as the field's step-count comparisons measure it",
    )
    p.add_argument(
        "--compare-qkv",
        action="store_true",
        help="also train Muon's best lr with c_attn orthogonalized as three (C, C) blocks (q, k, v)",
    )
    p.add_argument(
        "--runs-from",
        nargs="*",
        default=[],
        help="--json files of earlier runs on the same data and shapes: reported, not trained again",
    )
    p.add_argument(
        "--repeat-best",
        action="store_true",
        help="train again, per optimizer, the shortest run that reaches AdamW's best final val loss, "
        "and check that it gives the same curve",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--corpus-seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=2**17)
    p.add_argument("--json", help="write every run's curve and figures here")
    p.add_argument("--plot", help="write a PNG of the best runs' val loss against tokens here")
    return p.parse_args(argv)


def label(r):
    return f"{r['optimizer']} lr {r['muon_lr'] or r['lr']:g}" + (
        ", q/k/v split" if r["qkv"] == "split" else ""
    )


def best_runs(runs, steps):
    """Each optimizer's run with the lowest final val loss among the full-length lr sweep."""
    return {
        name: min(
            (r for r in runs if r["optimizer"] == name and r["steps"] == steps and r["qkv"] == "whole"),
            key=lambda r: r["final"],
        )
        for name in ("adamw", "muon")
    }


def report(runs, tokens_per_step, steps):
    """Print the table; return the best runs. The target is AdamW's best final val loss; a run's
    token ratio is the tokens at which its val curve first reaches it over AdamW's tokens."""
    best = best_runs(runs, steps)
    target = best["adamw"]["final"]
    adamw_tokens = steps * tokens_per_step
    columns = [s for s, _ in best["adamw"]["curve"][1::4]]
    print(f"\ntarget: AdamW's best final val loss {target:.4f} at {adamw_tokens:,} tokens")
    print(
        "| optimizer | lr (Muon lr) | c_attn | steps | val loss at "
        + " | ".join(f"{s * tokens_per_step // 1000}k" for s in columns)
        + " | final | tokens to target / AdamW's | s/step |"
    )
    print("|---" * (7 + len(columns)) + "|")
    for r in sorted(
        runs, key=lambda r: (r["optimizer"], r["qkv"] != "whole", -r["steps"], r["muon_lr"] or r["lr"])
    ):
        reach = tokens_to_reach(r["curve"], target, tokens_per_step)
        r["token_ratio"] = None if reach is None else reach / adamw_tokens
        at = dict(r["curve"])
        lr = f"{r['lr']:g}" + (f" ({r['muon_lr']:g})" if r["muon_lr"] else "")
        ratio = "not reached" if reach is None else f"{r['token_ratio']:.3f}"
        print(
            f"| {r['optimizer']} | {lr} | {r['qkv'] if r['muon_lr'] else ''} | {r['steps']} | "
            + " | ".join(f"{at[s]:.4f}" if s in at else "" for s in columns)
            + f" | {r['final']:.4f} | {ratio} | {r['s_per_step']:.3f} |"
        )
    muon = best["muon"]
    print(
        f"\nMuon at its best lr ({muon['muon_lr']:g}) over the full {steps} steps reaches AdamW's best "
        + ("never" if muon["token_ratio"] is None else f"in {muon['token_ratio']:.3f}x AdamW's tokens")
    )
    shorter = [
        r
        for r in runs
        if r["optimizer"] == "muon"
        and r["muon_lr"] == muon["muon_lr"]
        and r["qkv"] == "whole"
        and r["steps"] < steps
    ]
    for r in sorted(shorter, key=lambda r: r["steps"]):
        verdict = "reaches it" if r["token_ratio"] is not None else "does not reach it"
        print(
            f"Muon trained for {r['steps']} steps ({r['steps'] / steps:.2f}x, its schedule fit to that "
            f"length) ends at {r['final']:.4f}: {verdict}"
            + ("" if r["token_ratio"] is None else f" at {r['token_ratio']:.3f}x AdamW's tokens")
        )
    reached = [r["token_ratio"] for r in shorter + [muon] if r["token_ratio"] is not None]
    if reached:
        print(f"the fewest tokens Muon at lr {muon['muon_lr']:g} needed: {min(reached):.3f}x AdamW's")
    print(f"s/step: AdamW {best['adamw']['s_per_step']:.3f}, Muon {muon['s_per_step']:.3f}")
    return best


def plot(runs, tokens_per_step, path):
    """The val curves of `runs` (AdamW's best first) against tokens, and AdamW's best final val loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        name = label(r) + (f", {r['steps']} steps" if r["steps"] != runs[0]["steps"] else "")
        ax.plot([s * tokens_per_step for s, _ in r["curve"]], [v for _, v in r["curve"]], label=name)
    target = runs[0]["final"]  # AdamW's best
    ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"AdamW's best final {target:.4f}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("val loss")
    ax.set_ylim(top=min(8.0, max(v for r in runs for _, v in r["curve"][2:]) + 0.2))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


RUN_KEYS = ("optimizer", "lr", "muon_lr", "steps", "qkv")
SAME_DATA = ("model", "dtype", "batch_size", "seq_len", "total_batch_size", "warmup", "eval_every")
SAME_DATA += ("val_tokens", "seed", "corpus_seed", "shard_size")


def make_run(optimizer, lr, muon_lr, steps, qkv="whole"):
    return dict(optimizer=optimizer, lr=lr, muon_lr=muon_lr, steps=steps, qkv=qkv)


def same_run(a, b):
    return all(a[k] == b[k] for k in RUN_KEYS)


def run_all(wanted, done, base, jobs, threads):
    """run_one for each wanted run not already in `done` (the same optimizer, lrs, steps and c_attn),
    `jobs` at a time in processes of their own; the new runs."""
    todo = [run for run in wanted if not any(same_run(run, d) for d in done)]
    if jobs <= 1:
        new = [run_one(base, run, threads=threads) for run in todo]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            new = pool.starmap(run_one, [(base, run, threads) for run in todo])
    for r in new:
        print(f"{label(r)}, {r['steps']} steps: final val {r['final']:.4f}, {r['s_per_step']:.3f} s/step")
    return new


def load_runs(paths, args):
    """The runs of earlier --json files trained on the same data and shapes as these args."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"--runs-from {path}: cannot read it as a --json file of this tool ({e})")
        differ = [k for k in SAME_DATA if saved["args"].get(k) != getattr(args, k)]
        if differ:
            sys.exit(f"{path}: its runs differ from these in {', '.join(differ)}: pass the same settings")
        # json gives the curve's (step, loss) pairs back as lists: tuples again, as run_one makes them
        runs += [
            {
                "steps": saved["args"]["steps"],
                "qkv": "whole",
                **r,
                "curve": [tuple(point) for point in r["curve"]],
            }
            for r in saved["runs"]
        ]
    return runs


def sweep(args, runs, train_some):
    """The lr sweeps, then at Muon's best lr the shorter schedules (--horizons) and c_attn split into
    q, k and v (--compare-qkv)."""
    adamw = [make_run("adamw", lr, None, args.steps) for lr in args.adamw_lrs]
    rest_lr = args.rest_lr
    if not rest_lr:  # Muon's runs wait for AdamW's best lr
        train_some(adamw)
        rest_lr = min((r for r in runs if r["optimizer"] == "adamw"), key=lambda r: r["final"])["lr"]
    train_some(adamw + [make_run("muon", rest_lr, m, args.steps) for m in args.muon_lrs])
    muon = best_runs(runs, args.steps)["muon"]
    more = [make_run("muon", muon["lr"], muon["muon_lr"], round(f * args.steps)) for f in args.horizons]
    if args.compare_qkv:
        more.append(make_run("muon", muon["lr"], muon["muon_lr"], args.steps, "split"))
    train_some(more)


def shortest_reaching(runs, best, name):
    """The fewest-steps run of this optimizer that reaches AdamW's best final val loss (its best run
    if none does)."""
    reaching = [r for r in runs if r["optimizer"] == name and r["token_ratio"] and r["qkv"] == "whole"]
    return min(reaching, key=lambda r: r["steps"]) if reaching else best[name]


def repeat_shortest(runs, best, base, args):
    """Train each optimizer's shortest_reaching run again; print whether the val curve is the same."""
    again = [shortest_reaching(runs, best, name) for name in ("adamw", "muon")]
    for first, second in zip(again, run_all(again, [], base, args.jobs, args.threads)):
        print(
            f"repeat {label(first)}, {first['steps']} steps: the same val curve twice: "
            f"{first['curve'] == second['curve']} (final {first['final']:.6f}, {second['final']:.6f})"
        )


def main(argv=None):
    args = parse_args(argv)
    if args.compare_qkv and args.dtype == "fp16":
        sys.exit("--compare-qkv runs in fp32 or bf16: fp16's loss scaler would not unscale the q/k/v blocks")
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
    runs = load_runs(args.runs_from, args)
    sweep(args, runs, lambda wanted: runs.extend(run_all(wanted, runs, base, args.jobs, args.threads)))
    best = report(runs, tokens_per_step, args.steps)
    if args.repeat_best:
        repeat_shortest(runs, best, base, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    if args.plot:
        shortest = shortest_reaching(runs, best, "muon")
        plot(
            [best["adamw"], best["muon"]] + [shortest] * (shortest is not best["muon"]),
            tokens_per_step,
            args.plot,
        )
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
