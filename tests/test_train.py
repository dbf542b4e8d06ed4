"""End-to-end tests of scratchvit.train (`run`, resume, checkpoints) and of the `train_mnist.py` CLI.

Everything trains a tiny ViT (patch 2, dim 16, one block) on a tiny synthetic MNIST-format dataset
written with `write_idx` under a temporary folder: 8x8 images of noise where the label (0..3)
decides which quadrant is bright. Nothing reads the MNIST cache or the network: every run and
every CLI call names its data folder.
"""
import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from conftest import GPU_SKIP_REASON
from scratchvit.data import MNIST_FILES, write_idx
from scratchvit.data import atomic_write_bytes as atomic_write
from scratchvit.checkpoint import load_checkpoint
from scratchvit.config import TrainConfig
from scratchvit.evaluation import evaluate, load_for_evaluation
from scratchvit.train import NonFiniteLoss, run

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_mnist.py"

IMAGE_SIZE = 8
CLASSES = 4
TINY_MODEL = dict(patch_size=2, dim=16, depth=1, heads=2, mlp_dim=32)
TINY_MODEL_ARGS = ["--patch-size", "2", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32"]

# The resume runs: dropout and the random shift are on, so their generators must be restored too.
# 200 training images in batches of 32: 7 steps per epoch, the last one a partial batch of 8.
RESUME_TRAIN_COUNT = 200
RESUME_BATCH = 32
RESUME_STEPS = -(-RESUME_TRAIN_COUNT // RESUME_BATCH)
RESUME_OPTIONS = dict(TINY_MODEL, epochs=2, batch_size=RESUME_BATCH, lr=5e-3, dropout=0.1, max_shift=1, seed=3)


def quiet(message):
    pass


def saved_model_accuracy(path, config):
    """The test accuracy of the checkpoint at `path` as training measures it: evaluation.evaluate on the
    model that --eval-only loads (whatever config.validation says, the test set)."""
    _, model, data = load_for_evaluation(path, config)
    return evaluate(model, data["test_images"], data["test_labels"], config.eval_batch_size)


# ------------------------------------------------------------------------------------------------
# synthetic data

def quadrant_split(rng, count, size=IMAGE_SIZE, classes=CLASSES):
    """(count, size, size) uint8 noise with the quadrant numbered by the label made bright."""
    labels = rng.integers(0, classes, size=count)
    images = rng.integers(0, 60, size=(count, size, size))
    half = size // 2
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        images[index, row * half:(row + 1) * half, column * half:(column + 1) * half] += 180
    return images.astype(numpy.uint8), labels.astype(numpy.uint8)


def write_dataset(folder, train_count=256, test_count=128, seed=0, hard_tail=0):
    """The four MNIST files in `folder` (the training images gzipped, the others raw); returns folder.

    hard_tail > 0: every other image of the last `hard_tail` training images carries the next label
    instead of its quadrant's, so a model that learns the quadrants scores about half there and
    nearly all on the test set (tests/test_validation.py: an accuracy measured on the wrong images shows)."""
    rng = numpy.random.default_rng(seed)
    train_images, train_labels = quadrant_split(rng, train_count)
    test_images, test_labels = quadrant_split(rng, test_count)
    if hard_tail:
        train_labels[-hard_tail::2] = (train_labels[-hard_tail::2] + 1) % CLASSES
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / (MNIST_FILES["train_images"] + ".gz"), train_images)
    write_idx(folder / MNIST_FILES["train_labels"], train_labels)
    write_idx(folder / MNIST_FILES["test_images"], test_images)
    write_idx(folder / MNIST_FILES["test_labels"], test_labels)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "synthetic", train_count=384)


@pytest.fixture(scope="module")
def resume_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "resume", train_count=RESUME_TRAIN_COUNT, seed=1)


# ------------------------------------------------------------------------------------------------
# helpers

def cli(*args, timeout=120):
    """Run train_mnist.py from the repository root; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result, exit_code, *fragments):
    """Exit status `exit_code`, and stderr is one line `error: ...` holding every fragment (case-insensitive)."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def read_metrics(out_dir):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses_and_accuracies(history):
    return [(record["epoch"], record["train_loss"], record["test_accuracy"]) for record in history]


