"""Time karpathy/build-nanogpt's own train_gpt2.py with torch.compile on, on random tokens.

Its code is never part of this repository: tools/prepare_anchors.sh exports it into the git-ignored
.anchors/build-nanogpt/, and this script copies it into a scratch directory and changes only
  - the step count (max_steps),
  - torch.compile on (use_compile; its HellaSwag eval and sampling are already off under compile),
  - its val-loss eval off (it runs at step 0 inside the timed step, and at the last step),
and instead of the FineWeb-Edu shards it finds random uint16 tokens under the names its loader
looks for. Then it runs the script in this process and prints the peak GPU memory it allocated.

    python3 tools/nanogpt_anchor.py --steps 8 --run-dir /tmp/nanogpt-run
    python3 tools/nanogpt_anchor.py --steps 8 --run-dir /tmp/nanogpt-run --dry   # patch and byte-compile only

Its tokenizer is built at import time: set TIKTOKEN_CACHE_DIR to .anchors/tiktoken-cache (written by
prepare_anchors.sh) where there is no network.
"""

import argparse
import os
import py_compile
import runpy
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR_DIR = os.path.join(REPO, ".anchors", "build-nanogpt")
TOKENS_PER_STEP = 524288  # its total_batch_size
VOCAB = 50257

# (what, original text, replacement): each original must occur exactly once in its train_gpt2.py
PATCHES = [
    ("step count", "max_steps = 19073 ", "max_steps = {steps} "),
    ("torch.compile on", "use_compile = False ", "use_compile = True "),
    (
        "val-loss eval off",
        "    if step % 250 == 0 or last_step:\n",
        "    if False:  # val-loss eval off for timing\n",
    ),
]


class PatchError(Exception):
    pass


def patched_source(source, steps):
    for what, original, replacement in PATCHES:
        count = source.count(original)
        if count != 1:
            raise PatchError(
                f"build-nanogpt's train_gpt2.py has {count} copies of {original.strip()!r} "
                f"({what}), expected 1: its code changed, update PATCHES"
            )
        source = source.replace(original, replacement.format(steps=steps))
    return source


def write_random_shards(run_dir, steps, seed=0):
    """Uniformly random tokens in the files its DataLoaderLite picks by name; enough train tokens that
    the loader never reloads a shard (a disk read inside a timed step) during the run."""
    data_dir = os.path.join(run_dir, "edu_fineweb10B")
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", (steps + 2) * TOKENS_PER_STEP), ("val", TOKENS_PER_STEP + 1)):
        np.save(
            os.path.join(data_dir, f"edufineweb_{split}_000000.npy"),
            rng.integers(0, VOCAB, n, dtype=np.uint16),
        )


def prepare(run_dir, steps):
    """The patched script and its hellaswag.py (imported at its top) in run_dir; returns the script path."""
    for name in ("train_gpt2.py", "hellaswag.py"):
        if not os.path.isfile(os.path.join(ANCHOR_DIR, name)):
            raise PatchError(
                f"{os.path.join(ANCHOR_DIR, name)} is missing: run tools/prepare_anchors.sh first "
                "(and name .anchors in the device call's carry)"
            )
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(ANCHOR_DIR, "train_gpt2.py")) as f:
        source = patched_source(f.read(), steps)
    script = os.path.join(run_dir, "train_gpt2.py")
    with open(script, "w") as f:
        f.write(source)
    shutil.copy(os.path.join(ANCHOR_DIR, "hellaswag.py"), run_dir)
    py_compile.compile(script, doraise=True)
    return script


def run(script):
    """Run the script as __main__ from its directory, as `python train_gpt2.py` would."""
    import torch

    run_dir = os.path.dirname(script)
    os.chdir(run_dir)
    sys.path.insert(0, run_dir)
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")
    if torch.cuda.is_available():
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=8, help="its max_steps: 3 warm-up steps + the timed ones"
    )
    parser.add_argument(
        "--run-dir", required=True, help="scratch directory for the patched script and tokens"
    )
    parser.add_argument("--dry", action="store_true", help="patch and byte-compile, do not run")
    args = parser.parse_args(argv)
    try:
        script = prepare(args.run_dir, args.steps)
    except (PatchError, py_compile.PyCompileError) as e:
        sys.exit(f"error: {e}")
    commit_file = os.path.join(ANCHOR_DIR, "COMMIT")
    commit = open(commit_file).read().strip() if os.path.exists(commit_file) else "unknown commit"
    print(f"build-nanogpt {commit}: patched ({', '.join(what for what, _, _ in PATCHES)}) into {script}")
    if args.dry:
        return
    write_random_shards(args.run_dir, args.steps)
    run(script)


if __name__ == "__main__":
    main()
