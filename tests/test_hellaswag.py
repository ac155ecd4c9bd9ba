"""HellaSwag (gpt2lib/hellaswag_data.py, gpt2lib/hellaswag_scoring.py and the hellaswag.py command
line): batched scoring equals per-example fp32 scoring, acc and acc_norm are not swapped, HF directory
and train_gpt2 checkpoint agree, downloads are atomic, bad input is a clear error."""

import dataclasses
import http.server
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading

import pytest
import torch
from torch.nn import functional as F

import hellaswag
from gpt2lib import hellaswag_data, hellaswag_scoring
from gpt2lib.common import UserError, get_encoding
from train_gpt2 import GPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ROWS = 24
WORDS = (
    "the man woman dog ball kitchen runs jumps slowly quickly into across table guitar plays "
    "water bike rides mountain smiles camera then after picks up puts down holds sings"
).split()


def render_example(example):
    """build-nanogpt's per-example view, the reference the batched scorer is checked against:
    (data, tokens, mask, label) with tokens (4, T) the four context+ending rows right-padded with 0,
    and mask (4, T) 1 on the ending tokens."""
    enc = get_encoding()
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    ending_tokens = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    width = max(len(ctx_tokens) + len(e) for e in ending_tokens)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, end in enumerate(ending_tokens):
        row = ctx_tokens + end
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens) : len(row)] = 1
    return data, tokens, mask, example["label"]


def example_losses(
    model,
    examples,
    device=None,
    batch_size=hellaswag_scoring.DEFAULT_BATCH_SIZE,
    autocast_dtype=None,
    max_tokens=None,
    style=None,
):
    """Per-example ending losses of the batched scorer, in input order, on the CPU: (sum (n, 4),
    normalized (n, 4)), normalized being per ending token (completion) or per character (harness)."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    batches = hellaswag_scoring._local_batches(examples, device, 0, 1, batch_size, max_tokens, style)
    sums = hellaswag_scoring._row_losses(model, batches, device, autocast_dtype, progress=False)
    return sums.cpu(), (sums / batches.lengths).cpu()


def make_rows(n, seed=0):
    """HellaSwag-format rows with contexts of 3-30 words and endings of 1-15 words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize() + "."
        endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15))) + "." for _ in range(4)]
        rows.append(
            {
                "ind": i,
                "activity_label": "Testing",
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "split": "val",
                "split_type": "indomain",
                "label": rng.randint(0, 3),
                "endings": endings,
                "source_id": f"test~{i}",
            }
        )
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 24-row data file, a random small HF GPT-2 directory, the same weights as a train_gpt2.py
    checkpoint (with the vocabulary padded, as training does), and the per-example fp32 reference."""
    import transformers

    root = tmp_path_factory.mktemp("hellaswag")
    data = write_jsonl(root / "data.jsonl", make_rows(N_ROWS))
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.2
    )  # large weights: clear preferences, no near-ties
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_dir = str(root / "hf")
    hf_model.save_pretrained(hf_dir)
    ours = GPT.from_pretrained(hf_dir, vocab_multiple=64)
    assert ours.lm_head.weight.size(0) == 50304  # padded rows must be ignored by the scorer
    ckpt = str(root / "model_00000.pt")
    torch.save({"model": ours.state_dict(), "config": dataclasses.asdict(ours.config), "step": 0}, ckpt)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    examples = hellaswag_data.load_examples(data_path=data)
    ref_sum, ref_mean = reference_losses(lambda t: hf_model(t).logits, examples)
    labels = torch.tensor([ex["label"] for ex in examples])
    return {
        "root": root,
        "data": data,
        "hf_dir": hf_dir,
        "ckpt": ckpt,
        "hf_model": hf_model,
        "ours": ours.eval(),
        "examples": examples,
        "ref_sum": ref_sum,
        "ref_mean": ref_mean,
        "labels": labels,
    }


def reference_losses(logits_fn, examples):
    """Each example on its own, in fp32, from render_example and the full logits."""
    sums, means = [], []
    for example in examples:
        _, tokens, mask, _ = render_example(example)
        with torch.no_grad():
            logits = logits_fn(tokens).float()
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, -1)
        m = mask[:, 1:].float()
        sums.append((losses * m).sum(1))
        means.append((losses * m).sum(1) / m.sum(1))
    return torch.stack(sums), torch.stack(means)


def test_render_example_rows_and_mask():
    enc = get_encoding()
    example = {"ctx": "Hello there", "endings": ["cat", "dog dog dog dog", "fish fish", "x"], "label": 2}
    data, tokens, mask, label = render_example(example)
    ctx = enc.encode("Hello there")
    assert ctx == [15496, 612] and label == 2 and data["ctx_tokens"] == ctx
    assert data["ending_tokens"][0] == [3797] and data["ending_tokens"][1] == [3290] * 4
    assert tokens.shape == mask.shape == (4, 6)
    assert tokens[1].tolist() == ctx + [3290] * 4
    assert tokens[0].tolist() == ctx + [3797, 0, 0, 0]  # right-padded with 0
    assert mask[0].tolist() == [0, 0, 1, 0, 0, 0] and mask[1].tolist() == [0, 0, 1, 1, 1, 1]


def test_batched_equals_per_example_fp32(workdir):
    examples, hf = workdir["examples"], workdir["hf_model"]
    ref_sum, ref_mean, labels = workdir["ref_sum"], workdir["ref_mean"], workdir["labels"]
    gaps = ref_mean.sort(1).values[:, 1] - ref_mean.sort(1).values[:, 0]
    assert gaps.min() > 1e-3  # the data really tests predictions (no near-ties)
    assert ref_sum.argmin(1).tolist() != ref_mean.argmin(1).tolist()  # and tells the two metrics apart
    tok = hellaswag_scoring.tokenize_examples(examples)
    for batch_size, max_tokens in [(64, None), (2, 150)]:  # one forward; many uneven ones
        got_sum, got_mean = example_losses(hf, tok, "cpu", batch_size=batch_size, max_tokens=max_tokens)
        assert torch.allclose(got_mean, ref_mean, atol=1e-4, rtol=0)
        assert torch.allclose(got_sum, ref_sum, atol=1e-4, rtol=1e-6)
        assert torch.equal(got_sum.argmin(1), ref_sum.argmin(1))
        assert torch.equal(got_mean.argmin(1), ref_mean.argmin(1))
    assert len(tok._batches[(0, 1, 2, 150, "cpu")].batches) > 10
    counts = hellaswag_scoring.evaluate(
        hf, examples, "cpu", batch_size=5
    ).tolist()  # dicts, not pre-tokenized
    assert counts == [
        N_ROWS,
        int((ref_sum.argmin(1) == labels).sum()),
        int((ref_mean.argmin(1) == labels).sum()),
    ]


def test_our_gpt_matches_hf(workdir):
    tok = hellaswag_scoring.tokenize_examples(workdir["examples"])
    our_sum, our_mean = example_losses(workdir["ours"], tok, "cpu")
    assert torch.allclose(our_sum, workdir["ref_sum"], atol=1e-4, rtol=1e-6)
    assert torch.allclose(our_mean, workdir["ref_mean"], atol=1e-4)
    # a plain logits function (our GPT called directly returns (logits, loss)) takes the full-logits path
    fn_sum, _ = example_losses(lambda idx: workdir["ours"](idx), tok[:6], "cpu")
    assert torch.allclose(fn_sum, workdir["ref_sum"][:6], atol=1e-4, rtol=1e-6)


def test_cli_model_dir_and_checkpoint_agree(workdir, capsys):
    root, ref_sum, ref_mean, labels = (
        workdir["root"],
        workdir["ref_sum"],
        workdir["ref_mean"],
        workdir["labels"],
    )
    out_m, out_c = str(root / "m.json"), str(root / "c.json")
    res_m = hellaswag.main(["-m", workdir["hf_dir"], "--data", workdir["data"], "-d", "cpu", "--json", out_m])
    printed = capsys.readouterr().out
    res_c = hellaswag.main(
        ["-c", workdir["ckpt"], "--data", workdir["data"], "-d", "cpu", "--json", out_c, "--batch-size", "3"]
    )
    with open(out_m) as f:
        json_m = json.load(f)
    with open(out_c) as f:
        json_c = json.load(f)
    assert set(json_m) == set(json_c) == {"n", "acc", "acc_norm", "style", "seconds"}
    assert json_m["style"] == json_c["style"] == "completion"
    assert {k: json_m[k] for k in ("n", "acc", "acc_norm")} == {
        k: json_c[k] for k in ("n", "acc", "acc_norm")
    }
    assert json_m["n"] == res_m["n"] == res_c["n"] == N_ROWS
    # and they are the per-example reference's numbers
    assert json_m["acc"] == pytest.approx((ref_sum.argmin(1) == labels).float().mean().item())
    assert json_m["acc_norm"] == pytest.approx((ref_mean.argmin(1) == labels).float().mean().item())
    assert f"n={N_ROWS} acc={json_m['acc']:.4f} acc_norm={json_m['acc_norm']:.4f}" in printed
    assert not [
        p for p in os.listdir(root) if p.endswith(".tmp")
    ]  # the JSON went through a renamed temp file
    res = hellaswag.main(["-c", workdir["ckpt"], "--data", workdir["data"], "-d", "cpu", "--limit", "7"])
    assert res["n"] == 7 and res["acc"] == pytest.approx(
        (ref_sum[:7].argmin(1) == labels[:7]).float().mean().item()
    )


def cost_logits(costs, vocab=50257):
    """A fake model whose next-token distribution is the same everywhere: token v costs costs[v] nats
    (-log p); the other ids share the remaining probability."""
    p = torch.zeros(vocab, dtype=torch.float64)
    for tok, c in costs.items():
        p[tok] = math.exp(-c)
    rest = [v for v in range(vocab) if v not in costs]
    p[rest] = (1 - p.sum()) / len(rest)
    bias = p.log().float()

    def logits_fn(idx):
        return bias.expand(idx.size(0), idx.size(1), vocab)

    return logits_fn


def test_acc_and_acc_norm_pick_different_endings():
    enc = get_encoding()
    cat, dog, fish = enc.encode(" cat"), enc.encode(" dog"), enc.encode(" fish")
    assert len(cat) == len(dog) == len(fish) == 1
    fn = cost_logits({cat[0]: 5.0, dog[0]: 2.0, fish[0]: 10.0})  # context tokens cost about ln(50257)
    # ending 1 " cat": sum 5, mean 5; ending 2 " dog dog dog dog": sum 8, mean 2;
    # " fish fish": sum 20, mean 10
    endings = ["fish fish", "cat", "dog dog dog dog", "fish fish fish"]
    examples = [
        {"ctx": "Hello there", "endings": endings, "label": 1},  # acc right, acc_norm wrong
        {"ctx": "The cat sat", "endings": endings, "label": 2},  # acc wrong, acc_norm right
        {"ctx": "A dog", "endings": endings, "label": 2},
    ]
    sums, means = example_losses(fn, examples, "cpu")
    assert sums[0].tolist() == pytest.approx([20.0, 5.0, 8.0, 30.0], abs=1e-3)
    assert means[0].tolist() == pytest.approx([10.0, 5.0, 2.0, 10.0], abs=1e-3)
    assert sums.argmin(1).tolist() == [1, 1, 1]
    assert means.argmin(1).tolist() == [2, 2, 2]
    assert hellaswag_scoring.evaluate(fn, examples, "cpu").tolist() == [3, 1, 2]
    assert hellaswag_scoring.evaluate_model(fn, examples, "cpu") == {"n": 3, "acc": 1 / 3, "acc_norm": 2 / 3}


def test_ranks_split_the_work_and_batches_are_cached(workdir):
    tok = hellaswag_scoring.tokenize_examples(workdir["examples"][:10])
    whole = hellaswag_scoring.evaluate(workdir["ours"], tok, "cpu", batch_size=4)
    parts = [
        hellaswag_scoring.evaluate(workdir["ours"], tok, "cpu", rank=r, world_size=3, batch_size=4)
        for r in range(3)
    ]
    assert [p[0].item() for p in parts] == [4, 3, 3]
    assert torch.equal(sum(parts), whole) and whole.dtype == torch.int64 and whole[0].item() == 10
    ref_sum, ref_mean, labels = workdir["ref_sum"][:10], workdir["ref_mean"][:10], workdir["labels"][:10]
    assert whole.tolist() == [
        10,
        int((ref_sum.argmin(1) == labels).sum()),
        int((ref_mean.argmin(1) == labels).sum()),
    ]
    assert len(tok._batches) == 4
    again = hellaswag_scoring.evaluate(workdir["ours"], tok, "cpu", batch_size=4)  # reuses the cached batches
    assert torch.equal(again, whole) and len(tok._batches) == 4


def test_row_longer_than_model_context(workdir):
    example = {"ctx": " ".join(["word"] * 200), "endings": ["a", "b", "c", "d"], "label": 0}
    with pytest.raises(UserError, match="more than the model's context of 128"):
        hellaswag_scoring.evaluate(workdir["hf_model"], [example], "cpu")


# -----------------------------------------------------------------------------
# harness style (lm-evaluation-harness 0.4's hellaswag task)


@pytest.mark.parametrize(
    "row, query, choices",
    [
        # WikiHow: " [title]" ends a sentence, other tags go, double spaces collapse;
        # capitalize() meets "[" first
        (
            {
                "activity_label": "Home and Garden",
                "ctx_a": "[header] How to grow basil [title] Pick a sunny spot.",
                "ctx_b": "[step] water it  Daily.",
                "endings": ["  [substeps] Use a  pencil. ", "Wash the cat [title] Dry it.", "a   b", "x"],
            },
            "Home and Garden: How to grow basil. Pick a sunny spot. water it daily.",
            [" Use a pencil.", "Wash the cat. Dry it.", "a  b", "x"],
        ),
        # ctx_b non-empty: its first letter goes up, the rest down
        (
            {
                "activity_label": "Playing guitar",
                "ctx_a": "A man sits on a stool.",
                "ctx_b": "he plays a Fender NOW.",
                "endings": ["He smiles.", "b", "c", "d"],
            },
            "Playing guitar: A man sits on a stool. He plays a fender now.",
            ["He smiles.", "b", "c", "d"],
        ),
        # ctx_b empty; outer whitespace stripped; three spaces leave two (one pass of "  " -> " ")
        (
            {
                "activity_label": " Surfing",
                "ctx_a": "  A woman rides a wave. ",
                "ctx_b": "",
                "endings": [" She falls. ", "b", "c", "d"],
            },
            "Surfing:  A woman rides a wave.",
            ["She falls.", "b", "c", "d"],
        ),
        # a trailing [title] leaves the query ending with a space
        (
            {
                "activity_label": "Arts",
                "ctx_a": "[header] How to draw a cat [title]",
                "ctx_b": "",
                "endings": ["Take a pencil.", "b", "c", "d"],
            },
            "Arts: How to draw a cat. ",
            ["Take a pencil.", "b", "c", "d"],
        ),
    ],
)
def test_harness_preprocessing(row, query, choices):
    assert hellaswag_scoring.harness_query(row) == query
    assert hellaswag_scoring.harness_choices(row) == choices


def test_harness_tokenization_splits_as_the_hf_backend():
    enc = get_encoding()
    base = {"ctx_b": "", "label": 0, "endings": ["Take a pencil.", "[substeps] Use  ink.", "b", "c"]}
    rows = [
        dict(base, activity_label="Arts", ctx_a="[header] How to draw a cat [title]"),  # query ends with " "
        dict(base, activity_label="[x", ctx_a="y]"),
    ]  # the query is empty after cleanup
    tok = hellaswag_scoring.tokenize_examples(rows, style="harness")
    # the query's trailing space moves to the continuation: "cat." | "  Take a pencil."; the second
    # choice keeps the space its removed tag left: "cat." | "   Use ink."
    assert tok.ctx[0] == enc.encode("Arts: How to draw a cat.")
    assert tok.endings[0][0] == enc.encode("  Take a pencil.") and tok.endings[0][1] == enc.encode(
        "   Use ink."
    )
    assert enc.encode("  Take a pencil.")[0] == enc.encode(" ")[0]  # the moved space is a token of its own
    # an empty context becomes <|endoftext|>, as the harness does
    assert tok.ctx[1] == [enc.eot_token] and tok.endings[1][0] == enc.encode(" Take a pencil.")
    # acc_norm divides by the cleaned ending's characters, without the continuation's leading " "
    assert tok.norm_lengths == [[14, 9, 1, 1], [14, 9, 1, 1]] and tok.style == "harness"
    assert tok[1:].norm_lengths == [[14, 9, 1, 1]] and tok[1:].style == "harness"
    default = hellaswag_scoring.tokenize_examples([dict(rows[0], ctx="x")])
    assert default.style == "completion" and default.norm_lengths == [[len(e) for e in default.endings[0]]]


def make_harness_rows(n, seed=0):
    """Rows shaped like the val split's WikiHow and ActivityNet rows, drawing on every cleanup rule:
    tags, " [title]", double spaces, outer whitespace, empty and non-empty ctx_b, queries that end
    with a space, endings that start with one."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    ctx_bs = [
        lambda: "",
        lambda: words(2, 8),
        lambda: words(1, 3) + " The Man " + words(1, 3),
        lambda: "[step]",
    ]
    endings = [
        lambda: words(1, 12) + ".",
        lambda: "[substeps] " + words(1, 8) + ".",
        lambda: words(1, 5) + "  " + words(1, 5) + ".",
        lambda: "  " + words(1, 8) + ". ",
        lambda: words(1, 5) + " [title] " + words(1, 5).capitalize() + ".",
    ]
    rows = []
    for i in range(n):
        ctx_a = words(3, 12).capitalize() + "."
        if rng.random() < 0.5:
            ctx_a = f"[header] How to {words(2, 4)} [title] " + ctx_a
        ctx_b = rng.choice(ctx_bs)()
        rows.append(
            {
                "ind": i,
                "activity_label": rng.choice(["Surfing", "Home and Garden", " Cooking "]),
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx_a + " " + ctx_b if ctx_b else ctx_a,
                "split": "val",
                "split_type": "zeroshot",
                "label": rng.randint(0, 3),
                "endings": [rng.choice(endings)() for _ in range(4)],
                "source_id": f"test~{i}",
            }
        )
    return rows


def harness_reference(model, rows):
    """Each continuation on its own, as the harness's HF backend scores it: split the strings, encode
    whole and context, one full forward of context + continuation tokens, log_softmax, and the sum
    over the continuation. Returns (log-likelihoods (n, 4), choice lengths in characters (n, 4))."""
    enc = get_encoding()
    lls, chars = [], []
    for row in rows:
        query, choices = hellaswag_scoring.harness_query(row), hellaswag_scoring.harness_choices(row)
        row_lls = []
        for choice in choices:
            context, continuation = query, " " + choice
            while context[-1:].isspace():
                context, continuation = context[:-1], context[-1] + continuation
            ctx_ids = enc.encode_ordinary(context)
            cont_ids = enc.encode_ordinary(context + continuation)[len(ctx_ids) :]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ctx_ids + cont_ids])).logits[0].float(), dim=-1)
            row_lls.append(sum(logp[len(ctx_ids) - 1 + k, t].item() for k, t in enumerate(cont_ids)))
        lls.append(row_lls)
        chars.append([len(c) for c in choices])
    return torch.tensor(lls, dtype=torch.float64), torch.tensor(chars, dtype=torch.float64)


@pytest.fixture(scope="module")
def harness(workdir):
    rows = make_harness_rows(N_ROWS, seed=1)
    data = write_jsonl(workdir["root"] / "harness.jsonl", rows)
    lls, chars = harness_reference(workdir["hf_model"], rows)
    return {
        "rows": rows,
        "data": data,
        "lls": lls,
        "chars": chars,
        "labels": torch.tensor([row["label"] for row in rows]),
    }


