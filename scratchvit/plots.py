"""PNG plots of a training run: loss and accuracy curves, and where the CLS token looks (the attention
rollout of scratchvit/attention_maps.py over a few test images).

matplotlib is an optional extra (`pip install "scratchvit[plot]"`); nothing else here needs it.
"""
from pathlib import Path

from .attention_maps import attention_rollout
from .backend import host, to_host

MATPLOTLIB_HINT = 'the plots need matplotlib: pip install "scratchvit[plot]" (or pip install matplotlib)'


def matplotlib_available():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")


def write_plots(out_dir, model, test_images, test_labels, history, count=16):
    require_matplotlib()
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    paths = []

    epochs = [record["epoch"] for record in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [record["train_loss"] for record in history], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    accuracy_axes.plot(epochs, [100 * record["test_accuracy"] for record in history], marker="o", color="tab:green")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    figure.tight_layout()
    paths.append(out_dir / "curves.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)

    images = test_images[:count]
    maps, predictions = attention_rollout(model, images)
    pixels, labels = to_host(images)[:, 0], to_host(test_labels[:count])
    columns = 8
    rows = (len(maps) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.6 * rows + 0.4))
    for index, axes_one in enumerate(host.ravel(axes)):
        axes_one.axis("off")
        if index >= len(maps):
            continue
        size = pixels[index].shape[0]
        axes_one.imshow(pixels[index], cmap="gray")
        axes_one.imshow(maps[index], cmap="inferno", alpha=0.55, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                        interpolation="bilinear")
        axes_one.set_title(f"true {labels[index]}, pred {predictions[index]}",
                           color="black" if labels[index] == predictions[index] else "red", fontsize=9)
    figure.suptitle("Attention rollout: where the CLS token looks")
    figure.tight_layout(h_pad=1.5)
    paths.append(out_dir / "attention.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths
