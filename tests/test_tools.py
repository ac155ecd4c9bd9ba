"""tools/: the device check's parsing, table and build-nanogpt patch, and the mutation check's list, on
the CPU. The GPU side runs only on a device machine (tools/README.md); these tests keep its plumbing from
breaking unseen."""

import json
import os
import sys

import pytest
import torch
from test_train import tiny_config

import train_gpt2
from gpt2lib import optimizers
from train_gpt2 import DistContext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import device_report  # noqa: E402
import hellaswag_timing  # noqa: E402
import mutation_check  # noqa: E402
import nanogpt_anchor  # noqa: E402
import optimizer_benchmark  # noqa: E402


def test_benchmark_line_of_a_real_cpu_run_is_parsed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train_gpt2.benchmark(tiny_config("unused", "unused", benchmark=2), DistContext())
    parsed = device_report.parse_benchmark(capsys.readouterr().out)
    assert parsed["ms_per_step"] == pytest.approx(result["dt_ms"], abs=0.05)
    assert parsed["tokens_per_s"] == pytest.approx(result["tokens_per_sec"], abs=0.5)
    assert parsed["mfu"] is None and parsed["peak_mem_gib"] is None


def test_gpu_benchmark_line_is_parsed():
    # the format train_gpt2.benchmark prints on CUDA, where MFU and peak memory are known
    log = (
        "step     7 | loss 10.9 | ...\nbenchmark gpt2 | B 64 T 1024 x 1 process(es) | 5 steps | "
        "median 1,012.5 ms/step | 517,811 tokens/s | MFU 44.7% | peak memory 38.91 GiB\n"
    )
    assert device_report.parse_benchmark(log) == {
        "ms_per_step": 1012.5,
        "tokens_per_s": 517811.0,
        "mfu": pytest.approx(0.447),
        "peak_mem_gib": 38.91,
    }
    unknown_card = log.replace(" | MFU 44.7%", "")  # a card without a known peak: memory, no MFU
    assert device_report.parse_benchmark(unknown_card)["mfu"] is None
    assert device_report.parse_benchmark(unknown_card)["peak_mem_gib"] == 38.91
    assert device_report.parse_benchmark("Traceback (most recent call last):\n") is None


def test_anchor_log_median_skips_warmup_steps():
    steps = [(0, 61000.0), (1, 1100.0), (2, 1020.0), (3, 1010.0), (4, 1030.0), (5, 1000.0)]
    log = (
        "".join(
            f"step {s:5d} | loss: 10.9 | lr 6e-7 | norm: 1.0 | dt: {dt:.2f}ms | "
            f"tok/sec: {524288 / dt * 1000:.2f}\n"
            for s, dt in steps
        )
        + "peak memory allocated: 40.50 GiB\n"
    )
    parsed = device_report.parse_anchor(log, mfu_inputs=(855e6, 989e12))
    assert parsed["timed_steps"] == 3 and parsed["ms_per_step"] == 1010.0  # median of steps 3, 4, 5
    assert parsed["tokens_per_s"] == pytest.approx(524288 / 1.010, rel=1e-6)
    assert parsed["mfu"] == pytest.approx(524288 / 1.010 * 855e6 / 989e12, rel=1e-6)
    assert parsed["peak_mem_gib"] == 40.5
    assert device_report.parse_anchor("step     1 | loss: 10.9 | dt: 5.0ms | tok/sec: 1.0\n") is None


def test_hellaswag_timing_line_is_parsed(capsys):
    hellaswag_timing.main(["--model", "d1", "--examples", "20", "--batch-size", "4", "--device", "cpu"])
    parsed = device_report.parse_hellaswag(capsys.readouterr().out)
    assert parsed["examples"] == 20 and parsed["peak_mem_gib"] is None
    # the eval's seconds are printed to 3 decimals: ms/step is known to within 0.5 ms
    assert parsed["ms_per_example"] == pytest.approx(parsed["ms_per_step"] / 20, abs=0.5 / 20 + 1e-3)
    assert parsed["tokens_per_s"] > 0 and parsed["first_eval_s"] > 0


def test_synthetic_hellaswag_examples_have_the_val_split_shape():
    examples = hellaswag_timing.synthetic_examples(500)
    assert len(examples) == 500 and set(examples.labels) == {0, 1, 2, 3}
    assert min(map(len, examples.ctx)) >= 30 and max(map(len, examples.ctx)) <= 100
    ending_lengths = [len(e) for ends in examples.endings for e in ends]
    assert len(ending_lengths) == 2000 and min(ending_lengths) >= 10 and max(ending_lengths) <= 30


def test_missing_flags_against_the_real_help():
    help_text = train_gpt2.build_parser().format_help()
    assert device_report.missing_flags(help_text, ["--compile", "--no-compile", "--benchmark", "5"]) == []
    assert device_report.missing_flags(help_text, ["--compile", "--no-such-flag", "fused"]) == [
        "--no-such-flag"
    ]


