"""The per-step log OUT/steps.jsonl (scratchvit.run_log.StepLog): what its lines hold, how many there
are, and that --resume, Ctrl-C and a crash leave one line per window, in order, with no repeats.

The runs train the tiny ViT of test_train.py on its synthetic data in batches of 4, so an epoch has
enough steps (45 or 50) for several lines at the real LOSS_READ_INTERVAL of 25. Each test records
the loss of every training step (on the CPU, reading it costs nothing) and holds the lines to those
numbers: a window shifted by one step, a mean over the wrong count, a line missing or repeated shows.
"""
import json
import math
import os
import signal

import numpy
import pytest

from scratchvit.checkpoint import load_checkpoint
from scratchvit.config import LOSS_READ_INTERVAL, ConfigError, TrainConfig
from scratchvit.run_log import read_step_log
from scratchvit.train import learning_rate_schedule, run
from scratchvit.train_step import TrainStep
from test_train import TINY_MODEL, TINY_MODEL_ARGS, Crash, assert_one_line_error, cli, quiet, write_dataset

BATCH = 4
OPTIONS = dict(TINY_MODEL, epochs=2, batch_size=BATCH, lr=5e-3, dropout=0.1, max_shift=1, seed=3)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{steps per epoch: data folder}: 200 training images make 50 steps of 4, 180 make 45."""
    root = tmp_path_factory.mktemp("data")
    return {count // BATCH: write_dataset(root / str(count), train_count=count, test_count=32, seed=6)
            for count in (200, 180)}


def config_for(data_dir, out_dir, **overrides):
    return TrainConfig(**dict(OPTIONS, data_dir=str(data_dir), out_dir=str(out_dir), **overrides))


@pytest.fixture
def step_losses(monkeypatch):
    """The loss of every training step, in order, as the training step returned it."""
    losses = []
    original = TrainStep.__call__

    def recording(self, images, labels):
        loss = original(self, images, labels)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(TrainStep, "__call__", recording)
    return losses


def steps_of(records):
    return [record["step"] for record in records]


def windows(records):
    """(first step, last step) of each line's window, 1-based: a window starts after the previous
    line, or at its epoch's first step."""
    spans, previous = [], 0
    for record in records:
        spans.append((previous + 1, record["step"]))
        previous = record["step"]
    return spans


def epoch_lines(records, epoch):
    return [record for record in records if record["epoch"] == epoch]


# ------------------------------------------------------------------------------------------------
# 1. what a line holds, and how many lines

