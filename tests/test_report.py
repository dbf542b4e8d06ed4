"""The evaluation report (scratchvit/report.py) and `train_mnist.py --eval-only`, which prints and writes it.

The counting is checked on a stand-in model whose logits the test chooses, against a confusion
matrix counted by hand in a loop, so a swapped axis, a lost batch or a wrong row sum shows; then on
a real tiny ViT against `evaluation.evaluate` (the accuracy training prints); then end to end through the
CLI on the synthetic data of test_train.py, whose labels are 0..3 of 10 classes: classes 4 to 9
have no test image, the case where per-class accuracy is undefined (NaN in Python, null in JSON).
"""
import json
import math

import numpy
import pytest

from scratchvit import ViT
from scratchvit.backend import to_host
from scratchvit.layers import Layer
from scratchvit.layers.softmax import softmax_simple
from scratchvit.report import (MISTAKES_IN_JSON, EvaluationReport, evaluation_report, json_text,
                               write_report_json)
from scratchvit.config import TrainConfig
from scratchvit.evaluation import ONE_PASS_TEXT, SHIFT_AVERAGE_TEXT, evaluate, load_for_evaluation, report_checkpoint
from scratchvit.shift_average import shift_averaged_probabilities
from test_train import (CLASSES, HAS_MATPLOTLIB, IMAGE_SIZE, TINY_MODEL, TINY_MODEL_ARGS, assert_one_line_error,
                        cli, read_metrics, saved_model_accuracy, write_dataset)


class LogitsModel(Layer):
    """A stand-in for a ViT: image n (a (1, 1, 1) array holding n) gets row n of `logits`. Records the
    training mode of every forward, and the batch sizes it saw. A Layer, for Layer.evaluating."""

    def __init__(self, logits):
        self.logits, self.training, self.modes, self.batches = numpy.asarray(logits), True, [], []

    def forward(self, images):
        self.modes.append(self.training)
        self.batches.append(images.shape[0])
        return self.logits[images[:, 0, 0, 0].astype(int)]

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def index_images(count):
    return numpy.arange(count, dtype=numpy.float64).reshape(count, 1, 1, 1)


def confusion_by_hand(labels, predictions, classes):
    counts = numpy.zeros((classes, classes), dtype=numpy.int64)
    for true, predicted in zip(labels, predictions):
        counts[true, predicted] += 1
    return counts


# 11 images of 4 classes, class 3 absent; the mistakes are not symmetric (a transposed matrix differs)
LABELS = numpy.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1])
PREDICTED = numpy.array([0, 1, 0, 1, 1, 2, 0, 2, 3, 0, 1])
CONFIDENCE = numpy.array([0.9, 0.6, 0.8, 0.7, 0.5, 0.9, 0.95, 0.6, 0.7, 0.4, 0.8])


def chosen_logits(predicted=PREDICTED, confidence=CONFIDENCE, classes=4, scale=0.0):
    """Logits whose softmax gives class predicted[n] probability confidence[n], the rest shared
    equally; `scale` added to every logit (softmax ignores it; a softmax without the max subtraction
    overflows at scale 1000)."""
    probabilities = numpy.tile(((1 - confidence) / (classes - 1))[:, None], (1, classes))
    probabilities[numpy.arange(len(predicted)), predicted] = confidence
    return numpy.log(probabilities) + scale


@pytest.mark.parametrize("batch_size", [1, 4, 11, 500])
def test_the_report_counts_what_the_logits_say(batch_size):
    model = LogitsModel(chosen_logits(scale=1000.0))        # large logits: a naive softmax would give NaN
    report = evaluation_report(model, index_images(len(LABELS)), LABELS, batch_size=batch_size)

    numpy.testing.assert_array_equal(report.predictions, PREDICTED)
    numpy.testing.assert_array_equal(report.confusion, confusion_by_hand(LABELS, PREDICTED, 4))
    assert report.confusion[0, 1] == 1 and report.confusion[1, 0] == 0        # rows true, columns predicted
    assert sum(model.batches) == len(LABELS) and max(model.batches) <= batch_size
    assert model.modes and not any(model.modes) and model.training            # eval mode, then restored
    # what the task asks of the matrix: it sums to the set's size, its diagonal is the accuracy
    assert report.confusion.sum() == len(LABELS)
    assert report.correct == int((PREDICTED == LABELS).sum()) == 8
    assert report.accuracy == 8 / 11
    numpy.testing.assert_array_equal(report.class_images, [4, 3, 4, 0])
    # per class: the diagonal over the row sums; class 3 has no image, so no accuracy
    numpy.testing.assert_array_equal(report.per_class_accuracy[:3], [3 / 4, 3 / 3, 2 / 4])
    assert math.isnan(report.per_class_accuracy[3])
    # probabilities: the softmax of the logits, each row summing to 1
    numpy.testing.assert_allclose(report.probabilities, softmax_simple(chosen_logits()), rtol=1e-12)
    numpy.testing.assert_allclose(report.confidence, CONFIDENCE, rtol=1e-12)


