"""Tests of the HuggingFace export (GPT.save_pretrained / gpt2lib.hf.write_hf_checkpoint): the
directory alone, offline, loads in transformers' AutoTokenizer, AutoModelForCausalLM and
pipeline("text-generation"), and re-exports replace it atomically. CPU only, no network.

The references are independent of the exported files: tiktoken's gpt2 encoding for the tokenizer's
ids, and our own GPT (its logits, and its greedy decoding through train_gpt2.generate with top_k=1)
for the exported model.
"""

import logging
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from test_model import _corpus_text, perturb_, token_batch  # noqa: E402

import train_gpt2  # noqa: E402
from gpt2lib import common, hf  # noqa: E402
from gpt2lib.common import GPT2_EOT  # noqa: E402
from train_gpt2 import GPT, UserError, config_for  # noqa: E402

BLOCK = 64
PROMPTS = ["Hello, I'm a language model,", "Tabs\tand  spaces,\nnewlines and ünïcödé 🤖:"]
TRICKY_TEXTS = [
    "Hello, world",
    "Ünïcödé façade naïve — Straße, 日本語のテキスト, русский, עברית, العربية, e\u0301",
    "Emoji 🤖🎉🚀, a family 👨\u200d👩\u200d👧, a flag 🇫🇷, a skin tone 👍🏽",
    "multiple     spaces,  two,   three   ",
    "\n\n\nnewlines\n \n\r\nand CRLF\r\n",
    "\ttabs\t\tand\t \tmixed\t",
    "   leading spaces and trailing newline\n",
    " a . b , c 's 'S n't ?! ...",  # what clean_up_tokenization_spaces would rewrite
    "Numbers 1234567890 3.14159 -2.5e-10 0x1F $9.99 100%",
]
SPECIAL_TEXTS = ["<|endoftext|>", "end.<|endoftext|>Start", "a <|endoftext|> b\n<|endoftext|><|endoftext|>"]


def tiny_model(seed):
    """A d2-shaped GPT with a short context and a padded vocabulary, every weight random; the
    padding rows hold large values that must not reach the export."""
    torch.manual_seed(seed)
    model = GPT(config_for("d2", block_size=BLOCK, vocab_multiple=64)).eval()
    perturb_(model, seed=seed + 100)
    with torch.no_grad():
        model.transformer.wte.weight[model.config.vocab_size :] = 50.0
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, offline):
    model = tiny_model(seed=7)
    directory = tmp_path_factory.mktemp("export") / "tiny"
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported[1])


def test_exported_tokenizer_loads_with_gpt2_settings(hf_tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf_tokenizer, PreTrainedTokenizerFast)
    assert len(hf_tokenizer) == train_gpt2.GPT2_VOCAB_SIZE
    assert hf_tokenizer.model_max_length == BLOCK
    assert hf_tokenizer.convert_ids_to_tokens(GPT2_EOT) == "<|endoftext|>"
    ids = {
        hf_tokenizer.bos_token_id,
        hf_tokenizer.eos_token_id,
        hf_tokenizer.unk_token_id,
        hf_tokenizer.pad_token_id,
    }
    assert ids == {GPT2_EOT}
    assert hf_tokenizer.padding_side == "left"
    assert hf_tokenizer("Hello, world").input_ids == [15496, 11, 995]  # no BOS/EOS added


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=range(len(TRICKY_TEXTS)))
def test_exported_tokenizer_ids_equal_tiktoken(hf_tokenizer, text):
    enc = train_gpt2.get_encoding()
    ids = hf_tokenizer(text).input_ids
    assert ids == enc.encode_ordinary(text)
    assert hf_tokenizer.decode(ids) == text


def test_exported_tokenizer_on_a_long_corpus(hf_tokenizer):
    """Prose and code, 15k tokens, including test_model's VARIED_TEXT."""
    enc = train_gpt2.get_encoding()
    text = _corpus_text()
    assert text.count("<|endoftext|>") == 1
    assert hf_tokenizer(text).input_ids == enc.encode(text, allowed_special="all")
    ordinary = text.replace("<|endoftext|>", "")
    ids = hf_tokenizer(ordinary).input_ids
    assert len(ids) > 10_000
    assert ids == enc.encode_ordinary(ordinary)
    assert hf_tokenizer.decode(ids) == ordinary


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_endoftext_text_is_the_special_token(hf_tokenizer, text):
    """HF maps the text "<|endoftext|>" to 50256, as tiktoken's encode(allowed_special="all") does;
    encode_ordinary spells it out, and so does HF with split_special_tokens=True (transformers >= 4.45)."""
    enc = train_gpt2.get_encoding()
    ids = hf_tokenizer(text).input_ids
    assert ids == enc.encode(text, allowed_special="all")
    assert ids.count(GPT2_EOT) == text.count("<|endoftext|>")
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer(text, split_special_tokens=True).input_ids == enc.encode_ordinary(text)
    assert GPT2_EOT not in enc.encode_ordinary(text)


