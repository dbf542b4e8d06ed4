"""PNG plots of a training run and of an evaluation report.

After training (`write_plots`, `train_mnist.py --plot`):
- curves.png: the training loss over steps (OUT/steps.jsonl, epoch boundaries marked) and the test
  accuracy over epochs;
- attention.png: where the CLS token looks, the attention rollout over a few test images;
- attention_heads.png: for a few test images, every layer's and head's CLS attention beside the
  image and its rollout (scratchvit/attention_maps.py).
After an evaluation (`write_evaluation_plots`, `train_mnist.py --eval-only --plot`):
- confusion.png: the confusion matrix with its counts;
- misclassified.png: the most confident mistakes, with true label, prediction and probability.

Each picture is drawn by a `*_figure` function that returns the matplotlib figure (to show in a
notebook, or for a test to read back what was drawn); the `write_*` functions save them as PNGs.
matplotlib is an optional extra (`pip install "scratchvit[plot]"`); nothing else here needs it.
"""
from pathlib import Path

import numpy

from .attention_maps import attention_rollout, inspect
from .backend import get_array_module, to_host

MATPLOTLIB_HINT = 'the plots need matplotlib: pip install "scratchvit[plot]" (or pip install matplotlib)'


def matplotlib_available():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib():
    """matplotlib with the Agg backend (files, no window, no display needed), or ImportError with the hint."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")


def _pyplot():
    """matplotlib.pyplot, leaving the backend alone (a notebook keeps its own; write_plots and
    write_evaluation_plots choose Agg), or ImportError with the install hint."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    return plt


def _save(figure, path):
    """Write `figure` to `path` as a PNG and free it; returns path."""
    plt = _pyplot()
    try:
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path


def _overlay(axes, pixels, attention_map):
    """The image in grey and a (grid, grid) attention map stretched over it."""
    size = pixels.shape[0]
    axes.imshow(pixels, cmap="gray")
    axes.imshow(attention_map, cmap="inferno", alpha=0.55, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                interpolation="bilinear")


def _hide_ticks(axes):
    """No ticks, but the axes stay on, so set_ylabel still shows (axis("off") would hide it too)."""
    axes.set_xticks([])
    axes.set_yticks([])


# ------------------------------------------------------------------------------------------------
# after training

def write_plots(out_dir, model, test_images, test_labels, history, count=16, *, steps=(), head_images=3):
    """curves.png, attention.png and attention_heads.png in `out_dir`; returns their paths.

    `history`: the per-epoch records of metrics.jsonl; `steps`: those of steps.jsonl (without them the
    loss is drawn per epoch); `count` images in the rollout figure, `head_images` in the per-head one."""
    require_matplotlib()
    out_dir = Path(out_dir)
    return [_save(curves_figure(history, steps), out_dir / "curves.png"),
            _save(rollout_figure(model, test_images[:count], test_labels[:count]), out_dir / "attention.png"),
            _save(attention_heads_figure(model, test_images[:head_images], test_labels[:head_images]),
                  out_dir / "attention_heads.png")]


def epoch_ends(steps):
    """[(epoch, global step at its end)] from step-log records: an epoch's last line is at its end."""
    ends = {}
    for record in steps:
        ends[record["epoch"]] = max(ends.get(record["epoch"], 0), record["step"])
    return sorted(ends.items())


def log_window(steps):
    """The most steps one line of the step log covers: its --log-every, or an epoch where that is
    shorter (an epoch's last window and the two halves of a window cut by Ctrl-C are shorter)."""
    marks = ([0] if steps[0]["epoch"] == 1 else []) + [record["step"] for record in steps]
    return max((later - earlier for earlier, later in zip(marks, marks[1:])), default=None)


