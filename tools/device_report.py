"""Results of tools/device_check.sh: read each stage's log, keep one JSON row per stage, write the table.

    python3 tools/device_report.py env ENV_JSON                       # card, driver, torch, CUDA, cuDNN
    python3 tools/device_report.py missing-flags HELP_FILE FLAG...     # flags that `train_gpt2.py --help`
                                                                       # lacks
    python3 tools/device_report.py pytest-summary PYTEST_LOG
    python3 tools/device_report.py add RESULTS KIND NAME WHAT STATUS [LOG]
    python3 tools/device_report.py render ENV_JSON RESULTS PYTEST_LOG TABLE_MD

KIND is benchmark (train_gpt2.py --benchmark), anchor (tools/nanogpt_anchor.py) or hellaswag
(tools/hellaswag_timing.py); STATUS is ok, or why the stage has no numbers (failed, skipped, ...).
"""

import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR_WARMUP_STEPS = 3  # as train_gpt2.BENCHMARK_WARMUP_STEPS: compilation and warm-up are not timed

# train_gpt2.py --benchmark's summary line
BENCHMARK_LINE = re.compile(
    r"^benchmark .*\| median (?P<ms>[\d,.]+) ms/step \| (?P<tok>[\d,.]+) tokens/s"
    r"(?: \| MFU (?P<mfu>[\d.]+)%)?(?: \| peak memory (?P<mem>[\d.]+) GiB)?",
    re.M,
)
# build-nanogpt's per-step line, and the peak memory line tools/nanogpt_anchor.py adds after its run
ANCHOR_STEP = re.compile(
    r"^step\s+(?P<step>\d+) \|.*\| dt: (?P<ms>[\d.]+)ms \| tok/sec: (?P<tok>[\d.]+)", re.M
)
PEAK_MEMORY = re.compile(r"^peak memory allocated: (?P<mem>[\d.]+) GiB", re.M)
HELLASWAG_LINE = re.compile(
    r"^hellaswag timing \| (?P<n>\d+) examples \| first eval (?P<first>[\d.]+) s \| "
    r"eval (?P<s>[\d.]+) s \| (?P<ms_ex>[\d.]+) ms/example \| (?P<tok>[\d,]+) tokens/s \| "
    r"peak memory (?P<mem>[\d.]+|-) GiB",
    re.M,
)


def last_match(pattern, log):
    matches = list(pattern.finditer(log))
    return matches[-1] if matches else None


def number(text):
    return float(text.replace(",", ""))


def parse_benchmark(log):
    """{ms_per_step, tokens_per_s, mfu, peak_mem_gib} from train_gpt2.py --benchmark output; None if
    absent."""
    m = last_match(BENCHMARK_LINE, log)
    if m is None:
        return None
    return {
        "ms_per_step": number(m["ms"]),
        "tokens_per_s": number(m["tok"]),
        "mfu": number(m["mfu"]) / 100 if m["mfu"] else None,
        "peak_mem_gib": number(m["mem"]) if m["mem"] else None,
    }


def parse_anchor(log, mfu_inputs=None):
    """Median ms/step and tokens/s over build-nanogpt's steps after the warm-up ones, its peak memory,
    and its MFU when mfu_inputs = (training FLOPs per token, peak FLOP/s) is given."""
    steps = [m for m in ANCHOR_STEP.finditer(log) if int(m["step"]) >= ANCHOR_WARMUP_STEPS]
    if not steps:
        return None
    tokens_per_s = statistics.median(number(m["tok"]) for m in steps)
    memory = last_match(PEAK_MEMORY, log)
    mfu = None
    if mfu_inputs:
        flops_per_token, peak = mfu_inputs
        mfu = tokens_per_s * flops_per_token / peak
    return {
        "ms_per_step": statistics.median(number(m["ms"]) for m in steps),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_mem_gib": number(memory["mem"]) if memory else None,
        "timed_steps": len(steps),
    }


def parse_hellaswag(log):
    m = last_match(HELLASWAG_LINE, log)
    if m is None:
        return None
    return {
        "ms_per_step": number(m["s"]) * 1000,
        "tokens_per_s": number(m["tok"]),
        "mfu": None,
        "peak_mem_gib": None if m["mem"] == "-" else number(m["mem"]),
        "examples": int(m["n"]),
        "first_eval_s": number(m["first"]),
        "ms_per_example": number(m["ms_ex"]),
    }


