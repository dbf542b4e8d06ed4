"""scratchvit/plots.py: the figures hold the numbers they claim to show, and --plot writes them.

Each figure function returns its matplotlib figure, so the tests read back what was drawn (line data,
tick positions, cell texts, map arrays) instead of only checking that a file appeared. The whole
module skips, with the reason, where matplotlib is not installed.
"""
import math

import numpy
import pytest

pytest.importorskip("matplotlib", reason='the plots need matplotlib (pip install "scratchvit[plot]")')

import matplotlib.pyplot as plt  # noqa: E402

import scratchvit.plots  # noqa: E402

from scratchvit import ViT  # noqa: E402
from scratchvit.attention_maps import attention_rollout, inspect  # noqa: E402
from scratchvit.plots import (attention_heads_figure, confusion_figure, curves_figure, epoch_ends,  # noqa: E402
                              log_window, mistakes_figure, rollout_figure, write_evaluation_plots, write_plots)
from scratchvit.report import evaluation_report  # noqa: E402
from scratchvit.config import TrainConfig  # noqa: E402
from scratchvit.run_log import read_step_log  # noqa: E402
from scratchvit.train import run  # noqa: E402
from test_report import LABELS, LogitsModel, chosen_logits, index_images  # noqa: E402
from test_train import IMAGE_SIZE, TINY_MODEL, write_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def step_records(steps_per_epoch, epochs, every):
    """Step-log records as StepLog writes them, with a loss that falls with the step."""
    records = []
    for epoch in range(epochs):
        ends = list(range(every, steps_per_epoch, every)) + [steps_per_epoch]
        for end in ends:
            step = epoch * steps_per_epoch + end
            records.append(dict(step=step, epoch=epoch + 1, loss=2.0 / step ** 0.5, lr=1e-3, images_per_second=100.0))
    return records


def history_of(epochs, validation=False):
    return [dict(epoch=epoch, train_loss=1.0 / epoch, test_accuracy=0.5 + 0.1 * epoch,
                 **(dict(validation_accuracy=0.4 + 0.1 * epoch) if validation else {}))
            for epoch in range(1, epochs + 1)]


# ------------------------------------------------------------------------------------------------
# curves.png

def test_epoch_ends_and_the_window_come_from_the_step_log():
    records = step_records(45, 3, 20)                  # lines at 20, 40, 45 | 65, 85, 90 | 110, 130, 135
    assert epoch_ends(records) == [(1, 45), (2, 90), (3, 135)]
    assert log_window(records) == 20
    assert log_window(step_records(45, 2, 50)) == 45          # N longer than an epoch: each line is an epoch


@pytest.mark.parametrize("epochs", [1, 3, 12])
def test_the_loss_is_drawn_over_steps_with_epoch_boundaries_and_accuracy_on_whole_epochs(epochs):
    records = step_records(50, epochs, 25)
    figure = curves_figure(history_of(epochs), records)
    loss_axes, accuracy_axes = figure.axes[:2]
    figure.canvas.draw()                                       # the tick locators run when drawn

    step_line = loss_axes.lines[0]
    numpy.testing.assert_array_equal(step_line.get_xdata(), [record["step"] for record in records])
    numpy.testing.assert_array_equal(step_line.get_ydata(), [record["loss"] for record in records])
    epoch_marks = loss_axes.lines[1]                           # train_loss of each epoch at its last step
    numpy.testing.assert_array_equal(epoch_marks.get_xdata(), [50 * epoch for epoch in range(1, epochs + 1)])
    numpy.testing.assert_array_equal(epoch_marks.get_ydata(), [1.0 / epoch for epoch in range(1, epochs + 1)])
    boundaries = [line.get_xdata()[0] for line in loss_axes.lines[2:]]
    assert boundaries == [50 * epoch for epoch in range(1, epochs)]      # between epochs, not after the last
    assert loss_axes.get_yscale() == "log"
    assert "25 steps" in loss_axes.get_legend().get_texts()[0].get_text()

    accuracy_line = accuracy_axes.lines[0]
    numpy.testing.assert_array_equal(accuracy_line.get_xdata(), range(1, epochs + 1))
    numpy.testing.assert_allclose(accuracy_line.get_ydata(), [100 * (0.5 + 0.1 * epoch) for epoch in
                                                              range(1, epochs + 1)])
    low, high = accuracy_axes.get_xlim()
    ticks = [tick for tick in accuracy_axes.get_xticks() if low <= tick <= high]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    assert f"{history_of(epochs)[-1]['test_accuracy']:.2%}" in accuracy_axes.get_title()


