"""fineweb.py: local corpora -> token shards, identical across worker counts, resumable, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from train_gpt2 import GPT2_EOT, get_encoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# documents that exercise the tokenizer: plain English, an empty one, non-ASCII, and text that looks like
# the special token (must be encoded as ordinary text, never as 50256)
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 30,
    "",
    "Unicode: café, naïve, 日本語のテキスト, emoji 🐍🔥, math ∑∫√.",
    "A fake end token <|endoftext|> in the middle of a document must stay text.",
] + [
    f"Document {i}: " + "Python's help topics describe statements and expressions. " * (i % 7 + 1)
    for i in range(40)
]


@pytest.fixture(scope="module")
def enc():
    return get_encoding()


def expected_tokens(enc, docs):
    return np.array([t for d in docs for t in [GPT2_EOT] + enc.encode_ordinary(d)], dtype=np.uint16)


def write_parquet(path, docs, column="text", row_group_size=None):
    pq.write_table(
        pa.table(
            {
                "id": [f"<urn:{i}>" for i in range(len(docs))],
                column: docs,
                "token_count": list(range(len(docs))),
            }
        ),
        path,
        row_group_size=row_group_size,
    )
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read_shards(out, prefix):
    """The shards in index order, checking names: 0 is val, the rest train, indices contiguous."""
    names = sorted((n for n in os.listdir(out) if n.endswith(".npy")), key=lambda n: n[-10:])
    for i, name in enumerate(names):
        assert name == f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.npy"
    return [np.load(os.path.join(out, n)) for n in names]


def check_shards(shards, shard_size, expected):
    for s in shards:
        assert s.dtype == np.uint16 and s.ndim == 1
    assert all(len(s) == shard_size for s in shards[:-1])
    assert 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), expected)


def run_main(*argv):
    fineweb.main([str(a) for a in argv])


def error_of(capsys, *argv):
    """Run main expecting a user error: exit code 2 and exactly one `error: ...` line on stderr."""
    with pytest.raises(SystemExit) as e:
        run_main(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# -----------------------------------------------------------------------------
# round trips


def test_parquet_round_trip(tmp_path, monkeypatch, enc):
    import datasets

    resharded = []  # parquet is read one row group at a time (pyarrow otherwise buffers the file ahead)
    real_reshard = datasets.IterableDataset.reshard
    monkeypatch.setattr(
        datasets.IterableDataset, "reshard", lambda ds: resharded.append(1) or real_reshard(ds)
    )
    a = write_parquet(tmp_path / "a.parquet", DOCS[:20], row_group_size=3)  # row groups must stay in order
    b = write_parquet(tmp_path / "b.parquet", DOCS[20:])
    out = tmp_path / "out"
    run_main("--input", a, b, "--out", out, "--prefix", "fw", "--shard-size", 500, "--workers", 1)
    assert len(resharded) == 2
    expected = expected_tokens(enc, DOCS)
    shards = read_shards(out, "fw")
    assert len(shards) == -(-len(expected) // 500) >= 3
    check_shards(shards, 500, expected)
    # decoding shows each document once, in order, after its own end-of-text token
    assert enc.decode(np.concatenate(shards).tolist()) == "".join("<|endoftext|>" + d for d in DOCS)
    assert int(np.sum(np.concatenate(shards) == GPT2_EOT)) == len(DOCS)  # the fake one stayed text
    manifest = json.loads((out / "fw_manifest.json").read_text())
    assert manifest["complete"] is True and manifest["documents"] == len(DOCS)
    assert manifest["tokens"] == len(expected)


def test_mixed_inputs_jsonl_text_column_and_txt_keep_order(tmp_path, enc):
    j = write_jsonl(tmp_path / "a.jsonl", [{"content": d, "n": i} for i, d in enumerate(DOCS[:10])])
    p = write_parquet(tmp_path / "b.parquet", DOCS[10:20], column="content")
    t1, t2 = tmp_path / "c.txt", tmp_path / "d.txt"
    t1.write_text(DOCS[20])
    t2.write_text(DOCS[21])
    out = tmp_path / "out"
    run_main("--input", j, p, t1, t2, "--text-column", "content", "--out", out, "--shard-size", 300)
    check_shards(read_shards(out, "edufineweb"), 300, expected_tokens(enc, DOCS[:22]))


def test_txt_files_are_one_document_each(tmp_path, enc):
    # blank lines and line breaks inside a file must not split it into several documents
    texts = [
        "First file.\n\nIt has two paragraphs.\nAnd lines.\n",
        "",
        "Third file, one line, no newline",
        "\n\nleading blank lines\n\n\n",
    ]
    paths = []
    for i, t in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(t)
    out = tmp_path / "out"
    run_main("--input", *paths, "--out", out, "--prefix", "txt", "--shard-size", 8, "--workers", 1)
    shards = read_shards(out, "txt")
    check_shards(shards, 8, expected_tokens(enc, texts))
    assert int(np.sum(np.concatenate(shards) == GPT2_EOT)) == len(texts)


def test_tokenize_matches_encode_ordinary(enc):
    docs = DOCS + ["lone surrogate \ud800 here"]  # encode_to_numpy can't take it; the fallback must
    np.testing.assert_array_equal(fineweb.tokenize_batch(docs), expected_tokens(enc, docs))
    one = fineweb.tokenize_batch(["Hello, world"])
    assert one.dtype == np.uint16 and one.tolist() == [GPT2_EOT, 15496, 11, 995]


def test_token_ids_beyond_gpt2_vocabulary_are_refused_before_writing(monkeypatch):
    """uint16 holds ids up to 65535; an encoding with more than GPT-2's 50257 tokens must not pass."""

    class WideEncoding:
        def encode_to_numpy(self, doc, **kwargs):
            return np.array([15496, 50300], dtype=np.uint32)

    monkeypatch.setattr(fineweb, "get_encoding", lambda: WideEncoding())
    with pytest.raises(ValueError, match="token id 50300 out of GPT-2's vocabulary"):
        fineweb.tokenize_batch(["Hello"])


