"""HellaSwag's data: the official jsonl, downloaded safely (streamed to a temporary file, its HTTP
status, length and rows checked, then renamed into place) or read from a local file, and validated
row by row for a scoring style."""

import json
import os
import sys
import tempfile
import time

from gpt2lib.common import UserError

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SPLITS = ("val", "train")
VAL_ROWS = 10042  # rows in the official hellaswag_val.jsonl
STYLES = ("completion", "harness")
HARNESS_FIELDS = ("activity_label", "ctx_a", "ctx_b")  # what harness style reads besides endings and label


def default_cache_dir():
    """$HELLASWAG_CACHE, else hellaswag/ in the project directory (beside the scripts)."""
    project_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("HELLASWAG_CACHE") or os.path.join(project_dir, "hellaswag")


def _check_split(split):
    if split not in SPLITS:
        raise UserError(
            f"unknown HellaSwag split {split!r}: use one of {', '.join(SPLITS)} "
            "(the test split has no labels)"
        )


class _Retry(Exception):
    """A failed download attempt worth repeating (server error, truncated or unreadable body)."""


class _GiveUp(Exception):
    """A failed download that repeating will not fix (a 4xx status)."""


def _fetch_once(url, final_path, timeout, expected_rows):
    """One GET of url, streamed to a temporary file next to final_path, checked, then renamed."""
    import requests

    with requests.get(url, stream=True, timeout=timeout) as response:
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise _GiveUp(f"HTTP {response.status_code}")
        # Content-Length counts the bytes on the wire: compare only when they are not compressed
        expected_bytes = (
            None if response.headers.get("Content-Encoding") else response.headers.get("Content-Length")
        )
        directory = os.path.dirname(final_path)
        fd, tmp_path = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(final_path) + ".", suffix=".part"
        )
        try:
            written = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            if expected_bytes is not None and written != int(expected_bytes):
                raise _Retry(f"truncated: got {written} of {expected_bytes} bytes")
            if written == 0:
                raise _Retry("empty response")
            try:
                rows = read_jsonl(tmp_path, name=url)  # never rename a file that would not load
            except UserError as e:  # e.g. a proxy's error page: try again
                raise _Retry(str(e)) from None
            if expected_rows is not None and len(rows) != expected_rows:
                raise _Retry(f"got {len(rows)} rows, expected {expected_rows:,}")
            os.replace(tmp_path, final_path)
        except BaseException:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise


def download(split="val", cache_dir=None, url_base=None, retries=3, backoff=1.0, timeout=30.0):
    """Path of hellaswag_{split}.jsonl in cache_dir, downloaded from url_base if not there yet.
    The file is streamed to a temporary name, its HTTP status, length and rows checked, and
    only then renamed into place: an interrupted or broken download is never reused.
    Raises UserError (naming --data as the way out) when every try fails."""
    _check_split(split)
    cache_dir = cache_dir or default_cache_dir()
    url_base = url_base or os.environ.get("HELLASWAG_URL") or DATA_URL
    name = f"hellaswag_{split}.jsonl"
    final_path = os.path.join(cache_dir, name)
    if os.path.isfile(final_path):
        return final_path
    url = f"{url_base.rstrip('/')}/{name}"
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the HellaSwag cache directory {cache_dir}: {e.strerror}") from None
    import requests

    print(f"downloading {url} to {final_path}", file=sys.stderr)
    reason = "no attempt"
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, final_path, timeout, VAL_ROWS if split == "val" else None)
            return final_path
        except _Retry as e:
            reason = str(e)
        except _GiveUp as e:
            raise UserError(
                f"could not download {url} ({e}): pass --data FILE with a local copy of {name}"
            ) from None
        except requests.RequestException as e:
            reason = type(e).__name__
        except OSError as e:
            raise UserError(f"cannot write {final_path}: {e.strerror or e}") from None
    raise UserError(
        f"could not download {url} after {max(1, retries)} tries ({reason}): "
        f"check the network, or pass --data FILE with a local copy of {name}"
    )


def check_style(style):
    if style not in STYLES:
        raise UserError(f"unknown HellaSwag style {style!r}: use one of {', '.join(STYLES)}")


def validate_example(row, where, style="completion"):
    """Raise UserError (prefixed with where, e.g. 'file:line') unless row is a usable HellaSwag
    example for this scoring style."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    ctx = row.get("ctx")
    if ctx is None:
        raise UserError(f"{where}: missing 'ctx'")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r:.40}")
    endings = row.get("endings")
    if endings is None:
        raise UserError(f"{where}: missing 'endings'")
    if not isinstance(endings, list):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings, got {type(endings).__name__}")
    if len(endings) != 4:
        raise UserError(f"{where}: 'endings' has {len(endings)} items, expected 4")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str):
            raise UserError(f"{where}: ending {i} is {type(ending).__name__}, expected a string")
    label = row.get("label")
    if label is None:
        raise UserError(f"{where}: missing 'label'")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise UserError(f"{where}: 'label' must be an integer 0-3, got {label!r}")
    if style == "harness":
        for field in HARNESS_FIELDS:
            if not isinstance(row.get(field), str):
                problem = "missing" if row.get(field) is None else "not a string:"
                raise UserError(
                    f"{where}: {problem} {field!r}, which --style harness needs "
                    "(the official HellaSwag jsonl has it; or use --style completion)"
                )


def read_jsonl(path, name=None, style="completion"):
    """The rows of a HellaSwag jsonl file, validated for `style`; errors name `name:line` (name
    defaults to path)."""
    name = name or path
    rows = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                validate_example(row, where, style)
                row["_where"] = where  # for errors found later: a row too long for the model
                rows.append(row)
    except FileNotFoundError:
        raise UserError(f"HellaSwag data file {name} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read HellaSwag data file {name}: {e.strerror or e}") from None
    if not rows:
        raise UserError(f"{name}: no examples")
    return rows


def load_examples(split="val", data_path=None, limit=None, cache_dir=None, url_base=None, style="completion"):
    """The validated examples (dicts with at least ctx, endings, label; with style="harness" also
    activity_label, ctx_a, ctx_b) of a split, in file order.
    data_path: a local jsonl; None downloads the official file into cache_dir (see download).
    limit: keep only the first `limit`. Raises UserError for unavailable or malformed data, so a
    training loop can catch it and skip HellaSwag with a warning."""
    _check_split(split)
    check_style(style)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if data_path is not None:
        examples = read_jsonl(data_path, style=style)
    else:
        path = download(split, cache_dir=cache_dir, url_base=url_base)
        examples = read_jsonl(path, style=style)
        if split == "val" and len(examples) != VAL_ROWS:
            raise UserError(
                f"{path} has {len(examples):,} rows, expected {VAL_ROWS:,} for the official val "
                "split: delete it to download it again"
            )
    return examples[:limit] if limit is not None else examples
