"""Classify your own digit images with a trained scratchvit checkpoint.

    python -m scratchvit.predict --checkpoint runs/mnist/checkpoint.npz digit.png [more.png ...]
    digit.png: 7 (98.1%), 1 (1.2%), 9 (0.3%)

Without --checkpoint it uses the model shipped in the package (scratchvit/pretrained.py), and says so
in its first line, on stderr, so that stdout (and --json) holds the predictions alone.

Each image is made into an MNIST image first (scratchvit/preprocess.py: grey, inverted when the
background is light, cropped to the ink, fitted into 20x20, centred by mass in 28x28, normalised as in
training), then the model gives the probabilities of the classes: by default their average over the
image and its eight one-pixel shifts (scratchvit/shift_average.py: nine forward passes, dropout off);
with --no-shift-average the softmax of the logits of one forward pass, as training evaluates.

`--json` prints one JSON object per image instead:
    {"path": "digit.png", "top": [{"class": 7, "probability": 0.981}, ...], "probabilities": [p0, ..., p9]}

Errors a user can fix are one line on stderr, `error: ...`, as in train_mnist.py: exit status 2 for a
bad option, a missing GPU backend or a missing Pillow; 1 for a checkpoint that is missing, damaged or
not a model of 28x28 grey images, and for an image that cannot be read or is blank. Every good image is
still predicted when another fails, and the exit status is then 1.

From Python, the same in three calls (the demo page uses them):
    model, meta = load_trained_model("runs/mnist/checkpoint.npz")       # or model = load_pretrained()
    images = to_model_input([mnist_style(load_grayscale("digit.png"))])     # (1, 1, 28, 28)
    probabilities(model, images)                      # (1, 10) host array; shift_average=False: one pass
"""
import argparse
import json
import sys

import numpy

from .backend import backend_of, get_backend, to_host
from .checkpoint import CheckpointError, load_checkpoint
from .cupy_check import BackendUnavailable
from .data import one_line
from .pretrained import PRETRAINED_PATH, shipped_model_line
from .preprocess import CANVAS_SIZE, PILLOW_HINT, ImageError, load_mnist_style, pillow_available, to_model_input
from .shift_average import NO_SHIFT, ONE_PIXEL_SHIFTS, shift_averaged_probabilities
from .vit import ViT

PREDICT_BATCH_SIZE = 256      # images per forward pass: a few MB of activations for the default ViT


def load_trained_model(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint meta) from a checkpoint that train_mnist.py wrote.

    CheckpointError (one line naming the file) when it is missing or damaged, when its weights do not fit
    the model its configuration describes or are not finite, or when that model does not take 28x28 grey
    images as preprocess.py makes them. BackendUnavailable for "gpu" where CuPy cannot run.
    """
    backend = get_backend(device)          # first: a missing GPU backend is a usage problem, whatever the file
    # the configuration, every array's header and the weights' finiteness are checked here, before the
    # model is built: a checkpoint declaring a huge model is one line, not a MemoryError
    meta, model_state, _ = load_checkpoint(path, averaged=True)
    config = meta["model_config"]
    if config["image_size"] != CANVAS_SIZE or config.get("channels", 1) != 1:
        raise CheckpointError(f"{path}: checkpoint's model takes {config['image_size']}x{config['image_size']} "
                              f"images with {config.get('channels', 1)} channel(s); predict prepares "
                              f"{CANVAS_SIZE}x{CANVAS_SIZE} grey images as MNIST's")
    try:
        model = ViT(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: checkpoint's model configuration cannot be built ({one_line(error)})") from None
    try:
        model.load_state_dict(model_state)
    except (KeyError, ValueError) as error:
        reason = error.args[0] if error.args else error         # str(KeyError) would add quotes around it
        raise CheckpointError(f"{path}: checkpoint's weights do not fit the model its configuration describes "
                              f"({one_line(reason)})") from None
    return model.eval().to(backend), meta


def load_pretrained(device="cpu"):
    """The model shipped in the package (scratchvit/pretrained.py), in eval mode on `device`, its file
    checked on the way in as any checkpoint's. Its provenance: pretrained.pretrained_provenance()."""
    return load_trained_model(PRETRAINED_PATH, device=device)[0]


