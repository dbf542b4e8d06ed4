"""Tests of `--validation N` (TrainConfig.validation): the last N images of the training file are held
out of training and measured after every epoch exactly as the test set is, so that settings can be
chosen on them and the test set is only reported.

Each test is meant to fail for a realistic bug: the split taken from the wrong end or after
--train-limit, held-out images still trained on, the validation set measured differently from the
test set (augmented, another batch size, without the thread replicas) or replaced by the test set,
a bad N accepted or refused at the wrong limit, a resume that moves the split, metrics that change
without --validation. The runs train the tiny ViT of test_train.py on its synthetic quadrant images.
"""
import json

import numpy
import pytest

import scratchvit.train
from scratchvit import ViT
from scratchvit.data import load_mnist, normalize
from scratchvit.checkpoint import CheckpointError, load_checkpoint
from scratchvit.config import TrainConfig
from scratchvit.evaluation import evaluate
from scratchvit.train import run
from scratchvit.train_step import TrainStep
from test_train import (TINY_MODEL, TINY_MODEL_ARGS, Crash, assert_one_line_error, cli, quiet, read_metrics,
                        saved_model_accuracy, write_dataset)

TRAIN_COUNT = 240
TEST_COUNT = 64
HELD_OUT = 40            # the validation split of the runs below, unless a test says otherwise

# metrics.jsonl's fields before --validation existed: a run without it must write exactly these
FIELDS_WITHOUT_VALIDATION = ["epoch", "train_loss", "test_accuracy", "lr", "seconds", "train_seconds",
                             "images_per_second", "elapsed", "wall_seconds"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "validation", train_count=TRAIN_COUNT, test_count=TEST_COUNT,
                         seed=5, hard_tail=HELD_OUT)


@pytest.fixture(scope="module")
def host_arrays(dataset):
    """The dataset's four arrays as the files hold them, and each training image's index by its normalised pixels."""
    arrays = load_mnist(str(dataset))
    normalized = normalize(arrays["train_images"], "cpu")
    index_of = {image.tobytes(): index for index, image in enumerate(normalized)}
    assert len(index_of) == TRAIN_COUNT           # every image is distinct, so a trained image names its index
    return dict(arrays, normalized_train=normalized, index_of=index_of)


def config(dataset, out_dir, **options):
    defaults = dict(TINY_MODEL, data_dir=str(dataset), out_dir=str(out_dir), epochs=2, batch_size=16, lr=1e-2,
                    warmup_epochs=0.5, seed=0, ema_decay=0.0)     # one evaluation per split and epoch: no average
    return TrainConfig(**dict(defaults, **options))


class Spy:
    """Records the images of every training step and every call of `evaluate` during a run."""

    def __init__(self, monkeypatch):
        self.trained = []                  # per step: the host copy of the images the step received
        self.evaluations = []              # per call: (images, labels, batch_size, replicas, pool), on the host
        original_call, original_evaluate = TrainStep.__call__, scratchvit.train.evaluate

        def recording_call(step, images, labels):
            self.trained.append(numpy.array(images))
            return original_call(step, images, labels)

        def recording_evaluate(model, images, labels, batch_size=500, *, replicas=(), pool=None, communicator=None):
            self.evaluations.append((numpy.array(images), numpy.array(labels), batch_size, list(replicas), pool))
            return original_evaluate(model, images, labels, batch_size, replicas=replicas, pool=pool,
                                     communicator=communicator)

        monkeypatch.setattr(TrainStep, "__call__", recording_call)
        monkeypatch.setattr(scratchvit.train, "evaluate", recording_evaluate)


# ------------------------------------------------------------------------------------------------
# 1. which images are trained on, which are validated