def top_gap(scores):
    top2 = scores.sort(1, descending=True).values[:, :2]
    return (top2[:, 0] - top2[:, 1]).min().item()


def test_harness_style_equals_per_example_reference(workdir, harness):
    rows, lls, chars, labels = harness["rows"], harness["lls"], harness["chars"], harness["labels"]
    queries = [hellaswag_scoring.harness_query(row) for row in rows]
    choices = [c for row in rows for c in hellaswag_scoring.harness_choices(row)]
    # the data exercises the whitespace move and tells the two metrics apart, without near-ties
    assert any(q.endswith(" ") for q in queries) and any(c.startswith(" ") for c in choices)
    assert lls.argmax(1).tolist() != (lls / chars).argmax(1).tolist()
    assert top_gap(lls) > 1e-3 and top_gap(lls / chars) > 1e-3
    tok = hellaswag_scoring.tokenize_examples(rows, style="harness")
    for batch_size, max_tokens in [(64, None), (2, 150)]:
        got_sum, got_norm = example_losses(
            workdir["hf_model"], tok, "cpu", batch_size=batch_size, max_tokens=max_tokens
        )
        assert torch.allclose(-got_sum.double(), lls, atol=1e-4, rtol=0)
        assert torch.allclose(-got_norm.double(), lls / chars, atol=1e-4, rtol=0)
        assert torch.equal(got_sum.argmin(1), lls.argmax(1))
        assert torch.equal(got_norm.argmin(1), (lls / chars).argmax(1))
    expected = [N_ROWS, int((lls.argmax(1) == labels).sum()), int(((lls / chars).argmax(1) == labels).sum())]
    assert (
        hellaswag_scoring.evaluate(workdir["hf_model"], rows, "cpu", batch_size=5, style="harness").tolist()
        == expected
    )
    # our GPT, split across ranks, gives the same counts
    parts = [hellaswag_scoring.evaluate(workdir["ours"], tok, "cpu", rank=r, world_size=2) for r in range(2)]
    assert sum(parts).tolist() == expected
    # the completion style scores other strings and gets other losses from the same rows
    completion_sum, _ = example_losses(workdir["hf_model"], rows, "cpu")
    assert not torch.allclose(-completion_sum.double(), lls, atol=1e-2)


