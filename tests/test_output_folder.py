"""The output folder is a run's own (issue 16, cases 1-5 and 15): what a run does with --out-dir.

- case 1: a run into a folder that holds a run (a checkpoint or a non-empty log) is refused without
  --resume or --overwrite, and a run that fails before training changes nothing in the folder;
  --overwrite says first what it replaces;
- case 2: a lock (fcntl.flock on OUT/.lock) stops a second run on the same folder at once, in one
  line naming the first;
- case 3: metrics.jsonl and steps.jsonl are never written through a symbolic link;
- case 4: the checkpoint is written before the epoch's metrics line, --resume cuts the logs back to
  the checkpoint, and an OSError on output (a full disk injected, a read-only file) is one line that
  names the file and the last checkpoint, intact;
- case 5: SIGTERM stops training like Ctrl-C (a checkpoint at the next step boundary, exit 143, one
  line; under mpiexec in tests/test_distributed.py);
- case 15: checkpoint.npz gets the permissions of the other outputs (what a plain open() gives).

Everything trains test_train.py's tiny ViT on its synthetic data; subprocesses only where the CLI's
exit status or a signal from outside is what is tested.
"""
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchvit import checkpoint, run_folder, run_log, train
from scratchvit.checkpoint import load_checkpoint
from scratchvit.config import ConfigError, TrainConfig
from scratchvit.data import DataError, atomic_write_bytes
from scratchvit.run_folder import LOCK_NAME, FolderLock
from scratchvit.run_log import OutputError, open_log, read_step_log, writing
from scratchvit.signals import TrainingInterrupted, terminate_like_ctrl_c
from scratchvit.train import run
from test_train import (REPO_ROOT, RESUME_STEPS, TINY_MODEL, TINY_MODEL_ARGS, Crash, assert_one_line_error,
                        assert_same_checkpoint_state, cli, losses_and_accuracies, quiet, read_metrics,
                        reference_run, resume_config, resume_dataset, write_dataset)  # noqa: F401 (fixtures)

sys.path.insert(0, str(REPO_ROOT))      # train_mnist.py, the CLI, lives beside the package
import train_mnist  # noqa: E402

JOB = REPO_ROOT / "tests" / "mpi_job.py"
# 48 training images in batches of 16: 3 steps per epoch; steps.jsonl gets one line per epoch (its last step)
OPTIONS = dict(TINY_MODEL, epochs=2, batch_size=16, lr=5e-3, seed=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "small", train_count=48, test_count=16)


def config_for(data_dir, out_dir, **overrides):
    return TrainConfig(**dict(OPTIONS, data_dir=str(data_dir), out_dir=str(out_dir), **overrides))


def cli_args(data_dir, out_dir, **overrides):
    options = dict(OPTIONS, **overrides)
    return ["--data-dir", data_dir, "--out-dir", out_dir,
            *[text for name, value in options.items() for text in (f"--{name.replace('_', '-')}", str(value))]]


def snapshot(folder):
    """{name: bytes} of every file in `folder`, hidden ones (the lock) included."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


@pytest.fixture
def finished_run(data_dir, tmp_path):
    """A finished 2-epoch run's folder."""
    out_dir = tmp_path / "run"
    run(config_for(data_dir, out_dir), log=quiet)
    assert sorted(snapshot(out_dir)) == ["checkpoint.npz", "metrics.jsonl", "steps.jsonl"]      # no lock left
    return out_dir


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler that fails the test where nothing else takes the signal (the default action
    would end the whole test session); it must be the handler again after the test's run."""
    def guard(signum, frame):
        raise RuntimeError("SIGTERM reached the test's own handler: nothing in the code under test took it")

    previous = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------
# case 1: a folder that holds a run is continued or replaced on request only, and never emptied by a failure

def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(data_dir, finished_run):
    before = snapshot(finished_run)
    result = cli(*cli_args(data_dir, finished_run))
    assert_one_line_error(result, 1, f"the output folder {finished_run} holds a run", "checkpoint.npz",
                          "metrics.jsonl (2 epochs, the last at test accuracy", "steps.jsonl (2 lines)", "--resume",
                          "--overwrite")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("leftover", ["empty logs", "other files"])