def _plain_log_formatter():
    """matplotlib's log-axis labels as plain numbers (0.05, 2) instead of 5x10^-2, 2x10^0."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, value, position=None):
            return f"{value:g}" if super().__call__(value, position) else ""   # label where matplotlib would

    return PlainLogFormatter


def curves_figure(history, steps=()):
    """The training loss over steps (from step-log records; per epoch without them) with the epoch
    boundaries marked, and the test (and validation) accuracy over epochs."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    PlainLogFormatter = _plain_log_formatter()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[3, 2]))

    if steps:
        ends = epoch_ends(steps)
        loss_axes.plot([record["step"] for record in steps], [record["loss"] for record in steps], lw=1.2,
                       label=f"mean over {log_window(steps)} steps" if log_window(steps) else "mean loss")
        # the epoch's mean (metrics.jsonl's train_loss) at its last step, to tie the two logs together
        loss_by_epoch = {record["epoch"]: record["train_loss"] for record in history}
        marked = [(step, loss_by_epoch[epoch]) for epoch, step in ends if epoch in loss_by_epoch]
        if marked:
            loss_axes.plot(*zip(*marked), "o", color="tab:orange", markersize=4, label="epoch mean",
                           clip_on=False)       # the last one sits on the right edge
        for _, step in ends[:-1]:
            loss_axes.axvline(step, color="0.8", lw=0.8, zorder=0)
        # an epoch axis on top, mapped through the boundaries (piecewise linear: after a resume with
        # another batch size, epochs need not have the same number of steps)
        boundary_epochs = ([0] if ends[0][0] == 1 else []) + [epoch for epoch, _ in ends]
        boundary_steps = ([0] if ends[0][0] == 1 else []) + [step for _, step in ends]
        if len(boundary_steps) > 1:
            top = loss_axes.secondary_xaxis(
                "top", functions=(lambda step: numpy.interp(step, boundary_steps, boundary_epochs),
                                  lambda epoch: numpy.interp(epoch, boundary_epochs, boundary_steps)))
            top.set_xlabel("epoch")
            top.xaxis.set_major_locator(MaxNLocator(integer=True))
            loss_axes.set_xlim(boundary_steps[0], boundary_steps[-1])
        loss_axes.set(xlabel="step")
        loss_axes.legend(loc="upper right", fontsize=8)
    else:
        loss_axes.plot([record["epoch"] for record in history], [record["train_loss"] for record in history],
                       marker="o")
        loss_axes.set(xlabel="epoch")
        loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    loss_axes.set_yscale("log")         # the late, small improvements matter most, and show only on a log scale
    loss_axes.yaxis.set_major_formatter(PlainLogFormatter())
    loss_axes.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    loss_axes.set(ylabel="training loss (log scale)", title="Training loss")
    loss_axes.grid(True, axis="y", alpha=0.3)        # vertical lines only at the epoch boundaries

    epochs = [record["epoch"] for record in history]
    accuracy_axes.plot(epochs, [100 * record["test_accuracy"] for record in history], marker="o", color="tab:green",
                       label="test")
    if any("validation_accuracy" in record for record in history):
        accuracy_axes.plot(epochs, [100 * record.get("validation_accuracy", float("nan")) for record in history],
                           marker="s", color="tab:purple", label="validation")
        accuracy_axes.legend(loc="lower right", fontsize=8)
    # epochs are whole numbers; min_n_ticks=1, or with one epoch the locator falls back to fractions
    accuracy_axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)",
                      title=f"Test accuracy (epoch {epochs[-1]}: {history[-1]['test_accuracy']:.2%})")
    accuracy_axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def _image_grid(plt, count, *, width, height, title_room, columns=8):
    """A figure of `count` image cells, up to `columns` a row, every axis off; returns (figure, the first
    `count` axes in reading order). width and height are one cell's size in inches."""
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + title_room), squeeze=False)
    cells = list(numpy.ravel(axes))
    for axes_one in cells:
        axes_one.axis("off")
    return figure, cells[:count]


def rollout_figure(model, images, labels):
    """The attention rollout over each image, titled with its true and predicted class (red when wrong)."""
    plt = _pyplot()
    maps, predictions = attention_rollout(model, images)
    pixels, labels = to_host(images)[:, 0], to_host(labels)
    figure, cells = _image_grid(plt, len(maps), width=2, height=2.6, title_room=0.4)
    for index, axes_one in enumerate(cells):
        _overlay(axes_one, pixels[index], maps[index])
        axes_one.set_title(f"true {labels[index]}, pred {predictions[index]}",
                           color="black" if labels[index] == predictions[index] else "red", fontsize=9)
    figure.suptitle("Attention rollout: where the CLS token looks")
    figure.tight_layout(h_pad=1.5)
    return figure