def test_without_a_step_log_the_loss_is_drawn_per_epoch_and_validation_beside_test():
    figure = curves_figure(history_of(4, validation=True), [])
    loss_axes, accuracy_axes = figure.axes[:2]
    numpy.testing.assert_array_equal(loss_axes.lines[0].get_xdata(), [1, 2, 3, 4])
    assert loss_axes.get_xlabel() == "epoch"
    assert [line.get_label() for line in accuracy_axes.lines] == ["test", "validation"]
    numpy.testing.assert_allclose(accuracy_axes.lines[1].get_ydata(), [50, 60, 70, 80])


# ------------------------------------------------------------------------------------------------
# attention_heads.png

def test_attention_heads_shows_every_layer_and_head_of_each_image_in_its_place():
    model = ViT(image_size=IMAGE_SIZE, num_classes=4, seed=2, **dict(TINY_MODEL, depth=3, heads=2))
    images = numpy.random.default_rng(0).standard_normal((2, 1, IMAGE_SIZE, IMAGE_SIZE)).astype(numpy.float32)
    labels = numpy.array([1, 3])
    expected = inspect(model, images)
    figure = attention_heads_figure(model, images, labels)

    panels = figure.subfigs
    assert len(panels) == 2
    for index, panel in enumerate(panels):
        axes = numpy.array(panel.axes).reshape(3, 3)           # rows: layers; columns: image/rollout, head 1, 2
        assert any(f"true {labels[index]}," in text.get_text() for text in panel.texts)
        numpy.testing.assert_array_equal(axes[1, 0].images[1].get_array(), expected["rollout"][index])
        for layer in range(3):
            assert axes[layer, 1].get_ylabel() == f"layer {layer + 1}"
            for head in range(2):
                shown = axes[layer, head + 1].images[1].get_array()          # [0] is the image beneath
                numpy.testing.assert_array_equal(shown, expected["heads"][index, layer, head])
        assert [axes[0, head + 1].get_title() for head in range(2)] == ["head 1", "head 2"]


def test_the_rollout_figure_shows_each_image_in_its_cell_with_its_classes_when_the_rows_are_not_full():
    """10 images on rows of 8: two rows, the last one with 2 images and 6 empty cells; each shown cell
    holds its own image, its rollout map and its true and predicted class, red where they differ."""
    model = ViT(image_size=IMAGE_SIZE, num_classes=4, seed=2, **TINY_MODEL)
    images = numpy.random.default_rng(1).standard_normal((10, 1, IMAGE_SIZE, IMAGE_SIZE)).astype(numpy.float32)
    maps, predictions = attention_rollout(model, images)
    labels = numpy.where(numpy.arange(10) % 3 == 0, (predictions + 1) % 4, predictions)   # images 0, 3, 6, 9 wrong
    figure = rollout_figure(model, images, labels)
    cells = [axes for axes in figure.axes if axes.images]
    assert len(figure.axes) == 16 and len(cells) == 10
    assert not any(axes.axison for axes in figure.axes[10:])                  # the empty cells are blank
    for index, axes in enumerate(cells):
        numpy.testing.assert_array_equal(axes.images[0].get_array(), images[index, 0])
        numpy.testing.assert_array_equal(axes.images[1].get_array(), maps[index])
        assert axes.get_title() == f"true {labels[index]}, pred {predictions[index]}"
        assert axes.title.get_color() == ("red" if index % 3 == 0 else "black")


# ------------------------------------------------------------------------------------------------
# confusion.png and misclassified.png

def small_report():
    return evaluation_report(LogitsModel(chosen_logits()), index_images(len(LABELS)), LABELS)