def test_mistakes_are_the_wrong_predictions_most_confident_first():
    report = evaluation_report(LogitsModel(chosen_logits()), index_images(len(LABELS)), LABELS)
    # the wrong ones: image 1 (0 -> 1, 0.6), 6 (2 -> 0, 0.95), 8 (2 -> 3, 0.7)
    assert report.mistakes().tolist() == [6, 8, 1]
    assert report.mistakes(2).tolist() == [6, 8]


class FailingModel(LogitsModel):
    """Raises in its `fail_at`-th forward pass (counted from 1): out of memory half-way through the set."""

    def __init__(self, logits, fail_at):
        super().__init__(logits)
        self.fail_at = fail_at

    def forward(self, images):
        if len(self.batches) + 1 == self.fail_at:
            raise MemoryError("out of memory in batch 2")
        return super().forward(images)


@pytest.mark.parametrize("training", [True, False])
def test_the_model_comes_back_in_its_own_mode_even_when_a_batch_fails(training):
    """A model in training mode goes back to training, one in eval mode stays in eval mode, and an
    exception in the middle of the set restores the mode too (a model left in eval mode would train on
    without dropout)."""
    model = LogitsModel(chosen_logits())
    model.train(training)
    evaluation_report(model, index_images(len(LABELS)), LABELS, batch_size=4)
    assert model.modes == [False] * 3 and model.training is training
    failing = FailingModel(chosen_logits(), fail_at=2)
    failing.train(training)
    with pytest.raises(MemoryError):
        evaluation_report(failing, index_images(len(LABELS)), LABELS, batch_size=4)
    assert failing.modes == [False] and failing.training is training


@pytest.mark.parametrize("wrong", [20, 21])
def test_the_json_file_lists_at_most_the_20_most_confident_mistakes(tmp_path, wrong):
    """MISTAKES_IN_JSON: 20 mistakes are all listed; of 21 the least confident is left out."""
    count = 25
    labels = numpy.zeros(count, dtype=numpy.int64)
    predicted = numpy.where(numpy.arange(count) < wrong, 1, 0)              # the first `wrong` images are wrong
    confidence = numpy.linspace(0.9, 0.4, count)                             # image 0 the most confident
    report = evaluation_report(LogitsModel(chosen_logits(predicted, confidence)), index_images(count), labels)
    assert len(report.mistakes()) == wrong
    write_report_json(tmp_path / "evaluation.json", report)
    listed = json.loads((tmp_path / "evaluation.json").read_text())["most_confident_mistakes"]
    assert [mistake["index"] for mistake in listed] == list(range(min(wrong, MISTAKES_IN_JSON)))


@pytest.mark.parametrize("labels, batch_size, fragment", [
    (LABELS[:1], 500, r"labels must be \(B,\) integers, one per image \(B = 11\), got shape \(1,\)"),
    (LABELS[:10], 500, r"labels must be \(B,\) .*got shape \(10,\)"),
    (LABELS[:, None], 500, r"labels must be \(B,\) .*got shape \(11, 1\)"),
    (LABELS + 0.5, 500, r"labels must be \(B,\) integers.*float64"),
    (numpy.where(LABELS == 1, 4, LABELS), 500, r"labels must be class numbers 0..3 \(the model has 4 outputs\), "
                                               r"got values from 0 to 4"),
    (LABELS - 1, 500, r"labels must be class numbers 0..3.*from -1 to 1"),
    (LABELS, 0, "batch_size must be a positive integer, got 0"),
    (LABELS, 2.5, "batch_size must be a positive integer, got 2.5"),
], ids=["one-label", "one-short", "column", "floats", "class-4-of-4", "negative", "batch-0", "batch-float"])
def test_labels_that_are_not_one_class_per_image_are_a_one_line_error(labels, batch_size, fragment):
    """One label for eleven images used to broadcast into a report of accuracy 4.0; a label beyond the
    model's classes failed deep in a reshape."""
    with pytest.raises(ValueError, match=fragment) as error:
        evaluation_report(LogitsModel(chosen_logits()), index_images(len(LABELS)), labels, batch_size=batch_size)
    assert "\n" not in str(error.value)