def attention_heads_figure(model, images, labels):
    """One panel per image: the image and its rollout, then a grid of layers (rows) x heads (columns)
    of the CLS token's attention over the patches (attention_maps.inspect)."""
    plt = _pyplot()
    seen = inspect(model, images)
    heads, rollout = seen["heads"], seen["rollout"]              # (B, L, H, grid, grid), (B, grid, grid)
    predictions = seen["logits"].argmax(axis=1)
    pixels, labels = to_host(images)[:, 0], to_host(labels)
    count, layers, head_count = heads.shape[:3]
    rows = max(layers, 2)                                         # the image and its rollout take two rows
    figure = plt.figure(figsize=(count * (head_count + 1) * 1.25 + 0.3, rows * 1.3 + 1.0), layout="constrained")
    panels = figure.subfigures(1, count, wspace=0.08, squeeze=False)[0]
    for index, panel in enumerate(panels):
        axes = panel.subplots(rows, head_count + 1, squeeze=False)
        for axes_one in axes.ravel():
            axes_one.axis("off")
        correct = labels[index] == predictions[index]
        panel.suptitle(f"image {index}: true {labels[index]}, predicted {predictions[index]}",
                       color="black" if correct else "red", fontsize=10)
        axes[0, 0].imshow(pixels[index], cmap="gray")
        axes[0, 0].set_title("image", fontsize=9)
        _overlay(axes[1, 0], pixels[index], rollout[index])
        axes[1, 0].set_title("rollout", fontsize=9)
        for axes_one in axes[:layers, 1:].ravel().tolist() + [axes[0, 0], axes[1, 0]]:
            axes_one.axis("on")
            _hide_ticks(axes_one)
        for layer in range(layers):
            for head in range(head_count):
                axes_one = axes[layer, head + 1]
                _overlay(axes_one, pixels[index], heads[index, layer, head])
                if layer == 0:
                    axes_one.set_title(f"head {head + 1}", fontsize=9)
            axes[layer, 1].set_ylabel(f"layer {layer + 1}", fontsize=9)
    figure.suptitle("CLS-token attention per layer and head (own colour scale each), beside the rollout")
    return figure


# ------------------------------------------------------------------------------------------------
# after an evaluation

def write_evaluation_plots(folder, report, images, count=24):
    """confusion.png and misclassified.png (the `count` most confident mistakes) in `folder`, from an
    EvaluationReport (scratchvit/report.py) of `images`; returns their paths."""
    require_matplotlib()
    folder = Path(folder)
    return [_save(confusion_figure(report), folder / "confusion.png"),
            _save(mistakes_figure(report, images, count), folder / "misclassified.png")]


def confusion_figure(report):
    """The confusion matrix (rows true, columns predicted) with its counts, each class's accuracy on the right."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    confusion = report.confusion
    classes = confusion.shape[0]
    figure, axes = plt.subplots(figsize=(0.62 * classes + 2.2, 0.55 * classes + 1.6))
    # a log scale: with ~1000 images per class on the diagonal and a handful of mistakes elsewhere, a
    # linear one leaves every mistake the colour of an empty cell; empty cells stay white
    shown = numpy.ma.masked_equal(confusion, 0)
    image = axes.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(int(confusion.max()), 2)))
    for true in range(classes):
        for predicted in range(classes):
            count = int(confusion[true, predicted])
            if count:
                dark = count >= max(int(confusion.max()), 2) ** 0.6        # the upper part of the log scale
                axes.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                          color="white" if dark else "black")
    axes.set_xticks(range(classes))
    axes.set_yticks(range(classes))
    axes.set(xlabel="predicted class", ylabel="true class",
             title=f"Confusion matrix (accuracy {report.accuracy:.2%} on {report.images} images)")
    # each row's accuracy on the right: which classes the model gets wrong most often
    right = axes.secondary_yaxis("right")
    right.set_yticks(range(classes))
    right.set_yticklabels(["-" if numpy.isnan(value) else f"{value:.1%}" for value in report.per_class_accuracy],
                          fontsize=8)
    right.set_ylabel("accuracy of the class")
    colorbar = figure.colorbar(image, ax=axes, pad=0.11, fraction=0.04, label="images (log scale)")
    colorbar.ax.yaxis.set_major_formatter(_plain_log_formatter()())
    figure.tight_layout()
    return figure


def mistakes_figure(report, images, count=24):
    """The `count` most confident mistakes of `report` on `images`: each image with its true class,
    the prediction, the probability the model gave it and its index in the set."""
    plt = _pyplot()
    mistakes = report.mistakes(count)
    total_mistakes = int((report.predictions != report.labels).sum())
    if len(mistakes) == 0:
        figure, axes = plt.subplots(figsize=(4, 2))
        axes.axis("off")
        axes.text(0.5, 0.5, f"no mistakes on {report.images} images", ha="center", va="center")
        return figure
    pixels = to_host(images[get_array_module(images).asarray(mistakes)])[:, 0]    # only these leave the device
    figure, cells = _image_grid(plt, len(mistakes), width=1.6, height=1.95, title_room=0.5)
    for slot, axes_one in enumerate(cells):
        index = mistakes[slot]
        axes_one.imshow(pixels[slot], cmap="gray")
        axes_one.set_title(f"true {report.labels[index]} → {report.predictions[index]}\n"
                           f"{report.confidence[index]:.1%}  (#{index})", fontsize=8.5)
    figure.suptitle(f"The {len(mistakes)} most confident mistakes of {total_mistakes} "
                    f"(true → predicted, probability, index)", fontsize=10)
    figure.tight_layout()
    return figure
