"""Sampling with the KV cache (gpt2lib/sampling.py through train_gpt2.generate) and --generate.
CPU only, no network, tiny models.

The references are independent of the cache: the model's plain forward over the whole (cropped)
context at every token, in the loop generate() ran before it had a cache; transformers'
GPT2LMHeadModel.generate on our export of the same weights; each prompt generated alone.
"""

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_model import perturb_
from torch.nn import functional as F

import train_gpt2
from train_gpt2 import GPT, GPT2_EOT, GPTConfig, TrainConfig, generate, validate

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50257
PROMPTS = ["Hello, I'm a language model,", "The", "def f(x):\n    return 2 * x"]  # 8, 1 and 13 tokens


pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py: no hub, no network


def tiny_model(block_size, seed=0, vocab_multiple=64):
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32, vocab_multiple=vocab_multiple)
    )
    perturb_(model, seed=seed + 1)  # biases and LayerNorms away from their defaults
    with torch.no_grad():  # padded rows that would win every draw if they leaked into the logits
        model.transformer.wte.weight[VOCAB:] = 3.0 * torch.randn(model.config.padded_vocab_size - VOCAB, 32)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model(block_size=16)


def reference_generate(model, prompt, max_new_tokens, num_samples=1, top_k=50, temperature=1.0, seed=42):
    """generate() as it was before the cache: every token recomputes the logits of the whole
    context, cropped to block_size, through the model's training forward."""
    enc = train_gpt2.get_encoding()
    tokens = torch.tensor(enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [GPT2_EOT])
    x = tokens[None, :].repeat(num_samples, 1)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(x[:, -model.config.block_size :])
            logits = logits[:, -1, :VOCAB].float() / max(temperature, 1e-6)
            if top_k:
                values, indices = torch.topk(logits, min(top_k, VOCAB), dim=-1)
                next_token = torch.gather(
                    indices, -1, torch.multinomial(F.softmax(values, dim=-1), 1, generator=rng)
                )
            else:
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)
            x = torch.cat([x, next_token], dim=1)
    return [enc.decode(row.tolist()) for row in x]


def n_tokens(text):
    return len(train_gpt2.get_encoding().encode(text, allowed_special={"<|endoftext|>"}))


# -----------------------------------------------------------------------------
# the cache against the uncached path


def test_greedy_with_cache_equals_uncached_path_past_block_size(model):
    # 13 prompt tokens + 12 new in a block of 16: the cache fills, then the window is cropped and refilled
    prompt = PROMPTS[2]
    assert n_tokens(prompt) == 13
    ours = generate(model, prompt, 12, top_k=1)
    assert ours == reference_generate(model, prompt, 12, top_k=1)
    assert n_tokens(ours[0]) == 25 and ours[0].startswith(prompt)
    # a prompt already longer than the block is cropped before the first token
    long_prompt = " ".join(["word"] * 20)
    assert generate(model, long_prompt, 6, top_k=1) == reference_generate(model, long_prompt, 6, top_k=1)


def test_seeded_sampling_equals_the_uncached_path_and_repeats(model):
    rng_before = torch.get_rng_state()
    for settings in (dict(top_k=50, temperature=1.0), dict(top_k=0, temperature=0.7)):
        ours = generate(model, PROMPTS[0], 10, num_samples=3, seed=7, **settings)  # 8 + 10 tokens > 16
        assert ours == reference_generate(model, PROMPTS[0], 10, num_samples=3, seed=7, **settings)
        assert ours == generate(model, PROMPTS[0], 10, num_samples=3, seed=7, **settings)
        assert ours != generate(model, PROMPTS[0], 10, num_samples=3, seed=8, **settings)
        assert len(set(ours)) == 3  # the rows of one call differ
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's RNG is untouched


def recording_decode(monkeypatch):
    """Record the (B, V) logits of every GPT.decode call."""
    calls, real = [], GPT.decode

    def decode(self, idx, cache):
        logits = real(self, idx, cache)
        calls.append(logits.clone())
        return logits

    monkeypatch.setattr(GPT, "decode", decode)
    return calls


def test_batch_of_prompts_of_different_lengths_equals_each_alone(model, monkeypatch):
    # 8, 1 and 13 tokens, 10 new in a block of 16: the longest row crosses the block first, while
    # the others still hold left padding in the window
    calls = recording_decode(monkeypatch)
    batch = generate(model, PROMPTS, 10, num_samples=2, top_k=1)
    batch_logits = torch.stack(calls)  # (steps, B, V)
    alone = []
    for row, prompt in enumerate(PROMPTS):
        calls.clear()
        alone.append(generate(model, prompt, 10, top_k=1)[0])
        # not only the argmax: every logit of every step is that of the prompt alone
        torch.testing.assert_close(batch_logits[:, 2 * row], torch.stack(calls)[:, 0], atol=1e-4, rtol=0)
        assert batch_logits[:, 2 * row].std() > 0.1
    assert batch == [text for text in alone for _ in range(2)]
    assert alone == [reference_generate(model, prompt, 10, top_k=1)[0] for prompt in PROMPTS]
    # seeded sampling of a batch repeats too
    sampled = generate(model, PROMPTS, 10, num_samples=2, seed=3)
    assert sampled == generate(model, PROMPTS, 10, num_samples=2, seed=3) and len(set(sampled)) == 6