def assert_same_checkpoint_state(path_a, path_b):
    """Same model weights, optimiser moments, step count and learning rate, bit for bit."""
    meta_a, model_a, optimizer_a = load_checkpoint(path_a)
    meta_b, model_b, optimizer_b = load_checkpoint(path_b)
    assert sorted(model_a) == sorted(model_b)
    for name in model_a:
        numpy.testing.assert_array_equal(model_a[name], model_b[name], err_msg=name)
    assert sorted(optimizer_a) == sorted(optimizer_b) == ["exp_avg", "exp_avg_sq"]
    for name in optimizer_a:
        numpy.testing.assert_array_equal(optimizer_a[name], optimizer_b[name], err_msg=name)
    for key in ("epoch", "step_in_epoch", "optimizer_step", "optimizer_lr", "model_config"):
        assert meta_a[key] == meta_b[key], key


def resume_config(data_dir, out_dir, **overrides):
    return TrainConfig(**dict(RESUME_OPTIONS, data_dir=str(data_dir), out_dir=str(out_dir), **overrides))


class Crash(Exception):
    """Raised from on_step to stop a run the hard way (no checkpoint of its own)."""


# ------------------------------------------------------------------------------------------------
# 1. learning

def test_training_learns_the_synthetic_task_and_writes_metrics_and_checkpoint(dataset, tmp_path):
    out_dir = tmp_path / "run"
    config = TrainConfig(data_dir=str(dataset), out_dir=str(out_dir), epochs=8, batch_size=32, lr=1e-2,
                         warmup_epochs=0.5, max_shift=1, seed=0, **TINY_MODEL)
    history = run(config, log=quiet)

    assert [record["epoch"] for record in history] == list(range(1, 9))
    losses = [record["train_loss"] for record in history]
    accuracies = [record["test_accuracy"] for record in history]
    assert losses[-1] < 0.3 * losses[0], losses
    assert accuracies[-1] >= 0.85, accuracies           # chance is 1/4

    metrics = read_metrics(out_dir)
    assert len(metrics) == 8
    for epoch, record in enumerate(metrics, start=1):
        assert {"epoch", "train_loss", "test_accuracy", "lr", "seconds"} <= set(record)
        assert record["epoch"] == epoch
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert numpy.isfinite(record["train_loss"]) and record["train_loss"] > 0
        assert record["lr"] >= 0 and record["seconds"] >= 0
    assert losses_and_accuracies(metrics) == losses_and_accuracies(history)
    assert all(0 < record["lr"] <= config.lr for record in metrics[:-1])
    # wall_seconds: since run() began, so it includes data loading and grows with every epoch's seconds
    walls = [record["wall_seconds"] for record in metrics]
    assert all(wall >= record["elapsed"] for wall, record in zip(walls, metrics))
    assert all(later - earlier >= record["seconds"] for earlier, later, record in zip(walls, walls[1:], metrics[1:]))

    checkpoint = out_dir / "checkpoint.npz"
    assert checkpoint.is_file()
    meta, model_state, _ = load_checkpoint(checkpoint)
    assert (meta["epoch"], meta["step_in_epoch"]) == (8, 0)
    assert meta["model_config"]["dim"] == 16 and meta["model_config"]["image_size"] == IMAGE_SIZE
    assert all(numpy.isfinite(value).all() for value in model_state.values())
    # the saved model scores what the last epoch reported
    assert saved_model_accuracy(checkpoint, config) == accuracies[-1]


# ------------------------------------------------------------------------------------------------
# 2. exact resume on the CPU

@pytest.fixture(scope="module")
def reference_run(resume_dataset, tmp_path_factory):
    """An uninterrupted 2-epoch run: (history, checkpoint path)."""
    out_dir = tmp_path_factory.mktemp("reference")
    history = run(resume_config(resume_dataset, out_dir), log=quiet)
    return history, out_dir / "checkpoint.npz"


def test_resume_from_an_epoch_boundary_repeats_the_uninterrupted_run(resume_dataset, reference_run, tmp_path):
    reference_history, reference_checkpoint = reference_run

    def crash_in_second_epoch(epoch, step):
        if (epoch, step) == (1, 0):
            raise Crash

    with pytest.raises(Crash):
        run(resume_config(resume_dataset, tmp_path), log=quiet, on_step=crash_in_second_epoch)
    meta, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 0)       # the end-of-epoch-1 checkpoint
    assert len(read_metrics(tmp_path)) == 1

    history = run(resume_config(resume_dataset, tmp_path, resume=True), log=quiet)
    assert losses_and_accuracies(history) == losses_and_accuracies(reference_history)
    assert losses_and_accuracies(read_metrics(tmp_path)) == losses_and_accuracies(reference_history)
    assert_same_checkpoint_state(tmp_path / "checkpoint.npz", reference_checkpoint)