def test_a_folder_without_a_run_needs_no_overwrite(data_dir, tmp_path, leftover):
    """The accepted side: empty logs (nothing to lose) or files that are not a run's are no reason to refuse."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    names = ["metrics.jsonl", "steps.jsonl"] if leftover == "empty logs" else ["notes.txt", "curves.png"]
    for name in names:
        (out_dir / name).write_text("" if leftover == "empty logs" else "mine")
    run(config_for(data_dir, out_dir, epochs=1), log=quiet)
    assert [record["epoch"] for record in read_metrics(out_dir)] == [1]
    if leftover == "other files":
        assert all((out_dir / name).read_text() == "mine" for name in names)


def test_a_run_that_fails_at_once_empties_no_log(data_dir, finished_run):
    before = snapshot(finished_run)
    result = cli(*cli_args(data_dir, finished_run, lr="inf"))
    assert_one_line_error(result, 2, "lr must be a positive finite number")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("failure", ["bad option", "no data", "model does not fit the images"])
def test_overwrite_changes_nothing_before_the_run_has_checked_everything(data_dir, finished_run, tmp_path, failure):
    """--overwrite replaces the folder's run only once the options, the data and the model are checked: a
    run that fails before leaves every file as it was, and no lock file."""
    changes = {"bad option": dict(lr=float("inf")), "no data": dict(data_dir=tmp_path / "missing"),
               "model does not fit the images": dict(patch_size=3)}[failure]
    before = snapshot(finished_run)
    with pytest.raises((ConfigError, DataError)):
        run(config_for(changes.pop("data_dir", data_dir), finished_run, overwrite=True, **changes), log=quiet)
    assert snapshot(finished_run) == before


def test_overwrite_says_first_what_it_replaces_then_replaces_all_of_it(data_dir, finished_run):
    (finished_run / "evaluation.json").write_text("{}")        # an --eval-only report of the old checkpoint
    (finished_run / "notes.txt").write_text("mine")
    result = cli(*cli_args(data_dir, finished_run, epochs=1), "--overwrite")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"--overwrite: replacing the run in {finished_run}: "), first
    for fragment in ("checkpoint.npz", "metrics.jsonl (2 epochs, the last at test accuracy", "steps.jsonl (2 lines)",
                     "evaluation.json"):
        assert fragment in first, (fragment, first)
    assert [record["epoch"] for record in read_metrics(finished_run)] == [1]
    meta, _, _ = load_checkpoint(finished_run / "checkpoint.npz")
    assert (meta["epoch"], meta["train_config"]["epochs"]) == (1, 1)
    assert [record["epoch"] for record in read_step_log(finished_run / "steps.jsonl")] == [1]
    assert not (finished_run / "evaluation.json").exists()     # it described the replaced checkpoint
    assert (finished_run / "notes.txt").read_text() == "mine"  # not a run's file: kept


def test_resume_and_overwrite_exclude_each_other(data_dir, finished_run):
    before = snapshot(finished_run)
    result = cli(*cli_args(data_dir, finished_run), "--resume", "--overwrite")
    assert_one_line_error(result, 2, "--resume and --overwrite exclude each other")
    assert snapshot(finished_run) == before


# ------------------------------------------------------------------------------------------------
# case 2: one run per folder

HOLDER = """
import json, sys, time
from pathlib import Path
from scratchvit.train import TrainConfig, run
options, ready, release = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def hold(epoch, step):          # in epoch 2, after epoch 1's checkpoint: wait for the test
    if (epoch, step) == (1, 0):
        ready.touch()
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