def test_cache_dtype_follows_autocast(model, monkeypatch):
    from gpt2lib import sampling

    caches = []
    real = sampling.KVCache.__init__

    def recording(self, *args):
        real(self, *args)
        caches.append(self)

    monkeypatch.setattr(sampling.KVCache, "__init__", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, PROMPTS[0], 4, num_samples=2, seed=1)
    assert len(out) == 2 and all(n_tokens(text) == 12 for text in out)
    assert {layer.k.dtype for layer in caches[0].layers} == {torch.bfloat16}


# -----------------------------------------------------------------------------
# against transformers' generate on the export of the same model


def test_greedy_batch_equals_transformers_generate_on_the_export(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_model(block_size=64, seed=5)
    model.save_pretrained(tmp_path / "export")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    enc = train_gpt2.get_encoding()
    prompts = [enc.encode(p) for p in PROMPTS]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[GPT2_EOT] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = 24
    with torch.no_grad():
        theirs = hf.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=GPT2_EOT,
        )
    ours = generate(model, PROMPTS, new, top_k=1)
    theirs_text = [enc.decode(row[width - len(p) :].tolist()) for row, p in zip(theirs, prompts)]
    assert ours == theirs_text
    # transformers stops a row at <|endoftext|> and we do not: the comparison needs rows without it
    assert theirs.shape == (3, width + new) and GPT2_EOT not in theirs[:, width:]
    assert len(set(ours)) == 3


# -----------------------------------------------------------------------------
# the --generate command


def sample_lines(out):
    return [
        ast.literal_eval(line[len("sample: ") :]) for line in out.splitlines() if line.startswith("sample: ")
    ]


def save_checkpoint(model, path, **extra):
    torch.save(
        {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 3, **extra}, path
    )


def test_generate_flag_samples_a_checkpoint(model, tmp_path, capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    checkpoint = log_dir / "model_00003.pt"
    save_checkpoint(model, checkpoint, optimizer={}, loader=[])  # --resume auto takes it
    before = sorted(os.listdir(log_dir))
    args = [
        "--generate",
        PROMPTS[0],
        "--num-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--top-k",
        "20",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--data-dir",
        "missing",
    ]
    train_gpt2.main(["--init-from", str(checkpoint), *args])
    out = capsys.readouterr().out
    expected = generate(model, PROMPTS[0], 6, num_samples=3, top_k=20, temperature=0.8, seed=5)
    assert f"generating from --init-from {checkpoint} on cpu in fp32: 3 sample(s) of 6 tokens" in out
    assert sample_lines(out) == expected
    # without --init-from: the checkpoint --resume picks in --log-dir
    train_gpt2.main([*args, "--log-dir", str(log_dir)])
    out = capsys.readouterr().out
    assert f"generating from {checkpoint} on cpu" in out and sample_lines(out) == expected
    assert sorted(os.listdir(log_dir)) == before
    # the command itself, in a process of its own, in bf16
    proc = subprocess.run(
        [
            sys.executable,
            "train_gpt2.py",
            "--init-from",
            str(checkpoint),
            "--generate",
            "The",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    samples = sample_lines(proc.stdout)
    assert "in bf16" in proc.stdout and len(samples) == 2
    assert all(s.startswith("The") and n_tokens(s) == 5 for s in samples)


def test_generate_flag_greedy_from_an_hf_directory_equals_transformers(tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    directory = tmp_path / "hf"
    tiny_model(block_size=32, seed=9, vocab_multiple=1).save_pretrained(directory)
    train_gpt2.main(
        [
            "--init-from",
            str(directory),
            "--generate",
            PROMPTS[0],
            "--num-samples",
            "2",
            "--max-new-tokens",
            "8",
            "--top-k",
            "1",
            "--device",
            "cpu",
        ]
    )
    printed = sample_lines(capsys.readouterr().out)
    enc = train_gpt2.get_encoding()
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([enc.encode(PROMPTS[0])]), max_new_tokens=8, do_sample=False, pad_token_id=GPT2_EOT
        )
    assert printed == [enc.decode(theirs[0].tolist())] * 2
    assert theirs.shape[1] == n_tokens(PROMPTS[0]) + 8


def test_generate_flag_settings_are_validated():
    assert validate(TrainConfig(generate="Hi"), 1) == []
    assert validate(
        TrainConfig(generate="Hi", num_samples=0, max_new_tokens=-1, top_k=-2, temperature=0.0), 1
    ) == [
        "--num-samples must be positive, got 0",
        "--max-new-tokens must be positive, got -1",
        "--temperature must be positive, got 0.0",
        "--top-k must be >= 0 (0: the whole vocabulary, 1: greedy), got -2",
    ]
    assert validate(TrainConfig(generate="Hi", export_hf="out", benchmark=2), 1) == [
        "--benchmark and --export-hf and --generate exclude each other: choose one"
    ]
    assert validate(TrainConfig(generate="Hi", eval_only=True), 1) == [
        "--eval-only and --generate exclude each other: choose one"
    ]
    assert validate(TrainConfig(generate="Hi"), 2) == [
        "--generate runs in one process: run it with python, not torchrun"
    ]


def test_generate_flag_without_a_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--generate", "Hi", "--log-dir", str(tmp_path / "empty")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --generate: no model to sample from (no checkpoint in {tmp_path / 'empty'}): "
        "pass --init-from SOURCE or --resume PATH"
    ]