def test_workers_output_identical_to_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 300)  # many small batches: ordering across workers matters
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS * 5])
    outs = []
    for workers in (1, 2, 3):
        outs.append(tmp_path / f"w{workers}")
        run_main("--input", src, "--out", outs[-1], "--shard-size", 700, "--workers", workers)
    names = sorted(n for n in os.listdir(outs[0]) if n.endswith(".npy"))
    assert len(names) > 3
    for out in outs[1:]:
        assert sorted(n for n in os.listdir(out) if n.endswith(".npy")) == names
        for n in names:
            assert (out / n).read_bytes() == (outs[0] / n).read_bytes()


def test_tokenize_stream_bounds_batches_in_flight():
    # Pool.imap would read the whole input ahead; memory must not grow with the corpus
    workers, pulled, yielded = 2, [0], 0

    def batches():
        for i in range(50):
            pulled[0] += 1
            yield i, [f"document {i} " * 50]

    for first, n, tokens in fineweb.tokenize_stream(batches(), workers):
        assert first == yielded and n == 1 and tokens[0] == GPT2_EOT  # in order
        yielded += 1
        assert pulled[0] - yielded <= 2 * workers
    assert yielded == 50


def test_hub_is_the_default_source(tmp_path, monkeypatch, enc):
    import datasets

    calls = []
    local = write_parquet(tmp_path / "hub.parquet", DOCS)
    real = datasets.load_dataset

    def fake(path, name=None, **kw):  # stands in for the hub; no network here
        calls.append((path, name, kw))
        return real("parquet", data_files=[local], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    out = tmp_path / "out"
    run_main("--out", out, "--shard-size", 1000)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", {"split": "train", "streaming": True})]
    check_shards(read_shards(out, "edufineweb"), 1000, expected_tokens(enc, DOCS))
    args = fineweb.parse_args([])
    assert args.out == os.path.join(REPO, "edu_fineweb10B") and args.shard_size == 10**8
    assert args.prefix == "edufineweb" and args.workers == fineweb.available_cpus()


def test_hub_failure_is_one_line(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError(
            "Couldn't reach 'HuggingFaceFW/fineweb' on the Hub (LocalEntryNotFoundError)\nmore"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = error_of(capsys, "--dataset", "HuggingFaceFW/fineweb", "--name", "sample-100BT", "--out", tmp_path)
    assert "HuggingFaceFW/fineweb (sample-100BT)" in err and "--input" in err


class FlakyHub:
    """A stand-in for a streamed hub dataset whose connection drops after `fail_after` batches."""

    column_names = None

    def __init__(self, docs, fail_after=None):
        self.docs, self.fail_after = docs, fail_after

    def iter(self, batch_size):
        for i in range(0, len(self.docs), 4):
            if self.fail_after is not None and i // 4 == self.fail_after:
                raise ConnectionError("Read timed out.\n(full HTTP details)")
            yield {"text": self.docs[i : i + 4]}


def test_hub_connection_drop_keeps_shards_and_rerun_continues(tmp_path, monkeypatch, capsys, enc):
    import datasets

    docs = DOCS * 3
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 1000)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: FlakyHub(docs, fail_after=20))
    out = tmp_path / "out"
    err = error_of(capsys, "--out", out, "--shard-size", 400, "--workers", 1)
    assert "HuggingFaceFW/fineweb-edu (sample-10BT)" in err and "ConnectionError" in err and "rerun" in err
    written = sorted(n for n in os.listdir(out) if n.endswith(".npy"))
    assert len(written) >= 2
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: FlakyHub(docs))
    run_main("--out", out, "--shard-size", 400, "--workers", 1)
    assert f"continuing after {len(written)} existing" in capsys.readouterr().out
    check_shards(read_shards(out, "edufineweb"), 400, expected_tokens(enc, docs))