run(TrainConfig(**options), log=lambda message: None, on_step=hold)
"""


def wait_for(path, process, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), process.communicate(timeout=10)


def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_holder(data_dir, tmp_path):
    out_dir, ready, release = tmp_path / "run", tmp_path / "ready", tmp_path / "release"
    options = dict(OPTIONS, data_dir=str(data_dir), out_dir=str(out_dir))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(options), str(ready), str(release)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, holder)
        before = snapshot(out_dir)
        for flag in ("--resume", "--overwrite"):           # whatever the second run asks for
            second = cli(*cli_args(data_dir, out_dir), flag)
            assert_one_line_error(second, 1, f"the output folder {out_dir} is in use by another run",
                                  f"pid {holder.pid} on {socket.gethostname()}, started ")
        assert snapshot(out_dir) == before
        # evaluating the running run's last checkpoint is allowed: it only reads the checkpoint (replaced
        # atomically) and writes evaluation.json, which training never writes
        evaluation = cli("--data-dir", data_dir, "--eval-only", "--checkpoint", out_dir / "checkpoint.npz",
                         *TINY_MODEL_ARGS)
        assert evaluation.returncode == 0, evaluation.stderr
        release.touch()
        _, stderr = holder.communicate(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert holder.returncode == 0, stderr
    assert [record["epoch"] for record in read_metrics(out_dir)] == [1, 2]
    assert not (out_dir / LOCK_NAME).exists()


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path):
    first = FolderLock(tmp_path)
    first.acquire()
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
    with pytest.raises(OutputError, match=rf"in use by another run \(pid {os.getpid()} on "):
        FolderLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = FolderLock(tmp_path)
    second.acquire()                                    # free again
    second.release()


def test_a_lock_file_left_by_a_killed_run_does_not_block_the_next(data_dir, tmp_path):
    """flock dies with its process: a lock file whose writer is gone (kill -9, a crash) locks nothing."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / LOCK_NAME).write_text("pid 99999 on elsewhere, started long ago\n")
    run(config_for(data_dir, out_dir, epochs=1), log=quiet)
    assert [record["epoch"] for record in read_metrics(out_dir)] == [1]
    assert not (out_dir / LOCK_NAME).exists()