def gpt2_mfu_inputs():
    """(training FLOPs per token, the GPU's peak bf16 FLOP/s) for build-nanogpt's model, which is our
    gpt2 with the vocabulary padded to 50304 at T=1024; None off CUDA or on an unknown card."""
    sys.path.insert(0, REPO)
    import torch

    from gpt2lib.flops import flops_per_token, peak_flops
    from train_gpt2 import config_for

    if not torch.cuda.is_available():
        return None
    peak = peak_flops(torch.cuda.get_device_name(0))
    if peak is None:
        return None
    return flops_per_token(config_for("gpt2", vocab_multiple=64), 1024), peak


def environment():
    import platform

    import torch

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "python": platform.python_version(),
        "card": "CPU",
        "cudnn": "-",
        "capability": "-",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            card=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cudnn=str(torch.backends.cudnn.version()),
            multiprocessors=props.multi_processor_count,
        )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "-"
    return env


def missing_flags(help_text, flags):
    """The --flags (and --no-flags) that the help text does not list."""
    listed = set(re.findall(r"--[a-z0-9][a-z0-9-]*", help_text))
    return [f for f in flags if f.startswith("--") and f.split("=")[0] not in listed]


def add(results_path, kind, name, what, status, log_path=None):
    row = {"kind": kind, "variant": name, "what": what, "status": status}
    if status == "ok":
        with open(log_path) as f:
            log = f.read()
        parsed = {
            "benchmark": parse_benchmark,
            "hellaswag": parse_hellaswag,
            "anchor": lambda text: parse_anchor(text, gpt2_mfu_inputs()),
        }[kind](log)
        if parsed is None:
            row["status"] = f"failed: no result line in {os.path.basename(log_path)}"
        else:
            row.update(parsed)
    with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def cell(value, fmt):
    return "-" if value is None else fmt.format(value)


def render(env, rows, pytest_summary):
    """The markdown report: one header block, one table row per stage."""
    card = env.get("card", "?")
    torch_version = env.get("torch", "?")
    lines = [
        "# Device check",
        "",
        f"{card} ({env.get('memory_gib', '-')} GiB, compute capability {env.get('capability', '-')}), "
        f"torch {torch_version}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, "
        f"triton {env.get('triton', '-')}, Python {env.get('python', '-')}",
        "",
        f"tests/test_cuda.py: {pytest_summary}",
        "",
        "Training rows: median of the timed steps after 3 warm-up steps, random tokens. HellaSwag row: "
        "ms/step is one whole eval, tokens/s counts scored tokens.",
        "",
        "| variant | card | torch | ms/step | tokens/s | MFU | peak memory | what changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        what = row["what"] if row["status"] == "ok" else f"{row['what']} ({row['status']})"
        if "first_eval_s" in row:
            what += (
                f"; {row['ms_per_example']:.3f} ms/example; the first eval, which builds the batches, "
                f"{row['first_eval_s']:.1f} s"
            )
        lines.append(
            "| "
            + " | ".join(
                [
                    row["variant"],
                    card,
                    torch_version,
                    cell(row.get("ms_per_step"), "{:,.1f}"),
                    cell(row.get("tokens_per_s"), "{:,.0f}"),
                    cell(row.get("mfu"), "{:.1%}"),
                    cell(row.get("peak_mem_gib"), "{:.2f} GiB"),
                    what.replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def pytest_summary(path):
    """pytest's final summary line (e.g. '13 passed in 95.2s'), or why there is none."""
    if not os.path.exists(path):
        return "not run"
    with open(path) as f:
        tail = [line.strip().strip("=").strip() for line in f if line.strip()]
    found = [
        line
        for line in tail
        if re.search(r"\b(passed|failed|skipped|error|errors|no tests ran)\b", line)
        and re.search(r"\bin [\d.]+s", line)
    ]
    return found[-1] if found else f"no summary line (see {os.path.basename(path)}; killed or crashed?)"


def main(argv):
    command, args = argv[0], argv[1:]
    if command == "env":
        env = environment()
        with open(args[0], "w") as f:
            json.dump(env, f, indent=1)
        print(" | ".join(f"{k} {v}" for k, v in env.items()))
    elif command == "missing-flags":
        with open(args[0]) as f:
            print(" ".join(missing_flags(f.read(), args[1:])))
    elif command == "pytest-summary":
        print(pytest_summary(args[0]))
    elif command == "add":
        print(json.dumps(add(*args)))
    elif command == "render":
        env_path, results_path, pytest_log, table_path = args
        env = json.load(open(env_path)) if os.path.exists(env_path) else {}
        rows = [json.loads(line) for line in open(results_path)] if os.path.exists(results_path) else []
        table = render(env, rows, pytest_summary(pytest_log))
        with open(table_path, "w") as f:
            f.write(table)
        print(table)
    else:
        sys.exit(f"unknown command {command!r}: use env, missing-flags, pytest-summary, add or render")


if __name__ == "__main__":
    main(sys.argv[1:])