# -----------------------------------------------------------------------------
# interruption, resume, reruns


def test_interrupted_run_resumes_without_retokenizing(tmp_path, monkeypatch, enc, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS * 3])
    args = ("--input", src, "--shard-size", 400, "--workers", 1)
    run_main(*args, "--out", tmp_path / "clean")
    clean = read_shards(tmp_path / "clean", "edufineweb")
    assert len(clean) > 6

    out = tmp_path / "out"
    real_save, saved = fineweb.save_shard, []

    def dies_on_fourth_shard(path, tokens):
        if len(saved) == 3:  # killed while writing: a partial temp file is left behind
            with open(path + ".tmp", "wb") as f:
                f.write(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        saved.append(path)
        real_save(path, tokens)

    monkeypatch.setattr(fineweb, "save_shard", dies_on_fourth_shard)
    # resume points are recorded per batch of documents; the batching may differ between the two runs
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 500)
    with pytest.raises(SystemExit) as e:
        run_main(*args, "--out", out)
    assert e.value.code == 130 and "rerun" in capsys.readouterr().err
    assert (out / "edufineweb_train_000003.npy.tmp").exists()
    assert not (out / "edufineweb_train_000003.npy").exists()
    assert json.loads((out / "edufineweb_manifest.json").read_text())["complete"] is False
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".npy")}
    assert len(before) == 3

    monkeypatch.setattr(fineweb, "save_shard", real_save)
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 1300)
    np.save(out / "edufineweb_train_000999.npy", np.zeros(3, np.uint16))  # stale: past the end of this output
    real_tok, tokenized = fineweb.tokenize_batch, []
    monkeypatch.setattr(fineweb, "tokenize_batch", lambda docs: tokenized.extend(docs) or real_tok(docs))
    run_main(*args, "--out", out)
    assert "continuing after 3" in capsys.readouterr().out
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    resumed = read_shards(out, "edufineweb")
    assert len(resumed) == len(clean)
    for a, b in zip(resumed, clean):
        np.testing.assert_array_equal(a, b)
    assert {n: os.stat(out / n).st_mtime_ns for n in before} == before  # the good shards were kept
    assert 0 < len(tokenized) < len(DOCS) * 3  # the documents in them were skipped, not re-tokenized
    assert json.loads((out / "edufineweb_manifest.json").read_text())["complete"] is True