def test_a_lock_taken_on_a_lock_file_removed_meanwhile_is_not_the_folders(tmp_path, monkeypatch):
    """The race of a removed lock file: B opens .lock, its holder releases it (removes it) and C takes a
    new one, then B's flock succeeds on the removed file. B must see that the name leads to C's file,
    and stop, since C holds the folder."""
    real_flock, lockers = run_folder.fcntl.flock, []

    def flock_after_a_release(descriptor, operation):
        if not lockers:                                 # B, between its open and its flock
            (tmp_path / LOCK_NAME).unlink()             # the holder it saw releases the folder ...
            lockers.append(FolderLock(tmp_path))
            lockers[0].acquire()                        # ... and C takes it (through this same function)
        return real_flock(descriptor, operation)

    monkeypatch.setattr(run_folder.fcntl, "flock", flock_after_a_release)
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(OutputError, match=rf"in use by another run \(pid {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    lockers[0].release()


# ------------------------------------------------------------------------------------------------
# case 3: no log is written through a symbolic link

@pytest.mark.parametrize("name", ["metrics.jsonl", "steps.jsonl"])
@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_a_log_that_is_a_symbolic_link_is_refused_and_its_target_untouched(data_dir, tmp_path, name, resume):
    out_dir = tmp_path / "run"
    if resume:
        run(config_for(data_dir, out_dir, epochs=1), log=quiet)
        (out_dir / name).unlink()
    else:
        out_dir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    (out_dir / name).symlink_to(target)
    with pytest.raises(OutputError, match=f"{out_dir / name} is a symbolic link"):
        run(config_for(data_dir, out_dir, resume=resume), log=quiet)
    assert target.read_text() == "precious\n"
    assert (out_dir / name).is_symlink()


def test_the_symbolic_link_refusal_is_one_line_with_exit_1(data_dir, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    (out_dir / "metrics.jsonl").symlink_to(target)
    assert_one_line_error(cli(*cli_args(data_dir, out_dir)), 1, "metrics.jsonl is a symbolic link")
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("mode", ["a", "w"])
def test_logs_are_opened_without_following_a_link_planted_later(tmp_path, mode):
    """A link put in place of a log during the run (after the folder's check): the open itself refuses it."""
    target, link = tmp_path / "precious.txt", tmp_path / "steps.jsonl"
    target.write_text("precious\n")
    link.symlink_to(target)
    with pytest.raises(OutputError, match=f"cannot write {link}: it is a symbolic link"):
        with writing(link), open_log(link, mode) as file:
            file.write("a line\n")
    assert target.read_text() == "precious\n"
    with open_log(target, mode) as file:                # a file of its own: appended to, or emptied
        file.write("a line\n")
    assert target.read_text() == ("precious\na line\n" if mode == "a" else "a line\n")


# ------------------------------------------------------------------------------------------------
# case 4: the checkpoint before the metrics line, logs cut back on resume, OSError on output in one line

def fail_writes_to(monkeypatch, name, after=0, error_number=errno.ENOSPC):
    """Make the run's writes to the file `name` fail with `error_number` after `after` of them succeeded
    (the checkpoint's through atomic_write_bytes, the logs' through open_log)."""
    calls = []

    def failing(function):
        def wrapper(path, *args, **kwargs):
            if Path(path).name == name:
                calls.append(path)
                if len(calls) > after:
                    raise OSError(error_number, os.strerror(error_number), str(path))
            return function(path, *args, **kwargs)
        return wrapper

    for module, names in ((checkpoint, ["atomic_write_bytes"]), (run_log, ["atomic_write_bytes", "open_log"]),
                          (run_folder, ["open_log"]), (train, ["open_log"])):    # wherever the run calls them
        for function_name in names:
            monkeypatch.setattr(module, function_name, failing(getattr(module, function_name)))


def epochs_of(out_dir):
    return [record["epoch"] for record in read_metrics(out_dir)]


@pytest.mark.parametrize("during", ["a new run", "a resumed run"])
def test_a_full_disk_at_the_checkpoint_leaves_no_metrics_line_for_its_epoch(data_dir, tmp_path, monkeypatch,
                                                                           during):
    """The disk fills up when epoch 2's checkpoint is written (in a new run, or in one resumed after
    epoch 1, as in the issue): metrics.jsonl does not list epoch 2, and the next resume lists it once."""
    out_dir = tmp_path / "run"
    if during == "a resumed run":
        run(config_for(data_dir, out_dir, epochs=1), log=quiet)
    fail_writes_to(monkeypatch, "checkpoint.npz", after=0 if during == "a resumed run" else 1)
    with pytest.raises(OutputError) as error:
        run(config_for(data_dir, out_dir, resume=during == "a resumed run"), log=quiet)
    assert str(error.value) == (f"cannot write {out_dir / 'checkpoint.npz'}: No space left on device; the last "
                                f"checkpoint, {out_dir / 'checkpoint.npz'} (after epoch 1), is intact: continue "
                                f"from it with --resume")
    assert epochs_of(out_dir) == [1]                                # epoch 2 is in no checkpoint: not listed
    assert load_checkpoint(out_dir / "checkpoint.npz")[0]["epoch"] == 1
    assert not list(out_dir.glob(".checkpoint.npz.*"))              # no temporary file left
    monkeypatch.undo()
    history = run(config_for(data_dir, out_dir, resume=True), log=quiet)
    assert epochs_of(out_dir) == [1, 2]                             # each epoch once
    assert losses_and_accuracies(read_metrics(out_dir)) == losses_and_accuracies(history)


def test_a_lost_metrics_line_comes_back_on_resume(data_dir, tmp_path, monkeypatch):
    """The metrics line of epoch 1 fails after its checkpoint was written: resume restores it from the
    checkpoint's history."""
    out_dir = tmp_path / "run"
    fail_writes_to(monkeypatch, "metrics.jsonl", after=1)           # the first open empties it; then epoch 1's line
    with pytest.raises(OutputError) as error:
        run(config_for(data_dir, out_dir), log=quiet)
    assert str(error.value).startswith(f"cannot write {out_dir / 'metrics.jsonl'}: No space left on device; the "
                                       f"last checkpoint, {out_dir / 'checkpoint.npz'} (after epoch 1), is intact")
    assert epochs_of(out_dir) == []
    monkeypatch.undo()
    history = run(config_for(data_dir, out_dir, resume=True), log=quiet)
    assert epochs_of(out_dir) == [1, 2]
    assert losses_and_accuracies(read_metrics(out_dir)) == losses_and_accuracies(history)


def test_a_failed_step_log_line_says_no_checkpoint_was_written_yet(data_dir, tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    fail_writes_to(monkeypatch, "steps.jsonl", after=1, error_number=errno.EROFS)
    expected = (f"cannot write {out_dir / 'steps.jsonl'}: Read-only file system; no checkpoint of this run was "
                f"written yet")
    with pytest.raises(OutputError, match=f"^{re.escape(expected)}$"):
        run(config_for(data_dir, out_dir), log=quiet)
    assert not (out_dir / "checkpoint.npz").exists()


def test_the_cli_says_a_full_disk_in_one_line_with_exit_1(data_dir, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    fail_writes_to(monkeypatch, "checkpoint.npz", after=1)
    assert train_mnist.main([str(argument) for argument in cli_args(data_dir, out_dir)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: cannot write {out_dir / 'checkpoint.npz'}: No space left on device; the last "
                     f"checkpoint, {out_dir / 'checkpoint.npz'} (after epoch 1), is intact: continue from it with "
                     f"--resume"]


def read_only(path):
    """Make `path` read-only; skip where this process writes into it anyway (root)."""
    path.chmod(0o444)
    try:
        os.close(os.open(path, os.O_WRONLY))
    except PermissionError:
        return
    pytest.skip("this process may write into a read-only file (root)")


@pytest.mark.parametrize("resumed_from", ["a finished epoch", "a lost metrics line"])
def test_a_read_only_metrics_file_is_one_line_and_the_checkpoint_stays(data_dir, tmp_path, resumed_from):
    """Resuming into a read-only metrics.jsonl: refused when the log must be rewritten to match the
    checkpoint, or when the epoch's line is appended after its checkpoint; never a traceback, never
    replaced behind the file's permissions."""
    out_dir = tmp_path / "run"
    run(config_for(data_dir, out_dir, epochs=1), log=quiet)
    if resumed_from == "a lost metrics line":
        (out_dir / "metrics.jsonl").write_text("")
    before = (out_dir / "metrics.jsonl").read_bytes()
    read_only(out_dir / "metrics.jsonl")
    try:
        with pytest.raises(OutputError) as error:
            run(config_for(data_dir, out_dir, epochs=2, resume=True), log=quiet)
    finally:
        (out_dir / "metrics.jsonl").chmod(0o644)
    saved = "after epoch 2" if resumed_from == "a finished epoch" else "after epoch 1"
    assert str(error.value) == (f"cannot write {out_dir / 'metrics.jsonl'}: Permission denied; the last checkpoint, "
                                f"{out_dir / 'checkpoint.npz'} ({saved}), is intact: continue from it with --resume")
    assert (out_dir / "metrics.jsonl").read_bytes() == before


def test_resume_cuts_the_logs_back_to_the_checkpoint(resume_dataset, reference_run, tmp_path):
    """A crash in epoch 2 leaves the checkpoint of epoch 1; lines written after it (here planted: what a
    metrics line written before a failed checkpoint, or a step line of the lost steps, leaves) are cut on
    resume, which then repeats the uninterrupted run line for line."""
    reference_history, reference_checkpoint = reference_run

    def crash(epoch, step):
        if (epoch, step) == (1, 2):
            raise Crash

    with pytest.raises(Crash):
        run(resume_config(resume_dataset, tmp_path), log=quiet, on_step=crash)
    metrics, steps = read_metrics(tmp_path), read_step_log(tmp_path / "steps.jsonl")
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write(json.dumps(dict(metrics[0], epoch=2)) + "\n")
    with open(tmp_path / "steps.jsonl", "a") as file:
        file.write(json.dumps(dict(steps[-1], step=RESUME_STEPS + 2, epoch=2)) + "\n")
    history = run(resume_config(resume_dataset, tmp_path, resume=True), log=quiet)
    assert losses_and_accuracies(read_metrics(tmp_path)) == losses_and_accuracies(reference_history)
    assert losses_and_accuracies(history) == losses_and_accuracies(reference_history)
    reference_steps = read_step_log(reference_checkpoint.parent / "steps.jsonl")
    assert [record["step"] for record in read_step_log(tmp_path / "steps.jsonl")] == \
        [record["step"] for record in reference_steps]
    assert_same_checkpoint_state(tmp_path / "checkpoint.npz", reference_checkpoint)


# ------------------------------------------------------------------------------------------------
# case 5: SIGTERM as Ctrl-C

def test_sigterm_checkpoints_at_the_next_step_and_resume_repeats_the_run(resume_dataset, reference_run, tmp_path,
                                                                        sigterm_guard):
    reference_history, reference_checkpoint = reference_run
    sigint_before = signal.getsignal(signal.SIGINT)

    def terminate(epoch, step):
        if (epoch, step) == (0, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stop:
        run(resume_config(resume_dataset, tmp_path), log=quiet, on_step=terminate)
    assert stop.value.exit_status == 143
    assert str(stop.value) == (f"terminated by SIGTERM: checkpoint written to {tmp_path / 'checkpoint.npz'} "
                               f"(epoch 1, step 3); continue with --resume")
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard        # the run's handlers are gone again
    assert signal.getsignal(signal.SIGINT) is sigint_before
    meta, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"], meta["optimizer_step"]) == (0, 3, 3)
    history = run(resume_config(resume_dataset, tmp_path, resume=True), log=quiet)
    assert losses_and_accuracies(history) == losses_and_accuracies(reference_history)
    assert_same_checkpoint_state(tmp_path / "checkpoint.npz", reference_checkpoint)


def test_sigterm_to_the_cli_in_training_is_exit_143_and_one_line(data_dir, tmp_path):
    """`kill PID` as a user or a scheduler sends it: from outside, once training runs (slowed to 0.1 s a
    step from step 2 on by tests/mpi_job.py, which runs train_mnist.py's main as one process here).
    Batches of 4: 12 steps per epoch, so the signal lands inside an epoch, almost always the first."""
    out_dir, ready = tmp_path / "run", tmp_path / "ready"
    process = subprocess.Popen([sys.executable, str(JOB), "train", "--slow-from", "0,1", "--ready-file", str(ready),
                                "--", *map(str, cli_args(data_dir, out_dir, epochs=5, batch_size=4))],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terminated by SIGTERM: checkpoint "), stderr
    assert lines[0].endswith("continue with --resume"), stderr
    meta, _, _ = load_checkpoint(out_dir / "checkpoint.npz")
    # at a step boundary after the signal came (mid-epoch; at an epoch's end if it came in its last step)
    assert meta["optimizer_step"] == 12 * meta["epoch"] + meta["step_in_epoch"] >= 2
    assert not (out_dir / LOCK_NAME).exists()


def test_sigterm_before_training_ends_the_cli_like_ctrl_c(data_dir, tmp_path, monkeypatch, capsys, sigterm_guard):
    """SIGTERM while the data load (here: instead of run): one line, exit 143, the handler restored."""
    def terminated_while_loading(config, communicator):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the program")

    monkeypatch.setattr(train_mnist, "run", terminated_while_loading)
    assert train_mnist.main([str(argument) for argument in cli_args(data_dir, tmp_path / "run")]) == 143
    assert capsys.readouterr().err.strip().splitlines() == ["terminated by SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_terminate_like_ctrl_c_leaves_sigint_alone(sigterm_guard):
    with terminate_like_ctrl_c():
        with pytest.raises(KeyboardInterrupt, match="terminated by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)                              # the handler runs at the next bytecode; never this long
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


# ------------------------------------------------------------------------------------------------
# case 15: the checkpoint's permissions

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_an_atomic_write_gets_the_mode_a_plain_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "checkpoint.npz", b"weights")
        (tmp_path / "plain.jsonl").write_text("")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == {"checkpoint.npz": 0o666 & ~umask, "plain.jsonl": 0o666 & ~umask}


def test_a_runs_checkpoint_has_the_mode_of_its_logs(finished_run):
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in finished_run.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == dict.fromkeys(["checkpoint.npz", "metrics.jsonl", "steps.jsonl"], 0o666 & ~umask)
