"""
FineWeb(-Edu) and local corpora -> GPT-2 token shards for pretraining.

    python fineweb.py                                   # FineWeb-Edu sample-10BT -> edu_fineweb10B/
                                                        # (~100 shards)
    python fineweb.py --dataset HuggingFaceFW/fineweb --name sample-10BT --out fineweb10B --prefix fineweb
    python fineweb.py --input corpus/*.parquet --out data/mine --prefix mine   # local .parquet/.jsonl/.txt
    python fineweb.py --demo                            # pydoc_data.topics -> data/pydoc/ (offline demo)
    python fineweb.py --benchmark --synthetic-mb 50     # tokens/s and peak RSS, shards thrown away

Output: `{out}/{prefix}_{split}_{idx:06d}.npy`, 1-D uint16 arrays of exactly `--shard-size` tokens (the
last one shorter); shard 0 is `val`, the rest `train`. Each document is
`[<|endoftext|>] + encode_ordinary(text)` and documents run on across shard boundaries, as in
build-nanogpt.

Completion and resume: every shard is written to a temporary file next to it (`{name}.tmp.HOST.PID.RANDOM`)
and renamed into place, so a shard file is either complete or absent. `{out}/{prefix}_manifest.json` (also
written by rename) records the run's settings and, after each shard, where in the document stream the next
shard starts; its `complete` flag turns true only after the last shard. Rerunning the same command skips a
complete output, and otherwise checks the shards the manifest lists, deletes leftover temporary files and
continues after the last good shard without re-tokenizing what is already written. A different command aimed
at the same shards is refused.
One run per --out: an OS lock on `{out}/.lock` stops a second run into it with one line naming the first.
"""

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import deque
from contextlib import closing, contextmanager

import numpy as np

