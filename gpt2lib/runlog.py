"""The run log: log.txt with build-nanogpt's lines and metrics.jsonl with every metric, written by rank 0 and
sent on to the trackers; trimmed to the resume point when a run resumes."""

import json
import os

from gpt2lib import rundir
from gpt2lib.common import UserError, atomic_write, one_line

LOG_FILES = ("log.txt", "metrics.jsonl")


class RunLog:
    """log.txt with build-nanogpt's lines (`{step} train {loss}`, `... val ...`, `... hella ...`)
    and metrics.jsonl with everything else (samples too), each row also sent to the trackers
    (a gpt2lib.tracking.Tracking). Only the master process writes."""

    def __init__(self, log_dir, enabled, trackers=None):
        self.enabled = enabled
        self.failure = None  # why an append failed (a full disk): the loop stops every rank with it
        self.text_path = os.path.join(log_dir, "log.txt")
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.trackers = trackers

    @staticmethod
    def prepare(log_dir, resume_step):
        """Keep the lines of steps before resume_step (a crashed run's later lines will be redone)
        and drop a line torn by a kill in mid-append, with a warning. A fresh run (resume_step None)
        starts with empty files; earlier runs' files were set aside before."""
        for name in LOG_FILES:
            path = os.path.join(log_dir, name)
            kept, torn = [], 0
            if resume_step is not None and os.path.exists(path):
                with open(path, errors="replace") as f:
                    for line in f:
                        step = RunLog.line_step(line)
                        if step is None:
                            torn += 1
                        elif step < resume_step:
                            kept.append(line)
            if torn:
                print(
                    f"warning: {path}: dropped {torn} malformed line(s), left by a run killed while writing"
                )
            atomic_write(path, lambda f: f.write("".join(kept).encode()))

    @staticmethod
    def line_step(line):
        """The step of a well-formed log.txt or metrics.jsonl line, else None."""
        if not line.endswith("\n"):
            return None
        try:
            if line.startswith("{"):
                row = json.loads(line)
                return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else None
            step, kind, value = line.split()
            float(value)
            return int(step)
        except ValueError:
            return None

    def write(self, step, kind, value, **metrics):
        """Append one line to each file. A failed append is kept in self.failure, not raised: the
        other ranks are not writing, so the next collective stops them all together."""
        if not self.enabled or self.failure:
            return
        self._append(
            self.text_path,
            f"{step} {kind} {value:.6f}\n" if kind == "train" else f"{step} {kind} {value:.4f}\n",
        )
        self._append_row({"step": step, "kind": kind, "value": value, **metrics})

    def write_samples(self, step, prompt, texts):
        """Samples go to metrics.jsonl (kind `sample`) and the trackers; log.txt has numbers only."""
        if self.enabled and not self.failure:
            self._append_row({"step": step, "kind": "sample", "prompt": prompt, "texts": list(texts)})

    def _append_row(self, row):
        self._append(self.jsonl_path, json.dumps(row) + "\n")
        if self.trackers is not None and not self.failure:
            self.trackers.log(row)

    def _append(self, path, line):
        if self.failure:
            return
        try:
            rundir.check_held(os.path.dirname(path))  # the directory is still this run's (a stat or two)
            with open(path, "a") as f:
                f.write(line)
        except OSError as e:
            self.failure = f"{path}: cannot append ({one_line(e)}): check free space and permissions"
        except UserError as e:
            self.failure = str(e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """Finish the trackers' runs, as failed when training raised."""
        if self.trackers is not None:
            self.trackers.close(ok=exc_type is None)