def test_exported_model_logits_equal_ours(exported):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    model, directory = exported
    hf, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    hf.eval()
    assert isinstance(hf, GPT2LMHeadModel)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.dtype == torch.float32
    assert hf.config.vocab_size == train_gpt2.GPT2_VOCAB_SIZE and hf.config.n_positions == BLOCK
    assert hf.generation_config.pad_token_id == hf.generation_config.eos_token_id == GPT2_EOT
    idx = token_batch(T=BLOCK)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape == (2, BLOCK, train_gpt2.GPT2_VOCAB_SIZE)
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert ours.abs().max().item() > 1.0  # the comparison is not between near-zero logits


class WarningRecorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_pipeline_greedy_text_equals_our_greedy_decoding(exported):
    """A batch of two prompts of different lengths: padding (left, with <|endoftext|>) must not
    change the generation, and transformers must not warn about padding."""
    from transformers import pipeline

    model, directory = exported
    new_tokens = 8
    ours = [train_gpt2.generate(model, prompt, new_tokens, top_k=1)[0] for prompt in PROMPTS]
    for prompt, text in zip(PROMPTS, ours):
        # HF stops at <|endoftext|>, we do not: a continuation without it keeps the comparison fair
        assert text.startswith(prompt) and len(text) > len(prompt) and "<|endoftext|>" not in text
    generator = pipeline("text-generation", model=str(directory))
    recorder = WarningRecorder()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(recorder)
    try:
        out = generator(PROMPTS, max_new_tokens=new_tokens, do_sample=False, batch_size=2)
    finally:
        hf_logger.removeHandler(recorder)
    assert [o[0]["generated_text"] for o in out] == ours
    # about padding ("right-padding was detected", "Setting pad_token_id to eos_token_id"); other
    # warnings depend on the transformers version (4.57's pipeline warns about its own temperature)
    assert [m for m in recorder.messages if "pad" in m.lower()] == []