@pytest.mark.parametrize("validation, train_limit, trained_count", [
    pytest.param(HELD_OUT, None, TRAIN_COUNT - HELD_OUT, id="held-out"),
    pytest.param(HELD_OUT, 50, 50, id="limit-after-the-split"),              # the first 50 of the first 200
    pytest.param(HELD_OUT, 220, TRAIN_COUNT - HELD_OUT, id="limit-above-what-is-left"),
    pytest.param(0, None, TRAIN_COUNT, id="off"),
])
def test_the_last_n_images_are_validated_and_never_trained_on(dataset, host_arrays, tmp_path, monkeypatch,
                                                             validation, train_limit, trained_count):
    """max_shift 0: a training step receives the stored images themselves, so each one names its index."""
    spy = Spy(monkeypatch)
    steps = []
    run(config(dataset, tmp_path, validation=validation, train_limit=train_limit, max_shift=0), log=quiet,
        on_step=lambda epoch, step: steps.append(epoch))

    steps_per_epoch = -(-trained_count // 16)
    assert steps == [0] * steps_per_epoch + [1] * steps_per_epoch        # the epoch follows the reduced set
    for epoch in range(2):
        batches = spy.trained[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
        trained = sorted(host_arrays["index_of"][image.tobytes()] for batch in batches for image in batch)
        assert trained == list(range(trained_count)), epoch               # each of the first ones once, no other

    # per epoch: the validation images (when held out), then the test images
    test = (host_arrays["test_images"], host_arrays["test_labels"])
    expected = ([(host_arrays["normalized_train"][-validation:], host_arrays["train_labels"][-validation:])]
                if validation else []) + [(normalize(test[0], "cpu"), test[1])]
    assert len(spy.evaluations) == 2 * len(expected)
    for call, (images, labels) in zip(spy.evaluations, expected * 2):
        numpy.testing.assert_array_equal(call[0], images)                # not augmented: the stored pixels
        numpy.testing.assert_array_equal(call[1], labels)


def test_validation_is_evaluated_exactly_as_the_test_set(dataset, tmp_path, monkeypatch):
    """The same batch size, the same thread replicas and pool; with the random shift on, the validation
    images still reach `evaluate` unshifted (the previous test checks the pixels with the shift off)."""
    spy = Spy(monkeypatch)
    run(config(dataset, tmp_path, validation=HELD_OUT, max_shift=1, eval_batch_size=16, threads=2), log=quiet)
    assert len(spy.evaluations) == 4
    normalized_tail = normalize(load_mnist(str(dataset))["train_images"][-HELD_OUT:], "cpu")
    for validation_call, test_call in (spy.evaluations[0:2], spy.evaluations[2:4]):
        numpy.testing.assert_array_equal(validation_call[0], normalized_tail)
        assert validation_call[2] == test_call[2] == 16
        assert [id(model) for model in validation_call[3]] == [id(model) for model in test_call[3]]
        assert validation_call[4] is test_call[4]


# ------------------------------------------------------------------------------------------------
# 2. what validation_accuracy reports

@pytest.fixture(scope="module")
def validated_run(dataset, tmp_path_factory):
    """6 epochs with dropout, the shift and two threads evaluating batches of 16: (config, history)."""
    out_dir = tmp_path_factory.mktemp("validated")
    run_config = config(dataset, out_dir, validation=HELD_OUT, epochs=6, max_shift=1, dropout=0.1, threads=2,
                        eval_batch_size=16)
    return run_config, run(run_config, log=quiet)


def test_validation_accuracy_is_the_final_checkpoint_evaluated_on_the_last_n_images(dataset, validated_run):
    run_config, history = validated_run
    meta, model_state, _ = load_checkpoint(f"{run_config.out_dir}/checkpoint.npz")
    model = ViT(**meta["model_config"])
    model.load_state_dict(model_state)
    arrays = load_mnist(str(dataset))
    tail_images = normalize(arrays["train_images"][-HELD_OUT:], "cpu")
    expected = evaluate(model, tail_images, arrays["train_labels"][-HELD_OUT:].astype("int64"), HELD_OUT)

    assert history[-1]["validation_accuracy"] == expected
    assert read_metrics(run_config.out_dir)[-1]["validation_accuracy"] == expected
    # the hard tail: half its labels are wrong, so it scores well below the test set (a sign the tail was measured)
    assert expected <= 0.75 < history[-1]["test_accuracy"], history[-1]


def test_metrics_put_validation_accuracy_beside_test_accuracy_every_epoch(validated_run):
    run_config, history = validated_run
    metrics = read_metrics(run_config.out_dir)
    assert [list(record) for record in metrics] == [FIELDS_WITHOUT_VALIDATION[:2] + ["validation_accuracy"]
                                                    + FIELDS_WITHOUT_VALIDATION[2:]] * 6
    assert [record["validation_accuracy"] for record in metrics] == [record["validation_accuracy"]
                                                                     for record in history]


def test_eval_only_stays_on_the_test_set(validated_run):
    run_config, history = validated_run
    accuracy = saved_model_accuracy(f"{run_config.out_dir}/checkpoint.npz", run_config)
    assert accuracy == history[-1]["test_accuracy"] != history[-1]["validation_accuracy"]


def test_without_validation_the_metrics_are_unchanged(dataset, tmp_path):
    log = []
    run(config(dataset, tmp_path), log=log.append)
    assert [list(record) for record in read_metrics(tmp_path)] == [FIELDS_WITHOUT_VALIDATION] * 2
    assert not any("validation accuracy" in line for line in log), log


# ------------------------------------------------------------------------------------------------
# 3. the CLI: the epoch line, and one-line errors for an N that cannot work

def test_cli_epoch_line_shows_the_validation_accuracy(tmp_path):
    """The largest N there is: one training image left (32 images, N = 31), and it trains."""
    small = write_dataset(tmp_path / "data", train_count=32, test_count=16)
    result = cli("--data-dir", small, "--out-dir", tmp_path / "out", "--epochs", 1, "--batch-size", 16,
                 "--validation", 31, *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    record = read_metrics(tmp_path / "out")[0]
    assert f"validation accuracy {record['validation_accuracy']:.2%}  test accuracy" in result.stdout, result.stdout


@pytest.mark.parametrize("validation, fragments", [
    pytest.param(-1, ["validation", "non-negative", "got -1"], id="negative"),
    pytest.param(32, ["validation", "at least one training image", "at most 31", "got 32"], id="all-images"),
    pytest.param(1000, ["validation", "at most 31", "got 1000"], id="more-than-all"),
])
def test_cli_validation_that_leaves_no_training_image_is_exit_2(tmp_path, validation, fragments):
    small = write_dataset(tmp_path / "data", train_count=32, test_count=16)
    result = cli("--data-dir", small, "--out-dir", tmp_path / "out", "--epochs", 1, "--batch-size", 16,
                 "--validation", validation, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()            # refused before any training


# ------------------------------------------------------------------------------------------------
# 4. resume keeps the split

def test_resume_with_the_same_validation_repeats_the_uninterrupted_run(dataset, validated_run, tmp_path):
    run_config, reference = validated_run

    def crash_in_second_epoch(epoch, step):
        if (epoch, step) == (1, 2):
            raise Crash

    resumable = dict(out_dir=str(tmp_path))
    with pytest.raises(Crash):
        run(TrainConfig(**dict(vars(run_config), **resumable)), log=quiet, on_step=crash_in_second_epoch)
    history = run(TrainConfig(**dict(vars(run_config), resume=True, **resumable)), log=quiet)
    assert [(record["validation_accuracy"], record["test_accuracy"], record["train_loss"]) for record in history] \
        == [(record["validation_accuracy"], record["test_accuracy"], record["train_loss"]) for record in reference]


def test_cli_resume_with_another_validation_is_a_one_line_error(dataset, tmp_path):
    first = cli("--data-dir", dataset, "--out-dir", tmp_path, "--epochs", 1, "--batch-size", 32,
                "--validation", HELD_OUT, *TINY_MODEL_ARGS)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "checkpoint.npz").read_bytes()
    for other in ([], ["--validation", HELD_OUT + 1]):          # forgotten, or changed
        result = cli("--data-dir", dataset, "--out-dir", tmp_path, "--epochs", 2, "--batch-size", 32, "--resume",
                     *other, *TINY_MODEL_ARGS)
        assert_one_line_error(result, 1, f"validation={HELD_OUT}", f"--validation {HELD_OUT}")
        assert (tmp_path / "checkpoint.npz").read_bytes() == before
        assert len(read_metrics(tmp_path)) == 1


def test_resume_of_a_checkpoint_from_before_validation_existed_means_no_validation(dataset, tmp_path):
    """Checkpoints written before TrainConfig had `validation` held nothing out: they resume with 0 only."""
    run(config(dataset, tmp_path, epochs=1), log=quiet)
    path = tmp_path / "checkpoint.npz"
    with numpy.load(path) as archive:
        arrays = dict(archive)
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["train_config"]["validation"]
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    numpy.savez(path, **arrays)

    with pytest.raises(CheckpointError, match="validation=0"):
        run(config(dataset, tmp_path, epochs=2, validation=HELD_OUT, resume=True), log=quiet)
    history = run(config(dataset, tmp_path, epochs=2, resume=True), log=quiet)
    assert [record["epoch"] for record in history] == [1, 2]