def test_cli_harness_style(workdir, harness, capsys):
    lls, chars, labels = harness["lls"], harness["chars"], harness["labels"]
    out = str(workdir["root"] / "harness.json")
    hellaswag.main(
        [
            "-c",
            workdir["ckpt"],
            "--data",
            harness["data"],
            "-d",
            "cpu",
            "--style",
            "harness",
            "--json",
            out,
            "--batch-size",
            "3",
        ]
    )
    assert "harness style: n=24" in capsys.readouterr().out
    with open(out) as f:
        result = json.load(f)
    assert result["style"] == "harness" and result["n"] == N_ROWS
    assert result["acc"] == pytest.approx((lls.argmax(1) == labels).float().mean().item())
    assert result["acc_norm"] == pytest.approx(((lls / chars).argmax(1) == labels).float().mean().item())


def test_harness_normalizes_by_characters_not_tokens():
    """Every token costs a fixed amount, so the styles' normalizations disagree by construction:
    " cat" costs 1.55 nats, " international" 6, " fish" 10 (each one token).
    per token:                     cat 1.55,      international 6        -> cat
    per character of the choice:   cat 1.55/3,    international 6/13     -> international
    per character of " " + choice: cat 1.55/4,    international 6/14     -> cat"""
    enc = get_encoding()
    costs = {enc.encode(" cat")[0]: 1.55, enc.encode(" international")[0]: 6.0, enc.encode(" fish")[0]: 10.0}
    fn = cost_logits(costs)
    row = {
        "activity_label": "Pets",
        "ctx_a": "A man",
        "ctx_b": "",
        "ctx": "A man",
        "endings": ["fish fish", "cat", "international", "fish"],
        "label": 2,
    }
    h_sum, h_norm = example_losses(fn, [row], "cpu", style="harness")
    c_sum, c_norm = example_losses(fn, [row], "cpu")
    assert h_sum[0].tolist() == pytest.approx([20.0, 1.55, 6.0, 10.0], abs=1e-3)
    assert torch.equal(h_sum, c_sum)
    assert h_norm[0].tolist() == pytest.approx([20 / 9, 1.55 / 3, 6 / 13, 10 / 4], abs=1e-3)
    assert c_norm[0].tolist() == pytest.approx([10.0, 1.55, 6.0, 10.0], abs=1e-3)
    assert hellaswag_scoring.evaluate(fn, [row], "cpu", style="harness").tolist() == [1, 0, 1]
    assert hellaswag_scoring.evaluate(fn, [row], "cpu").tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="tokenized for style 'completion'"):
        hellaswag_scoring.evaluate(fn, hellaswag_scoring.tokenize_examples([row]), "cpu", style="harness")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activity_label": None}, "bad.jsonl:3: missing 'activity_label', which --style harness needs"),
        ({"ctx_a": 5}, "bad.jsonl:3: not a string: 'ctx_a', which --style harness needs"),
        ({"ctx_b": None}, "bad.jsonl:3: missing 'ctx_b'"),
    ],
)
def test_harness_style_needs_its_fields(tmp_path, capsys, change, message):
    row = make_rows(1, seed=7)[0]
    for field, value in change.items():
        if value is None:
            del row[field]
        else:
            row[field] = value
    path = bad_file(tmp_path, row)
    assert_cli_error(capsys, ["-m", "unused", "--data", path, "-d", "cpu", "--style", "harness"], message)
    assert len(hellaswag_data.load_examples(data_path=path)) == 5  # the completion style does not need them