@pytest.mark.parametrize("steps_per_epoch, every, expected_steps", [
    pytest.param(50, 25, [25, 50, 75, 100], id="N-divides-the-epoch"),
    pytest.param(50, 50, [50, 100], id="one-line-per-epoch"),
    pytest.param(45, 25, [25, 45, 70, 90], id="last-window-of-an-epoch-is-short"),
    pytest.param(45, 50, [45, 90], id="N-longer-than-an-epoch"),
])
def test_lines_are_the_mean_loss_of_their_windows(datasets, tmp_path, step_losses, steps_per_epoch, every,
                                                  expected_steps):
    config = config_for(datasets[steps_per_epoch], tmp_path, log_every=every)
    history = run(config, log=quiet)
    records = read_step_log(tmp_path / "steps.jsonl")

    assert steps_of(records) == expected_steps
    assert len(records) == config.epochs * math.ceil(steps_per_epoch / every)
    assert [record["epoch"] for record in records] == [1 + (step - 1) // steps_per_epoch for step in expected_steps]
    assert len(step_losses) == config.epochs * steps_per_epoch
    schedule = learning_rate_schedule(config, steps_per_epoch)
    for record, (first, last) in zip(records, windows(records)):
        assert set(record) == {"step", "epoch", "loss", "lr", "images_per_second"}
        # the mean of exactly the steps since the previous line (summed in float32 on the device)
        assert record["loss"] == pytest.approx(numpy.mean(step_losses[first - 1:last]), rel=1e-5)
        assert record["lr"] == schedule[last - 1]                       # the rate of the window's last step
        assert math.isfinite(record["images_per_second"]) and record["images_per_second"] > 0
    for epoch, metrics in enumerate(history, start=1):
        lines = epoch_lines(records, epoch)
        sizes = [last - first + 1 for (first, last), record in zip(windows(records), records)
                 if record["epoch"] == epoch]
        # weighted by their steps, an epoch's lines average to its train_loss, to float64 rounding
        weighted = sum(size * record["loss"] for size, record in zip(sizes, lines)) / steps_per_epoch
        assert weighted == pytest.approx(metrics["train_loss"], rel=1e-12, abs=0)
        if steps_per_epoch % every == 0:                                    # and then their plain mean does
            assert numpy.mean([record["loss"] for record in lines]) == pytest.approx(metrics["train_loss"],
                                                                                       rel=1e-12, abs=0)


def test_log_every_0_writes_no_step_log_and_removes_an_older_one(datasets, tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"step": 999, "epoch": 9, "loss": 1.0}\n')   # from an earlier run
    run(config_for(datasets[50], tmp_path, epochs=1, log_every=0, overwrite=True), log=quiet)
    assert not (tmp_path / "steps.jsonl").exists()
    assert (tmp_path / "metrics.jsonl").exists()


def test_a_fresh_run_starts_a_fresh_step_log(datasets, tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"step": 999, "epoch": 9, "loss": 1.0}\n')
    run(config_for(datasets[50], tmp_path, epochs=1, overwrite=True), log=quiet)   # without it: refused
    assert steps_of(read_step_log(tmp_path / "steps.jsonl")) == [25, 50]


@pytest.mark.parametrize("every", [1, 10, 30, -25])
def test_log_every_must_ride_on_the_loss_reads(every):
    """Any other step would read the loss from the device just for the log, and make a GPU step wait."""
    with pytest.raises(ConfigError, match=f"multiple of {LOSS_READ_INTERVAL}"):
        TrainConfig(log_every=every).validate()
    TrainConfig(log_every=4 * LOSS_READ_INTERVAL).validate()
    assert TrainConfig().log_every % LOSS_READ_INTERVAL == 0 and TrainConfig().log_every > 0


def test_cli_log_every_that_is_not_a_multiple_is_exit_2(datasets, tmp_path):
    result = cli("--data-dir", datasets[50], "--out-dir", tmp_path, "--epochs", 1, "--log-every", 30,
                 *TINY_MODEL_ARGS)
    assert_one_line_error(result, 2, "--log-every", str(LOSS_READ_INTERVAL), "got 30")
    assert not (tmp_path / "steps.jsonl").exists()


def test_cli_log_every_writes_its_lines(datasets, tmp_path):
    result = cli("--data-dir", datasets[50], "--out-dir", tmp_path, "--epochs", 2, "--batch-size", BATCH,
                 "--log-every", 50, *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [50, 100]


# ------------------------------------------------------------------------------------------------
# 2. resume, Ctrl-C, crashes: one line per window, steps increasing, nothing repeated

@pytest.fixture(scope="module")
def reference_log(datasets, tmp_path_factory):
    """The step log of an uninterrupted 2-epoch run of 50 steps an epoch."""
    out_dir = tmp_path_factory.mktemp("reference")
    run(config_for(datasets[50], out_dir), log=quiet)
    return read_step_log(out_dir / "steps.jsonl")


def without_speed(records):
    return [{key: value for key, value in record.items() if key != "images_per_second"} for record in records]


def test_ctrl_c_writes_the_partial_window_and_resume_continues_the_count(datasets, reference_log, tmp_path):
    """Ctrl-C after step 10 of epoch 2 (global step 60): the window 51..75 is split into 51..60 and
    61..75, which together average to the uninterrupted run's line; the other lines are bit-equal
    (the resumed run is exact on the CPU)."""
    def interrupt(epoch, step):
        if (epoch, step) == (1, 9):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run(config_for(datasets[50], tmp_path), log=quiet, on_step=interrupt)
    assert steps_of(read_step_log(tmp_path / "steps.jsonl")) == [25, 50, 60]
    assert load_checkpoint(tmp_path / "checkpoint.npz")[0]["optimizer_step"] == 60

    run(config_for(datasets[50], tmp_path, resume=True), log=quiet)
    records = read_step_log(tmp_path / "steps.jsonl")
    assert steps_of(records) == [25, 50, 60, 75, 100]
    assert [record["epoch"] for record in records] == [1, 1, 2, 2, 2]
    reference = {record["step"]: record for record in without_speed(reference_log)}
    resumed = {record["step"]: record for record in without_speed(records)}
    for step in (25, 50, 100):
        assert resumed[step] == reference[step]
    assert (10 * resumed[60]["loss"] + 15 * resumed[75]["loss"]) / 25 == pytest.approx(reference[75]["loss"],
                                                                                      rel=1e-12, abs=0)
    assert resumed[75]["lr"] == reference[75]["lr"]


def test_a_crash_then_resume_drops_the_lines_the_checkpoint_does_not_hold(datasets, reference_log, tmp_path):
    """A crash (no checkpoint of its own) at step 31 of epoch 2: the line at step 75 was written, but
    the resumed run starts again at step 51 from the end-of-epoch-1 checkpoint and writes it again."""
    def crash(epoch, step):
        if (epoch, step) == (1, 30):
            raise Crash

    with pytest.raises(Crash):
        run(config_for(datasets[50], tmp_path), log=quiet, on_step=crash)
    assert steps_of(read_step_log(tmp_path / "steps.jsonl")) == [25, 50, 75]

    run(config_for(datasets[50], tmp_path, resume=True), log=quiet)
    records = read_step_log(tmp_path / "steps.jsonl")
    assert without_speed(records) == without_speed(reference_log)


def test_resume_with_more_epochs_continues_the_step_numbers(datasets, tmp_path):
    run(config_for(datasets[50], tmp_path, epochs=1), log=quiet)
    assert steps_of(read_step_log(tmp_path / "steps.jsonl")) == [25, 50]
    run(config_for(datasets[50], tmp_path, epochs=3, resume=True), log=quiet)
    records = read_step_log(tmp_path / "steps.jsonl")
    assert steps_of(records) == [25, 50, 75, 100, 125, 150]
    assert [record["epoch"] for record in records] == [1, 1, 2, 2, 3, 3]
    assert all(math.isfinite(record["loss"]) and record["loss"] > 0 for record in records)


def test_a_line_cut_short_by_a_crash_is_dropped_on_resume(datasets, tmp_path):
    run(config_for(datasets[50], tmp_path, epochs=1), log=quiet)
    with open(tmp_path / "steps.jsonl", "a") as file:
        file.write('{"step": 75, "epoch": 2, "lo')                    # the write a kill interrupted
    assert steps_of(read_step_log(tmp_path / "steps.jsonl")) == [25, 50]
    run(config_for(datasets[50], tmp_path, epochs=2, resume=True), log=quiet)
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [25, 50, 75, 100]    # every line is JSON again
