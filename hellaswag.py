"""
HellaSwag accuracy of an HF model or a train_gpt2.py checkpoint, in two scoring styles:
  completion (default): build-nanogpt's, so numbers compare with it and with training logs;
  harness: lm-evaluation-harness 0.4's zero-shot `hellaswag` task, so numbers compare with its tables.

    python hellaswag.py -m gpt2                      # an OpenAI GPT-2 from the HuggingFace hub
    python hellaswag.py -m path/to/hf_dir --limit 200
    python hellaswag.py -c log/model_19072.pt --json result.json
    python hellaswag.py -m gpt2 --style harness

This file is the command line: data, model loading and the report. The data (download,
validation) is gpt2lib/hellaswag_data.py and the scoring, which training uses too, is
gpt2lib/hellaswag_scoring.py; their main functions are importable from here as well.
"""

import argparse
import json
import os
import sys
import time

from gpt2lib import hf
from gpt2lib.common import (
    DTYPE_ALIASES,
    DTYPES,
    TORCH_DTYPES,
    UserError,
    atomic_write,
    canonical_dtype,
    one_line,
    pick_device,
)
from gpt2lib.hellaswag_data import SPLITS, STYLES, VAL_ROWS, download, load_examples  # noqa: F401  (public API)
from gpt2lib.hellaswag_scoring import (
    DEFAULT_BATCH_SIZE,
    evaluate,  # noqa: F401  (public API)
    evaluate_model,
    tokenize_examples,
)


def load_model(model_name=None, checkpoint=None):
    """An fp32 model from an HF hub name or directory (-m) or a train_gpt2.py checkpoint (-c)."""
    if checkpoint is not None:
        from train_gpt2 import GPT  # the model of a training checkpoint; train_gpt2 never imports this file

        return GPT.from_checkpoint(checkpoint)
    import transformers

    if not os.path.exists(model_name) and not os.path.isabs(model_name) and model_name.count("/") <= 1:
        # a hub name (`gpt2`, `org/name`): from the cache, else fail fast when the hub is out of reach
        try:
            return transformers.GPT2LMHeadModel.from_pretrained(model_name, local_files_only=True).float()
        except Exception:
            hf.check_hub_reachable(f"model {model_name!r}")
    try:
        model = transformers.GPT2LMHeadModel.from_pretrained(model_name)
    except Exception as e:  # hub, file and format errors come in many types
        raise UserError(f"could not load model {model_name!r} ({one_line(e)})") from None
    return model.float()


def write_json_atomic(path, obj):
    """Write obj as JSON to a temporary file next to path, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def autocast_dtype(name):
    """The torch dtype to autocast to for a --dtype name; None (auto) lets the scorer pick: bf16 on
    CUDA (fp16 on cards without bf16), full precision elsewhere, as train_gpt2.py does."""
    return None if name == "auto" else TORCH_DTYPES[name]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="HellaSwag accuracy, scored as build-nanogpt (completion style) "
        "or as lm-evaluation-harness 0.4 (harness style)."
    )
    parser.add_argument("-m", "--model", help="HuggingFace hub name (gpt2 ... gpt2-xl) or local HF directory")
    parser.add_argument(
        "-c",
        "--checkpoint",
        help="a train_gpt2.py checkpoint, e.g. log/model_19072.pt, or a sharded one (--fsdp), "
        "e.g. log/model_19072",
    )
    parser.add_argument(
        "-d", "--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps"
    )
    parser.add_argument("--data", help="a local HellaSwag jsonl file (default: download the official split)")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples per forward")
    parser.add_argument(
        "--dtype",
        default="auto",
        type=canonical_dtype,
        choices=DTYPES,
        help=f"autocast dtype; auto: bf16 on CUDA, fp32 elsewhere "
        f"({', '.join(DTYPE_ALIASES)} are accepted too)",
    )
    parser.add_argument(
        "--style",
        default="completion",
        choices=STYLES,
        help="completion: build-nanogpt's scoring (the training loop's); "
        "harness: lm-evaluation-harness 0.4's zero-shot hellaswag task",
    )
    parser.add_argument("--json", help='write {"n", "acc", "acc_norm", "style", "seconds"} to this file')
    return parser.parse_args(argv)


def run(args):
    if (args.model is None) == (args.checkpoint is None):
        raise UserError(
            "pass exactly one of -m/--model (HuggingFace name or directory) and "
            "-c/--checkpoint (train_gpt2.py checkpoint)"
        )
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = pick_device(args.device)
    # data errors before the slow part
    examples = load_examples(args.split, data_path=args.data, limit=args.limit, style=args.style)
    model = load_model(args.model, args.checkpoint).to(device)
    model.eval()
    t0 = time.time()
    tokenized = tokenize_examples(examples, style=args.style)
    result = evaluate_model(
        model,
        tokenized,
        device,
        batch_size=args.batch_size,
        autocast_dtype=autocast_dtype(args.dtype),
        progress=True,
    )
    result["style"] = args.style
    result["seconds"] = round(time.time() - t0, 3)
    print(
        f"hellaswag {args.split}, {args.style} style: n={result['n']} acc={result['acc']:.4f} "
        f"acc_norm={result['acc_norm']:.4f} ({result['seconds']:.1f} s on {device})"
    )
    if args.json:
        write_json_atomic(args.json, result)
    return result


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