from gpt2lib import rundir
from gpt2lib.common import GPT2_EOT, GPT2_VOCAB_SIZE, UserError, atomic_write, get_encoding, one_line

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST_FORMAT = 1
BATCH_CHARS = 1 << 20  # text sent to a worker per task: ~250k tokens, ~0.1 s of work, so IPC is noise
# local file types -> (datasets builder, its options); .txt is one document per file, as plain text
BUILDERS = {
    ".parquet": ("parquet", {}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".txt": ("text", {"sample_by": "document"}),
}

# -----------------------------------------------------------------------------
# reading documents, through HuggingFace `datasets` for both the hub and local files


@contextmanager
def quiet_datasets():
    """datasets logs its own copy of a read error (and hub chatter) to stderr; we report errors ourselves."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)


def builder_for(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in BUILDERS:
        raise UserError(
            f"{path}: unsupported file type {ext or '(no extension)'!r}: use .parquet or .jsonl/.json "
            f"(one document per row) or .txt (one document per file)"
        )
    return BUILDERS[ext]


def check_inputs(paths):
    """Fail early, naming the file, on what we can see before streaming starts."""
    for path in paths:
        builder_for(path)
        if os.path.isdir(path):
            raise UserError(
                f"{path}: is a directory: pass the files in it, e.g. {os.path.join(path, '*.parquet')}"
            )
        if not os.path.isfile(path):
            raise UserError(f"{path}: input file not found")
        try:
            with open(path, "rb") as f:
                f.read(1)
                first = first_jsonl_row(f) if path.endswith(".jsonl") else None
        except OSError as e:
            raise UserError(f"{path}: cannot read input file ({one_line(e)})") from None
        if first is not None and not first[1].startswith(b"{"):
            raise UserError(
                f'{path}: line {first[0]} is not a JSON object (one {{"text": ...}} per line): '
                "fix or remove it"
            )


def first_jsonl_row(f):
    """(line number, stripped bytes) of a jsonl file's first non-blank line, or None. datasets would
    read a file of arrays (`["a"]`) as documents; a later line of another kind already fails there."""
    f.seek(0)
    for number, line in enumerate(f, 1):
        if line.strip():
            return number, line.strip()
    return None


def file_is_empty(path, builder):
    """An empty file holds no documents, but datasets fails on one with an odd error: we skip it instead."""
    if os.path.getsize(path) == 0:
        return builder != "text"  # an empty .txt is an (empty) document
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:
            return False  # not a valid parquet file: let datasets say so, below
    return False


def bad_json_line(path):
    """The number of the first line of a jsonl file that isn't a JSON object (pyarrow reads blocks of
    lines and can't say), or None. Only called once reading has already failed."""
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip() and not isinstance(json.loads(line), dict):
                    return i
    except ValueError:  # json's JSONDecodeError and UnicodeDecodeError both are
        return i
    except OSError:
        return None
    return None


def iter_rows(ds, text_column, where, remote=False):
    """Yield the text of each row of one streaming dataset; `where` names it in errors."""
    names = ds.column_names  # known up front for parquet; None for json until rows are read
    if names is not None:
        if text_column not in names:
            raise UserError(
                f"{where}: no column {text_column!r}; columns are {', '.join(names)}: pass --text-column"
            )
        ds = ds.select_columns([text_column])  # don't convert FineWeb's other ten columns to Python
    it = ds.iter(batch_size=256)
    row = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:  # datasets/pyarrow raise lazily, while iterating, with their own types
            if remote:  # most likely the connection: what is written so far stays, a rerun continues
                raise UserError(
                    f"{where}: reading failed after {row:,} documents ({one_line(e)}): rerun the "
                    f"same command to continue after the last complete shard"
                ) from None
            line = bad_json_line(where) if where.endswith(".jsonl") else None
            at = f"line {line}" if line else f"after row {row}" if row else "near the start"
            raise UserError(f"{where}: malformed data at {at} ({one_line(e)}): fix or remove it") from None
        if text_column not in batch:
            raise UserError(
                f"{where}: no column {text_column!r}; columns are {', '.join(batch) or '(none)'}: "
                f"pass --text-column"
            )
        for text in batch[text_column]:
            row += 1
            if not isinstance(text, str):
                what = "null" if text is None else f"{type(text).__name__}, not a string"
                raise UserError(
                    f"{where}: row {row}: column {text_column!r} is {what}: fix or remove the row"
                )
            yield text


def one_row_group_at_a_time(ds):
    """A streamed parquet file is read by a pyarrow scanner that runs ahead of a slow consumer (we are one:
    tokenizing is far slower than reading), buffering up to the whole file: 1 GB of RSS for a 250 MB file.
    Resharding makes every row group its own shard, so at most one row group is in memory. The order of
    the rows is unchanged; builders other than parquet are left as they are."""
    reshard = getattr(ds, "reshard", None)  # datasets >= 4
    return reshard() if reshard is not None else ds


def iter_documents(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", files=None, text_column="text"):
    """Yield the text of every document, in a fixed order: the hub dataset's `train` split (streamed),
    or the local files in the order given. Both go through `datasets.load_dataset(..., streaming=True)`."""
    with quiet_datasets() as datasets:
        if not files:
            where = f"{dataset} ({name})"
            try:
                ds = datasets.load_dataset(dataset, name=name, split="train", streaming=True)
            except Exception as e:
                raise UserError(
                    f"cannot open {where} on the HuggingFace hub ({one_line(e)}): check the "
                    f"--dataset/--name and your connection, or pass local files with --input"
                ) from None
            yield from iter_rows(one_row_group_at_a_time(ds), text_column, where, remote=True)
            return
        # parquet/json: one load_dataset per file, so each file's own columns are checked and errors name it;
        # runs of .txt files share one (a load costs ~0.15 s), and each file is one shard of that dataset
        groups = []
        for path in files:
            builder, options = builder_for(path)
            if builder == "text" and groups and groups[-1][0] == "text":
                groups[-1][2].append(path)
            else:
                groups.append((builder, options, [path]))
        for builder, options, paths in groups:
            paths = [p for p in paths if not file_is_empty(p, builder)]
            if not paths:
                continue
            try:
                ds = datasets.load_dataset(
                    builder,
                    data_files=[os.path.abspath(p) for p in paths],
                    split="train",
                    streaming=True,
                    **options,
                )
            except Exception as e:
                raise UserError(
                    f"{paths[0] if len(paths) == 1 else ', '.join(paths)}: cannot open as {builder} "
                    f"({one_line(e)}): fix or remove the file"
                ) from None
            column = "text" if builder == "text" else text_column
            if builder == "parquet":
                ds = one_row_group_at_a_time(ds)
            if len(paths) == 1:
                yield from iter_rows(ds, column, paths[0])
            elif ds.num_shards == len(paths):  # one shard per file, in order
                for i, path in enumerate(paths):
                    yield from iter_rows(ds.shard(len(paths), i, contiguous=True), column, path)
            else:  # not expected; still correct, errors just name the group
                yield from iter_rows(ds, column, ", ".join(paths))


def batched(docs, max_chars=None):
    """Group documents into lists of about max_chars characters: one worker task each."""
    max_chars = max_chars or BATCH_CHARS
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# tokenizing


def tokenize_batch(docs):
    """Documents -> one uint16 array, the EOT-prefixed tokens of each document back to back.
    encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary without building a Python
    list of ints; it doesn't repair lone surrogates, encode_ordinary does, so those documents go that way."""
    enc = get_encoding()  # cached; a forked worker inherits the parent's
    eot = np.array([GPT2_EOT], dtype=np.uint32)
    parts = []
    for doc in docs:
        parts.append(eot)
        try:
            parts.append(enc.encode_to_numpy(doc, allowed_special=set(), disallowed_special=()))
        except UnicodeEncodeError:
            parts.append(np.array(enc.encode_ordinary(doc), dtype=np.uint32))
    tokens = np.concatenate(parts)
    if tokens.max() >= GPT2_VOCAB_SIZE:  # uint16 holds < 65536 but only 0..50256 are GPT-2 tokens
        raise ValueError(f"token id {int(tokens.max())} out of GPT-2's vocabulary")
    return tokens.astype(np.uint16)


def ignore_sigint():
    """In workers: Ctrl-C is the parent's to handle (it stops the pool), not a traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tokenize_stream(batches, workers):
    """(first_doc, docs) items -> (first_doc, len(docs), tokens) items, in order, tokenized by `workers`
    processes. Pool.imap would read the whole input into its task queue; we keep at most 2 batches per
    worker in flight, so memory stays flat however large the corpus."""
    if workers <= 1:
        for first, docs in batches:
            yield first, len(docs), tokenize_batch(docs)
        return
    import multiprocessing as mp

    get_encoding()  # build it once here (cached); forked workers inherit it
    # the pool forks its workers before the first batch is read, i.e. before datasets/pyarrow start threads
    with mp.Pool(workers, initializer=ignore_sigint) as pool:
        pending = deque()
        for first, docs in batches:
            pending.append((first, len(docs), pool.apply_async(tokenize_batch, (docs,))))
            if len(pending) >= 2 * workers:
                first, n, result = pending.popleft()
                yield first, n, result.get()
        while pending:
            first, n, result = pending.popleft()
            yield first, n, result.get()


# -----------------------------------------------------------------------------
# writing shards


def shard_name(prefix, idx):
    split = "val" if idx == 0 else "train"
    return f"{prefix}_{split}_{idx:06d}.npy"


def save_shard(path, tokens):
    atomic_write(path, lambda f: np.save(f, tokens))


def save_manifest(path, manifest):
    atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def existing_shards(out_dir, prefix):
    """Files in out_dir named like this prefix's shards."""
    pattern = re.compile(re.escape(prefix) + r"_(val|train)_\d{6,}\.npy")
    return sorted(n for n in os.listdir(out_dir) if pattern.fullmatch(n)) if os.path.isdir(out_dir) else []


def shard_ok(path, n_tokens):
    """A shard as the manifest describes it: a readable 1-D uint16 .npy of n_tokens."""
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return a.dtype == np.uint16 and a.ndim == 1 and a.shape[0] == n_tokens


def write_shards(token_arrays, out_dir, prefix, shard_size, manifest, manifest_path, progress=None):
    """Pack (first_doc, n_docs, tokens) items into shards of exactly shard_size tokens, continuing after
    the shards already in manifest["shards"]; returns the number of documents in the whole stream.
    first_doc is the index of the document `tokens` starts with: it and the offset into `tokens` are the
    resume point recorded after each shard (skip that many documents, then that many tokens)."""
    shards = manifest["shards"]
    start = shards[-1]["next"] if shards else {"docs": 0, "tokens": 0}
    drop = start["tokens"]  # tokens of the stream (from document start["docs"]) already in earlier shards
    buf = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    docs = start["docs"]

    def flush(n, next_doc, next_tok):
        name = shard_name(prefix, len(shards))
        save_shard(os.path.join(out_dir, name), buf[:n])
        shards.append({"file": name, "tokens": int(n), "next": {"docs": next_doc, "tokens": int(next_tok)}})
        save_manifest(manifest_path, manifest)  # after the shard: the manifest never lists a missing shard

    for first_doc, n_docs, tokens in token_arrays:
        docs = first_doc + n_docs
        offset = 0  # position in `tokens` measured from the start of document first_doc
        if drop:
            skip = min(drop, len(tokens))
            offset, drop = skip, drop - skip
        while offset < len(tokens):
            take = min(shard_size - fill, len(tokens) - offset)
            buf[fill : fill + take] = tokens[offset : offset + take]
            fill += take
            offset += take
            if fill == shard_size:
                flush(fill, first_doc, offset)
                fill = 0
        if progress is not None:
            progress.update(len(tokens))
    if fill:
        flush(fill, docs, 0)
    return docs


# -----------------------------------------------------------------------------
# the run: settings, resume, benchmark, demo corpus


def source_of(args):
    """What the shards are made of; a rerun must match it exactly to continue the same output."""
    if args.input:
        # size and mtime stand in for the content: a changed file means the old shards no longer match
        files = [
            {"path": os.path.abspath(p), "bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns}
            for p in args.input
        ]
        return {"files": files, "text_column": args.text_column}
    return {"dataset": args.dataset, "name": args.name, "text_column": args.text_column}


def prepare_output(out_dir, prefix, settings):
    """Make out_dir ready and return (manifest, done): the manifest to continue from (shards already
    verified) and whether the output is already complete."""
    manifest_path = os.path.join(out_dir, f"{prefix}_manifest.json")
    existing = existing_shards(out_dir, prefix)
    fresh = dict(settings, shards=[], complete=False)
    if not os.path.exists(manifest_path):
        if existing:
            raise UserError(
                f"{out_dir} already holds {len(existing)} {prefix}_* shards not made by this script "
                f"(no {os.path.basename(manifest_path)}): delete them or choose another --out/--prefix"
            )
        return fresh, False
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        same = {k: manifest.get(k) for k in settings} == settings
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{manifest_path}: unreadable: delete it and the {prefix}_* shards next to it"
        ) from None
    if not same:
        if not shards and not existing:  # an earlier run that wrote nothing: nothing to protect
            return fresh, False
        changed = [k for k in settings if manifest.get(k) != settings[k]]
        raise UserError(
            f"{out_dir} holds {prefix}_* shards made with a different {'/'.join(changed)} "
            f"(see {os.path.basename(manifest_path)}): delete them or choose another --out/--prefix"
        )
    good = 0  # keep the shards that check out, up to the first that doesn't; the rest are rewritten
    while good < len(shards) and shard_ok(
        os.path.join(out_dir, shards[good]["file"]), shards[good]["tokens"]
    ):
        good += 1
    done = manifest.get("complete") is True and good == len(shards)
    if not done:
        manifest.update(shards=shards[:good], complete=False)
    return manifest, done


def run(args):
    """Tokenize the source into shards in args.out; returns a summary dict."""
    if args.input:
        check_inputs(args.input)
    # set-up outside the timed part: building the tokenizer offline takes seconds, importing datasets one;
    # and a missing tokenizer fails here, before the output directory is touched
    get_encoding()
    import datasets  # noqa: F401

    settings = {
        "format": MANIFEST_FORMAT,
        "tokenizer": "gpt2",
        "prefix": args.prefix,
        "shard_size": args.shard_size,
        "source": source_of(args),
    }
    # one writer per --out: a second run stops here; an interrupted write's temporary files (of the
    # shard and manifest names this script writes, nothing else) go
    with rundir.held(
        args.out, "--out", re.escape(args.prefix) + r"_(?:(?:val|train)_\d{6,}\.npy|manifest\.json)"
    ):
        return tokenize_into(args, settings)


def tokenize_into(args, settings):
    """run(), holding --out's lock."""
    manifest, done = prepare_output(args.out, args.prefix, settings)
    manifest_path = os.path.join(args.out, f"{args.prefix}_manifest.json")
    if done:
        return {
            "skipped": True,
            "shards": len(manifest["shards"]),
            "tokens": manifest["tokens"],
            "documents": manifest["documents"],
            "seconds": 0.0,
        }
    if not manifest["shards"]:
        save_manifest(manifest_path, manifest)  # claims the output dir before the first shard lands
    start = manifest["shards"][-1]["next"] if manifest["shards"] else {"docs": 0, "tokens": 0}
    resumed = len(manifest["shards"])

    # documents already in the kept shards are read again but not tokenized
    docs = itertools.islice(
        iter_documents(args.dataset, args.name, args.input, args.text_column), start["docs"], None
    )

    def numbered(batches):  # (index of the batch's first document in the whole stream, batch)
        first = start["docs"]
        for batch in batches:
            yield first, batch
            first += len(batch)

    from tqdm import tqdm

    t0 = time.time()
    # the bar is off when stderr is not a terminal (logs, tests): it would bury a one-line error
    with tqdm(unit="tok", unit_scale=True, desc=f"{args.prefix} shards", disable=None, smoothing=0.1) as bar:
        with closing(
            tokenize_stream(numbered(batched(docs)), args.workers)
        ) as stream:  # closing stops the pool
            n_docs = write_shards(
                stream, args.out, args.prefix, args.shard_size, manifest, manifest_path, bar
            )
    seconds = time.time() - t0
    shards = manifest["shards"]
    n_tokens = sum(s["tokens"] for s in shards)
    if n_tokens <= n_docs:  # nothing but EOTs: no text at all
        for s in shards:
            os.remove(os.path.join(args.out, s["file"]))
        os.remove(manifest_path)
        where = ", ".join(args.input) if args.input else f"{args.dataset} ({args.name})"
        raise UserError(
            f"{where}: no text to tokenize ({n_docs} documents, all empty): check the input and --text-column"
        )
    # shards past the end can only be left from an earlier run of this same output that ended differently
    for name in set(existing_shards(args.out, args.prefix)) - {s["file"] for s in shards}:
        os.remove(os.path.join(args.out, name))
    manifest.update(complete=True, tokens=n_tokens, documents=n_docs)
    save_manifest(manifest_path, manifest)
    new_tokens = sum(s["tokens"] for s in shards[resumed:])
    return {
        "skipped": False,
        "shards": len(shards),
        "resumed_after": resumed,
        "tokens": n_tokens,
        "new_tokens": new_tokens,
        "documents": n_docs,
        "seconds": seconds,
    }


def write_demo_corpus(path):
    """Python's own help topics (pydoc_data.topics, shipped with every CPython: 79 documents, ~140k
    tokens) as a jsonl file: the offline corpus for the demo. Rewritten only if its content changed, so
    a rerun of --demo sees the same input and finds its shards complete."""
    from pydoc_data.topics import topics

    data = "".join(json.dumps({"topic": k, "text": v}) + "\n" for k, v in topics.items()).encode()
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    atomic_write(path, lambda f: f.write(data))


def write_synthetic_corpus(path, megabytes, seed=0):
    """A benchmark corpus without network: paragraphs of pydoc_data.topics shuffled into documents of
    2-5 KB (web-page sized), about `megabytes` MB of text, as .parquet (row groups of 1000) or .jsonl.
    Written in chunks, so making a large one costs no memory."""
    from pydoc_data.topics import topics

    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)

    def documents():
        total = 0
        while total < megabytes * 1e6:
            target, parts, size = rng.randint(2000, 5000), [], 0
            while size < target:
                parts.append(rng.choice(paragraphs))
                size += len(parts[-1]) + 2
            doc = "\n\n".join(parts)
            total += len(doc)
            yield doc

    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
            chunk = []
            for doc in documents():
                chunk.append(doc)
                if len(chunk) == 1000:
                    writer.write_table(pa.table({"text": chunk}))
                    chunk = []
            if chunk:
                writer.write_table(pa.table({"text": chunk}))
    else:
        with open(path, "w") as f:
            for doc in documents():
                f.write(json.dumps({"text": doc}) + "\n")


def usage():
    """Peak resident memory (MB) of this process and of its largest finished child, and CPU seconds
    used by this process and its finished children together."""
    import resource  # POSIX only, and only needed here

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    mb = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # ru_maxrss: KiB on Linux, bytes on macOS
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return me.ru_maxrss * mb, kids.ru_maxrss * mb, cpu


def benchmark(args):
    """Tokenize into a temporary directory (deleted afterwards) and report speed, memory and a digest
    of the token stream (equal digests: identical output, e.g. for --workers 1 and the default)."""
    with tempfile.TemporaryDirectory(prefix="fineweb-bench-") as tmp:
        if args.synthetic_mb:
            path = os.path.join(tmp, "synthetic.parquet")
            write_synthetic_corpus(path, args.synthetic_mb)
            args.input = [path]
        args.out = os.path.join(tmp, "shards")
        get_encoding()  # the set-up run() does before its clock starts, kept out of the CPU count too
        import datasets  # noqa: F401

        cpu0 = usage()[2]
        summary = run(args)
        own, child, cpu = usage()  # before the digest below reads the shards back
        digest = hashlib.sha256()
        for name in sorted(existing_shards(args.out, args.prefix), key=lambda n: n[-10:]):
            tokens = np.load(os.path.join(args.out, name), mmap_mode="r")
            for i in range(0, len(tokens), 1 << 24):
                digest.update(tokens[i : i + (1 << 24)].tobytes())
    tokens, seconds = summary["tokens"], summary["seconds"]
    # CPU seconds separate the cost from a busy machine's noise; wall time is what a user waits for
    print(
        f"benchmark: {tokens:,} tokens ({summary['documents']:,} documents, {summary['shards']} shards) "
        f"in {seconds:.2f} s = {tokens / seconds / 1e6:.2f}M tokens/s with {args.workers} worker(s), "
        f"{cpu - cpu0:.1f} CPU s"
    )
    print(
        f"peak RSS: main process {own:.0f} MB, largest worker {child:.0f} MB (a forked worker's RSS "
        f"counts the pages it shares with the main process)"
        if args.workers > 1
        else f"peak RSS: {own:.0f} MB (one process)"
    )
    print(f"sha256 of the tokens: {digest.hexdigest()}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Tokenize FineWeb(-Edu) or local text into GPT-2 uint16 token shards "
        "{out}/{prefix}_{val|train}_{idx:06d}.npy (shard 0 is val)."
    )
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="HuggingFace hub dataset, streamed")
    p.add_argument("--name", default="sample-10BT", help="its config, e.g. sample-10BT, sample-100BT")
    p.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="local files instead of the hub, in this order: "
        ".parquet / .jsonl / .json (one document per row) or .txt (one document per file)",
    )
    p.add_argument("--text-column", default="text", help="column holding the text (parquet/json)")
    p.add_argument(
        "--out",
        help="output directory (default: edu_fineweb10B, or data/pydoc with --demo, next to this script)",
    )
    p.add_argument("--prefix", help="shard name prefix (default: edufineweb, or pydoc with --demo)")
    p.add_argument("--shard-size", type=int, help="tokens per shard (default: 10**8, or 2**14 with --demo)")
    p.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help="tokenizer processes (default: all cores, %(default)s here); 1 tokenizes in this process",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="shard Python's pydoc_data.topics (offline, ~140k tokens) "
        "into data/pydoc for a quick training demo",
    )
    p.add_argument(
        "--benchmark",
        action="store_true",
        help="tokenize into a temporary directory, deleted after, and print tokens/s and peak memory",
    )
    p.add_argument(
        "--synthetic-mb",
        type=float,
        help="with --benchmark: generate a corpus of this many MB "
        "of text from pydoc_data.topics instead of --input",
    )
    args = p.parse_args(argv)
    if args.demo:
        if args.input:
            p.error("--demo makes its own input: don't combine it with --input")
        defaults = (os.path.join(HERE, "data", "pydoc"), "pydoc", 2**14)
    else:
        defaults = (os.path.join(HERE, "edu_fineweb10B"), "edufineweb", 10**8)
    args.out = args.out or defaults[0]
    args.prefix = args.prefix or defaults[1]
    args.shard_size = args.shard_size or defaults[2]
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.synthetic_mb is not None and not args.benchmark:
        p.error("--synthetic-mb only goes with --benchmark")
    if args.benchmark and not (args.input or args.synthetic_mb):
        p.error("--benchmark needs --input FILE... or --synthetic-mb N")
    return args


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.benchmark:
            return benchmark(args)
        if args.demo:
            rundir.make_directory(args.out, "--out")
            args.input = [os.path.join(args.out, "pydoc_topics.jsonl")]
            write_demo_corpus(args.input[0])
        summary = run(args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: rerun the same command to continue after the last complete shard", file=sys.stderr
        )
        sys.exit(130)
    if summary["skipped"]:
        print(
            f"{args.out}: already complete ({summary['shards']} shards, {summary['tokens']:,} tokens): "
            f"nothing to do"
        )
    else:
        again = f", continuing after {summary['resumed_after']} existing" if summary["resumed_after"] else ""
        rate = summary["new_tokens"] / max(summary["seconds"], 1e-9) / 1e6
        print(
            f"{args.out}: {summary['shards']} shards{again}, {summary['tokens']:,} tokens from "
            f"{summary['documents']:,} documents ({rate:.2f}M tokens/s)"
        )


if __name__ == "__main__":
    main()