def test_the_accepted_boundaries_of_labels_and_batch_size():
    """Labels 0 and K - 1 (here 3, the last class, absent from LABELS) and a batch of one image are fine;
    an empty set is refused."""
    labels = LABELS.copy()
    labels[[0, -1]] = [3, 0]
    report = evaluation_report(LogitsModel(chosen_logits()), index_images(len(LABELS)), labels.astype(numpy.uint8),
                               batch_size=1)
    assert report.class_images[3] == 1 and report.confusion.sum() == len(LABELS)
    with pytest.raises(ValueError, match="images must hold at least one image, got 0"):
        evaluation_report(LogitsModel(chosen_logits()), index_images(0), LABELS[:0])


def test_the_report_of_a_vit_agrees_with_evaluate(backend):
    """On a real model (either device): the same accuracy as evaluation.evaluate, the same predictions as
    the argmax of its logits, and probabilities that are the softmax of those logits."""
    rng = numpy.random.default_rng(3)
    model = ViT(image_size=IMAGE_SIZE, num_classes=5, dropout=0.2, seed=1, dtype="float64", **TINY_MODEL)
    model.to(backend)
    images = backend.asarray(rng.standard_normal((37, 1, IMAGE_SIZE, IMAGE_SIZE)))
    labels = rng.integers(0, 5, size=37)
    report = evaluation_report(model, images, backend.asarray(labels), batch_size=10)
    assert model.training                                                   # its mode restored

    model.eval()
    logits = to_host(model.forward(images))
    numpy.testing.assert_array_equal(report.predictions, logits.argmax(axis=1))
    numpy.testing.assert_allclose(report.probabilities, softmax_simple(logits), rtol=1e-10)
    numpy.testing.assert_array_equal(report.confusion, confusion_by_hand(labels, logits.argmax(axis=1), 5))
    assert 0 < report.correct < 37                           # an untrained model: neither none nor all right
    assert report.accuracy == evaluate(model, images, backend.asarray(labels), batch_size=10)


def test_the_shift_averaged_report_is_of_the_averaged_probabilities(backend):
    """shift_average=True: predictions, probabilities and counts of shift_average.py's average (tested
    there against its own oracle), not of one pass; the model's mode restored."""
    rng = numpy.random.default_rng(3)
    model = ViT(image_size=IMAGE_SIZE, num_classes=5, dropout=0.2, seed=1, dtype="float64", **TINY_MODEL)
    model.to(backend)
    images = backend.asarray(rng.standard_normal((37, 1, IMAGE_SIZE, IMAGE_SIZE)))
    labels = rng.integers(0, 5, size=37)
    report = evaluation_report(model, images, backend.asarray(labels), batch_size=10, shift_average=True)
    assert model.training
    averaged = to_host(shift_averaged_probabilities(model, images, batch_size=10))
    numpy.testing.assert_allclose(report.probabilities, averaged, rtol=1e-12)
    numpy.testing.assert_array_equal(report.predictions, averaged.argmax(axis=1))
    numpy.testing.assert_array_equal(report.confusion, confusion_by_hand(labels, averaged.argmax(axis=1), 5))
    one_pass = evaluation_report(model, images, backend.asarray(labels), batch_size=10)
    assert numpy.abs(report.probabilities - one_pass.probabilities).max() > 1e-6     # the check above tells them apart


# ------------------------------------------------------------------------------------------------
# the JSON file and the table

def small_report():
    return evaluation_report(LogitsModel(chosen_logits()), index_images(len(LABELS)), LABELS)


