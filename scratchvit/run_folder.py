"""The output folder (--out-dir) while a run writes into it: one run's own.

`RunFolder` creates and locks it (`FolderLock`, fcntl.flock on OUT/.lock), refuses a folder that holds
another run unless the run resumes it or replaces it (--overwrite), and changes nothing in it until the
run's data, model and checkpoint have been checked (`begin`).
"""
import contextlib
import os
import socket
import time
from pathlib import Path

try:
    import fcntl                 # POSIX: the output folder's lock
except ImportError:
    fcntl = None

from .run_log import (METRICS_NAME, NO_FOLLOW, STEP_LOG_NAME, OutputError, OutputWriteError, keep_metrics_of,
                      keep_steps_up_to, open_log, read_step_log, writing)

CHECKPOINT_NAME = "checkpoint.npz"
LOCK_NAME = ".lock"
# what else training and --eval-only write into the folder: --overwrite removes them with the run they describe
RUN_PLOT_NAMES = ("curves.png", "attention.png", "attention_heads.png")
EVALUATION_NAME = "evaluation.json"
EVALUATION_FILE_NAMES = (EVALUATION_NAME, "confusion.png", "misclassified.png")


def make_output_folder(out_dir):
    """Create `out_dir` (and its parents) and check that it can be written to, or OutputError:
    called before the data are loaded, so a bad --out-dir costs no loading and no training."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file of that name exists" if out_dir.is_file() else (error.strerror or str(error))
        raise OutputError(f"cannot create the output folder {out_dir}: {reason}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder {out_dir}: permission denied")


def printable(text, limit=200):
    """`text` on one line of printable characters (a lock file is read from disk: it may hold anything)."""
    return "".join(character if character.isprintable() else "?" for character in " ".join(text.split()))[:limit]


class FolderLock:
    """An exclusive lock (fcntl.flock) on OUT/.lock, held while a run writes into OUT.

    flock belongs to the open file, and the kernel drops it when the process ends however it ends, so a
    crashed or killed run leaves no stale lock. The file names its holder (pid, host, start time) for the
    line a second run gets, and is removed on release: a run that opened it just before and then locked
    the removed file finds that the name no longer leads to its file, and locks the new one instead.
    Where fcntl is missing (Windows) a run is not locked."""

    def __init__(self, folder):
        self.folder, self.path, self.descriptor = Path(folder), Path(folder) / LOCK_NAME, None

    def acquire(self):
        if fcntl is None:
            return
        while self.descriptor is None:
            with writing(self.path):
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0),
                                     0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = printable(os.pread(descriptor, 1000, 0).decode(errors="replace")) or "it has not said who"
                os.close(descriptor)
                raise OutputError(f"the output folder {self.folder} is in use by another run ({holder}): wait for "
                                  f"it to end, or choose another --out-dir") from None
            except OSError as error:
                os.close(descriptor)
                raise OutputError(f"cannot lock {self.path}: {error.strerror or error}") from None
            try:
                ours = os.path.samestat(os.fstat(descriptor), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                ours = False
            if ours:
                self.descriptor = descriptor
            else:
                os.close(descriptor)
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
        with writing(self.path):
            os.ftruncate(self.descriptor, 0)
            os.pwrite(self.descriptor, holder.encode() + b"\n", 0)

    def release(self):
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):      # removed while still locked: no run can take it in between
            os.unlink(self.path)
        os.close(self.descriptor)
        self.descriptor = None


def describe_log(path, record_name):
    """What a non-empty log at `path` holds, in a few words for the --overwrite line and the refusal; None if empty."""
    try:
        if path.stat().st_size == 0:
            return None
        records = read_step_log(path)
    except FileNotFoundError:
        return None
    except OSError:
        return path.name
    last = records[-1] if records and isinstance(records[-1], dict) else {}
    accuracy = last.get("test_accuracy")
    accuracy = f", the last at test accuracy {accuracy:.2%}" if isinstance(accuracy, float) else ""
    return f"{path.name} ({len(records)} {record_name}{'' if len(records) == 1 else 's'}{accuracy})"


class RunFolder:
    """The output folder while a run writes into it (under MPI, rank 0's): made, locked and checked on entry.

    Entering it creates OUT, takes the lock (a second run on OUT stops there, in one line naming the
    holder), refuses symbolic links in place of the logs, and refuses a folder that holds a run (a
    checkpoint or a non-empty log) unless the run resumes it or config.overwrite replaces it, which the
    first log line then says, with what it replaces. Nothing in the folder changes until `begin`, called
    once the data, the model and the checkpoint have been checked: a run that fails before it leaves the
    folder as it was. Leaving releases the lock and completes an OutputWriteError with the state of the
    last checkpoint (`saved`, which run() keeps up to date)."""

    def __init__(self, config, log):
        self.config, self.log, self.path = config, log, Path(config.out_dir)
        self.checkpoint, self.metrics, self.steps = (self.path / name
                                                     for name in (CHECKPOINT_NAME, METRICS_NAME, STEP_LOG_NAME))
        self.lock = FolderLock(self.path)
        self.saved = None            # (epoch, step_in_epoch) of the checkpoint on disk that belongs to this run

    def __enter__(self):
        make_output_folder(self.path)
        self.lock.acquire()
        try:
            self.check()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, kind, error, traceback):
        self.lock.release()
        if isinstance(error, OutputWriteError):
            raise OutputError(f"{error}; {self.checkpoint_note()}") from None
        return False

    def check(self):
        for path in (self.metrics, self.steps):
            if path.is_symlink():
                raise OutputError(f"{path} is a symbolic link: a run writes its logs into files of its own, never "
                                  f"through a link; remove it or choose another --out-dir")
        if self.config.resume:
            return
        found = [CHECKPOINT_NAME] if self.checkpoint.exists() else []
        found += [text for text in (describe_log(self.metrics, "epoch"), describe_log(self.steps, "line")) if text]
        if found and not self.config.overwrite:
            raise OutputError(f"the output folder {self.path} holds a run ({', '.join(found)}): continue it with "
                              f"--resume, replace it with --overwrite, or choose another --out-dir")
        if self.config.overwrite:
            found += [name for name in RUN_PLOT_NAMES + EVALUATION_FILE_NAMES if (self.path / name).exists()]
            if found:
                self.log(f"--overwrite: replacing the run in {self.path}: {', '.join(found)}")

    def begin(self, *, history, optimizer_step, saved=None):
        """Make the folder this run's: a new run removes what --overwrite replaces and starts from empty
        logs; a resumed one (`saved`: its checkpoint's epoch and step) cuts metrics.jsonl and steps.jsonl
        back to that checkpoint, so every line in them belongs to the saved run."""
        self.saved = saved
        if self.config.resume:
            with writing(self.metrics):
                keep_metrics_of(self.metrics, history)
            with writing(self.steps):
                keep_steps_up_to(self.steps, optimizer_step)
            return
        if self.config.overwrite:
            for name in (CHECKPOINT_NAME, *RUN_PLOT_NAMES, *EVALUATION_FILE_NAMES):
                with writing(self.path / name):
                    (self.path / name).unlink(missing_ok=True)
        with writing(self.metrics), open_log(self.metrics, "w"):
            pass
        # a new run's step log starts empty; with the log off, an older run's would be plotted as this one's
        with writing(self.steps):
            if self.config.log_every:
                open_log(self.steps, "w").close()
            else:
                self.steps.unlink(missing_ok=True)

    def checkpoint_note(self):
        if self.saved is None:
            return "no checkpoint of this run was written yet"
        epoch, step = self.saved
        at = f"epoch {epoch + 1}, step {step}" if step else f"after epoch {epoch}"
        return f"the last checkpoint, {self.checkpoint} ({at}), is intact: continue from it with --resume"
