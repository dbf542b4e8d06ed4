"""What a run writes as it goes, and how a write into its output folder fails: the progress line of an
epoch (tqdm when installed: pip install "scratchvit[progress]"; else one line on a terminal), OUT/steps.jsonl
(StepLog), OUT/metrics.jsonl (one line per epoch, cut back to the checkpoint on resume), and `writing`, which
turns an OSError into one line (OutputError) naming the file.

Logs are opened with O_NOFOLLOW: a symbolic link planted in a log's place is an error, never a way to
write into the link's target.
"""
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from .data import atomic_write_bytes

METRICS_NAME = "metrics.jsonl"
STEP_LOG_NAME = "steps.jsonl"
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)       # POSIX; Windows has none, and no symbolic links a user can plant


def log_line(message):
    print(message, flush=True)


class OutputError(RuntimeError):
    """The output folder (out_dir) cannot be created or written to."""


class OutputWriteError(OutputError):
    """A write into the output folder failed (a full disk, a read-only file); run() adds which checkpoint is intact."""


@contextlib.contextmanager
def writing(what):
    """Turn an OSError raised while writing `what` (a path, or words naming files) into a one-line OutputWriteError."""
    try:
        yield
    except OSError as error:
        # O_NOFOLLOW refuses a link with ELOOP, whose own words ("too many levels of symbolic links") mislead
        reason = ("it is a symbolic link, which the run does not follow" if error.errno == errno.ELOOP
                  else error.strerror or str(error))
        raise OutputWriteError(f"cannot write {what}: {reason}") from None


def open_log(path, mode="a"):
    """A log of the output folder opened for appending ("a") or emptied ("w"), never through a symbolic link:
    with O_NOFOLLOW a link in its place is an error (ELOOP), not a way to truncate or fill the link's target."""
    flags = os.O_WRONLY | os.O_CREAT | NO_FOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o666), mode)


def check_writable(path):
    """OSError unless the existing file `path` opens for writing as it is (a file of its own, not read-only);
    the open changes nothing. Checked before a log is replaced, which a read-only file would not stop."""
    os.close(os.open(path, os.O_WRONLY | NO_FOLLOW))


class Progress:
    """Steps done, loss, images per second and time left, for one epoch."""

    def __init__(self, total, description, batch_size, show=True):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        # no progress display in logs and pipes, only the epoch lines; under MPI only rank 0 shows it (`show`)
        self.terminal = show and sys.stderr.isatty()
        self.bar = None
        if tqdm is not None and self.terminal:
            self.bar = tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
        self.total, self.done, self.description, self.batch_size = total, 0, description, batch_size

    def update(self, steps, loss, images_per_second):
        self.done += steps
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{images_per_second:.0f}", refresh=False)
            self.bar.update(steps)
        elif self.terminal:                          # tqdm not installed: one line, redrawn
            left = (self.total - self.done) * self.batch_size / max(images_per_second, 1e-9)
            print(f"\r{self.description}  {self.done}/{self.total}  loss {loss:.4f}  {images_per_second:.0f} img/s  "
                  f"left {left:.0f}s ", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.terminal:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


STEP_LOG_NAME = "steps.jsonl"


class StepLog:
    """One JSON line in `path` every `every` steps of an epoch, at the epoch's last step and at Ctrl-C:
        step               the optimiser steps taken so far in the run (1-based, continues across --resume)
        epoch              the epoch the line belongs to (1-based, as in metrics.jsonl)
        loss               the mean training loss over the steps since the previous line of the same epoch
        lr                 the learning rate of the line's last step
        images_per_second  over those steps (wall time between the two loss reads)

    It is written only where the loop reads the loss from the device anyway (`every` is a multiple of
    LOSS_READ_INTERVAL, the epoch's end, Ctrl-C), so it adds no wait to a GPU step. Windows restart at
    every epoch: the lines of an epoch, each weighted by its steps, average to that epoch's train_loss,
    and when `every` divides the steps of an epoch their plain mean does."""

    def __init__(self, path, every, batch_size, train_count):
        self.path, self.every = Path(path), every
        self.batch_size, self.train_count = batch_size, train_count

    def begin(self, steps_done, loss_sum, now):
        """Start a window after `steps_done` steps of the epoch, whose losses summed to `loss_sum`."""
        self.start_steps, self.start_sum, self.start_time = steps_done, loss_sum, now

    def images_after(self, steps_done):
        return min(steps_done * self.batch_size, self.train_count)     # the epoch's last batch may be partial

    def at_read(self, *, epoch, steps_done, global_step, loss_sum, lr, now, end):
        """Called at every read of the loss (`loss_sum`: the epoch's so far, on the host); writes a line
        when the window is `every` steps long or `end` (the epoch's last step, or Ctrl-C) says so."""
        steps = steps_done - self.start_steps
        if steps == 0 or not (steps_done % self.every == 0 or end):
            return
        record = dict(step=global_step, epoch=epoch + 1, loss=(loss_sum - self.start_sum) / steps, lr=lr,
                      images_per_second=(self.images_after(steps_done) - self.images_after(self.start_steps))
                      / max(now - self.start_time, 1e-9))
        with writing(self.path), open_log(self.path) as file:
            file.write(json.dumps(record) + "\n")
        self.begin(steps_done, loss_sum, now)


def read_step_log(path):
    """The records of a steps.jsonl ([] if there is none). A line cut short by a crash while it was
    being written is skipped: it is the only line such a crash can damage, and it is the last."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def keep_steps_up_to(path, last_step):
    """Rewrite steps.jsonl without the lines after global step `last_step`: a resumed run repeats the
    steps its checkpoint does not hold, and their lines would otherwise appear twice."""
    path = Path(path)
    if not path.exists():
        return
    kept = [record for record in read_step_log(path) if record["step"] <= last_step]
    text = "".join(json.dumps(record) + "\n" for record in kept)
    if text != path.read_text():
        check_writable(path)
        atomic_write_bytes(path, text.encode())


def keep_metrics_of(path, history):
    """Rewrite metrics.jsonl to hold exactly the checkpoint's `history`, one line per epoch it finished: a
    line written after the checkpoint (before a crash) goes, and one lost to a failed write comes back.
    (The lines are the records themselves: a JSON round trip gives every float back exactly.)"""
    path = Path(path)
    text = "".join(json.dumps(record) + "\n" for record in history)
    if path.exists() and text == path.read_text():
        return
    if path.exists():
        check_writable(path)
    atomic_write_bytes(path, text.encode())