@pytest.mark.parametrize("interrupt_at", [(0, 2), (1, 3), (1, 0)], ids=["epoch1-step3", "epoch2-step4", "epoch2-step1"])
def test_sigint_mid_epoch_checkpoints_and_resume_repeats_the_uninterrupted_run(resume_dataset, reference_run,
                                                                             tmp_path, interrupt_at):
    reference_history, reference_checkpoint = reference_run
    handler_before = signal.getsignal(signal.SIGINT)

    def interrupt(epoch, step):
        if (epoch, step) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="resume"):
        run(resume_config(resume_dataset, tmp_path), log=quiet, on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is handler_before       # the run's handler is gone again

    epoch, step = interrupt_at
    meta, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"]) == (epoch, step + 1)
    assert meta["optimizer_step"] == epoch * RESUME_STEPS + step + 1
    assert len(read_metrics(tmp_path)) == epoch                    # only the finished epochs
    # nothing else: no temporary file of the atomic writer (".checkpoint.npz.*.part") is left behind
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.jsonl", "steps.jsonl"]

    resumed_steps = []
    history = run(resume_config(resume_dataset, tmp_path, resume=True), log=quiet,
                  on_step=lambda e, s: resumed_steps.append((e, s)))
    assert resumed_steps[0] == (epoch, step + 1)                   # continues after the last finished step
    assert len(resumed_steps) == 2 * RESUME_STEPS - (epoch * RESUME_STEPS + step + 1)
    assert losses_and_accuracies(history) == losses_and_accuracies(reference_history)
    assert losses_and_accuracies(read_metrics(tmp_path)) == losses_and_accuracies(reference_history)
    assert_same_checkpoint_state(tmp_path / "checkpoint.npz", reference_checkpoint)


def test_sigint_during_the_last_step_of_an_epoch_still_resumes_exactly(resume_dataset, reference_run, tmp_path):
    """The flag set during an epoch's last step is only acted on in the next epoch; resuming is still exact."""
    reference_history, reference_checkpoint = reference_run

    def interrupt(epoch, step):
        if (epoch, step) == (0, RESUME_STEPS - 1):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run(resume_config(resume_dataset, tmp_path), log=quiet, on_step=interrupt)
    history = run(resume_config(resume_dataset, tmp_path, resume=True), log=quiet)
    assert losses_and_accuracies(history) == losses_and_accuracies(reference_history)
    assert_same_checkpoint_state(tmp_path / "checkpoint.npz", reference_checkpoint)


def test_resume_with_more_epochs_extends_a_finished_run(resume_dataset, tmp_path):
    """(A 1-epoch run extended to 2 does not repeat a 2-epoch run: the cosine schedule spans config.epochs.)"""
    first = run(resume_config(resume_dataset, tmp_path, epochs=1), log=quiet)
    history = run(resume_config(resume_dataset, tmp_path, epochs=2, resume=True), log=quiet)
    assert [record["epoch"] for record in history] == [1, 2]
    assert losses_and_accuracies(history[:1]) == losses_and_accuracies(first)
    assert losses_and_accuracies(read_metrics(tmp_path)) == losses_and_accuracies(history)
    meta, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert (meta["epoch"], meta["optimizer_step"]) == (2, 2 * RESUME_STEPS)


# ------------------------------------------------------------------------------------------------
# 3. the CLI: train, evaluate, resume

@pytest.fixture(scope="module")
def cli_run(dataset, tmp_path_factory):
    """A short CLI run: (completed process, out_dir)."""
    out_dir = tmp_path_factory.mktemp("cli") / "run"
    result = cli("--data-dir", dataset, "--out-dir", out_dir, "--epochs", 2, "--batch-size", 32, "--lr", "1e-2",
                 *TINY_MODEL_ARGS)
    return result, out_dir


def test_cli_short_run_succeeds_and_writes_metrics(cli_run):
    result, out_dir = cli_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    metrics = read_metrics(out_dir)
    assert [record["epoch"] for record in metrics] == [1, 2]
    assert all(0.0 <= record["test_accuracy"] <= 1.0 for record in metrics)
    assert (out_dir / "checkpoint.npz").is_file()
    assert "epoch 2/2" in result.stdout


def test_cli_eval_only_prints_the_test_accuracy_of_the_checkpoint(dataset, cli_run):
    _, out_dir = cli_run
    accuracy = read_metrics(out_dir)[-1]["test_accuracy"]
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", out_dir / "checkpoint.npz", *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    assert f"; {accuracy:.2%} in one forward pass, as training measures it" in result.stdout, result.stdout
    result = cli("--data-dir", dataset, "--eval-only", "--no-shift-average", "--checkpoint", out_dir / "checkpoint.npz",
                 *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    assert f"test accuracy {accuracy:.2%} (" in result.stdout, result.stdout


def test_cli_eval_only_with_another_dim_is_a_one_line_error(dataset, cli_run):
    _, out_dir = cli_run
    arguments = [argument if argument != "16" else "32" for argument in TINY_MODEL_ARGS]   # --dim 32
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", out_dir / "checkpoint.npz", *arguments)
    assert_one_line_error(result, 1, "dim")


def test_cli_eval_only_with_a_missing_checkpoint_is_a_one_line_error(dataset, tmp_path):
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", tmp_path / "nothing.npz", *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "nothing.npz")


def test_cli_resume_without_a_checkpoint_is_a_one_line_error(dataset, tmp_path):
    result = cli("--data-dir", dataset, "--out-dir", tmp_path / "empty", "--resume", *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "checkpoint")


@pytest.mark.parametrize("damage", ["truncated", "bad-crc"])
def test_cli_resume_from_a_damaged_checkpoint_is_a_one_line_error(dataset, cli_run, tmp_path, damage):
    _, out_dir = cli_run
    content = bytearray((out_dir / "checkpoint.npz").read_bytes())
    if damage == "truncated":
        content = content[:1000]
    else:
        middle = len(content) // 2
        content[middle:middle + 50] = bytes(50)
    (tmp_path / "checkpoint.npz").write_bytes(bytes(content))
    result = cli("--data-dir", dataset, "--out-dir", tmp_path, "--resume", "--batch-size", 32, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "checkpoint")


def test_cli_eval_only_does_not_need_the_training_dropout(dataset, tmp_path):
    trained = cli("--data-dir", dataset, "--out-dir", tmp_path, "--epochs", 1, "--batch-size", 64, "--dropout", 0.1,
                  *TINY_MODEL_ARGS)
    assert trained.returncode == 0, trained.stderr
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", tmp_path / "checkpoint.npz", *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout


# ------------------------------------------------------------------------------------------------
# 4. clear errors: one line on stderr, no traceback, the documented exit status

def damage_missing_folder(folder):
    return folder / "no-such-folder", "no-such-folder"


def damage_truncated_images(folder):
    path = folder / MNIST_FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-7])
    return folder, "truncated"