def test_rows_and_table(tmp_path):
    results = tmp_path / "results.jsonl"
    log = tmp_path / "bench.log"
    log.write_text(
        "benchmark gpt2 | B 64 T 1024 x 1 process(es) | 5 steps | median 990.0 ms/step | "
        "529,583 tokens/s | MFU 45.8% | peak memory 30.00 GiB\n"
    )
    device_report.add(str(results), "benchmark", "compiled", "the default", "ok", str(log))
    device_report.add(str(results), "benchmark", "fused-loss", "fused | loss", "skipped: time budget")
    (tmp_path / "empty.log").write_text("killed\n")
    device_report.add(str(results), "benchmark", "eager", "no compile", "ok", str(tmp_path / "empty.log"))
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert rows[2]["status"] == "failed: no result line in empty.log"
    pytest_log = tmp_path / "pytest.log"
    pytest_log.write_text(
        "....s\n=== 12 passed, 1 skipped in 95.21s (0:01:35) ===\n== tests: exit 0 after 97s\n"
    )
    table = device_report.render(
        {"card": "NVIDIA H200", "torch": "2.11.0"}, rows, device_report.pytest_summary(str(pytest_log))
    )
    lines = table.splitlines()
    assert "tests/test_cuda.py: 12 passed, 1 skipped in 95.21s (0:01:35)" in lines
    assert "| compiled | NVIDIA H200 | 2.11.0 | 990.0 | 529,583 | 45.8% | 30.00 GiB | the default |" in lines
    assert (
        "| fused-loss | NVIDIA H200 | 2.11.0 | - | - | - | - | fused / loss (skipped: time budget) |" in lines
    )
    assert all(line.count("|") == 9 for line in lines if line.startswith("|"))


def test_nanogpt_patch_changes_exactly_its_three_lines():
    source = (
        "max_steps = 19073 # one epoch\nuse_compile = False # see issue\nfor step in range(max_steps):\n"
        "    if step % 250 == 0 or last_step:\n        model.eval()\n"
    )
    patched = nanogpt_anchor.patched_source(source, steps=8)
    changed = [(a, b) for a, b in zip(source.splitlines(), patched.splitlines()) if a != b]
    assert [b for _, b in changed] == [
        "max_steps = 8 # one epoch",
        "use_compile = True # see issue",
        "    if False:  # val-loss eval off for timing",
    ]
    with pytest.raises(nanogpt_anchor.PatchError, match="use_compile = False"):
        nanogpt_anchor.patched_source(source.replace("use_compile = False", "use_compile = None"), steps=8)


def test_every_mutation_still_fits_the_code_and_names_existing_tests():
    """Each deliberate mistake's original text occurs once in its file (else the mistake is a no-op),
    and each test it names exists."""
    assert mutation_check.check_fits(mutation_check.MUTATIONS) == []
    assert len({m.name for m in mutation_check.MUTATIONS}) == len(mutation_check.MUTATIONS)
    for m in mutation_check.MUTATIONS:
        for node in m.tests:
            path, name = node.split("::")
            with open(os.path.join(REPO, path)) as f:  # a parametrized test's id ends in [its case]
                assert f"def {name.split('[')[0]}(" in f.read(), node


def test_tokens_to_reach_interpolates_between_evals():
    curve = [(0, 10.0), (10, 6.0), (20, 4.0), (30, 3.0)]
    # 5.0 is halfway between the evals at steps 10 and 20: step 15, 100 tokens a step
    assert optimizer_benchmark.tokens_to_reach(curve, 5.0, 100) == 1500
    assert optimizer_benchmark.tokens_to_reach(curve, 6.0, 100) == 1000
    assert optimizer_benchmark.tokens_to_reach(curve, 2.9, 100) is None


def test_split_qkv_steps_q_k_and_v_each_as_a_matrix_of_its_own():
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
    weight = model.transformer.h[0].attn.c_attn.weight  # (3C, C)
    before = weight.detach().clone()
    split = optimizer_benchmark.SplitQKV(
        optimizers.muon_adamw(model, 0.0, 1e-3, False, 0.02, 0.95, 0.0), model
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grad = weight.grad.clone()
    split.step()
    # the reference: torch's Muon on three separate (C, C) matrices with the q, k and v rows' grads
    blocks = [torch.nn.Parameter(rows.clone()) for rows in before.chunk(3)]
    for block, rows in zip(blocks, grad.chunk(3)):
        block.grad = rows.clone()
    torch.optim.Muon(blocks, lr=0.02, momentum=0.95, weight_decay=0.0, adjust_lr_fn="original").step()
    torch.testing.assert_close(weight.detach(), torch.cat([b.detach() for b in blocks]), rtol=0, atol=0)
    # and not what one (3C, C) matrix would have done
    whole = torch.nn.Parameter(before.clone())
    whole.grad = grad.clone()
    torch.optim.Muon([whole], lr=0.02, momentum=0.95, weight_decay=0.0, adjust_lr_fn="original").step()
    assert not torch.allclose(weight.detach(), whole.detach())


def test_runs_from_a_file_of_other_settings_is_refused_in_one_line(tmp_path):
    saved = tmp_path / "runs.json"
    args = optimizer_benchmark.parse_args(["--batch-size", "4"])
    run = {**optimizer_benchmark.make_run("adamw", 1e-3, None, 400), "curve": [(0, 10.5), (25, 7.25)]}
    saved.write_text(json.dumps({"args": vars(args), "runs": [run]}))
    # a curve read back compares equal to the same curve trained again (--repeat-best)
    assert optimizer_benchmark.load_runs([str(saved)], args) == [run]
    with pytest.raises(SystemExit, match="runs.json: its runs differ from these in batch_size"):
        optimizer_benchmark.load_runs([str(saved)], optimizer_benchmark.parse_args(["--batch-size", "8"]))
    with pytest.raises(SystemExit, match="missing.json: cannot read it"):
        optimizer_benchmark.load_runs([str(tmp_path / "missing.json")], args)


def test_compare_qkv_under_fp16_is_refused_in_one_line(tmp_path):
    # its blocks' gradients are handed over at step(), after fp16's loss scaler would have unscaled them
    with pytest.raises(SystemExit, match="--compare-qkv runs in fp32 or bf16"):
        optimizer_benchmark.main(["--compare-qkv", "--dtype", "fp16", "--data-dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()  # refused before the corpus is built