def test_the_json_file_is_valid_json_with_null_for_an_absent_class(tmp_path):
    path = tmp_path / "evaluation.json"
    write_report_json(path, small_report(), checkpoint="somewhere.npz", epoch=3, split="test")
    text = path.read_text()
    assert "NaN" not in text
    document = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON file"))
    assert document["format"] == "scratchvit-evaluation-1"
    assert (document["checkpoint"], document["epoch"], document["split"]) == ("somewhere.npz", 3, "test")
    assert (document["images"], document["correct"], document["accuracy"]) == (11, 8, 8 / 11)
    assert document["class_images"] == [4, 3, 4, 0]
    assert document["per_class_accuracy"] == [0.75, 1.0, 0.5, None]
    assert document["confusion_matrix"]["rows"] == "true class"
    assert document["confusion_matrix"]["counts"] == confusion_by_hand(LABELS, PREDICTED, 4).tolist()
    assert [mistake["index"] for mistake in document["most_confident_mistakes"]] == [6, 8, 1]
    assert document["most_confident_mistakes"][0] == dict(index=6, true=2, predicted=0,
                                                          probability=pytest.approx(0.95, rel=1e-12))
    # each row of the matrix on its own line: the file reads as a table
    assert "[1, 0, 2, 1]" in text.splitlines()[text.splitlines().index('  "counts": [') + 3]
    assert [path.name for path in tmp_path.iterdir()] == ["evaluation.json"]        # no temporary file left


def test_json_text_is_json_for_nested_values():
    value = dict(a=[[1, 2], [3, None]], b={"path": "x{1, 2}[3]", "n": [0.5]}, c=[], d=[dict(i=1)])
    assert json.loads(json_text(value)) == value
    with pytest.raises(ValueError):
        json_text(dict(x=float("nan")))


def table_rows(table):
    """{true class: (counts, images, accuracy text)} from EvaluationReport.table()."""
    rows = {}
    for line in table.splitlines()[2:]:
        cells, tail = line.split("|")
        numbers = cells.split()
        rows[int(numbers[0])] = ([0 if cell == "." else int(cell) for cell in numbers[1:]],
                                 int(tail.split()[0]), tail.split()[1])
    return rows


def test_the_table_holds_the_counts_aligned():
    report = small_report()
    table = report.table()
    rows = table_rows(table)
    assert sorted(rows) == [0, 1, 2, 3]
    for true, (counts, images, accuracy) in rows.items():
        assert counts == report.confusion[true].tolist()
        assert images == report.class_images[true]
    assert [rows[true][2] for true in range(4)] == ["75.00%", "100.00%", "50.00%", "-"]
    lines = table.splitlines()[1:]
    assert len({len(line) for line in lines}) == 1, table                   # aligned: every row as wide
    assert len({line.index("|") for line in lines}) == 1, table


