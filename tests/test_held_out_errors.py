"""tools/held_out_errors.py: the held-out accuracy of finished --validation runs, plain and with test-time
augmentation, and the overlap of their errors (the figures behind the README's search for 99.6%).

Each test is meant to fail for a realistic fault: evaluating other images than the run held out (the
first N instead of the last), the trained weights where the run evaluated their average, errors
counted under other shifts than their column's, "every" and "any" swapped, a run without a validation
split measured as if it had one, and runs compared on different images. The shift average itself is
tested in test_shift_average.py.

Two tiny runs train here on a small data set the test writes (faint noise with a bright block; the
labels follow the block's place, so the models learn something and their accuracies differ).
"""
import json
from pathlib import Path

import numpy
import pytest

from scratchvit.backend import get_backend
from scratchvit.config import TrainConfig, load_data
from scratchvit.data import MNIST_FILES, write_idx
from scratchvit.predict import load_trained_model
from scratchvit.pretrained import PRETRAINED_PATH
from scratchvit.shift_average import shift_averaged_probabilities
from scratchvit.train import run
from tools import held_out_errors
from tools.held_out_errors import SHIFT_SETS, held_out_errors as measure

VALIDATION = 40


def write_dataset(folder, train_count=400, test_count=60, seed=0):
    """The four MNIST files: a bright 6x6 block on faint noise, labelled by the block's row band (0..9)."""
    rng = numpy.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_count), ("test", test_count)):
        images = rng.integers(0, 30, size=(count, 28, 28)).astype(numpy.uint8)
        labels = rng.integers(0, 10, size=count).astype(numpy.uint8)
        for image, label in zip(images, labels):
            top, left = 2 * int(label) + int(rng.integers(0, 3)), int(rng.integers(2, 20))
            image[top:top + 6, left:left + 6] = 255
        write_idx(folder / MNIST_FILES[f"{split}_images"], images)
        write_idx(folder / MNIST_FILES[f"{split}_labels"], labels)
    return folder


def train(data_dir, out_dir, **options):
    config = TrainConfig(**dict(dict(data_dir=str(data_dir), out_dir=str(out_dir), epochs=4, batch_size=20,
                                     lr=1e-2, patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32, threads=1,
                                     validation=VALIDATION, max_shift=0, seed=0), **options))
    run(config, log=lambda message: None)
    return out_dir / "checkpoint.npz"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("held-out") / "mnist")


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two finished runs: one with a weight average, one without, on other seeds."""
    folder = tmp_path_factory.mktemp("runs")
    return [train(data_dir, folder / "average", seed=1, ema_decay=0.99),
            train(data_dir, folder / "plain", seed=2, ema_decay=0.0)]


@pytest.fixture(scope="module")
def result(runs, data_dir):
    return measure([str(path) for path in runs], str(data_dir))


def last_metrics(checkpoint):
    lines = (Path(checkpoint).parent / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_plain_accuracy_is_what_the_run_itself_measured_on_the_same_images(runs, result):
    """The last N training images, the weights the run evaluated (its average where it kept one)."""
    for path, measured in zip(runs, result["runs"]):
        record = last_metrics(path)
        assert measured["accuracy"]["validation"]["plain"] == pytest.approx(record["validation_accuracy"], abs=1e-12)
        assert measured["accuracy"]["test"]["plain"] == pytest.approx(record["test_accuracy"], abs=1e-12)
    assert result["images"] == {"validation": VALIDATION, "test": 60}
    # the check above tells the average from the trained weights, and one split from another, only where
    # their figures differ: they do in these runs
    record = last_metrics(runs[0])
    assert record["validation_accuracy"] != record["validation_accuracy_trained_weights"]
    figures = [run["accuracy"][split]["plain"] for run in result["runs"] for split in ("validation", "test")]
    assert len(set(figures)) == len(figures)


def test_errors_are_the_images_whose_most_probable_class_is_wrong(runs, data_dir, result):
    data = load_data(TrainConfig(data_dir=str(data_dir), validation=VALIDATION), get_backend("cpu"))
    for path, measured in zip(runs, result["runs"]):
        model, _ = load_trained_model(path)
        for name, shifts in SHIFT_SETS.items():
            predicted = shift_averaged_probabilities(model, data["validation_images"], shifts).argmax(axis=1)
            expected = numpy.flatnonzero(predicted != data["validation_labels"]).tolist()
            assert measured["errors"]["validation"][name] == expected
            assert measured["accuracy"]["validation"][name] == 1 - len(expected) / VALIDATION
    # each column's shifts make a difference somewhere, so a column counted under another's shifts shows
    columns = [[run["errors"][split][name] for run in result["runs"] for split in ("validation", "test")]
               for name in SHIFT_SETS]
    assert all(first != second for index, first in enumerate(columns) for second in columns[index + 1:])


def test_the_overlap_counts_the_errors_every_run_makes_and_those_any_run_makes(result):
    for split in ("validation", "test"):
        for name in SHIFT_SETS:
            first, second = (set(run["errors"][split][name]) for run in result["runs"])
            assert result["overlap"][split][name] == {"every": len(first & second), "any": len(first | second)}
    # the two tiny runs do not make the same errors, so "every" and "any" differ somewhere
    assert any(counts["every"] != counts["any"] for sets in result["overlap"].values() for counts in sets.values())


def test_main_prints_the_table_and_writes_the_json(runs, data_dir, tmp_path, capsys):
    out = tmp_path / "errors.json"
    assert held_out_errors.main([str(path) for path in runs] + ["--data-dir", str(data_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(str(runs[0])) == 1 and "misclassified by every run, by any" in printed
    written = json.loads(out.read_text())
    assert [run["checkpoint"] for run in written["runs"]] == [str(path) for path in runs]


def test_runs_that_held_out_nothing_are_measured_on_the_test_set_alone(data_dir, tmp_path):
    first = train(data_dir, tmp_path / "first", validation=0, epochs=1, seed=3)
    second = train(data_dir, tmp_path / "second", validation=0, epochs=1, seed=4, ema_decay=0.0)
    result = measure([str(first), str(second), str(PRETRAINED_PATH)], str(data_dir))
    assert result["images"] == {"test": 60} and set(result["overlap"]) == {"test"}
    for path, measured in zip((first, second), result["runs"]):
        assert set(measured["accuracy"]) == {"test"}
        assert measured["accuracy"]["test"]["plain"] == pytest.approx(last_metrics(path)["test_accuracy"], abs=1e-12)


def test_runs_that_held_out_different_images_are_refused(runs, data_dir, tmp_path, capsys):
    for count in (VALIDATION + 1, 0):
        other = train(data_dir, tmp_path / f"other-{count}", validation=count, epochs=1)
        assert held_out_errors.main([str(runs[0]), str(other), "--data-dir", str(data_dir)]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "different validation images" in error and str(other) in error