def damage_corrupt_gzip(folder):
    path = folder / (MNIST_FILES["train_images"] + ".gz")
    content = path.read_bytes()
    path.write_bytes(content[:10] + b"\x00garbage\xff" * 8 + content[-8:])
    return folder, "gzip"


def damage_count_mismatch(folder):
    labels = numpy.zeros(5, dtype=numpy.uint8)
    write_idx(folder / MNIST_FILES["train_labels"], labels)
    return folder, "labels"


@pytest.mark.parametrize("damage", [damage_missing_folder, damage_truncated_images, damage_corrupt_gzip,
                                    damage_count_mismatch], ids=lambda function: function.__name__[len("damage_"):])
def test_cli_data_problems_are_one_line_errors_with_exit_1(tmp_path, damage):
    folder = write_dataset(tmp_path / "data", train_count=16, test_count=8)
    assert gzip.decompress((folder / (MNIST_FILES["train_images"] + ".gz")).read_bytes())   # a valid gzip first
    data_dir, fragment = damage(folder)
    result = cli("--data-dir", data_dir, "--out-dir", tmp_path / "out", "--epochs", 1, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, fragment)
    assert not (tmp_path / "out" / "checkpoint.npz").exists()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "small", train_count=32, test_count=16)


def model_args(**changes):
    options = dict(zip(TINY_MODEL_ARGS[0::2], TINY_MODEL_ARGS[1::2]))
    options.update({f"--{name.replace('_', '-')}": str(value) for name, value in changes.items()})
    return [item for pair in options.items() for item in pair]


def test_cli_patch_size_that_does_not_divide_the_image_is_exit_2(small_dataset, tmp_path):
    result = cli("--data-dir", small_dataset, "--out-dir", tmp_path, "--epochs", 1, *model_args(patch_size=3))
    assert_one_line_error(result, 2, "must be divisible by --patch-size 3")