# ------------------------------------------------------------------------------------------------
# end to end: --eval-only

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "report", train_count=256, test_count=100, seed=4)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A run folder after 3 epochs of the tiny model: the accuracy is high but not perfect."""
    out_dir = tmp_path_factory.mktemp("report") / "run"
    result = cli("--data-dir", dataset, "--out-dir", out_dir, "--epochs", 3, "--batch-size", 32, "--lr", "1e-2",
                 *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    return out_dir


def test_cli_eval_only_prints_the_report_and_writes_it_as_json(dataset, trained):
    """--no-shift-average: the report of one forward pass, whose accuracy is the one training printed."""
    checkpoint = trained / "checkpoint.npz"
    result = cli("--data-dir", dataset, "--eval-only", "--no-shift-average", "--checkpoint", checkpoint,
                 *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    accuracy = read_metrics(trained)[-1]["test_accuracy"]
    assert f"test accuracy {accuracy:.2%} ({checkpoint}" in result.stdout          # the line training printed

    document = json.loads((trained / "evaluation.json").read_text())
    counts = numpy.array(document["confusion_matrix"]["counts"])
    assert counts.shape == (10, 10)                       # the model's 10 outputs, of which 4 are used
    assert counts.sum() == document["images"] == 100
    assert numpy.trace(counts) == document["correct"] and document["accuracy"] == accuracy
    assert document["class_images"] == counts.sum(axis=1).tolist()
    for true in range(10):
        expected = counts[true, true] / counts[true].sum() if counts[true].sum() else None
        assert document["per_class_accuracy"][true] == expected
    assert document["per_class_accuracy"][CLASSES:] == [None] * (10 - CLASSES)
    assert document["checkpoint"] == str(checkpoint) and document["epoch"] == 3
    assert document["prediction"] == ONE_PASS_TEXT and "one_pass_accuracy" not in document

    # the printed table: the same counts, in the same places
    lines = result.stdout.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("confusion matrix"))
    rows = table_rows("\n".join(lines[start:start + 12]))
    assert [rows[true][0] for true in range(10)] == counts.tolist()
    assert "evaluation.json" in result.stdout


def test_cli_eval_only_reports_the_shift_average_with_the_one_pass_accuracy_beside_it(dataset, trained):
    """By default the report is of the predictions predict gives (the shift average), and the line also
    says the accuracy training printed, in one pass, so the two numbers are never confused."""
    checkpoint = trained / "checkpoint.npz"
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", checkpoint, *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    config = TrainConfig(data_dir=str(dataset), **TINY_MODEL)
    _, model, data = load_for_evaluation(checkpoint, config)
    expected = evaluation_report(model, data["test_images"], data["test_labels"], shift_average=True)
    one_pass = read_metrics(trained)[-1]["test_accuracy"]
    assert expected.accuracy != one_pass                 # the two figures differ here, so the check below tells them apart
    assert (f"test accuracy {expected.accuracy:.2%} averaged over the image and its 8 one-pixel shifts; "
            f"{one_pass:.2%} in one forward pass") in result.stdout, result.stdout
    document = json.loads((trained / "evaluation.json").read_text())
    assert document["confusion_matrix"]["counts"] == expected.confusion.tolist()
    assert document["accuracy"] == expected.accuracy and document["one_pass_accuracy"] == one_pass
    assert document["prediction"] == SHIFT_AVERAGE_TEXT


def test_cli_shift_average_options_without_eval_only_are_refused(dataset, tmp_path):
    """Training evaluates each epoch in one pass: the option there would be a promise not kept."""
    for option in ("--shift-average", "--no-shift-average"):
        result = cli("--data-dir", dataset, "--out-dir", tmp_path / "out", option, *TINY_MODEL_ARGS)
        assert result.returncode == 2 and "go with --eval-only" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_report_checkpoint_from_python_matches_evaluate(dataset, trained, tmp_path):
    """The report is callable from Python, writes beside the checkpoint wherever that is, and in one
    pass its accuracy is the one training measures (evaluation.evaluate on the same saved model)."""
    checkpoint = tmp_path / "copy" / "model.npz"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes((trained / "checkpoint.npz").read_bytes())
    config = TrainConfig(data_dir=str(dataset), **TINY_MODEL)
    lines = []
    report = report_checkpoint(checkpoint, config, shift_average=False, log=lines.append)
    assert isinstance(report, EvaluationReport)
    assert report.accuracy == saved_model_accuracy(checkpoint, config)
    assert report.table() in lines
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["evaluation.json", "model.npz"]
    assert json.loads((checkpoint.parent / "evaluation.json").read_text())["correct"] == report.correct
    averaged = report_checkpoint(checkpoint, config, log=lines.append)
    document = json.loads((checkpoint.parent / "evaluation.json").read_text())
    assert document["correct"] == averaged.correct and document["one_pass_accuracy"] == report.accuracy


def test_cli_eval_only_that_cannot_write_its_report_is_a_one_line_error(dataset, trained, tmp_path):
    """A folder named evaluation.json stands where the file goes (works as root, unlike permissions)."""
    (tmp_path / "checkpoint.npz").write_bytes((trained / "checkpoint.npz").read_bytes())
    (tmp_path / "evaluation.json").mkdir()
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", tmp_path / "checkpoint.npz", *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "evaluation report", str(tmp_path))


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_cli_eval_only_plot_writes_the_confusion_and_mistakes_pngs(dataset, trained, tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes((trained / "checkpoint.npz").read_bytes())
    result = cli("--data-dir", dataset, "--eval-only", "--plot", "--checkpoint", tmp_path / "checkpoint.npz",
                 *TINY_MODEL_ARGS)
    assert result.returncode == 0, result.stderr
    for name in ("confusion.png", "misclassified.png"):
        content = (tmp_path / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 10_000, name
        assert f"wrote {tmp_path / name}" in result.stdout


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed: the test above covers --eval-only --plot")
def test_cli_eval_only_plot_without_matplotlib_says_how_to_install_it(dataset, trained, tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes((trained / "checkpoint.npz").read_bytes())
    result = cli("--data-dir", dataset, "--eval-only", "--plot", "--checkpoint", tmp_path / "checkpoint.npz",
                 *TINY_MODEL_ARGS)
    assert_one_line_error(result, 2, "matplotlib", "pip install")
    assert not (tmp_path / "evaluation.json").exists()                     # refused before evaluating