# -----------------------------------------------------------------------------
# download


class Server:
    """http.server on 127.0.0.1 in a thread; routes: path -> (status, body, declared length or None)."""

    def __init__(self):
        self.routes, self.hits = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                status, body, declared = server.routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                self.wfile.write(body)  # fewer bytes than declared: the connection then closes

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(
        hellaswag_data.time, "sleep", lambda seconds: None
    )  # retries without the backoff wait
    s = Server()
    yield s
    s.close()


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_download_good_file_is_written_atomically_and_reused(server, tmp_path):
    body = jsonl_bytes(make_rows(5))
    server.routes["/good/hellaswag_train.jsonl"] = (200, body, None)
    cache = tmp_path / "cache"
    path = hellaswag_data.download("train", cache_dir=str(cache), url_base=server.url + "/good", backoff=0)
    assert path == str(cache / "hellaswag_train.jsonl")
    assert open(path, "rb").read() == body
    assert os.listdir(cache) == ["hellaswag_train.jsonl"]  # no temporary file left behind
    hellaswag_data.download("train", cache_dir=str(cache), url_base=server.url + "/good", backoff=0)
    assert server.hits == ["/good/hellaswag_train.jsonl"]  # the second call reused the file


@pytest.mark.parametrize("case", ["500", "truncated", "not-jsonl"])
def test_broken_download_retries_then_fails_leaving_nothing(server, tmp_path, case):
    body = jsonl_bytes(make_rows(5))
    server.routes["/x/hellaswag_train.jsonl"] = {
        "500": (500, b"oops", None),
        "truncated": (200, jsonl_bytes(make_rows(2)), len(body)),  # whole lines: only the length shows it
        "not-jsonl": (200, b"<html>proxy error</html>\n", None),
    }[case]
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"could not download .*after 3 tries.*--data"):
        hellaswag_data.download(
            "train", cache_dir=str(cache), url_base=server.url + "/x", retries=3, backoff=0
        )
    assert len(server.hits) == 3
    assert os.listdir(cache) == []  # neither the final file nor a temporary one