def test_cli_dim_not_divisible_by_heads_is_exit_2(small_dataset, tmp_path):
    result = cli("--data-dir", small_dataset, "--out-dir", tmp_path, "--epochs", 1, *model_args(dim=10, heads=4))
    assert_one_line_error(result, 2, "--dim 10 must be divisible by --heads 4")


BAD_OPTIONS = [
    pytest.param(["--lr", "-1"], "error: --lr must", id="negative-lr"),
    pytest.param(["--dropout", "1.5"], "error: --dropout must", id="dropout-above-1"),
    pytest.param(["--train-limit", "0"], "error: --train-limit must", id="train-limit-0"),
    pytest.param(["--batch-size", "0"], "error: --batch-size must", id="batch-size-0"),
    pytest.param(["--batch-size", "-1"], "error: --batch-size must", id="negative-batch-size"),
    pytest.param(["--epochs", "-1"], "error: --epochs must", id="negative-epochs"),
    pytest.param(["--clip-grad-norm", "-1"], "error: --clip-grad-norm must", id="negative-clip"),
]


@pytest.mark.parametrize("options, fragment", BAD_OPTIONS)
def test_cli_bad_numeric_options_are_exit_2(small_dataset, tmp_path, options, fragment):
    result = cli("--data-dir", small_dataset, "--out-dir", tmp_path, "--epochs", 1, "--batch-size", 16,
                 *TINY_MODEL_ARGS, *options)
    assert_one_line_error(result, 2, fragment)


def test_cli_max_shift_that_leaves_nothing_of_the_image_is_exit_2(small_dataset, tmp_path):
    """The synthetic images are 8 pixels wide: a shift of 8 can move all of an image out of view."""
    for shift in (IMAGE_SIZE, 30):
        result = cli("--data-dir", small_dataset, "--out-dir", tmp_path / str(shift), "--epochs", 1,
                     "--max-shift", shift, *TINY_MODEL_ARGS)
        assert_one_line_error(result, 2, "--max-shift", f"smaller than the image size {IMAGE_SIZE}", f"got {shift}")
        assert list((tmp_path / str(shift)).iterdir()) == []          # refused before any training


def test_cli_max_shift_just_below_the_image_size_trains(small_dataset, tmp_path):
    result = cli("--data-dir", small_dataset, "--out-dir", tmp_path, "--epochs", 1, "--batch-size", 16,
                 "--max-shift", IMAGE_SIZE - 1, *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(tmp_path)) == 1


def out_dir_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken", "a file of that name exists"


def out_dir_parent_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken" / "run", "not a directory"


@pytest.mark.parametrize("bad_out_dir", [out_dir_is_a_file, out_dir_parent_is_a_file],
                         ids=lambda function: function.__name__[len("out_dir_"):])
def test_cli_out_dir_that_cannot_be_created_is_exit_1_before_loading_data(tmp_path, bad_out_dir):
    """The data folder does not exist either: the out-dir error comes first, so nothing was loaded."""
    out_dir, reason = bad_out_dir(tmp_path)
    result = cli("--data-dir", tmp_path / "no-such-data", "--out-dir", out_dir, "--epochs", 1, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "output folder", str(out_dir), reason)
    assert (tmp_path / "taken").read_text() == "not a folder"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("subfolder", ["run", ""], ids=["create-inside", "existing"])