def test_our_reader_round_trips_the_export(exported):
    model, directory = exported
    again = GPT.from_pretrained(str(directory), vocab_multiple=64)
    for (key, a), (key2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert key == key2
        if key in ("transformer.wte.weight", "lm_head.weight"):  # the padding rows are not exported
            a, b = a[: model.config.vocab_size], b[: model.config.vocab_size]
        assert torch.equal(a, b), key


# -----------------------------------------------------------------------------
# replacing an earlier export


def export_files(directory):
    return {name: (Path(directory) / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_reexport_replaces_the_directory_completely(tmp_path, offline):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "out"
    first.save_pretrained(out)
    first_files = export_files(out)
    files = set(first_files)
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert hf.EXPORT_MARKER in files
    (out / "notes.txt").write_bytes(b"a user's file, added to the export")
    with pytest.raises(UserError, match="did not write .notes.txt."):
        second.save_pretrained(out)
    assert export_files(out) == {**first_files, "notes.txt": b"a user's file, added to the export"}
    (out / "notes.txt").unlink()
    second.save_pretrained(out)
    assert set(os.listdir(out)) == files
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directories left behind
    fresh = tmp_path / "fresh"
    second.save_pretrained(fresh)

    def same(files):  # all but the export marker: it names the target
        return {name: data for name, data in files.items() if name != hf.EXPORT_MARKER}

    assert same(export_files(out)) == same(export_files(fresh))
    assert export_files(out)["model.safetensors"] != first_files["model.safetensors"]


@pytest.mark.parametrize(
    "failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_failed_reexport_keeps_the_earlier_one(tmp_path, monkeypatch, offline, failure):
    import safetensors.torch

    out = tmp_path / "out"
    tiny_model(seed=1).save_pretrained(out)
    before = export_files(out)
    real_save_file = safetensors.torch.save_file

    def save_half_then_fail(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    if isinstance(failure, OSError):
        with pytest.raises(UserError, match="No space left") as e:
            tiny_model(seed=2).save_pretrained(out)
        assert str(out) in str(e.value) and "\n" not in str(e.value)
    else:
        with pytest.raises(KeyboardInterrupt):
            tiny_model(seed=2).save_pretrained(out)
    assert export_files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_final_rename_puts_the_earlier_export_back(tmp_path, monkeypatch, offline):
    out = tmp_path / "out"
    tiny_model(seed=1).save_pretrained(out)
    before = export_files(out)
    real_rename = os.rename

    def refuse_new_export(src, dst):
        if os.path.basename(src).startswith(".tmp-export-"):
            raise PermissionError(13, "Permission denied")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_new_export)
    with pytest.raises(UserError, match="Permission denied"):
        tiny_model(seed=2).save_pretrained(out)
    assert export_files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_refuses_to_replace_what_is_not_an_export(tmp_path, offline):
    model = tiny_model(seed=1)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export") as e:
        model.save_pretrained(notes)
    assert str(notes) in str(e.value) and "\n" not in str(e.value)
    assert (notes / "todo.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    with pytest.raises(UserError, match="is a file"):
        model.save_pretrained(a_file)
    assert a_file.read_text() == "keep me too"
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)
    assert (empty / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty", "notes"]


def user_tree(root, files):
    """Create files {relative path: bytes} under root; returns them, for comparing afterwards."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["hf-model-folder", "trainer-output", "git-checkout"])
def test_export_leaves_every_user_file_in_place(tmp_path, monkeypatch, offline, kind):
    """Folders that hold a config.json but are not exports of this project are refused, untouched."""
    target = tmp_path / "work"
    files = {
        "hf-model-folder": {
            "config.json": b'{"model_type": "gpt2"}',
            "model.safetensors": b"weights",
            "README.md": b"# my model",
            "tokenizer.json": b"{}",
            "training_args.bin": b"args",
        },
        "trainer-output": {
            "config.json": b"{}",
            "checkpoint-500/model.safetensors": b"w",
            "checkpoint-500/trainer_state.json": b"{}",
            "runs/events.out": b"tb",
        },
        "git-checkout": {
            "config.json": b'{"editor": "vim"}',
            ".git/HEAD": b"ref: refs/heads/main",
            "src/app.py": b"print(1)",
        },
    }[kind]
    user_tree(target, files)
    monkeypatch.chdir(target)
    with pytest.raises(UserError, match="not an earlier export") as e:
        tiny_model(seed=1).save_pretrained("." if kind == "git-checkout" else target)
    assert "\n" not in str(e.value)
    assert tree(target) == files
    assert os.listdir(tmp_path) == ["work"]  # no temporary directory left next to it


def test_export_removes_what_killed_exports_to_it_left_and_nothing_else(tmp_path, offline):
    out = tmp_path / "out"
    model = tiny_model(seed=1)
    model.save_pretrained(out)
    # a killed export to out (its marker names out), one to another target, and a user's look-alike
    ours = tmp_path / ".tmp-export-out-k1ll3d"
    shutil.copytree(out, ours)
    (ours / "model.safetensors").write_bytes(b"half")
    theirs = tmp_path / ".tmp-export-other-k1ll3d"
    shutil.copytree(out, theirs)
    hf.write_marker(theirs, "other", os.listdir(theirs))
    lookalike = user_tree(tmp_path / ".tmp-export-out-mine", {"notes.txt": b"mine"})
    model.save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == [".tmp-export-other-k1ll3d", ".tmp-export-out-mine", "out"]
    assert tree(tmp_path / ".tmp-export-out-mine") == lookalike


def test_export_files_get_the_usual_permissions(tmp_path, offline):
    old = os.umask(0o022)
    try:
        tiny_model(seed=1).save_pretrained(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    modes = {
        name: stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in os.listdir(tmp_path / "out")
    }
    assert set(modes.values()) == {0o644}, modes


def test_tampered_bpe_file_is_refused(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = common.offline_bpe_files()
    tampered = tmp_path / "vocab.bpe"
    tampered.write_bytes(Path(vocab_bpe).read_bytes().replace(b"\xc4\xa0 t\n", b"t \xc4\xa0\n", 1))
    monkeypatch.setattr(hf, "offline_bpe_files", lambda: (str(tampered), encoder_json))
    with pytest.raises(UserError, match="SHA-256") as e:
        hf.hf_gpt2_tokenizer(BLOCK)
    assert str(tampered) in str(e.value)


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, offline):
    from test_integrity import tmpfs

    with tmpfs(tmp_path / "disk", "2m") as disk:  # the weights alone are ~13 MB
        with pytest.raises(UserError, match="cannot write the export .* check free space") as e:
            tiny_model(seed=1).save_pretrained(disk / "out")
        assert "\n" not in str(e.value)
        assert os.listdir(disk) == []  # no temporary directory, no half export