def test_two_worker_run_killed_mid_run_resumes_byte_identically(tmp_path, capsys):
    """A real `fineweb.py --workers 2` process group SIGKILLed while it writes shards (no cleanup runs,
    a temp file may be left half-written): the rerun gives the same bytes as an uninterrupted run."""
    import signal
    import time

    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS * 100])
    args = ["--input", src, "--shard-size", "2000", "--workers", "2"]
    run_main(*args, "--out", tmp_path / "clean")
    out = tmp_path / "out"
    # many small batches, so that both workers have work in flight when the kill comes
    code = "import sys, fineweb; fineweb.BATCH_CHARS = 3000; fineweb.main(sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    manifest_path = out / "edufineweb_manifest.json"

    def shards_recorded():  # the manifest is replaced by rename: never read half-written
        return len(json.loads(manifest_path.read_text())["shards"]) if manifest_path.exists() else 0

    # wait for the state the test needs (two shards recorded), however slowly a loaded machine gets there
    deadline = time.time() + 120
    while time.time() < deadline and shards_recorded() < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its two workers
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    manifest = json.loads((out / "edufineweb_manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) >= 2
    capsys.readouterr()
    run_main(*args, "--out", out)
    assert "continuing after" in capsys.readouterr().out
    names = sorted(n for n in os.listdir(tmp_path / "clean"))
    assert sorted(os.listdir(out)) == names
    for name in names:
        if name.endswith(".npy"):
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_rerun_skips_complete_output_and_repairs_a_damaged_shard(tmp_path, enc, capsys):
    src = write_parquet(tmp_path / "c.parquet", DOCS * 2)
    args = ("--input", src, "--out", tmp_path / "out", "--shard-size", 500)
    run_main(*args)
    expected = expected_tokens(enc, DOCS * 2)
    shard2 = tmp_path / "out" / "edufineweb_train_000002.npy"
    stamp = os.stat(shard2).st_mtime_ns
    capsys.readouterr()
    run_main(*args)
    assert "already complete" in capsys.readouterr().out
    assert os.stat(shard2).st_mtime_ns == stamp

    shard2.write_bytes(shard2.read_bytes()[:300])  # e.g. a partial copy: np.load now fails
    leftovers = [
        tmp_path / "out" / "edufineweb_train_000099.npy.tmp",
        tmp_path / "out" / "other_val_000000.npy.tmp",
        tmp_path / "out" / "edufineweb_notes.tmp",
    ]  # the last: a user's file with our prefix
    for t in leftovers:
        t.write_bytes(b"half written")
    run_main(*args)
    assert "continuing after 2 existing" in capsys.readouterr().out
    check_shards(read_shards(tmp_path / "out", "edufineweb"), 500, expected)
    # our temp files go; others' stay, even under our prefix
    assert not leftovers[0].exists() and leftovers[1].exists() and leftovers[2].exists()

    shard1 = tmp_path / "out" / "edufineweb_train_000001.npy"
    np.save(shard1, np.load(shard1).astype(np.int32))  # loads fine, but not a uint16 shard
    run_main(*args)
    assert "continuing after 1 existing" in capsys.readouterr().out
    check_shards(read_shards(tmp_path / "out", "edufineweb"), 500, expected)
    np.save(shard1, np.load(shard1)[:-1])  # one token short
    run_main(*args)
    assert "continuing after 1 existing" in capsys.readouterr().out
    check_shards(read_shards(tmp_path / "out", "edufineweb"), 500, expected)


def test_output_of_another_run_is_not_mixed_in(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "out"
    run_main("--input", src, "--out", out, "--shard-size", 500)
    err = error_of(capsys, "--input", src, "--out", out, "--shard-size", 600)
    assert "shard_size" in err and str(out) in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    np.save(foreign / "edufineweb_train_000001.npy", np.zeros(5, np.uint16))
    err = error_of(capsys, "--input", src, "--out", foreign)
    assert "not made by this script" in err and str(foreign) in err


# -----------------------------------------------------------------------------
# bad input: one line, naming the file and what to do


def test_missing_file_and_unusable_output_dir(tmp_path, capsys):
    err = error_of(capsys, "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "out")
    assert "nope.jsonl" in err and "not found" in err
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    (tmp_path / "a_file").write_text("")
    err = error_of(capsys, "--input", src, "--out", tmp_path / "a_file" / "out")
    assert "a_file" in err and "output directory" in err


def test_unknown_extension(tmp_path, capsys):
    bad = tmp_path / "docs.csv"
    bad.write_text("text\nhello\n")
    err = error_of(capsys, "--input", bad, "--out", tmp_path / "out")
    assert "docs.csv" in err and "'.csv'" in err and ".parquet" in err


def test_malformed_json_line(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "fine"}, '{"text": not json}'])
    err = error_of(capsys, "--input", good, bad, "--out", tmp_path / "out")
    assert "bad.jsonl" in err and "good.jsonl" not in err and "line 3" in err and "JSON" in err


def test_text_column_missing_lists_columns(tmp_path, capsys):
    p = write_parquet(tmp_path / "p.parquet", ["a", "b"], column="body")
    err = error_of(capsys, "--input", p, "--out", tmp_path / "out")
    assert (
        "p.parquet" in err and "'text'" in err and "id, body, token_count" in err and "--text-column" in err
    )
    j = write_jsonl(tmp_path / "j.jsonl", [{"body": "a"}])
    err = error_of(capsys, "--input", j, "--out", tmp_path / "out")
    assert "j.jsonl" in err and "'text'" in err and "body" in err


def test_null_or_non_string_text(tmp_path, capsys):
    j = write_jsonl(tmp_path / "j.jsonl", [{"text": "a"}, {"text": "b"}, {"text": None}])
    err = error_of(capsys, "--input", j, "--out", tmp_path / "out")
    assert "j.jsonl" in err and "row 3" in err and "null" in err
    k = write_jsonl(tmp_path / "k.jsonl", [{"text": 5}])
    err = error_of(capsys, "--input", k, "--out", tmp_path / "out2")
    assert "k.jsonl" in err and "int" in err


def test_corrupt_parquet_and_undecodable_txt_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    err = error_of(capsys, "--input", bad, "--out", tmp_path / "out")
    assert "bad.parquet" in err and "Parquet" in err
    ok, latin = tmp_path / "ok.txt", tmp_path / "latin1.txt"
    ok.write_text("fine")
    latin.write_bytes("caf\xe9".encode("latin-1"))
    err = error_of(capsys, "--input", ok, latin, "--out", tmp_path / "out2")
    assert "latin1.txt" in err and "ok.txt" not in err and "utf-8" in err


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    err = error_of(capsys, "--input", empty, "--out", out)
    assert "empty.jsonl" in err and "no text" in err
    blanks = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 700)
    err = error_of(capsys, "--input", blanks, "--out", out, "--shard-size", 100)
    assert "blank.jsonl" in err and "700 documents" in err
    assert not out.exists() or os.listdir(out) == []  # nothing half-made is left to confuse a training run


def test_cli_error_has_no_traceback(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{broken"])
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "fineweb.py"), "--input", bad, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "bad.jsonl" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# -----------------------------------------------------------------------------
# the offline demo corpus and the benchmark


def test_demo_writes_pydoc_shards(tmp_path, enc, capsys):
    from pydoc_data.topics import topics

    out = tmp_path / "pydoc"
    run_main("--demo", "--out", out)
    shards = read_shards(out, "pydoc")
    assert len(shards) >= 3  # a val shard and several train shards
    check_shards(shards, 2**14, expected_tokens(enc, list(topics.values())))
    capsys.readouterr()
    run_main("--demo", "--out", out)
    assert "already complete" in capsys.readouterr().out


def test_benchmark_reports_speed_memory_and_same_digest(tmp_path, capsys):
    digests = []
    for workers in (1, 2):
        run_main("--benchmark", "--synthetic-mb", 0.3, "--workers", workers, "--shard-size", 20000)
        out = capsys.readouterr().out
        assert "tokens/s" in out and "peak RSS" in out
        digests.append(out.split("sha256 of the tokens: ")[1].split()[0])
    assert digests[0] == digests[1] and len(digests[0]) == 64


def test_a_second_run_into_one_out_is_refused_and_a_jsonl_of_arrays_too(tmp_path, capsys):
    from gpt2lib.rundir import DirectoryLock

    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    out = tmp_path / "out"
    lock = DirectoryLock(str(out), "--out").acquire()  # another run holds --out (a real flock)
    try:
        err = error_of(capsys, "--input", src, "--out", out)
        assert os.listdir(out) == [".lock"]  # the refused run wrote nothing
    finally:
        lock.release()
    assert err == (
        f"error: --out {out} is in use by another run (host {os.uname().nodename}, pid {os.getpid()}): "
        "wait for it to end, or choose another --out\n"
    )
    arrays = write_jsonl(tmp_path / "arrays.jsonl", ['["a"]', '["b"]'])
    err = error_of(capsys, "--input", arrays, "--out", tmp_path / "out2")
    assert f"{arrays}: line 1 is not a JSON object" in err