def test_cli_out_dir_without_write_permission_is_exit_1_before_loading_data(tmp_path, subfolder):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        try:
            (locked / "probe").mkdir()
        except PermissionError:
            pass
        else:         # root (with CAP_DAC_OVERRIDE) writes into any folder, whatever its permissions
            pytest.skip("this process may write into a folder without write permission (root)")
        out_dir = locked / subfolder if subfolder else locked
        result = cli("--data-dir", tmp_path / "no-such-data", "--out-dir", out_dir, "--epochs", 1, *TINY_MODEL_ARGS)
    finally:
        locked.chmod(0o700)
    assert_one_line_error(result, 1, "output folder", str(out_dir), "permission denied")


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="the GPU backend works here")
def test_cli_gpu_without_a_usable_gpu_says_why_in_one_line(small_dataset, tmp_path):
    """No CuPy: what to install. CuPy without a device or without NVRTC (as in CI): the backend's reason."""
    result = cli("--device", "gpu", "--data-dir", small_dataset, "--out-dir", tmp_path, "--epochs", 1,
                 *TINY_MODEL_ARGS)
    if importlib.util.find_spec("cupy") is None:
        assert_one_line_error(result, 2, "cupy", "pip install")
    else:
        assert_one_line_error(result, 2, GPU_SKIP_REASON.split(" (")[0])
    assert not (tmp_path / "metrics.jsonl").exists()


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed: test_cli_plot_writes_the_pngs covers --plot")
def test_cli_plot_without_matplotlib_says_how_to_install_it(small_dataset, tmp_path):
    result = cli("--plot", "--data-dir", small_dataset, "--out-dir", tmp_path / "out", "--epochs", 1,
                 *TINY_MODEL_ARGS)
    assert_one_line_error(result, 2, "matplotlib", "pip install")
    assert not (tmp_path / "out").exists()               # refused before any training


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_cli_plot_writes_the_pngs(small_dataset, tmp_path):
    result = cli("--plot", "--data-dir", small_dataset, "--out-dir", tmp_path, "--epochs", 2, "--batch-size", 16,
                 *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    for name in ("curves.png", "attention.png", "attention_heads.png"):
        content = (tmp_path / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 10_000, (name, len(content))


# ------------------------------------------------------------------------------------------------
# 5. the non-finite guard keeps the last good checkpoint

# (the default weight decay 0.05 matters: theta *= 1 - lr * wd = -49999 each step overflows to inf, then NaN)
DIVERGING = dict(lr=1e6, clip_grad_norm=0.0, label_smoothing=0.0, weight_decay=0.05)
DIVERGING_ARGS = ["--lr", "1e6", "--clip-grad-norm", "0", "--label-smoothing", "0", "--weight-decay", "0.05"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NumPy's overflow warnings on the way to NaN
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(resume_dataset, tmp_path):
    run(resume_config(resume_dataset, tmp_path, epochs=1), log=quiet)
    checkpoint = tmp_path / "checkpoint.npz"
    good_checkpoint, good_metrics = checkpoint.read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
    good_steps = (tmp_path / "steps.jsonl").read_bytes()

    with pytest.raises(NonFiniteLoss, match="loss") as error:
        run(resume_config(resume_dataset, tmp_path, epochs=2, resume=True, **DIVERGING), log=quiet)
    assert str(checkpoint) in str(error.value)
    assert checkpoint.read_bytes() == good_checkpoint
    assert (tmp_path / "metrics.jsonl").read_bytes() == good_metrics
    assert (tmp_path / "steps.jsonl").read_bytes() == good_steps        # no line of NaN loss
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.jsonl", "steps.jsonl"]


def good_run_then_diverge(dataset, out_dir):
    """A good 1-epoch CLI run, then a resumed one at an absurd learning rate: (checkpoint bytes before, result)."""
    first = cli("--data-dir", dataset, "--out-dir", out_dir, "--epochs", 1, "--batch-size", 32, *TINY_MODEL_ARGS)
    assert first.returncode == 0, first.stderr
    before = (out_dir / "checkpoint.npz").read_bytes()
    result = cli("--data-dir", dataset, "--out-dir", out_dir, "--epochs", 2, "--batch-size", 32, "--resume",
                 *DIVERGING_ARGS, *TINY_MODEL_ARGS)
    return before, result


def test_cli_non_finite_loss_is_exit_1_and_keeps_the_checkpoint(resume_dataset, tmp_path):
    before, result = good_run_then_diverge(resume_dataset, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error:") and "loss" in last_line and "--lr" in last_line, result.stderr
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_cli_non_finite_loss_error_is_one_line(resume_dataset, tmp_path):
    _, result = good_run_then_diverge(resume_dataset, tmp_path)
    assert_one_line_error(result, 1, "loss")


# ------------------------------------------------------------------------------------------------
# 6. atomic checkpoint writes

def test_atomic_write_writes_the_bytes_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deeper" / "checkpoint.npz"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert [path.name for path in target.parent.iterdir()] == ["checkpoint.npz"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
@pytest.mark.parametrize("exception", [OSError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, failing,
                                                                              exception):
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"the previous checkpoint")

    def fail(*args, **kwargs):
        raise exception("simulated failure")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(exception):
        atomic_write(target, b"x" * 10_000)
    monkeypatch.undo()
    assert target.read_bytes() == b"the previous checkpoint"
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.npz"]