def test_the_confusion_figure_writes_each_count_in_its_cell():
    report = small_report()
    axes = confusion_figure(report).axes[0]
    cells = {(round(text.get_position()[1]), round(text.get_position()[0])): int(text.get_text())
             for text in axes.texts}
    expected = {(true, predicted): int(count) for (true, predicted), count in numpy.ndenumerate(report.confusion)
                if count}
    assert cells == expected                                   # (row = true, column = predicted); no zeros written
    assert "72.73%" in axes.get_title()                        # 8 of 11
    right = [child for child in axes.child_axes]               # the per-class accuracy beside each row
    labels = [label.get_text() for label in right[0].get_yticklabels()]
    assert labels == ["75.0%", "100.0%", "50.0%", "-"]


def test_the_mistakes_figure_shows_the_most_confident_mistakes_first():
    report = small_report()
    images = index_images(len(LABELS)) * numpy.ones((1, 1, 4, 4))         # image n is all n
    figure = mistakes_figure(report, images, count=2)
    shown = [axes for axes in figure.axes if axes.images]
    assert [axes.get_title().splitlines()[0] for axes in shown] == ["true 2 → 0", "true 2 → 3"]
    assert [axes.get_title().splitlines()[1] for axes in shown] == ["95.0%  (#6)", "70.0%  (#8)"]
    assert [axes.images[0].get_array()[0, 0] for axes in shown] == [6, 8]  # the right images


@pytest.mark.parametrize("count", [8, 9])
def test_the_mistakes_figure_keeps_every_mistake_when_a_row_is_not_full(count):
    """9 mistakes on rows of 8 make two rows (8 make one): none is dropped, each in confidence order."""
    labels = numpy.zeros(12, dtype=numpy.int64)
    predicted = numpy.where(numpy.arange(12) < count, 1, 0)
    confidence = numpy.linspace(0.9, 0.5, 12)                            # image 0 the most confident
    report = evaluation_report(LogitsModel(chosen_logits(predicted, confidence)), index_images(12), labels)
    figure = mistakes_figure(report, index_images(12) * numpy.ones((1, 1, 4, 4)), count=24)
    shown = [axes for axes in figure.axes if axes.images]
    assert len(figure.axes) == 8 * (-(-count // 8)) and len(shown) == count
    assert [axes.images[0].get_array()[0, 0] for axes in shown] == list(range(count))
    assert [axes.get_title().split("#")[1] for axes in shown] == [f"{index})" for index in range(count)]


def test_a_model_without_mistakes_still_gets_a_misclassified_png(tmp_path):
    right = LABELS.copy()
    report = evaluation_report(LogitsModel(chosen_logits(predicted=right)), index_images(len(LABELS)), LABELS)
    paths = write_evaluation_plots(tmp_path, report, index_images(len(LABELS)) * numpy.ones((1, 1, 4, 4)))
    assert [path.name for path in paths] == ["confusion.png", "misclassified.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in paths)


# ------------------------------------------------------------------------------------------------
# the files a run writes

def test_a_run_with_plot_writes_the_three_pngs(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", train_count=200, test_count=32, seed=8)
    out_dir = tmp_path / "run"
    logged, drawn = [], []

    def recording_curves_figure(history, steps=()):
        drawn.append(list(steps))
        return curves_figure(history, steps)

    monkeypatch.setattr(scratchvit.plots, "curves_figure", recording_curves_figure)
    history = run(TrainConfig(data_dir=str(data), out_dir=str(out_dir), epochs=2, batch_size=4, lr=5e-3, plot=True,
                              **TINY_MODEL), log=logged.append)
    names = ["curves.png", "attention.png", "attention_heads.png"]
    for name in names:
        content = (out_dir / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 10_000, (name, len(content))
        assert f"wrote {out_dir / name}" in logged
    assert math.isfinite(history[-1]["train_loss"])
    assert drawn == [read_step_log(out_dir / "steps.jsonl")] and len(drawn[0]) == 4    # the loss over steps
    # write_plots itself returns the paths it wrote, in that order
    model = ViT(image_size=IMAGE_SIZE, num_classes=10, **TINY_MODEL)
    images = numpy.zeros((5, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=numpy.float32)
    (tmp_path / "again").mkdir()
    paths = write_plots(tmp_path / "again", model, images, numpy.zeros(5, dtype=int), history)
    assert [path.name for path in paths] == names