def model_backend(model):
    """The Backend (backend.py) of the device `model`'s weights are on: where its input must be."""
    return backend_of(model.head.weight.data)


def probabilities(model, images, *, shift_average=True):
    """(B, K) host array of class probabilities (each row sums to 1) for (B, 1, 28, 28) `images` as
    `to_model_input` gives them, in eval mode: averaged over each image and its eight one-pixel shifts
    (shift_average.py), or with shift_average=False the softmax of the logits of one forward pass."""
    images = model_backend(model).asarray(images)        # onto the model's device
    shifts = ONE_PIXEL_SHIFTS if shift_average else NO_SHIFT
    return to_host(shift_averaged_probabilities(model, images, shifts, batch_size=PREDICT_BATCH_SIZE))


def top_classes(row, count):
    """[(class, probability)] of the `count` most probable classes of one (K,) row, most probable first."""
    order = numpy.argsort(-row, kind="stable")[:count]                    # ties: the lower class first
    return [(int(index), float(row[index])) for index in order]


def format_line(path, row, count):
    """`digit.png: 7 (98.1%), 1 (1.2%), 9 (0.3%)`"""
    return f"{path}: " + ", ".join(f"{label} ({100 * probability:.1f}%)" for label, probability in top_classes(row, count))


def format_json(path, row, count):
    return json.dumps(dict(path=str(path),
                           top=[{"class": label, "probability": probability} for label, probability in top_classes(row, count)],
                           probabilities=[float(probability) for probability in row]))


def predict_files(model, paths, *, batch_size=PREDICT_BATCH_SIZE, shift_average=True):
    """Yield (path, (K,) probabilities or None, ImageError or None) for each path, in order; a file that
    cannot be read or is blank gives its error and the others are still predicted. `shift_average`:
    as in `probabilities`."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        prepared, errors = {}, {}
        for index, path in enumerate(chunk):
            try:
                prepared[index] = load_mnist_style(path)
            except ImageError as error:
                errors[index] = error
        rows = (probabilities(model, to_model_input(numpy.stack(list(prepared.values()))), shift_average=shift_average)
                if prepared else [])
        row_of = dict(zip(prepared, rows))
        for index, path in enumerate(chunk):
            yield path, row_of.get(index), errors.get(index)


# ------------------------------------------------------------------------------------------------
# command line

def build_parser():
    parser = argparse.ArgumentParser(prog="python -m scratchvit.predict",
                                     description="Classify digit images (PNG, JPEG, ...) with a trained scratchvit "
                                                 "checkpoint, after making each an MNIST-style 28x28 image.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files; dark-on-light or light-on-dark")
    parser.add_argument("--checkpoint", help="a checkpoint.npz written by train_mnist.py (default: the model "
                                             "shipped in the package, scratchvit/models/mnist_vit.npz)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--top", type=int, default=3, metavar="K",
                        help="how many of the most probable classes to show (default: 3; at most all of them)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image: path, top classes, every class's probability")
    parser.add_argument("--shift-average", action=argparse.BooleanOptionalAction, default=True,
                        help="on by default: average each image's class probabilities over the image and its "
                             "eight one-pixel shifts (9 forward passes); --no-shift-average: one forward pass, "
                             "as training evaluates")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    if not pillow_available():
        print(f"error: {PILLOW_HINT}", file=sys.stderr)
        return 2
    try:
        return predict_and_print(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def predict_and_print(args):
    """Print each image's line (or JSON object) as it comes; the exit status of main."""
    if args.checkpoint is None:
        print(shipped_model_line(args.shift_average), file=sys.stderr, flush=True)
    try:
        model, _ = load_trained_model(args.checkpoint or PRETRAINED_PATH, args.device)
    except BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    formatter = format_json if args.json else format_line
    status = 0
    for path, row, error in predict_files(model, args.images, shift_average=args.shift_average):
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            status = 1
        else:
            print(formatter(path, row, args.top), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
