"""Experiment tracking: Weights & Biases (--wandb PROJECT) and TensorBoard (--tensorboard) receive
every row that metrics.jsonl gets, on rank 0 only, at the same steps.

A row {"step": s, "kind": k, "value": v, key: x, ...} becomes the metrics `k/<name of v>` and `k/key`
(metric_names); samples become text. Both packages are optional and load only when asked for. A
tracking failure (no network, a bad key, a full disk) is reported once; that tracker stops and
training goes on.

Resume: TensorBoard's writer opens with purge_step at the resume step, so readers drop the events
that the killed run logged at steps the resume redoes. The W&B run id is kept in
log_dir/wandb_run_id: a resumed run continues that W&B run and skips the steps it already has."""

import html
import importlib.util
import os
import secrets
import threading

from gpt2lib.common import atomic_write, one_line

TENSORBOARD_DIR = "tensorboard"  # event files, under log_dir
WANDB_DIR = "wandb"  # W&B's own run directories (offline runs included), under log_dir
WANDB_ID_FILE = "wandb_run_id"  # the W&B run this log dir continues
PATHS = (TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_FILE)

# the name of a row's "value" per kind; other keys keep their metrics.jsonl names
VALUE_NAMES = {"train": "loss", "val": "loss", "hella": "acc_norm"}
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # flag -> the package it needs


def missing_packages(wandb_project, tensorboard):
    """One line per tracking flag whose package is not installed."""
    wanted = [flag for flag, on in (("wandb", wandb_project), ("tensorboard", tensorboard)) if on]
    return [
        f"--{flag} needs the {PACKAGES[flag]} package: pip install {PACKAGES[flag]}"
        for flag in wanted
        if importlib.util.find_spec(PACKAGES[flag]) is None
    ]


def metric_names(row):
    """{tracker name: number} of a metrics.jsonl row: `train/loss`, `train/lr`, `val/loss`,
    `hella/acc_norm`, ..."""
    kind = row["kind"]
    out = {}
    for key, value in row.items():
        if key in ("step", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"{kind}/{VALUE_NAMES.get(kind, key) if key == 'value' else key}"] = float(value)
    return out


def sample_text(row):
    """The samples of a `sample` row as one text: the prompt's continuations, one per paragraph."""
    return "\n\n".join(row["texts"])


def quiet_tensorboard_writer_threads():
    """TensorBoard's writer thread keeps a write error (a full disk) for the writer's next call to raise,
    where Tracking reports it in one line, and then lets it escape too: threading would print its whole
    traceback ("Exception in thread ..."). Silence exactly those threads' handed-over exceptions; every
    other thread's go to the previous hook. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        handed_over = getattr(args.thread, "exception", None) is args.exc_value
        if not (handed_over and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


class TensorBoard:
    name = "TensorBoard"

    def __init__(self, log_dir, start_step):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        quiet_tensorboard_writer_threads()
        # purge_step: readers drop what earlier files logged at steps >= start_step (redone now)
        self.writer = SummaryWriter(os.path.join(log_dir, TENSORBOARD_DIR), purge_step=start_step or None)

    def log(self, row):
        step = row["step"]
        if row["kind"] == "sample":
            self.writer.add_text("sample/text", sample_text(row), step)
        for tag, value in metric_names(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run loses nothing that its checkpoints cover

    def close(self, ok):
        self.writer.close()


class WandB:
    name = "W&B"

    def __init__(self, log_dir, start_step, project, name, config):
        import wandb

        id_path = os.path.join(log_dir, WANDB_ID_FILE)
        run_id = None
        if start_step and os.path.isfile(id_path):  # a resume: continue this log dir's W&B run
            with open(id_path) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B ids are lowercase letters and digits
            atomic_write(id_path, lambda f: f.write(run_id.encode()))
        # WANDB_MODE (online, offline, disabled) is W&B's own setting and is left to it
        self.run = wandb.init(
            project=project,
            name=name or os.path.basename(os.path.abspath(log_dir)),
            id=run_id,
            resume="allow",
            dir=log_dir,
            config=config,
            settings=wandb.Settings(console="off"),
        )  # log.txt and stdout already have the lines
        # a resumed W&B run already holds the steps before run.step (W&B refuses lower steps)
        self.first_step = self.run.step
        self.wandb = wandb

    def log(self, row):
        if row["step"] < self.first_step:
            return
        values = metric_names(row)
        if row["kind"] == "sample":
            values["sample/text"] = self.wandb.Html(f"<pre>{html.escape(sample_text(row))}</pre>")
        self.run.log(values, step=row["step"])

    def close(self, ok):
        self.run.finish(exit_code=0 if ok else 1)


class Tracking:
    """The trackers a run asked for. Every call is guarded: a tracker that fails is named once, with
    the reason, and left out from then on; training never stops for it."""

    def __init__(self):
        self.trackers = []

    @classmethod
    def open(cls, log_dir, start_step, wandb_project="", wandb_name="", tensorboard=False, config=None):
        tracking = cls()
        if tensorboard:
            tracking._start(TensorBoard.name, lambda: TensorBoard(log_dir, start_step))
        if wandb_project:
            tracking._start(WandB.name, lambda: WandB(log_dir, start_step, wandb_project, wandb_name, config))
        return tracking

    def _start(self, name, make):
        try:
            self.trackers.append(make())
        except Exception as e:  # wandb.init alone raises half a dozen types (network, auth, usage)
            self._report(name, e)

    @staticmethod
    def _report(name, error):
        print(f"warning: {name} tracking failed ({one_line(error)}): training goes on without it")

    def _each(self, method, *args):
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                self.trackers.remove(tracker)
                self._report(tracker.name, e)

    def log(self, row):
        self._each("log", row)

    def close(self, ok=True):
        self._each("close", ok)
        self.trackers = []