def test_download_404_does_not_retry(server, tmp_path):
    with pytest.raises(UserError, match=r"HTTP 404.*--data"):
        hellaswag_data.download("val", cache_dir=str(tmp_path), url_base=server.url + "/missing")
    assert server.hits == ["/missing/hellaswag_val.jsonl"]
    assert os.listdir(tmp_path) == []


def test_no_network_is_a_user_error_naming_data(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag_data.time, "sleep", lambda seconds: None)
    with socket.socket() as sock:  # a port that nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError, match=r"could not download .*ConnectionError.*--data FILE"):
        hellaswag_data.load_examples("val", cache_dir=str(tmp_path), url_base=f"http://127.0.0.1:{port}")
    assert os.listdir(tmp_path) == []


def test_official_val_row_count_is_checked(server, tmp_path):
    rows = make_rows(1, seed=3) * hellaswag_data.VAL_ROWS
    server.routes["/ok/hellaswag_val.jsonl"] = (200, jsonl_bytes(rows), None)
    server.routes["/short/hellaswag_val.jsonl"] = (200, jsonl_bytes(rows[:100]), None)
    with pytest.raises(UserError, match="expected 10,042"):
        hellaswag_data.load_examples("val", cache_dir=str(tmp_path / "a"), url_base=server.url + "/short")
    assert os.listdir(tmp_path / "a") == []
    examples = hellaswag_data.load_examples(
        "val", cache_dir=str(tmp_path / "b"), url_base=server.url + "/ok", limit=5
    )
    assert len(examples) == 5 and examples[0]["endings"] == rows[0]["endings"]
    # a --data file of any length is fine
    assert (
        len(hellaswag_data.load_examples("val", data_path=write_jsonl(tmp_path / "s.jsonl", rows[:100])))
        == 100
    )


# -----------------------------------------------------------------------------
# bad input: one clear line, exit code 2


def bad_file(tmp_path, bad_line):
    rows = make_rows(4)
    return write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [bad_line] + rows[2:])


def with_change(**change):
    row = make_rows(1, seed=7)[0]
    row.update(change)
    return row


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1', "bad.jsonl:3: not valid JSON"),
        (with_change(endings=["a", "b", "c"]), "bad.jsonl:3: 'endings' has 3 items, expected 4"),
        (with_change(endings=["a", "b", "c", 4]), "bad.jsonl:3: ending 3 is int, expected a string"),
        (with_change(label=4), "bad.jsonl:3: 'label' must be an integer 0-3, got 4"),
        (with_change(label="1"), "bad.jsonl:3: 'label' must be an integer 0-3, got '1'"),
        (with_change(ctx=None), "bad.jsonl:3: missing 'ctx'"),
        ("[1, 2]", "bad.jsonl:3: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, capsys, bad_line, message):
    path = bad_file(tmp_path, bad_line)
    assert_cli_error(capsys, ["-m", "unused", "--data", path, "-d", "cpu"], message)


def assert_cli_error(capsys, argv, message):
    """hellaswag.main(argv) exits 2 with one `error: ...` line on stderr that contains message."""
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nope.jsonl", "-m", "x"], "HellaSwag data file nope.jsonl does not exist"),
        (["-m", "x", "-c", "y.pt"], "exactly one of -m/--model"),
        ([], "exactly one of -m/--model"),
        (["-c", "missing.pt", "--data", "DATA"], "checkpoint missing.pt does not exist"),
        (["-m", "DIR/nothing-here", "--data", "DATA"], "could not load model"),
    ],
)
def test_bad_arguments_exit_2(workdir, capsys, args, message):
    args = [a.replace("DATA", workdir["data"]).replace("DIR", str(workdir["root"])) for a in args]
    assert_cli_error(capsys, args + ["-d", "cpu"], message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "gpt2", "-c", "x.pt"], "exactly one of -m/--model"),
        (["-m", "gpt2", "--data", "BAD"], "bad.jsonl:3: 'label' must be an integer 0-3"),
    ],
)
def test_cli_subprocess_errors_have_no_traceback(tmp_path, args, message):
    path = bad_file(tmp_path, with_change(label=7))
    env = dict(os.environ, HELLASWAG_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "hellaswag.py")] + [a.replace("BAD", path) for a in args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "cache")  # nothing was downloaded
